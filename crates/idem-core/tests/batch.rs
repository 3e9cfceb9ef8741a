//! Batch postings (`Store::post_batch`, behind `wmsctl import`) on a fresh database of each kind:
//! each posting of a batch keeps its own outcome, a refused one never takes its neighbours down,
//! the same key twice behaves as two postings one after another, and a failure of the batch
//! itself commits none of it.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use idem_core::testing::TestDb;
use idem_core::{
    AuditAction, AuditFilter, Error, IdemKey, KeyFilter, Operator, Outcome, Posted, Posting,
    Request, StockFilter, Store, StoreOptions, TransactionFilter, both_databases,
};
use sqlx::Connection;

fn posting(key: &str, request: Request) -> Posting {
    let user = Operator::parse("importer").expect("valid operator");
    Posting::new(user, IdemKey::parse(key).expect("valid key"), request)
}

fn receive(sku: &str, qty: i64) -> Request {
    Request::receive(sku, qty, "A1").expect("valid receipt")
}

fn ship(sku: &str, qty: i64) -> Request {
    Request::ship(sku, qty, "A1").expect("valid shipment")
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2031, 3, 14, 6, 0, 0).single().expect("valid time")
}

fn applied(outcome: &idem_core::Result<Posted>) -> &Posted {
    match outcome {
        Ok(posted) if posted.outcome == Outcome::Applied => posted,
        other => panic!("expected applied, got {other:?}"),
    }
}

async fn on_hand(store: &Store, sku: &str) -> i64 {
    let filter = StockFilter { sku: Some(sku.to_owned()), location: Some("A1".to_owned()) };
    store.stock(&filter).await.expect("reading stock").first().map_or(0, |l| l.on_hand)
}

/// (ledger rows, key rows, stock rows): everything a posting can write.
async fn footprint(store: &Store) -> (usize, usize, usize) {
    let ledger = store.transactions(&TransactionFilter::default()).await.expect("ledger").len();
    let filter = KeyFilter::default();
    let keys = store.keys(&filter, t0()).await.expect("keys").len();
    let stock = store.stock(&StockFilter::default()).await.expect("stock").len();
    (ledger, keys, stock)
}

both_databases!(rejected_posting_does_not_take_its_neighbours_down, |db| {
    let store = db.store();
    let batch = [
        posting("in-1", receive("SKU-1", 5)),
        posting("out-1", ship("SKU-1", 10)),
        posting("in-2", receive("SKU-1", 3)),
        posting("out-2", ship("SKU-1", 8)),
    ];

    let outcomes = store.post_batch(&batch, t0()).await.expect("the batch commits");

    assert_eq!(outcomes.len(), 4);
    applied(&outcomes[0]);
    assert!(
        matches!(&outcomes[1], Err(Error::InsufficientStock { on_hand: 5, requested: 10, .. })),
        "{:?}",
        outcomes[1]
    );
    applied(&outcomes[2]);
    applied(&outcomes[3]);
    assert_eq!(on_hand(store, "SKU-1").await, 0);
    let user = Operator::parse("importer").unwrap();
    let refused_key = IdemKey::parse("out-1").unwrap();
    assert_eq!(store.key(&user, &refused_key).await.unwrap(), None, "a rejection keeps no key");

    // The key was not consumed: once stock arrives, the same posting goes through.
    store.post_at(&posting("in-3", receive("SKU-1", 10)), t0()).await.unwrap();
    let retried = store.post_batch(&batch[1..2], t0()).await.unwrap();
    applied(&retried[0]);
    assert_eq!(on_hand(store, "SKU-1").await, 0);
});

