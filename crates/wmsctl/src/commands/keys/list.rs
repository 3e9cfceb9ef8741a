//! `keys list`: the operator's keys (or everyone's), newest first.

use anyhow::Result;
use chrono::{DateTime, Utc};
use idem_core::KeyFilter;
use serde_json::json;

use crate::commands::Context;
use crate::exit::OK;
use crate::output::time;

pub async fn run(
    ctx: &Context,
    all_users: bool,
    expired: bool,
    since: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<u8> {
    let store = ctx.store().await?;
    let user = if all_users { None } else { Some(ctx.acting_operator(&store).await?.to_string()) };
    let now = Utc::now();
    let filter = KeyFilter { user, expired_only: expired, since, limit: Some(limit) };
    let keys = store.keys(&filter, now).await?;
    store.close().await;
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            let mut v = serde_json::to_value(k).unwrap_or_default();
            v["state"] = json!(k.state_at(now));
            v
        })
        .collect();
    let headers =
        ["key", "user", "state", "kind", "transaction", "created_at", "expires_at", "replays"];
    ctx.ui.list(&rows, &headers, |v| {
        let text = |f: &str| v[f].as_str().unwrap_or_default().to_owned();
        let at = |f: &str| {
            v[f].as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| time(t.with_timezone(&Utc)))
                .unwrap_or_default()
        };
        vec![
            text("key"),
            text("user"),
            text("state"),
            text("kind"),
            text("transaction_id"),
            at("created_at"),
            at("expires_at"),
            v["replay_count"].to_string(),
        ]
    })?;
    Ok(OK)
}
