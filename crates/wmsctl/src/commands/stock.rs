//! `stock`: levels per SKU and location, or with `--verify` a proof that they equal the ledger.

use anyhow::Result;
use idem_core::StockFilter;
use serde::Serialize;

use super::Context;
use crate::cli::StockArgs;
use crate::exit::{NEGATIVE, OK};

pub async fn run(ctx: &Context, args: StockArgs) -> Result<u8> {
    let store = ctx.store().await?;
    if args.verify {
        return verify(ctx, &store).await;
    }
    let levels = store.stock(&StockFilter { sku: args.sku, location: args.location }).await?;
    store.close().await;
    ctx.ui.list(&levels, &["sku", "location", "on_hand"], |l| {
        vec![l.sku.clone(), l.location.clone(), l.on_hand.to_string()]
    })?;
    Ok(OK)
}

#[derive(Debug, Serialize)]
struct Verification<'a> {
    consistent: bool,
    differences: &'a [idem_core::StockDifference],
}

async fn verify(ctx: &Context, store: &idem_core::Store) -> Result<u8> {
    let differences = store.verify_stock().await?;
    store.close().await;
    if ctx.ui.is_json() {
        let report = Verification { consistent: differences.is_empty(), differences: &differences };
        ctx.ui.record(&report, &[])?;
    } else if !differences.is_empty() {
        ctx.ui.list(&differences, &["sku", "location", "on_hand", "ledger_sum"], |d| {
            vec![d.sku.clone(), d.location.clone(), d.on_hand.to_string(), d.ledger_sum.to_string()]
        })?;
    }
    if differences.is_empty() {
        ctx.ui.note("stock matches the ledger");
        Ok(OK)
    } else {
        ctx.ui.warn(format!("stock differs from the ledger at {} place(s)", differences.len()));
        Ok(NEGATIVE)
    }
}
