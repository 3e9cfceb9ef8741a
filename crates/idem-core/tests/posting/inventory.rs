//! The stock rules (SPEC §4): levels never go below zero, a transfer moves both legs or
//! neither, a downward adjustment is bounded by what is on hand, and the ledger is append-only.

use idem_core::{Error, Kind, Outcome, Store, both_databases};

use crate::support::*;

/// Runs a statement that the schema must refuse, on whichever database the store is.
async fn schema_refuses(store: &Store, statement: &'static str) -> String {
    let refused = match store {
        Store::Sqlite(s) => sqlx::query(statement).execute(s.pool()).await.map(|_| ()),
        Store::Postgres(p) => sqlx::query(statement).execute(p.pool()).await.map(|_| ()),
    };
    match refused {
        Ok(()) => panic!("{statement:?} was accepted"),
        Err(err) => err.to_string(),
    }
}

both_databases!(stock_never_goes_below_zero, |db| {
    let store = db.store();
    store.post(&posting("alice", "gr-1", receive("SKU-1", 5, "A1"))).await.unwrap();

    let shipped = store.post(&posting("alice", "so-1", ship("SKU-1", 5, "A1"))).await.unwrap();
    assert_eq!(shipped.outcome, Outcome::Applied, "shipping exactly what is on hand is fine");
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(0));

    let err = store.post(&posting("alice", "so-2", ship("SKU-1", 1, "A1"))).await.unwrap_err();
    assert!(matches!(err, Error::InsufficientStock { on_hand: 0, requested: 1, .. }), "{err:?}");
    let err = store.post(&posting("alice", "so-3", ship("SKU-2", 1, "A1"))).await.unwrap_err();
    assert!(matches!(err, Error::InsufficientStock { on_hand: 0, .. }), "unknown sku: {err:?}");
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(0));
    assert_eq!(on_hand(store, "SKU-2", "A1").await, None, "a refused shipment leaves no row");
    assert_eq!(ledger(store).await.len(), 2);

    // The schema itself refuses a negative level, whatever code writes it.
    let message = schema_refuses(store, "UPDATE stock SET on_hand = -1").await;
    assert!(message.to_lowercase().contains("check"), "{message}");
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(0));
});

both_databases!(transfer_moves_both_legs_or_neither, |db| {
    let store = db.store();
    store.post(&posting("alice", "gr-1", receive("SKU-1", 5, "A1"))).await.unwrap();
    store.post(&posting("alice", "gr-2", receive("SKU-1", 2, "B1"))).await.unwrap();
    let too_many = posting("alice", "mv-1", transfer("SKU-1", 8, "A1", "B1"));

    let err = store.post(&too_many).await.unwrap_err();
    let Error::InsufficientStock { location, on_hand: had, requested, .. } = &err else {
        panic!("expected insufficient stock, got {err:?}");
    };
    assert_eq!((location.as_str(), *had, *requested), ("A1", 5, 8));
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(5), "source untouched");
    assert_eq!(on_hand(store, "SKU-1", "B1").await, Some(2), "destination untouched");
    assert_eq!(store.key(&operator("alice"), &key("mv-1")).await.unwrap(), None);

    let moved =
        store.post(&posting("alice", "mv-2", transfer("SKU-1", 5, "A1", "B1"))).await.unwrap();
    assert_eq!(moved.transaction.kind, Kind::Transfer);
    assert_eq!(
        (moved.transaction.location.as_str(), moved.transaction.to_location.as_deref()),
        ("A1", Some("B1"))
    );
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(0));
    assert_eq!(on_hand(store, "SKU-1", "B1").await, Some(7));

    // From an empty or unknown location, nothing moves either.
    let err =
        store.post(&posting("alice", "mv-3", transfer("SKU-1", 1, "C1", "B1"))).await.unwrap_err();
    assert!(matches!(err, Error::InsufficientStock { on_hand: 0, .. }), "{err:?}");
    assert_eq!(on_hand(store, "SKU-1", "B1").await, Some(7));
    assert_eq!(on_hand(store, "SKU-1", "C1").await, None);

    // One ledger row per transfer, not one per leg.
    assert_eq!(ledger(store).await.len(), 3);
});

