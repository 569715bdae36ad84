//! Flash-style attention on the GPU (`shaders/attention/`), forward and backward, with the
//! Gemma 3 / SigLIP masks. Reference and layouts: [`crate::reference::attention`].
//!
//! ```ignore
//! let mask = gpu.attention_mask(&dims, &AttentionMask { causal: true, .. })?; // once per batch and mask kind
//! gpu.attention_forward(&mut rec, &q, &k, &v, &mask, scale, &out, &lse)?;
//! gpu.attention_backward(&mut rec, &AttentionGrads { q: &q, k: &k, v: &v, out: &out, lse: &lse, d_out: &d_out }, &mask, scale, &dq, &dk, &dv)?;
//! ```
//! A workgroup is 8 lanes that split the head dimension; their partial dot products are summed
//! by `subgroupAdd` where the adapter's subgroups are at least 8 lanes wide, and through
//! workgroup memory otherwise (no SUBGROUP feature, or narrower subgroups).
//! Two implementations: on adapters whose subgroups are exactly 8 lanes (lavapipe, where a
//! storage load is a loop over the SIMD lanes) generated, fully unrolled kernels that load each
//! K/V/Q/dO value once per subgroup and share it by `subgroupBroadcast`, with 16 rows per
//! workgroup ([`subgroup_forward`], [`subgroup_dq`], [`subgroup_dkdv`]); elsewhere the general
//! kernels of shaders/attention/.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use std::sync::Arc;

use crate::gpu::recorder::Bound;
use crate::gpu::staging::{StageFormat, StagedTexture};
use crate::gpu::{groups_1d, BufView, DType, Gpu, GpuTensor, Recorder, Shader};
use crate::reference::attention::{AttentionDims, AttentionMask};

/// Rows (query rows in forward/dQ, key rows in dK/dV) owned by one workgroup, and the block
/// granularity of the precomputed visibility ranges.
pub(crate) const ROWS: usize = 8;
/// Largest head_dim the kernels hold (8 lanes × 8 vec4 slots).
pub const MAX_HEAD_DIM: usize = 256;

/// The module of general kernel `kernel`: shaders/attention/<kernel>.wgsl (which includes the
/// common header), summing over lanes with subgroup operations where [`lane_features`] says so.
fn module(kernel: &str, lane_features: &[&str]) -> Result<Shader> {
    Shader::compose(&format!("attention/{kernel}"), lane_features)
}

/// How the general kernels finish their per-lane dot products: `SUBGROUPS` (subgroupAdd) where
/// every subgroup holds the workgroup's [`ROWS`]-lane workgroup, i.e. the adapter has
/// subgroups no narrower than 8 lanes; otherwise through workgroup memory.
fn lane_features(gpu: &Gpu) -> &'static [&'static str] {
    let min = gpu.adapter_info().subgroup_min_size;
    if gpu.features().contains(wgpu::Features::SUBGROUP)
        && (min == 0 || min >= SUBGROUP_LANES)
        && !no_subgroups_forced()
    {
        &["SUBGROUPS"]
    } else {
        &[]
    }
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests):
/// the general kernels (lane sums by subgroups or by workgroup memory), and the generated
/// subgroup kernels for every head_dim up to
/// [`MAX_HEAD_DIM`] in steps of one vec4 slot per lane, for even and odd GQA groups, reading
/// storage buffers or textures.
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    let mut all = Vec::new();
    for (kernel, entry) in [
        ("forward", "attention_forward"),
        ("delta", "attention_delta"),
        ("dq", "attention_dq"),
        ("dkdv", "attention_dkdv"),
        ("masked_rows", "attention_masked_rows"),
    ] {
        for lanes in [&["SUBGROUPS"][..], &[]] {
            all.push((module(kernel, lanes)?, vec![entry]));
        }
    }
    for head_dim in (1..=MAX_HEAD_DIM / (4 * SUBGROUP_LANES as usize)).map(|s| s * 32) {
        for q_heads in [1, 2] {
            let dims = AttentionDims {
                batch: 1,
                seq: 1,
                q_heads,
                kv_heads: 1,
                head_dim,
            };
            let (rows, keys) = SubgroupShape::for_dims(&dims);
            for textures in [false, true] {
                all.push((
                    subgroup_module("sg_forward", &rows, textures)?,
                    vec!["attention_sg_forward"],
                ));
                all.push((
                    subgroup_module("sg_dq", &rows, textures)?,
                    vec!["attention_sg_dq"],
                ));
                if q_heads == 1 {
                    all.push((
                        subgroup_module("sg_dkdv", &keys, textures)?,
                        vec!["attention_sg_dkdv"],
                    ));
                }
            }
        }
    }
    Ok(all)
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    causal: u32,
    window: u32,
    scale: f32,
    q_blocks: u32,
    k_blocks: u32,
    q_ranges_off: u32,
    k_ranges_off: u32,
}

/// A mask uploaded for the attention kernels: per-token image group and padding bits plus the
/// per-block visibility ranges. Build it once per micro-batch and mask kind (sliding / global /
/// vision) and reuse it for every layer.
pub struct AttentionMaskGpu {
    dims: AttentionDims,
    causal: bool,
    window: u32,
    q_blocks: usize,
    k_blocks: usize,
    q_ranges_off: usize,
    k_ranges_off: usize,
    /// i32 data stored as u32: token info, then query-block key ranges, then key-block query ranges.
    buffer: GpuTensor,
}

impl AttentionMaskGpu {
    pub fn dims(&self) -> &AttentionDims {
        &self.dims
    }
}

