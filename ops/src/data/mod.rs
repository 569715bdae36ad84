//! Datasets (parquet/json/jsonl rows as typed values) and model folders.

pub mod data_files;
pub mod dataset;
pub mod model_dir;
pub mod value;
