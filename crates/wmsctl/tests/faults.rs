//! Faults, hostile input and operator isolation, end to end: the real `wmsctl` binary against
//! databases that are locked, read-only, corrupt, too new, unreachable, killed mid-posting or
//! full, and against input written to do harm. Each test checks the exit code, the message and
//! that nothing was written, and then that a retry with the same key applies exactly once.

#[path = "faults/hostile.rs"]
mod hostile;
#[path = "faults/operators.rs"]
mod operators;
#[path = "faults/postgres.rs"]
mod postgres;
#[path = "faults/proxy.rs"]
mod proxy;
#[path = "faults/secrets.rs"]
mod secrets;
#[path = "faults/server.rs"]
mod server;
#[path = "faults/sqlite.rs"]
mod sqlite;
#[path = "faults/support.rs"]
mod support;

use idem_core::Store;

use support::*;

/// The version a newer build might have migrated to, recorded the way sqlx records its own.
const FUTURE_VERSION: i64 = 20_990_101_000_000;

idem_core::both_databases!(schema_from_a_newer_build_exits_78_and_writes_nothing, |db| {
    let url = db.url();
    assert_eq!(run(&mut wmsctl(url), &strs(&receipt("before", 1))).code, 0);
    let insert = "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                  execution_time) VALUES ($1, 'from a newer build', TRUE, $2, 0)";
    match db.store() {
        Store::Sqlite(s) => sqlx::query(insert)
            .bind(FUTURE_VERSION)
            .bind(vec![0u8])
            .execute(s.pool())
            .await
            .map(drop),
        Store::Postgres(p) => sqlx::query(insert)
            .bind(FUTURE_VERSION)
            .bind(vec![0u8])
            .execute(p.pool())
            .await
            .map(drop),
    }
    .unwrap();
    let before = store_snapshot(db.store()).await;

    let post = receipt("after", 1);
    for args in [&strs(&post)[..], &["stock"], &["db", "status"], &["db", "migrate"]] {
        let out = run(&mut wmsctl(url), args);
        assert_eq!(out.code, 78, "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            out.stderr.starts_with(&format!(
                "wmsctl: database schema version {FUTURE_VERSION} is newer than this version of \
                 wmsctl understands"
            )) && out.stderr.contains("upgrade wmsctl"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(store_snapshot(db.store()).await, before, "nothing was written");
});

/// Stock, ledger and key rows through a store that is already open (a new connection would be
/// refused by the very checks under test).
async fn store_snapshot(store: &Store) -> (usize, usize, usize, usize) {
    let audit = store.audit(&Default::default()).await.unwrap().len();
    let stock = store.stock(&Default::default()).await.unwrap().len();
    let ledger = store.transactions(&Default::default()).await.unwrap().len();
    let keys = store.keys(&Default::default(), chrono::Utc::now()).await.unwrap().len();
    (stock, ledger, keys, audit)
}
