//! Matrix multiply: `C = alpha · op(A) · op(B) + beta · C + bias`, batched, over chunked operands.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::recorder::Bound;
use crate::gpu::staging::{StageFormat, StagedTexture};
use crate::gpu::tune::{KernelPath, MatmulTiling};
use crate::gpu::{BufView, DType, Gpu, GpuTensor, Recorder, Shader, Tiling};

mod codegen;
mod coop;
pub mod grouped;
mod tuning;
pub use codegen::CoopConfig;
pub(crate) use codegen::{register_tile, subgroup_kernel, unrolled_register_kernel};
use codegen::{subgroup_k_inner, subgroup_tile};
use coop::coop_shader;

/// How a variant of `shaders/matmul.wgsl` reads its operands: A and B as vec4 or scalar
/// views, bound as storage buffers or as staged linear textures, B an f32 matrix, an NF4
/// weight or a bf16 matrix, every value rounded to f16 or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Operands {
    pub vec4: bool,
    pub textures: bool,
    pub nf4: bool,
    /// B stored as bf16 (two per u32 word).
    pub bf16_b: bool,
    pub f16: bool,
    /// B staged in the rows kernel's row-block layout (`matmul_rows_split` only).
    pub row_blocks: bool,
}

impl Operands {
    fn features(self) -> Vec<&'static str> {
        [
            (self.vec4, "VEC4"),
            (self.textures, "TEXTURES"),
            (self.nf4, "NF4"),
            (self.bf16_b, "BF16B"),
            (self.f16, "F16"),
            (self.row_blocks, "ROW_BLOCKS"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// The matmul module for `operands`.
pub(crate) fn shader(operands: Operands) -> Result<Shader> {
    Shader::compose("matmul", &operands.features())
}

/// The precision of a matmul's operands. Products and sums are f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    #[default]
    F32,
    /// Every value of A and B (an NF4 weight after dequantization) rounded to f16 as it is
    /// read, as f16 tensor math takes it; needs `SHADER_F16`. Values past f16's range (65504)
    /// have no defined f16 value: only for matmul operands, never norms or the residual stream.
    F16,
}

impl MatmulPrecision {
    /// `"f32"` or `"f16"` (the `matmul_precision` param).
    pub fn parse(s: &str) -> Result<MatmulPrecision> {
        match s {
            "f32" => Ok(MatmulPrecision::F32),
            "f16" => Ok(MatmulPrecision::F16),
            other => bail!("expected \"f32\" or \"f16\", got \"{other}\""),
        }
    }
}

/// Every module and entry point [`Gpu::record_gemm_with`] can dispatch (validated by
/// `gpu::shader`'s tests): the workgroup and register kernels on storage buffers, the
/// generated subgroup kernels at the configured tile on buffers or textures, and the unrolled
/// register kernels, each for both operand widths, B as f32, NF4 or bf16 (f32 operands: the
/// bf16 tables never meet the f16 switch, which applies to the base's linears), f32 or f16
/// operands.
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    let mut all = Vec::new();
    let combos = (0..8)
        .map(|i| [i & 1 != 0, i & 2 != 0, false, i & 4 != 0])
        .chain([false, true].map(|vec4| [vec4, false, true, false]));
    for [vec4, nf4, bf16_b, f16] in combos {
        let operands = Operands {
            vec4,
            textures: false,
            nf4,
            bf16_b,
            f16,
            row_blocks: false,
        };
        all.push((
            shader(operands)?,
            vec!["matmul_register", "matmul_workgroup", "matmul_rows"],
        ));
        let staged = Operands {
            textures: true,
            ..operands
        };
        all.push((shader(staged)?, vec!["matmul_rows_split"]));
        if vec4 && !nf4 && !f16 {
            let row_blocks = Operands {
                row_blocks: true,
                ..staged
            };
            all.push((shader(row_blocks)?, vec!["matmul_rows_split"]));
        }
        for cfg in [
            CoopConfig {
                size: 8,
                f16: false,
            },
            CoopConfig {
                size: 16,
                f16: true,
            },
        ] {
            all.push((coop_shader(operands, cfg, 32)?, vec!["matmul_coop"]));
        }
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for (textures, lanes) in [(false, 8), (true, 8), (true, 4), (true, 16)] {
                    let (tm, tn) = subgroup_tile();
                    let staged = Operands {
                        textures,
                        ..operands
                    };
                    let sg = subgroup_shader(lanes, staged, tm, tn, trans_a, trans_b)?;
                    all.push((sg, vec!["matmul_subgroup"]));
                }
                let (tm, tn) = register_tile();
                let unrolled = unrolled_shader(operands, tm, tn, trans_a, trans_b)?;
                all.push((unrolled, vec!["matmul_register_unrolled"]));
            }
        }
    }
    Ok(all)
}

