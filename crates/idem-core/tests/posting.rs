//! The posting rule (SPEC §3) and the inventory model (SPEC §4), checked against a fresh
//! database of each kind: every test here runs once on SQLite and once on PostgreSQL, and each
//! ends by proving that the stock still equals the sum of the ledger.
//!
//! This file holds the four outcomes, key scoping and expiry; the submodules hold the stock
//! rules, the listings, the generic claim and concurrency.

// One test binary rather than five: the helpers are shared without dead-code noise, and the
// database drivers are linked once.
#[path = "posting/claim.rs"]
mod claim;
#[path = "posting/concurrency.rs"]
mod concurrency;
#[path = "posting/inventory.rs"]
mod inventory;
#[path = "posting/listing.rs"]
mod listing;
#[path = "posting/support.rs"]
mod support;

use chrono::TimeDelta;
use idem_core::{AuditAction, DEFAULT_TTL, Error, KeyState, OnDuplicate, Outcome, both_databases};

use support::*;

both_databases!(first_posting_under_a_key_is_applied, |db| {
    let store = db.store();
    let request = receive("SKU-1", 10, "A1").with_reference("PO-4711").unwrap();
    let receipt = posting("alice", "po-4711", request.clone());

    let posted = store.post(&receipt).await.unwrap();

    assert_eq!(posted.outcome, Outcome::Applied);
    assert_eq!(posted.reused_expired_key, None);
    let t = &posted.transaction;
    assert_eq!(
        (t.kind, t.sku.as_str(), t.qty, t.location.as_str()),
        (request.kind, "SKU-1", 10, "A1")
    );
    assert_eq!((t.to_location.as_deref(), t.reference.as_deref()), (None, Some("PO-4711")));
    assert_eq!((t.user.as_str(), t.key.as_str()), ("alice", "po-4711"));
    assert_eq!(posted.expires_at, t.created_at + DEFAULT_TTL);
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(10));

    // What the caller was told is exactly what the ledger holds.
    assert_eq!(store.transaction(t.id).await.unwrap().as_ref(), Some(t));
    assert_eq!(ledger(store).await, std::slice::from_ref(t));

    let record = store.key(&operator("alice"), &key("po-4711")).await.unwrap().unwrap();
    assert_eq!(record.transaction_id, Some(t.id));
    assert_eq!(record.kind, "receive");
    assert_eq!(record.fingerprint, request.fingerprint());
    assert_eq!(record.canonical, request.canonical());
    assert_eq!((record.created_at, record.expires_at), (t.created_at, posted.expires_at));
    assert_eq!((record.replay_count, record.last_replay_at), (0, None));
    assert!(store.key_is_live(&operator("alice"), &key("po-4711"), t.created_at).await.unwrap());
});

both_databases!(retry_is_replayed_without_touching_stock, |db| {
    let store = db.store();
    let receipt = posting("alice", "retry-1", receive("SKU-1", 10, "A1"));
    let t0 = shift_start();

    let first = store.post_at(&receipt, t0).await.unwrap();
    let second = store.post_at(&receipt, t0 + TimeDelta::minutes(1)).await.unwrap();
    let third = store.post_at(&receipt, t0 + TimeDelta::minutes(2)).await.unwrap();

    assert_eq!(first.outcome, Outcome::Applied);
    for replay in [&second, &third] {
        assert_eq!(replay.outcome, Outcome::Replayed);
        assert_eq!(replay.transaction, first.transaction, "the original transaction comes back");
        assert_eq!(replay.expires_at, first.expires_at, "a replay does not extend the key");
        assert_eq!(replay.reused_expired_key, None);
    }
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(10));
    assert_eq!(ledger(store).await.len(), 1);

    let record = store.key(&operator("alice"), &key("retry-1")).await.unwrap().unwrap();
    assert_eq!(record.replay_count, 2);
    assert_eq!(record.last_replay_at, Some(t0 + TimeDelta::minutes(2)));

    let replays = audit_entries(store, AuditAction::Replayed).await;
    assert_eq!(replays.len(), 2);
    assert_eq!(replays[0].at, t0 + TimeDelta::minutes(2), "newest first");
    for entry in &replays {
        assert_eq!(entry.action, "replayed");
        assert_eq!((entry.actor.as_str(), entry.key.as_deref()), ("alice", Some("retry-1")));
        assert_eq!(entry.transaction_id, Some(first.transaction.id));
    }
});

