//! Concurrent postings inside one process (SPEC §3.5): many tasks on a store with several
//! connections, so that the database, not the pool, decides who wins. Separate processes are
//! the CLI tests' business.

use idem_core::{
    AuditAction, Error, Outcome, Posted, Posting, Store, StoreOptions, both_databases,
};

use crate::support::*;

const TASKS: usize = 16;

async fn busy_store(url: &str) -> Store {
    let options = StoreOptions { max_connections: 8, ..StoreOptions::default() };
    Store::connect(url, &options).await.unwrap()
}

/// Posts every posting at once, each from its own task, and returns the results in order.
async fn post_all(store: &Store, postings: Vec<Posting>) -> Vec<Result<Posted, Error>> {
    let tasks: Vec<_> = postings
        .into_iter()
        .map(|p| {
            let store = store.clone();
            tokio::spawn(async move { store.post(&p).await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("posting task panicked"));
    }
    results
}

both_databases!(same_key_from_many_tasks_applies_once, |db| {
    let store = busy_store(db.url()).await;
    let receipt = posting("scanner", "gr-race", receive("SKU-1", 7, "A1"));

    let results = post_all(&store, vec![receipt; TASKS]).await;

    let posted: Vec<Posted> =
        results.into_iter().map(|r| r.expect("no caller sees an error")).collect();
    let applied = posted.iter().filter(|p| p.outcome == Outcome::Applied).count();
    let replayed = posted.iter().filter(|p| p.outcome == Outcome::Replayed).count();
    assert_eq!((applied, replayed), (1, TASKS - 1));
    let original = &posted.iter().find(|p| p.outcome == Outcome::Applied).unwrap().transaction;
    assert!(
        posted.iter().all(|p| &p.transaction == original),
        "every caller sees the same transaction"
    );
    assert_eq!(on_hand(&store, "SKU-1", "A1").await, Some(7));
    assert_eq!(ledger(&store).await.len(), 1);

    let record = store.key(&operator("scanner"), &key("gr-race")).await.unwrap().unwrap();
    assert_eq!(record.replay_count, (TASKS - 1) as i64);
    assert_eq!(audit_entries(&store, AuditAction::Replayed).await.len(), TASKS - 1);
    store.close().await;
});

both_databases!(different_keys_from_many_tasks_all_apply, |db| {
    let store = busy_store(db.url()).await;
    let receipts = (0..TASKS)
        .map(|i| posting("scanner", &format!("gr-{i}"), receive("SKU-1", 1, "A1")))
        .collect();

    let results = post_all(&store, receipts).await;

    for (i, result) in results.iter().enumerate() {
        let posted = result.as_ref().unwrap_or_else(|err| panic!("posting {i} failed: {err}"));
        assert_eq!(posted.outcome, Outcome::Applied);
    }
    assert_eq!(on_hand(&store, "SKU-1", "A1").await, Some(TASKS as i64));
    assert_eq!(ledger(&store).await.len(), TASKS);
    store.close().await;
});

both_databases!(racing_shipments_never_oversell, |db| {
    let store = busy_store(db.url()).await;
    store.post(&posting("dock", "gr-1", receive("SKU-1", 10, "A1"))).await.unwrap();
    let shipments =
        (0..TASKS).map(|i| posting("picker", &format!("so-{i}"), ship("SKU-1", 1, "A1"))).collect();

    let results = post_all(&store, shipments).await;

    let shipped =
        results.iter().filter(|r| matches!(r, Ok(p) if p.outcome == Outcome::Applied)).count();
    let refused =
        results.iter().filter(|r| matches!(r, Err(Error::InsufficientStock { .. }))).count();
    assert_eq!((shipped, refused), (10, TASKS - 10), "{results:?}");
    assert_eq!(on_hand(&store, "SKU-1", "A1").await, Some(0));
    let held = store.keys(&Default::default(), chrono::Utc::now()).await.unwrap();
    assert_eq!(held.len(), 1 + 10, "refused shipments hold no key");
    store.close().await;
});
