//! The PostgreSQL store: SQL and error mapping only. Keys are claimed at READ COMMITTED with an
//! insert that does nothing on conflict, so a concurrent duplicate waits for the first posting
//! to finish and then sees it; serialization failures and deadlocks retry the whole transaction.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use uuid::Uuid;

use crate::audit::{AuditAction, AuditEntry, AuditFilter, NewAudit};
use crate::error::{Cause, Error, Result, db_cause};
use crate::key::{IdemKey, Operator};
use crate::ledger::{StockDifference, StockFilter, StockLevel, Transaction, TransactionFilter};
use crate::posting::{self, Claim, Finish, KeyInsert, KeyRecord, NewKey, Posted, Posting, WriteTx};
use crate::request::fingerprint;
use crate::retry::Retry;
use crate::store::sqlite::{VERIFY_SQL, schema_status};
use crate::store::{KeyFilter, SchemaStatus, StoreOptions, redact_url};

mod batch;

pub(crate) use batch::FreshPlan;
mod maintenance;
mod roles;

static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");

/// A PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    busy_budget: Duration,
    /// Whether the next batch should be tried as one of keys never used before (see
    /// [`batch`]): true until a batch finds otherwise, and again once a batch's read finds
    /// none of its keys. Shared by the store's clones; only ever a guess, never trusted.
    fresh_keys_likely: Arc<AtomicBool>,
    /// The connection single postings are written on when no other posting of this store is
    /// using it, with when it was last used: taken out of the pool by the first posting and
    /// kept until [`close`](Self::close) or the posting's next database error. The pool pings
    /// every connection given back to it, a round trip per posting that a kept connection
    /// spares. Other work still goes through the pool, so a store used for both holds one
    /// connection more than `max_connections`.
    kept: Arc<tokio::sync::Mutex<Option<(PgConnection, Instant)>>>,
}

/// Translates a PostgreSQL error into the library's terms.
pub(crate) fn map_err(during: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |err| {
        let code = match &err {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()).unwrap_or_default(),
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
                "08000".to_owned()
            }
            sqlx::Error::PoolTimedOut => "55P03".to_owned(),
            _ => String::new(),
        };
        let source: Cause = db_cause(err);
        match code.as_str() {
            "40001" | "40P01" | "55P03" => {
                Error::Busy { waited: Duration::ZERO, source: Some(source) }
            }
            "42501" | "28000" | "28P01" => Error::PermissionDenied { source },
            "53100" => Error::StorageFull { source },
            c if c.starts_with("08") || c.starts_with("57P") => Error::ConnectionLost { source },
            _ => Error::Database { during, source },
        }
    }
}

/// How long the pool may take to open its first connection before a direct attempt checks
/// whether the server is there at all.
const DIRECT_ATTEMPT_AFTER: Duration = Duration::from_millis(100);

/// A connection idle for this long is pinged before it is handed out, since the server or a
/// proxy may have closed it meanwhile; one in steady use is not, which saves a round trip per
/// posting.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The versions of the applied migrations, in one round trip (the simple protocol needs no
/// separate prepare); a database never migrated has no migrations table.
async fn applied_versions(conn: &mut PgConnection) -> Result<Vec<i64>> {
    let during = "reading the schema version";
    match sqlx::raw_sql("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err(during)),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        Err(e) => Err(map_err(during)(e)),
    }
}

/// A failed commit over a broken connection may or may not have been applied.
fn commit_err(err: sqlx::Error) -> Error {
    match map_err("committing a posting")(err) {
        Error::ConnectionLost { source } => Error::OutcomeUnknown { source },
        other => other,
    }
}

/// Which migration the database refused, and what the operator-isolation migration needs.
fn migration_denied(version: i64, source: Cause) -> Cause {
    let hint = if version == 2 {
        "; it creates the group roles wms_operator and wms_admin unless they exist, which needs \
         CREATEROLE: grant that, or have a superuser create the two roles first \
         (see docs/operators.md)"
    } else {
        ""
    };
    format!("migration {version}: {source}{hint}").into()
}

fn connect_err(url: &str, err: sqlx::Error) -> Error {
    let target = redact_url(url);
    match &err {
        sqlx::Error::Configuration(_) => {
            Error::Config { message: format!("bad PostgreSQL URL {target}: {err}") }
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => Error::Config {
            message: format!("database in {target} does not exist: {}", db.message()),
        },
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c.starts_with("28") || c == "42501") =>
        {
            Error::PermissionDenied { source: db_cause(err) }
        }
        _ => Error::Unavailable { target, source: db_cause(err) },
    }
}