/// Per token `(group + 1) * 2 + valid`, then the ranges — the MASK layout of the shader.
fn mask_words(
    dims: &AttentionDims,
    mask: &AttentionMask,
) -> Result<(Vec<i32>, usize, usize, usize, usize)> {
    dims.validate()?;
    mask.validate(dims)?;
    let (batch, seq) = (dims.batch, dims.seq);
    let q_blocks = seq.div_ceil(ROWS);
    let k_blocks = q_blocks;
    let mut words = Vec::with_capacity(batch * seq + 4 * batch * q_blocks);
    for b in 0..batch {
        for t in 0..seq {
            let group = mask.image_groups.map_or(-1, |g| g[b * seq + t]);
            ensure!(
                group >= -1,
                "image group {group} of token {t} in sample {b} is invalid (use -1 for text)"
            );
            let valid = mask.key_padding.is_none_or(|p| p[b * seq + t] != 0) as i32;
            words.push((group + 1) * 2 + valid);
        }
    }
    // Keys visible to query q lie in one interval: the positional window [q - w + 1, q] (or
    // everything without a causal mask) joined with q's own image run, which contains q.
    let mut key_lo = vec![0usize; seq];
    let mut key_hi = vec![seq; seq];
    for b in 0..batch {
        let groups = mask.image_groups.map(|g| &g[b * seq..][..seq]);
        // extent of each token's image run
        let mut run_start = vec![0usize; seq];
        let mut run_end = vec![0usize; seq];
        if let Some(g) = groups {
            let mut t = 0;
            while t < seq {
                let mut e = t + 1;
                while e < seq && g[t] >= 0 && g[e] == g[t] {
                    e += 1;
                }
                for u in t..e {
                    run_start[u] = t;
                    run_end[u] = e;
                }
                t = e;
            }
        }
        for q in 0..seq {
            if mask.causal {
                let (mut lo, mut hi) = (
                    mask.sliding_window.map_or(0, |w| (q + 1).saturating_sub(w)),
                    q + 1,
                );
                if groups.is_some_and(|g| g[q] >= 0) {
                    lo = lo.min(run_start[q]);
                    hi = hi.max(run_end[q]);
                }
                key_lo[q] = lo;
                key_hi[q] = hi;
            }
        }
        let q_ranges_at = batch * seq + b * q_blocks * 2;
        words.resize(words.len().max(q_ranges_at + q_blocks * 2), 0);
        for qb in 0..q_blocks {
            let rows = qb * ROWS..((qb + 1) * ROWS).min(seq);
            let lo = rows.clone().map(|q| key_lo[q]).min().unwrap_or(0);
            let hi = rows.map(|q| key_hi[q]).max().unwrap_or(0);
            words[q_ranges_at + qb * 2] = lo as i32;
            words[q_ranges_at + qb * 2 + 1] = hi as i32;
        }
        let k_ranges_at = batch * seq + batch * q_blocks * 2 + b * k_blocks * 2;
        words.resize(words.len().max(k_ranges_at + k_blocks * 2), 0);
        for kb in 0..k_blocks {
            let (k0, k1) = (kb * ROWS, ((kb + 1) * ROWS).min(seq));
            let mut lo = seq;
            let mut hi = 0;
            for q in 0..seq {
                if key_lo[q] < k1 && key_hi[q] > k0 {
                    lo = lo.min(q);
                    hi = hi.max(q + 1);
                }
            }
            words[k_ranges_at + kb * 2] = lo.min(hi) as i32;
            words[k_ranges_at + kb * 2 + 1] = hi as i32;
        }
    }
    let q_ranges_off = batch * seq;
    let k_ranges_off = q_ranges_off + batch * q_blocks * 2;
    Ok((words, q_blocks, k_blocks, q_ranges_off, k_ranges_off))
}

/// The inputs of the backward pass (forward inputs and outputs, and the output gradient).
pub struct AttentionGrads<'a> {
    pub q: &'a GpuTensor,
    pub k: &'a GpuTensor,
    pub v: &'a GpuTensor,
    pub out: &'a GpuTensor,
    pub lse: &'a GpuTensor,
    pub d_out: &'a GpuTensor,
}

fn check_tensor(name: &str, t: &GpuTensor, numel: usize) -> Result<BufView> {
    ensure!(
        t.dtype() == DType::F32,
        "attention: {name} must be f32, got {:?}",
        t.dtype()
    );
    ensure!(
        t.numel() == numel,
        "attention: {name} has {} elements ({:?}), expected {numel}",
        t.numel(),
        t.shape()
    );
    t.view()
}

impl Gpu {
    /// Uploads `mask` for attention calls of shape `dims`.
    pub fn attention_mask(
        &self,
        dims: &AttentionDims,
        mask: &AttentionMask,
    ) -> Result<AttentionMaskGpu> {
        let (words, q_blocks, k_blocks, q_ranges_off, k_ranges_off) = mask_words(dims, mask)?;
        let as_u32: Vec<u32> = words.iter().map(|&w| w as u32).collect();
        let buffer = self.upload_u32(&[as_u32.len()], &as_u32)?;
        Ok(AttentionMaskGpu {
            dims: *dims,
            causal: mask.causal,
            window: mask.sliding_window.unwrap_or(0) as u32,
            q_blocks,
            k_blocks,
            q_ranges_off,
            k_ranges_off,
            buffer,
        })
    }

    fn attention_params(
        &self,
        mask: &AttentionMaskGpu,
        scale: f32,
    ) -> Result<(Params, [(&'static str, f64); 2])> {
        let d = mask.dims;
        ensure!(
            d.head_dim.is_multiple_of(4) && d.head_dim <= MAX_HEAD_DIM,
            "attention: head_dim {} must be a multiple of 4 and at most {MAX_HEAD_DIM}",
            d.head_dim
        );
        ensure!(
            mask.buffer.numel() < i32::MAX as usize
                && d.batch * d.seq * d.q_heads * d.head_dim < u32::MAX as usize,
            "attention: {d:?} is too large for 32-bit indexing"
        );
        let params = Params {
            batch: d.batch as u32,
            seq: d.seq as u32,
            q_heads: d.q_heads as u32,
            kv_heads: d.kv_heads as u32,
            head_dim: d.head_dim as u32,
            causal: mask.causal as u32,
            window: mask.window,
            scale,
            q_blocks: mask.q_blocks as u32,
            k_blocks: mask.k_blocks as u32,
            q_ranges_off: mask.q_ranges_off as u32,
            k_ranges_off: mask.k_ranges_off as u32,
        };
        let constants = [
            ("SLOTS", d.head_dim.div_ceil(32) as f64),
            ("ROWS", ROWS as f64),
        ];
        Ok((params, constants))
    }

    /// Records the forward pass: `out [batch, seq, q_heads, head_dim]` and
    /// `lse [batch, q_heads, seq]` (needed by the backward pass) from q, k, v.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        mask: &AttentionMaskGpu,
        scale: f32,
        out: &GpuTensor,
        lse: &GpuTensor,
    ) -> Result<()> {
        let d = mask.dims;
        let (params, constants) = self.attention_params(mask, scale)?;
        let views = [
            check_tensor("q", q, d.q_len())?,
            check_tensor("k", k, d.kv_len())?,
            check_tensor("v", v, d.kv_len())?,
            mask.buffer.view()?,
            check_tensor("out", out, d.q_len())?,
            check_tensor("lse", lse, d.lse_len())?,
        ];
        if subgroup_kernels_fit(self) {
            let (shape, _) = SubgroupShape::for_dims(&d);
            let groups = [
                mask.q_blocks.div_ceil(shape.blocks as usize) as u32,
                (d.q_heads / shape.heads as usize) as u32,
                d.batch as u32,
            ];
            let staged = stage_inputs(rec, &views[..3]);
            let source = subgroup_module("sg_forward", &shape, staged.is_some())?;
            let kernel = self.kernel(&source, "attention_sg_forward", &[])?;
            let bindings = bind_staged(&staged, &views);
            rec.dispatch_bound(&kernel, bytemuck::bytes_of(&params), &bindings, groups);
            return Ok(());
        }
        let kernel = self.kernel(
            &module("forward", lane_features(self))?,
            "attention_forward",
            &constants,
        )?;
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &views,
            [mask.q_blocks as u32, d.q_heads as u32, d.batch as u32],
        );
        Ok(())
    }

