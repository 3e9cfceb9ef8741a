//! `keys`: generating, inspecting, listing and cleaning up idempotency keys.

mod cleanup;
mod exists;
mod generate;
mod list;
mod show;
mod stats;

use anyhow::Result;

use super::Context;
use crate::cli::KeysCommand;

pub async fn run(ctx: &Context, command: KeysCommand) -> Result<u8> {
    match command {
        KeysCommand::Generate { count } => generate::run(ctx, count),
        KeysCommand::Exists { key } => exists::run(ctx, &key).await,
        KeysCommand::Show { key } => show::run(ctx, &key).await,
        KeysCommand::List { all_users, expired, since, limit } => {
            list::run(ctx, all_users, expired, since, limit).await
        }
        KeysCommand::Cleanup(args) => cleanup::run(ctx, args).await,
        KeysCommand::Stats { since } => stats::run(ctx, since).await,
    }
}
