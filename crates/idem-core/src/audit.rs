//! The audit log: every duplicate attempt, reuse of an expired key, cleanup run and migration,
//! with who, when, which key and which transaction.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Replayed,
    DuplicateRefused,
    Conflict,
    ExpiredKeyReused,
    Cleanup,
    Migrate,
}

impl AuditAction {
    pub const ALL: [AuditAction; 6] = [
        AuditAction::Replayed,
        AuditAction::DuplicateRefused,
        AuditAction::Conflict,
        AuditAction::ExpiredKeyReused,
        AuditAction::Cleanup,
        AuditAction::Migrate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Replayed => "replayed",
            AuditAction::DuplicateRefused => "duplicate_refused",
            AuditAction::Conflict => "conflict",
            AuditAction::ExpiredKeyReused => "expired_key_reused",
            AuditAction::Cleanup => "cleanup",
            AuditAction::Migrate => "migrate",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditAction {
    type Err = Error;

    fn from_str(raw: &str) -> Result<Self> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == raw).ok_or_else(|| {
            let names: Vec<&str> = AuditAction::ALL.iter().map(|a| a.as_str()).collect();
            Error::invalid("action", format!("must be one of {}, got {raw:?}", names.join(", ")))
        })
    }
}

/// An audit entry about to be written.
#[derive(Debug)]
pub(crate) struct NewAudit<'a> {
    pub at: DateTime<Utc>,
    pub action: AuditAction,
    pub actor: &'a str,
    pub key: Option<&'a str>,
    pub transaction_id: Option<Uuid>,
    pub detail: &'a str,
}

/// An audit entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub action: String,
    pub actor: String,
    pub key: Option<String>,
    pub transaction_id: Option<Uuid>,
    pub detail: String,
}

/// Which audit entries to read, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub action: Option<AuditAction>,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
}
