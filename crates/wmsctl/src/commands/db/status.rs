//! `db status`: which migrations are applied; exit code 1 while any is pending.

use anyhow::Result;
use idem_core::Store;
use serde::Serialize;

use crate::commands::Context;
use crate::exit::{NEGATIVE, OK};

#[derive(Debug, Serialize)]
struct Migration {
    version: i64,
    description: String,
    applied: bool,
}

pub async fn run(ctx: &Context, store: &Store, url: &str) -> Result<u8> {
    let status = store.schema_status().await?;
    let rows: Vec<Migration> = status
        .migrations
        .iter()
        .map(|(version, description, applied)| Migration {
            version: *version,
            description: description.clone(),
            applied: *applied,
        })
        .collect();
    ctx.ui.detail(format!("{} database {}", store.backend_name(), idem_core::redact_url(url)));
    ctx.ui.list(&rows, &["version", "description", "applied"], |m| {
        vec![
            m.version.to_string(),
            m.description.clone(),
            if m.applied { "yes" } else { "pending" }.into(),
        ]
    })?;
    if status.pending() > 0 {
        ctx.ui.warn(format!("{} migration(s) pending; run `wmsctl db migrate`", status.pending()));
        return Ok(NEGATIVE);
    }
    Ok(OK)
}
