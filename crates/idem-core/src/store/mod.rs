//! One interface over the two databases: connect by URL, post, read, maintain. Each database's
//! SQL and error mapping lives in its own module; the posting rule itself lives in
//! [`crate::posting`] and is shared.

pub mod postgres;
pub mod sqlite;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::access::{OperatorGrant, SessionRole};
use crate::audit::{AuditEntry, AuditFilter};
use crate::cleanup::{CleanupOptions, CleanupReport};
use crate::error::{Error, Result};
use crate::key::{IdemKey, Operator};
use crate::ledger::{StockDifference, StockFilter, StockLevel, Transaction, TransactionFilter};
use crate::posting::{KeyRecord, Posted, Posting};
use crate::retry::DEFAULT_BUSY_BUDGET;
use crate::stats::KeyStats;

/// A batch planned ahead by [`Store::plan_batch`], for [`Store::post_planned`].
#[derive(Debug)]
pub struct BatchPlan {
    now: DateTime<Utc>,
    postings: usize,
    fresh: Option<postgres::FreshPlan>,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Connections kept open; one is right for a command-line call.
    pub max_connections: u32,
    /// How long to wait for PostgreSQL to accept a connection.
    pub connect_timeout: Duration,
    /// How long contention is retried before [`Error::Busy`].
    pub busy_budget: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 4,
            connect_timeout: Duration::from_secs(5),
            busy_budget: DEFAULT_BUSY_BUDGET,
        }
    }
}

/// Which kind of database a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Target {
    /// Reads a `sqlite:PATH`, `sqlite://PATH`, `postgres://…` or `postgresql://…` URL.
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" {
                return Err(Error::Config {
                    message: format!(
                        "{url:?} names no database file; use sqlite:///path/to/wms.db"
                    ),
                });
            }
            return Ok(Target::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target::Postgres(url.to_owned()));
        }
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        Err(Error::Config {
            message: format!(
                "database URL {:?} has unsupported scheme {scheme:?}; expected sqlite:// or postgres://",
                redact_url(url)
            ),
        })
    }
}

/// The URL with any password replaced by `****`, safe to print or log.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let (userinfo, host) = authority.split_at(at);
    let redacted = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:****"),
        None => userinfo.to_owned(),
    };
    let mut out = format!("{scheme}://{redacted}{host}{tail}");
    // A password can also travel as a query parameter.
    if let Some(pos) = out.find("password=") {
        let end = out[pos..].find('&').map_or(out.len(), |e| pos + e);
        out.replace_range(pos + "password=".len()..end, "****");
    }
    out
}

/// Which keys to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    /// Only this operator's keys; `None` lists every operator's.
    pub user: Option<String>,
    /// Only keys that have expired by `now` (awaiting cleanup).
    pub expired_only: bool,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
}

/// Where the schema stands against the migrations this build carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// (version, description) of every migration this build knows, with whether it is applied.
    pub migrations: Vec<(i64, String, bool)>,
}

impl SchemaStatus {
    pub fn pending(&self) -> usize {
        self.migrations.iter().filter(|(_, _, applied)| !applied).count()
    }
}

/// A connection to either database, with the same behaviour on both.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Sqlite($store) => $call,
            Store::Postgres($store) => $call,
        }
    };
}

impl Store {
    /// Opens the database a URL names. SQLite files are created and migrated on first use;
    /// PostgreSQL must be migrated with [`Store::migrate`] and is refused while out of date.
    #[tracing::instrument(skip_all, err(level = "debug"), fields(target = %redact_url(url)))]
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Store> {
        match Target::parse(url)? {
            Target::Sqlite(path) => {
                Ok(Store::Sqlite(sqlite::SqliteStore::open(&path, options).await?))
            }
            Target::Postgres(url) => {
                Ok(Store::Postgres(postgres::PgStore::connect(&url, options, true).await?))
            }
        }
    }