/// Whether the subgroup kernel may read its operands from staged textures (where the adapter
/// stages: [`crate::gpu::staging`]); env `RUNNER_MATMUL_STAGE=0` binds the storage buffers
/// instead, for benchmarking.
fn stage_operands() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| std::env::var("RUNNER_MATMUL_STAGE").map_or(true, |v| v != "0"))
}

/// Up to this many rows of A, `x·Wᵀ` runs the rows kernel (`matmul_rows`: one dot product per
/// output) instead of a tiled one: decoding multiplies one row per sequence.
pub const ROWS_KERNEL_MAX_M: u32 = 8;

/// Outputs per workgroup of the staged rows kernels (`shaders/lib/rows_split.wgsl`: SPLIT_ROWS
/// outputs per subgroup times SPLIT_SUBGROUPS).
pub(crate) const SPLIT_ROWS_PER_WORKGROUP: u32 = 64;

/// Whether the rows kernel is used (env `RUNNER_MATMUL_ROWS=0`: never, for benchmarking).
fn rows_kernel() -> bool {
    static R: OnceLock<bool> = OnceLock::new();
    *R.get_or_init(|| std::env::var("RUNNER_MATMUL_ROWS").map_or(true, |v| v != "0"))
}

/// Whether frozen weights of decode products are kept in row blocks where they qualify
/// ([`crate::gpu::kernels::row_blocks`]; env `RUNNER_ROW_BLOCKS=0`: linearly, for benchmarking).
pub(crate) fn row_blocks_enabled() -> bool {
    static R: OnceLock<bool> = OnceLock::new();
    *R.get_or_init(|| std::env::var("RUNNER_ROW_BLOCKS").map_or(true, |v| v != "0"))
}

/// Options of [`Gpu::matmul`]. `Default`: plain `C = A·B`.
#[derive(Clone, Copy)]
pub struct MatmulOpts<'a> {
    /// A stored [K, M] (or [batch, K, M]): computes Aᵀ·B.
    pub trans_a: bool,
    /// B stored [N, K]: computes A·Bᵀ (a linear layer `x·Wᵀ` with W [out, in]).
    pub trans_b: bool,
    pub alpha: f32,
    /// Accumulate epilogue: `C = ... + beta·C` (0 overwrites without reading C).
    pub beta: f32,
    /// Bias epilogue: a [N] f32 vector added to every row.
    pub bias: Option<&'a GpuTensor>,
    /// The operands' precision (f32 accumulation either way).
    pub precision: MatmulPrecision,
    /// B is a frozen weight whose bytes never change: while a
    /// [`crate::gpu::staging::StagedWeightsHold`] lives (generation) CPU adapters stage it
    /// once and keep it, instead of copying it before every product.
    pub frozen_b: bool,
}