impl PgStore {
    pub(crate) async fn connect(
        url: &str,
        options: &StoreOptions,
        check_schema: bool,
    ) -> Result<Self> {
        let connect = PgConnectOptions::from_str(url).map_err(|e| connect_err(url, e))?;
        // No JIT compilation: every statement here touches a few rows through an index, yet one
        // planned from the statistics of a table that grew during an import can look expensive
        // enough to compile, which took 100-150 ms per chunk of a re-run for nothing.
        let connect = connect.application_name("wmsctl").options([("jit", "off")]);
        let deadline = tokio::time::Instant::now() + options.connect_timeout;
        let no_answer = || Error::Unavailable {
            target: redact_url(url),
            source: format!("no answer within {:?}", options.connect_timeout).into(),
        };
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(options.connect_timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    Ok(meta.idle_for < PING_IF_IDLE_FOR || conn.ping().await.is_ok())
                })
            })
            .connect_lazy_with(connect.clone());

        // The pool opens the first connection and keeps it: one connection per command. The
        // pool retries a refused connection until its timeout, as if the server were starting
        // up; so when it is slow to connect, a direct attempt finds out whether the server is
        // down at all, and fails at once with the real cause.
        let first = pool.acquire();
        tokio::pin!(first);
        let first = match tokio::time::timeout(DIRECT_ATTEMPT_AFTER, &mut first).await {
            Ok(first) => first,
            Err(_) => {
                match tokio::time::timeout_at(deadline, PgConnection::connect_with(&connect)).await
                {
                    Err(_) => return Err(no_answer()),
                    Ok(Err(e)) => return Err(connect_err(url, e)),
                    Ok(Ok(direct)) => direct.close_hard().await.ok(),
                };
                tokio::time::timeout_at(deadline, first).await.map_err(|_| no_answer())?
            }
        };
        let mut first = first.map_err(|e| connect_err(url, e))?;
        if check_schema {
            let status = schema_status(&MIGRATOR, applied_versions(&mut first).await?)?;
            if status.pending() > 0 {
                return Err(Error::SchemaOutOfDate { pending: status.pending() });
            }
        }
        drop(first);
        Ok(PgStore {
            pool,
            busy_budget: options.busy_budget,
            fresh_keys_likely: Arc::new(AtomicBool::new(true)),
            kept: Arc::default(),
        })
    }

    /// The underlying pool, for callers that run their own transactions with [`claim`].
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn applied_versions(&self) -> Result<Vec<i64>> {
        let mut conn = self.pool.acquire().await.map_err(map_err("connecting"))?;
        applied_versions(&mut conn).await
    }

    pub(crate) async fn schema_status(&self) -> Result<SchemaStatus> {
        schema_status(&MIGRATOR, self.applied_versions().await?)
    }

    pub(crate) async fn migrate(&self, actor: &Operator) -> Result<Vec<i64>> {
        let before = self.applied_versions().await?;
        schema_status(&MIGRATOR, before.clone())?;
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(found) => Error::SchemaTooNew {
                found,
                known: MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0),
            },
            sqlx::migrate::MigrateError::Execute(e) => map_err("migrating")(e),
            sqlx::migrate::MigrateError::ExecuteMigration(e, version) => {
                match map_err("migrating")(e) {
                    Error::PermissionDenied { source } => {
                        Error::PermissionDenied { source: migration_denied(version, source) }
                    }
                    other => other,
                }
            }
            other => Error::Database { during: "migrating", source: Box::new(other) },
        })?;
        let applied: Vec<i64> =
            MIGRATOR.iter().map(|m| m.version).filter(|v| !before.contains(v)).collect();
        if !applied.is_empty() {
            let mut conn = self.pool.acquire().await.map_err(map_err("migrating"))?;
            PgWrite(&mut conn)
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
        let Ok(mut kept) = self.kept.try_lock() else {
            // Another posting of this store is on the kept connection: this one takes its own.
            let mut conn = self.pool.acquire().await.map_err(map_err("connecting"))?;
            return post_on(&mut conn, posting, now).await?;
        };
        let reusable = match kept.take() {
            Some((conn, used)) if used.elapsed() < PING_IF_IDLE_FOR => Some(conn),
            // Idle a while: the server or a proxy may have closed it meanwhile.
            Some((mut conn, _)) => conn.ping().await.is_ok().then_some(conn),
            None => None,
        };
        let mut conn = match reusable {
            Some(conn) => conn,
            None => self.pool.acquire().await.map_err(map_err("connecting"))?.detach(),
        };
        // After a database error the connection is dropped: the next posting starts from a
        // fresh one rather than from whatever state the failure left this one in.
        let outcome = post_on(&mut conn, posting, now).await?;
        *kept = Some((conn, Instant::now()));
        outcome
    }

    pub(crate) async fn stock(&self, filter: &StockFilter) -> Result<Vec<StockLevel>> {
        let rows = sqlx::query(
            "SELECT sku, location, on_hand FROM stock \
             WHERE ($1::text IS NULL OR sku = $1) AND ($2::text IS NULL OR location = $2) ORDER BY sku, location",
        )
        .bind(filter.sku.as_deref())
        .bind(filter.location.as_deref())
        .fetch_all(&self.pool)
        .await
        .map_err(map_err("reading stock"))?;
        rows.iter()
            .map(|r| {
                Ok(StockLevel {
                    sku: r.try_get(0)?,
                    location: r.try_get(1)?,
                    on_hand: r.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err("reading stock"))
    }

    pub(crate) async fn verify_stock(&self) -> Result<Vec<StockDifference>> {
        let rows = sqlx::query(VERIFY_SQL)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err("verifying stock"))?;
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
            .map_err(map_err("verifying stock"))
    }

    pub(crate) async fn transactions(
        &self,
        filter: &TransactionFilter,
    ) -> Result<Vec<Transaction>> {
        let rows = sqlx::query(
            "SELECT id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at \
             FROM ledger \
             WHERE ($1::text IS NULL OR sku = $1) \
               AND ($2::text IS NULL OR location = $2 OR to_location = $2) \
               AND ($3::timestamptz IS NULL OR created_at >= $3) \
             ORDER BY id DESC LIMIT $4",
        )
        .bind(filter.sku.as_deref())
        .bind(filter.location.as_deref())
        .bind(filter.since)
        .bind(filter.limit.map(i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err("reading the ledger"))?;
        rows.iter()
            .map(transaction_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err("reading the ledger"))
    }

    pub(crate) async fn transaction(&self, id: Uuid) -> Result<Option<Transaction>> {
        let mut conn = self.pool.acquire().await.map_err(map_err("connecting"))?;
        PgWrite(&mut conn).transaction(id).await
    }

    pub(crate) async fn key(&self, user: &str, key: &str) -> Result<Option<KeyRecord>> {
        let row = sqlx::query(concat!(key_select!(), " WHERE user_name = $1 AND idem_key = $2"))
            .bind(user)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err("reading a key"))?;
        row.as_ref().map(key_from_row).transpose().map_err(map_err("reading a key"))
    }

    pub(crate) async fn key_is_live(
        &self,
        user: &str,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let live: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM idem_keys WHERE user_name = $1 AND idem_key = $2 AND expires_at > $3",
        )
        .bind(user)
        .bind(key)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err("looking up a key"))?;
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
             WHERE ($1::text IS NULL OR user_name = $1) \
               AND (NOT $2 OR expires_at <= $3) \
               AND ($4::timestamptz IS NULL OR created_at >= $4) \
             ORDER BY created_at DESC, idem_key LIMIT $5",
        )
        .bind(filter.user.as_deref())
        .bind(filter.expired_only)
        .bind(now)
        .bind(filter.since)
        .bind(filter.limit.map(i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err("listing keys"))?;
        rows.iter().map(key_from_row).collect::<Result<_, _>>().map_err(map_err("listing keys"))
    }

    pub(crate) async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, action, actor, idem_key, transaction_id, detail FROM audit_log \
             WHERE ($1::text IS NULL OR action = $1) AND ($2::timestamptz IS NULL OR at >= $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(filter.action.map(|a| a.as_str()))
        .bind(filter.since)
        .bind(filter.limit.map(i64::from))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err("reading the audit log"))?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    action: r.try_get(2)?,
                    actor: r.try_get(3)?,
                    key: r.try_get(4)?,
                    transaction_id: r.try_get(5)?,
                    detail: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err("reading the audit log"))
    }

    pub(crate) async fn close(&self) {
        if let Some((conn, _)) = self.kept.lock().await.take() {
            conn.close().await.ok();
        }
        self.pool.close().await;
    }
}

