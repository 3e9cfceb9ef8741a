//! The command-line grammar: global flags and the command tree. Parsing only; the commands
//! themselves live in [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::exit::HELP_TABLE;

#[derive(Debug, Parser)]
#[command(
    name = "wmsctl",
    version,
    about = "Post inventory transactions exactly once, with idempotency keys",
    long_about = "Post inventory transactions exactly once. Every posting carries an idempotency \
                  key: the first posting with a key is applied, and every retry with the same key \
                  and request returns the original transaction without touching stock again.",
    after_help = HELP_TABLE,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Database URL: sqlite:///path/wms.db or postgres://user@host/db [default: a SQLite file in
    /// the user's data directory]
    #[arg(
        long,
        global = true,
        env = "WMS_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,

    /// Operator name that keys belong to [default: the login name]
    #[arg(long, global = true, env = "WMS_USER", value_name = "NAME")]
    pub user: Option<String>,

    /// Output format [default: table on a terminal, plain when piped]
    #[arg(short, long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputFormat>,

    /// Print only data and errors, no notes
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Print more about what happens (repeat for debug logs)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// When to use colors (NO_COLOR in the environment turns them off)
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,

    /// Do not load a .env file from the current directory
    #[arg(long, global = true)]
    pub no_dotenv: bool,

    /// How long to wait for PostgreSQL to accept a connection
    #[arg(long, global = true, env = "WMS_CONNECT_TIMEOUT", default_value = "5s", value_name = "DURATION",
          value_parser = crate::config::parse_duration)]
    pub connect_timeout: std::time::Duration,

    /// How long to retry while the database is busy before failing with exit code 75
    #[arg(long, global = true, env = "WMS_BUSY_TIMEOUT", default_value = "10s", value_name = "DURATION",
          value_parser = crate::config::parse_duration)]
    pub busy_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Plain,
    Json,
    Jsonl,
    /// Prometheus text format (`keys stats` only)
    Prometheus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
// A command's flags are built only when it runs (here and in the command groups below):
// building every command's flags took 0.15-0.2 ms of each call (`hyperfine -N` on
// `wmsctl keys generate`, 1.5-1.6 ms -> 1.3-1.4 ms), and a script calls wmsctl once a posting.
#[command(defer = true)]
pub enum Command {
    /// Post a goods receipt: add stock at a location
    Receive(PostArgs),
    /// Post a shipment: remove stock from a location (refused if stock is short)
    Ship(PostArgs),
    /// Move stock from one location to another in one transaction
    Transfer(TransferArgs),
    /// Correct a count with a signed delta and a reason
    Adjust(AdjustArgs),
    /// Post many transactions from a CSV or JSON Lines file; safe to re-run
    Import(ImportArgs),
    /// Show stock levels, or check them against the ledger with --verify
    Stock(StockArgs),
    /// Read the ledger
    #[command(subcommand)]
    Tx(TxCommand),
    /// Generate, inspect, list and clean up idempotency keys
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Read the audit log
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage the database schema
    #[command(subcommand)]
    Db(DbCommand),
    /// Print a shell completion script
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

// The flags every posting shares. (A plain comment: a doc comment here would become the
// description of every posting command, since their flags are built when first used.)
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Idempotency key; `auto` generates one and prints it
    #[arg(long, value_name = "KEY")]
    pub key: String,

    /// How long the key stays live (e.g. 24h, 15m, 7d)
    #[arg(long, env = "WMS_KEY_TTL", default_value = "24h", value_name = "DURATION",
          value_parser = crate::config::parse_duration)]
    pub ttl: std::time::Duration,

    /// What a retry of an applied posting does: return the original, or fail with exit code 4
    #[arg(long, value_enum, default_value_t = OnDuplicateArg::Replay, value_name = "MODE")]
    pub on_duplicate: OnDuplicateArg,

    /// Free-text reference, such as an order or delivery number
    #[arg(long, value_name = "TEXT")]
    pub reference: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnDuplicateArg {
    Replay,
    Fail,
}

#[derive(Debug, Args)]
pub struct PostArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    /// Stock-keeping unit
    #[arg(long, value_name = "SKU")]
    pub sku: String,
    /// Quantity, a whole number from 1 to 1000000000
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub qty: i64,
    /// Location
    #[arg(long, value_name = "LOCATION")]
    pub location: String,
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    #[arg(long, value_name = "SKU")]
    pub sku: String,
    /// Quantity, a whole number from 1 to 1000000000
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub qty: i64,
    /// Source location
    #[arg(long, value_name = "LOCATION")]
    pub from: String,
    /// Destination location
    #[arg(long, value_name = "LOCATION")]
    pub to: String,
}

