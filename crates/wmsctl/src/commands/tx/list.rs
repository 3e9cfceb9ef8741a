//! `tx list`: ledger rows, newest first.

use anyhow::Result;
use chrono::{DateTime, Utc};
use idem_core::TransactionFilter;

use super::{HEADERS, cells};
use crate::commands::Context;
use crate::exit::OK;

pub async fn run(
    ctx: &Context,
    sku: Option<String>,
    location: Option<String>,
    since: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<u8> {
    let store = ctx.store().await?;
    let rows =
        store.transactions(&TransactionFilter { sku, location, since, limit: Some(limit) }).await?;
    store.close().await;
    ctx.ui.list(&rows, &HEADERS, cells)?;
    Ok(OK)
}
