//! Small builders and readers shared by the posting tests, so that each test reads as the
//! warehouse story it checks.

use chrono::{DateTime, TimeZone, Utc};
use idem_core::{
    AuditAction, AuditEntry, AuditFilter, IdemKey, Operator, Posting, Request, StockFilter, Store,
    Transaction, TransactionFilter,
};

pub fn operator(name: &str) -> Operator {
    Operator::parse(name).expect("valid operator")
}

pub fn key(raw: &str) -> IdemKey {
    IdemKey::parse(raw).expect("valid key")
}

pub fn posting(user: &str, key_raw: &str, request: Request) -> Posting {
    Posting::new(operator(user), key(key_raw), request)
}

pub fn receive(sku: &str, qty: i64, location: &str) -> Request {
    Request::receive(sku, qty, location).expect("valid receipt")
}

pub fn ship(sku: &str, qty: i64, location: &str) -> Request {
    Request::ship(sku, qty, location).expect("valid shipment")
}

pub fn transfer(sku: &str, qty: i64, from: &str, to: &str) -> Request {
    Request::transfer(sku, qty, from, to).expect("valid transfer")
}

pub fn adjust(sku: &str, delta: i64, location: &str, reason: &str) -> Request {
    Request::adjust(sku, delta, location, reason).expect("valid adjustment")
}

/// A fixed moment for tests that control the clock through `post_at`.
pub fn shift_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2031, 3, 14, 6, 0, 0).single().expect("valid time")
}

/// The quantity on hand, or `None` when the store has no row for (sku, location) at all.
pub async fn on_hand(store: &Store, sku: &str, location: &str) -> Option<i64> {
    let filter = StockFilter { sku: Some(sku.to_owned()), location: Some(location.to_owned()) };
    let levels = store.stock(&filter).await.expect("reading stock");
    assert!(levels.len() <= 1, "one row per (sku, location): {levels:?}");
    levels.first().map(|level| level.on_hand)
}

/// The whole ledger, newest first.
pub async fn ledger(store: &Store) -> Vec<Transaction> {
    store.transactions(&TransactionFilter::default()).await.expect("reading the ledger")
}

/// The audit entries of one action, newest first.
pub async fn audit_entries(store: &Store, action: AuditAction) -> Vec<AuditEntry> {
    let filter = AuditFilter { action: Some(action), ..AuditFilter::default() };
    store.audit(&filter).await.expect("reading the audit log")
}

/// Runs a statement that only a test may run: it changes the database behind the library's back.
pub async fn tamper(store: &Store, statement: &'static str) {
    match store {
        Store::Sqlite(s) => sqlx::query(statement).execute(s.pool()).await.map(|_| ()),
        Store::Postgres(p) => sqlx::query(statement).execute(p.pool()).await.map(|_| ()),
    }
    .unwrap_or_else(|err| panic!("{statement:?}: {err}"));
}