both_databases!(different_request_under_a_live_key_is_a_conflict, |db| {
    let store = db.store();
    let original = store.post(&posting("alice", "k-7", receive("SKU-1", 10, "A1"))).await.unwrap();
    let original_id = original.transaction.id;

    let err = store.post(&posting("alice", "k-7", receive("SKU-1", 12, "B1"))).await.unwrap_err();

    let Error::KeyConflict { key: conflicting, original: named, differing_fields } = &err else {
        panic!("expected a key conflict, got {err:?}");
    };
    assert_eq!((conflicting.as_str(), *named), ("k-7", original_id));
    assert_eq!(differing_fields, &["location", "qty"]);
    let message = err.to_string();
    assert!(message.contains(&original_id.to_string()), "{message}");
    assert!(message.contains("location, qty"), "{message}");
    assert_eq!(err.code(), "key_conflict");

    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(10));
    assert_eq!(on_hand(store, "SKU-1", "B1").await, None, "nothing written");
    assert_eq!(ledger(store).await.len(), 1);
    let record = store.key(&operator("alice"), &key("k-7")).await.unwrap().unwrap();
    assert_eq!(record.transaction_id, Some(original_id));
    assert_eq!(record.replay_count, 0, "a conflict is not a replay");

    let conflicts = audit_entries(store, AuditAction::Conflict).await;
    assert_eq!(conflicts.len(), 1);
    assert_eq!((conflicts[0].actor.as_str(), conflicts[0].key.as_deref()), ("alice", Some("k-7")));
    assert_eq!(conflicts[0].transaction_id, Some(original_id));
    assert!(conflicts[0].detail.contains("location, qty"), "{:?}", conflicts[0].detail);

    // A different kind under the key conflicts too, and names the kind.
    let err = store.post(&posting("alice", "k-7", ship("SKU-1", 10, "A1"))).await.unwrap_err();
    assert!(
        matches!(&err, Error::KeyConflict { differing_fields, .. } if differing_fields.contains(&"kind".to_owned())),
        "{err:?}"
    );
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(10));
});

both_databases!(strict_mode_refuses_a_duplicate, |db| {
    let store = db.store();
    let strict =
        posting("alice", "strict-1", receive("SKU-1", 3, "A1")).on_duplicate(OnDuplicate::Fail);

    let first = store.post(&strict).await.unwrap();
    assert_eq!(first.outcome, Outcome::Applied, "strict mode applies a fresh key normally");

    let err = store.post(&strict).await.unwrap_err();
    let Error::DuplicateRefused { key: refused, original } = &err else {
        panic!("expected a refused duplicate, got {err:?}");
    };
    assert_eq!((refused.as_str(), *original), ("strict-1", first.transaction.id));
    assert_eq!(err.code(), "duplicate_refused");
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(3));
    assert_eq!(ledger(store).await.len(), 1);

    let refusals = audit_entries(store, AuditAction::DuplicateRefused).await;
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].transaction_id, Some(first.transaction.id));
    assert!(audit_entries(store, AuditAction::Replayed).await.is_empty());

    // A different request is still a conflict, strict or not.
    let other =
        posting("alice", "strict-1", receive("SKU-1", 4, "A1")).on_duplicate(OnDuplicate::Fail);
    assert!(matches!(store.post(&other).await, Err(Error::KeyConflict { .. })));
});

