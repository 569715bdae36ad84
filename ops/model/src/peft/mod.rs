//! The `adapter` artifact: a PEFT LoRA adapter folder exactly as `PeftModel.save_pretrained`
//! writes it (peft 0.21.2), so that `PeftModel.from_pretrained(base, dir)` loads it.
//!
//! - `adapter_config.json`: every key PEFT writes, `json.dumps(indent=2, sort_keys=True)` with no
//!   final newline, `inference_mode` true (PEFT sets it while saving).
//! - `adapter_model.safetensors`: metadata `{"format": "pt"}`; keys
//!   `base_model.model.<module path>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`
//!   (the adapter name `default` removed), and for `modules_to_save`
//!   `base_model.model.<module path>.weight` (the trained copy). Module paths are the in-memory
//!   names of the transformers model (`model.language_model.layers.0.self_attn.q_proj`,
//!   `model.vision_tower.encoder.layers.0.mlp.fc1`, `lm_head`, ...).
//!
//! The training loop also writes `metrics.jsonl` (`train::metrics`), `runs/` (TensorBoard,
//! `train::tensorboard`) and `trainer_state.json` beside these files; PEFT ignores them.

//!
//! Split along the format's seams: [`config`] (adapter_config.json), [`tensors`] (element types,
//! host tensors, PEFT key names), [`io`] (reading, validating and writing a folder) and
//! [`source`] (importing a folder made elsewhere and checking it against a base model).

pub mod config;
pub mod io;
pub mod source;
pub mod tensors;

pub use config::*;
pub use io::*;
pub use source::*;
pub use tensors::*;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's key prefix: `PeftModel.base_model` (LoraModel) `.model` (the transformers model).
pub const KEY_PREFIX: &str = "base_model.model.";
/// The PEFT version whose file format this module writes (and records in `peft_version`).
pub const PEFT_VERSION: &str = "0.21.2";

#[cfg(test)]
mod tests;
