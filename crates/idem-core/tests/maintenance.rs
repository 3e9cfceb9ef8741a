//! Key cleanup and key statistics (SPEC §5 `keys cleanup`, `keys stats`), checked against a
//! fresh database of each kind: which keys a run removes, its batches and time limit, the
//! one-at-a-time lock, its audit entry, a run killed half-way by a real signal, and the counts
//! and Prometheus text that `keys stats` reports after a known sequence of postings.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use idem_core::cleanup::PG_CLEANUP_LOCK_KEY;
use idem_core::stats::{Counts, KindUserCounts};
use idem_core::testing::TestDb;
use idem_core::{
    AuditAction, AuditEntry, AuditFilter, CleanupOptions, CleanupReport, Error, IdemKey, KeyFilter,
    Operator, Outcome, Posting, Request, Store, both_databases, to_prometheus,
};
use sqlx::{Connection, PgConnection};

fn operator(name: &str) -> Operator {
    Operator::parse(name).expect("valid operator")
}

fn posting(user: &str, key: &str, request: Request, ttl: TimeDelta) -> Posting {
    Posting::new(operator(user), IdemKey::parse(key).expect("valid key"), request)
        .ttl(ttl)
        .expect("valid ttl")
}

fn receive(qty: i64) -> Request {
    Request::receive("SKU-1", qty, "A1").expect("valid receipt")
}

/// A fixed moment, so that expiry is decided by the times the tests pass, not by the clock.
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2031, 3, 14, 6, 0, 0).single().expect("valid time")
}

fn cleanup_at(now: DateTime<Utc>) -> CleanupOptions {
    CleanupOptions { now, ..CleanupOptions::default() }
}

/// Posts `n` receipts under keys `<prefix>-<i>` at `at`, each living for `ttl`.
async fn post_receipts(
    store: &Store,
    user: &str,
    prefix: &str,
    n: usize,
    at: DateTime<Utc>,
    ttl: TimeDelta,
) {
    for i in 0..n {
        let receipt = posting(user, &format!("{prefix}-{i}"), receive(1), ttl);
        let posted = store.post_at(&receipt, at).await.expect("posting a receipt");
        assert_eq!(posted.outcome, Outcome::Applied);
    }
}

/// Every key name in the table, whatever its state, sorted.
async fn key_names(store: &Store) -> Vec<String> {
    let filter = KeyFilter::default();
    let mut names: Vec<String> =
        store.keys(&filter, t0()).await.unwrap().into_iter().map(|k| k.key).collect();
    names.sort();
    names
}

async fn cleanup_entries(store: &Store) -> Vec<AuditEntry> {
    let filter = AuditFilter { action: Some(AuditAction::Cleanup), ..AuditFilter::default() };
    store.audit(&filter).await.expect("reading the audit log")
}

/// Writes `n` key rows straight into the table, for tests that need more keys than postings
/// would make quickly. They look like keys claimed by a caller's own transaction: no ledger row.
async fn insert_keys(
    store: &Store,
    prefix: &str,
    n: i64,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) {
    match store {
        Store::Sqlite(s) => {
            // Times are microseconds since the epoch in the SQLite schema.
            sqlx::query(
                "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < ?1) \
                 INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, created_at, expires_at) \
                 SELECT 'bulk', ?2 || '-' || i, 'receive', 'f', 'c', ?3, ?4 FROM seq",
            )
            .bind(n)
            .bind(prefix)
            .bind(created_at.timestamp_micros())
            .bind(expires_at.timestamp_micros())
            .execute(s.pool())
            .await
            .unwrap();
        }
        Store::Postgres(p) => {
            sqlx::query(
                "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, created_at, expires_at) \
                 SELECT 'bulk', $2 || '-' || i, 'receive', 'f', 'c', $3, $4 FROM generate_series(1, $1) i",
            )
            .bind(n)
            .bind(prefix)
            .bind(created_at)
            .bind(expires_at)
            .execute(p.pool())
            .await
            .unwrap();
        }
    }
}

/// The cleanup lock, held the way a running cleanup in another process holds it.
enum HeldLock {
    File(std::fs::File),
    Session(PgConnection),
}

impl HeldLock {
    async fn take(db: &TestDb) -> HeldLock {
        HeldLock::try_take(db).await.expect("the cleanup lock is free")
    }

