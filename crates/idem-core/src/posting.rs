//! The posting rule, written once for every database: claim the key, decide between applied,
//! replayed, conflict and rejected, and make the stock change, all inside one transaction that
//! the store begins, retries and commits.

use std::fmt;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::audit::{AuditAction, NewAudit};
use crate::error::{Error, Result};
use crate::key::{IdemKey, Operator};
use crate::ledger::Transaction;
use crate::request::{Request, differing_fields, fingerprint};

/// The default lifetime of a key.
pub const DEFAULT_TTL: TimeDelta = TimeDelta::hours(24);

/// What to do with a retry of a request that was already applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDuplicate {
    /// Return the original transaction (the normal, safe choice for retries).
    #[default]
    Replay,
    /// Refuse the duplicate with [`Error::DuplicateRefused`].
    Fail,
}

/// A request posted by an operator under an idempotency key.
#[derive(Debug, Clone)]
pub struct Posting {
    pub user: Operator,
    pub key: IdemKey,
    pub request: Request,
    pub ttl: TimeDelta,
    pub on_duplicate: OnDuplicate,
}

impl Posting {
    pub fn new(user: Operator, key: IdemKey, request: Request) -> Self {
        Posting { user, key, request, ttl: DEFAULT_TTL, on_duplicate: OnDuplicate::Replay }
    }

    pub fn ttl(mut self, ttl: TimeDelta) -> Result<Self> {
        check_ttl(ttl)?;
        self.ttl = ttl;
        Ok(self)
    }

    /// Checks the request and the TTL again: the fields are public, so a caller may have set
    /// them without the checks of [`Request::new`] and [`Posting::ttl`].
    pub fn validate(&self) -> Result<()> {
        self.request.validate()?;
        check_ttl(self.ttl)
    }

    pub fn on_duplicate(mut self, on_duplicate: OnDuplicate) -> Self {
        self.on_duplicate = on_duplicate;
        self
    }
}

fn check_ttl(ttl: TimeDelta) -> Result<()> {
    if ttl <= TimeDelta::zero() || ttl > TimeDelta::days(3650) {
        return Err(Error::invalid("ttl", "must be more than zero and at most 3650 days"));
    }
    Ok(())
}

/// Whether a posting changed stock or returned an earlier result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Applied,
    Replayed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Applied => "applied",
            Outcome::Replayed => "replayed",
        })
    }
}

/// The result of a posting that succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Posted {
    pub outcome: Outcome,
    pub transaction: Transaction,
    pub expires_at: DateTime<Utc>,
    /// Set when the key had been used before and expired: the transaction it named then.
    pub reused_expired_key: Option<Uuid>,
}

/// The state of a key at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Live,
    Expired,
    Unknown,
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyState::Live => "live",
            KeyState::Expired => "expired",
            KeyState::Unknown => "unknown",
        })
    }
}

/// A stored key, as the key table holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    pub user: String,
    pub key: String,
    pub kind: String,
    pub fingerprint: String,
    pub canonical: String,
    pub transaction_id: Option<Uuid>,
    pub result: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub replay_count: i64,
    pub last_replay_at: Option<DateTime<Utc>>,
}

impl KeyRecord {
    /// A key is live until the instant it expires; from that instant on it counts as free.
    pub fn state_at(&self, now: DateTime<Utc>) -> KeyState {
        if now < self.expires_at { KeyState::Live } else { KeyState::Expired }
    }
}

/// A key row about to be written.
#[derive(Debug)]
pub(crate) struct NewKey<'a> {
    pub user: &'a str,
    pub key: &'a str,
    pub kind: &'a str,
    pub fingerprint: &'a str,
    pub canonical: &'a str,
    pub transaction_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The statements the posting rule needs, implemented once per database inside an open
