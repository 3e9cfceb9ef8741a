//! `audit list`: duplicate attempts, reused keys, cleanups and migrations, newest first.

use anyhow::Result;
use idem_core::{AuditAction, AuditFilter};

use super::Context;
use crate::cli::AuditCommand;
use crate::exit::OK;
use crate::output::{opt, time};

pub async fn run(ctx: &Context, command: AuditCommand) -> Result<u8> {
    let AuditCommand::List { action, since, limit } = command;
    let action = action.as_deref().map(str::parse::<AuditAction>).transpose()?;
    let store = ctx.store().await?;
    let entries = store.audit(&AuditFilter { action, since, limit: Some(limit) }).await?;
    store.close().await;
    ctx.ui.list(
        &entries,
        &["id", "at", "action", "actor", "key", "transaction", "detail"],
        |e| {
            vec![
                e.id.to_string(),
                time(e.at),
                e.action.clone(),
                e.actor.clone(),
                opt(e.key.as_deref()),
                e.transaction_id.map(|t| t.to_string()).unwrap_or_default(),
                e.detail.clone(),
            ]
        },
    )?;
    Ok(OK)
}