both_databases!(same_key_twice_in_one_batch_replays_then_conflicts, |db| {
    let store = db.store();
    let batch = [
        posting("po-7", receive("SKU-1", 5)),
        posting("po-7", receive("SKU-1", 5)),
        posting("po-7", receive("SKU-1", 6)),
    ];

    let outcomes = store.post_batch(&batch, t0()).await.expect("the batch commits");

    let first = applied(&outcomes[0]);
    let replay = outcomes[1].as_ref().expect("the identical retry is replayed");
    assert_eq!(replay.outcome, Outcome::Replayed);
    assert_eq!(replay.transaction, first.transaction);
    match &outcomes[2] {
        Err(Error::KeyConflict { original, differing_fields, .. }) => {
            assert_eq!(*original, first.transaction.id);
            assert_eq!(differing_fields, &["qty"]);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(on_hand(store, "SKU-1").await, 5, "stock moved once");
    let audit = store.audit(&AuditFilter::default()).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert!(actions.contains(&AuditAction::Replayed.as_str()), "{actions:?}");
    assert!(actions.contains(&AuditAction::Conflict.as_str()), "the conflict's audit entry stays");
    let user = Operator::parse("importer").unwrap();
    let key = store.key(&user, &IdemKey::parse("po-7").unwrap()).await.unwrap().unwrap();
    assert_eq!(key.replay_count, 1);
});

both_databases!(key_refused_earlier_in_a_batch_is_free_later_in_it, |db| {
    let store = db.store();
    let batch = [
        posting("ship-1", ship("SKU-2", 4)),
        posting("in-1", receive("SKU-2", 4)),
        posting("ship-1", ship("SKU-2", 4)),
    ];

    let outcomes = store.post_batch(&batch, t0()).await.expect("the batch commits");

    assert!(matches!(outcomes[0], Err(Error::InsufficientStock { .. })), "{:?}", outcomes[0]);
    applied(&outcomes[1]);
    applied(&outcomes[2]);
    assert_eq!(on_hand(store, "SKU-2").await, 0);
});

both_databases!(invalid_posting_is_refused_alone, |db| {
    let store = db.store();
    let mut bad = posting("bad-1", receive("SKU-3", 1));
    bad.request.qty = 0;
    let batch = [posting("ok-1", receive("SKU-3", 1)), bad, posting("ok-2", receive("SKU-3", 2))];

    let outcomes = store.post_batch(&batch, t0()).await.expect("the batch commits");

    applied(&outcomes[0]);
    assert!(matches!(outcomes[1], Err(Error::InvalidInput { field: "qty", .. })));
    applied(&outcomes[2]);
    assert_eq!(on_hand(store, "SKU-3").await, 3);
});

both_databases!(empty_batch_touches_nothing, |db| {
    let outcomes = db.store().post_batch(&[], t0()).await.unwrap();
    assert!(outcomes.is_empty());
    assert_eq!(footprint(db.store()).await, (0, 0, 0));
});

/// Makes the ledger refuse a row for SKU `BOOM`, standing in for a database fault half-way
/// through a batch's ledger statement. `raise` is SQLite's way of failing: `ABORT` undoes the
/// statement's earlier rows, `FAIL` leaves them in place, as the batch's own `OR FAIL`
/// statements do. PostgreSQL always undoes the statement.
async fn refuse_boom(store: &Store, raise: &str) {
    match store {
        Store::Sqlite(sqlite) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE TRIGGER boom BEFORE INSERT ON ledger WHEN NEW.sku = 'BOOM' \
                 BEGIN SELECT RAISE({raise}, 'boom'); END"
            )))
            .execute(sqlite.pool())
            .await
            .unwrap();
        }
        Store::Postgres(pg) => {
            sqlx::raw_sql(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.sku = 'BOOM' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER boom BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION boom()",
            )
            .execute(pg.pool())
            .await
            .unwrap();
        }
    }
}

/// Posts a batch whose third posting the ledger refuses: the batch fails, none of it is
/// committed, and its other postings go through once posted without it.
async fn batch_failing_half_way_commits_none_of_it(store: &Store) {
    let batch = [
        posting("a", receive("SKU-4", 1)),
        posting("b", receive("SKU-4", 1)),
        posting("c", receive("BOOM", 1)),
        posting("d", receive("SKU-4", 1)),
    ];

    let err = store.post_batch(&batch, t0()).await.expect_err("the batch fails");

    assert!(matches!(err, Error::Database { .. }), "{err:?}");
    assert_eq!(footprint(store).await, (0, 0, 0), "nothing of the batch was committed");
    let outcomes = store.post_batch(&[batch[0].clone(), batch[1].clone()], t0()).await.unwrap();
    assert!(outcomes.iter().all(|o| o.as_ref().is_ok_and(|p| p.outcome == Outcome::Applied)));
}

both_databases!(failure_inside_a_batch_commits_none_of_it, |db| {
    refuse_boom(db.store(), "ABORT").await;
    batch_failing_half_way_commits_none_of_it(db.store()).await;
});

/// SQLite only: PostgreSQL has no statement that keeps part of its rows when it fails.
#[tokio::test]
async fn sqlite_statement_failing_half_way_commits_none_of_the_batch() {
    let db = TestDb::sqlite().await;
    refuse_boom(db.store(), "FAIL").await;
    batch_failing_half_way_commits_none_of_it(db.store()).await;
}

