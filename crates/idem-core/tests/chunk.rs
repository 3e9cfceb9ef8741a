//! What a batch planned in memory must still get right, on both databases: keys that expired
//! are claimed again with the earlier transaction named, replays are counted and audited,
//! stock received earlier in a batch can be shipped and moved later in it, and what the batch
//! wrote reads back exactly like the same postings made one at a time.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use idem_core::{
    AuditAction, AuditFilter, CleanupOptions, Error, IdemKey, KeyFilter, Operator, Outcome,
    Posting, Request, StockFilter, TransactionFilter, both_databases,
};

fn posting(key: &str, request: Request) -> Posting {
    Posting::new(Operator::parse("batcher").unwrap(), IdemKey::parse(key).unwrap(), request)
        .ttl(TimeDelta::hours(1))
        .unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2031, 5, 1, 8, 0, 0).single().unwrap()
}

both_databases!(batch_reclaims_expired_keys_and_counts_replays, |db| {
    let store = db.store();
    let first =
        store.post_at(&posting("e-1", Request::receive("S", 2, "A").unwrap()), t0()).await.unwrap();

    let later = t0() + TimeDelta::hours(2);
    let batch = [
        posting("e-1", Request::receive("S", 3, "A").unwrap()),
        posting("e-1", Request::receive("S", 3, "A").unwrap()),
        posting("e-1", Request::receive("S", 3, "A").unwrap()),
        posting("e-1", Request::receive("S", 4, "A").unwrap()),
    ];
    let outcomes = store.post_batch(&batch, later).await.unwrap();
    let reclaimed = outcomes[0].as_ref().unwrap();
    assert_eq!(reclaimed.outcome, Outcome::Applied);
    assert_eq!(reclaimed.reused_expired_key, Some(first.transaction.id));
    for replay in &outcomes[1..3] {
        let replay = replay.as_ref().unwrap();
        assert_eq!(replay.outcome, Outcome::Replayed);
        assert_eq!(replay.transaction, reclaimed.transaction);
    }
    assert!(
        matches!(&outcomes[3], Err(Error::KeyConflict { original, .. }) if *original == reclaimed.transaction.id)
    );

    let user = Operator::parse("batcher").unwrap();
    let key = store.key(&user, &IdemKey::parse("e-1").unwrap()).await.unwrap().unwrap();
    assert_eq!(key.replay_count, 2);
    assert_eq!(key.last_replay_at, Some(later));
    assert_eq!(key.transaction_id, Some(reclaimed.transaction.id));
    assert_eq!(key.expires_at, later + TimeDelta::hours(1));

    let actions: Vec<String> = store
        .audit(&AuditFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action != AuditAction::Migrate.as_str())
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["conflict", "replayed", "replayed", "expired_key_reused"]);
    let keys = store.keys(&KeyFilter::default(), later).await.unwrap();
    assert_eq!(keys.len(), 1);
    let stock = store.stock(&StockFilter::default()).await.unwrap();
    assert_eq!(stock[0].on_hand, 5);
});

async fn actions(store: &idem_core::Store) -> Vec<String> {
    let entries = store.audit(&AuditFilter::default()).await.unwrap();
    entries.into_iter().map(|e| e.action).filter(|a| a != AuditAction::Migrate.as_str()).collect()
}

// A batch of receipts under keys it has never seen is the one PostgreSQL plans without reading
// first; these two check that what it would have read still decides the outcome.
both_databases!(a_batch_names_the_transaction_of_a_key_whose_row_was_cleaned_up, |db| {
    let store = db.store();
    let now = Utc::now();
    let first = store
        .post_at(
            &posting("swept", Request::receive("S", 2, "A").unwrap()),
            now - TimeDelta::hours(3),
        )
        .await
        .unwrap();
    let cleanup = CleanupOptions { now, ..CleanupOptions::default() };
    let swept = store.cleanup(&cleanup, &Operator::parse("cron").unwrap()).await.unwrap();
    assert_eq!(swept.removed, 1, "the key row is gone; the ledger keeps its transaction");

    let batch =
        ["new-1", "swept", "new-2"].map(|key| posting(key, Request::receive("S", 1, "A").unwrap()));
    let outcomes = store.post_batch(&batch, now).await.unwrap();
    let reused: Vec<_> = outcomes.iter().map(|o| o.as_ref().unwrap().reused_expired_key).collect();
    assert_eq!(reused, [None, Some(first.transaction.id), None]);
    assert!(outcomes.iter().all(|o| o.as_ref().unwrap().outcome == Outcome::Applied));
    assert_eq!(actions(store).await, ["expired_key_reused", "cleanup"]);
    let stock = store.stock(&StockFilter::default()).await.unwrap();
    assert_eq!(stock[0].on_hand, 5);
    assert_eq!(store.transactions(&TransactionFilter::default()).await.unwrap().len(), 4);
});