    /// Records the backward pass: writes `dq`, `dk`, `dv` (shaped like q, k, v; overwritten,
    /// not accumulated). Recomputes the probabilities from the saved logsumexp.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        rec: &mut Recorder,
        x: &AttentionGrads,
        mask: &AttentionMaskGpu,
        scale: f32,
        dq: &GpuTensor,
        dk: &GpuTensor,
        dv: &GpuTensor,
    ) -> Result<()> {
        let d = mask.dims;
        let (params, constants) = self.attention_params(mask, scale)?;
        let (q, k, v) = (
            check_tensor("q", x.q, d.q_len())?,
            check_tensor("k", x.k, d.kv_len())?,
            check_tensor("v", x.v, d.kv_len())?,
        );
        let (out, lse, d_out) = (
            check_tensor("out", x.out, d.q_len())?,
            check_tensor("lse", x.lse, d.lse_len())?,
            check_tensor("d_out", x.d_out, d.q_len())?,
        );
        let (dq, dk, dv) = (
            check_tensor("dq", dq, d.q_len())?,
            check_tensor("dk", dk, d.kv_len())?,
            check_tensor("dv", dv, d.kv_len())?,
        );
        let stats = self.empty(&[d.lse_len(), 2], DType::F32)?;
        let stats = stats.view()?;
        let maskv = mask.buffer.view()?;
        let bytes = bytemuck::bytes_of(&params);

        let delta = self.kernel(
            &module("delta", lane_features(self))?,
            "attention_delta",
            &[],
        )?;
        let rows = (d.batch * d.seq * d.q_heads) as u32;
        rec.dispatch(
            &delta,
            bytes,
            &[out, d_out.clone(), lse, stats.clone()],
            groups_1d(self, rows.div_ceil(64)),
        );

        let dq_views = [
            q.clone(),
            k.clone(),
            v.clone(),
            d_out.clone(),
            stats.clone(),
            maskv.clone(),
            dq,
        ];
        let dkdv_views = [q, k, v, d_out, stats, maskv, dk, dv];
        if subgroup_kernels_fit(self) {
            let (rows, keys) = SubgroupShape::for_dims(&d);
            let dq_groups = [
                mask.q_blocks.div_ceil(rows.blocks as usize) as u32,
                (d.q_heads / rows.heads as usize) as u32,
                d.batch as u32,
            ];
            let dkdv_groups = [
                mask.k_blocks.div_ceil(keys.blocks as usize) as u32,
                d.kv_heads as u32,
                d.batch as u32,
            ];
            // Q, K, V, dO staged once serve both kernels.
            let staged = stage_inputs(rec, &dq_views[..4]);
            let textures = staged.is_some();
            let dq_kernel = self.kernel(
                &subgroup_module("sg_dq", &rows, textures)?,
                "attention_sg_dq",
                &[],
            )?;
            rec.dispatch_bound(
                &dq_kernel,
                bytes,
                &bind_staged(&staged, &dq_views),
                dq_groups,
            );
            let dkdv = self.kernel(
                &subgroup_module("sg_dkdv", &keys, textures)?,
                "attention_sg_dkdv",
                &[],
            )?;
            rec.dispatch_bound(
                &dkdv,
                bytes,
                &bind_staged(&staged, &dkdv_views),
                dkdv_groups,
            );
            return Ok(());
        }
        let dq_kernel = self.kernel(
            &module("dq", lane_features(self))?,
            "attention_dq",
            &constants,
        )?;
        rec.dispatch(
            &dq_kernel,
            bytes,
            &dq_views,
            [mask.q_blocks as u32, d.q_heads as u32, d.batch as u32],
        );
        let dkdv = self.kernel(
            &module("dkdv", lane_features(self))?,
            "attention_dkdv",
            &constants,
        )?;
        rec.dispatch(
            &dkdv,
            bytes,
            &dkdv_views,
            [mask.k_blocks as u32, d.kv_heads as u32, d.batch as u32],
        );
        Ok(())
    }
}

impl Gpu {
    /// transformers' eager attention on a query row that may see no key (e.g. a right-padding
    /// token further than the sliding window from the last real token) averages `v` over the
    /// whole sequence, where [`Gpu::attention_forward`] leaves 0 and lse = +inf: this writes the
    /// eager value into exactly those rows of `out` (reference:
    /// [`crate::model::reference::gemma3::eager_fully_masked_rows`]). The rows pass no gradient
    /// either way. `v [batch, seq, kv_heads, head_dim]`, `lse`/`out` as the forward wrote them.
    pub fn attention_eager_masked_rows(
        &self,
        rec: &mut Recorder,
        v: &GpuTensor,
        lse: &GpuTensor,
        mask: &AttentionMaskGpu,
        out: &GpuTensor,
    ) -> Result<()> {
        let d = mask.dims;
        let params = Params {
            batch: d.batch as u32,
            seq: d.seq as u32,
            q_heads: d.q_heads as u32,
            kv_heads: d.kv_heads as u32,
            head_dim: d.head_dim as u32,
            causal: 0,
            window: 0,
            scale: 0.0,
            q_blocks: 0,
            k_blocks: 0,
            q_ranges_off: 0,
            k_ranges_off: 0,
        };
        let views = [
            check_tensor("v", v, d.kv_len())?,
            check_tensor("lse", lse, d.lse_len())?,
            check_tensor("out", out, d.q_len())?,
        ];
        let kernel = self.kernel(
            &module("masked_rows", lane_features(self))?,
            "attention_masked_rows",
            &[],
        )?;
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &views,
            groups_1d(self, d.q_len().div_ceil(64) as u32),
        );
        Ok(())
    }
}

/// Lanes of the subgroup kernels: their workgroup is exactly one subgroup of this size.
const SUBGROUP_LANES: u32 = 8;

/// Tile shape of the generated subgroup kernels (see [`subgroup_forward`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct SubgroupShape {
    /// vec4 chunks of a head_dim row each lane owns: ceil(head_dim / 32).
    slots: u32,
    /// Query heads per workgroup (forward, dQ); they share one kv head (GQA), so each streamed
    /// K/V value serves all of them. 1 in dK/dV, which loops over the heads of its kv head.
    heads: u32,
    /// Mask blocks of [`ROWS`] rows per workgroup: query rows (forward, dQ) or key rows (dK/dV).
    blocks: u32,
    /// Keys (forward, dQ) or queries (dK/dV) each lane owns in one streamed block of
    /// `8 · per_lane`.
    per_lane: u32,
}

impl SubgroupShape {
    /// The shapes for `dims`: forward/dQ and dK/dV. 16 rows per workgroup: two heads of one
    /// GQA group × 8 queries, or 16 queries (16 keys in dK/dV); each loaded value of the
    /// streamed block then feeds 16 rows' FMAs.
    fn for_dims(d: &AttentionDims) -> (SubgroupShape, SubgroupShape) {
        let slots = d.head_dim.div_ceil(4 * SUBGROUP_LANES as usize) as u32;
        let heads = if (d.q_heads / d.kv_heads).is_multiple_of(2) {
            2
        } else {
            1
        };
        let rows = SubgroupShape {
            slots,
            heads,
            blocks: 2 / heads,
            per_lane: 4,
        };
        let keys = SubgroupShape {
            slots,
            heads: 1,
            blocks: 2,
            per_lane: 2,
        };
        (rows, keys)
    }

