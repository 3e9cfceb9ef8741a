//! Batch postings on PostgreSQL: one READ COMMITTED transaction per batch, planned in memory
//! ([`crate::chunk`]) from one locked read of everything the batch touches and written back with
//! one `unnest` statement per table. Rows that exist are locked (`FOR UPDATE`, in a fixed order)
//! while the batch is planned; a key that did not exist can still be claimed by another writer
//! meanwhile, which the insert of the batch's new keys detects: the batch is then rolled back
//! and posted again one posting at a time, each in a savepoint (see [`crate::batch`]), where
//! the ordinary claim waits for the other writer. The whole batch is retried on serialization
//! failures and deadlocks.
//!
//! Most batches of an import are new keys that only add stock, and for those the read finds
//! nothing: no key rows, no earlier transactions, and no stock rows to read, since adding never
//! looks at what is on hand. Such a batch is first planned from that empty snapshot without
//! reading, and the insert of its keys checks what the read would have found: that every key
//! was inserted and that the ledger holds no transaction under any of them. If so, the plan is
//! the one the read would have given and is written as it is; if not, the batch is rolled back
//! and posted the ordinary way, reading first. Whether to try is a guess from the batches
//! before (a re-run tries once or twice), never trusted.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use sqlx::Connection;

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{PgStore, PgWrite, commit_err, key_from_row, map_err, transaction_from_columns};
use crate::batch::{self, PostingSavepoint, RELEASE_SQL, SAVEPOINT_SQL, UNDO_SQL};
use crate::chunk::{self, ChunkPlan, KeyRow, Snapshot, Writes};
use crate::error::Result;
use crate::posting::{Posted, Posting};
use crate::retry::Retry;

impl PgStore {
    pub(crate) async fn post_batch(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Posted>>> {
        let fresh = self.plan_fresh_batch(postings, now).await?;
        self.post_batch_with(postings, now, fresh).await
    }

    /// The plan of a batch of keys never used before, when the batch only adds stock and the
    /// batches before suggest its keys are new; nothing is read. Gives way to other work on
    /// this thread every few postings.
    pub(crate) async fn plan_fresh_batch(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
    ) -> Result<Option<FreshPlan>> {
        if postings.is_empty()
            || !self.fresh_keys_likely.load(Ordering::Relaxed)
            || chunk::takes_stock(postings)
        {
            return Ok(None);
        }
        let mut plan = ChunkPlan::new(Snapshot::default());
        let mut outcomes = Vec::with_capacity(postings.len());
        for part in postings.chunks(POSTINGS_BETWEEN_YIELDS) {
            outcomes.extend(batch::post_each(&mut plan, part, now).await?);
            tokio::task::yield_now().await;
        }
        Ok(Some(FreshPlan { writes: plan.writes, outcomes }))
    }

    #[tracing::instrument(skip_all, err(level = "debug"), fields(postings = postings.len()))]
    pub(crate) async fn post_batch_with(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
        mut fresh: Option<FreshPlan>,
    ) -> Result<Vec<Result<Posted>>> {
        if postings.is_empty() {
            return Ok(Vec::new());
        }
        let mut retry = Retry::new(self.busy_budget);
        loop {
            // A retry reads first: what made the batch fail may have been the guess.
            match self.post_batch_once(postings, now, fresh.take()).await {
                Err(err) => retry.pause(err).await?,
                done => return done,
            }
        }
    }

    async fn post_batch_once(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
        fresh: Option<FreshPlan>,
    ) -> Result<Vec<Result<Posted>>> {
        let mut conn = self.pool.acquire().await.map_err(map_err("connecting"))?;
        if let Some(fresh) = fresh {
            let mut tx =
                conn.begin_with(BATCH_BEGIN).await.map_err(map_err("beginning a batch"))?;
            if write(&mut tx, &fresh.writes, Claims::NeverUsed).await? {
                tx.commit().await.map_err(commit_err)?;
                tracing::debug!(postings = fresh.outcomes.len(), "batch of new keys committed");
                return Ok(fresh.outcomes);
            }
            tx.rollback().await.map_err(map_err("rolling back a batch"))?;
            self.fresh_keys_likely.store(false, Ordering::Relaxed);
            tracing::debug!("a key of the batch had been used before; reading the batch first");
        }

        let mut tx = conn.begin_with(BATCH_BEGIN).await.map_err(map_err("beginning a batch"))?;
        let snapshot = read_snapshot(&mut tx, postings).await?;
        self.fresh_keys_likely.store(snapshot.is_fresh(), Ordering::Relaxed);
        let mut plan = ChunkPlan::new(snapshot);
        let planned = batch::post_each(&mut plan, postings, now).await?;
        if write(&mut tx, &plan.writes, Claims::AsRead).await? {
            tx.commit().await.map_err(commit_err)?;
            tracing::debug!(postings = planned.len(), "batch committed");
            return Ok(planned);
        }
        tx.rollback().await.map_err(map_err("rolling back a batch"))?;
        tracing::debug!("a key of the batch was claimed meanwhile; posting it one by one");

        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(map_err("beginning a batch"))?;
        let outcomes = batch::post_each(&mut PgWrite(&mut tx), postings, now).await?;
        tx.commit().await.map_err(commit_err)?;
        tracing::debug!(postings = outcomes.len(), "batch committed");
        Ok(outcomes)
    }
}

/// A batch planned as if none of its keys had ever been used: what to write, and each
/// posting's outcome if the write finds that so.
#[derive(Debug)]
pub(crate) struct FreshPlan {
    writes: Writes,
    outcomes: Vec<Result<Posted>>,
}

/// Postings planned between two chances for other work on the thread to run: a batch being
/// written meanwhile sends its next statement without waiting for the whole plan.
const POSTINGS_BETWEEN_YIELDS: usize = 64;

/// How a planned batch begins.
///
/// A prepared statement settles on a generic plan after five runs, made for whatever size its
/// tables had then: in an import that starts from empty tables, a scan of the whole table that
/// every later chunk repeats. Planning every run for its own arrays and the tables as they are
/// costs far less than that. Every read of a batch looks rows up by a key, yet a table that grew
/// since it was last analyzed (the ledger during a large import) can still look cheaper to scan
/// than to probe 500 times; such a scan grows with the ledger, which is never trimmed, so the
/// batch rules scans out.
const BATCH_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED; \
    SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_seqscan = off";

/// What the plan assumed about the batch's new keys, for the insert to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claims {
    /// The batch was read first: the new keys had no rows then.
    AsRead,
    /// The batch was planned without reading, as if none of its keys had ever been used.
    NeverUsed,
}