both_databases!(rejected_posting_does_not_consume_its_key, |db| {
    let store = db.store();
    let shipment = posting("alice", "so-1001", ship("SKU-1", 5, "A1"));

    let err = store.post(&shipment).await.unwrap_err();
    let Error::InsufficientStock { sku, location, on_hand: had, requested } = &err else {
        panic!("expected insufficient stock, got {err:?}");
    };
    assert_eq!((sku.as_str(), location.as_str(), *had, *requested), ("SKU-1", "A1", 0, 5));
    assert_eq!(err.code(), "insufficient_stock");
    assert_eq!(store.key(&operator("alice"), &key("so-1001")).await.unwrap(), None);
    assert!(ledger(store).await.is_empty());
    assert_eq!(on_hand(store, "SKU-1", "A1").await, None);

    // Short by two: still refused, still free.
    store.post(&posting("bob", "gr-1", receive("SKU-1", 3, "A1"))).await.unwrap();
    let err = store.post(&shipment).await.unwrap_err();
    assert!(matches!(err, Error::InsufficientStock { on_hand: 3, requested: 5, .. }), "{err:?}");
    assert!(
        !store.key_is_live(&operator("alice"), &key("so-1001"), chrono::Utc::now()).await.unwrap()
    );

    // Once the stock arrives, the very same posting goes through, and only once.
    store.post(&posting("bob", "gr-2", receive("SKU-1", 2, "A1"))).await.unwrap();
    let shipped = store.post(&shipment).await.unwrap();
    assert_eq!(shipped.outcome, Outcome::Applied);
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(0));
    assert_eq!(store.post(&shipment).await.unwrap().outcome, Outcome::Replayed);
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(0));
    assert_eq!(ledger(store).await.len(), 3);
});

both_databases!(keys_are_scoped_to_the_operator, |db| {
    let store = db.store();

    let alice = store.post(&posting("alice", "pallet-9", receive("SKU-1", 4, "A1"))).await.unwrap();
    let bob = store.post(&posting("bob", "pallet-9", receive("SKU-1", 7, "B1"))).await.unwrap();

    assert_eq!((alice.outcome, bob.outcome), (Outcome::Applied, Outcome::Applied));
    assert_ne!(alice.transaction.id, bob.transaction.id);
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(4));
    assert_eq!(on_hand(store, "SKU-1", "B1").await, Some(7));
    let bobs = store.key(&operator("bob"), &key("pallet-9")).await.unwrap().unwrap();
    assert_eq!(bobs.transaction_id, Some(bob.transaction.id));

    // Each operator's retry replays their own transaction.
    let again = store.post(&posting("bob", "pallet-9", receive("SKU-1", 7, "B1"))).await.unwrap();
    assert_eq!((again.outcome, again.transaction.id), (Outcome::Replayed, bob.transaction.id));
    let carol = store.key(&operator("carol"), &key("pallet-9")).await.unwrap();
    assert_eq!(carol, None);
});

