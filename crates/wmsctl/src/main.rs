//! The `wmsctl` binary: everything happens in [`wmsctl::run`], which tests call too.

/// An import allocates and frees a few small values per field of every line; mimalloc's
/// per-thread free lists do that in a fraction of the time the system allocator takes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    wmsctl::install_panic_hook();
    wmsctl::run(std::env::args_os())
}
