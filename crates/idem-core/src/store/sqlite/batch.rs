//! Batch postings on SQLite: one `BEGIN IMMEDIATE` transaction per batch, planned in memory
//! ([`crate::chunk`]) from one read of everything the batch touches and written back with one
//! statement per table, each taking its rows as a JSON array through `json_each`. The write lock
//! is held from the first read, so nothing can change between planning and writing. The whole
//! batch is retried while the database is busy.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Connection, Row, SqliteConnection};

use super::{SqliteStore, db, key_from_row, parse_uuid, to_micros, transaction_from_row};
use crate::batch;
use crate::chunk::{self, ChunkPlan, Snapshot, Writes};
use crate::error::Result;
use crate::posting::{Posted, Posting};
use crate::retry::Retry;

impl SqliteStore {
    #[tracing::instrument(skip_all, err(level = "debug"), fields(postings = postings.len()))]
    pub(crate) async fn post_batch(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Posted>>> {
        if postings.is_empty() {
            return Ok(Vec::new());
        }
        let mut retry = Retry::new(self.busy_budget);
        loop {
            match self.post_batch_once(postings, now).await {
                Err(err) => retry.pause(err).await?,
                done => return done,
            }
        }
    }

    async fn post_batch_once(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Posted>>> {
        let mut conn = self.pool.acquire().await.map_err(self.map("connecting"))?;
        let mut tx =
            conn.begin_with("BEGIN IMMEDIATE").await.map_err(self.map("beginning a batch"))?;
        let mut plan = ChunkPlan::new(read_snapshot(&mut tx, postings).await?);
        let outcomes = batch::post_each(&mut plan, postings, now).await?;
        write(&mut tx, &plan.writes).await?;
        tx.commit().await.map_err(self.map("committing a batch"))?;
        tracing::debug!(postings = outcomes.len(), "batch committed");
        Ok(outcomes)
    }
}

fn pairs_json<'p>(pairs: impl IntoIterator<Item = &'p chunk::Pair>) -> String {
    Value::from(pairs.into_iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()).to_string()
}

async fn read_snapshot(conn: &mut SqliteConnection, postings: &[Posting]) -> Result<Snapshot> {
    let read = db("reading a batch's keys and stock");
    let (keys, stock) = chunk::pairs(postings);
    let mut snapshot = Snapshot::default();

    let rows = sqlx::query(
        "SELECT user_name, idem_key, kind, fingerprint, canonical, transaction_id, result, \
                created_at, expires_at, replay_count, last_replay_at \
         FROM idem_keys WHERE (user_name, idem_key) IN \
             (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
    )
    .bind(pairs_json(&keys))
    .fetch_all(&mut *conn)
    .await
    .map_err(&read)?;
    for row in &rows {
        let record = key_from_row(row).map_err(&read)?;
        snapshot.keys.insert((record.user.clone(), record.key.clone()), record);
    }

    let named: Vec<String> =
        snapshot.keys.values().filter_map(|k| k.transaction_id.map(|id| id.to_string())).collect();
    let rows = if named.is_empty() {
        Vec::new()
    } else {
        sqlx::query(
        "SELECT id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at \
         FROM ledger WHERE id IN (SELECT value FROM json_each(?1))",
    )
        .bind(Value::from(named).to_string())
        .fetch_all(&mut *conn)
        .await
        .map_err(&read)?
    };
    for row in &rows {
        let transaction = transaction_from_row(row).map_err(&read)?;
        snapshot.transactions.insert(transaction.id, transaction);
    }

    let unnamed = snapshot.keys_needing_last_transaction(&keys);
    let rows = if unnamed.is_empty() {
        Vec::new()
    } else {
        sqlx::query(
            "SELECT user_name, idem_key, MAX(id) FROM ledger WHERE (user_name, idem_key) IN \
                 (SELECT value ->> 0, value ->> 1 FROM json_each(?1)) \
             GROUP BY user_name, idem_key",
        )
        .bind(pairs_json(unnamed))
        .fetch_all(&mut *conn)
        .await
        .map_err(&read)?
    };
    for row in &rows {
        let id = parse_uuid(row.try_get(2).map_err(&read)?).map_err(&read)?;
        if let Some(id) = id {
            snapshot
                .last_transaction
                .insert((row.try_get(0).map_err(&read)?, row.try_get(1).map_err(&read)?), id);
        }
    }

    let rows = if stock.is_empty() {
        Vec::new()
    } else {
        sqlx::query(
            "SELECT sku, location, on_hand FROM stock WHERE (sku, location) IN \
                 (SELECT value ->> 0, value ->> 1 FROM json_each(?1))",
        )
        .bind(pairs_json(&stock))
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

fn key_rows(rows: &[chunk::KeyRow]) -> String {
    let rows: Vec<Value> = rows
        .iter()
        .map(|k| {
            json!([
                k.user,
                k.key,
                k.kind,
                k.fingerprint,
                k.canonical,
                k.transaction_id.map(|id| id.to_string()),
                to_micros(k.created_at),
                to_micros(k.expires_at)
            ])
        })
        .collect();
    Value::from(rows).to_string()
}

async fn write(conn: &mut SqliteConnection, writes: &Writes) -> Result<()> {
    let write = db("writing a batch");
    if !writes.new_keys.is_empty() {
        sqlx::query(
            "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7 \
             FROM json_each(?1)",
        )
        .bind(key_rows(&writes.new_keys))
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    if !writes.replaced_keys.is_empty() {
        sqlx::query(
            "UPDATE idem_keys SET kind = v.value ->> 2, fingerprint = v.value ->> 3, canonical = v.value ->> 4, \
                    transaction_id = v.value ->> 5, result = NULL, created_at = v.value ->> 6, \
                    expires_at = v.value ->> 7, replay_count = 0, last_replay_at = NULL \
             FROM json_each(?1) AS v \
             WHERE user_name = v.value ->> 0 AND idem_key = v.value ->> 1",
        )
        .bind(key_rows(&writes.replaced_keys))
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    let replays = writes.replay_counts();
    if !replays.is_empty() {
        let rows: Vec<Value> =
            replays.iter().map(|(u, k, n, at)| json!([u, k, n, to_micros(*at)])).collect();
        sqlx::query(
            "UPDATE idem_keys SET replay_count = replay_count + (v.value ->> 2), last_replay_at = v.value ->> 3 \
             FROM json_each(?1) AS v \
             WHERE user_name = v.value ->> 0 AND idem_key = v.value ->> 1",
        )
        .bind(Value::from(rows).to_string())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    if !writes.ledger.is_empty() {
        let rows: Vec<Value> = writes
            .ledger
            .iter()
            .map(|t| {
                json!([
                    t.id.to_string(),
                    t.kind.as_str(),
                    t.sku,
                    t.qty,
                    t.location,
                    t.to_location,
                    t.reference,
                    t.reason,
                    t.user,
                    t.key,
                    to_micros(t.created_at)
                ])
            })
            .collect();
        sqlx::query(
            "INSERT INTO ledger (id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, \
                    value ->> 7, value ->> 8, value ->> 9, value ->> 10 \
             FROM json_each(?1)",
        )
        .bind(Value::from(rows).to_string())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    let (increases, decreases) = writes.stock_changes();
    if !increases.is_empty() {
        let rows: Vec<Value> = increases.iter().map(|((s, l), d)| json!([s, l, d])).collect();
        sqlx::query(
            "INSERT INTO stock (sku, location, on_hand) \
             SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?1) WHERE true \
             ON CONFLICT (sku, location) DO UPDATE SET on_hand = on_hand + excluded.on_hand",
        )
        .bind(Value::from(rows).to_string())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    if !decreases.is_empty() {
        let rows: Vec<Value> = decreases.iter().map(|((s, l), d)| json!([s, l, d])).collect();
        sqlx::query(
            "UPDATE stock SET on_hand = on_hand + (v.value ->> 2) FROM json_each(?1) AS v \
             WHERE sku = v.value ->> 0 AND location = v.value ->> 1",
        )
        .bind(Value::from(rows).to_string())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    if !writes.audit.is_empty() {
        let rows: Vec<Value> = writes
            .audit
            .iter()
            .map(|a| {
                json!([
                    to_micros(a.at),
                    a.action.as_str(),
                    a.actor,
                    a.key,
                    a.transaction_id.map(|id| id.to_string()),
                    a.detail
                ])
            })
            .collect();
        sqlx::query(
            "INSERT INTO audit_log (at, action, actor, idem_key, transaction_id, detail) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 \
             FROM json_each(?1)",
        )
        .bind(Value::from(rows).to_string())
        .execute(&mut *conn)
        .await
        .map_err(&write)?;
    }
    Ok(())
}
