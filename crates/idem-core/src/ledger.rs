//! The append-only ledger and the stock levels it adds up to.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::request::{Kind, Request};

/// One row of the ledger: never edited, never deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transaction {
    pub id: Uuid,
    pub kind: Kind,
    pub sku: String,
    pub qty: i64,
    pub location: String,
    pub to_location: Option<String>,
    pub reference: Option<String>,
    pub reason: Option<String>,
    pub user: String,
    pub key: String,
    pub created_at: DateTime<Utc>,
}

impl Transaction {
    pub(crate) fn new(
        id: Uuid,
        request: &Request,
        user: &str,
        key: &str,
        at: DateTime<Utc>,
    ) -> Self {
        Transaction {
            id,
            kind: request.kind,
            sku: request.sku.clone(),
            qty: request.qty,
            location: request.location.clone(),
            to_location: request.to_location.clone(),
            reference: request.reference.clone(),
            reason: request.reason.clone(),
            user: user.to_owned(),
            key: key.to_owned(),
            created_at: at,
        }
    }
}

/// The quantity on hand of one SKU at one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockLevel {
    pub sku: String,
    pub location: String,
    pub on_hand: i64,
}

/// A (sku, location) whose stored level differs from the sum of its ledger rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockDifference {
    pub sku: String,
    pub location: String,
    pub on_hand: i64,
    pub ledger_sum: i64,
}

/// Which stock levels to read; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct StockFilter {
    pub sku: Option<String>,
    pub location: Option<String>,
}

/// Which ledger rows to read, newest first.
#[derive(Debug, Clone, Default)]
pub struct TransactionFilter {
    pub sku: Option<String>,
    pub location: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
}
