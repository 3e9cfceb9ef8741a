//! The read side: the ledger listing behind `tx list` and the key listing behind `keys list`,
//! with each filter checked against postings made at known times.

use chrono::TimeDelta;
use idem_core::{KeyFilter, Kind, TransactionFilter, both_databases};
use uuid::Uuid;

use crate::support::*;

both_databases!(ledger_listing_filters_by_sku_location_time_and_count, |db| {
    let store = db.store();
    let t0 = shift_start();
    let hour = TimeDelta::hours(1);
    let mut posted = Vec::new();
    for (at, p) in [
        (t0, posting("alice", "k1", receive("SKU-1", 10, "A1"))),
        (t0 + hour, posting("alice", "k2", receive("SKU-2", 5, "A1"))),
        (t0 + hour * 2, posting("bob", "k3", transfer("SKU-1", 4, "A1", "B1"))),
        (t0 + hour * 3, posting("bob", "k4", ship("SKU-1", 1, "B1"))),
    ] {
        posted.push(store.post_at(&p, at).await.unwrap().transaction);
    }
    let ids = |filter: TransactionFilter| async move {
        let listed = store.transactions(&filter).await.unwrap();
        listed.iter().map(|t| t.id).collect::<Vec<Uuid>>()
    };
    let [receipt_1, receipt_2, moved, shipped] = [0, 1, 2, 3].map(|i| posted[i].id);

    let everything = store.transactions(&TransactionFilter::default()).await.unwrap();
    assert_eq!(
        everything.iter().map(|t| t.id).collect::<Vec<_>>(),
        [shipped, moved, receipt_2, receipt_1],
        "newest first"
    );
    assert_eq!(everything[1].kind, Kind::Transfer);
    assert!(everything.windows(2).all(|w| w[0].id > w[1].id), "ids sort by time");

    let by_sku = TransactionFilter { sku: Some("SKU-1".into()), ..Default::default() };
    assert_eq!(ids(by_sku).await, [shipped, moved, receipt_1]);
    let by_destination = TransactionFilter { location: Some("B1".into()), ..Default::default() };
    assert_eq!(ids(by_destination).await, [shipped, moved], "a transfer is listed under both ends");
    let by_both = TransactionFilter {
        sku: Some("SKU-1".into()),
        location: Some("A1".into()),
        ..Default::default()
    };
    assert_eq!(ids(by_both).await, [moved, receipt_1]);
    let since = TransactionFilter { since: Some(t0 + hour), ..Default::default() };
    assert_eq!(ids(since).await, [shipped, moved, receipt_2], "since is inclusive");
    let limited = TransactionFilter { limit: Some(2), ..Default::default() };
    assert_eq!(ids(limited).await, [shipped, moved]);
    let nothing = TransactionFilter { sku: Some("SKU-404".into()), ..Default::default() };
    assert!(ids(nothing).await.is_empty());

    assert_eq!(store.transaction(moved).await.unwrap().as_ref(), Some(&posted[2]));
    assert_eq!(store.transaction(Uuid::now_v7()).await.unwrap(), None);
});

both_databases!(key_listing_filters_by_operator_expiry_time_and_count, |db| {
    let store = db.store();
    let t0 = shift_start();
    let short = TimeDelta::hours(1);
    for (at, p) in [
        (t0, posting("alice", "k1", receive("SKU-1", 1, "A1")).ttl(short).unwrap()),
        (t0 + TimeDelta::minutes(30), posting("alice", "k2", receive("SKU-1", 1, "A1"))),
        (t0 + TimeDelta::minutes(45), posting("bob", "k3", receive("SKU-1", 1, "A1"))),
    ] {
        store.post_at(&p, at).await.unwrap();
    }
    let now = t0 + TimeDelta::hours(2);
    let keys = |filter: KeyFilter| async move {
        let listed = store.keys(&filter, now).await.unwrap();
        listed.into_iter().map(|k| format!("{}/{}", k.user, k.key)).collect::<Vec<_>>()
    };

    assert_eq!(
        keys(KeyFilter::default()).await,
        ["bob/k3", "alice/k2", "alice/k1"],
        "newest first"
    );
    let alices = KeyFilter { user: Some("alice".into()), ..Default::default() };
    assert_eq!(keys(alices).await, ["alice/k2", "alice/k1"]);
    let expired = KeyFilter { expired_only: true, ..Default::default() };
    assert_eq!(keys(expired).await, ["alice/k1"]);
    let bobs_expired =
        KeyFilter { user: Some("bob".into()), expired_only: true, ..Default::default() };
    assert_eq!(keys(bobs_expired).await, Vec::<String>::new());
    let since = KeyFilter { since: Some(t0 + TimeDelta::minutes(30)), ..Default::default() };
    assert_eq!(keys(since).await, ["bob/k3", "alice/k2"]);
    let limited = KeyFilter { limit: Some(1), ..Default::default() };
    assert_eq!(keys(limited).await, ["bob/k3"]);

    // Expiry is judged at the `now` given, not at the wall clock.
    let early =
        store.keys(&KeyFilter { expired_only: true, ..Default::default() }, t0).await.unwrap();
    assert!(early.is_empty(), "{early:?}");
});
