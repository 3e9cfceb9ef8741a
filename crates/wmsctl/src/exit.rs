//! Exit codes, in one place. Scripts rely on them: they are documented in `--help` and the
//! README, and never renumbered.

use std::process::ExitCode;

use idem_core::Error;

/// Success, including a replayed duplicate.
pub const OK: u8 = 0;
/// A negative answer: a key not live, an unknown id, a stock difference, pending migrations.
pub const NEGATIVE: u8 = 1;
/// Usage: a bad flag or value.
pub const USAGE: u8 = 2;
/// The key was used for a different request.
pub const KEY_CONFLICT: u8 = 3;
/// A duplicate refused under `--on-duplicate fail`.
pub const DUPLICATE_REFUSED: u8 = 4;
/// Data refused: a stock rule rejected the posting, or an import had refused lines.
pub const DATA_REFUSED: u8 = 65;
/// An input file is missing or unreadable.
pub const NO_INPUT: u8 = 66;
/// The database is unavailable.
pub const UNAVAILABLE: u8 = 69;
/// An internal error.
pub const INTERNAL: u8 = 70;
/// An output file cannot be created.
pub const CANT_CREATE: u8 = 73;
/// A temporary failure: safe to retry with the same key.
pub const TEMPORARY: u8 = 75;
/// The database denied permission.
pub const PERMISSION: u8 = 77;
/// A configuration error: bad URL, schema out of date.
pub const CONFIG: u8 = 78;
/// Standard output was closed before all of it was written, as when `head` stops reading: what
/// a shell reports for a process ended by SIGPIPE (128 + 13), so that `set -o pipefail` sees
/// the output cut short. Nothing is printed for it.
pub const OUTPUT_CLOSED: u8 = 141;

/// The table printed at the end of `--help`.
pub const HELP_TABLE: &str = "\
Exit codes:
   0  success, including a replayed duplicate
   1  negative answer: key not live, unknown id or key, stock differs from ledger,
      migrations pending
   2  usage: a bad flag or value
   3  key conflict: the key was used for a different request
   4  duplicate refused (--on-duplicate fail)
  65  data refused: stock rule rejected the posting, or import had refused lines
  66  input file missing or unreadable
  69  database unavailable
  70  internal error
  73  output file (reject file) cannot be created
  75  temporary failure (busy, lock held, connection lost, outcome unknown, disk
      full): safe to retry with the same key
  77  database permission denied: read-only database file or directory, missing
      privilege, or --user naming another operator on an operator role
  78  configuration error: bad URL, schema out of date or newer than this build,
      a file that is not a wmsctl database
 141  standard output closed before all of it was written (as by head)";

/// The exit code for a library error.
pub fn for_error(err: &Error) -> u8 {
    match err {
        Error::InvalidInput { .. } => USAGE,
        Error::KeyConflict { .. } => KEY_CONFLICT,
        Error::DuplicateRefused { .. } => DUPLICATE_REFUSED,
        Error::InsufficientStock { .. } => DATA_REFUSED,
        Error::NotFound { .. } => NEGATIVE,
        Error::Unavailable { .. } => UNAVAILABLE,
        Error::PermissionDenied { .. } => PERMISSION,
        Error::NotADatabase { .. }
        | Error::Config { .. }
        | Error::SchemaOutOfDate { .. }
        | Error::SchemaTooNew { .. } => CONFIG,
        err if err.is_temporary() => TEMPORARY,
        Error::StorageFull { .. } => TEMPORARY,
        _ => INTERNAL,
    }
}

/// A failure of the command line itself, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: u8,
    pub kind: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, kind: &'static str, message: impl Into<String>) -> Self {
        Failure { code, kind, message: message.into() }
    }
}

/// The exit code and stable error name for any error chain.
pub fn classify(err: &anyhow::Error) -> (u8, &'static str) {
    for cause in err.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return (failure.code, failure.kind);
        }
        if let Some(err) = cause.downcast_ref::<Error>() {
            return (for_error(err), err.code());
        }
        // A database connection's broken pipe is inside a library error, found above: a bare
        // one is the command's own output.
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return (OUTPUT_CLOSED, "output_closed");
        }
    }
    (INTERNAL, "internal")
}

pub fn code(value: u8) -> ExitCode {
    ExitCode::from(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [u8; 14] = [
        OK,
        NEGATIVE,
        USAGE,
        KEY_CONFLICT,
        DUPLICATE_REFUSED,
        DATA_REFUSED,
        NO_INPUT,
        UNAVAILABLE,
        INTERNAL,
        CANT_CREATE,
        TEMPORARY,
        PERMISSION,
        CONFIG,
        OUTPUT_CLOSED,
    ];

    #[test]
    fn every_exit_code_is_documented_in_help_and_readme() {
        let readme = include_str!("../../../README.md");
        let help_codes: Vec<u8> = HELP_TABLE
            .lines()
            .filter_map(|line| line.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(help_codes, ALL, "--help lists exactly the exit codes, in order");
        for code in ALL {
            assert!(readme.contains(&format!("\n| {code} | ")), "README lacks exit code {code}");
        }
    }
}
