//! The recipe machinery behind the `runner` binary: recipe parsing, the typed DAG, the
//! content-addressed cache, the scheduler and the CLI. It depends on the op API and the ranks
//! only; the binary (`runner/src/main.rs`) runs `cli::main_with` over `ops::builtin()` with the
//! GPU engine's [`cli::GpuCommands`], and tests call the same entry point with test-only ops.

pub mod cache;
pub mod cli;
pub mod diag;
pub mod graph;
pub mod recipe;
pub mod schedule;
