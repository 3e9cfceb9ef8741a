//! The SQLite store: SQL and error mapping only. Write transactions begin `IMMEDIATE` so that a
//! concurrent writer waits for the lock instead of failing on upgrade; times are microseconds
//! since the epoch so that they compare correctly in SQL.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use uuid::Uuid;

use crate::audit::{AuditAction, AuditEntry, AuditFilter, NewAudit};
use crate::error::{Cause, Error, Result, db_cause};
use crate::key::{IdemKey, Operator};
use crate::ledger::{StockDifference, StockFilter, StockLevel, Transaction, TransactionFilter};
use crate::posting::{self, Claim, Finish, KeyInsert, KeyRecord, NewKey, Posted, Posting, WriteTx};
use crate::request::fingerprint;
use crate::retry::Retry;
use crate::store::{KeyFilter, SchemaStatus, StoreOptions};

mod batch;
mod maintenance;

/// Rows SQLite's thread may read ahead of the task that takes them. A batch reads up to 500 key
/// rows at once; with sqlx's default of 50 the two threads took turns every few rows (a re-run
/// of 100,000 lines: 25,000-29,000 context switches, 17,000-21,000 with this; its time moved
/// by 2%, inside the noise).
const ROW_BUFFER: usize = 1024;

static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// A SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The connection single postings are written on, and `keys exists` looks up on when it is
    /// free: the one the schema check opened with (or, after a database error dropped it, taken
    /// from the pool by the next posting), kept until [`close`](Self::close) or the next
    /// database error. SQLite lets one writer in at a time anyway, and a kept connection spares
    /// every posting a trip through the pool (which pings each connection that comes back) and
    /// keeps its pages in one cache.
    writer: Arc<tokio::sync::Mutex<Option<SqliteConnection>>>,
    path: PathBuf,
    busy_budget: Duration,
}

pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn parse_uuid(raw: Option<String>) -> Result<Option<Uuid>, sqlx::Error> {
    raw.map(|s| Uuid::parse_str(&s).map_err(|e| sqlx::Error::Decode(Box::new(e)))).transpose()
}

/// Translates a SQLite error into the library's terms.
fn map_err<'p>(during: &'static str, path: &'p Path) -> impl Fn(sqlx::Error) -> Error + 'p {
    move |err| {
        let code = match &err {
            sqlx::Error::Database(db) => {
                db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0) & 0xff
            }
            sqlx::Error::PoolTimedOut => 5,
            _ => -1,
        };
        let source: Cause = db_cause(err);
        match code {
            5 | 6 => Error::Busy { waited: Duration::ZERO, source: Some(source) },
            3 | 8 | 23 => Error::PermissionDenied {
                source: format!(
                    "cannot write {}; check that this user may write the file and its directory: \
                     {source}",
                    path.display()
                )
                .into(),
            },
            13 => Error::StorageFull { source },
            11 | 26 => {
                Error::NotADatabase { path: path.display().to_string(), source: Some(source) }
            }
            14 => Error::Unavailable { target: path.display().to_string(), source },
            _ => Error::Database { during, source },
        }
    }
}

fn io_err<'p>(path: &'p Path, during: &'static str) -> impl Fn(std::io::Error) -> Error + 'p {
    move |err| match err.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            Error::PermissionDenied { source: format!("{}: {err}", path.display()).into() }
        }
        _ => Error::Unavailable {
            target: path.display().to_string(),
            source: format!("{during}: {err}").into(),
        },
    }
}

/// Creates the directory (owner-only) and the file (owner-only) if they do not exist, so that
/// SQLite never creates them with the process umask.
fn prepare_file(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir, "creating the database directory"))?;
    }
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(path, "creating the database file")(e)),
    }
}

