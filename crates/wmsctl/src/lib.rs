//! `wmsctl`, the operator's command line over `idem-core`: parse, run the command, render, and
//! map the outcome to a documented exit code.

mod cli;
mod commands;
mod config;
mod exit;
mod import;
mod output;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

pub use cli::Cli;

/// Runs `wmsctl` with the given arguments (the first is the program name) and returns the exit
/// code. Data goes to stdout; notes and errors go to stderr.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    config::load_dotenv(&args);
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return exit::code(if err.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    init_tracing(&cli.global);
    let ui = output::Ui::new(&cli.global);

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("wmsctl: cannot start the async runtime: {err}");
            return exit::code(exit::INTERNAL);
        }
    };
    match runtime.block_on(commands::run(cli, ui.clone())) {
        Ok(code) => exit::code(code),
        Err(err) => {
            let (code, name) = exit::classify(&err);
            report(&ui, &err, name);
            exit::code(code)
        }
    }
}

/// Prints an error and its whole cause chain on stderr, as text or as a JSON object.
fn report(ui: &output::Ui, err: &anyhow::Error, name: &str) {
    let message = format!("{err:#}");
    if ui.is_json() {
        let body = serde_json::json!({ "error": { "code": name, "message": message } });
        eprintln!("{body}");
    } else {
        eprintln!("wmsctl: {}", output::escape(&message));
    }
}

/// Logs go to stderr: warnings by default, more with `-v`, or whatever `WMS_LOG` says. Colors
/// follow `--color` and `NO_COLOR` and, by default, whether stderr is a terminal, so that a log
/// file or a script reading stderr never gets escape codes.
fn init_tracing(global: &cli::GlobalArgs) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let ansi = match global.color {
        cli::ColorChoice::Always => true,
        cli::ColorChoice::Never => false,
        cli::ColorChoice::Auto => {
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::io::stderr().is_terminal()
        }
    };
    let default = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "idem_core=debug,wmsctl=debug,info",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_env("WMS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
