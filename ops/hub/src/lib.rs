//! The Hugging Face Hub: the local cache layout, downloads (through `hf-hub`) and uploads
//! (the commit API, as huggingface_hub does it).

pub mod cache;
pub mod download;
pub mod upload;
