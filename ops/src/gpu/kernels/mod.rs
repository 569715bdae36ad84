//! Kernel families: one module per `shaders/<family>.wgsl`. Each wrapper is a method on
//! [`super::Gpu`] that records into a [`super::Recorder`].

use anyhow::{ensure, Result};

use super::{DType, GpuTensor};

pub mod accumulate;
pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cast;
pub mod cross_entropy;
pub mod embedding;
pub mod lora;
pub mod matmul;
pub mod nf4;
pub mod norm;
pub mod patch;
pub mod pool;
pub mod reduce;
pub mod rope;

pub use adamw::AdamWStep;
pub use lora::Lora;
pub use matmul::MatmulOpts;
pub use nf4::{DoubleQuant, Nf4Weight};
pub use rope::RopeTables;

/// (rows, cols) of a tensor seen as [everything but the last dimension, last dimension].
pub(crate) fn rows_cols(t: &GpuTensor) -> (usize, usize) {
    let cols = t.shape().last().copied().unwrap_or(1);
    (t.numel() / cols.max(1), cols)
}

/// Checks dtype and element count, naming the argument in the error.
pub(crate) fn check(op: &str, name: &str, t: &GpuTensor, dtype: DType, numel: usize) -> Result<()> {
    ensure!(
        t.dtype() == dtype && t.numel() == numel,
        "{op}: `{name}` must be {dtype:?} with {numel} elements, got {:?} {:?}",
        t.dtype(),
        t.shape()
    );
    Ok(())
}

/// Dispatches an elementwise kernel (256 invocations per workgroup, one element each) once per
/// chunk. All `tensors` must have the same shape and dtype, hence the same chunking; `params`
/// gets the chunk's element count.
pub(crate) fn elementwise<P: bytemuck::Pod>(
    gpu: &super::Gpu,
    rec: &mut super::Recorder,
    kernel: &super::Kernel,
    tensors: &[&GpuTensor],
    params: impl Fn(u32) -> P,
) -> Result<()> {
    elementwise_vec4(gpu, rec, kernel, None, tensors, params)
}

/// [`elementwise`] that runs `kernel4` (four elements per invocation over vec4 views; its
/// params get the chunk's vec4 count) on every chunk whose element count is a multiple of 4,
/// and `kernel` on the others.
pub(crate) fn elementwise_vec4<P: bytemuck::Pod>(
    gpu: &super::Gpu,
    rec: &mut super::Recorder,
    kernel: &super::Kernel,
    kernel4: Option<&super::Kernel>,
    tensors: &[&GpuTensor],
    params: impl Fn(u32) -> P,
) -> Result<()> {
    let first = tensors[0];
    for t in tensors {
        ensure!(
            t.shape() == first.shape() && t.dtype() == first.dtype(),
            "{}: operands differ: {:?} {:?} vs {:?} {:?}",
            kernel.name,
            t.shape(),
            t.dtype(),
            first.shape(),
            first.dtype()
        );
    }
    for (c, chunk) in first.chunks().iter().enumerate() {
        let n = chunk.rows * first.row_len();
        let views: Vec<_> = tensors.iter().map(|t| t.chunks()[c].view()).collect();
        let (k, items) = match kernel4 {
            Some(k4) if n.is_multiple_of(4) => (k4, n / 4),
            _ => (kernel, n),
        };
        let p = params(items as u32);
        rec.dispatch(
            k,
            bytemuck::bytes_of(&p),
            &views,
            super::groups_1d(gpu, items.div_ceil(256) as u32),
        );
    }
    Ok(())
}

/// For shader files holding several kernels: the common header (everything before the first
/// `//== kernel <name>` line) plus the named kernel's section, so each pipeline module holds
/// only its own entry point.
pub(crate) fn shader_section(family: &str, source: &str, kernel: &str) -> super::ShaderSource {
    let mut header = String::new();
    let mut section = String::new();
    let mut current: Option<&str> = None;
    for line in source.lines() {
        if let Some(name) = line.strip_prefix("//== kernel ") {
            current = Some(name.trim());
            continue;
        }
        let target = match current {
            None => &mut header,
            Some(name) if name == kernel => &mut section,
            Some(_) => continue,
        };
        target.push_str(line);
        target.push('\n');
    }
    assert!(
        !section.is_empty(),
        "shaders/{family}.wgsl has no kernel `{kernel}`"
    );
    super::ShaderSource {
        name: format!("{family}+{kernel}"),
        source: header + &section,
    }
}
