//! Kernel families: one module per `shaders/<family>.wgsl`. Each wrapper is a method on
//! [`super::Gpu`] that records into a [`super::Recorder`].

use anyhow::{ensure, Result};

use super::recorder::Bound;
use super::{DType, GpuTensor};

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

pub use adamw::AdamWStep;
pub use lora::Lora;
pub use matmul::{CoopConfig, MatmulOpts, MatmulPrecision};
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

/// The four-elements-per-invocation kernels of an elementwise op (their params get the chunk's
/// vec4 count): `plain` over vec4 views of every tensor, and `staged` for adapters that stage
/// operands.
pub(crate) struct Vec4Kernels<'a> {
    pub plain: &'a super::Kernel,
    pub staged: Option<StagedVec4<'a>>,
}

/// An elementwise kernel that reads the tensors `read` from staged copies (slots 0.. in that
/// order) and binds the tensors `written` first as vec4 storage, then the textures.
pub(crate) struct StagedVec4<'a> {
    pub kernel: &'a super::Kernel,
    pub written: &'a [usize],
    pub read: &'a [usize],
}

/// [`elementwise`] that runs `kernels4` on every chunk whose element count is a multiple of 4
/// (the staged one where every tensor could be staged), and `kernel` on the others.
pub(crate) fn elementwise_vec4<P: bytemuck::Pod>(
    gpu: &super::Gpu,
    rec: &mut super::Recorder,
    kernel: &super::Kernel,
    kernels4: Option<Vec4Kernels>,
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
        let k4 = kernels4.as_ref().filter(|_| n.is_multiple_of(4));
        let Some(k4) = k4 else {
            let p = params(n as u32);
            let groups = super::groups_1d(gpu, n.div_ceil(256) as u32);
            rec.dispatch(kernel, bytemuck::bytes_of(&p), &views, groups);
            continue;
        };
        let p = params((n / 4) as u32);
        let groups = super::groups_1d(gpu, (n / 4).div_ceil(256) as u32);
        let staged: Option<Vec<_>> = k4.staged.as_ref().and_then(|st| {
            st.read
                .iter()
                .enumerate()
                .map(|(slot, &i)| rec.stage(slot, &views[i], super::staging::StageFormat::F32))
                .collect()
        });
        match (&k4.staged, staged) {
            (Some(st), Some(staged)) => {
                let bindings: Vec<Bound> = st
                    .written
                    .iter()
                    .map(|&i| Bound::Buffer(views[i].clone()))
                    .chain(staged.iter().map(|t| Bound::Texture(t)))
                    .collect();
                rec.dispatch_bound(st.kernel, bytemuck::bytes_of(&p), &bindings, groups);
            }
            _ => rec.dispatch(k4.plain, bytemuck::bytes_of(&p), &views, groups),
        }
    }
    Ok(())
}

/// A composed module and the entry points dispatched from it.
pub(crate) type Variant = (super::Shader, Vec<&'static str>);

/// Every module every family dispatches ([`super::shader::all_variants`]).
pub(crate) fn shader_variants() -> Result<Vec<Variant>> {
    let families: [fn() -> Result<Vec<Variant>>; 19] = [
        accumulate::variants,
        activation::variants,
        adamw::variants,
        attention::variants,
        cast::variants,
        cross_entropy::variants,
        decode_attention::variants,
        embedding::variants,
        greedy::variants,
        lora::variants,
        matmul::variants,
        matmul::grouped::variants,
        nf4::variants,
        norm::variants,
        patch::variants,
        pool::variants,
        reduce::variants,
        rope::variants,
        row_blocks::variants,
    ];
    let mut all = Vec::new();
    for family in families {
        all.extend(family()?);
    }
    Ok(all)
}
