//! Flash-style attention on the GPU (`shaders/attention.wgsl`), forward and backward, with the
//! Gemma 3 / SigLIP masks. Reference and layouts: [`crate::reference::attention`].
//!
//! ```ignore
//! let mask = gpu.attention_mask(&dims, &AttentionMask { causal: true, .. })?; // once per batch and mask kind
//! gpu.attention_forward(&mut rec, &q, &k, &v, &mask, scale, &out, &lse)?;
//! gpu.attention_backward(&mut rec, &AttentionGrads { q: &q, k: &k, v: &v, out: &out, lse: &lse, d_out: &d_out }, &mask, scale, &dq, &dk, &dv)?;
//! ```
//! The kernels use subgroup operations (a workgroup is one subgroup of 8 lanes that splits the
//! head dimension), so the adapter needs `Features::SUBGROUP` with subgroups of at least 8.

use anyhow::{bail, ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::{groups_1d, BufView, DType, Gpu, GpuTensor, Recorder, ShaderSource};
use crate::reference::attention::{AttentionDims, AttentionMask};

const SOURCE: &str = include_str!("../../../../shaders/attention.wgsl");

/// Rows (query rows in forward/dQ, key rows in dK/dV) owned by one workgroup, and the block
/// granularity of the precomputed visibility ranges.
pub(crate) const ROWS: usize = 8;
/// Largest head_dim the kernels hold (8 lanes × 8 vec4 slots).
pub const MAX_HEAD_DIM: usize = 256;

/// The common header plus the `//== kernel <name>` section of shaders/attention.wgsl.
fn module(kernel: &str) -> ShaderSource {
    super::shader_section("attention", SOURCE, kernel)
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
        if !self.features().contains(wgpu::Features::SUBGROUP) {
            bail!(
                "the attention kernels need subgroup operations, which adapter {} lacks",
                self.adapter_info().name
            );
        }
        let min_subgroup = self.adapter_info().subgroup_min_size;
        if min_subgroup != 0 && min_subgroup < 8 {
            bail!(
                "the attention kernels need subgroups of at least 8 lanes; adapter {} has {min_subgroup}",
                self.adapter_info().name
            );
        }
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
        let kernel = self.kernel(&module("forward"), "attention_forward", &constants);
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

        let delta = self.kernel(&module("delta"), "attention_delta", &[]);
        let rows = (d.batch * d.seq * d.q_heads) as u32;
        rec.dispatch(
            &delta,
            bytes,
            &[out, d_out.clone(), lse, stats.clone()],
            groups_1d(self, rows.div_ceil(64)),
        );

        let dq_kernel = self.kernel(&module("dq"), "attention_dq", &constants);
        rec.dispatch(
            &dq_kernel,
            bytes,
            &[
                q.clone(),
                k.clone(),
                v.clone(),
                d_out.clone(),
                stats.clone(),
                maskv.clone(),
                dq,
            ],
            [mask.q_blocks as u32, d.q_heads as u32, d.batch as u32],
        );
        let dkdv = self.kernel(&module("dkdv"), "attention_dkdv", &constants);
        rec.dispatch(
            &dkdv,
            bytes,
            &[q, k, v, d_out, stats, maskv, dk, dv],
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
        let kernel = self.kernel(&module("masked_rows"), "attention_masked_rows", &[]);
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &views,
            groups_1d(self, d.q_len().div_ceil(64) as u32),
        );
        Ok(())
    }
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
        for case in &cases {
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
