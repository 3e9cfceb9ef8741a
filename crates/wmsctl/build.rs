//! Links `wmsctl` as a position-dependent executable where the platform allows it.
//!
//! A position-independent executable has every pointer in its read-only data fixed up by the
//! dynamic loader at each start, which touches (and copies) hundreds of pages of a binary this
//! size: about half a millisecond of every call, measured with `hyperfine` on
//! `wmsctl keys generate`. A cron line or a script calls `wmsctl` once per posting, so start-up
//! is part of every posting's cost. The shared libraries it loads are still placed at random.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bin=wmsctl=-no-pie");
    }
}
