//! `db`: schema management.

mod migrate;
mod status;

use anyhow::Result;

use super::Context;
use crate::cli::DbCommand;
use crate::config;

pub async fn run(ctx: &Context, command: DbCommand) -> Result<u8> {
    let url = config::database_url(&ctx.global)?;
    let store =
        idem_core::Store::connect_for_migration(&url, &config::store_options(&ctx.global)).await?;
    let code = match command {
        DbCommand::Migrate => migrate::run(ctx, &store).await,
        DbCommand::Status => status::run(ctx, &store, &url).await,
    };
    store.close().await;
    code
}
