//! Datasets (parquet/json/jsonl rows as typed values), model folders, and what turns rows into
//! training batches: conversations, chat templates, images, tokenization, collation.

pub mod archive;
pub mod chat_template;
pub mod collate;
pub mod conversation;
pub mod data_files;
pub mod dataset;
pub mod format;
pub mod holdout;
pub mod image;
pub mod model_dir;
pub mod prepare;
pub mod processor;
pub mod resize;
pub mod stream;
pub mod value;
