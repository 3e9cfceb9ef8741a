//! Set-based batches: the fast path behind [`crate::store::Store::post_batch`].
//!
//! A batch of postings is planned in memory and written with a handful of set-based statements,
//! instead of half a dozen round trips per posting. The store first reads, inside the batch's
//! transaction and locked where the database can lock, everything the postings can touch: their
//! key rows, the last ledger transaction of each key, the transactions those keys name, and the
//! stock rows. [`ChunkPlan`] then answers the posting rule's statements from that snapshot, so
//! every posting runs the ordinary rule ([`crate::posting::post_in`], through
//! [`crate::batch::post_each`]) with its own outcome and its own savepoint, undone in memory. The
//! store finally writes what the plan recorded. If the database shows that another writer got
//! in between (a key the snapshot did not have was claimed meanwhile), the store rolls the
//! batch back and posts it again one posting at a time; nothing is ever written from a stale
//! plan.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::audit::{AuditAction, NewAudit};
use crate::batch::PostingSavepoint;
use crate::error::Result;
use crate::ledger::Transaction;
use crate::posting::{KeyInsert, KeyRecord, NewKey, Posting, WriteTx};

/// (user, key) or (sku, location).
pub(crate) type Pair = (String, String);

/// What the store read before planning.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub keys: HashMap<Pair, KeyRecord>,
    pub last_transaction: HashMap<Pair, Uuid>,
    pub transactions: HashMap<Uuid, Transaction>,
    /// Existing stock rows; a missing pair has no row (nothing on hand).
    pub stock: HashMap<Pair, i64>,
}

/// The (user, key) pairs of a batch, and the (sku, location) pairs whose stock it can take
/// from, for the store to read. A pair the batch only adds to is not read: adding never looks
/// at what is on hand, and the write adds to whatever the row holds then.
pub(crate) fn pairs(postings: &[Posting]) -> (Vec<Pair>, Vec<Pair>) {
    let mut keys: Vec<Pair> =
        postings.iter().map(|p| (p.user.as_str().to_owned(), p.key.as_str().to_owned())).collect();
    let mut stock: Vec<Pair> = postings
        .iter()
        .flat_map(|p| {
            p.request
                .movements()
                .into_iter()
                .filter(|&(_, delta)| delta < 0)
                .map(|(location, _)| (p.request.sku.clone(), location.to_owned()))
        })
        .collect();
    // Sorted, so that concurrent batches lock rows in the same order.
    keys.sort();
    keys.dedup();
    stock.sort();
    stock.dedup();
    (keys, stock)
}

/// Whether any posting of the batch takes stock from somewhere. One that only adds never needs
/// to know what is on hand, so its plan does not depend on the stock rows.
pub(crate) fn takes_stock(postings: &[Posting]) -> bool {
    postings.iter().any(|p| p.request.movements().into_iter().any(|(_, delta)| delta < 0))
}

impl Snapshot {
    /// True when none of the batch's keys has a row or a transaction in the ledger: the
    /// snapshot of a batch of new keys, which a batch that only adds can plan without reading.
    pub(crate) fn is_fresh(&self) -> bool {
        self.keys.is_empty() && self.last_transaction.is_empty()
    }

    /// The keys whose last ledger transaction a claim can ask for: those without a row, and
    /// those whose row names no transaction. A claim of a row that names one reports that one.
    pub(crate) fn keys_needing_last_transaction<'k>(&self, keys: &'k [Pair]) -> Vec<&'k Pair> {
        keys.iter()
            .filter(|pair| self.keys.get(*pair).is_none_or(|k| k.transaction_id.is_none()))
            .collect()
    }
}

/// A net change of stock at one (sku, location).
pub(crate) type StockChange<'a> = (&'a Pair, i64);

/// A key row the plan wrote, owned.
#[derive(Debug, Clone)]
pub(crate) struct KeyRow {
    pub user: String,
    pub key: String,
    pub kind: String,
    pub fingerprint: String,
    pub canonical: String,
    pub transaction_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// An audit entry the plan wrote, owned.
#[derive(Debug, Clone)]
pub(crate) struct AuditRow {
    pub at: DateTime<Utc>,
    pub action: AuditAction,
    pub actor: String,
    pub key: Option<String>,
    pub transaction_id: Option<Uuid>,
    pub detail: String,
}

/// Everything the batch writes, for the store to turn into set-based statements.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// Keys that had no row.
    pub new_keys: Vec<KeyRow>,
    /// Expired keys claimed again.
    pub replaced_keys: Vec<KeyRow>,
    /// Replays, one entry each: (user, key, at).
    pub replays: Vec<(String, String, DateTime<Utc>)>,
    pub ledger: Vec<Transaction>,
    pub audit: Vec<AuditRow>,
    /// Net stock change per (sku, location).
    pub stock_deltas: HashMap<Pair, i64>,
}