both_databases!(key_is_live_until_the_instant_it_expires, |db| {
    let store = db.store();
    let (alice, k) = (operator("alice"), key("cycle-1"));
    let receipt =
        posting("alice", "cycle-1", receive("SKU-1", 10, "A1")).ttl(TimeDelta::hours(1)).unwrap();
    let t0 = shift_start();
    let expires_at = t0 + TimeDelta::hours(1);
    let just_before = expires_at - TimeDelta::microseconds(1);

    let first = store.post_at(&receipt, t0).await.unwrap();
    assert_eq!(first.expires_at, expires_at);
    assert!(store.key_is_live(&alice, &k, just_before).await.unwrap());
    assert!(!store.key_is_live(&alice, &k, expires_at).await.unwrap());
    let record = store.key(&alice, &k).await.unwrap().unwrap();
    assert_eq!(
        (record.state_at(just_before), record.state_at(expires_at)),
        (KeyState::Live, KeyState::Expired)
    );

    let replay = store.post_at(&receipt, just_before).await.unwrap();
    assert_eq!((replay.outcome, replay.transaction.id), (Outcome::Replayed, first.transaction.id));
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(10));

    // At the instant of expiry the key is free again: the posting applies a second time, and
    // says which transaction the key named before.
    let reused = store.post_at(&receipt, expires_at).await.unwrap();
    assert_eq!(reused.outcome, Outcome::Applied);
    assert_ne!(reused.transaction.id, first.transaction.id);
    assert_eq!(reused.reused_expired_key, Some(first.transaction.id));
    assert_eq!(reused.expires_at, expires_at + TimeDelta::hours(1));
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(20));

    let record = store.key(&alice, &k).await.unwrap().unwrap();
    assert_eq!(record.transaction_id, Some(reused.transaction.id));
    assert_eq!(
        (record.created_at, record.replay_count, record.last_replay_at),
        (expires_at, 0, None)
    );

    let notes = audit_entries(store, AuditAction::ExpiredKeyReused).await;
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].transaction_id, Some(reused.transaction.id));
    assert_eq!(notes[0].key.as_deref(), Some("cycle-1"));
    assert!(notes[0].detail.contains(&first.transaction.id.to_string()), "{:?}", notes[0].detail);

    // The ledger keeps both transactions under the key.
    let under_key: Vec<_> =
        ledger(store).await.into_iter().filter(|t| t.key == "cycle-1").collect();
    assert_eq!(under_key.len(), 2);
});

both_databases!(expired_key_is_free_for_a_different_request, |db| {
    let store = db.store();
    let t0 = shift_start();
    let receipt =
        posting("alice", "reused", receive("SKU-1", 10, "A1")).ttl(TimeDelta::minutes(15)).unwrap();
    let first = store.post_at(&receipt, t0).await.unwrap();

    let shipment = posting("alice", "reused", ship("SKU-1", 4, "A1"));
    let shipped = store.post_at(&shipment, t0 + TimeDelta::minutes(15)).await.unwrap();

    assert_eq!(shipped.outcome, Outcome::Applied, "no conflict with an expired key");
    assert_eq!(shipped.reused_expired_key, Some(first.transaction.id));
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(6));
    let record = store.key(&operator("alice"), &key("reused")).await.unwrap().unwrap();
    assert_eq!(record.fingerprint, shipment.request.fingerprint());
});

both_databases!(reuse_is_reported_even_after_the_key_row_was_removed, |db| {
    let store = db.store();
    let t0 = shift_start();
    let receipt =
        posting("alice", "swept", receive("SKU-1", 1, "A1")).ttl(TimeDelta::hours(1)).unwrap();
    let first = store.post_at(&receipt, t0).await.unwrap();

    // What a cleanup run does to an expired key; the ledger still names the key.
    tamper(store, "DELETE FROM idem_keys").await;
    assert_eq!(store.key(&operator("alice"), &key("swept")).await.unwrap(), None);

    let again = store.post_at(&receipt, t0 + TimeDelta::hours(2)).await.unwrap();
    assert_eq!(again.outcome, Outcome::Applied);
    assert_eq!(again.reused_expired_key, Some(first.transaction.id));
    assert_eq!(audit_entries(store, AuditAction::ExpiredKeyReused).await.len(), 1);
    assert_eq!(on_hand(store, "SKU-1", "A1").await, Some(2));
});

both_databases!(replay_equals_the_applied_result_when_the_clock_has_nanoseconds, |db| {
    let store = db.store();
    let receipt = posting("alice", "fine-clock", receive("SKU-1", 1, "A1"));
    let now = shift_start() + TimeDelta::nanoseconds(123_456_789);

    let applied = store.post_at(&receipt, now).await.unwrap();
    let replayed = store.post_at(&receipt, now).await.unwrap();

    assert_eq!(replayed.outcome, Outcome::Replayed);
    assert_eq!(replayed.transaction, applied.transaction);
    assert_eq!(replayed.expires_at, applied.expires_at);
    assert_eq!(applied.transaction.created_at, shift_start() + TimeDelta::microseconds(123_456));
});
