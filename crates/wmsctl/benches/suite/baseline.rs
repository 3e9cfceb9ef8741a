//! The hand-written baselines, all in one place: the same work as the product (claim the key with
//! its stored result, write the ledger row, change the stock, in one transaction) written the
//! fastest plain way for each database, with no library between the program and the database.
//! Both sides run with the same durability: SQLite in WAL mode with `synchronous=FULL` (cleanup
//! batches with `synchronous=NORMAL`, as `wmsctl keys cleanup` commits them), PostgreSQL with its
//! default commit durability.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use chrono::{DateTime, TimeDelta, Utc};
use idem_core::Request;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Row};
use uuid::Uuid;

use crate::Db;

pub const USER: &str = "bench";
pub const TTL: TimeDelta = TimeDelta::hours(24);

/// One receipt as a hand-written program would post it: everything the key row, the ledger row
/// and the stock change need, worked out before the database is touched.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub key: String,
    pub sku: String,
    pub qty: i64,
    pub location: String,
    pub id: Uuid,
    pub fingerprint: String,
    pub canonical: String,
    pub now: DateTime<Utc>,
}

impl Receipt {
    pub fn new(key: &str, sku: &str, qty: i64, location: &str) -> Receipt {
        let request = Request::receive(sku, qty, location).expect("a valid receipt");
        let now = Utc::now();
        Receipt {
            key: key.to_owned(),
            sku: sku.to_owned(),
            qty,
            location: location.to_owned(),
            id: Uuid::now_v7(),
            fingerprint: request.fingerprint(),
            canonical: request.canonical(),
            now,
        }
    }
}

fn lit(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// One posting as a `sqlite3` script: the ledger row and the stock change happen only when the
/// key was claimed (`changes()` of the insert before), as the posting rule requires.
pub fn sqlite_posting_script(r: &Receipt) -> String {
    let (user, key, sku, loc) = (lit(USER), lit(&r.key), lit(&r.sku), lit(&r.location));
    let (id, now, expires) =
        (lit(&r.id.to_string()), r.now.timestamp_micros(), (r.now + TTL).timestamp_micros());
    format!(
        "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; BEGIN IMMEDIATE; \
         INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
         VALUES ({user}, {key}, 'receive', {fp}, {canonical}, {id}, {now}, {expires}) \
         ON CONFLICT (user_name, idem_key) DO NOTHING; \
         INSERT INTO ledger (id, kind, sku, qty, location, user_name, idem_key, created_at) \
         SELECT {id}, 'receive', {sku}, {qty}, {loc}, {user}, {key}, {now} WHERE changes() = 1; \
         INSERT INTO stock (sku, location, on_hand) SELECT {sku}, {loc}, {qty} WHERE changes() = 1 \
         ON CONFLICT (sku, location) DO UPDATE SET on_hand = on_hand + excluded.on_hand; \
         COMMIT;",
        fp = lit(&r.fingerprint),
        canonical = lit(&r.canonical),
        qty = r.qty,
    )
}

/// One posting as a `psql` statement: one statement is one transaction, and each step feeds the
/// next, so nothing after the claim happens unless the key was claimed.
pub fn pg_posting_script(r: &Receipt) -> String {
    let (user, key, sku, loc) = (lit(USER), lit(&r.key), lit(&r.sku), lit(&r.location));
    let (id, now, expires) =
        (lit(&r.id.to_string()), lit(&r.now.to_rfc3339()), lit(&(r.now + TTL).to_rfc3339()));
    format!(
        "WITH claimed AS ( \
           INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
           VALUES ({user}, {key}, 'receive', {fp}, {canonical}, {id}, {now}, {expires}) \
           ON CONFLICT (user_name, idem_key) DO NOTHING RETURNING transaction_id \
         ), posted AS ( \
           INSERT INTO ledger (id, kind, sku, qty, location, user_name, idem_key, created_at) \
           SELECT transaction_id, 'receive', {sku}, {qty}, {loc}, {user}, {key}, {now} FROM claimed \
           RETURNING sku, location, qty \
         ) \
         INSERT INTO stock (sku, location, on_hand) SELECT sku, location, qty FROM posted \
         ON CONFLICT (sku, location) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand",
        fp = lit(&r.fingerprint),
        canonical = lit(&r.canonical),
        qty = r.qty,
    )
}