    fn rows(&self) -> u32 {
        self.heads * self.blocks * ROWS as u32
    }
}

/// Copies the streamed inputs (Q, K, V and, in backward, dO) into staging slots 0.. for the
/// `*_tex` kernels; `None` when one cannot be staged (then every input stays a buffer).
fn stage_inputs(rec: &mut Recorder, views: &[BufView]) -> Option<Vec<Arc<StagedTexture>>> {
    views
        .iter()
        .enumerate()
        .map(|(slot, v)| rec.stage(slot, v, StageFormat::F32))
        .collect()
}

/// A kernel's bindings: its first inputs as the `staged` textures when there are any, the
/// rest (and everything otherwise) as the buffers of `views`.
fn bind_staged<'a>(
    staged: &'a Option<Vec<Arc<StagedTexture>>>,
    views: &[BufView],
) -> Vec<Bound<'a>> {
    let textures = staged.as_deref().unwrap_or_default();
    textures
        .iter()
        .map(|t| Bound::Texture(t))
        .chain(views[textures.len()..].iter().cloned().map(Bound::Buffer))
        .collect()
}

/// Whether this adapter runs the generated subgroup kernels: subgroups of exactly
/// [`SUBGROUP_LANES`] lanes (a workgroup is one whole subgroup and broadcasts name lanes by
/// constant index). That is lavapipe, whose SIMD lanes make a storage load a loop over lanes:
/// these kernels load each value once per subgroup and share it by register broadcasts.
fn subgroup_kernels_fit(gpu: &Gpu) -> bool {
    if general_kernels_forced() {
        return false;
    }
    let info = gpu.adapter_info();
    gpu.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == SUBGROUP_LANES
        && info.subgroup_max_size == SUBGROUP_LANES
}

/// Tests of the general kernels switch the subgroup kernels off on their own thread.
#[cfg(test)]
fn general_kernels_forced() -> bool {
    tests::GENERAL_KERNELS.with(|f| f.get())
}
#[cfg(not(test))]
fn general_kernels_forced() -> bool {
    false
}

/// Tests of the workgroup-memory lane sums (adapters without usable subgroups) switch the
/// subgroup ones off on their own thread.
#[cfg(test)]
fn no_subgroups_forced() -> bool {
    tests::NO_SUBGROUPS.with(|f| f.get())
}
#[cfg(not(test))]
fn no_subgroups_forced() -> bool {
    false
}

macro_rules! w {
    ($s:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($s, $($t)*);
    }};
}

/// `f(a, f(b, ...))` over `items` (one item: itself).
fn fold(f: &str, items: &[String]) -> String {
    let mut out = items[0].clone();
    for x in &items[1..] {
        out = format!("{f}({out}, {x})");
    }
    out
}

/// One product of the score phase: `acc{r}_{k} += held row r · streamed row k` over the head
/// dimension, for every row r of the workgroup and every streamed row k of this lane.
struct Product<'a> {
    acc: &'a str,
    /// WGSL load of chunk `c` of held row `r`.
    held: &'a dyn Fn(u32, &str) -> String,
    /// WGSL load of chunk `c` of this lane's streamed row `k`.
    streamed: &'a dyn Fn(u32, &str) -> String,
}

/// The score phase. Each lane loads its own chunks (lane + 8s) of the held rows and, per chunk
/// 8s + l, every lane loads that chunk of its own streamed rows while the held chunk comes from
/// lane l by broadcast: every value is loaded once per subgroup and used for rows × per_lane
/// dot products.
fn emit_scores(w: &mut String, sh: &SubgroupShape, products: &[Product]) {
    let rows = sh.rows();
    for pr in products {
        for r in 0..rows {
            for k in 0..sh.per_lane {
                w!(w, "        var {}{r}_{k} = 0.0;", pr.acc);
            }
        }
    }
    w!(w, "        for (var s = 0u; s < {}u; s++) {{", sh.slots);
    w!(w, "            let own = min(lane + 8u * s, d4 - 1u);");
    w!(w, "            let live = lane + 8u * s < d4;");
    for (pi, pr) in products.iter().enumerate() {
        for r in 0..rows {
            w!(
                w,
                "            let hv{pi}_{r} = select(vec4<f32>(0.0), {}, live);",
                (pr.held)(r, "own")
            );
        }
    }
    for l in 0..SUBGROUP_LANES {
        w!(w, "            {{");
        w!(w, "                let c = min(8u * s + {l}u, d4 - 1u);");
        for (pi, pr) in products.iter().enumerate() {
            for k in 0..sh.per_lane {
                w!(
                    w,
                    "                let x{pi}_{k} = {};",
                    (pr.streamed)(k, "c")
                );
            }
        }
        for (pi, pr) in products.iter().enumerate() {
            for r in 0..rows {
                w!(
                    w,
                    "                let y{pi}_{r} = subgroupBroadcast(hv{pi}_{r}, {l}u);"
                );
                for k in 0..sh.per_lane {
                    w!(
                        w,
                        "                {a}{r}_{k} += dot(y{pi}_{r}, x{pi}_{k});",
                        a = pr.acc
                    );
                }
            }
        }
        w!(w, "            }}");
    }
    w!(w, "        }}");
}

/// One term of the accumulation phase: `target{r}_{s} += weight{r}_{k} · streamed row`, chunk
/// lane + 8s, for every streamed row of the block.
struct Term<'a> {
    weight: &'a str,
    target: &'a str,
    /// WGSL load of chunk `c` of the streamed row at token `t`.
    load: &'a dyn Fn(&str, &str) -> String,
}

/// The accumulation phase: streamed row 8k + j of the block (owned by lane j, whose weights
/// reach every lane by broadcast); each lane loads its own chunks of it.
fn emit_accumulate(w: &mut String, sh: &SubgroupShape, base: &str, terms: &[Term]) {
    let rows = sh.rows();
    for k in 0..sh.per_lane {
        for j in 0..SUBGROUP_LANES {
            w!(w, "        {{");
            w!(
                w,
                "            let tv = min({base} + {}u, last);",
                j + SUBGROUP_LANES * k
            );
            for (ti, t) in terms.iter().enumerate() {
                for r in 0..rows {
                    w!(
                        w,
                        "            let w{ti}_{r} = vec4<f32>(subgroupBroadcast({}{r}_{k}, {j}u));",
                        t.weight
                    );
                }
            }
            for s in 0..sh.slots {
                w!(w, "            {{");
                w!(
                    w,
                    "                let c = min(lane + {}u, d4 - 1u);",
                    8 * s
                );
                for (ti, t) in terms.iter().enumerate() {
                    w!(w, "                let v{ti} = {};", (t.load)("tv", "c"));
                    for r in 0..rows {
                        w!(
                            w,
                            "                {g}{r}_{s} = fma(w{ti}_{r}, v{ti}, {g}{r}_{s});",
                            g = t.target
                        );
                    }
                }
                w!(w, "            }}");
            }
            w!(w, "        }}");
        }
    }
}