impl Writes {
    /// Replays folded per key: (user, key, count, last replay).
    pub(crate) fn replay_counts(&self) -> Vec<(String, String, i64, DateTime<Utc>)> {
        let mut folded: HashMap<(&str, &str), (i64, DateTime<Utc>)> = HashMap::new();
        for (user, key, at) in &self.replays {
            let entry = folded.entry((user, key)).or_insert((0, *at));
            entry.0 += 1;
            entry.1 = entry.1.max(*at);
        }
        folded.into_iter().map(|((u, k), (n, at))| (u.to_owned(), k.to_owned(), n, at)).collect()
    }

    /// Net stock changes split into increases (which may create rows) and decreases (which
    /// only ever apply to rows that existed, locked, when the batch was planned). A net change
    /// of zero counts as an increase: single postings would have left a row behind, at zero.
    pub(crate) fn stock_changes(&self) -> (Vec<StockChange<'_>>, Vec<StockChange<'_>>) {
        self.stock_deltas.iter().map(|(p, d)| (p, *d)).partition(|(_, d)| *d >= 0)
    }
}

/// A change to the snapshot, recorded so that an undone posting can be taken back.
#[derive(Debug)]
enum Undo {
    Key(Pair, Option<KeyRecord>),
    LastTransaction(Pair, Option<Uuid>),
    Stock(Pair, Option<i64>),
    Delta(Pair, Option<i64>),
}

/// Lengths of the write lists and of the undo log at a savepoint.
#[derive(Debug, Clone, Copy)]
struct Mark {
    new_keys: usize,
    replaced_keys: usize,
    replays: usize,
    ledger: usize,
    audit: usize,
    undo: usize,
}

/// The posting rule's statements, answered from a [`Snapshot`] and recorded as [`Writes`].
#[derive(Debug)]
pub(crate) struct ChunkPlan {
    snapshot: Snapshot,
    pub writes: Writes,
    undo: Vec<Undo>,
    mark: Option<Mark>,
}

impl ChunkPlan {
    pub(crate) fn new(snapshot: Snapshot) -> Self {
        ChunkPlan { snapshot, writes: Writes::default(), undo: Vec::new(), mark: None }
    }

    fn set_key(&mut self, pair: Pair, record: KeyRecord) {
        let old = self.snapshot.keys.insert(pair.clone(), record);
        self.undo.push(Undo::Key(pair, old));
    }
}

fn pair(a: &str, b: &str) -> Pair {
    (a.to_owned(), b.to_owned())
}

fn row(key: &NewKey<'_>) -> KeyRow {
    KeyRow {
        user: key.user.to_owned(),
        key: key.key.to_owned(),
        kind: key.kind.to_owned(),
        fingerprint: key.fingerprint.to_owned(),
        canonical: key.canonical.to_owned(),
        transaction_id: key.transaction_id,
        created_at: key.created_at,
        expires_at: key.expires_at,
    }
}

fn record(key: &NewKey<'_>) -> KeyRecord {
    KeyRecord {
        user: key.user.to_owned(),
        key: key.key.to_owned(),
        kind: key.kind.to_owned(),
        fingerprint: key.fingerprint.to_owned(),
        canonical: key.canonical.to_owned(),
        transaction_id: key.transaction_id,
        result: None,
        created_at: key.created_at,
        expires_at: key.expires_at,
        replay_count: 0,
        last_replay_at: None,
    }
}

impl WriteTx for ChunkPlan {
    async fn insert_key(&mut self, key: &NewKey<'_>) -> Result<KeyInsert> {
        let pair = pair(key.user, key.key);
        if self.snapshot.keys.contains_key(&pair) {
            return Ok(KeyInsert::Exists);
        }
        let previous = self.snapshot.last_transaction.get(&pair).copied();
        self.set_key(pair, record(key));
        self.writes.new_keys.push(row(key));
        Ok(KeyInsert::Inserted { previous })
    }

    async fn lock_key(&mut self, user: &str, key: &str) -> Result<Option<KeyRecord>> {
        Ok(self.snapshot.keys.get(&pair(user, key)).cloned())
    }

    async fn replace_key(&mut self, key: &NewKey<'_>) -> Result<()> {
        // Written after the new keys, so this also holds for a row the batch itself inserted.
        self.writes.replaced_keys.push(row(key));
        self.set_key(pair(key.user, key.key), record(key));
        Ok(())
    }