both_databases!(replays_read_back_every_field_as_written, |db| {
    let store = db.store();
    // Keys with the characters a text format has to escape, and references beyond ASCII.
    let keys = [r#"quote"d"#, r"back\slash", "brace}{]", "plain-key"];
    let batch: Vec<Posting> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let request = receive("SKU-6", 1 + i as i64)
                .with_reference(&format!("Lieferschein «{i}» — ✓ \"{key}\""))
                .expect("valid reference");
            posting(key, request)
        })
        .collect();
    let first = store.post_batch(&batch, t0()).await.expect("the batch commits");
    let later = t0() + chrono::TimeDelta::minutes(5);

    let again = store.post_batch(&batch, later).await.expect("the replays commit");

    let user = Operator::parse("importer").unwrap();
    for ((key, first), again) in keys.iter().zip(&first).zip(&again) {
        let (first, again) = (applied(first), again.as_ref().unwrap());
        assert_eq!(again.outcome, Outcome::Replayed, "{key}");
        assert_eq!(again.transaction, first.transaction, "{key}");
        assert_eq!(again.expires_at, first.expires_at, "{key}");
        let record = store.key(&user, &IdemKey::parse(key).unwrap()).await.unwrap().unwrap();
        assert_eq!(record.replay_count, 1, "{key}");
        assert_eq!(record.last_replay_at, Some(later), "{key}");
    }
    // A third run reads the counters the second one wrote.
    store.post_batch(&batch, later).await.expect("the replays commit");
    let record = store.key(&user, &IdemKey::parse(keys[0]).unwrap()).await.unwrap().unwrap();
    assert_eq!(record.replay_count, 2);
});