    /// The lock, or `None` while someone else holds it.
    async fn try_take(db: &TestDb) -> Option<HeldLock> {
        match db.store() {
            Store::Sqlite(s) => {
                let mut name = s.path().as_os_str().to_owned();
                name.push("-cleanup.lock");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(name)
                    .unwrap();
                file.try_lock().ok().map(|()| HeldLock::File(file))
            }
            Store::Postgres(_) => {
                let mut conn = PgConnection::connect(db.url()).await.unwrap();
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(PG_CLEANUP_LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                locked.then_some(HeldLock::Session(conn))
            }
        }
    }

    async fn release(self) {
        match self {
            HeldLock::File(file) => file.unlock().unwrap(),
            HeldLock::Session(mut conn) => {
                // Unlocked before the session closes: a closed session's locks go only once the
                // server has ended it, which can be after the test's next statement.
                let unlocked: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
                    .bind(PG_CLEANUP_LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                assert!(unlocked, "the lock was held by this session");
                conn.close().await.unwrap();
            }
        }
    }
}

both_databases!(cleanup_removes_only_expired_keys, |db| {
    let store = db.store();
    let hour = TimeDelta::hours(1);
    let now = t0() + hour;
    // Expired an hour ago, expiring exactly now, and expiring a microsecond from now.
    post_receipts(store, "alice", "old", 3, t0() - hour, hour).await;
    post_receipts(store, "bob", "edge", 2, t0(), hour).await;
    let just_live = hour + TimeDelta::microseconds(1);
    post_receipts(store, "alice", "live", 2, t0(), just_live).await;
    post_receipts(store, "carol", "fresh", 1, now, hour).await;
    let ledger_before = store.transactions(&Default::default()).await.unwrap();

    let report = store.cleanup(&cleanup_at(now), &operator("cron")).await.unwrap();

    assert_eq!(report.removed, 5);
    assert_eq!(report.batches, 1);
    assert!(!report.dry_run && !report.stopped_early);
    assert!(report.longest_batch <= report.elapsed);
    assert_eq!(key_names(store).await, ["fresh-0", "live-0", "live-1"]);
    for name in ["live-0", "live-1"] {
        let key = IdemKey::parse(name).unwrap();
        assert!(store.key_is_live(&operator("alice"), &key, now).await.unwrap());
    }
    // The ledger keeps every transaction, and the stock stays what it was.
    assert_eq!(store.transactions(&Default::default()).await.unwrap(), ledger_before);
    let stats = store.stats(None, now).await.unwrap();
    assert_eq!((stats.live, stats.expired), (3, 0));
});

both_databases!(cleanup_deletes_in_batches_of_the_given_size, |db| {
    let store = db.store();
    insert_keys(store, "gone", 25, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    insert_keys(store, "kept", 4, t0(), t0() + TimeDelta::days(1)).await;
    let options = CleanupOptions { batch_size: 10, ..cleanup_at(t0()) };

    let report = store.cleanup(&options, &operator("cron")).await.unwrap();

    assert_eq!((report.removed, report.batches), (25, 3), "10 + 10 + 5");
    assert!(!report.stopped_early);

    // Batch size one: one transaction per key.
    insert_keys(store, "single", 3, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    let options = CleanupOptions { batch_size: 1, ..cleanup_at(t0()) };
    let report = store.cleanup(&options, &operator("cron")).await.unwrap();
    assert_eq!((report.removed, report.batches), (3, 3));
    assert_eq!(key_names(store).await.len(), 4);

    let err = store
        .cleanup(&CleanupOptions { batch_size: 0, ..cleanup_at(t0()) }, &operator("cron"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { field: "batch size", .. }), "{err:?}");
});

// With time no limit, batches grow from 500 keys by doubling up to the batch size; on SQLite
// never past 800 keys, so that a batch leaves less than SQLite's 1,000-page checkpoint mark in
// the write-ahead log for the posting that commits next.
both_databases!(batches_double_up_to_their_ceiling, |db| {
    let store = db.store();
    insert_keys(store, "gone", 2_500, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    let options = CleanupOptions {
        batch_size: 10_000,
        batch_time: Duration::from_secs(3600),
        ..cleanup_at(t0())
    };

    let report = store.cleanup(&options, &operator("cron")).await.unwrap();

    let expected = match store {
        Store::Sqlite(_) => 4,   // 500 + 800 + 800 + 400
        Store::Postgres(_) => 3, // 500 + 1,000 + 1,000
    };
    assert_eq!((report.removed, report.batches), (2_500, expected));
});

both_databases!(max_runtime_stops_early_and_the_next_run_finishes, |db| {
    let store = db.store();
    insert_keys(store, "gone", 25, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    insert_keys(store, "kept", 2, t0(), t0() + TimeDelta::days(1)).await;
    let hurried =
        CleanupOptions { batch_size: 10, max_runtime: Some(Duration::ZERO), ..cleanup_at(t0()) };

    // A spent time limit still lets one batch run, so that every run makes progress.
    let first = store.cleanup(&hurried, &operator("cron")).await.unwrap();
    assert_eq!((first.removed, first.batches, first.stopped_early), (10, 1, true));
    assert_eq!(store.stats(None, t0()).await.unwrap().expired, 15);

    let patient = CleanupOptions { batch_size: 10, ..cleanup_at(t0()) };
    let second = store.cleanup(&patient, &operator("cron")).await.unwrap();
    assert_eq!((second.removed, second.batches, second.stopped_early), (15, 2, false));
    let stats = store.stats(None, t0()).await.unwrap();
    assert_eq!((stats.live, stats.expired), (2, 0));

    let entries = cleanup_entries(store).await;
    assert_eq!(entries.len(), 2);
    assert!(entries[1].detail.contains("stopped at the maximum runtime"), "{:?}", entries[1]);
    assert!(!entries[0].detail.contains("stopped"), "{:?}", entries[0]);
});

both_databases!(dry_run_counts_and_deletes_nothing, |db| {
    let store = db.store();
    insert_keys(store, "gone", 7, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    insert_keys(store, "kept", 2, t0(), t0() + TimeDelta::days(1)).await;
    let dry = CleanupOptions {
        dry_run: true,
        batch_size: 2,
        max_runtime: Some(Duration::ZERO),
        ..cleanup_at(t0())
    };

    // Neither the batch size nor the time limit cuts the count short, and a running cleanup
    // does not stand in its way.
    let lock = HeldLock::take(db).await;
    let report = store.cleanup(&dry, &operator("cron")).await.unwrap();
    lock.release().await;

    assert_eq!(
        report,
        CleanupReport {
            removed: 7,
            batches: 0,
            longest_batch: Duration::ZERO,
            elapsed: report.elapsed,
            stopped_early: false,
            dry_run: true,
        }
    );
    assert_eq!(key_names(store).await.len(), 9);
    assert!(cleanup_entries(store).await.is_empty(), "a dry run leaves no audit entry");
});

both_databases!(each_run_writes_one_audit_entry, |db| {
    let store = db.store();
    insert_keys(store, "gone", 3, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    let first_at = t0();
    let second_at = t0() + TimeDelta::minutes(5);

    store.cleanup(&cleanup_at(first_at), &operator("cron")).await.unwrap();
    store
        .cleanup(&CleanupOptions { dry_run: true, ..cleanup_at(second_at) }, &operator("ops"))
        .await
        .unwrap();
    let second = store.cleanup(&cleanup_at(second_at), &operator("ops")).await.unwrap();

    assert_eq!(second.removed, 0);
    let entries = cleanup_entries(store).await;
    assert_eq!(entries.len(), 2, "{entries:#?}");
    let (newest, oldest) = (&entries[0], &entries[1]);
    assert_eq!((oldest.actor.as_str(), oldest.at), ("cron", first_at));
    assert_eq!((newest.actor.as_str(), newest.at), ("ops", second_at));
    assert!(oldest.detail.starts_with("removed 3 expired key(s) in 1 batch(es), "), "{oldest:?}");
    assert!(newest.detail.starts_with("removed 0 expired key(s) in 0 batch(es), "), "{newest:?}");
    for entry in &entries {
        assert_eq!(entry.action, "cleanup");
        assert_eq!((entry.key.as_deref(), entry.transaction_id), (None, None));
    }
});

both_databases!(cleanup_refuses_to_run_beside_another, |db| {
    let store = db.store();
    insert_keys(store, "gone", 5, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    let lock = HeldLock::take(db).await;

    let err = store.cleanup(&cleanup_at(t0()), &operator("cron")).await.unwrap_err();

    assert!(matches!(err, Error::LockHeld { what: "key cleanup" }), "{err:?}");
    assert_eq!((err.code(), err.is_temporary()), ("lock_held", true));
    assert_eq!(err.to_string(), "key cleanup is already running in another process");
    assert_eq!(store.stats(None, t0()).await.unwrap().expired, 5, "nothing removed");
    assert!(cleanup_entries(store).await.is_empty());

    // Waiting instead: the run starts once the lock is released.
    let waiting = {
        let store = store.clone();
        let options = CleanupOptions { wait_for_lock: true, ..cleanup_at(t0()) };
        tokio::spawn(async move { store.cleanup(&options, &operator("cron")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the run waits for the lock");
    lock.release().await;
    let report = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting run starts once the lock is free")
        .unwrap()
        .unwrap();
    assert_eq!(report.removed, 5);

    // The lock was released at the end of that run.
    let again = store.cleanup(&cleanup_at(t0()), &operator("cron")).await.unwrap();
    assert_eq!(again.removed, 0);
    HeldLock::take(db).await.release().await;
});

both_databases!(two_cleanups_at_once_one_runs, |db| {
    let store = db.store();
    insert_keys(store, "gone", 200, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    // One key a batch keeps the winner busy long enough for the loser to find the lock taken.
    let options = CleanupOptions { batch_size: 1, ..cleanup_at(t0()) };
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let runs: Vec<_> = ["cron-a", "cron-b"]
        .into_iter()
        .map(|name| {
            let (store, options, barrier) = (store.clone(), options.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.cleanup(&options, &operator(name)).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for run in runs {
        results.push(run.await.unwrap());
    }

    let (done, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!((done.len(), refused.len()), (1, 1), "{done:?} {refused:?}");
    assert!(matches!(refused[0], Err(Error::LockHeld { .. })), "{refused:?}");
    assert_eq!(done[0].as_ref().unwrap().removed, 200);
    assert_eq!(cleanup_entries(store).await.len(), 1);
});

/// Set in the environment of the child process that `killed_cleanup_loses_nothing` starts.
const CHILD_URL_VAR: &str = "WMS_TEST_CLEANUP_CHILD_URL";

/// Not a test of its own: the body of the child process that `killed_cleanup_loses_nothing`
/// kills half-way. Run without the variable, it does nothing.
#[tokio::test]
#[ignore = "run as a child process by killed_cleanup_loses_nothing"]
async fn cleanup_child_process() {
    let Ok(url) = std::env::var(CHILD_URL_VAR) else {
        return;
    };
    let store = Store::connect(&url, &Default::default()).await.unwrap();
    let options = CleanupOptions { batch_size: 1, ..cleanup_at(t0()) };
    store.cleanup(&options, &operator("doomed")).await.unwrap();
}

fn start_child(url: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["cleanup_child_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_URL_VAR, url)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the child test process")
}

both_databases!(killed_cleanup_loses_nothing, |db| {
    const EXPIRED: i64 = 20_000;
    let store = db.store();
    insert_keys(store, "gone", EXPIRED, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    post_receipts(store, "alice", "live", 3, t0(), TimeDelta::days(1)).await;
    let mut child = start_child(db.url());

    // Kill it once it has committed a few batches, far from done (one key a batch).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let expired = store.stats(None, t0()).await.unwrap().expired;
        if expired < EXPIRED as u64 - 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the child cleanup made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the child exited early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // The dead process's lock goes with it. Once it is free, the server has also finished the
    // dead session, so a batch whose commit was already on its way is decided one way or the
    // other, and what is left is what the next run must find.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lock = loop {
        if let Some(lock) = HeldLock::try_take(db).await {
            break lock;
        }
        assert!(Instant::now() < deadline, "the killed run's lock was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    lock.release().await;
    let left = store.stats(None, t0()).await.unwrap();
    assert!(left.expired > 0 && left.expired < EXPIRED as u64, "{left:?}");
    assert_eq!(left.live, 3, "live keys are never touched");
    assert!(cleanup_entries(store).await.is_empty(), "a killed run records nothing");
    if let Store::Sqlite(s) = store {
        let check: String =
            sqlx::query_scalar("PRAGMA integrity_check").fetch_one(s.pool()).await.unwrap();
        assert_eq!(check, "ok");
    }

    let report = store.cleanup(&cleanup_at(t0()), &operator("cron")).await.unwrap();
    assert_eq!(report.removed, left.expired);
    let after = store.stats(None, t0()).await.unwrap();
    assert_eq!((after.live, after.expired), (3, 0));
    assert_eq!(cleanup_entries(store).await.len(), 1);
});

/// A known sequence: applied, replayed and conflicting postings by three operators, one key
/// expired and one live key renewed, then statistics at `t0 + 1 min`.
async fn post_known_sequence(store: &Store) {
    let day = TimeDelta::days(1);
    let alice_receipt = posting("alice", "gr-1", receive(10), day);
    let at = |minutes: i64| t0() - TimeDelta::minutes(minutes);
    store.post_at(&alice_receipt, at(30)).await.unwrap();
    assert_eq!(store.post_at(&alice_receipt, at(20)).await.unwrap().outcome, Outcome::Replayed);
    assert_eq!(store.post_at(&alice_receipt, at(10)).await.unwrap().outcome, Outcome::Replayed);
    // Conflicts: a different quantity, and a different kind, under the receipt's key.
    let other = posting("alice", "gr-1", receive(11), day);
    assert!(matches!(store.post_at(&other, at(9)).await, Err(Error::KeyConflict { .. })));
    let ship = Request::ship("SKU-1", 1, "A1").unwrap();
    let other_kind = posting("alice", "gr-1", ship.clone(), day);
    assert!(matches!(store.post_at(&other_kind, at(8)).await, Err(Error::KeyConflict { .. })));

    let bob_receipt = posting("bob", "gr-2", receive(5), day);
    store.post_at(&bob_receipt, at(25)).await.unwrap();
    let bob_shipment = posting("bob", "so-1", ship, day);
    store.post_at(&bob_shipment, at(5)).await.unwrap();
    assert_eq!(store.post_at(&bob_shipment, at(4)).await.unwrap().outcome, Outcome::Replayed);

    // Carol's key expired before t0: it counts as expired, her replay still counts.
    let carol_receipt = posting("carol", "gr-3", receive(1), TimeDelta::hours(1));
    store.post_at(&carol_receipt, at(120)).await.unwrap();
    assert_eq!(store.post_at(&carol_receipt, at(100)).await.unwrap().outcome, Outcome::Replayed);
}

fn group(kind: &str, user: &str, live: u64, replays: u64, conflicts: u64) -> KindUserCounts {
    KindUserCounts {
        kind: kind.to_owned(),
        user: user.to_owned(),
        counts: Counts { live, replays, conflicts },
    }
}

both_databases!(stats_count_a_known_sequence, |db| {
    let store = db.store();
    post_known_sequence(store).await;
    let now = t0() + TimeDelta::minutes(1);

    let stats = store.stats(None, now).await.unwrap();

    assert_eq!((stats.at, stats.since), (now, None));
    assert_eq!((stats.live, stats.expired), (3, 1));
    assert_eq!((stats.replays, stats.conflicts), (4, 2));
    assert_eq!(stats.oldest_live_created_at, Some(t0() - TimeDelta::minutes(30)));
    assert_eq!(stats.oldest_live_age(), Some(TimeDelta::minutes(31)));
    assert_eq!(
        stats.by_kind_and_user,
        [
            group("receive", "alice", 1, 2, 2),
            group("receive", "bob", 1, 0, 0),
            group("receive", "carol", 0, 1, 0),
            group("ship", "bob", 1, 1, 0),
        ]
    );
    let kinds: Vec<_> = stats.by_kind.iter().map(|k| (k.kind.as_str(), k.counts)).collect();
    assert_eq!(
        kinds,
        [
            ("receive", Counts { live: 2, replays: 3, conflicts: 2 }),
            ("ship", Counts { live: 1, replays: 1, conflicts: 0 }),
        ]
    );
    let users: Vec<_> = stats.by_user.iter().map(|u| (u.user.as_str(), u.counts)).collect();
    assert_eq!(
        users,
        [
            ("alice", Counts { live: 1, replays: 2, conflicts: 2 }),
            ("bob", Counts { live: 2, replays: 1, conflicts: 0 }),
            ("carol", Counts { live: 0, replays: 1, conflicts: 0 }),
        ]
    );

    // A window counts only what happened in it: alice's second replay and both conflicts,
    // and bob's replay; live and expired keys do not depend on it.
    let since = t0() - TimeDelta::minutes(15);
    let recent = store.stats(Some(since), now).await.unwrap();
    assert_eq!((recent.live, recent.expired, recent.replays, recent.conflicts), (3, 1, 2, 2));
    assert_eq!(
        recent.by_kind_and_user,
        [
            group("receive", "alice", 1, 1, 2),
            group("receive", "bob", 1, 0, 0),
            group("ship", "bob", 1, 1, 0),
        ]
    );

    // Cleanup removes carol's key; her replay is still counted under the right kind.
    store.cleanup(&cleanup_at(now), &operator("cron")).await.unwrap();
    let after = store.stats(None, now).await.unwrap();
    assert_eq!((after.expired, after.replays, after.conflicts), (0, 4, 2));
    assert_eq!(after.by_kind_and_user, stats.by_kind_and_user);

    // A day later everything has expired.
    let later = store.stats(None, now + TimeDelta::days(1)).await.unwrap();
    assert_eq!((later.live, later.expired, later.oldest_live_created_at), (0, 3, None));
});

both_databases!(stats_of_an_empty_database, |db| {
    let stats = db.store().stats(None, t0()).await.unwrap();
    assert_eq!((stats.live, stats.expired, stats.replays, stats.conflicts), (0, 0, 0, 0));
    assert_eq!(stats.oldest_live_created_at, None);
    assert!(stats.by_kind.is_empty() && stats.by_user.is_empty());
    assert!(stats.by_kind_and_user.is_empty());
    let text = to_prometheus(&stats);
    assert_well_formed(&text);
    assert!(text.contains("\nwms_oldest_live_key_age_seconds 0.000\n"), "{text}");
});

both_databases!(prometheus_output_is_well_formed, |db| {
    let store = db.store();
    post_known_sequence(store).await;
    let stats = store.stats(None, t0() + TimeDelta::minutes(1)).await.unwrap();

    let text = to_prometheus(&stats);

    let samples = assert_well_formed(&text);
    let value = |name: &str, labels: &[(&str, &str)]| {
        let labels: Vec<(String, String)> =
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        samples
            .iter()
            .find(|s| s.name == name && s.labels == labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{text}"))
            .value
    };
    assert_eq!(value("wms_keys_live", &[]), 3.0);
    assert_eq!(value("wms_keys_expired", &[]), 1.0);
    assert_eq!(value("wms_oldest_live_key_age_seconds", &[]), 31.0 * 60.0);
    assert_eq!(value("wms_key_replays_total", &[("kind", "receive"), ("user", "alice")]), 2.0);
    assert_eq!(value("wms_key_conflicts_total", &[("kind", "receive"), ("user", "alice")]), 2.0);
    assert_eq!(value("wms_key_replays_total", &[("kind", "ship"), ("user", "bob")]), 1.0);
    assert_eq!(value("wms_key_conflicts_total", &[("kind", "receive"), ("user", "carol")]), 0.0);
    assert_eq!(samples.len(), 3 + 2 * stats.by_kind_and_user.len());
    assert!(text.contains("# TYPE wms_key_replays_total counter\n"), "{text}");
    assert!(text.contains("# TYPE wms_keys_live gauge\n"), "{text}");

    // Kinds written by callers of the claim step can hold anything; the labels round-trip.
    let mut odd = stats.clone();
    odd.by_kind_and_user[0].kind = "we\"ird\\kind\nline".to_owned();
    let samples = assert_well_formed(&to_prometheus(&odd));
    assert!(
        samples.iter().any(|s| s.labels.first().is_some_and(|(_, v)| v == "we\"ird\\kind\nline"))
    );
});

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Checks the Prometheus text exposition format line by line and returns the samples: every
/// family has one HELP and one TYPE line before its samples, samples of a family are not split
/// up, names and label names are valid, label values are properly escaped, values are numbers.
fn assert_well_formed(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "the last line ends with a line feed");
    let valid_name = |name: &str, colon: bool| {
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    };
    let mut samples = Vec::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<(String, bool)> = None; // (family, seen TYPE)
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a name and a text");
            assert!(valid_name(name, true), "bad metric name in {line:?}");
            assert!(!help.is_empty() && !help.contains('\n'));
            assert!(!finished.contains(&name.to_owned()), "family {name} appears twice");
            if let Some((family, _)) = current.take() {
                finished.push(family);
            }
            current = Some((name.to_owned(), false));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a type");
            let Some((family, seen)) = current.as_mut() else {
                panic!("TYPE before HELP: {line:?}")
            };
            assert_eq!(name, family, "TYPE names its family");
            assert!(!*seen, "one TYPE per family");
            assert!(["counter", "gauge"].contains(&kind), "unexpected type in {line:?}");
            *seen = true;
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "stray line {line:?}");
            let sample = parse_sample(line);
            assert!(valid_name(&sample.name, true), "bad metric name in {line:?}");
            for (label, _) in &sample.labels {
                assert!(valid_name(label, false), "bad label name in {line:?}");
            }
            let Some((family, seen)) = &current else { panic!("sample before HELP: {line:?}") };
            assert!(*seen && &sample.name == family, "{line:?} outside its family");
            samples.push(sample);
        }
    }
    samples
}

/// One sample line: a name, an optional label set, one space and a value, without timestamp.
fn parse_sample(line: &str) -> Sample {
    let split = line.find(['{', ' ']).unwrap_or_else(|| panic!("sample without value: {line:?}"));
    let (name, mut rest) = line.split_at(split);
    let mut labels = Vec::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            let (label, after) =
                inner.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
            let (value, after) = read_label_value(after, line);
            labels.push((label.to_owned(), value));
            if let Some(more) = after.strip_prefix(',') {
                inner = more;
                continue;
            }
            rest = after.strip_prefix('}').unwrap_or_else(|| panic!("bad label set in {line:?}"));
            break;
        }
    }
    let value = rest.strip_prefix(' ').expect("one space before the value");
    assert!(!value.contains(' '), "no timestamp: the textfile collector refuses them: {line:?}");
    let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
    Sample { name: name.to_owned(), labels, value }
}

/// Reads an escaped label value up to its closing quote; returns it and the text after the quote.
fn read_label_value<'a>(text: &'a str, line: &str) -> (String, &'a str) {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &text[i + 1..]),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, c @ ('\\' | '"'))) => value.push(c),
                _ => panic!("bad escape in {line:?}"),
            },
            c => value.push(c),
        }
    }
    panic!("unclosed label value in {line:?}")
}

// Cleanup commits its SQLite batches without an fsync and checkpoints between them; the
// connections it used must go back to the pool committing with full syncing, or the postings
// that use them next would lose their durability, and checkpointing the log by themselves, or
// it would grow without bound.
#[tokio::test]
async fn sqlite_cleanup_hands_back_connections_that_sync_fully() {
    let db = TestDb::sqlite().await;
    let store = db.store();
    insert_keys(store, "gone", 25, t0() - TimeDelta::days(2), t0() - TimeDelta::days(1)).await;
    let options = CleanupOptions { batch_size: 10, ..cleanup_at(t0()) };

    let report = store.cleanup(&options, &operator("cron")).await.unwrap();
    assert_eq!(report.removed, 25);

    let Store::Sqlite(sqlite) = store else { unreachable!() };
    // Every connection the pool holds, at once, so that none is left unchecked.
    let mut held = Vec::new();
    for _ in 0..sqlite.pool().size() {
        let mut conn = sqlite.pool().acquire().await.unwrap();
        let level: i64 =
            sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(level, 2, "a pooled connection commits with synchronous = FULL");
        let pages: i64 =
            sqlx::query_scalar("PRAGMA wal_autocheckpoint").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(pages, 1000, "a pooled connection checkpoints the log by itself");
        held.push(conn);
    }
    assert!(!held.is_empty(), "the cleanup left its connection in the pool");
}

// A PostgreSQL cleanup batch deletes without locking its rows first; a key that a posting holds
// right now (reusing it after it expired) must neither stop the run nor be deleted under it.
// The holder keeps its lock until the cleanup has returned, so a cleanup that waited for it
// would never return.
#[tokio::test]
async fn postgres_cleanup_leaves_a_key_a_posting_holds_and_does_not_wait_for_it() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.store();
    post_receipts(store, "alice", "old", 30, t0(), TimeDelta::hours(1)).await;
    let mut holder = PgConnection::connect(db.url()).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM idem_keys WHERE idem_key = 'old-7' FOR UPDATE")
        .execute(&mut *held)
        .await
        .unwrap();

    let (options, cron) = (cleanup_at(t0() + TimeDelta::hours(2)), operator("cron"));
    let report = tokio::time::timeout(Duration::from_secs(60), store.cleanup(&options, &cron))
        .await
        .expect("the cleanup does not wait for the posting")
        .unwrap();
    assert_eq!(report.removed, 29);
    assert_eq!(key_names(store).await, ["old-7"]);

    held.rollback().await.unwrap();
    let report = store.cleanup(&options, &cron).await.unwrap();
    assert_eq!(report.removed, 1, "the next run takes the key once it is free");
    assert!(key_names(store).await.is_empty());
}
