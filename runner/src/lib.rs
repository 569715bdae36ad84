//! The pipeline machinery behind the `runner` binary: recipe parsing, the typed DAG, the
//! content-addressed cache, the scheduler and the CLI. The binary is `cli::main_with` over
//! `ops::builtin()`; tests call the same entry point with test-only ops registered.

pub mod cache;
pub mod cli;
pub mod diag;
pub mod graph;
pub mod recipe;
pub mod schedule;
