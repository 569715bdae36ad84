//! Exists for the `[build-dependencies]` entry of Cargo.toml, which applies only to a package
//! with a build script: it keeps the default build's proc-macro `syn` identical to the
//! `distributed` build's, so that switching between the two rebuilds ops, runner and the MPI
//! crates rather than the whole dependency graph.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