/// One attempt at a posting on `conn`: the outer error is the database's, the inner result the
/// posting's own outcome.
async fn post_on(
    conn: &mut PgConnection,
    posting: &Posting,
    now: DateTime<Utc>,
) -> Result<Result<Posted>> {
    let mut tx = conn.begin().await.map_err(map_err("beginning a posting"))?;
    match posting::post_in(&mut PgWrite(&mut tx), posting, now).await? {
        Finish::Commit(result) => {
            tx.commit().await.map_err(commit_err)?;
            Ok(result)
        }
        Finish::Rollback(err) => {
            tx.rollback().await.map_err(map_err("rolling back a posting"))?;
            Ok(Err(err))
        }
    }
}

macro_rules! key_select {
    () => {
        "SELECT user_name, idem_key, kind, fingerprint, canonical, transaction_id, result, \
         created_at, expires_at, replay_count, last_replay_at FROM idem_keys"
    };
}
use key_select;

fn key_from_row(r: &PgRow) -> Result<KeyRecord, sqlx::Error> {
    Ok(KeyRecord {
        user: r.try_get(0)?,
        key: r.try_get(1)?,
        kind: r.try_get(2)?,
        fingerprint: r.try_get(3)?,
        canonical: r.try_get(4)?,
        transaction_id: r.try_get(5)?,
        result: r.try_get(6)?,
        created_at: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        replay_count: r.try_get(9)?,
        last_replay_at: r.try_get(10)?,
    })
}

