//! `keys cleanup` and `keys stats` as cron and a metrics collector run them: the real binary, one
//! runner at a time, silent on success.

use std::hash::BuildHasher;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use idem_core::testing::TestDb;
use idem_core::{
    AuditAction, AuditFilter, IdemKey, KeyFilter, KeyRecord, Operator, Posting, Request,
    StockFilter, StockLevel, Store,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wmsctl");

/// `wmsctl` as cron runs it, as operator `cron`, not yet started.
fn command(db: &TestDb, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["--no-dotenv", "--database-url", db.url(), "--user", "cron"])
        .args(args)
        .env_remove("WMS_DATABASE_URL")
        .env_remove("WMS_USER")
        .stdin(Stdio::null());
    cmd
}

fn wmsctl(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    outcome(command(db, args).output().expect("running wmsctl"))
}

/// (exit code, stdout, stderr) of a process that exited rather than being killed.
fn outcome(out: Output) -> (i32, String, String) {
    (
        out.status.code().expect("an exit code"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `keys cleanup` started in the background, its output captured.
fn spawn_cleanup(db: &TestDb, args: &[&str]) -> Child {
    command(db, &[&["keys", "cleanup"], args].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wmsctl keys cleanup")
}

/// A seed that differs between runs, printed so that a failure can be read back.
fn random(n: u64) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(n)
}

/// Keys expired and not yet removed, as of now.
async fn expired_now(db: &TestDb) -> u64 {
    db.store().stats(None, Utc::now()).await.expect("reading key statistics").expired
}

/// Every key in the table, live or expired, in the store's order.
async fn all_keys(db: &TestDb) -> Vec<KeyRecord> {
    db.store().keys(&KeyFilter::default(), Utc::now()).await.expect("listing keys")
}

/// What a cleanup must never touch: the number of ledger rows and every stock level.
async fn inventory(store: &Store) -> (u64, Vec<StockLevel>) {
    let stock = store.stock(&StockFilter::default()).await.expect("reading stock");
    (idem_core::testing::ledger_rows(store).await, stock)
}

async fn cleanup_audit_entries(store: &Store) -> usize {
    let filter = AuditFilter { action: Some(AuditAction::Cleanup), ..AuditFilter::default() };
    store.audit(&filter).await.expect("reading the audit log").len()
}

/// Receipts of one unit posted at `at` with a key lifetime of `ttl`, under keys
/// `{prefix}-0` to `{prefix}-{n - 1}`, in batches as an import posts them.
async fn post_receipts(
    db: &TestDb,
    user: &str,
    prefix: &str,
    n: usize,
    at: chrono::DateTime<Utc>,
    ttl: TimeDelta,
) {
    let user = Operator::parse(user).unwrap();
    let postings: Vec<Posting> = (0..n)
        .map(|i| {
            Posting::new(
                user.clone(),
                IdemKey::parse(&format!("{prefix}-{i}")).unwrap(),
                Request::receive("S", 1, "A").unwrap(),
            )
            .ttl(ttl)
            .unwrap()
        })
        .collect();
    for chunk in postings.chunks(5_000) {
        for posted in db.store().post_batch(chunk, at).await.unwrap() {
            posted.expect("a receipt is applied");
        }
    }
}

/// `n` keys that expired an hour ago, named `{prefix}-N`.
async fn seed_expired(db: &TestDb, prefix: &str, n: usize) {
    let past = Utc::now() - TimeDelta::hours(2);
    post_receipts(db, "cron", prefix, n, past, TimeDelta::hours(1)).await;
}

/// Live keys a careless cleanup could take for expired ones: keys created before the expired
/// ones but with a longer lifetime, keys of another operator created at the same moment as the
/// expired ones, and keys created just now. Returns them as the table holds them.
async fn seed_live(db: &TestDb) -> Vec<KeyRecord> {
    let now = Utc::now();
    post_receipts(db, "cron", "live-early", 50, now - TimeDelta::hours(3), TimeDelta::hours(48))
        .await;
    post_receipts(db, "other", "live-other", 50, now - TimeDelta::hours(2), TimeDelta::hours(24))
        .await;
    post_receipts(db, "cron", "live-now", 50, now, TimeDelta::hours(24)).await;
    let live: Vec<KeyRecord> =
        all_keys(db).await.into_iter().filter(|k| k.expires_at > Utc::now()).collect();
    assert_eq!(live.len(), 150);
    live
}

/// Posts `n` receipts whose keys expired an hour ago, and one that is still live.
async fn expired_keys(db: &TestDb, n: usize) {
    let past = chrono::Utc::now() - chrono::TimeDelta::hours(2);
    let user = Operator::parse("cron").unwrap();
    for i in 0..n {
        let posting = Posting::new(
            user.clone(),
            IdemKey::parse(&format!("old-{i}")).unwrap(),
            Request::receive("S", 1, "A").unwrap(),
        )
        .ttl(chrono::TimeDelta::hours(1))
        .unwrap();
        db.store().post_at(&posting, past).await.unwrap();
    }
    let live =
        Posting::new(user, IdemKey::parse("live").unwrap(), Request::receive("S", 1, "A").unwrap());
    db.store().post(&live).await.unwrap();
}

idem_core::both_databases!(cleanup_is_silent_and_removes_only_expired_keys, |db| {
    expired_keys(db, 25).await;
    let dry = wmsctl(db, &["keys", "cleanup", "--dry-run"]);
    assert_eq!((dry.0, dry.1.as_str()), (0, ""));
    assert_eq!(dry.2, "wmsctl: would remove 25 expired key(s)\n");

    let quiet = wmsctl(db, &["keys", "cleanup", "--batch-size", "10"]);
    assert_eq!(quiet, (0, String::new(), String::new()), "silent on success");
    let again = wmsctl(db, &["keys", "cleanup", "-o", "json"]);
    assert_eq!(again.0, 0);
    let report: Value = serde_json::from_str(&again.1).unwrap();
    assert_eq!(report["removed"], 0);

    let (code, listed, _) = wmsctl(db, &["keys", "list", "-o", "json"]);
    assert_eq!(code, 0);
    let keys: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["key"], "live");

    let (_, audit, _) = wmsctl(db, &["audit", "list", "--action", "cleanup", "-o", "json"]);
    let audit: Vec<Value> = serde_json::from_str(&audit).unwrap();
    assert_eq!(audit.len(), 2, "one entry per run, none for the dry run");
    assert!(
        audit[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("removed 25 expired key(s) in 3 batch(es)"),
        "{audit:?}"
    );
    assert_eq!(audit[1]["actor"], "cron");
});

idem_core::both_databases!(a_second_cleanup_exits_75_or_skips, |db| {
    expired_keys(db, 3).await;
    let _held = hold_cleanup_lock(db).await;
    let (code, stdout, stderr) = wmsctl(db, &["keys", "cleanup"]);
    assert_eq!((code, stdout.as_str()), (75, ""));
    assert_eq!(stderr, "wmsctl: key cleanup is already running in another process\n");
    assert_eq!(
        wmsctl(db, &["keys", "cleanup", "--skip-if-running"]),
        (0, String::new(), String::new())
    );
    let (_, listed, _) = wmsctl(db, &["keys", "list", "--expired", "-o", "json"]);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&listed).unwrap().len(),
        3,
        "nothing was removed"
    );
});

/// Holds the lock a running cleanup holds, the way another process would.
async fn hold_cleanup_lock(db: &TestDb) -> Box<dyn std::any::Any> {
    if let Some(path) = db.url().strip_prefix("sqlite://") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{path}-cleanup.lock"))
            .unwrap();
        file.lock().unwrap();
        return Box::new(file);
    }
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(idem_core::cleanup::PG_CLEANUP_LOCK_KEY)
        .execute(&mut conn)
        .await
        .unwrap();
    Box::new(conn)
}

