//! `keys show KEY`: everything known about one of the operator's keys; exit code 1 when the key
//! is unknown.

use anyhow::Result;
use chrono::Utc;
use idem_core::{IdemKey, KeyState};
use serde_json::json;

use crate::commands::Context;
use crate::exit::{NEGATIVE, OK};
use crate::output::time;

pub async fn run(ctx: &Context, raw: &str) -> Result<u8> {
    let key = IdemKey::parse(raw)?;
    let store = ctx.store().await?;
    let user = ctx.acting_operator(&store).await?;
    let record = store.key(&user, &key).await?;
    store.close().await;

    let Some(record) = record else {
        let unknown =
            json!({ "state": KeyState::Unknown, "key": key.as_str(), "user": user.as_str() });
        ctx.ui.record(
            &unknown,
            &[("state", "unknown".into()), ("key", key.to_string()), ("user", user.to_string())],
        )?;
        ctx.ui.note(format!("key {key} is unknown for operator {user}"));
        return Ok(NEGATIVE);
    };
    let state = record.state_at(Utc::now());
    let mut value = serde_json::to_value(&record)?;
    value["state"] = json!(state);
    value["request"] = serde_json::from_str(&record.canonical).unwrap_or(json!(null));
    ctx.ui.record(
        &value,
        &[
            ("state", state.to_string()),
            ("key", record.key.clone()),
            ("user", record.user.clone()),
            ("kind", record.kind.clone()),
            ("transaction", record.transaction_id.map(|t| t.to_string()).unwrap_or_default()),
            ("created_at", time(record.created_at)),
            ("expires_at", time(record.expires_at)),
            ("replay_count", record.replay_count.to_string()),
            ("last_replay_at", record.last_replay_at.map(time).unwrap_or_default()),
            ("fingerprint", record.fingerprint.clone()),
            ("request", record.canonical.clone()),
        ],
    )?;
    Ok(OK)
}