impl Default for MatmulOpts<'_> {
    fn default() -> Self {
        MatmulOpts {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            bias: None,
            precision: MatmulPrecision::F32,
            frozen_b: false,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
pub(crate) struct GemmParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub has_bias: u32,
    pub a_off: u32,
    pub lda: u32,
    pub a_batch: u32,
    pub b_off: u32,
    pub ldb: u32,
    pub b_batch: u32,
    pub c_off: u32,
    pub ldc: u32,
    pub c_batch: u32,
    pub bias_off: u32,
    pub alpha: f32,
    pub beta: f32,
}

/// Whether this adapter runs [`subgroup_kernel`]: it needs subgroups of one fixed width (its
/// workgroup must be one whole subgroup, and its broadcasts name lanes by constant index),
/// generated for that width.
fn subgroup_kernel_fits(gpu: &Gpu) -> bool {
    !plain_register_kernel_forced() && subgroup_width(gpu).is_some()
}

/// The subgroup width the generated kernels are built for: the adapter's, where it has
/// SUBGROUP and one fixed width between 4 and 64.
pub(crate) fn subgroup_width(gpu: &Gpu) -> Option<u32> {
    let info = gpu.adapter_info();
    let w = info.subgroup_min_size;
    (gpu.features().contains(wgpu::Features::SUBGROUP)
        && w == info.subgroup_max_size
        && (4..=64).contains(&w))
    .then_some(w)
}

/// Tests of the plain register kernel switch the subgroup kernel off on their own thread.
#[cfg(test)]
fn plain_register_kernel_forced() -> bool {
    tests::PLAIN_REGISTER_KERNEL.with(|f| f.get())
}
#[cfg(not(test))]
fn plain_register_kernel_forced() -> bool {
    false
}

/// The matmul module with the generated subgroup kernel for this variant (and `lanes`) appended.
fn subgroup_shader(
    lanes: u32,
    operands: Operands,
    tm: u32,
    tn: u32,
    trans_a: bool,
    trans_b: bool,
) -> Result<Shader> {
    let k_inner = subgroup_k_inner();
    Shader::generated(
        "matmul",
        &operands.features(),
        &("subgroup", lanes, tm, tn, trans_a, trans_b, k_inner),
        || subgroup_kernel(lanes, tm, tn, trans_a, trans_b, k_inner),
    )
}

/// The matmul module (storage buffers) with the unrolled register kernel for this variant
/// appended.
fn unrolled_shader(
    operands: Operands,
    tm: u32,
    tn: u32,
    trans_a: bool,
    trans_b: bool,
) -> Result<Shader> {
    Shader::generated(
        "matmul",
        &Operands {
            textures: false,
            ..operands
        }
        .features(),
        &("unrolled", tm, tn, trans_a, trans_b),
        || unrolled_register_kernel(tm, tn, trans_a, trans_b),
    )
}

/// Copies a GEMM's A, B (and NF4 absmax) into staging slots 0, 1 (and 2): f32 texels, the
/// packed NF4 words as u32. `None` when any of them cannot be staged.
fn stage_gemm_operands(
    rec: &mut Recorder,
    g: &Gemm,
    nf4: Option<&(BufView, usize)>,
) -> Option<Vec<std::sync::Arc<StagedTexture>>> {
    let b_format = if nf4.is_some() || g.b_bf16 {
        StageFormat::U32
    } else {
        StageFormat::F32
    };
    // a frozen weight kept staged (generation) is not copied again
    let mut stage = |slot: usize, view: &BufView, format: StageFormat| match g.frozen_b {
        true => rec
            .stage_frozen(view, format)
            .or_else(|| rec.stage(slot, view, format)),
        false => rec.stage(slot, view, format),
    };
    let b = stage(1, &g.b, b_format)?;
    let absmax = match nf4 {
        Some((absmax, _)) => Some(stage(2, absmax, StageFormat::F32)?),
        None => None,
    };
    let mut staged = vec![rec.stage(0, &g.a, StageFormat::F32)?, b];
    staged.extend(absmax);
    Some(staged)
}

impl Gemm {
    /// How the kernels read this product's operands: vec4 views where every offset, leading
    /// dimension, batch stride and contiguous extent of A and B is a multiple of 4 — of 8 for a
    /// bf16 B, whose staged rows kernel reads whole texels of eight elements.
    fn operands(&self, nf4: bool) -> Operands {
        let p = &self.params;
        let b_align = if self.b_bf16 { 8 } else { 4 };
        let vec4 = [p.a_off, p.lda, p.a_batch, self.a_contig]
            .iter()
            .all(|v| v % 4 == 0)
            && [p.b_off, p.ldb, p.b_batch, self.b_contig]
                .iter()
                .all(|v| v % b_align == 0);
        Operands {
            vec4,
            textures: false,
            nf4,
            bf16_b: self.b_bf16,
            f16: self.f16,
            row_blocks: false,
        }
    }

    /// The pipeline constants every matmul kernel takes: the transposes, and the NF4 block
    /// size of an NF4 B.
    fn constants(&self, nf4_block: Option<usize>) -> Vec<(&'static str, f64)> {
        let mut constants = vec![
            ("TRANS_A", self.trans_a as u32 as f64),
            ("TRANS_B", self.trans_b as u32 as f64),
        ];
        if let Some(block) = nf4_block {
            constants.push(("NF4_BLOCK", block as f64));
        }
        constants
    }
}

/// A GEMM's bindings: A, B, C, bias, then the NF4 absmax; A, B and absmax as the textures
/// `staged` holds (from [`stage_gemm_operands`]) where they were staged.
fn gemm_bindings<'t>(
    g: &Gemm,
    staged: Option<&'t [std::sync::Arc<StagedTexture>]>,
    nf4: Option<(BufView, usize)>,
    bias: BufView,
) -> Vec<Bound<'t>> {
    let (a, b, absmax) = match staged {
        Some(s) => (
            Bound::Texture(&s[0]),
            Bound::Texture(&s[1]),
            s.get(2).map(|t| Bound::Texture(t)),
        ),
        None => (
            Bound::Buffer(g.a.clone()),
            Bound::Buffer(g.b.clone()),
            nf4.map(|(v, _)| Bound::Buffer(v)),
        ),
    };
    let mut bindings = vec![a, b, Bound::Buffer(g.c.clone()), Bound::Buffer(bias)];
    bindings.extend(absmax);
    bindings
}

