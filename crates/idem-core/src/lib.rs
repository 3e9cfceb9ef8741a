//! Exactly-once inventory postings with idempotency keys.
//!
//! A [`Posting`] carries an operator, a key and a [`Request`]. [`Store::post`] applies it in one
//! database transaction the first time the key is seen, and returns the original transaction for
//! every retry with the same key and request; a different request under a live key is a
//! [`Error::KeyConflict`], and a posting refused by a stock rule does not consume its key. The
//! same rule holds on SQLite and PostgreSQL. The claim step is also available on its own
//! ([`store::sqlite::claim`], [`store::postgres::claim`]) for callers that want the same
//! guarantee for their own writes inside their own transaction.

pub mod access;
pub mod audit;
mod batch;
mod chunk;
pub mod cleanup;
pub mod error;
pub mod key;
pub mod ledger;
pub mod posting;
pub mod request;
mod retry;
pub mod stats;
pub mod store;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod testing;

pub use access::{OperatorGrant, SessionRole};
pub use audit::{AuditAction, AuditEntry, AuditFilter};
pub use cleanup::{CleanupOptions, CleanupReport};
pub use error::{Error, Result};
pub use key::{IdemKey, Operator};
pub use ledger::{StockDifference, StockFilter, StockLevel, Transaction, TransactionFilter};
pub use posting::{Claim, DEFAULT_TTL, KeyRecord, KeyState, OnDuplicate, Outcome, Posted, Posting};
pub use request::{Kind, Request};
pub use retry::DEFAULT_BUSY_BUDGET;
pub use stats::{KeyStats, to_prometheus};
pub use store::{BatchPlan, KeyFilter, SchemaStatus, Store, StoreOptions, Target, redact_url};
