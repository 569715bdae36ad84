//! The GPU engine: the wgpu device and its buffer pool, the WGSL kernels (`gpu::kernels`,
//! composed from `shaders/`), and beside each kernel a plain-Rust reference (`reference`) that
//! its randomized tests compare against. Shape types shared by a kernel and its reference live
//! in [`shapes`].

pub mod dtype;
pub mod gpu;
pub mod reference;
pub mod shapes;
