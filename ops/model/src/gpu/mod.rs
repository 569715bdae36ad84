//! `Gemma3ForConditionalGeneration` on the GPU kernels: forward and the backward LoRA training
//! needs, layer by layer the twin of [`crate::reference`] (which tests it).

pub mod linear;

pub use linear::{BaseWeight, DenseStorage, GpuLinear, GpuLinearCache, GpuLoraPair, LoraRun};
pub mod decoder;
pub mod kv_cache;
pub mod model;
pub mod projector;
pub mod siglip;
