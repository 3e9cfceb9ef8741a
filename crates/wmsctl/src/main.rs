//! The `wmsctl` binary: everything happens in [`wmsctl::run`], which tests call too.

fn main() -> std::process::ExitCode {
    wmsctl::install_panic_hook();
    wmsctl::run(std::env::args_os())
}