/// Refuses a file that is not a wmsctl database before anything is written to it: switching a
/// file to WAL mode rewrites its header, and migrating would add our tables to another program's
/// data. An empty file is a new database; a file already in WAL mode is checked after opening,
/// by [`SqliteStore::ensure_schema`], since opening it changes nothing. Returns whether the
/// file is in WAL mode already.
async fn inspect_file(path: &Path) -> Result<bool> {
    let mut header = [0u8; 100];
    let read = {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(io_err(path, "reading the database"))?;
        file.read(&mut header).map_err(io_err(path, "reading the database"))?
    };
    if read == 0 {
        return Ok(false);
    }
    if read < header.len() || !header.starts_with(b"SQLite format 3\0") {
        return Err(Error::NotADatabase {
            path: path.display().to_string(),
            source: Some("it is not a SQLite database file".into()),
        });
    }
    // Bytes 18 and 19 are 2 in WAL mode, which every wmsctl database is after its first use.
    if header[18] == 2 {
        return Ok(true);
    }
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(map_err("reading the database", path))?;
    let refused = refuse_foreign_tables(&mut conn, path).await;
    conn.close().await.ok();
    refused.map(|()| false)
}

/// A file with tables but no wmsctl schema belongs to some other program.
async fn refuse_foreign_tables<'c, E>(executor: E, path: &Path) -> Result<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let foreign: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' \
         ESCAPE '\\' AND name <> '_sqlx_migrations' \
         AND NOT EXISTS (SELECT 1 FROM sqlite_master WHERE name = '_sqlx_migrations') LIMIT 1",
    )
    .fetch_optional(executor)
    .await
    .map_err(map_err("reading the schema", path))?;
    match foreign {
        Some(table) => Err(Error::NotADatabase {
            path: path.display().to_string(),
            source: Some(
                format!("it holds table {table:?} of another program and no wmsctl schema").into(),
            ),
        }),
        None => Ok(()),
    }
}

/// An exclusive lock on a file beside the database, held until dropped.
pub(crate) fn lock_beside(path: &Path, suffix: &str, wait: bool) -> Result<Option<std::fs::File>> {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    let lock_path = PathBuf::from(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path, "opening a lock file"))?;
    if wait {
        file.lock().map_err(io_err(&lock_path, "taking a lock"))?;
        Ok(Some(file))
    } else {
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&lock_path, "taking a lock")(e)),
        }
    }
}

