//! Publishing a trained adapter: the output folder `save` writes (PEFT adapter, processor files,
//! model card, recipe, optional merged model) and the merge of LoRA into the base weights.
//! Uploads to the Hub live in [`crate::hub::upload`].

pub mod card;
pub mod folder;
pub mod merge;
