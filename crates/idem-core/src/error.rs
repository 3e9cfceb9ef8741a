//! The one error type of the library: every failure a caller can act on, with database errors
//! already translated into the warehouse's terms at the edge of each store.

use std::time::Duration;

use uuid::Uuid;

/// A boxed cause, kept for the error chain but never matched on by callers.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The cause to keep for a database error. sqlx's own wrapper repeats the database's message in
/// its text and again as its source, so a chain printer would show it twice, and its text for a
/// PostgreSQL error ends in the line of the server's C source, which reads like a line of the
/// caller's SQL. The server's message, with PostgreSQL's detail and hint, says it once.
pub(crate) fn db_cause(err: sqlx::Error) -> Cause {
    match err {
        sqlx::Error::Database(db) => {
            let mut text = db.message().to_owned();
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                if let Some(detail) = pg.detail() {
                    text.push_str(&format!(" ({detail})"));
                }
                if let Some(hint) = pg.hint() {
                    text.push_str(&format!("; hint: {hint}"));
                }
            }
            text.into()
        }
        sqlx::Error::Io(io) => Box::new(io),
        other => Box::new(other),
    }
}

/// Everything that can go wrong when posting, reading or maintaining the ledger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field broke a validation rule; nothing was sent to the database.
    #[error("invalid {field}: {rule}")]
    InvalidInput { field: &'static str, rule: String },

    /// The key is live and was first used for a different request.
    #[error(
        "key {key:?} was already used by transaction {original} for a different request \
         (fields that differ: {})",
        differing_fields.join(", ")
    )]
    KeyConflict { key: String, original: Uuid, differing_fields: Vec<String> },

    /// The key is live and the request matches, but the caller asked for duplicates to fail.
    #[error("key {key:?} was already used by transaction {original}; duplicate refused")]
    DuplicateRefused { key: String, original: Uuid },

    /// A stock rule refused the posting; the key was not consumed.
    #[error("insufficient stock: {sku} at {location} has {on_hand} on hand, {requested} requested")]
    InsufficientStock { sku: String, location: String, on_hand: i64, requested: i64 },

    /// A transaction, key or other record does not exist.
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },

    /// Contention outlasted the retry budget; retrying with the same key is safe.
    #[error("database is busy (gave up after {waited:?}); retrying with the same key is safe")]
    Busy {
        waited: Duration,
        #[source]
        source: Option<Cause>,
    },

    /// The connection failed before the outcome was decided; nothing was committed.
    #[error(
        "the database connection failed; nothing was committed, retrying with the same key is safe"
    )]
    ConnectionLost {
        #[source]
        source: Cause,
    },

    /// The connection failed while the commit was in flight: it may or may not have happened.
    #[error(
        "the connection failed during commit, so the outcome is unknown; \
         retry with the same key: it applies the posting or returns the one already applied"
    )]
    OutcomeUnknown {
        #[source]
        source: Cause,
    },

    /// Another process holds the lock this operation needs (for example a running cleanup).
    #[error("{what} is already running in another process")]
    LockHeld { what: &'static str },

    /// The database could not be reached at all.
    #[error("database unavailable at {target}")]
    Unavailable {
        target: String,
        #[source]
        source: Cause,
    },

    /// The database refused the operation for lack of privilege, or the file is read-only.
    #[error("permission denied by the database")]
    PermissionDenied {
        #[source]
        source: Cause,
    },

    /// The database or its disk is full; the transaction was rolled back.
    #[error(
        "the database or its disk is full; the transaction was rolled back, so retrying with the \
         same key is safe once there is room"
    )]
    StorageFull {
        #[source]
        source: Cause,
    },

    /// The file exists but is not a database this tool can open.
    #[error("{path} is not a wmsctl database")]
    NotADatabase {
        path: String,
        #[source]
        source: Option<Cause>,
    },

    /// The connection URL or another setting is wrong.
    #[error("invalid configuration: {message}")]
    Config { message: String },

    /// The schema lacks migrations that this version needs.
    #[error(
        "database schema is out of date ({pending} migration(s) pending); run `wmsctl db migrate`"
    )]
    SchemaOutOfDate { pending: usize },

    /// The schema was migrated by a newer version of the tool.
    #[error(
        "database schema version {found} is newer than this version of wmsctl understands \
         (latest known: {known}); upgrade wmsctl"
    )]
    SchemaTooNew { found: i64, known: i64 },

    /// Any other database failure: a bug or an unexpected state, not the caller's fault.
    #[error("database error during {during}")]
    Database {
        during: &'static str,
        #[source]
        source: Cause,
    },
}

impl Error {
    /// A stable, machine-readable name for the error, part of the JSON output contract.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidInput { .. } => "invalid_input",
            Error::KeyConflict { .. } => "key_conflict",
            Error::DuplicateRefused { .. } => "duplicate_refused",
            Error::InsufficientStock { .. } => "insufficient_stock",
            Error::NotFound { .. } => "not_found",
            Error::Busy { .. } => "db_busy",
            Error::ConnectionLost { .. } => "connection_lost",
            Error::OutcomeUnknown { .. } => "outcome_unknown",
            Error::LockHeld { .. } => "lock_held",
            Error::Unavailable { .. } => "db_unavailable",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::StorageFull { .. } => "storage_full",
            Error::NotADatabase { .. } => "not_a_database",
            Error::Config { .. } => "config",
            Error::SchemaOutOfDate { .. } => "schema_out_of_date",
            Error::SchemaTooNew { .. } => "schema_too_new",
            Error::Database { .. } => "database_error",
        }
    }

    /// True when the same request may simply be sent again later.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Error::Busy { .. }
                | Error::ConnectionLost { .. }
                | Error::OutcomeUnknown { .. }
                | Error::LockHeld { .. }
        )
    }

    pub(crate) fn invalid(field: &'static str, rule: impl Into<String>) -> Self {
        Error::InvalidInput { field, rule: rule.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