/// `lo`, `hi`: the union of the visibility ranges of the workgroup's mask blocks `blk0 ..`
/// (`which`: "q" for the key ranges of query blocks, "k" for the query ranges of key blocks).
fn emit_range_union(w: &mut String, sh: &SubgroupShape, which: &str) {
    w!(w, "    var lo = p.seq;\n    var hi = 0u;");
    for x in 0..sh.blocks {
        w!(w, "    {{");
        w!(w, "        let at = p.{which}_ranges_off + (b * p.{which}_blocks + min(blk0 + {x}u, p.{which}_blocks - 1u)) * 2u;");
        w!(
            w,
            "        let r_lo = u32(MASK[at]);\n        let r_hi = u32(MASK[at + 1u]);"
        );
        // an empty range must not widen the union
        w!(
            w,
            "        if (r_lo < r_hi) {{ lo = min(lo, r_lo); hi = max(hi, r_hi); }}"
        );
        w!(w, "    }}");
    }
}

/// Forward and dQ: the workgroup's query rows r = g · nq + i (head h0 + g, token t{i}), their
/// visible key range [lo, hi), and this lane's keys of a block at k0.
fn emit_query_rows_prologue(w: &mut String, sh: &SubgroupShape) {
    let nq = sh.blocks * ROWS as u32;
    w!(w, "    let b = wg.z;");
    w!(w, "    let h0 = wg.y * {}u;", sh.heads);
    w!(w, "    let kvh = h0 / (p.q_heads / p.kv_heads);");
    w!(w, "    let d4 = p.head_dim / 4u;");
    w!(w, "    let last = p.seq - 1u;");
    w!(w, "    let blk0 = wg.x * {}u;", sh.blocks);
    emit_range_union(w, sh, "q");
    for i in 0..nq {
        w!(w, "    let t{i} = blk0 * {}u + {i}u;", ROWS);
        w!(w, "    let tc{i} = min(t{i}, last);");
        w!(w, "    let qi{i} = token_info(b, t{i});");
    }
}

fn emit_key_block_start(w: &mut String, sh: &SubgroupShape) {
    w!(
        w,
        "    for (var k0 = lo; k0 < hi; k0 += {}u) {{",
        SUBGROUP_LANES * sh.per_lane
    );
    for k in 0..sh.per_lane {
        w!(
            w,
            "        let key{k} = k0 + lane + {}u;",
            SUBGROUP_LANES * k
        );
        w!(w, "        let kc{k} = min(key{k}, last);");
        w!(w, "        let ki{k} = token_info(b, key{k});");
    }
}

/// The forward entry point `attention_sg_forward` (a flash-attention forward). A workgroup
/// (one subgroup of 8 lanes) owns `rows` query rows; lane l holds the output accumulators of
/// chunks l + 8s of every row. Keys stream in blocks of 8 · per_lane, lane j owning keys
/// k0 + j + 8k: the scores S = Q·Kᵀ of its keys come from [`emit_scores`], the online softmax
/// runs per lane on its keys (row max by subgroupMax, the row sum kept as per-lane partials
/// until the end), and O += P·V by [`emit_accumulate`]. Everything is unrolled into named
/// variables: llvmpipe turns dynamically indexed private arrays into per-lane gathers.
fn subgroup_forward(sh: &SubgroupShape) -> String {
    let rows = sh.rows();
    let nq = sh.blocks * ROWS as u32;
    let mut s = String::new();
    let w = &mut s;
    w!(w, "\n@compute @workgroup_size(8, 1, 1)");
    w!(w, "fn attention_sg_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{");
    emit_query_rows_prologue(w, sh);
    for r in 0..rows {
        w!(w, "    var m{r} = NEG;\n    var l{r} = 0.0;");
        for s in 0..sh.slots {
            w!(w, "    var a{r}_{s} = vec4<f32>(0.0);");
        }
    }
    emit_key_block_start(w, sh);
    let held = |r: u32, c: &str| format!("ld_q(q_index(b, tc{}, h0 + {}u, {c}))", r % nq, r / nq);
    let streamed = |k: u32, c: &str| format!("ld_k(kv_index(b, kc{k}, kvh, {c}))");
    emit_scores(
        w,
        sh,
        &[Product {
            acc: "s",
            held: &held,
            streamed: &streamed,
        }],
    );
    for r in 0..rows {
        let i = r % nq;
        let mut scores = vec![];
        for k in 0..sh.per_lane {
            w!(w, "        s{r}_{k} = select(NEG, s{r}_{k} * p.scale, allowed(qi{i}, ki{k}, t{i}, key{k}));");
            scores.push(format!("s{r}_{k}"));
        }
        w!(
            w,
            "        let mn{r} = max(m{r}, subgroupMax({}));",
            fold("max", &scores)
        );
        w!(
            w,
            "        let al{r} = exp(m{r} - mn{r});\n        m{r} = mn{r};"
        );
        let mut probs = vec![];
        for k in 0..sh.per_lane {
            w!(
                w,
                "        let p{r}_{k} = select(0.0, exp(s{r}_{k} - mn{r}), s{r}_{k} > 0.5 * NEG);"
            );
            probs.push(format!("p{r}_{k}"));
        }
        w!(w, "        l{r} = l{r} * al{r} + {};", probs.join(" + "));
        for s in 0..sh.slots {
            w!(w, "        a{r}_{s} = a{r}_{s} * al{r};");
        }
    }
    let load_v = |t: &str, c: &str| format!("ld_v(kv_index(b, {t}, kvh, {c}))");
    emit_accumulate(
        w,
        sh,
        "k0",
        &[Term {
            weight: "p",
            target: "a",
            load: &load_v,
        }],
    );
    w!(w, "    }}");
    for r in 0..rows {
        let (g, i) = (r / nq, r % nq);
        w!(w, "    {{");
        w!(w, "        let lt = subgroupAdd(l{r});");
        w!(w, "        if (t{i} < p.seq) {{");
        w!(w, "            let inv = select(0.0, 1.0 / lt, lt > 0.0);");
        for s in 0..sh.slots {
            w!(w, "            if (lane + {}u < d4) {{ O[q_index(b, t{i}, h0 + {g}u, lane + {}u)] = a{r}_{s} * inv; }}", 8 * s, 8 * s);
        }
        w!(w, "            if (lane == 0u) {{ LSE[(b * p.q_heads + h0 + {g}u) * p.seq + t{i}] = select(pos_inf(), m{r} + log(lt), lt > 0.0); }}");
        w!(w, "        }}");
        w!(w, "    }}");
    }
    w!(w, "}}");
    s
}

