//! Batch postings on SQLite: one `BEGIN IMMEDIATE` transaction per batch, planned in memory
//! ([`crate::chunk`]) from one read of everything the batch touches and written back with one
//! statement per table (per [`ROWS_PER_STATEMENT`] rows), each taking its rows as a multi-row
//! `VALUES` list of bound parameters. The write lock is held from the first read, so nothing can
//! change between planning and writing. The whole batch is retried while the database is busy.
//!
//! Bound `VALUES` lists rather than one JSON array per statement: decoding JSON inside SQLite
//! (`json_each` and `->>` for every field) took more of an import's time than the inserts
//! themselves.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{AssertSqlSafe, Connection, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{SqliteStore, db, from_micros, parse_uuid, to_micros};
use crate::batch;
use crate::chunk::{self, ChunkPlan, Snapshot, Writes};
use crate::error::Result;
use crate::ledger::Transaction;
use crate::posting::{KeyRecord, Posted, Posting};
use crate::request::Kind;
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

/// The most rows one statement carries. SQLite allows 32,766 bound parameters, and the widest
/// row (a ledger row) takes 11; equal slices also let the statement cache serve every full one.
const ROWS_PER_STATEMENT: usize = 500;

type Query = sqlx::query::Query<'static, Sqlite, SqliteArguments>;

/// `(?,?,?),(?,?,?)…` for `rows` rows of `columns` values. Plain `?` rather than `?NNN`: sqlx
/// resolves a numbered parameter by walking SQLite's list of names, which makes binding
/// thousands of them quadratic.
fn placeholders(rows: usize, columns: usize) -> String {
    let mut list = String::with_capacity(rows * (2 * columns + 2));
    for row in 0..rows {
        list.push_str(if row == 0 { "(" } else { ",(" });
        for column in 0..columns {
            list.push_str(if column == 0 { "?" } else { ",?" });
        }
        list.push(')');
    }
    list
}

/// A text value to bind. sqlx keeps a bound `String` (or `&str`) as a copy in a box of its
/// own, two allocations per value; an `Arc<str>` is kept as it is, one.
fn text(value: &str) -> Arc<str> {
    Arc::from(value)
}