impl PostingSavepoint for PgWrite<'_> {
    async fn savepoint(&mut self) -> Result<()> {
        sqlx::raw_sql(SAVEPOINT_SQL)
            .execute(&mut *self.0)
            .await
            .map_err(map_err("beginning a posting in a batch"))?;
        Ok(())
    }

    async fn release(&mut self) -> Result<()> {
        sqlx::raw_sql(RELEASE_SQL)
            .execute(&mut *self.0)
            .await
            .map_err(map_err("keeping a posting in a batch"))?;
        Ok(())
    }

    async fn undo(&mut self) -> Result<()> {
        sqlx::raw_sql(UNDO_SQL)
            .execute(&mut *self.0)
            .await
            .map_err(map_err("undoing a posting in a batch"))?;
        Ok(())
    }
}

fn split(pairs: &[chunk::Pair]) -> (Vec<&str>, Vec<&str>) {
    pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())).unzip()
}

/// The columns of a key row in the first read of a batch; its transaction's columns follow.
const KEY_COLUMNS: usize = 11;

async fn read_snapshot(conn: &mut PgConnection, postings: &[Posting]) -> Result<Snapshot> {
    let read = map_err("reading a batch's keys and stock");
    let (keys, stock) = chunk::pairs(postings);
    let (users, names) = split(&keys);
    let mut snapshot = Snapshot::default();

    // Each key row comes with the ledger row of the transaction it names (NULL columns from
    // KEY_COLUMNS on when it names none): a replay needs both, in one round trip. The ledger is
    // probed by id in a LATERAL subquery that the planner cannot turn into a join: with the
    // statistics of a table that grew during the import, it would hash the whole ledger once
    // per chunk (a re-run took twice as long).
    let rows = sqlx::query(
        "SELECT k.user_name, k.idem_key, k.kind, k.fingerprint, k.canonical, k.transaction_id, \
                k.result, k.created_at, k.expires_at, k.replay_count, k.last_replay_at, \
                l.id, l.kind, l.sku, l.qty, l.location, l.to_location, l.reference, l.reason, \
                l.user_name, l.idem_key, l.created_at \
         FROM idem_keys k LEFT JOIN LATERAL ( \
             SELECT * FROM ledger WHERE ledger.id = k.transaction_id LIMIT 1 \
         ) l ON true \
         WHERE (k.user_name, k.idem_key) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
         ORDER BY k.user_name, k.idem_key FOR UPDATE OF k",
    )
    .bind(&users)
    .bind(&names)
    .fetch_all(&mut *conn)
    .await
    .map_err(&read)?;
    for row in &rows {
        let record = key_from_row(row).map_err(&read)?;
        if row.try_get::<Option<Uuid>, _>(KEY_COLUMNS).map_err(&read)?.is_some() {
            let transaction = transaction_from_columns(row, KEY_COLUMNS).map_err(&read)?;
            snapshot.transactions.insert(transaction.id, transaction);
        }
        snapshot.keys.insert((record.user.clone(), record.key.clone()), record);
    }

    let (users, names): (Vec<&str>, Vec<&str>) = snapshot
        .keys_needing_last_transaction(&keys)
        .into_iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .unzip();
    let rows = if users.is_empty() {
        Vec::new()
    } else {
        sqlx::query(
            "SELECT DISTINCT ON (user_name, idem_key) user_name, idem_key, id FROM ledger \
             WHERE (user_name, idem_key) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
             ORDER BY user_name, idem_key, id DESC",
        )
        .bind(&users)
        .bind(&names)
        .fetch_all(&mut *conn)
        .await
        .map_err(&read)?
    };
    for row in &rows {
        let pair = (row.try_get(0).map_err(&read)?, row.try_get(1).map_err(&read)?);
        snapshot.last_transaction.insert(pair, row.try_get(2).map_err(&read)?);
    }

    let (skus, locations) = split(&stock);
    let rows = if skus.is_empty() {
        Vec::new()
    } else {
        sqlx::query(
            "SELECT sku, location, on_hand FROM stock \
             WHERE (sku, location) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
             ORDER BY sku, location FOR UPDATE",
        )
        .bind(&skus)
        .bind(&locations)
        .fetch_all(&mut *conn)
        .await
        .map_err(&read)?
    };
    for row in &rows {
        let pair = (row.try_get(0).map_err(&read)?, row.try_get(1).map_err(&read)?);
        snapshot.stock.insert(pair, row.try_get(2).map_err(&read)?);
    }
    Ok(snapshot)
}