fn transaction_from_row(r: &PgRow) -> Result<Transaction, sqlx::Error> {
    transaction_from_columns(r, 0)
}

/// A transaction from the eleven ledger columns of `r` that start at column `first`.
fn transaction_from_columns(r: &PgRow, first: usize) -> Result<Transaction, sqlx::Error> {
    let kind: String = r.try_get(first + 1)?;
    Ok(Transaction {
        id: r.try_get(first)?,
        kind: kind.parse().map_err(|e: Error| sqlx::Error::Decode(Box::new(e)))?,
        sku: r.try_get(first + 2)?,
        qty: r.try_get(first + 3)?,
        location: r.try_get(first + 4)?,
        to_location: r.try_get(first + 5)?,
        reference: r.try_get(first + 6)?,
        reason: r.try_get(first + 7)?,
        user: r.try_get(first + 8)?,
        key: r.try_get(first + 9)?,
        created_at: r.try_get(first + 10)?,
    })
}

/// The posting statements on an open PostgreSQL transaction (READ COMMITTED).
pub(crate) struct PgWrite<'c>(pub(crate) &'c mut PgConnection);

impl WriteTx for PgWrite<'_> {
    async fn insert_key(&mut self, key: &NewKey<'_>) -> Result<KeyInsert> {
        let inserted: Option<Option<Uuid>> = sqlx::query_scalar(
            "INSERT INTO idem_keys (user_name, idem_key, kind, fingerprint, canonical, transaction_id, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (user_name, idem_key) DO NOTHING \
             RETURNING (SELECT l.id FROM ledger l \
                        WHERE l.user_name = idem_keys.user_name AND l.idem_key = idem_keys.idem_key \
                        ORDER BY l.id DESC LIMIT 1)",
        )
        .bind(key.user)
        .bind(key.key)
        .bind(key.kind)
        .bind(key.fingerprint)
        .bind(key.canonical)
        .bind(key.transaction_id)
        .bind(key.created_at)
        .bind(key.expires_at)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(map_err("claiming a key"))?;
        Ok(match inserted {
            Some(previous) => KeyInsert::Inserted { previous },
            None => KeyInsert::Exists,
        })
    }

    async fn lock_key(&mut self, user: &str, key: &str) -> Result<Option<KeyRecord>> {
        let row = sqlx::query(concat!(
            key_select!(),
            " WHERE user_name = $1 AND idem_key = $2 FOR UPDATE"
        ))
        .bind(user)
        .bind(key)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(map_err("reading a key"))?;
        row.as_ref().map(key_from_row).transpose().map_err(map_err("reading a key"))
    }

    async fn replace_key(&mut self, key: &NewKey<'_>) -> Result<()> {
        sqlx::query(
            "UPDATE idem_keys SET kind = $3, fingerprint = $4, canonical = $5, transaction_id = $6, result = NULL, \
                    created_at = $7, expires_at = $8, replay_count = 0, last_replay_at = NULL \
             WHERE user_name = $1 AND idem_key = $2",
        )
        .bind(key.user)
        .bind(key.key)
        .bind(key.kind)
        .bind(key.fingerprint)
        .bind(key.canonical)
        .bind(key.transaction_id)
        .bind(key.created_at)
        .bind(key.expires_at)
        .execute(&mut *self.0)
        .await
        .map_err(map_err("claiming an expired key"))?;
        Ok(())
    }

    async fn record_replay(&mut self, user: &str, key: &str, at: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "UPDATE idem_keys SET replay_count = replay_count + 1, last_replay_at = $3 \
             WHERE user_name = $1 AND idem_key = $2",
        )
        .bind(user)
        .bind(key)
        .bind(at)
        .execute(&mut *self.0)
        .await
        .map_err(map_err("recording a replay"))?;
        Ok(())
    }

    async fn complete_key(
        &mut self,
        user: &str,
        key: &str,
        transaction_id: Option<Uuid>,
        result: &str,
    ) -> Result<()> {
        sqlx::query("UPDATE idem_keys SET transaction_id = $3, result = $4 WHERE user_name = $1 AND idem_key = $2")
            .bind(user)
            .bind(key)
            .bind(transaction_id)
            .bind(result)
            .execute(&mut *self.0)
            .await
            .map_err(map_err("storing a result"))?;
        Ok(())
    }

    async fn last_transaction_for_key(&mut self, user: &str, key: &str) -> Result<Option<Uuid>> {
        sqlx::query_scalar(
            "SELECT id FROM ledger WHERE user_name = $1 AND idem_key = $2 ORDER BY id DESC LIMIT 1",
        )
        .bind(user)
        .bind(key)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(map_err("reading the ledger"))
    }

    async fn move_stock(&mut self, sku: &str, location: &str, delta: i64) -> Result<Option<i64>> {
        let map = map_err("changing stock");
        if delta > 0 {
            sqlx::query(
                "INSERT INTO stock (sku, location, on_hand) VALUES ($1, $2, $3) \
                 ON CONFLICT (sku, location) DO UPDATE SET on_hand = stock.on_hand + excluded.on_hand",
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
            "UPDATE stock SET on_hand = on_hand + $3 WHERE sku = $1 AND location = $2 AND on_hand + $3 >= 0",
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
            sqlx::query_scalar("SELECT on_hand FROM stock WHERE sku = $1 AND location = $2")
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(t.id)
        .bind(t.kind.as_str())
        .bind(&t.sku)
        .bind(t.qty)
        .bind(&t.location)
        .bind(t.to_location.as_deref())
        .bind(t.reference.as_deref())
        .bind(t.reason.as_deref())
        .bind(&t.user)
        .bind(&t.key)
        .bind(t.created_at)
        .execute(&mut *self.0)
        .await
        .map_err(map_err("writing the ledger"))?;
        Ok(())
    }

    async fn transaction(&mut self, id: Uuid) -> Result<Option<Transaction>> {
        let row = sqlx::query(
            "SELECT id, kind, sku, qty, location, to_location, reference, reason, user_name, idem_key, created_at \
             FROM ledger WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *self.0)
        .await
        .map_err(map_err("reading the ledger"))?;
        row.as_ref().map(transaction_from_row).transpose().map_err(map_err("reading the ledger"))
    }

    async fn insert_audit(&mut self, e: &NewAudit<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, action, actor, idem_key, transaction_id, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(e.at)
        .bind(e.action.as_str())
        .bind(e.actor)
        .bind(e.key)
        .bind(e.transaction_id)
        .bind(e.detail)
        .execute(&mut *self.0)
        .await
        .map_err(map_err("writing the audit log"))?;
        Ok(())
    }
}

/// Claims `key` for `canonical` inside the caller's own PostgreSQL transaction (READ COMMITTED),
/// so that other code can make its own writes exactly once. On [`Claim::Fresh`] the caller does
/// its work, calls [`complete`] and commits; on [`Claim::Live`] it compares the stored
/// fingerprint with its own and returns the stored result instead.
pub async fn claim(
    conn: &mut PgConnection,
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
    posting::claim(&mut PgWrite(conn), &new, now).await
}

/// Stores the result of a claimed key, in the same transaction as [`claim`].
pub async fn complete(
    conn: &mut PgConnection,
    user: &Operator,
    key: &IdemKey,
    result: &str,
) -> Result<()> {
    PgWrite(conn).complete_key(user.as_str(), key.as_str(), None, result).await
}
