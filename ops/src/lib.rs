//! Every op of a recipe.
//!
//! An op file (`load.rs`, `unzip.rs`, ...) is thin glue: it declares its ports and parameters
//! and calls a domain crate beside this one. The crates, bottom up (README, "Architecture"):
//! `op-api` (the [`Op`] trait, artifacts, params) and `dist` (ranks); `engine` (the GPU: device,
//! kernels and their references), `hub` and `data`; `model` (Gemma 3 on the engine); `train`
//! (the loop). They are re-exported here under the module names they had when they were one
//! crate, so `ops::gpu::Gpu` and `ops::train::trainer` read as before.

pub mod collate;
pub mod eval;
pub mod format;
pub mod generate;
pub mod generation;
pub mod load;
pub mod lora_train;
pub mod publish;
pub mod push;
pub mod quantize;
pub mod save;
pub mod score;
pub mod sources;
pub mod template;
pub mod unzip;

pub use ::data;
pub use ::dist;
pub use ::hub;
pub use ::model;
/// The `train` crate, plus the two modules that moved below it into `model` (the trait the
/// trainer drives, and the PEFT adapter format) under their old names.
pub mod train {
    pub use ::model::peft as adapter;
    pub use ::model::train_model as model;
    pub use ::train::*;
}
pub use engine::{gpu, reference};
pub use op_api::*;

use std::sync::Arc;

/// Every op the runner ships.
pub fn builtin() -> Registry {
    let mut registry = Registry::empty();
    registry.register(Arc::new(load::Load));
    registry.register(Arc::new(push::PushOp));
    registry.register(Arc::new(quantize::Quantize));
    registry.register(Arc::new(save::SaveOp));
    registry.register(Arc::new(unzip::Unzip));
    registry.register(Arc::new(format::FormatOp));
    registry.register(Arc::new(template::TemplateOp));
    registry.register(Arc::new(collate::CollateOp));
    registry.register(Arc::new(lora_train::LoraTrainOp::default()));
    registry.register(Arc::new(eval::EvalOp));
    registry.register(Arc::new(generate::GenerateOp));
    registry.register(Arc::new(score::ScoreOp));
    registry
}