#[derive(Debug, Args)]
pub struct AdjustArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    #[arg(long, value_name = "SKU")]
    pub sku: String,
    /// Signed correction, e.g. -3 or +5 (not zero)
    #[arg(long, value_name = "±N", allow_negative_numbers = true, value_parser = crate::config::parse_delta)]
    pub delta: i64,
    #[arg(long, value_name = "LOCATION")]
    pub location: String,
    /// Why the count changed (required)
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// File to read, or - for standard input
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Input format [default: from the file extension, else sniffed]
    #[arg(long, value_enum)]
    pub format: Option<ImportFormat>,
    /// Validate every line and write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Write refused lines here, in the input's format, with an `error` column
    #[arg(long, value_name = "FILE")]
    pub reject_file: Option<PathBuf>,
    /// Stop after this many refused lines (what was committed stays committed)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_errors: Option<u64>,
    /// Key lifetime for every line
    #[arg(long, env = "WMS_KEY_TTL", default_value = "24h", value_name = "DURATION",
          value_parser = crate::config::parse_duration)]
    pub ttl: std::time::Duration,
    /// Lines committed together in one database transaction
    #[arg(long, default_value_t = 1000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub chunk_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImportFormat {
    Csv,
    Jsonl,
}

#[derive(Debug, Args)]
pub struct StockArgs {
    #[arg(long, value_name = "SKU")]
    pub sku: Option<String>,
    #[arg(long, value_name = "LOCATION")]
    pub location: Option<String>,
    /// Check stock levels against the ledger; exit code 1 if they differ
    #[arg(long)]
    pub verify: bool,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum TxCommand {
    /// List transactions, newest first
    List {
        #[arg(long, value_name = "SKU")]
        sku: Option<String>,
        #[arg(long, value_name = "LOCATION")]
        location: Option<String>,
        /// Only transactions since this time (a duration ago like 24h, or a date or RFC 3339 time)
        #[arg(long, value_name = "WHEN", value_parser = crate::config::parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: u32,
    },
    /// Show one transaction; exit code 1 if there is none with that id
    Show {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum KeysCommand {
    /// Print fresh random keys for scripts
    Generate {
        #[arg(short = 'n', long = "count", default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=100000))]
        count: u32,
    },
    /// Exit 0 if the key is live, 1 if not; prints nothing unless asked with -v or -o
    Exists {
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Show a key: state, owner, times, fingerprint, request, transaction, replays
    Show {
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// List keys, newest first
    List {
        /// Every operator's keys, not only your own
        #[arg(long)]
        all_users: bool,
        /// Only keys that have expired and await cleanup
        #[arg(long)]
        expired: bool,
        #[arg(long, value_name = "WHEN", value_parser = crate::config::parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: u32,
    },
    /// Delete expired keys in batches; silent on success
    Cleanup(CleanupArgs),
    /// Live and expired keys, replays and conflicts by kind and operator
    Stats {
        #[arg(long, value_name = "WHEN", value_parser = crate::config::parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Count what would be deleted, delete nothing
    #[arg(long)]
    pub dry_run: bool,
    /// The most keys deleted per transaction; fewer when that many would take over 40 ms, and
    /// on SQLite never more than 800
    #[arg(long, default_value_t = 10000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000000))]
    pub batch_size: u32,
    /// Stop after this long; the next run goes on where this one stopped
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub max_runtime: Option<std::time::Duration>,
    /// Exit 0 instead of 75 when another cleanup is running
    #[arg(long)]
    pub skip_if_running: bool,
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum AuditCommand {
    /// List audit entries, newest first
    List {
        /// Only this action (replayed, duplicate_refused, conflict, expired_key_reused, cleanup,
        /// migrate)
        #[arg(long, value_name = "ACTION")]
        action: Option<String>,
        #[arg(long, value_name = "WHEN", value_parser = crate::config::parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum DbCommand {
    /// Apply pending migrations
    Migrate,
    /// Show applied and pending migrations; exit code 1 if any are pending
    Status,
    /// Make a PostgreSQL role an operator who posts and sees only its own keys
    ///
    /// Creates the login role if it does not exist (without a password: set one with ALTER
    /// ROLE, or use another authentication method) and adds it to the wms_operator group.
    /// Needs the CREATEROLE privilege. See docs/operators.md.
    GrantOperator {
        /// Role name, which is also the operator name: letters, digits and -_.@
        #[arg(value_name = "NAME")]
        name: String,
    },
}