/// The lookup behind `keys exists`, as a script for the database's own client.
pub fn exists_script(db: Db, key: &str, now: DateTime<Utc>) -> String {
    let now = match db {
        Db::Sqlite => now.timestamp_micros().to_string(),
        Db::Postgres => lit(&now.to_rfc3339()),
    };
    format!(
        "SELECT 1 FROM idem_keys WHERE user_name = {} AND idem_key = {} AND expires_at > {now}",
        lit(USER),
        lit(key)
    )
}

/// The database's own client, running `script` against the database at `url`.
pub fn client_command(db: Db, sqlite3: &Path, psql: &Path, url: &str, script: &str) -> Command {
    match db {
        Db::Sqlite => {
            let mut command = Command::new(sqlite3);
            command.arg("-batch").arg(sqlite_path(url)).arg(script);
            command
        }
        Db::Postgres => {
            let mut command = Command::new(psql);
            command.args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                script,
            ]);
            command
        }
    }
}

pub fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap_or(url)
}

pub async fn sqlite_connect(url: &str) -> SqliteConnection {
    let options = SqliteConnectOptions::new()
        .filename(sqlite_path(url))
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(10));
    SqliteConnection::connect_with(&options).await.expect("opening SQLite")
}

/// A plain connection posting one receipt per transaction, statement by statement.
#[derive(Debug)]
pub enum Loop {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Loop {
    pub async fn connect(db: Db, url: &str) -> Loop {
        match db {
            Db::Sqlite => Loop::Sqlite(sqlite_connect(url).await),
            Db::Postgres => {
                Loop::Postgres(PgConnection::connect(url).await.expect("connecting to PostgreSQL"))
            }
        }
    }

