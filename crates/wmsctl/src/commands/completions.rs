//! `completions SHELL`: a completion script on stdout.

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::Cli;
use crate::exit::OK;

pub fn run(shell: clap_complete::Shell) -> Result<u8> {
    clap_complete::generate(shell, &mut Cli::command(), "wmsctl", &mut std::io::stdout());
    Ok(OK)
}