/// The columns of key rows, one array each, for `unnest`.
struct KeyColumns<'a> {
    users: Vec<&'a str>,
    keys: Vec<&'a str>,
    kinds: Vec<&'a str>,
    fingerprints: Vec<&'a str>,
    canonicals: Vec<&'a str>,
    transaction_ids: Vec<Option<Uuid>>,
    created: Vec<DateTime<Utc>>,
    expires: Vec<DateTime<Utc>>,
}

impl<'a> KeyColumns<'a> {
    fn of(rows: &'a [KeyRow]) -> Self {
        KeyColumns {
            users: rows.iter().map(|k| k.user.as_str()).collect(),
            keys: rows.iter().map(|k| k.key.as_str()).collect(),
            kinds: rows.iter().map(|k| k.kind.as_str()).collect(),
            fingerprints: rows.iter().map(|k| k.fingerprint.as_str()).collect(),
            canonicals: rows.iter().map(|k| k.canonical.as_str()).collect(),
            transaction_ids: rows.iter().map(|k| k.transaction_id).collect(),
            created: rows.iter().map(|k| k.created_at).collect(),
            expires: rows.iter().map(|k| k.expires_at).collect(),
        }
    }
}

/// Writes the plan. False when a new key of the plan was not new: claimed by another writer
/// after the batch was read, or, for a plan made without reading, used before. The caller must
/// then roll back, since the plan was made without what that key holds.
async fn write(conn: &mut PgConnection, writes: &Writes, claims: Claims) -> Result<bool> {
    let write = map_err("writing a batch");
    let (increases, decreases) = writes.stock_changes();
    if !writes.new_keys.is_empty() || !writes.ledger.is_empty() || !increases.is_empty() {
        let c = KeyColumns::of(&writes.new_keys);
        let l = &writes.ledger;
        // One statement for the rows nearly every batch writes: its new keys, its
        // transactions, and the stock they add. It counts the keys inserted and, when the plan
        // assumed keys never used, those of them with a transaction in the ledger: every part
        // of a statement sees the tables as they were before it, so any found are from before.
        let (inserted, used_before): (i64, i64) = sqlx::query_as(
            "WITH claimed AS ( \
                 INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[], \
                                      $7::timestamptz[], $8::timestamptz[]) \
                 ON CONFLICT (user_name, idem_key) DO NOTHING \
                 RETURNING user_name, idem_key \
             ), posted AS ( \
                 INSERT INTO ledger (id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at) \
                 SELECT * FROM unnest($10::uuid[], $11::text[], $12::text[], $13::bigint[], $14::text[], $15::text[], \
                                      $16::text[], $17::text[], $18::text[], $19::text[], $20::timestamptz[]) \
             ), added AS ( \
                 INSERT INTO stock (sku, location, on_hand) \
                 SELECT * FROM unnest($21::text[], $22::text[], $23::bigint[]) \
                 ON CONFLICT (sku, location) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand \
             ) \
             SELECT count(*), count(*) FILTER (WHERE $9 AND EXISTS ( \
                 SELECT 1 FROM ledger l WHERE l.user_name = c.user_name AND l.idem_key = c.idem_key)) \
             FROM claimed c",
        )
        .bind(&c.users)
        .bind(&c.keys)
        .bind(&c.kinds)
        .bind(&c.fingerprints)
        .bind(&c.canonicals)
        .bind(&c.transaction_ids)
        .bind(&c.created)
        .bind(&c.expires)
        .bind(claims == Claims::NeverUsed)
        .bind(l.iter().map(|t| t.id).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.kind.as_str()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.sku.as_str()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.qty).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.location.as_str()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.to_location.as_deref()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.reference.as_deref()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.reason.as_deref()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.user.as_str()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.key.as_str()).collect::<Vec<_>>())
        .bind(l.iter().map(|t| t.created_at).collect::<Vec<_>>())
        .bind(increases.iter().map(|((sku, _), _)| sku.as_str()).collect::<Vec<_>>())
        .bind(increases.iter().map(|((_, location), _)| location.as_str()).collect::<Vec<_>>())
        .bind(increases.iter().map(|(_, d)| *d).collect::<Vec<_>>())
        .fetch_one(&mut *conn)
        .await
        .map_err(&write)?;
        if inserted != writes.new_keys.len() as i64 || used_before > 0 {
            return Ok(false);
        }
    }
    if !writes.replaced_keys.is_empty() {
        let c = KeyColumns::of(&writes.replaced_keys);
        sqlx::query(
            "UPDATE idem_keys k SET kind = v.kind, fingerprint = v.fingerprint, canonical = v.canonical, \
                    transaction_id = v.transaction_id, result = NULL, created_at = v.created_at, \
                    expires_at = v.expires_at, replay_count = 0, last_replay_at = NULL \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[], \
                         $7::timestamptz[], $8::timestamptz[]) \
                  AS v(user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
             WHERE k.user_name = v.user_name AND k.idem_key = v.idem_key",
        )
        .bind(&c.users)
        .bind(&c.keys)
        .bind(&c.kinds)
        .bind(&c.fingerprints)
        .bind(&c.canonicals)
        .bind(&c.transaction_ids)
        .bind(&c.created)
        .bind(&c.expires)
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    let replays = writes.replay_counts();
    if !replays.is_empty() {
        sqlx::query(
            "UPDATE idem_keys k SET replay_count = k.replay_count + v.n, last_replay_at = v.at \
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[]) AS v(user_name, idem_key, n, at) \
             WHERE k.user_name = v.user_name AND k.idem_key = v.idem_key",
        )
        .bind(replays.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
        .bind(replays.iter().map(|r| r.1.as_str()).collect::<Vec<_>>())
        .bind(replays.iter().map(|r| r.2).collect::<Vec<_>>())
        .bind(replays.iter().map(|r| r.3).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    if !decreases.is_empty() {
        sqlx::query(
            "UPDATE stock s SET on_hand = s.on_hand + v.delta \
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(sku, location, delta) \
             WHERE s.sku = v.sku AND s.location = v.location",
        )
        .bind(decreases.iter().map(|((sku, _), _)| sku.as_str()).collect::<Vec<_>>())
        .bind(decreases.iter().map(|((_, location), _)| location.as_str()).collect::<Vec<_>>())
        .bind(decreases.iter().map(|(_, d)| *d).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    if !writes.audit.is_empty() {
        let a = &writes.audit;
        sqlx::query(
            "INSERT INTO audit_log (at, action, actor, idem_key, transaction_id, detail) \
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::text[])",
        )
        .bind(a.iter().map(|e| e.at).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.action.as_str()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.actor.as_str()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.key.as_deref()).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.transaction_id).collect::<Vec<_>>())
        .bind(a.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    Ok(true)
}
