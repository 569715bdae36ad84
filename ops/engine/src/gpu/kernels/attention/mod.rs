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
use crate::shapes::{AttentionDims, AttentionMask};

mod codegen;
use codegen::{subgroup_dkdv, subgroup_dq, subgroup_forward};

/// Rows (query rows in forward/dQ, key rows in dK/dV) owned by one workgroup, and the block
/// granularity of the precomputed visibility ranges.
pub const ROWS: usize = 8;
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

/// u32 words of an uploaded mask of `batch` samples of `seq` tokens: a word per token, then a
/// (lo, hi) key range per block of query rows and a (lo, hi) query range per block of keys.
/// The memory plan sizes the mask with it.
pub fn mask_word_count(batch: usize, seq: usize) -> usize {
    batch * seq + 4 * batch * seq.div_ceil(ROWS)
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
    let mut words = Vec::with_capacity(mask_word_count(batch, seq));
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
    debug_assert_eq!(words.len(), mask_word_count(batch, seq));
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
            let bytes = bytemuck::bytes_of(&params);
            return self.dispatch_subgroup(
                rec,
                "sg_forward",
                &shape,
                &staged,
                bytes,
                &views,
                groups,
            );
        }
        self.dispatch_general(
            rec,
            "forward",
            &constants,
            bytemuck::bytes_of(&params),
            &views,
            [mask.q_blocks as u32, d.q_heads as u32, d.batch as u32],
        )
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

        let rows = (d.batch * d.seq * d.q_heads) as u32;
        self.dispatch_general(
            rec,
            "delta",
            &[],
            bytes,
            &[out, d_out.clone(), lse, stats.clone()],
            groups_1d(self, rows.div_ceil(64)),
        )?;

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
            self.dispatch_subgroup(rec, "sg_dq", &rows, &staged, bytes, &dq_views, dq_groups)?;
            return self.dispatch_subgroup(
                rec,
                "sg_dkdv",
                &keys,
                &staged,
                bytes,
                &dkdv_views,
                dkdv_groups,
            );
        }
        self.dispatch_general(
            rec,
            "dq",
            &constants,
            bytes,
            &dq_views,
            [mask.q_blocks as u32, d.q_heads as u32, d.batch as u32],
        )?;
        self.dispatch_general(
            rec,
            "dkdv",
            &constants,
            bytes,
            &dkdv_views,
            [mask.k_blocks as u32, d.kv_heads as u32, d.batch as u32],
        )
    }
}

impl Gpu {
    /// transformers' eager attention on a query row that may see no key (e.g. a right-padding
    /// token further than the sliding window from the last real token) averages `v` over the
    /// whole sequence, where [`Gpu::attention_forward`] leaves 0 and lse = +inf: this writes the
    /// eager value into exactly those rows of `out` (reference:
    /// [`crate::reference::attention::eager_fully_masked_rows`]). The rows pass no gradient
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
        self.dispatch_general(
            rec,
            "masked_rows",
            &[],
            bytemuck::bytes_of(&params),
            &views,
            groups_1d(self, d.q_len().div_ceil(64) as u32),
        )
    }

    /// Records one of attention's general kernels: `attention/<name>.wgsl` composed for this
    /// adapter's lanes, entry point `attention_<name>`.
    fn dispatch_general(
        &self,
        rec: &mut Recorder,
        name: &str,
        constants: &[(&str, f64)],
        params: &[u8],
        views: &[BufView],
        groups: [u32; 3],
    ) -> Result<()> {
        let source = module(name, lane_features(self))?;
        let kernel = self.kernel(&source, &format!("attention_{name}"), constants)?;
        rec.dispatch(&kernel, params, views, groups);
        Ok(())
    }

    /// Records a generated subgroup kernel (`attention_<name>`, e.g. `sg_dq`) of `shape`, its
    /// first inputs read from the `staged` textures when there are any.
    #[allow(clippy::too_many_arguments)]
    fn dispatch_subgroup(
        &self,
        rec: &mut Recorder,
        name: &str,
        shape: &SubgroupShape,
        staged: &Option<Vec<Arc<StagedTexture>>>,
        params: &[u8],
        views: &[BufView],
        groups: [u32; 3],
    ) -> Result<()> {
        let source = subgroup_module(name, shape, staged.is_some())?;
        let kernel = self.kernel(&source, &format!("attention_{name}"), &[])?;
        rec.dispatch_bound(&kernel, params, &bind_staged(staged, views), groups);
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
mod tests;
