//! `keys exists KEY`: exit 0 when the key is live, 1 when not, for `if wmsctl keys exists ...`
//! in scripts. Silent unless `-v` or `-o` asks for an answer.

use anyhow::Result;
use chrono::Utc;
use idem_core::IdemKey;
use serde_json::json;

use crate::commands::Context;
use crate::exit::{NEGATIVE, OK};

pub async fn run(ctx: &Context, raw: &str) -> Result<u8> {
    let key = IdemKey::parse(raw)?;
    let store = ctx.store().await?;
    let user = ctx.acting_operator(&store).await?;
    let live = store.key_is_live(&user, &key, Utc::now()).await?;
    store.close().await;
    if ctx.ui.format_requested {
        let answer = json!({ "key": key.as_str(), "user": user.as_str(), "live": live });
        ctx.ui.record(&answer, &[("live", live.to_string())])?;
    }
    ctx.ui.detail(format!("key {key} is {}", if live { "live" } else { "not live" }));
    Ok(if live { OK } else { NEGATIVE })
}
