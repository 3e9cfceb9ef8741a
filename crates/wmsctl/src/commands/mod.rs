//! The commands, one file each and one folder per group; this module holds the shared context
//! and the dispatch.

mod audit;
mod completions;
mod db;
mod import;
mod keys;
mod post;
mod stock;
mod tx;

use anyhow::Result;
use idem_core::{Operator, Store};

use crate::cli::{Cli, Command, GlobalArgs, OutputFormat};
use crate::config;
use crate::exit::{CONFIG, Failure, PERMISSION, USAGE};
use crate::output::Ui;

/// What every command needs: the global flags and the terminal.
#[derive(Debug)]
pub struct Context {
    pub global: GlobalArgs,
    pub ui: Ui,
}

impl Context {
    /// Opens the configured database (creating and migrating the default SQLite file).
    pub async fn store(&self) -> Result<Store> {
        let url = config::database_url(&self.global)?;
        self.ui.detail(format!("database: {}", idem_core::redact_url(&url)));
        Ok(Store::connect(&url, &config::store_options(&self.global)).await?)
    }

    pub fn operator(&self) -> Result<Operator> {
        config::operator(&self.global)
    }

    /// The operator this command acts for on `store`. A PostgreSQL role that is not an
    /// administrator is an operator and acts only as itself (row-level security enforces that
    /// in the database; this refuses clearly, up front); an administrator, and anyone on SQLite,
    /// acts as [`Context::operator`]. See docs/operators.md.
    pub async fn acting_operator(&self, store: &Store) -> Result<Operator> {
        let Some(role) = store.session_role().await? else {
            return self.operator();
        };
        if role.administrator {
            return self.operator();
        }
        let own = Operator::parse(&role.name).map_err(|_| {
            Failure::new(
                CONFIG,
                "config",
                format!(
                    "database role {:?} cannot act as an operator: operator names are 1 to 64 \
                     ASCII letters, digits and -_.@",
                    role.name
                ),
            )
        })?;
        match config::requested_operator(&self.global)? {
            Some(asked) if asked != own => Err(Failure::new(
                PERMISSION,
                "permission_denied",
                format!(
                    "connected as database role {own}, an operator who acts only as {own}: \
                     --user {asked} is refused; acting for another operator takes an \
                     administrator role"
                ),
            )
            .into()),
            _ => Ok(own),
        }
    }

    /// Refuses `-o prometheus` for commands that have no such output.
    fn refuse_prometheus(&self) -> Result<()> {
        if self.ui.format == OutputFormat::Prometheus {
            return Err(Failure::new(
                USAGE,
                "invalid_input",
                "invalid output: prometheus is only available for `keys stats`",
            )
            .into());
        }
        Ok(())
    }
}

/// Runs the parsed command and returns its exit code.
pub async fn run(cli: Cli, ui: Ui) -> Result<u8> {
    let ctx = Context { global: cli.global, ui };
    if !matches!(cli.command, Command::Keys(crate::cli::KeysCommand::Stats { .. })) {
        ctx.refuse_prometheus()?;
    }
    match cli.command {
        Command::Receive(args) => post::receive_or_ship(&ctx, idem_core::Kind::Receive, args).await,
        Command::Ship(args) => post::receive_or_ship(&ctx, idem_core::Kind::Ship, args).await,
        Command::Transfer(args) => post::transfer(&ctx, args).await,
        Command::Adjust(args) => post::adjust(&ctx, args).await,
        Command::Import(args) => import::run(&ctx, args).await,
        Command::Stock(args) => stock::run(&ctx, args).await,
        Command::Tx(command) => tx::run(&ctx, command).await,
        Command::Keys(command) => keys::run(&ctx, command).await,
        Command::Audit(command) => audit::run(&ctx, command).await,
        Command::Db(command) => db::run(&ctx, command).await,
        Command::Completions { shell } => completions::run(shell),
    }
}
