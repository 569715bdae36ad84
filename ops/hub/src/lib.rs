//! The Hugging Face Hub: the local cache layout, downloads (through `hf-hub`) and uploads
//! (the commit API, as huggingface_hub does it).

pub mod cache;
pub mod download;
#[cfg(any(test, feature = "testing"))]
pub mod test_server;
pub mod upload;
