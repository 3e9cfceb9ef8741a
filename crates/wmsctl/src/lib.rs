//! `wmsctl`, the operator's command line over `idem-core`: parse, run the command, render, and
//! map the outcome to a documented exit code.

mod cli;
mod commands;
mod config;
mod exit;
mod import;
mod output;

use std::ffi::OsString;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;

use clap::Parser;

pub use cli::Cli;

/// In debug builds, a panic with this variable's value as its message, raised where a command
/// would start: the tests use it to see what a bug in `wmsctl` looks like to its caller.
const PANIC_FOR_TEST_VAR: &str = "WMSCTL_PANIC_FOR_TEST";

/// Replaces the default panic message, which would print the panic's text as it is, by one line
/// on stderr with every URL in it masked: a bug must not show a database password. Call it once,
/// from `main`.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line()));
        eprintln!(
            "wmsctl: internal error, a bug in wmsctl (exit {}): {}{}",
            exit::INTERNAL,
            output::escape(&config::redact_urls(&message)),
            location.unwrap_or_default()
        );
    }));
}

/// Runs `wmsctl` with the given arguments (the first is the program name) and returns the exit
/// code. Data goes to stdout; notes and errors go to stderr. A panic ends in exit code 70, the
/// internal error, rather than the runtime's 101.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    config::load_dotenv(&args);
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // Help and version go to stdout as clap prints them; a usage error goes to stderr with
        // the same `wmsctl:` prefix as every other error.
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return exit::code(exit::OK);
        }
        Err(err) => {
            eprint!("wmsctl: {}", err.render());
            return exit::code(exit::USAGE);
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
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(async {
            if cfg!(debug_assertions)
                && let Some(message) = std::env::var_os(PANIC_FOR_TEST_VAR)
            {
                panic!("{}", message.to_string_lossy());
            }
            commands::run(cli, ui.clone()).await
        })
    }));
    match outcome {
        Ok(Ok(code)) => exit::code(code),
        Ok(Err(err)) => {
            let (code, name) = exit::classify(&err);
            if code != exit::OUTPUT_CLOSED {
                report(&ui, &err, name);
            }
            exit::code(code)
        }
        Err(_panic) => exit::code(exit::INTERNAL),
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