impl SqliteStore {
    pub(crate) async fn open(path: &Path, options: &StoreOptions) -> Result<Self> {
        prepare_file(path)?;
        let in_wal_mode = inspect_file(path).await?;
        let mut connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(options.busy_budget.min(Duration::from_secs(2)))
            .foreign_keys(true)
            .row_buffer_size(ROW_BUFFER);
        // WAL mode is kept in the file: a file in it already needs no statement to say so.
        if !in_wal_mode {
            connect = connect.journal_mode(SqliteJournalMode::Wal);
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(options.busy_budget.max(Duration::from_secs(1)))
            // A SQLite connection lives in this process and cannot go stale: no ping before use.
            .test_before_acquire(false)
            // Opened by its first use, the schema check below, rather than opened, handed back
            // (a round trip to SQLite's thread, which the pool makes for every connection
            // given back) and taken again.
            .connect_lazy_with(connect);
        let store = SqliteStore {
            pool,
            writer: Arc::default(),
            path: path.to_owned(),
            busy_budget: options.busy_budget,
        };
        store.ensure_schema().await?;
        Ok(store)
    }

    fn map<'s>(&'s self, during: &'static str) -> impl Fn(sqlx::Error) -> Error + 's {
        map_err(during, &self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying pool, for callers that run their own transactions with [`claim`].
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The migrations applied to the file. Every command opens with this, so it asks one
    /// question when the file has a schema, and only when that fails whether the migrations
    /// table exists at all (a new file has none). If it does, another process has just made it
    /// (several processes can start on a new file at once), or it cannot be read: the question
    /// is asked again, and a second failure is the answer.
    async fn applied_versions(&self) -> Result<Vec<i64>> {
        let mut conn = self.pool.acquire().await.map_err(self.map("opening the database"))?;
        self.applied_versions_on(&mut conn).await
    }

    async fn applied_versions_on(&self, conn: &mut SqliteConnection) -> Result<Vec<i64>> {
        const VERSIONS: &str =
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";
        if let Ok(versions) = sqlx::query_scalar(VERSIONS).fetch_all(&mut *conn).await {
            return Ok(versions);
        }
        let exists: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(self.map("reading the schema version"))?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(VERSIONS)
            .fetch_all(&mut *conn)
            .await
            .map_err(self.map("reading the schema version"))
    }

    /// Migrates a new or older file on first use. Several processes may start at once on a fresh
    /// file; the migrator takes no lock on SQLite, so a lock file serializes them.
    ///
    /// The check's connection is then kept as the one single postings and lookups run on (see
    /// `writer`): given back to the pool, it would cost a round trip to SQLite's thread (the
    /// pool pings every connection given back), and the command's own statement would take it
    /// straight out again.
    async fn ensure_schema(&self) -> Result<()> {
        let mut conn =
            self.pool.acquire().await.map_err(self.map("opening the database"))?.detach();
        let applied = self.applied_versions_on(&mut conn).await?;
        *self.writer.lock().await = Some(conn);
        let status = schema_status(&MIGRATOR, applied)?;
        if status.pending() == 0 {
            return Ok(());
        }
        if status.migrations.iter().all(|(_, _, applied)| !applied) {
            refuse_foreign_tables(&self.pool, &self.path).await?;
        }
        self.migrate(&Operator::parse("wmsctl").expect("valid operator")).await?;
        Ok(())
    }

    pub(crate) async fn schema_status(&self) -> Result<SchemaStatus> {
        schema_status(&MIGRATOR, self.applied_versions().await?)
    }

    pub(crate) async fn migrate(&self, actor: &Operator) -> Result<Vec<i64>> {
        let path = self.path.clone();
        let _lock = tokio::task::spawn_blocking(move || lock_beside(&path, "-migrate.lock", true))
            .await
            .map_err(|e| Error::Database { during: "migrating", source: Box::new(e) })??;
        let before = self.applied_versions().await?;
        schema_status(&MIGRATOR, before.clone())?;
        MIGRATOR.run(&self.pool).await.map_err(|e| migrate_err(e, &self.path))?;
        let applied: Vec<i64> =
            MIGRATOR.iter().map(|m| m.version).filter(|v| !before.contains(v)).collect();
        if !applied.is_empty() {
            let mut conn = self.pool.acquire().await.map_err(self.map("migrating"))?;
            SqliteWrite(&mut conn)
                .insert_audit(&NewAudit {
                    at: Utc::now(),
                    action: AuditAction::Migrate,
                    actor: actor.as_str(),
                    key: None,
                    transaction_id: None,
                    detail: &format!("applied migration(s) {applied:?}"),
                })
                .await?;
        }
        Ok(applied)
    }

    pub(crate) async fn post_at(&self, posting: &Posting, now: DateTime<Utc>) -> Result<Posted> {
        let mut retry = Retry::new(self.busy_budget);
        loop {
            match self.post_once(posting, now).await {
                Err(err) => retry.pause(err).await?,
                done => return done,
            }
        }
    }

    async fn post_once(&self, posting: &Posting, now: DateTime<Utc>) -> Result<Posted> {
        let mut writer = self.writer.lock().await;
        if writer.is_none() {
            let conn = self.pool.acquire().await.map_err(self.map("connecting"))?;
            *writer = Some(conn.detach());
        }
        let conn = writer.as_mut().expect("the writer connection was just opened");
        match self.post_on(conn, posting, now).await {
            Ok(outcome) => outcome,
            Err(err) => {
                // The next posting starts from a fresh connection rather than from whatever
                // state a failed statement or commit left this one in.
                *writer = None;
                Err(err)
            }
        }
    }

    /// One attempt at a posting on `conn`: the outer error is the database's, the inner result
    /// the posting's own outcome.
    async fn post_on(
        &self,
        conn: &mut SqliteConnection,
        posting: &Posting,
        now: DateTime<Utc>,
    ) -> Result<Result<Posted>> {
        let mut tx =
            conn.begin_with("BEGIN IMMEDIATE").await.map_err(self.map("beginning a posting"))?;
        match posting::post_in(&mut SqliteWrite(&mut tx), posting, now).await? {
            Finish::Commit(result) => {
                tx.commit().await.map_err(self.map("committing a posting"))?;
                Ok(result)
            }
            Finish::Rollback(err) => {
                tx.rollback().await.map_err(self.map("rolling back a posting"))?;
                Ok(Err(err))
            }
        }
    }

    pub(crate) async fn stock(&self, filter: &StockFilter) -> Result<Vec<StockLevel>> {
        let rows = sqlx::query(
            "SELECT sku, location, on_hand FROM stock \
             WHERE (?1 IS NULL OR sku = ?1) AND (?2 IS NULL OR location = ?2) ORDER BY sku, location",
        )
        .bind(filter.sku.as_deref())
        .bind(filter.location.as_deref())
        .fetch_all(&self.pool)
        .await
        .map_err(self.map("reading stock"))?;
        rows.iter()
            .map(|r| {
                Ok(StockLevel {
                    sku: r.try_get(0)?,
                    location: r.try_get(1)?,
                    on_hand: r.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(self.map("reading stock"))
    }

    pub(crate) async fn verify_stock(&self) -> Result<Vec<StockDifference>> {
        let rows = sqlx::query(VERIFY_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(self.map("verifying stock"))?;
        rows.iter()
            .map(|r| {
                Ok(StockDifference {
                    sku: r.try_get(0)?,
                    location: r.try_get(1)?,
                    on_hand: r.try_get(2)?,
                    ledger_sum: r.try_get(3)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(self.map("verifying stock"))
    }

    pub(crate) async fn transactions(
        &self,
        filter: &TransactionFilter,
    ) -> Result<Vec<Transaction>> {
        let rows = sqlx::query(
            "SELECT id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at \
             FROM ledger \
             WHERE (?1 IS NULL OR sku = ?1) \
               AND (?2 IS NULL OR location = ?2 OR to_location = ?2) \
               AND (?3 IS NULL OR created_at >= ?3) \
             ORDER BY id DESC LIMIT ?4",
        )
        .bind(filter.sku.as_deref())
        .bind(filter.location.as_deref())
        .bind(filter.since.map(to_micros))
        .bind(filter.limit.map_or(-1, i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(self.map("reading the ledger"))?;
        rows.iter()
            .map(transaction_from_row)
            .collect::<Result<_, _>>()
            .map_err(self.map("reading the ledger"))
    }

    pub(crate) async fn transaction(&self, id: Uuid) -> Result<Option<Transaction>> {
        let mut conn = self.pool.acquire().await.map_err(self.map("connecting"))?;
        SqliteWrite(&mut conn).transaction(id).await
    }

    pub(crate) async fn key(&self, user: &str, key: &str) -> Result<Option<KeyRecord>> {
        let mut conn = self.pool.acquire().await.map_err(self.map("connecting"))?;
        SqliteWrite(&mut conn).lock_key(user, key).await
    }

    pub(crate) async fn key_is_live(
        &self,
        user: &str,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let lookup = || {
            sqlx::query_scalar::<_, i64>(
                "SELECT 1 FROM idem_keys WHERE user_name = ?1 AND idem_key = ?2 AND expires_at > ?3",
            )
            .bind(user)
            .bind(key)
            .bind(to_micros(now))
        };
        // On the kept connection when nobody is posting on it (see `writer`), else on the pool.
        if let Ok(mut kept) = self.writer.try_lock()
            && let Some(conn) = kept.as_mut()
        {
            return match lookup().fetch_optional(&mut *conn).await {
                Ok(live) => Ok(live.is_some()),
                Err(err) => {
                    *kept = None;
                    Err(self.map("looking up a key")(err))
                }
            };
        }
        let live =
            lookup().fetch_optional(&self.pool).await.map_err(self.map("looking up a key"))?;
        Ok(live.is_some())
    }

    pub(crate) async fn keys(
        &self,
        filter: &KeyFilter,
        now: DateTime<Utc>,
    ) -> Result<Vec<KeyRecord>> {
        let rows = sqlx::query(
            "SELECT user_name, idem_key, kind, fingerprint, canonical, transaction_id, result, \
                    created_at, expires_at, replay_count, last_replay_at \
             FROM idem_keys \
             WHERE (?1 IS NULL OR user_name = ?1) \
               AND (?2 = 0 OR expires_at <= ?3) \
               AND (?4 IS NULL OR created_at >= ?4) \
             ORDER BY created_at DESC, idem_key LIMIT ?5",
        )
        .bind(filter.user.as_deref())
        .bind(filter.expired_only)
        .bind(to_micros(now))
        .bind(filter.since.map(to_micros))
        .bind(filter.limit.map_or(-1, i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(self.map("listing keys"))?;
        rows.iter().map(key_from_row).collect::<Result<_, _>>().map_err(self.map("listing keys"))
    }

    pub(crate) async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, action, actor, idem_key, transaction_id, detail FROM audit_log \
             WHERE (?1 IS NULL OR action = ?1) AND (?2 IS NULL OR at >= ?2) \
             ORDER BY id DESC LIMIT ?3",
        )
        .bind(filter.action.map(|a| a.as_str()))
        .bind(filter.since.map(to_micros))
        .bind(filter.limit.map_or(-1, i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(self.map("reading the audit log"))?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at: from_micros(r.try_get(1)?),
                    action: r.try_get(2)?,
                    actor: r.try_get(3)?,
                    key: r.try_get(4)?,
                    transaction_id: parse_uuid(r.try_get(5)?)?,
                    detail: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(self.map("reading the audit log"))
    }

    pub(crate) async fn close(&self) {
        if let Some(writer) = self.writer.lock().await.take() {
            writer.close().await.ok();
        }
        self.pool.close().await;
    }
}

/// Migration failures, with a database written by a newer build told apart from the rest.
fn migrate_err(err: sqlx::migrate::MigrateError, path: &Path) -> Error {
    use sqlx::migrate::MigrateError;
    match err {
        MigrateError::VersionMissing(found) => Error::SchemaTooNew {
            found,
            known: MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0),
        },
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
            map_err("migrating", path)(e)
        }
        other => Error::Database { during: "migrating", source: Box::new(other) },
    }
}

/// Compares applied versions with the migrations this build carries.
pub(crate) fn schema_status(migrator: &Migrator, applied: Vec<i64>) -> Result<SchemaStatus> {
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some(&found) = applied.iter().find(|v| !migrator.version_exists(**v)) {
        return Err(Error::SchemaTooNew { found, known });
    }
    Ok(SchemaStatus {
        migrations: migrator
            .iter()
            .map(|m| (m.version, m.description.to_string(), applied.contains(&m.version)))
            .collect(),
    })
}

/// Stock recomputed from the ledger, compared with the stock table.
pub(crate) const VERIFY_SQL: &str = "\
WITH moves AS (
    SELECT sku, location, CASE WHEN kind IN ('ship', 'transfer') THEN -qty ELSE qty END AS delta FROM ledger
    UNION ALL
    SELECT sku, to_location, qty FROM ledger WHERE kind = 'transfer'
), sums AS (
    SELECT sku, location, SUM(delta) AS total FROM moves GROUP BY sku, location
)
SELECT COALESCE(s.sku, m.sku), COALESCE(s.location, m.location),
       CAST(COALESCE(s.on_hand, 0) AS BIGINT), CAST(COALESCE(m.total, 0) AS BIGINT)
FROM stock s FULL OUTER JOIN sums m ON s.sku = m.sku AND s.location = m.location
WHERE COALESCE(s.on_hand, 0) <> COALESCE(m.total, 0)
ORDER BY 1, 2";

fn key_from_row(r: &SqliteRow) -> Result<KeyRecord, sqlx::Error> {
    Ok(KeyRecord {
        user: r.try_get(0)?,
        key: r.try_get(1)?,
        kind: r.try_get(2)?,
        fingerprint: r.try_get(3)?,
        canonical: r.try_get(4)?,
        transaction_id: parse_uuid(r.try_get(5)?)?,
        result: r.try_get(6)?,
        created_at: from_micros(r.try_get(7)?),
        expires_at: from_micros(r.try_get(8)?),
        replay_count: r.try_get(9)?,
        last_replay_at: r.try_get::<Option<i64>, _>(10)?.map(from_micros),
    })
}

fn transaction_from_row(r: &SqliteRow) -> Result<Transaction, sqlx::Error> {
    transaction_from_columns(r, 0)
}

/// A transaction from the eleven ledger columns of `r` that start at column `first`.
fn transaction_from_columns(r: &SqliteRow, first: usize) -> Result<Transaction, sqlx::Error> {
    let kind: String = r.try_get(first + 1)?;
    Ok(Transaction {
        id: parse_uuid(Some(r.try_get(first)?))?.unwrap_or_default(),
        kind: kind.parse().map_err(|e: Error| sqlx::Error::Decode(Box::new(e)))?,
        sku: r.try_get(first + 2)?,
        qty: r.try_get(first + 3)?,
        location: r.try_get(first + 4)?,
        to_location: r.try_get(first + 5)?,
        reference: r.try_get(first + 6)?,
        reason: r.try_get(first + 7)?,
        user: r.try_get(first + 8)?,
        key: r.try_get(first + 9)?,
        created_at: from_micros(r.try_get(first + 10)?),
    })
}

/// The posting statements on an open SQLite connection (inside `BEGIN IMMEDIATE`).
pub(crate) struct SqliteWrite<'c>(pub(crate) &'c mut SqliteConnection);

fn db(during: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |err| map_err(during, Path::new("the database"))(err)
}

impl WriteTx for SqliteWrite<'_> {
    // The lookup names the new row rather than the parameters: SQLite marks a statement whose
    // plan could depend on a bound value for re-preparing whenever its bindings are cleared,
    // which sqlx does after every execution, so `= ?1` here would cost a full re-prepare of the
    // statement on every posting.
    async fn insert_key(&mut self, key: &NewKey<'_>) -> Result<KeyInsert> {
        let inserted: Option<Option<String>> = sqlx::query_scalar(
            "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (user_name, idem_key) DO NOTHING \
             RETURNING (SELECT l.id FROM ledger l \
                        WHERE l.user_name = idem_keys.user_name AND l.idem_key = idem_keys.idem_key \
                        ORDER BY l.id DESC LIMIT 1)",
        )
        .bind(key.user)
        .bind(key.key)
        .bind(key.kind)
        .bind(key.fingerprint)
        .bind(key.canonical)
        .bind(key.transaction_id.map(|id| id.to_string()))
        .bind(to_micros(key.created_at))
        .bind(to_micros(key.expires_at))
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db("claiming a key"))?;
        match inserted {
            Some(previous) => Ok(KeyInsert::Inserted {
                previous: parse_uuid(previous).map_err(db("claiming a key"))?,
            }),
            None => Ok(KeyInsert::Exists),
        }
    }

    async fn lock_key(&mut self, user: &str, key: &str) -> Result<Option<KeyRecord>> {
        let row = sqlx::query(
            "SELECT user_name, idem_key, kind, fingerprint, canonical, transaction_id, result, \
                    created_at, expires_at, replay_count, last_replay_at \
             FROM idem_keys WHERE user_name = ?1 AND idem_key = ?2",
        )
        .bind(user)
        .bind(key)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db("reading a key"))?;
        row.as_ref().map(key_from_row).transpose().map_err(db("reading a key"))
    }

    async fn replace_key(&mut self, key: &NewKey<'_>) -> Result<()> {
        sqlx::query(
            "UPDATE idem_keys SET kind = ?3, fingerprint = ?4, canonical = ?5, transaction_id = ?6, result = NULL, \
                    created_at = ?7, expires_at = ?8, replay_count = 0, last_replay_at = NULL \
             WHERE user_name = ?1 AND idem_key = ?2",
        )
        .bind(key.user)
        .bind(key.key)
        .bind(key.kind)
        .bind(key.fingerprint)
        .bind(key.canonical)
        .bind(key.transaction_id.map(|id| id.to_string()))
        .bind(to_micros(key.created_at))
        .bind(to_micros(key.expires_at))
        .execute(&mut *self.0)
        .await
        .map_err(db("claiming an expired key"))?;
        Ok(())
    }

    async fn record_replay(&mut self, user: &str, key: &str, at: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "UPDATE idem_keys SET replay_count = replay_count + 1, last_replay_at = ?3 \
             WHERE user_name = ?1 AND idem_key = ?2",
        )
        .bind(user)
        .bind(key)
        .bind(to_micros(at))
        .execute(&mut *self.0)
        .await
        .map_err(db("recording a replay"))?;
        Ok(())
    }

    async fn complete_key(
        &mut self,
        user: &str,
        key: &str,
        transaction_id: Option<Uuid>,
        result: &str,
    ) -> Result<()> {
        sqlx::query("UPDATE idem_keys SET transaction_id = ?3, result = ?4 WHERE user_name = ?1 AND idem_key = ?2")
            .bind(user)
            .bind(key)
            .bind(transaction_id.map(|id| id.to_string()))
            .bind(result)
            .execute(&mut *self.0)
            .await
            .map_err(db("storing a result"))?;
        Ok(())
    }

    async fn last_transaction_for_key(&mut self, user: &str, key: &str) -> Result<Option<Uuid>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM ledger WHERE user_name = ?1 AND idem_key = ?2 ORDER BY id DESC LIMIT 1",
        )
        .bind(user)
        .bind(key)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db("reading the ledger"))?;
        parse_uuid(id).map_err(db("reading the ledger"))
    }

    async fn move_stock(&mut self, sku: &str, location: &str, delta: i64) -> Result<Option<i64>> {
        let map = db("changing stock");
        if delta > 0 {
            sqlx::query(
                "INSERT INTO stock (sku, location, on_hand) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (sku, location) DO UPDATE SET on_hand = on_hand + excluded.on_hand",
            )
            .bind(sku)
            .bind(location)
            .bind(delta)
            .execute(&mut *self.0)
            .await
            .map_err(&map)?;
            return Ok(None);
        }
        let done = sqlx::query(
            "UPDATE stock SET on_hand = on_hand + ?3 WHERE sku = ?1 AND location = ?2 AND on_hand + ?3 >= 0",
        )
        .bind(sku)
        .bind(location)
        .bind(delta)
        .execute(&mut *self.0)
        .await
        .map_err(&map)?;
        if done.rows_affected() == 1 {
            return Ok(None);
        }
        let on_hand: Option<i64> =
            sqlx::query_scalar("SELECT on_hand FROM stock WHERE sku = ?1 AND location = ?2")
                .bind(sku)
                .bind(location)
                .fetch_optional(&mut *self.0)
                .await
                .map_err(&map)?;
        Ok(Some(on_hand.unwrap_or(0)))
    }

    async fn insert_transaction(&mut self, t: &Transaction) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger (id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(t.id.to_string())
        .bind(t.kind.as_str())
        .bind(&t.sku)
        .bind(t.qty)
        .bind(&t.location)
        .bind(t.to_location.as_deref())
        .bind(t.reference.as_deref())
        .bind(t.reason.as_deref())
        .bind(&t.user)
        .bind(&t.key)
        .bind(to_micros(t.created_at))
        .execute(&mut *self.0)
        .await
        .map_err(db("writing the ledger"))?;
        Ok(())
    }

    async fn transaction(&mut self, id: Uuid) -> Result<Option<Transaction>> {
        let row = sqlx::query(
            "SELECT id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at \
             FROM ledger WHERE id = ?1",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *self.0)
        .await
        .map_err(db("reading the ledger"))?;
        row.as_ref().map(transaction_from_row).transpose().map_err(db("reading the ledger"))
    }

    async fn insert_audit(&mut self, e: &NewAudit<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, action, actor, idem_key, transaction_id, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(to_micros(e.at))
        .bind(e.action.as_str())
        .bind(e.actor)
        .bind(e.key)
        .bind(e.transaction_id.map(|id| id.to_string()))
        .bind(e.detail)
        .execute(&mut *self.0)
        .await
        .map_err(db("writing the audit log"))?;
        Ok(())
    }
}

/// Claims `key` for `canonical` inside the caller's own SQLite transaction (begun with
/// `BEGIN IMMEDIATE`), so that other code can make its own writes exactly once. On
/// [`Claim::Fresh`] the caller does its work, calls [`complete`] and commits; on
/// [`Claim::Live`] it compares the stored fingerprint with its own and returns the stored
/// result instead.
pub async fn claim(
    conn: &mut SqliteConnection,
    user: &Operator,
    key: &IdemKey,
    kind: &str,
    canonical: &str,
    ttl: TimeDelta,
) -> Result<Claim> {
    let now = Utc::now();
    let fingerprint = fingerprint(canonical);
    let new = NewKey {
        user: user.as_str(),
        key: key.as_str(),
        kind,
        fingerprint: &fingerprint,
        canonical,
        transaction_id: None,
        created_at: now,
        expires_at: now + ttl,
    };
    posting::claim(&mut SqliteWrite(conn), &new, now).await
}

/// Stores the result of a claimed key, in the same transaction as [`claim`].
pub async fn complete(
    conn: &mut SqliteConnection,
    user: &Operator,
    key: &IdemKey,
    result: &str,
) -> Result<()> {
    SqliteWrite(conn).complete_key(user.as_str(), key.as_str(), None, result).await
}
