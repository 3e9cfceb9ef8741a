//! `completions SHELL`: a completion script on stdout.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::Cli;
use crate::exit::OK;

pub fn run(shell: clap_complete::Shell) -> Result<u8> {
    // Written to memory first: clap_complete panics when it cannot write, and a reader that
    // stops early (`| head`) is no bug.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "wmsctl", &mut script);
    std::io::stdout().lock().write_all(&script)?;
    Ok(OK)
}