    async fn record_replay(&mut self, user: &str, key: &str, at: DateTime<Utc>) -> Result<()> {
        let pair = pair(user, key);
        if let Some(existing) = self.snapshot.keys.get(&pair).cloned() {
            let mut updated = existing;
            updated.replay_count += 1;
            updated.last_replay_at = Some(at);
            self.set_key(pair, updated);
        }
        self.writes.replays.push((user.to_owned(), key.to_owned(), at));
        Ok(())
    }

    async fn complete_key(&mut self, _: &str, _: &str, _: Option<Uuid>, _: &str) -> Result<()> {
        // Inventory postings store their transaction when they claim the key; a separate
        // result belongs to the generic claim, which runs in the caller's own transaction.
        Err(crate::error::Error::Database {
            during: "planning a batch",
            source: "a batch cannot store a separate result for a key".into(),
        })
    }

    async fn last_transaction_for_key(&mut self, user: &str, key: &str) -> Result<Option<Uuid>> {
        Ok(self.snapshot.last_transaction.get(&pair(user, key)).copied())
    }

    async fn move_stock(&mut self, sku: &str, location: &str, delta: i64) -> Result<Option<i64>> {
        let pair = pair(sku, location);
        let on_hand = self.snapshot.stock.get(&pair).copied().unwrap_or(0);
        if on_hand + delta < 0 {
            return Ok(Some(on_hand));
        }
        let old_stock = self.snapshot.stock.insert(pair.clone(), on_hand + delta);
        self.undo.push(Undo::Stock(pair.clone(), old_stock));
        let old_delta = self.writes.stock_deltas.get(&pair).copied();
        self.writes.stock_deltas.insert(pair.clone(), old_delta.unwrap_or(0) + delta);
        self.undo.push(Undo::Delta(pair, old_delta));
        Ok(None)
    }

    async fn insert_transaction(&mut self, transaction: &Transaction) -> Result<()> {
        let pair = pair(&transaction.user, &transaction.key);
        let old = self.snapshot.last_transaction.insert(pair.clone(), transaction.id);
        self.undo.push(Undo::LastTransaction(pair, old));
        self.writes.ledger.push(transaction.clone());
        Ok(())
    }

    async fn transaction(&mut self, id: Uuid) -> Result<Option<Transaction>> {
        if let Some(found) = self.writes.ledger.iter().rev().find(|t| t.id == id) {
            return Ok(Some(found.clone()));
        }
        Ok(self.snapshot.transactions.get(&id).cloned())
    }

    async fn insert_audit(&mut self, entry: &NewAudit<'_>) -> Result<()> {
        self.writes.audit.push(AuditRow {
            at: entry.at,
            action: entry.action,
            actor: entry.actor.to_owned(),
            key: entry.key.map(str::to_owned),
            transaction_id: entry.transaction_id,
            detail: entry.detail.to_owned(),
        });
        Ok(())
    }
}

impl PostingSavepoint for ChunkPlan {
    async fn savepoint(&mut self) -> Result<()> {
        let w = &self.writes;
        self.mark = Some(Mark {
            new_keys: w.new_keys.len(),
            replaced_keys: w.replaced_keys.len(),
            replays: w.replays.len(),
            ledger: w.ledger.len(),
            audit: w.audit.len(),
            undo: self.undo.len(),
        });
        Ok(())
    }

    async fn release(&mut self) -> Result<()> {
        // No savepoint encloses a posting's: what it kept can no longer be undone, so its
        // entries go now rather than piling up until the batch ends.
        if let Some(mark) = self.mark.take() {
            self.undo.truncate(mark.undo);
        }
        Ok(())
    }

    async fn undo(&mut self) -> Result<()> {
        let mark = self.mark.take().expect("undo follows a savepoint");
        while self.undo.len() > mark.undo {
            match self.undo.pop().expect("longer than the mark") {
                Undo::Key(pair, old) => restore(&mut self.snapshot.keys, pair, old),
                Undo::LastTransaction(pair, old) => {
                    restore(&mut self.snapshot.last_transaction, pair, old)
                }
                Undo::Stock(pair, old) => restore(&mut self.snapshot.stock, pair, old),
                Undo::Delta(pair, old) => restore(&mut self.writes.stock_deltas, pair, old),
            }
        }
        let w = &mut self.writes;
        w.new_keys.truncate(mark.new_keys);
        w.replaced_keys.truncate(mark.replaced_keys);
        w.replays.truncate(mark.replays);
        w.ledger.truncate(mark.ledger);
        w.audit.truncate(mark.audit);
        Ok(())
    }
}

fn restore<V>(map: &mut HashMap<Pair, V>, pair: Pair, old: Option<V>) {
    match old {
        Some(value) => map.insert(pair, value),
        None => map.remove(&pair),
    };
}