    /// Claims the key and, when it was free, writes the ledger row and the stock change; returns
    /// whether the receipt was applied.
    pub async fn post(&mut self, r: &Receipt) -> bool {
        let expires = r.now + TTL;
        match self {
            Loop::Sqlite(conn) => {
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                let claimed = sqlx::query(
                    "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
                     VALUES (?1, ?2, 'receive', ?3, ?4, ?5, ?6, ?7) ON CONFLICT (user_name, idem_key) DO NOTHING",
                )
                .bind(USER)
                .bind(&r.key)
                .bind(&r.fingerprint)
                .bind(&r.canonical)
                .bind(r.id.to_string())
                .bind(r.now.timestamp_micros())
                .bind(expires.timestamp_micros())
                .execute(&mut *tx)
                .await
                .expect("claiming a key")
                .rows_affected()
                    == 1;
                if claimed {
                    sqlx::query(
                        "INSERT INTO ledger (id, kind, sku, qty, location, user_name, idem_key, created_at) \
                         VALUES (?1, 'receive', ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .bind(r.id.to_string())
                    .bind(&r.sku)
                    .bind(r.qty)
                    .bind(&r.location)
                    .bind(USER)
                    .bind(&r.key)
                    .bind(r.now.timestamp_micros())
                    .execute(&mut *tx)
                    .await
                    .expect("writing the ledger");
                    sqlx::query(
                        "INSERT INTO stock (sku, location, on_hand) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (sku, location) DO UPDATE SET on_hand = on_hand + excluded.on_hand",
                    )
                    .bind(&r.sku)
                    .bind(&r.location)
                    .bind(r.qty)
                    .execute(&mut *tx)
                    .await
                    .expect("changing stock");
                }
                tx.commit().await.expect("commit");
                claimed
            }
            Loop::Postgres(conn) => {
                let mut tx = conn.begin().await.expect("begin");
                let claimed = sqlx::query(
                    "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
                     VALUES ($1, $2, 'receive', $3, $4, $5, $6, $7) ON CONFLICT (user_name, idem_key) DO NOTHING",
                )
                .bind(USER)
                .bind(&r.key)
                .bind(&r.fingerprint)
                .bind(&r.canonical)
                .bind(r.id)
                .bind(r.now)
                .bind(expires)
                .execute(&mut *tx)
                .await
                .expect("claiming a key")
                .rows_affected()
                    == 1;
                if claimed {
                    sqlx::query(
                        "INSERT INTO ledger (id, kind, sku, qty, location, user_name, idem_key, created_at) \
                         VALUES ($1, 'receive', $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(r.id)
                    .bind(&r.sku)
                    .bind(r.qty)
                    .bind(&r.location)
                    .bind(USER)
                    .bind(&r.key)
                    .bind(r.now)
                    .execute(&mut *tx)
                    .await
                    .expect("writing the ledger");
                    sqlx::query(
                        "INSERT INTO stock (sku, location, on_hand) VALUES ($1, $2, $3) \
                         ON CONFLICT (sku, location) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand",
                    )
                    .bind(&r.sku)
                    .bind(&r.location)
                    .bind(r.qty)
                    .execute(&mut *tx)
                    .await
                    .expect("changing stock");
                }
                tx.commit().await.expect("commit");
                claimed
            }
        }
    }

    pub async fn close(self) {
        match self {
            Loop::Sqlite(conn) => conn.close().await.ok(),
            Loop::Postgres(conn) => conn.close().await.ok(),
        };
    }
}

/// The fastest hand-written chunk: one transaction per chunk, each step one set-based
/// statement. SQLite: multi-row `VALUES` (claim, then ledger rows for the claimed keys, then
/// the stock changes summed per (sku, location)). PostgreSQL: a single statement over
/// `unnest` arrays that claims, writes the ledger and upserts the summed stock.
pub async fn post_chunk(conn: &mut Loop, chunk: &[Receipt]) -> usize {
    match conn {
        Loop::Sqlite(conn) => sqlite_chunk(conn, chunk).await,
        Loop::Postgres(conn) => pg_chunk(conn, chunk).await,
    }
}

/// `(?,?,?),(?,?,?)...`. Plain `?` rather than `?NNN`: sqlx looks every parameter's name up,
/// and SQLite finds a numbered name by walking the list of names, which makes a statement
/// with thousands of numbered parameters quadratic to bind.
fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(","));
    vec![row; rows].join(",")
}

async fn sqlite_chunk(conn: &mut SqliteConnection, chunk: &[Receipt]) -> usize {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.expect("begin");

    let sql = format!(
        "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
         VALUES {} ON CONFLICT (user_name, idem_key) DO NOTHING RETURNING idem_key",
        placeholders(chunk.len(), 8)
    );
    let mut claim = sqlx::query(sqlx::AssertSqlSafe(sql));
    for r in chunk {
        claim = claim
            .bind(USER)
            .bind(&r.key)
            .bind("receive")
            .bind(&r.fingerprint)
            .bind(&r.canonical)
            .bind(r.id.to_string())
            .bind(r.now.timestamp_micros())
            .bind((r.now + TTL).timestamp_micros());
    }
    let claimed: std::collections::HashSet<String> = claim
        .fetch_all(&mut *tx)
        .await
        .expect("claiming keys")
        .iter()
        .map(|row| row.get::<String, _>(0))
        .collect();
    let applied: Vec<&Receipt> = chunk.iter().filter(|r| claimed.contains(&r.key)).collect();

    if !applied.is_empty() {
        let sql = format!(
            "INSERT INTO ledger (id, kind, sku, qty, location, user_name, idem_key, created_at) VALUES {}",
            placeholders(applied.len(), 8)
        );
        let mut ledger = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in &applied {
            ledger = ledger
                .bind(r.id.to_string())
                .bind("receive")
                .bind(&r.sku)
                .bind(r.qty)
                .bind(&r.location)
                .bind(USER)
                .bind(&r.key)
                .bind(r.now.timestamp_micros());
        }
        ledger.execute(&mut *tx).await.expect("writing the ledger");

        let mut sums: HashMap<(&str, &str), i64> = HashMap::new();
        for r in &applied {
            *sums.entry((&r.sku, &r.location)).or_default() += r.qty;
        }
        let sql = format!(
            "INSERT INTO stock (sku, location, on_hand) VALUES {} \
             ON CONFLICT (sku, location) DO UPDATE SET on_hand = on_hand + excluded.on_hand",
            placeholders(sums.len(), 3)
        );
        let mut stock = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((sku, location), qty) in sums {
            stock = stock.bind(sku).bind(location).bind(qty);
        }
        stock.execute(&mut *tx).await.expect("changing stock");
    }

    tx.commit().await.expect("commit");
    applied.len()
}

const PG_CHUNK_SQL: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::uuid[], $6::text[], $7::text[])
        AS t(idem_key, sku, qty, location, id, fingerprint, canonical)
), claimed AS (
    INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at)
    SELECT $8, idem_key, 'receive', fingerprint, canonical, id, $9, $10 FROM input
    ON CONFLICT (user_name, idem_key) DO NOTHING
    RETURNING transaction_id
), posted AS (
    INSERT INTO ledger (id, kind, sku, qty, location, user_name, idem_key, created_at)
    SELECT i.id, 'receive', i.sku, i.qty, i.location, $8, i.idem_key, $9
    FROM input i JOIN claimed c ON c.transaction_id = i.id
    RETURNING sku, location, qty
)
INSERT INTO stock (sku, location, on_hand)
SELECT sku, location, SUM(qty) FROM posted GROUP BY sku, location
ON CONFLICT (sku, location) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand";