    /// Opens without checking the schema: for `db migrate` and `db status`.
    #[tracing::instrument(skip_all, err(level = "debug"), fields(target = %redact_url(url)))]
    pub async fn connect_for_migration(url: &str, options: &StoreOptions) -> Result<Store> {
        match Target::parse(url)? {
            Target::Sqlite(path) => {
                Ok(Store::Sqlite(sqlite::SqliteStore::open(&path, options).await?))
            }
            Target::Postgres(url) => {
                Ok(Store::Postgres(postgres::PgStore::connect(&url, options, false).await?))
            }
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Applies pending migrations; returns the versions applied by this call.
    #[tracing::instrument(skip_all, err(level = "debug"), fields(backend = self.backend_name()))]
    pub async fn migrate(&self, actor: &Operator) -> Result<Vec<i64>> {
        dispatch!(self, s => s.migrate(actor).await)
    }

    pub async fn schema_status(&self) -> Result<SchemaStatus> {
        dispatch!(self, s => s.schema_status().await)
    }

    /// Posts under the posting rule, at the current time.
    pub async fn post(&self, posting: &Posting) -> Result<Posted> {
        self.post_at(posting, Utc::now()).await
    }

    /// Posts as if the clock read `now` (keys expire relative to it).
    #[tracing::instrument(skip_all, err(level = "debug"), fields(user = %posting.user, key = %posting.key))]
    pub async fn post_at(&self, posting: &Posting, now: DateTime<Utc>) -> Result<Posted> {
        posting.validate()?;
        dispatch!(self, s => s.post_at(posting, now).await)
    }

    /// Posts many postings in one database transaction, as if the clock read `now`, and returns
    /// each one's outcome in order. Each is a posting of its own under the posting rule, run in
    /// a savepoint: a rejected or invalid posting is refused alone while its neighbours commit,
    /// a conflict keeps its audit entry, and two postings with the same key behave as if posted
    /// one after another. Contention retries the whole batch; any other failure (a lost
    /// connection included) fails the whole batch with nothing of it committed, except
    /// [`Error::OutcomeUnknown`], after which posting the batch again is the way to find out.
    pub async fn post_batch(
        &self,
        postings: &[Posting],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Posted>>> {
        dispatch!(self, s => s.post_batch(postings, now).await)
    }

    /// Does the part of [`post_batch`](Self::post_batch) that can be done before the batch's
    /// turn, so that a caller can do it while the batch before is being written: on PostgreSQL,
    /// the plan of a batch of new keys that only adds stock (see [`postgres`]). Nothing is read
    /// or written, and the plan is checked when it is posted.
    pub async fn plan_batch(&self, postings: &[Posting], now: DateTime<Utc>) -> Result<BatchPlan> {
        let fresh = match self {
            Store::Postgres(s) => s.plan_fresh_batch(postings, now).await?,
            Store::Sqlite(_) => None,
        };
        Ok(BatchPlan { now, postings: postings.len(), fresh })
    }

    /// [`post_batch`](Self::post_batch) of the postings given to [`plan_batch`](Self::plan_batch),
    /// as if the clock read the `now` given there.
    pub async fn post_planned(
        &self,
        postings: &[Posting],
        plan: BatchPlan,
    ) -> Result<Vec<Result<Posted>>> {
        if plan.postings != postings.len() {
            return Err(Error::Database {
                during: "posting a planned batch",
                source: format!(
                    "the plan is of {} postings, the batch has {}",
                    plan.postings,
                    postings.len()
                )
                .into(),
            });
        }
        match self {
            Store::Postgres(s) => s.post_batch_with(postings, plan.now, plan.fresh).await,
            Store::Sqlite(s) => s.post_batch(postings, plan.now).await,
        }
    }

    pub async fn stock(&self, filter: &StockFilter) -> Result<Vec<StockLevel>> {
        dispatch!(self, s => s.stock(filter).await)
    }

    /// Every (sku, location) whose level differs from the sum of the ledger; empty when sound.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub async fn verify_stock(&self) -> Result<Vec<StockDifference>> {
        dispatch!(self, s => s.verify_stock().await)
    }

    pub async fn transactions(&self, filter: &TransactionFilter) -> Result<Vec<Transaction>> {
        dispatch!(self, s => s.transactions(filter).await)
    }

    pub async fn transaction(&self, id: uuid::Uuid) -> Result<Option<Transaction>> {
        dispatch!(self, s => s.transaction(id).await)
    }

    pub async fn key(&self, user: &Operator, key: &IdemKey) -> Result<Option<KeyRecord>> {
        dispatch!(self, s => s.key(user.as_str(), key.as_str()).await)
    }

    /// True when the key is live at `now`: the one query behind `keys exists`.
    pub async fn key_is_live(
        &self,
        user: &Operator,
        key: &IdemKey,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        dispatch!(self, s => s.key_is_live(user.as_str(), key.as_str(), now).await)
    }

    pub async fn keys(&self, filter: &KeyFilter, now: DateTime<Utc>) -> Result<Vec<KeyRecord>> {
        dispatch!(self, s => s.keys(filter, now).await)
    }

    pub async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        dispatch!(self, s => s.audit(filter).await)
    }

    /// Deletes keys that expired by `options.now`, in batches, and records the run in the audit
    /// log under `actor`; see [`crate::cleanup`]. Fails with [`Error::LockHeld`] while another
    /// cleanup runs, unless `options.wait_for_lock` is set.
    pub async fn cleanup(
        &self,
        options: &CleanupOptions,
        actor: &Operator,
    ) -> Result<CleanupReport> {
        dispatch!(self, s => s.cleanup(options, actor).await)
    }

    /// Key statistics as of `now`, with replays and conflicts counted from `since` (all of the
    /// audit log when `None`); see [`KeyStats`].
    pub async fn stats(
        &self,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<KeyStats> {
        dispatch!(self, s => s.stats(since, now).await)
    }

    /// Who the database says the session is, for operator isolation; `None` on SQLite, which
    /// has no roles.
    pub async fn session_role(&self) -> Result<Option<SessionRole>> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => s.session_role().await.map(Some),
        }
    }

    /// Makes `name` an operator: creates the login role if it does not exist and adds it to
    /// [`crate::access::OPERATOR_ROLE`]. PostgreSQL only; needs `CREATEROLE`.
    #[tracing::instrument(skip_all, err(level = "debug"), fields(role = %name))]
    pub async fn grant_operator(&self, name: &Operator) -> Result<OperatorGrant> {
        match self {
            Store::Sqlite(s) => Err(Error::Config {
                message: format!(
                    "operator roles exist only on PostgreSQL; the SQLite database {} is guarded \
                     by the permissions of its file",
                    s.path().display()
                ),
            }),
            Store::Postgres(s) => s.grant_operator(name).await,
        }
    }

    /// Closes every connection cleanly.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }
}