idem_core::both_databases!(stats_report_keys_replays_and_conflicts, |db| {
    expired_keys(db, 2).await;
    let receive = ["receive", "--key", "r", "--sku", "S", "--qty", "1", "--location", "A"];
    assert_eq!(wmsctl(db, &receive).0, 0);
    assert_eq!(wmsctl(db, &receive).0, 0, "replayed");
    assert_eq!(
        wmsctl(db, &["receive", "--key", "r", "--sku", "S", "--qty", "2", "--location", "A"]).0,
        3
    );

    let (code, json, _) = wmsctl(db, &["keys", "stats", "-o", "json"]);
    assert_eq!(code, 0);
    let stats: Value = serde_json::from_str(&json).unwrap();
    assert_eq!((stats["live"].as_u64(), stats["expired"].as_u64()), (Some(2), Some(2)));
    assert_eq!((stats["replays"].as_u64(), stats["conflicts"].as_u64()), (Some(1), Some(1)));

    let (code, text, stderr) = wmsctl(db, &["keys", "stats", "-o", "prometheus"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("# TYPE wms_keys_live gauge\nwms_keys_live 2\n"), "{text}");
    assert!(text.contains("wms_keys_expired 2\n"), "{text}");
    assert!(text.contains("wms_key_replays_total{kind=\"receive\",user=\"cron\"} 1\n"), "{text}");
    assert!(text.contains("wms_key_conflicts_total{kind=\"receive\",user=\"cron\"} 1\n"), "{text}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
    }
});

// A cleanup of 100,000 expired keys runs in short batches: postings started beside it all
// succeed, and it removes every expired key and nothing else. The postings start only once the
// cleanup is deleting, and it must still be deleting when the last of them has finished, or the
// test would not show that they ran beside it.
idem_core::both_databases!(postings_beside_a_large_cleanup_all_succeed, |db| {
    let past = chrono::Utc::now() - chrono::TimeDelta::hours(2);
    let user = Operator::parse("cron").unwrap();
    let expired: Vec<Posting> = (0..100_000)
        .map(|i| {
            Posting::new(
                user.clone(),
                IdemKey::parse(&format!("old-{i}")).unwrap(),
                Request::receive("S", 1, "A").unwrap(),
            )
            .ttl(chrono::TimeDelta::hours(1))
            .unwrap()
        })
        .collect();
    for chunk in expired.chunks(5_000) {
        db.store().post_batch(chunk, past).await.unwrap();
    }

    let mut cleanup = spawn_cleanup(db, &["--batch-size", "20", "-o", "json"]);
    let started = Instant::now();
    while expired_now(db).await == 100_000 {
        assert!(cleanup.try_wait().unwrap().is_none(), "the cleanup ended before deleting");
        assert!(started.elapsed() < Duration::from_secs(20), "the cleanup deleted nothing");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let postings: Vec<_> = (0..12)
        .map(|i| {
            let key = format!("beside-{i}");
            let receive = ["receive", "--key", &key, "--sku", "S", "--qty", "1", "--location", "B"];
            command(db, &receive).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for posting in postings {
        let out = posting.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let remaining = expired_now(db).await;
    let running = cleanup.try_wait().unwrap().is_none();
    eprintln!("{}: {remaining} expired keys left after the postings", db.store().backend_name());
    assert!(remaining > 0 && running, "the cleanup was done before the postings finished");

    let out = cleanup.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["removed"], 100_000);
    eprintln!("{}: cleanup {report}", db.store().backend_name());

    let (_, listed, _) = wmsctl(db, &["keys", "list", "--limit", "1000", "-o", "json"]);
    let keys: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(keys.len(), 12, "only the live keys remain");
    assert!(keys.iter().all(|k| k["key"].as_str().unwrap().starts_with("beside-")));
});

// A cleanup killed with SIGKILL at any moment loses nothing and leaves no lock behind: every batch
// it committed stays deleted, the next run carries on where it stopped, and no live key, ledger
// row or stock level is touched.
idem_core::both_databases!(
    cleanup_killed_at_random_moments_then_rerun_removes_every_expired_key,
    |db| {
        use std::os::unix::process::ExitStatusExt;

        const EXPIRED: u64 = 20_000;
        let args = ["--batch-size", "20"];
        seed_expired(db, "old", EXPIRED as usize).await;
        let live = seed_live(db).await;
        let inventory_before = inventory(db.store()).await;
        assert_eq!(expired_now(db).await, EXPIRED);

        // Each round waits until the run has deleted past a random point in what is left, at most
        // half-way, then kills it after a random pause of a few batches.
        let mut killed_mid_run = 0;
        for round in 0..4 {
            let before = expired_now(db).await;
            if before == 0 {
                break;
            }
            let target = before - 1 - random(round) % (before / 2).max(1);
            let pause = Duration::from_millis(random(round + 100) % 20);
            let mut child = spawn_cleanup(db, &args);
            let started = Instant::now();
            while child.try_wait().unwrap().is_none() && expired_now(db).await > target {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the cleanup made no progress"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(pause).await;
            if child.try_wait().unwrap().is_none() {
                child.kill().expect("SIGKILL");
            }
            let out = child.wait_with_output().unwrap();
            let after = expired_now(db).await;
            let backend = db.store().backend_name();
            // A run can finish between the look and the kill; it then exited on its own.
            let killed = out.status.signal() == Some(9);
            eprintln!(
                "{backend} {round}: {before}..{after} expired, killed {killed} ({target}+{pause:?})"
            );
            if killed {
                if 0 < after && after < EXPIRED {
                    killed_mid_run += 1;
                }
            } else {
                // A PostgreSQL server may take a moment to end the session of the run killed
                // before, and so to release its lock; the runs after the loop prove that it does.
                let (code, stdout, stderr) = outcome(out);
                eprintln!("{backend} {round}: exited {code} by itself: {stderr}");
                assert!(code == 0 || code == 75, "exit {code}\nstdout: {stdout}\nstderr: {stderr}");
            }
            assert_eq!(db.store().stats(None, Utc::now()).await.unwrap().live, 150, "live keys");
        }
        assert!(killed_mid_run > 0, "no run was killed with part of the expired keys deleted");

        let mut runs = Vec::new();
        let last = loop {
            let run = wmsctl(db, &[&["keys", "cleanup"], &args[..]].concat());
            runs.push(run.0);
            if run.0 == 0 || runs.len() == 5 {
                break run;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(last, (0, String::new(), String::new()), "re-runs exited {runs:?}");
        assert_eq!(expired_now(db).await, 0, "every expired key is gone");
        assert_eq!(all_keys(db).await, live, "the live keys are all there, untouched");
        assert_eq!(inventory(db.store()).await, inventory_before, "ledger and stock untouched");
    }
);

/// Starts two `keys cleanup ARGS` at the same moment over freshly expired keys and returns the
/// (code, stdout, stderr) of the one that exits first and of the other. A pair counts only if the
/// first exits while the other is still running with expired keys left, which proves that they
/// overlapped; otherwise the race is run again, a bounded number of times. Of a pair that
/// overlapped, exactly one run may have deleted keys and written an audit entry.
async fn race(db: &TestDb, args: &[&str]) -> [(i32, String, String); 2] {
    for attempt in 0..3 {
        seed_expired(db, &format!("race-{attempt}"), 20_000).await;
        let audited_before = cleanup_audit_entries(db.store()).await;
        let args = [&["--batch-size", "10"], args].concat();
        let mut pair = [spawn_cleanup(db, &args), spawn_cleanup(db, &args)];
        let started = Instant::now();
        let first = loop {
            if let Some(first) = (0..2).find(|&i| pair[i].try_wait().unwrap().is_some()) {
                break first;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "neither cleanup ended");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let remaining = expired_now(db).await;
        let overlapped = remaining > 0 && pair[1 - first].try_wait().unwrap().is_none();

        let [a, b] = pair;
        let mut outs = [a, b].map(|child| outcome(child.wait_with_output().unwrap()));
        if first == 1 {
            outs.swap(0, 1);
        }
        let audited = cleanup_audit_entries(db.store()).await - audited_before;
        eprintln!(
            "{} attempt {attempt}: first exited with {remaining} expired left, overlapped: \
             {overlapped}, exits {:?}",
            db.store().backend_name(),
            outs.each_ref().map(|o| o.0),
        );
        if overlapped {
            assert_eq!(audited, 1, "only the run that held the lock writes an audit entry");
            assert_eq!(expired_now(db).await, 0, "the run that held the lock removed every key");
            return outs;
        }
    }
    panic!("two cleanups started together never overlapped in 3 attempts");
}

// Two cleanups started at the same moment by two cron jobs: one deletes and the other, finding
// the lock held, exits 75 at once, or 0 with --skip-if-running, without waiting or deleting.
idem_core::both_databases!(
    two_cleanups_started_together_one_runs_the_other_exits_75_or_skips,
    |db| {
        let live = seed_live(db).await;

        let [refused, ran] = race(db, &[]).await;
        assert_eq!(
            refused,
            (
                75,
                String::new(),
                "wmsctl: key cleanup is already running in another process\n".into()
            )
        );
        assert_eq!(ran, (0, String::new(), String::new()), "the run that held the lock is silent");

        let [skipped, ran] = race(db, &["--skip-if-running"]).await;
        assert_eq!(skipped, (0, String::new(), String::new()), "a skipped run is silent");
        assert_eq!(ran, (0, String::new(), String::new()));

        assert_eq!(all_keys(db).await, live, "the live keys are all there, untouched");
    }
);