async fn pg_chunk(conn: &mut PgConnection, chunk: &[Receipt]) -> usize {
    let now = chunk[0].now;
    let column = |f: fn(&Receipt) -> String| chunk.iter().map(f).collect::<Vec<_>>();
    let done = sqlx::query(PG_CHUNK_SQL)
        .bind(column(|r| r.key.clone()))
        .bind(column(|r| r.sku.clone()))
        .bind(chunk.iter().map(|r| r.qty).collect::<Vec<_>>())
        .bind(column(|r| r.location.clone()))
        .bind(chunk.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(column(|r| r.fingerprint.clone()))
        .bind(column(|r| r.canonical.clone()))
        .bind(USER)
        .bind(now)
        .bind(now + TTL)
        .execute(&mut *conn)
        .await
        .expect("posting a chunk");
    done.rows_affected() as usize
}

/// Deletes expired keys in batches of `batch`, each its own transaction, choosing every batch
/// through the expiry index; returns the number deleted and the longest batch.
pub async fn delete_expired(
    conn: &mut Loop,
    now: DateTime<Utc>,
    batch: i64,
) -> (u64, std::time::Duration) {
    let mut removed = 0;
    let mut longest = std::time::Duration::ZERO;
    loop {
        let started = std::time::Instant::now();
        let deleted = match conn {
            Loop::Sqlite(conn) => {
                // The durability `wmsctl keys cleanup` commits its batches with.
                sqlx::raw_sql("PRAGMA synchronous = NORMAL").execute(&mut *conn).await.unwrap();
                let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                let done = sqlx::query(
                    "DELETE FROM idem_keys WHERE (user_name, idem_key) IN ( \
                       SELECT user_name, idem_key FROM idem_keys WHERE expires_at <= ?1 \
                       ORDER BY expires_at LIMIT ?2)",
                )
                .bind(now.timestamp_micros())
                .bind(batch)
                .execute(&mut *tx)
                .await
                .expect("deleting expired keys");
                tx.commit().await.expect("commit");
                done.rows_affected()
            }
            Loop::Postgres(conn) => sqlx::query(
                "DELETE FROM idem_keys WHERE ctid = ANY(ARRAY( \
                   SELECT ctid FROM idem_keys WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2))",
            )
            .bind(now)
            .bind(batch)
            .execute(&mut *conn)
            .await
            .expect("deleting expired keys")
            .rows_affected(),
        };
        if deleted > 0 {
            longest = longest.max(started.elapsed());
        }
        removed += deleted;
        if deleted < batch as u64 {
            return (removed, longest);
        }
    }
}
