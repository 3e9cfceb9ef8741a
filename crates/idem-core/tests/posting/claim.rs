//! The claim-and-complete step on its own (SPEC §7), as a service would use it: inside its own
//! database transaction, around writes of its own (here, printing shipping labels).

use chrono::TimeDelta;
use idem_core::request::fingerprint;
use idem_core::store::{postgres, sqlite};
use idem_core::{Claim, Store, both_databases};

use crate::support::*;

const LABEL_REQUEST: &str = r#"{"order":"SO-1","copies":2}"#;

/// The same steps on either database; only the pool type, the BEGIN statement and the claim
/// module differ, and a macro keeps the two from drifting apart.
macro_rules! label_printing {
    ($pool:expr, $begin:literal, $backend:ident) => {{
        let pool = $pool;
        let (printer, k) = (operator("printer-1"), key("label-SO-1"));
        let ttl = TimeDelta::hours(1);
        sqlx::query("CREATE TABLE printed_labels (label_order TEXT NOT NULL)")
            .execute(pool)
            .await
            .unwrap();
        let printed = || async {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM printed_labels")
                .fetch_one(pool)
                .await
                .unwrap();
            n
        };

        let mut tx = pool.begin_with($begin).await.unwrap();
        let claim = $backend::claim(&mut tx, &printer, &k, "print_label", LABEL_REQUEST, ttl)
            .await
            .unwrap();
        assert_eq!(claim, Claim::Fresh { reused_expired_key: None });
        sqlx::query("INSERT INTO printed_labels VALUES ('SO-1')").execute(&mut *tx).await.unwrap();
        $backend::complete(&mut tx, &printer, &k, "2 labels printed").await.unwrap();
        // Nothing is visible outside the caller's transaction before it commits.
        assert_eq!(printed().await, 0);
        tx.commit().await.unwrap();
        assert_eq!(printed().await, 1);

        let mut tx = pool.begin_with($begin).await.unwrap();
        let claim = $backend::claim(&mut tx, &printer, &k, "print_label", LABEL_REQUEST, ttl)
            .await
            .unwrap();
        let Claim::Live(record) = claim else {
            panic!("expected the key to be live, got {claim:?}")
        };
        assert_eq!(record.fingerprint, fingerprint(LABEL_REQUEST), "the caller can tell a retry");
        assert_eq!(record.canonical, LABEL_REQUEST);
        assert_eq!(record.result.as_deref(), Some("2 labels printed"));
        assert_eq!((record.kind.as_str(), record.transaction_id), ("print_label", None));
        tx.commit().await.unwrap();
        assert_eq!(printed().await, 1, "the retry printed nothing");

        // A claim rolled back with the caller's work leaves the key free.
        let other = key("label-SO-2");
        let mut tx = pool.begin_with($begin).await.unwrap();
        let claim =
            $backend::claim(&mut tx, &printer, &other, "print_label", "{}", ttl).await.unwrap();
        assert_eq!(claim, Claim::Fresh { reused_expired_key: None });
        sqlx::query("INSERT INTO printed_labels VALUES ('SO-2')").execute(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(printed().await, 1);

        let mut tx = pool.begin_with($begin).await.unwrap();
        let claim =
            $backend::claim(&mut tx, &printer, &other, "print_label", "{}", ttl).await.unwrap();
        assert_eq!(claim, Claim::Fresh { reused_expired_key: None }, "free after the rollback");
        tx.rollback().await.unwrap();
    }};
}

both_databases!(claim_and_complete_inside_the_callers_transaction, |db| {
    match db.store() {
        Store::Sqlite(s) => label_printing!(s.pool(), "BEGIN IMMEDIATE", sqlite),
        Store::Postgres(p) => label_printing!(p.pool(), "BEGIN", postgres),
    }

    // The stored key is an ordinary key: listed, live, and still free of stock effects.
    let record = db.store().key(&operator("printer-1"), &key("label-SO-1")).await.unwrap().unwrap();
    assert_eq!(record.result.as_deref(), Some("2 labels printed"));
    assert!(db.store().key(&operator("printer-1"), &key("label-SO-2")).await.unwrap().is_none());
    assert!(ledger(db.store()).await.is_empty());
});
