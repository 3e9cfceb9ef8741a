//! `tx`: reading the ledger.

mod list;
mod show;

use anyhow::Result;

use super::Context;
use crate::cli::TxCommand;

pub async fn run(ctx: &Context, command: TxCommand) -> Result<u8> {
    match command {
        TxCommand::List { sku, location, since, limit } => {
            list::run(ctx, sku, location, since, limit).await
        }
        TxCommand::Show { id } => show::run(ctx, &id).await,
    }
}

/// The columns a transaction shows in a table or a plain line.
pub(crate) const HEADERS: [&str; 11] = [
    "id",
    "kind",
    "sku",
    "qty",
    "location",
    "to_location",
    "reference",
    "reason",
    "user",
    "key",
    "created_at",
];

pub(crate) fn cells(t: &idem_core::Transaction) -> Vec<String> {
    use crate::output::{opt, time};
    vec![
        t.id.to_string(),
        t.kind.to_string(),
        t.sku.clone(),
        t.qty.to_string(),
        t.location.clone(),
        opt(t.to_location.as_deref()),
        opt(t.reference.as_deref()),
        opt(t.reason.as_deref()),
        t.user.clone(),
        t.key.clone(),
        time(t.created_at),
    ]
}