both_databases!(crossing_batches_apply_each_key_once, |db| {
    let store = db.store();
    let forward: Vec<Posting> =
        (0..200).map(|i| posting(&format!("k-{i}"), receive("SKU-5", 1))).collect();
    let backward: Vec<Posting> = forward.iter().rev().cloned().collect();

    // On PostgreSQL the two batches claim the same keys in opposite orders and deadlock; the
    // loser is retried as a whole. On SQLite they simply take turns.
    let (a, b) = tokio::join!(store.post_batch(&forward, t0()), store.post_batch(&backward, t0()));

    let (a, b) = (a.expect("first batch"), b.expect("second batch"));
    let mut applied_count = 0;
    for (x, y) in a.iter().zip(b.iter().rev()) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert_eq!(x.transaction.id, y.transaction.id, "both name the one transaction");
        applied_count += [x, y].iter().filter(|p| p.outcome == Outcome::Applied).count();
    }
    assert_eq!(applied_count, 200, "every key applied exactly once");
    assert_eq!(on_hand(store, "SKU-5").await, 200);
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_sqlite_is_waited_out_then_reported_as_temporary() {
    let db = TestDb::sqlite().await;
    let Store::Sqlite(sqlite) = db.store() else { unreachable!() };
    let path = sqlite.path().to_owned();
    let hold_lock = |hold: Duration| {
        let path = path.clone();
        async move {
            let url = format!("sqlite://{}", path.display());
            let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut other).await.unwrap();
            tokio::time::sleep(hold).await;
            sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
        }
    };
    let batch = [posting("w-1", receive("SKU-6", 1)), posting("w-2", receive("SKU-6", 1))];

    // A writer that finishes within the budget is waited for.
    let holder = tokio::spawn(hold_lock(Duration::from_millis(400)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let outcomes = db.store().post_batch(&batch, t0()).await.expect("waits for the lock");
    holder.await.unwrap();
    assert!(outcomes.iter().all(Result::is_ok));

    // One that outlasts it is reported as a temporary failure, with nothing committed.
    let impatient = StoreOptions { busy_budget: Duration::from_millis(300), ..Default::default() };
    let store = Store::connect(db.url(), &impatient).await.unwrap();
    let holder = tokio::spawn(hold_lock(Duration::from_millis(1500)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let more = [posting("w-3", receive("SKU-6", 1))];
    let err = store.post_batch(&more, t0()).await.expect_err("gives up");
    holder.await.unwrap();
    assert!(matches!(err, Error::Busy { .. }) && err.is_temporary(), "{err:?}");
    assert_eq!(on_hand(db.store(), "SKU-6").await, 2);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_postgres_connection_commits_nothing_and_is_temporary() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let Store::Postgres(pg) = db.store() else { unreachable!() };
    // The server ends the batch's own session half-way through, as a failover or a restart
    // would.
    sqlx::raw_sql(
        "CREATE FUNCTION cut() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.sku = 'CUT' THEN PERFORM pg_terminate_backend(pg_backend_pid()); \
         PERFORM pg_sleep(5); END IF; RETURN NEW; END $$; \
         CREATE TRIGGER cut BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION cut()",
    )
    .execute(pg.pool())
    .await
    .unwrap();
    let batch = [
        posting("a", receive("SKU-7", 1)),
        posting("b", receive("CUT", 1)),
        posting("c", receive("SKU-7", 1)),
    ];

    let err = db.store().post_batch(&batch, t0()).await.expect_err("the batch fails");

    assert!(matches!(err, Error::ConnectionLost { .. }) && err.is_temporary(), "{err:?}");
    assert_eq!(footprint(db.store()).await, (0, 0, 0), "nothing of the batch was committed");
}

// Single postings on PostgreSQL stay on one connection between postings, so that none pays
// for a trip through the pool; when the server has closed it meanwhile (a restart, a proxy's
// idle timeout), the next posting finds out before using it and opens another.
#[tokio::test]
async fn a_posting_after_the_server_closed_the_idle_connection_opens_another() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.store();
    let Store::Postgres(pg) = store else { unreachable!() };
    store.post_at(&posting("before", receive("SKU-8", 1)), t0()).await.unwrap();

    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()) AS ended",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap();
    assert_eq!(ended, 1, "the postings' connection, idle");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;

    let after = store.post_at(&posting("after", receive("SKU-8", 1)), t0()).await.unwrap();
    assert_eq!(after.outcome, Outcome::Applied);
    assert_eq!(on_hand(store, "SKU-8").await, 2);
}

// A batch longer than one statement carries (SQLite binds at most 500 rows a statement) is
// written in several statements of one transaction: every posting keeps the outcome it would
// have had alone, across the statement boundaries, and a second pass replays every one.
both_databases!(batch_longer_than_one_statement_keeps_every_outcome, |db| {
    let store = db.store();
    let skus = ["SKU-A", "SKU-B", "SKU-C"];
    let mut batch: Vec<Posting> = (0..1_201)
        .map(|i| posting(&format!("long-{i}"), receive(skus[i % 3], 1 + (i % 5) as i64)))
        .collect();
    // Shipments late in the batch can only be covered by receipts from earlier statements.
    batch.extend((0..300).map(|i| posting(&format!("out-{i}"), ship(skus[i % 3], 1))));
    batch.push(posting("out-too-much", ship("SKU-A", 1_000_000)));

    let first = store.post_batch(&batch, t0()).await.expect("the batch commits");

    assert_eq!(first.len(), batch.len());
    first[..1_501].iter().for_each(|outcome| {
        applied(outcome);
    });
    assert!(matches!(first[1_501], Err(Error::InsufficientStock { .. })), "{:?}", first[1_501]);
    let received: i64 = (0..1_201).filter(|i| i % 3 == 0).map(|i| 1 + (i % 5) as i64).sum();
    assert_eq!(on_hand(store, "SKU-A").await, received - 100);
    assert_eq!(footprint(store).await, (1_501, 1_501, 3));

    let again = store.post_batch(&batch[..1_501], t0()).await.expect("the replay commits");
    for (replayed, original) in again.iter().zip(&first) {
        let (replayed, original) = (replayed.as_ref().unwrap(), original.as_ref().unwrap());
        assert_eq!(replayed.outcome, Outcome::Replayed);
        assert_eq!(replayed.transaction, original.transaction);
    }
    assert_eq!(footprint(store).await, (1_501, 1_501, 3), "a replay writes no stock");
    let filter = AuditFilter {
        action: Some(AuditAction::Replayed),
        limit: Some(10_000),
        ..AuditFilter::default()
    };
    assert_eq!(store.audit(&filter).await.unwrap().len(), 1_501, "each replay is audited");
    idem_core::testing::assert_stock_matches_ledger(store).await;
});

// The store's PostgreSQL sessions never JIT-compile a statement: each one touches a few rows
// through an index, and compiling one that stale statistics made look expensive cost 100-150 ms
// per chunk of an import.
#[tokio::test]
async fn postgres_sessions_run_without_jit() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let Store::Postgres(pg) = db.store() else { unreachable!() };
    let jit: String = sqlx::query_scalar("SHOW jit").fetch_one(pg.pool()).await.unwrap();
    assert_eq!(jit, "off");
}
