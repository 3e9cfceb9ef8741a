//! `tx show ID`: one ledger row; exit code 1 when there is none.

use anyhow::Result;
use idem_core::Error;

use super::{HEADERS, cells};
use crate::commands::Context;
use crate::exit::OK;

pub async fn run(ctx: &Context, raw: &str) -> Result<u8> {
    let id = uuid::Uuid::parse_str(raw).map_err(|_| Error::InvalidInput {
        field: "id",
        rule: format!("must be a transaction id (a UUID), got {raw:?}"),
    })?;
    let store = ctx.store().await?;
    let found = store.transaction(id).await?;
    store.close().await;
    let t = found.ok_or_else(|| Error::NotFound { what: "transaction", id: raw.to_owned() })?;
    let fields: Vec<(&str, String)> = HEADERS.iter().copied().zip(cells(&t)).collect();
    ctx.ui.record(&t, &fields)?;
    Ok(OK)
}
