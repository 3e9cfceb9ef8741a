//! `db migrate`: apply pending migrations (the only way PostgreSQL is ever migrated).

use anyhow::Result;
use idem_core::Store;
use serde_json::json;

use crate::commands::Context;
use crate::exit::OK;

pub async fn run(ctx: &Context, store: &Store) -> Result<u8> {
    let applied = store.migrate(&ctx.operator()?).await?;
    if applied.is_empty() {
        ctx.ui.note("schema is up to date");
    } else {
        ctx.ui.note(format!("applied {} migration(s): {applied:?}", applied.len()));
    }
    if ctx.ui.is_json() {
        ctx.ui.record(&json!({ "applied": applied }), &[])?;
    }
    Ok(OK)
}