/// write transaction.
pub(crate) trait WriteTx {
    /// Inserts the key unless a row for (user, key) exists. On PostgreSQL a concurrent
    /// uncommitted insert of the same key makes this wait.
    async fn insert_key(&mut self, key: &NewKey<'_>) -> Result<KeyInsert>;
    /// Reads the key, locked against other writers until the transaction ends.
    async fn lock_key(&mut self, user: &str, key: &str) -> Result<Option<KeyRecord>>;
    /// Overwrites an expired key row with a fresh claim.
    async fn replace_key(&mut self, key: &NewKey<'_>) -> Result<()>;
    /// Counts one more replay of the key.
    async fn record_replay(&mut self, user: &str, key: &str, at: DateTime<Utc>) -> Result<()>;
    /// Stores the outcome of a claimed key.
    async fn complete_key(
        &mut self,
        user: &str,
        key: &str,
        transaction_id: Option<Uuid>,
        result: &str,
    ) -> Result<()>;
    /// The newest ledger transaction posted under (user, key), which outlives the key row.
    async fn last_transaction_for_key(&mut self, user: &str, key: &str) -> Result<Option<Uuid>>;
    /// Adds `delta` to the stock at (sku, location) unless that would go below zero; on refusal
    /// returns the quantity on hand and changes nothing.
    async fn move_stock(&mut self, sku: &str, location: &str, delta: i64) -> Result<Option<i64>>;
    async fn insert_transaction(&mut self, transaction: &Transaction) -> Result<()>;
    async fn transaction(&mut self, id: Uuid) -> Result<Option<Transaction>>;
    async fn insert_audit(&mut self, entry: &NewAudit<'_>) -> Result<()>;
}

/// What inserting a key found. The same statement that inserts the key looks up the ledger, so
/// that a fresh claim costs one round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyInsert {
    /// This call inserted the key; `previous` is the newest transaction posted under
    /// (user, key) before, which the ledger keeps after the key row is gone.
    Inserted { previous: Option<Uuid> },
    /// A row for (user, key) exists.
    Exists,
}

/// What the claim step found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free (never used, or expired) and is now held by this transaction.
    Fresh { reused_expired_key: Option<Uuid> },
    /// The key is live: the stored record decides between replay and conflict.
    Live(Box<KeyRecord>),
}

/// Claims `new` inside the caller's transaction.
pub(crate) async fn claim<T: WriteTx>(
    tx: &mut T,
    new: &NewKey<'_>,
    now: DateTime<Utc>,
) -> Result<Claim> {
    // A key row can vanish between the failed insert and the read (a cleanup removed it after
    // it expired); the second round then inserts.
    for _ in 0..3 {
        if let KeyInsert::Inserted { previous } = tx.insert_key(new).await? {
            return Ok(Claim::Fresh { reused_expired_key: previous });
        }
        let Some(existing) = tx.lock_key(new.user, new.key).await? else {
            continue;
        };
        if existing.state_at(now) == KeyState::Live {
            return Ok(Claim::Live(Box::new(existing)));
        }
        tx.replace_key(new).await?;
        let previous = match existing.transaction_id {
            Some(id) => Some(id),
            None => tx.last_transaction_for_key(new.user, new.key).await?,
        };
        return Ok(Claim::Fresh { reused_expired_key: previous });
    }
    Err(Error::Busy { waited: std::time::Duration::ZERO, source: None })
}

/// How a posting attempt ends: what to do with the transaction, and what to tell the caller.
#[derive(Debug)]
pub(crate) enum Finish {
    /// Commit, then report this (a replay or a conflict still commits its audit entry).
    Commit(Result<Posted>),
    /// Roll back and report this error: nothing may be written.
    Rollback(Error),
}

/// The posting rule, run inside one open write transaction.
pub(crate) async fn post_in<T: WriteTx>(
    tx: &mut T,
    posting: &Posting,
    now: DateTime<Utc>,
) -> Result<Finish> {
    // Both databases keep microseconds. Truncating before anything is derived from the clock
    // makes the applied result identical to what every replay reads back.
    let now = now.trunc_subsecs(6);
    let canonical = posting.request.canonical();
    let fingerprint = fingerprint(&canonical);
    let user = posting.user.as_str();
    let key = posting.key.as_str();
    let id = Uuid::now_v7();
    let expires_at = now + posting.ttl;
    let new = NewKey {
        user,
        key,
        kind: posting.request.kind.as_str(),
        fingerprint: &fingerprint,
        canonical: &canonical,
        transaction_id: Some(id),
        created_at: now,
        expires_at,
    };

    let reused_expired_key = match claim(tx, &new, now).await? {
        Claim::Fresh { reused_expired_key } => reused_expired_key,
        Claim::Live(existing) => {
            return answer_duplicate(tx, posting, &existing, &canonical, now).await;
        }
    };

    for (location, delta) in posting.request.movements() {
        if let Some(on_hand) = tx.move_stock(&posting.request.sku, location, delta).await? {
            tracing::debug!(
                key,
                location,
                on_hand,
                delta,
                "posting rejected: stock would go negative"
            );
            return Ok(Finish::Rollback(Error::InsufficientStock {
                sku: posting.request.sku.clone(),
                location: location.to_owned(),
                on_hand,
                requested: -delta,
            }));
        }
    }
    let transaction = Transaction::new(id, &posting.request, user, key, now);
    tx.insert_transaction(&transaction).await?;
    if let Some(previous) = reused_expired_key {
        tx.insert_audit(&NewAudit {
            at: now,
            action: AuditAction::ExpiredKeyReused,
            actor: user,
            key: Some(key),
            transaction_id: Some(id),
            detail: &format!("key had expired; earlier transaction {previous}"),
        })
        .await?;
    }
    tracing::debug!(key, %id, "posting applied");
    Ok(Finish::Commit(Ok(Posted {
        outcome: Outcome::Applied,
        transaction,
        expires_at,
        reused_expired_key,
    })))
}

async fn answer_duplicate<T: WriteTx>(
    tx: &mut T,
    posting: &Posting,
    existing: &KeyRecord,
    canonical: &str,
    now: DateTime<Utc>,
) -> Result<Finish> {
    let user = posting.user.as_str();
    let key = posting.key.as_str();
    let original = existing.transaction_id.ok_or_else(|| Error::Database {
        during: "reading a replayed key",
        source: format!("key {key:?} is held by a claim that stored no transaction").into(),
    })?;
    let audit = |action, detail: &'static str| NewAudit {
        at: now,
        action,
        actor: user,
        key: Some(key),
        transaction_id: Some(original),
        detail,
    };

