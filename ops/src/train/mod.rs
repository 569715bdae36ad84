//! The training loop's pieces: loss normalisation, optimizer, schedule, clipping, checkpoints,
//! and metrics (metrics.jsonl and TensorBoard event files).

pub mod adapter;
pub mod metrics;
pub mod model;
pub mod tensorboard;