both_databases!(downward_adjustment_is_bounded_by_stock, |db| {
    let store = db.store();
    store.post(&posting("alice", "gr-1", receive("SKU-1", 5, "A1"))).await.unwrap();

    let err = store
        .post(&posting("alice", "cc-1", adjust("SKU-1", -6, "A1", "cycle count")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InsufficientStock { on_hand: 5, requested: 6, .. }), "{err:?}");
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(5));

    let down =
        store.post(&posting("alice", "cc-2", adjust("SKU-1", -5, "A1", "damaged"))).await.unwrap();
    assert_eq!((down.transaction.qty, down.transaction.reason.as_deref()), (-5, Some("damaged")));
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(0));

    let up = store
        .post(&posting("alice", "cc-3", adjust("SKU-1", 3, "A9", "found in aisle 9")))
        .await
        .unwrap();
    assert_eq!(up.transaction.qty, 3);
    assert_eq!(on_hand(store, "SKU-1", "A9").await, Some(3), "an upward count creates the level");

    let err = store
        .post(&posting("alice", "cc-4", adjust("SKU-1", -1, "Z1", "count")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InsufficientStock { on_hand: 0, requested: 1, .. }), "{err:?}");
    assert_eq!(store.transaction(down.transaction.id).await.unwrap().unwrap().qty, -5);
});

both_databases!(ledger_is_append_only, |db| {
    let store = db.store();
    let posted = store.post(&posting("alice", "gr-1", receive("SKU-1", 5, "A1"))).await.unwrap();

    let message = schema_refuses(store, "UPDATE ledger SET qty = 500").await;
    assert!(message.contains("append-only"), "{message}");
    let message = schema_refuses(store, "DELETE FROM ledger").await;
    assert!(message.contains("append-only"), "{message}");

    assert_eq!(ledger(store).await, [posted.transaction]);
});

both_databases!(request_built_field_by_field_is_still_checked, |db| {
    let store = db.store();
    store.post(&posting("alice", "gr-1", receive("SKU-1", 5, "A1"))).await.unwrap();

    // The fields are public, so a caller can skip the constructors; the store checks again.
    let mut negative_receipt = receive("SKU-1", 1, "A1");
    negative_receipt.qty = -5;
    let mut spaced_sku = receive("SKU-1", 1, "A1");
    spaced_sku.sku = "SKU 1".to_owned();
    let mut blank_reference = receive("SKU-1", 1, "A1");
    blank_reference.reference = Some(String::new());
    for (request, field) in
        [(negative_receipt, "qty"), (spaced_sku, "sku"), (blank_reference, "reference")]
    {
        let err = store.post(&posting("alice", "bad-1", request)).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput { field: f, .. } if *f == field),
            "{field}: {err:?}"
        );
    }
    let mut no_ttl = posting("alice", "bad-1", receive("SKU-1", 1, "A1"));
    no_ttl.ttl = chrono::TimeDelta::zero();
    let err = store.post(&no_ttl).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { field: "ttl", .. }), "{err:?}");

    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(5));
    assert_eq!(ledger(store).await.len(), 1);
    assert_eq!(store.key(&operator("alice"), &key("bad-1")).await.unwrap(), None);
});

both_databases!(verify_finds_stock_that_disagrees_with_the_ledger, |db| {
    let store = db.store();
    store.post(&posting("alice", "gr-1", receive("SKU-1", 10, "A1"))).await.unwrap();
    store.post(&posting("alice", "mv-1", transfer("SKU-1", 4, "A1", "B1"))).await.unwrap();
    assert_eq!(store.verify_stock().await.unwrap(), []);

    tamper(store, "UPDATE stock SET on_hand = 7 WHERE location = 'A1'").await;
    tamper(store, "INSERT INTO stock (sku, location, on_hand) VALUES ('SKU-9', 'Z9', 3)").await;
    let differences = store.verify_stock().await.unwrap();
    let found: Vec<_> = differences
        .iter()
        .map(|d| (d.sku.as_str(), d.location.as_str(), d.on_hand, d.ledger_sum))
        .collect();
    assert_eq!(found, [("SKU-1", "A1", 7, 6), ("SKU-9", "Z9", 3, 0)]);

    // Put it back, or the check after every test would rightly fail this one.
    tamper(store, "UPDATE stock SET on_hand = 6 WHERE location = 'A1'").await;
    tamper(store, "DELETE FROM stock WHERE sku = 'SKU-9'").await;
    assert_eq!(store.verify_stock().await.unwrap(), []);
});
