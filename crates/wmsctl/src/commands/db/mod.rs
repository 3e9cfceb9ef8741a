//! `db`: schema management, and operator roles on PostgreSQL.

mod grant_operator;
mod migrate;
mod status;

use anyhow::Result;

use super::Context;
use crate::cli::DbCommand;
use crate::config;

pub async fn run(ctx: &Context, command: DbCommand) -> Result<u8> {
    // Schema commands open the database without the schema check that every other command
    // makes; granting an operator needs the schema up to date like any other.
    let migrating = match command {
        DbCommand::GrantOperator { name } => return grant_operator::run(ctx, &name).await,
        DbCommand::Migrate => true,
        DbCommand::Status => false,
    };
    let url = config::database_url(&ctx.global)?;
    let store =
        idem_core::Store::connect_for_migration(&url, &config::store_options(&ctx.global)).await?;
    let code = if migrating {
        migrate::run(ctx, &store).await
    } else {
        status::run(ctx, &store, &url).await
    };
    store.close().await;
    code
}