    if existing.fingerprint != posting.request.fingerprint() {
        let differing_fields = differing_fields(&existing.canonical, canonical);
        let detail = format!("differs in {}", differing_fields.join(", "));
        tx.insert_audit(&NewAudit { detail: &detail, ..audit(AuditAction::Conflict, "") }).await?;
        tracing::debug!(key, %original, "key conflict");
        return Ok(Finish::Commit(Err(Error::KeyConflict {
            key: key.to_owned(),
            original,
            differing_fields,
        })));
    }
    if posting.on_duplicate == OnDuplicate::Fail {
        tx.insert_audit(&audit(AuditAction::DuplicateRefused, "duplicate refused (strict mode)"))
            .await?;
        return Ok(Finish::Commit(Err(Error::DuplicateRefused { key: key.to_owned(), original })));
    }

    tx.record_replay(user, key, now).await?;
    let detail = format!("replay {}", existing.replay_count + 1);
    tx.insert_audit(&NewAudit { detail: &detail, ..audit(AuditAction::Replayed, "") }).await?;
    let transaction = tx.transaction(original).await?.ok_or_else(|| Error::Database {
        during: "reading a replayed key",
        source: format!("transaction {original} named by key {key:?} is missing from the ledger")
            .into(),
    })?;
    tracing::debug!(key, %original, "posting replayed");
    Ok(Finish::Commit(Ok(Posted {
        outcome: Outcome::Replayed,
        transaction,
        expires_at: existing.expires_at,
        reused_expired_key: None,
    })))
}