fn id_text(id: Uuid) -> Arc<str> {
    text(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
}

/// Runs the statement `sql` makes of a placeholder list over `rows`, a slice of at most
/// [`ROWS_PER_STATEMENT`] at a time, with `bind` binding one row's `columns` values; returns
/// every row the statements returned. Only placeholders are ever pasted into the text: every
/// value is bound.
async fn each_slice<T>(
    conn: &mut SqliteConnection,
    rows: &[T],
    columns: usize,
    sql: impl Fn(&str) -> String,
    bind: impl Fn(Query, &T) -> Query,
) -> std::result::Result<Vec<SqliteRow>, sqlx::Error> {
    let mut returned = Vec::new();
    for slice in rows.chunks(ROWS_PER_STATEMENT) {
        let query = sqlx::query(AssertSqlSafe(sql(&placeholders(slice.len(), columns))));
        let query = slice.iter().fold(query, &bind);
        returned.extend(query.fetch_all(&mut *conn).await?);
    }
    Ok(returned)
}

fn bind_pair(query: Query, (a, b): &chunk::Pair) -> Query {
    query.bind(text(a)).bind(text(b))
}

// The reads join the `VALUES` list to the table rather than asking `(a, b) IN (VALUES ...)`:
// SQLite answers a row-value `IN` over a list by scanning the whole table, once per chunk, which
// makes an import quadratic in the size of the table. The tests below check every plan.

/// The key rows, each with the ledger row of the transaction it names (`null` when it names
/// none), as one JSON array per statement: a replay needs both, and SQLite's thread hands over
/// every result row on its own, waking the command's thread for each. An import run again reads
/// a row for every line; one value per statement spares it a wake-up per line.
fn keys_sql(values: &str) -> String {
    format!(
        "SELECT json_group_array(json_array( \
                json_array(k.user_name, k.idem_key, k.kind, k.fingerprint, k.canonical, \
                           k.transaction_id, k.result, k.created_at, k.expires_at, \
                           k.replay_count, k.last_replay_at), \
                CASE WHEN l.id IS NOT NULL THEN \
                    json_array(l.id, l.kind, l.sku, l.qty, l.location, l.to_location, \
                               l.reference, l.reason, l.user_name, l.idem_key, l.created_at) \
                END)) \
         FROM (VALUES {values}) AS v \
         JOIN idem_keys k ON k.user_name = v.column1 AND k.idem_key = v.column2 \
         LEFT JOIN ledger l ON l.id = k.transaction_id"
    )
}

/// A key row as [`keys_sql`] lists its columns; times in microseconds.
#[derive(Deserialize)]
struct KeyColumns {
    user: String,
    key: String,
    kind: String,
    fingerprint: String,
    canonical: String,
    transaction_id: Option<Uuid>,
    result: Option<String>,
    created_at: i64,
    expires_at: i64,
    replay_count: i64,
    last_replay_at: Option<i64>,
}

impl From<KeyColumns> for KeyRecord {
    fn from(k: KeyColumns) -> Self {
        KeyRecord {
            user: k.user,
            key: k.key,
            kind: k.kind,
            fingerprint: k.fingerprint,
            canonical: k.canonical,
            transaction_id: k.transaction_id,
            result: k.result,
            created_at: from_micros(k.created_at),
            expires_at: from_micros(k.expires_at),
            replay_count: k.replay_count,
            last_replay_at: k.last_replay_at.map(from_micros),
        }
    }
}

/// A ledger row as [`keys_sql`] lists its columns.
#[derive(Deserialize)]
struct LedgerColumns {
    id: Uuid,
    kind: Kind,
    sku: String,
    qty: i64,
    location: String,
    to_location: Option<String>,
    reference: Option<String>,
    reason: Option<String>,
    user: String,
    key: String,
    created_at: i64,
}

impl From<LedgerColumns> for Transaction {
    fn from(l: LedgerColumns) -> Self {
        Transaction {
            id: l.id,
            kind: l.kind,
            sku: l.sku,
            qty: l.qty,
            location: l.location,
            to_location: l.to_location,
            reference: l.reference,
            reason: l.reason,
            user: l.user,
            key: l.key,
            created_at: from_micros(l.created_at),
        }
    }
}

fn last_transactions_sql(values: &str) -> String {
    format!(
        "SELECT l.user_name, l.idem_key, MAX(l.id) \
         FROM (VALUES {values}) AS v \
         JOIN ledger l ON l.user_name = v.column1 AND l.idem_key = v.column2 \
         GROUP BY l.user_name, l.idem_key"
    )
}

fn stock_sql(values: &str) -> String {
    format!(
        "SELECT s.sku, s.location, s.on_hand FROM (VALUES {values}) AS v \
         JOIN stock s ON s.sku = v.column1 AND s.location = v.column2"
    )
}

async fn read_snapshot(conn: &mut SqliteConnection, postings: &[Posting]) -> Result<Snapshot> {
    let read = db("reading a batch's keys and stock");
    let (keys, stock) = chunk::pairs(postings);
    let mut snapshot = Snapshot::default();

    let lists = each_slice(conn, &keys, 2, keys_sql, bind_pair).await.map_err(&read)?;
    for list in &lists {
        let json: &str = list.try_get(0).map_err(&read)?;
        let rows: Vec<(KeyColumns, Option<LedgerColumns>)> =
            serde_json::from_str(json).map_err(|e| read(sqlx::Error::Decode(Box::new(e))))?;
        for (key, transaction) in rows {
            if let Some(transaction) = transaction {
                snapshot.transactions.insert(transaction.id, transaction.into());
            }
            snapshot.keys.insert((key.user.clone(), key.key.clone()), key.into());
        }
    }

    let unnamed: Vec<chunk::Pair> =
        snapshot.keys_needing_last_transaction(&keys).into_iter().cloned().collect();
    let rows =
        each_slice(conn, &unnamed, 2, last_transactions_sql, bind_pair).await.map_err(&read)?;
    for row in &rows {
        let id = parse_uuid(row.try_get(2).map_err(&read)?).map_err(&read)?;
        if let Some(id) = id {
            snapshot
                .last_transaction
                .insert((row.try_get(0).map_err(&read)?, row.try_get(1).map_err(&read)?), id);
        }
    }

    let rows = each_slice(conn, &stock, 2, stock_sql, bind_pair).await.map_err(&read)?;
    for row in &rows {
        let pair = (row.try_get(0).map_err(&read)?, row.try_get(1).map_err(&read)?);
        snapshot.stock.insert(pair, row.try_get(2).map_err(&read)?);
    }
    Ok(snapshot)
}

/// The eight values of a key row, in the column order of `idem_keys`' insert.
fn bind_key_row(query: Query, k: &chunk::KeyRow) -> Query {
    query
        .bind(text(&k.user))
        .bind(text(&k.key))
        .bind(text(&k.kind))
        .bind(text(&k.fingerprint))
        .bind(text(&k.canonical))
        .bind(k.transaction_id.map(id_text))
        .bind(to_micros(k.created_at))
        .bind(to_micros(k.expires_at))
}

/// A net stock change: sku, location, delta.
fn bind_stock_change(query: Query, ((sku, location), delta): &chunk::StockChange<'_>) -> Query {
    query.bind(text(sku)).bind(text(location)).bind(*delta)
}

/// Every statement says `OR FAIL`: a statement that fails keeps the rows it changed before the
/// failure instead of undoing them itself. Undoing them would need a statement journal, which
/// SQLite writes to a temporary file for every multi-row statement with a constraint to check
/// (in an import, more bytes than the WAL itself). Nothing partial is ever committed: any error
/// here rolls the whole batch back.
async fn write(conn: &mut SqliteConnection, writes: &Writes) -> Result<()> {
    let write = db("writing a batch");
    each_slice(
        conn,
        &writes.new_keys,
        8,
        |values| {
            format!(
                "INSERT OR FAIL INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, \
                                        transaction_id, created_at, expires_at) VALUES {values}"
            )
        },
        bind_key_row,
    )
    .await
    .map_err(&write)?;
    each_slice(
        conn,
        &writes.replaced_keys,
        8,
        |values| {
            format!(
                "UPDATE OR FAIL idem_keys SET kind = v.column3, fingerprint = v.column4, \
                        canonical = v.column5, transaction_id = v.column6, result = NULL, \
                        created_at = v.column7, expires_at = v.column8, replay_count = 0, \
                        last_replay_at = NULL \
                 FROM (VALUES {values}) AS v \
                 WHERE user_name = v.column1 AND idem_key = v.column2"
            )
        },
        bind_key_row,
    )
    .await
    .map_err(&write)?;
    each_slice(
        conn,
        &writes.replay_counts(),
        4,
        |values| {
            format!(
                "UPDATE OR FAIL idem_keys SET replay_count = replay_count + v.column3, \
                        last_replay_at = v.column4 \
                 FROM (VALUES {values}) AS v \
                 WHERE user_name = v.column1 AND idem_key = v.column2"
            )
        },
        |query, (user, key, count, at)| {
            query.bind(text(user)).bind(text(key)).bind(*count).bind(to_micros(*at))
        },
    )
    .await
    .map_err(&write)?;
    each_slice(
        conn,
        &writes.ledger,
        11,
        |values| {
            format!(
                "INSERT OR FAIL INTO ledger (id, kind, sku, qty, location, to_location, reference, reason, \
                                     user_name, idem_key, created_at) VALUES {values}"
            )
        },
        |query, t| {
            query
                .bind(id_text(t.id))
                .bind(text(t.kind.as_str()))
                .bind(text(&t.sku))
                .bind(t.qty)
                .bind(text(&t.location))
                .bind(t.to_location.as_deref().map(text))
                .bind(t.reference.as_deref().map(text))
                .bind(t.reason.as_deref().map(text))
                .bind(text(&t.user))
                .bind(text(&t.key))
                .bind(to_micros(t.created_at))
        },
    )
    .await
    .map_err(&write)?;
    let (increases, decreases) = writes.stock_changes();
    // `WHERE true` keeps SQLite from reading `ON CONFLICT` as part of a join.
    each_slice(
        conn,
        &increases,
        3,
        |values| {
            format!(
                "INSERT OR FAIL INTO stock (sku, location, on_hand) SELECT * FROM (VALUES {values}) WHERE true \
                 ON CONFLICT (sku, location) DO UPDATE SET on_hand = on_hand + excluded.on_hand"
            )
        },
        bind_stock_change,
    )
    .await
    .map_err(&write)?;
    each_slice(
        conn,
        &decreases,
        3,
        |values| {
            format!(
                "UPDATE OR FAIL stock SET on_hand = on_hand + v.column3 FROM (VALUES {values}) AS v \
                 WHERE sku = v.column1 AND location = v.column2"
            )
        },
        bind_stock_change,
    )
    .await
    .map_err(&write)?;
    each_slice(
        conn,
        &writes.audit,
        6,
        |values| {
            format!(
                "INSERT OR FAIL INTO audit_log (at, action, actor, idem_key, transaction_id, detail) \
                 VALUES {values}"
            )
        },
        |query, a| {
            query
                .bind(to_micros(a.at))
                .bind(text(a.action.as_str()))
                .bind(text(&a.actor))
                .bind(a.key.as_deref().map(text))
                .bind(a.transaction_id.map(id_text))
                .bind(text(&a.detail))
        },
    )
    .await
    .map_err(&write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Row, SqliteConnection};

    use super::*;
    use crate::store::sqlite::MIGRATOR;

    /// A statement made of a placeholder list.
    type Statement = fn(&str) -> String;

    /// The steps of `EXPLAIN QUERY PLAN` for `sql` made of a two-row placeholder list.
    async fn plan(conn: &mut SqliteConnection, sql: Statement, columns: usize) -> Vec<String> {
        let explain = format!("EXPLAIN QUERY PLAN {}", sql(&placeholders(2, columns)));
        let mut query = sqlx::query(AssertSqlSafe(explain));
        for _ in 0..2 * columns {
            query = query.bind("x");
        }
        let rows = query.fetch_all(&mut *conn).await.unwrap();
        rows.iter().map(|r| r.get::<String, _>(3)).collect()
    }

    /// Every read of a batch looks its rows up by key: a scan of a table in every chunk would
    /// grow with the table (the ledger is never trimmed).
    #[tokio::test]
    async fn batch_reads_search_by_key() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        MIGRATOR.run(&mut conn).await.unwrap();
        let reads: [(Statement, usize); 3] =
            [(keys_sql, 2), (last_transactions_sql, 2), (stock_sql, 2)];

        for (sql, columns) in reads {
            let steps = plan(&mut conn, sql, columns).await;
            let tables = ["idem_keys", "k", "ledger", "l", "stock", "s"];
            let table_scans: Vec<&String> = steps
                .iter()
                .filter(|step| {
                    let mut words = step.split_whitespace();
                    words.next() == Some("SCAN")
                        && words.next().is_some_and(|t| tables.contains(&t))
                })
                .collect();
            assert!(table_scans.is_empty(), "{steps:?}");
            assert!(steps.iter().any(|step| step.starts_with("SEARCH")), "{steps:?}");
        }
    }
}
