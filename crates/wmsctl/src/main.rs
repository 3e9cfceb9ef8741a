//! The `wmsctl` binary: everything happens in [`wmsctl::run`], which tests call too.

fn main() -> std::process::ExitCode {
    wmsctl::run(std::env::args_os())
}
