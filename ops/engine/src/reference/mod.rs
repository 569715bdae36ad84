//! Plain-Rust references of every GPU kernel: slow, obvious, and the truth the WGSL kernels are
//! tested against (llm.c style). Shapes are row-major and written beside every argument.

pub mod accumulate;
pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cast;
pub mod cross_entropy;
pub mod decode_attention;
pub mod embedding;
pub mod greedy;
pub mod lora;
pub mod matmul;
pub mod nf4;
pub mod norm;
pub mod patch;
pub mod pool;
pub mod reduce;
pub mod rope;
pub mod row_blocks;