/// One sub-problem over single buffers (what one dispatch computes).
#[derive(Clone)]
pub(crate) struct Gemm {
    pub a: BufView,
    pub b: BufView,
    pub c: BufView,
    pub bias: Option<BufView>,
    pub params: GemmParams,
    pub batch: u32,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Contiguous extents of the stored A and B (must be multiples of 4 for the vec4 variant).
    pub a_contig: u32,
    pub b_contig: u32,
    /// Round every operand value to f16 ([`MatmulPrecision::F16`]).
    pub f16: bool,
    /// B is bf16 (two per word; offsets and leading dimensions still count elements).
    pub b_bf16: bool,
    /// B is a frozen weight ([`MatmulOpts::frozen_b`]).
    pub frozen_b: bool,
}

impl Gpu {
    /// Records `C = alpha · op(A) · op(B) + beta · C + bias`.
    ///
    /// Shapes: A [M,K] (`trans_a`: [K,M]), B [K,N] (`trans_b`: [N,K]), C [M,N]; or batched with
    /// a leading batch dimension on C and on A and/or B (a 2-D operand is shared by every batch).
    /// 2-D operands may be chunked (larger than one binding): the product is split at chunk
    /// boundaries into one dispatch per block, accumulating over K blocks.
    pub fn matmul(
        &self,
        rec: &mut Recorder,
        a: &GpuTensor,
        b: &GpuTensor,
        c: &GpuTensor,
        opts: MatmulOpts,
    ) -> Result<()> {
        for (name, t) in [("A", a), ("C", c)] {
            ensure!(
                t.dtype() == DType::F32,
                "matmul: {name} must be f32, is {:?}",
                t.dtype()
            );
        }
        let b_bf16 = b.dtype() == DType::BF16;
        ensure!(
            b.dtype() == DType::F32 || (b_bf16 && opts.precision == MatmulPrecision::F32),
            "matmul: B must be f32, or bf16 with f32 operand precision; is {:?}",
            b.dtype()
        );
        let dims = |t: &GpuTensor, name: &str| -> Result<(usize, usize, usize)> {
            match *t.shape() {
                [r, c] => Ok((1, r, c)),
                [z, r, c] => Ok((z, r, c)),
                ref s => bail!("matmul: {name} must be 2-D or 3-D, got {s:?}"),
            }
        };
        let (za, ra, ca) = dims(a, "A")?;
        let (zb, rb, cb) = dims(b, "B")?;
        let (zc, m, n) = dims(c, "C")?;
        let (am, k) = if opts.trans_a { (ca, ra) } else { (ra, ca) };
        let (bk, bn) = if opts.trans_b { (cb, rb) } else { (rb, cb) };
        ensure!(
            am == m && bk == k && bn == n,
            "matmul shapes disagree: A {:?}{}, B {:?}{}, C {:?}",
            a.shape(),
            if opts.trans_a { "ᵀ" } else { "" },
            b.shape(),
            if opts.trans_b { "ᵀ" } else { "" },
            c.shape()
        );
        let batched = c.shape().len() == 3;
        if batched {
            ensure!(
                (a.shape().len() == 2 || za == zc) && (b.shape().len() == 2 || zb == zc),
                "matmul: batch sizes disagree: A {:?}, B {:?}, C {:?}",
                a.shape(),
                b.shape(),
                c.shape()
            );
            ensure!(
                !a.is_chunked() && !b.is_chunked() && !c.is_chunked(),
                "matmul: batched operands cannot be chunked"
            );
        } else {
            ensure!(
                a.shape().len() == 2 && b.shape().len() == 2,
                "matmul: 3-D operands need a 3-D C"
            );
        }
        if let Some(bias) = opts.bias {
            ensure!(
                bias.dtype() == DType::F32 && bias.numel() == n && !bias.is_chunked(),
                "matmul: bias must be an unchunked f32 [{n}], got {:?}",
                bias.shape()
            );
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let lda = ca as u32;
        let ldb = cb as u32;
        let a_batch = if a.shape().len() == 3 {
            (ra * ca) as u32
        } else {
            0
        };
        let b_batch = if b.shape().len() == 3 {
            (rb * cb) as u32
        } else {
            0
        };
        let c_batch = (m * n) as u32;

        // Split points of M, N and K at every chunk boundary of the operands.
        let bounds = |t: &GpuTensor| t.chunks().iter().map(|ch| ch.first_row).collect::<Vec<_>>();
        let mut ms = vec![0, m];
        let mut ns = vec![0, n];
        let mut ks = vec![0, k];
        if opts.trans_a {
            ks.extend(bounds(a))
        } else {
            ms.extend(bounds(a))
        }
        if opts.trans_b {
            ns.extend(bounds(b))
        } else {
            ks.extend(bounds(b))
        }
        ms.extend(bounds(c));
        for v in [&mut ms, &mut ns, &mut ks] {
            v.sort_unstable();
            v.dedup();
        }
        // Locates the chunk holding `row` and the element offset of (row, col) inside it.
        let locate = |t: &GpuTensor, row: usize, col: usize| -> (BufView, u32) {
            let ch = t
                .chunks()
                .iter()
                .rev()
                .find(|ch| ch.first_row <= row)
                .expect("row inside tensor");
            (ch.view(), ((row - ch.first_row) * t.row_len() + col) as u32)
        };
        let bias_view = match opts.bias {
            Some(bias) => Some(bias.view()?),
            None => None,
        };
        for mw in ms.windows(2) {
            for nw in ns.windows(2) {
                let k_blocks: Vec<_> = if k == 0 {
                    vec![[0, 0]]
                } else {
                    ks.windows(2).map(|w| [w[0], w[1]]).collect()
                };
                for (kb, kw) in k_blocks.iter().enumerate() {
                    let (m0, m1, n0, n1, k0, k1) = (mw[0], mw[1], nw[0], nw[1], kw[0], kw[1]);
                    let (av, a_off) = if opts.trans_a {
                        locate(a, k0, m0)
                    } else {
                        locate(a, m0, k0)
                    };
                    let (bv, b_off) = if opts.trans_b {
                        locate(b, n0, k0)
                    } else {
                        locate(b, k0, n0)
                    };
                    let (cv, c_off) = locate(c, m0, n0);
                    let first = kb == 0;
                    let params = GemmParams {
                        m: (m1 - m0) as u32,
                        n: (n1 - n0) as u32,
                        k: (k1 - k0) as u32,
                        has_bias: (first && opts.bias.is_some()) as u32,
                        a_off,
                        lda,
                        a_batch,
                        b_off,
                        ldb,
                        b_batch,
                        c_off,
                        ldc: n as u32,
                        c_batch,
                        bias_off: n0 as u32,
                        alpha: opts.alpha,
                        beta: if first { opts.beta } else { 1.0 },
                    };
                    let a_contig = if opts.trans_a { params.m } else { params.k };
                    let b_contig = if opts.trans_b { params.k } else { params.n };
                    self.record_gemm(
                        rec,
                        Gemm {
                            a: av,
                            b: bv,
                            c: cv,
                            bias: bias_view.clone(),
                            params,
                            batch: zc as u32,
                            trans_a: opts.trans_a,
                            trans_b: opts.trans_b,
                            a_contig,
                            b_contig,
                            f16: opts.precision == MatmulPrecision::F16,
                            b_bf16,
                            frozen_b: opts.frozen_b,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Dispatches one GEMM over single buffers, choosing the kernel for this adapter.
    pub(crate) fn record_gemm(&self, rec: &mut Recorder, g: Gemm) -> Result<()> {
        self.record_gemm_with(rec, g, None)
    }

    /// As [`Gpu::record_gemm`]; with `nf4` (absmax view, blocksize) B is the packed NF4 weight
    /// and the NF4 scales are bound at binding 5.
    pub(crate) fn record_gemm_with(
        &self,
        rec: &mut Recorder,
        g: Gemm,
        nf4: Option<(BufView, usize)>,
    ) -> Result<()> {
        let p = &g.params;
        if g.f16 && !self.features().contains(wgpu::Features::SHADER_F16) {
            bail!(
                "matmul_precision = \"f16\" needs an adapter with 16-bit float shaders (SHADER_F16), which {} lacks; use \"f32\"",
                self.adapter_info().name
            );
        }
        let operands = g.operands(nf4.is_some());
        let mut constants = g.constants(nf4.as_ref().map(|(_, block)| *block));
        // A few rows against a [N, K] weight (decoding): the rows kernel, reading a frozen
        // weight from the texture it stays staged in during generation on CPU adapters (a weight
        // copied before every product would cost as much as the product), else the buffers.
        if g.trans_b && !g.trans_a && p.m <= ROWS_KERNEL_MAX_M && rows_kernel() {
            if nf4.is_none() && operands.vec4 && !g.f16 {
                if let Some((staged, lanes)) = self.stage_row_blocks_gemm(rec, &g)? {
                    let source = shader(Operands {
                        textures: true,
                        row_blocks: true,
                        ..operands
                    })?;
                    constants.push(("SPLIT_LANES", lanes as f64));
                    let kernel = self.kernel(&source, "matmul_rows_split", &constants)?;
                    let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
                    let bindings = gemm_bindings(&g, Some(&staged), None, bias);
                    let groups = [p.n.div_ceil(SPLIT_ROWS_PER_WORKGROUP), p.m, 1];
                    rec.dispatch_bound(&kernel, bytemuck::bytes_of(p), &bindings, groups);
                    return Ok(());
                }
            }
            let staged = g
                .frozen_b
                .then(|| stage_gemm_operands(rec, &g, nf4.as_ref()))
                .flatten();
            let source = shader(Operands {
                textures: staged.is_some(),
                ..operands
            })?;
            let (entry, groups) = match staged {
                Some(_) => {
                    // staged operands exist only on adapters with one subgroup width
                    let lanes =
                        subgroup_width(self).context("staged operands without subgroups")?;
                    constants.push(("SPLIT_LANES", lanes as f64));
                    (
                        "matmul_rows_split",
                        [p.n.div_ceil(SPLIT_ROWS_PER_WORKGROUP), p.m, g.batch],
                    )
                }
                None => ("matmul_rows", [p.n.div_ceil(64), p.m, g.batch]),
            };
            let kernel = self.kernel(&source, entry, &constants)?;
            let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
            let bindings = gemm_bindings(&g, staged.as_deref(), nf4, bias);
            rec.dispatch_bound(&kernel, bytemuck::bytes_of(p), &bindings, groups);
            return Ok(());
        }
        if let Some(cfg) = self.coop_for(&g) {
            return self.record_coop(rec, g, nf4, operands, constants, cfg);
        }
        let path = self.matmul_path();
        let tiling = self.matmul_tiling(&g, operands, nf4.as_ref(), path)?;
        self.record_gemm_tiled(rec, g, nf4, operands, constants, tiling)
    }

    /// A and B of a rows product with a frozen B, staged for `matmul_rows_split` with
    /// `ROW_BLOCKS`: A in slot 0, B kept in row blocks while a hold lives (replacing a linear
    /// copy a prompt's product kept); and the kernel's lanes. `None` where the product does not
    /// qualify (B not one whole [N, K] weight of whole K steps, no hold, or an adapter that does
    /// not stage): the caller takes the linear path.
    fn stage_row_blocks_gemm(
        &self,
        rec: &mut Recorder,
        g: &Gemm,
    ) -> Result<Option<(Vec<std::sync::Arc<StagedTexture>>, u32)>> {
        use crate::gpu::kernels::row_blocks::row_block_texels;
        let p = &g.params;
        let Some(lanes) = subgroup_width(self) else {
            return Ok(None);
        };
        let Some(row_texels) = row_block_texels(p.k as usize, g.b_bf16, lanes) else {
            return Ok(None);
        };
        let element_bytes = if g.b_bf16 { 2 } else { 4 };
        if !g.frozen_b
            || !row_blocks_enabled()
            || g.batch != 1
            || p.b_off != 0
            || p.ldb != p.k
            || g.b.size != p.n as u64 * p.k as u64 * element_bytes
        {
            return Ok(None);
        }
        let format = if g.b_bf16 {
            StageFormat::U32
        } else {
            StageFormat::F32
        };
        let Some(a) = rec.stage(0, &g.a, StageFormat::F32) else {
            return Ok(None);
        };
        let b = rec.stage_frozen_row_blocks(&g.b, format, p.n as usize, row_texels, lanes)?;
        Ok(b.map(|b| (vec![a, b], lanes)))
    }

    /// Which of the tiled kernels this adapter runs.
    pub(crate) fn matmul_path(&self) -> KernelPath {
        match self.tiling() {
            Tiling::Register if subgroup_kernel_fits(self) => KernelPath::Subgroup,
            Tiling::Register => KernelPath::Register,
            Tiling::Workgroup => KernelPath::Workgroup,
        }
    }

    /// Records `g` on the kernel of `tiling`.
    pub(crate) fn record_gemm_tiled(
        &self,
        rec: &mut Recorder,
        g: Gemm,
        nf4: Option<(BufView, usize)>,
        operands: Operands,
        mut constants: Vec<(&'static str, f64)>,
        tiling: MatmulTiling,
    ) -> Result<()> {
        let p = &g.params;
        let (entry, groups) = match tiling {
            MatmulTiling::Subgroup { tm, tn } => {
                let lanes =
                    subgroup_width(self).context("the subgroup kernel needs one subgroup width")?;
                let groups = [p.n.div_ceil(tn * lanes), p.m.div_ceil(tm), g.batch];
                let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
                let staged = stage_operands()
                    .then(|| stage_gemm_operands(rec, &g, nf4.as_ref()))
                    .flatten();
                let source = subgroup_shader(
                    lanes,
                    Operands {
                        textures: staged.is_some(),
                        ..operands
                    },
                    tm,
                    tn,
                    g.trans_a,
                    g.trans_b,
                )?;
                let kernel = self.kernel(&source, "matmul_subgroup", &constants)?;
                let bindings = gemm_bindings(&g, staged.as_deref(), nf4, bias);
                rec.dispatch_bound(&kernel, bytemuck::bytes_of(p), &bindings, groups);
                return Ok(());
            }
            MatmulTiling::Register { tm, tn } => {
                let (wx, wy) = (8u32, 8u32);
                constants.extend([("WG_X", wx as f64), ("WG_Y", wy as f64)]);
                let source = unrolled_shader(operands, tm, tn, g.trans_a, g.trans_b)?;
                let kernel = self.kernel(&source, "matmul_register_unrolled", &constants)?;
                let bias = g.bias.clone().unwrap_or_else(|| self.dummy_buffer());
                let mut buffers = vec![g.a, g.b, g.c, bias];
                if let Some((absmax, _)) = nf4 {
                    buffers.push(absmax);
                }
                let groups = [p.n.div_ceil(tn * wx), p.m.div_ceil(tm * wy), g.batch];
                rec.dispatch(&kernel, bytemuck::bytes_of(p), &buffers, groups);
                return Ok(());
            }
            MatmulTiling::Workgroup {
                bm,
                bn,
                bk,
                wtm,
                wtn,
            } => {
                constants.extend([
                    ("BM", bm as f64),
                    ("BN", bn as f64),
                    ("BK", bk as f64),
                    ("WTM", wtm as f64),
                    ("WTN", wtn as f64),
                    ("WGT_X", (bn / wtn) as f64),
                    ("WGT_Y", (bm / wtm) as f64),
                ]);
                (
                    "matmul_workgroup",
                    [p.n.div_ceil(bn), p.m.div_ceil(bm), g.batch],
                )
            }
        };
        let kernel = self.kernel(&shader(operands)?, entry, &constants)?;
        let bias = g.bias.unwrap_or_else(|| self.dummy_buffer());
        let mut buffers = vec![g.a, g.b, g.c, bias];
        if let Some((absmax, _)) = nf4 {
            buffers.push(absmax);
        }
        rec.dispatch(&kernel, bytemuck::bytes_of(p), &buffers, groups);
        Ok(())
    }

    /// A small buffer bound where a kernel's optional input is absent.
    pub(crate) fn dummy_buffer(&self) -> BufView {
        let buffer = self.alloc_storage(16);
        BufView {
            buffer,
            offset: 0,
            size: 16,
        }
    }
}

#[cfg(test)]
mod tests;
