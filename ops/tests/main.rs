//! The ops crate's integration tests, one binary (each file a module): every test binary links
//! wgpu, arrow, tokenizers and the image codecs, so one link instead of sixteen.

mod common;

mod bad_inputs;
mod collate_fixtures;
mod fixtures;
mod generate;
mod gpu_model;
mod gpu_vision;
mod image_golden;
mod lora_train_op;
mod memory_plan;
mod model_quantize;
mod model_weights;
mod nf4_report_shape;
mod nf4_shapes;
mod reference_model;
mod train_loop;