/// The dQ entry point `attention_sg_dq`: the forward's layout; per key block S = Q·Kᵀ and
/// dP = dO·Vᵀ for this lane's keys, dS = P ⊙ (dP − delta), then dQ += dS·K.
fn subgroup_dq(sh: &SubgroupShape) -> String {
    let rows = sh.rows();
    let nq = sh.blocks * ROWS as u32;
    let mut s = String::new();
    let w = &mut s;
    w!(w, "\n@compute @workgroup_size(8, 1, 1)");
    w!(w, "fn attention_sg_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{");
    emit_query_rows_prologue(w, sh);
    for r in 0..rows {
        let (g, i) = (r / nq, r % nq);
        w!(
            w,
            "    let st{r} = STATS[(b * p.q_heads + h0 + {g}u) * p.seq + tc{i}];"
        );
        for s in 0..sh.slots {
            w!(w, "    var a{r}_{s} = vec4<f32>(0.0);");
        }
    }
    emit_key_block_start(w, sh);
    let q = |r: u32, c: &str| format!("ld_q(q_index(b, tc{}, h0 + {}u, {c}))", r % nq, r / nq);
    let d_o = |r: u32, c: &str| format!("ld_do(q_index(b, tc{}, h0 + {}u, {c}))", r % nq, r / nq);
    let k = |k: u32, c: &str| format!("ld_k(kv_index(b, kc{k}, kvh, {c}))");
    let v = |k: u32, c: &str| format!("ld_v(kv_index(b, kc{k}, kvh, {c}))");
    emit_scores(
        w,
        sh,
        &[
            Product {
                acc: "s",
                held: &q,
                streamed: &k,
            },
            Product {
                acc: "dp",
                held: &d_o,
                streamed: &v,
            },
        ],
    );
    for r in 0..rows {
        let i = r % nq;
        for k in 0..sh.per_lane {
            w!(w, "        let p{r}_{k} = select(0.0, exp(s{r}_{k} * p.scale - st{r}.x), allowed(qi{i}, ki{k}, t{i}, key{k}));");
            w!(
                w,
                "        let g{r}_{k} = p{r}_{k} * (dp{r}_{k} - st{r}.y);"
            );
        }
    }
    let load_k = |t: &str, c: &str| format!("ld_k(kv_index(b, {t}, kvh, {c}))");
    emit_accumulate(
        w,
        sh,
        "k0",
        &[Term {
            weight: "g",
            target: "a",
            load: &load_k,
        }],
    );
    w!(w, "    }}");
    for r in 0..rows {
        let (g, i) = (r / nq, r % nq);
        w!(w, "    if (t{i} < p.seq) {{");
        for s in 0..sh.slots {
            w!(w, "        if (lane + {}u < d4) {{ DQ[q_index(b, t{i}, h0 + {g}u, lane + {}u)] = a{r}_{s} * p.scale; }}", 8 * s, 8 * s);
        }
        w!(w, "    }}");
    }
    w!(w, "}}");
    s
}

/// The dK/dV entry point `attention_sg_dkdv`: a workgroup owns `rows` key rows of one kv head
/// (lane l holding chunks l + 8s of their dK, dV) and streams, for every q head of the kv head,
/// the queries that can see them, lane j owning queries i0 + j + 8k: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ,
/// dSᵀ = Pᵀ ⊙ (dPᵀ − delta), then dV += Pᵀ·dO and dK += dSᵀ·Q. No atomics: each key row has
/// one owner.
fn subgroup_dkdv(sh: &SubgroupShape) -> String {
    let rows = sh.rows();
    let mut s = String::new();
    let w = &mut s;
    w!(w, "\n@compute @workgroup_size(8, 1, 1)");
    w!(w, "fn attention_sg_dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{");
    w!(
        w,
        "    let b = wg.z;\n    let kvh = wg.y;\n    let group = p.q_heads / p.kv_heads;"
    );
    w!(
        w,
        "    let d4 = p.head_dim / 4u;\n    let last = p.seq - 1u;"
    );
    w!(w, "    let blk0 = wg.x * {}u;", sh.blocks);
    emit_range_union(w, sh, "k");
    for r in 0..rows {
        w!(w, "    let t{r} = blk0 * {}u + {r}u;", ROWS);
        w!(w, "    let tc{r} = min(t{r}, last);");
        w!(w, "    let ki{r} = token_info(b, t{r});");
        for s in 0..sh.slots {
            w!(
                w,
                "    var dk{r}_{s} = vec4<f32>(0.0);\n    var dv{r}_{s} = vec4<f32>(0.0);"
            );
        }
    }
    w!(
        w,
        "    for (var h = kvh * group; h < kvh * group + group; h++) {{"
    );
    w!(
        w,
        "    for (var i0 = lo; i0 < hi; i0 += {}u) {{",
        SUBGROUP_LANES * sh.per_lane
    );
    for k in 0..sh.per_lane {
        w!(
            w,
            "        let qn{k} = i0 + lane + {}u;",
            SUBGROUP_LANES * k
        );
        w!(w, "        let qc{k} = min(qn{k}, last);");
        w!(w, "        let qi{k} = token_info(b, qn{k});");
        w!(
            w,
            "        let st{k} = STATS[(b * p.q_heads + h) * p.seq + qc{k}];"
        );
    }
    let k_row = |r: u32, c: &str| format!("ld_k(kv_index(b, tc{r}, kvh, {c}))");
    let v_row = |r: u32, c: &str| format!("ld_v(kv_index(b, tc{r}, kvh, {c}))");
    let q = |k: u32, c: &str| format!("ld_q(q_index(b, qc{k}, h, {c}))");
    let d_o = |k: u32, c: &str| format!("ld_do(q_index(b, qc{k}, h, {c}))");
    emit_scores(
        w,
        sh,
        &[
            Product {
                acc: "s",
                held: &k_row,
                streamed: &q,
            },
            Product {
                acc: "dp",
                held: &v_row,
                streamed: &d_o,
            },
        ],
    );
    for r in 0..rows {
        for k in 0..sh.per_lane {
            w!(w, "        let p{r}_{k} = select(0.0, exp(s{r}_{k} * p.scale - st{k}.x), allowed(qi{k}, ki{r}, qn{k}, t{r}));");
            w!(
                w,
                "        let g{r}_{k} = p{r}_{k} * (dp{r}_{k} - st{k}.y);"
            );
        }
    }
    let load_do = |t: &str, c: &str| format!("ld_do(q_index(b, {t}, h, {c}))");
    let load_q = |t: &str, c: &str| format!("ld_q(q_index(b, {t}, h, {c}))");
    emit_accumulate(
        w,
        sh,
        "i0",
        &[
            Term {
                weight: "p",
                target: "dv",
                load: &load_do,
            },
            Term {
                weight: "g",
                target: "dk",
                load: &load_q,
            },
        ],
    );
    w!(w, "    }}\n    }}");
    for r in 0..rows {
        w!(w, "    if (t{r} < p.seq) {{");
        for s in 0..sh.slots {
            w!(w, "        if (lane + {}u < d4) {{", 8 * s);
            w!(
                w,
                "            DK[kv_index(b, t{r}, kvh, lane + {}u)] = dk{r}_{s} * p.scale;",
                8 * s
            );
            w!(
                w,
                "            DV[kv_index(b, t{r}, kvh, lane + {}u)] = dv{r}_{s};",
                8 * s
            );
            w!(w, "        }}");
        }
        w!(w, "    }}");
    }
    w!(w, "}}");
    s
}