both_databases!(a_batch_of_new_keys_replays_the_one_it_finds_live, |db| {
    let store = db.store();
    let receipt = |key| posting(key, Request::receive("S", 1, "A").unwrap());
    let live = store.post_at(&receipt("live"), t0()).await.unwrap();
    let later = t0() + TimeDelta::minutes(1);
    let outcomes = store.post_batch(&[receipt("new-1"), receipt("live")], later).await.unwrap();
    let replay = outcomes[1].as_ref().unwrap();
    assert_eq!((replay.outcome, &replay.transaction), (Outcome::Replayed, &live.transaction));
    assert_eq!(outcomes[0].as_ref().unwrap().outcome, Outcome::Applied);

    // The batch after one that found a key in use is read first, and still right.
    let outcomes = store.post_batch(&[receipt("new-2"), receipt("new-1")], later).await.unwrap();
    let outcomes: Vec<_> = outcomes.iter().map(|o| o.as_ref().unwrap().outcome).collect();
    assert_eq!(outcomes, [Outcome::Applied, Outcome::Replayed]);
    let stock = store.stock(&StockFilter::default()).await.unwrap();
    assert_eq!(stock[0].on_hand, 3);
    assert_eq!(store.transactions(&TransactionFilter::default()).await.unwrap().len(), 3);
    assert_eq!(actions(store).await, ["replayed", "replayed"]);
});

both_databases!(stock_received_in_a_batch_can_leave_later_in_it, |db| {
    let store = db.store();
    let batch = [
        posting("s-1", Request::ship("S", 1, "A").unwrap()),
        posting("s-2", Request::receive("S", 10, "A").unwrap()),
        posting("s-3", Request::ship("S", 4, "A").unwrap()),
        posting("s-4", Request::transfer("S", 5, "A", "B").unwrap()),
        posting("s-5", Request::transfer("S", 2, "A", "B").unwrap()),
        posting("s-6", Request::adjust("S", -5, "B", "count").unwrap()),
        posting("s-1", Request::ship("S", 1, "A").unwrap()),
    ];
    let outcomes = store.post_batch(&batch, t0()).await.unwrap();
    assert!(matches!(&outcomes[0], Err(Error::InsufficientStock { on_hand: 0, .. })));
    assert!(
        matches!(&outcomes[4], Err(Error::InsufficientStock { on_hand: 1, .. })),
        "{:?}",
        outcomes[4]
    );
    for i in [1, 2, 3, 5, 6] {
        assert_eq!(outcomes[i].as_ref().unwrap().outcome, Outcome::Applied, "line {i}");
    }
    let levels: Vec<(String, i64)> = store
        .stock(&StockFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.location, l.on_hand))
        .collect();
    assert_eq!(
        levels,
        [("A".to_owned(), 0), ("B".to_owned(), 0)],
        "rows as single postings leave them"
    );
    assert_eq!(store.transactions(&TransactionFilter::default()).await.unwrap().len(), 5);
    let user = Operator::parse("batcher").unwrap();
    let key = store.key(&user, &IdemKey::parse("s-5").unwrap()).await.unwrap();
    assert!(key.is_none(), "a refused posting in a batch does not use up its key");
});

both_databases!(a_batch_reads_back_like_single_postings, |db| {
    let store = db.store();
    let batch: Vec<Posting> = (0..50)
        .map(|i| {
            let request = Request::receive(&format!("SKU-{}", i % 7), 1 + i % 3, "A")
                .unwrap()
                .with_reference(&format!("PO 'x'; %{i}"))
                .unwrap();
            posting(&format!("b-{i}"), request)
        })
        .collect();
    let outcomes = store.post_batch(&batch, t0()).await.unwrap();
    for (posting, outcome) in batch.iter().zip(&outcomes) {
        let posted = outcome.as_ref().unwrap();
        let stored = store.transaction(posted.transaction.id).await.unwrap().unwrap();
        assert_eq!(stored, posted.transaction);
        let key = store.key(&posting.user, &posting.key).await.unwrap().unwrap();
        assert_eq!(key.fingerprint, posting.request.fingerprint());
        assert_eq!(key.canonical, posting.request.canonical());
        assert_eq!(key.created_at, t0());
    }
    let again = store.post_batch(&batch, t0() + TimeDelta::minutes(1)).await.unwrap();
    assert!(again.iter().zip(&outcomes).all(|(a, b)| {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        a.outcome == Outcome::Replayed && a.transaction == b.transaction
    }));
});
