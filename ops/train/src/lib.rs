//! The training loop's pieces: loss normalisation, optimizer, schedule, clipping, checkpoints,
//! and metrics (metrics.jsonl and TensorBoard event files).

pub mod checkpoint;
pub mod grad_sync;
pub mod lora_init;
pub mod metrics;
pub mod optimizer;
pub mod params;
pub mod reference_model;
pub mod schedule;
pub mod setup;
pub mod sources;
pub mod tensorboard;
pub mod train_config;
pub mod trainer;