/// The module of generated kernel `kernel` (`sg_forward`, `sg_dq`, `sg_dkdv`) for `shape`:
/// its bindings (shaders/attention/<kernel>.wgsl, with the common header) plus the generated
/// entry point. `textures`: Q, K, V and dO are bound as staged linear textures.
fn subgroup_module(kernel: &str, shape: &SubgroupShape, textures: bool) -> Result<Shader> {
    let features: &[&str] = if textures {
        &["SUBGROUPS", "TEXTURES"]
    } else {
        &["SUBGROUPS"]
    };
    Shader::generated(
        &format!("attention/{kernel}"),
        features,
        shape,
        || match kernel {
            "sg_forward" => subgroup_forward(shape),
            "sg_dq" => subgroup_dq(shape),
            "sg_dkdv" => subgroup_dkdv(shape),
            _ => unreachable!("no generated attention kernel {kernel}"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use crate::reference::attention::{attention_backward, attention_forward, image_group_ids};

    struct Case {
        dims: AttentionDims,
        causal: bool,
        window: Option<usize>,
        images: bool,
        padding: Option<bool>, // Some(left?)
        scale: f32,
    }

    fn token_types(rng: &mut TestRng, batch: usize, seq: usize) -> Vec<u32> {
        let mut tt = vec![0u32; batch * seq];
        for b in 0..batch {
            // two images per sample, so grouping per image matters
            let a = rng.below(seq / 3);
            let len_a = 1 + rng.below(seq / 4);
            let c = (a + len_a + rng.below(2)).min(seq - 1);
            let len_c = 1 + rng.below(seq / 4);
            for t in (a..a + len_a).chain(c..c + len_c) {
                if t < seq {
                    tt[b * seq + t] = 1;
                }
            }
        }
        tt
    }

    fn padding(rng: &mut TestRng, batch: usize, seq: usize, left: bool) -> Vec<u32> {
        let mut pad = vec![1u32; batch * seq];
        for b in 1..batch {
            for t in 0..1 + rng.below(seq / 2) {
                pad[b * seq + if left { t } else { seq - 1 - t }] = 0;
            }
        }
        pad
    }

    fn run(gpu: &Gpu, case: &Case, rng: &mut TestRng, seed: u64) {
        let d = case.dims;
        let tt = case.images.then(|| token_types(rng, d.batch, d.seq));
        let groups = tt
            .as_ref()
            .map(|t| image_group_ids(t, d.batch, d.seq).unwrap());
        let pad = case.padding.map(|left| padding(rng, d.batch, d.seq, left));
        let mask = AttentionMask {
            causal: case.causal,
            sliding_window: case.window,
            image_groups: groups.as_deref(),
            key_padding: pad.as_deref(),
        };
        let (q, k, v) = (
            rng.vec_normal(d.q_len()),
            rng.vec_normal(d.kv_len()),
            rng.vec_normal(d.kv_len()),
        );
        let d_out = rng.vec_normal(d.q_len());
        let (want_out, want_lse) = attention_forward(&q, &k, &v, &d, &mask, case.scale).unwrap();
        let (want_dq, want_dk, want_dv) = attention_backward(
            &q, &k, &v, &want_out, &want_lse, &d_out, &d, &mask, case.scale,
        )
        .unwrap();

        let up = |x: &[f32]| gpu.upload_f32(&[x.len()], x).unwrap();
        let (qg, kg, vg, dog) = (up(&q), up(&k), up(&v), up(&d_out));
        let poisoned = |n: usize| {
            let t = gpu.empty(&[n], DType::F32).unwrap();
            gpu.poison(&t);
            t
        };
        let (out, lse) = (poisoned(d.q_len()), poisoned(d.lse_len()));
        let (dq, dk, dv) = (
            poisoned(d.q_len()),
            poisoned(d.kv_len()),
            poisoned(d.kv_len()),
        );
        let mask_gpu = gpu.attention_mask(&d, &mask).unwrap();
        let mut rec = Recorder::new(gpu);
        gpu.attention_forward(&mut rec, &qg, &kg, &vg, &mask_gpu, case.scale, &out, &lse)
            .unwrap();
        let grads = AttentionGrads {
            q: &qg,
            k: &kg,
            v: &vg,
            out: &out,
            lse: &lse,
            d_out: &dog,
        };
        gpu.attention_backward(&mut rec, &grads, &mask_gpu, case.scale, &dq, &dk, &dv)
            .unwrap();
        rec.submit();

        let what = format!(
            "seed {seed}: {d:?} causal {} window {:?} images {} padding {:?}",
            case.causal, case.window, case.images, case.padding
        );
        let got_lse = gpu.read_f32(&lse).unwrap();
        let (mut finite_got, mut finite_want) = (vec![], vec![]);
        for (g, w) in got_lse.iter().zip(&want_lse) {
            if w.is_infinite() {
                assert_eq!(
                    *g,
                    f32::INFINITY,
                    "{what}: a fully masked row must have lse +inf"
                );
            } else {
                finite_got.push(*g);
                finite_want.push(*w);
            }
        }
        let errs = [
            (
                "out",
                rel_frobenius(&gpu.read_f32(&out).unwrap(), &want_out),
            ),
            ("lse", rel_frobenius(&finite_got, &finite_want)),
            ("dq", rel_frobenius(&gpu.read_f32(&dq).unwrap(), &want_dq)),
            ("dk", rel_frobenius(&gpu.read_f32(&dk).unwrap(), &want_dk)),
            ("dv", rel_frobenius(&gpu.read_f32(&dv).unwrap(), &want_dv)),
        ];
        for (name, err) in errs {
            assert!(err < 2e-5, "{what}: {name} rel error {err}");
        }
    }

    thread_local! {
        /// Set by a test to run the general kernels where the subgroup kernels would run.
        pub(super) static GENERAL_KERNELS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The text-mask sweep with the subgroup kernels reading storage buffers (the fallback when
    /// staging is impossible), where the default stages Q, K, V and dO in textures. The wide-head
    /// sweep is left out: the two variants differ only in their binding sections, and the
    /// head_dim-256 kernels cost minutes of compile with an empty Mesa cache (as on CI).
    #[test]
    fn unstaged_subgroup_kernels_match_the_reference() {
        if !subgroup_kernels_fit(test_gpu()) {
            eprintln!("no subgroup kernels on this adapter");
            return;
        }
        crate::gpu::staging::without_staging(text_masks_match_the_reference);
    }

    thread_local! {
        /// Set by a test to sum over lanes through workgroup memory where subgroups would.
        pub(super) static NO_SUBGROUPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Both test sweeps with the general kernels summing over lanes through workgroup memory:
    /// what adapters without subgroups (or with subgroups narrower than 8 lanes) run.
    #[test]
    fn general_kernels_without_subgroups_match_the_reference() {
        GENERAL_KERNELS.with(|f| f.set(true));
        NO_SUBGROUPS.with(|f| f.set(true));
        text_masks_match_the_reference();
        vision_and_wide_heads_match_the_reference();
        NO_SUBGROUPS.with(|f| f.set(false));
        GENERAL_KERNELS.with(|f| f.set(false));
    }

    /// Both test sweeps with the general kernels, where the default runs the subgroup ones.
    #[test]
    fn general_kernels_match_the_reference() {
        if !subgroup_kernels_fit(test_gpu()) {
            eprintln!("the default tests already run the general kernels here");
            return;
        }
        GENERAL_KERNELS.with(|f| f.set(true));
        text_masks_match_the_reference();
        vision_and_wide_heads_match_the_reference();
        GENERAL_KERNELS.with(|f| f.set(false));
    }

    #[test]
    fn text_masks_match_the_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        // seq and head_dim deliberately not multiples of the 8-row blocks or the 8 lanes' vec4s
        let dims = AttentionDims {
            batch: 3,
            seq: 19,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 20,
        };
        let cases = [
            Case {
                dims,
                causal: true,
                window: None,
                images: false,
                padding: None,
                scale: 0.3,
            },
            Case {
                dims,
                causal: true,
                window: Some(5),
                images: false,
                padding: None,
                scale: 0.3,
            },
            Case {
                dims,
                causal: true,
                window: None,
                images: true,
                padding: Some(false),
                scale: 0.25,
            },
            Case {
                dims,
                causal: true,
                window: Some(4),
                images: true,
                padding: Some(true),
                scale: 0.25,
            },
        ];
        // 4 and 3 q heads per kv head: the subgroup kernels pair heads of a group (several
        // pairs per kv head), or take one head per workgroup when the group is odd
        let grouped = |q_heads| Case {
            dims: AttentionDims {
                batch: 2,
                seq: 21,
                q_heads,
                kv_heads: 1,
                head_dim: 36,
            },
            causal: true,
            window: Some(7),
            images: true,
            padding: Some(false),
            scale: 0.2,
        };
        for case in cases.iter().chain(&[grouped(4), grouped(3)]) {
            run(gpu, case, &mut rng, seed);
        }
    }

    #[test]
    fn vision_and_wide_heads_match_the_reference() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let cases = [
            // SigLIP: full attention, head_dim 72
            Case {
                dims: AttentionDims {
                    batch: 2,
                    seq: 13,
                    q_heads: 3,
                    kv_heads: 3,
                    head_dim: 72,
                },
                causal: false,
                window: None,
                images: false,
                padding: None,
                scale: 72f32.powf(-0.5),
            },
            Case {
                dims: AttentionDims {
                    batch: 2,
                    seq: 10,
                    q_heads: 2,
                    kv_heads: 2,
                    head_dim: 12,
                },
                causal: false,
                window: None,
                images: false,
                padding: Some(false),
                scale: 0.5,
            },
            // Gemma 3: head_dim 256, 2 q heads per kv head
            Case {
                dims: AttentionDims {
                    batch: 1,
                    seq: 11,
                    q_heads: 4,
                    kv_heads: 2,
                    head_dim: 256,
                },
                causal: true,
                window: Some(6),
                images: true,
                padding: None,
                scale: 0.0625,
            },
        ];
        for case in &cases {
            run(gpu, case, &mut rng, seed);
        }
    }

    #[test]
    fn ranges_cover_every_visible_pair() {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let dims = AttentionDims {
            batch: 2,
            seq: 37,
            q_heads: 1,
            kv_heads: 1,
            head_dim: 4,
        };
        let tt = token_types(&mut rng, 2, 37);
        let groups = image_group_ids(&tt, 2, 37).unwrap();
        for (causal, window) in [(true, None), (true, Some(3)), (false, None)] {
            let mask = AttentionMask {
                causal,
                sliding_window: window,
                image_groups: Some(&groups),
                key_padding: None,
            };
            let (words, q_blocks, k_blocks, q_off, k_off) = mask_words(&dims, &mask).unwrap();
            for b in 0..2 {
                for q in 0..37 {
                    for kv in 0..37 {
                        if mask.allows(37, b, q, kv) {
                            let qr = &words[q_off + (b * q_blocks + q / ROWS) * 2..][..2];
                            let kr = &words[k_off + (b * k_blocks + kv / ROWS) * 2..][..2];
                            assert!(
                                qr[0] as usize <= kv && kv < qr[1] as usize,
                                "seed {seed}: key {kv} outside {qr:?} of query {q}"
                            );
                            assert!(
                                kr[0] as usize <= q && q < kr[1] as usize,
                                "seed {seed}: query {q} outside {kr:?} of key {kv}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Right padding longer than the sliding window leaves padded queries with no visible key:
    /// after the fix-up those rows hold the mean of V as transformers' eager attention gives.
    #[test]
    fn eager_masked_rows_match_the_reference() {
        use crate::model::reference::gemma3::eager_fully_masked_rows;
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let dims = AttentionDims {
            batch: 2,
            seq: 19,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 12,
        };
        let mut pad = vec![1u32; dims.batch * dims.seq];
        for t in 9 + rng.below(3)..dims.seq {
            pad[dims.seq + t] = 0;
        }
        let mask = AttentionMask {
            causal: true,
            sliding_window: Some(4),
            image_groups: None,
            key_padding: Some(&pad),
        };
        let (q, k, v) = (
            rng.vec_normal(dims.q_len()),
            rng.vec_normal(dims.kv_len()),
            rng.vec_normal(dims.kv_len()),
        );
        let (mut want, lse) = attention_forward(&q, &k, &v, &dims, &mask, 0.3).unwrap();
        assert!(
            lse.iter().any(|l| l.is_infinite()),
            "some row is fully masked"
        );
        eager_fully_masked_rows(&mut want, &v, &lse, &dims);
        let m = gpu.attention_mask(&dims, &mask).unwrap();
        let up = |x: &[f32]| gpu.upload_f32(&[x.len()], x).unwrap();
        let (qg, kg, vg) = (up(&q), up(&k), up(&v));
        let out = gpu.empty(&[dims.q_len()], DType::F32).unwrap();
        let lse_g = gpu.empty(&[dims.lse_len()], DType::F32).unwrap();
        gpu.poison(&out);
        let mut rec = Recorder::new(gpu);
        gpu.attention_forward(&mut rec, &qg, &kg, &vg, &m, 0.3, &out, &lse_g)
            .unwrap();
        gpu.attention_eager_masked_rows(&mut rec, &vg, &lse_g, &m, &out)
            .unwrap();
        rec.submit_and_wait().unwrap();
        let e = rel_frobenius(&gpu.read_f32(&out).unwrap(), &want);
        assert!(e < 1e-5, "rel err {e} (seed {seed})");
    }
}
