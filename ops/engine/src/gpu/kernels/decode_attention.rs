//! Decoding with a KV cache on the GPU: `decode_attention` (one new query row per sequence
//! against the cached keys and values; sliding-window layers keep only their window, as a ring)
//! and `kv_append` (the new row's keys or values into the cache). Shapes and semantics are
//! those of [`crate::reference::decode_attention`], the truth the tests compare with.

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use super::check;
use crate::gpu::recorder::Bound;
use crate::gpu::staging::StageFormat;
use crate::gpu::{groups_1d, DType, Gpu, GpuTensor, Recorder, RopeTables, Shader};
pub use crate::shapes::DecodeShape;

/// The shader keeps a query row and its accumulator in workgroup memory of this size.
pub const MAX_HEAD_DIM: usize = 256;

fn shader() -> Result<Shader> {
    Shader::compose("decode_attention", &[])
}

/// The decode kernel reading q, the caches and out four floats at a time (`head_dim % 4 == 0`,
/// as in every Gemma).
fn vec4_shader() -> Result<Shader> {
    Shader::compose("decode_attention", &["VEC4"])
}

/// `decode_subgroup`, the decode kernel for adapters that stage operands (CPU adapters with one
/// subgroup width): the caches read from staged textures, lanes across head_dim.
fn subgroup_shader() -> Result<Shader> {
    Shader::compose("decode_attention", &["TEXTURES"])
}

/// The per-head norm, RoPE and append of a decode step (`shaders/decode_qk.wgsl`).
fn qk_shader() -> Result<Shader> {
    Shader::compose("decode_qk", &[])
}

/// `qkv_norm_rope_append`: both of `qk_shader`'s entries in one dispatch.
fn qkv_shader() -> Result<Shader> {
    Shader::compose("decode_qk", &["FUSED"])
}

/// Storage buffers `qkv_norm_rope_append` binds (WebGPU's default limit is 8).
const QKV_STORAGE_BUFFERS: u32 = 10;

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![
        (shader()?, vec!["append", "prefill", "decode"]),
        (vec4_shader()?, vec!["decode"]),
        (subgroup_shader()?, vec!["decode_subgroup"]),
        (qk_shader()?, vec!["q_norm_rope", "kv_norm_rope_append"]),
        (qkv_shader()?, vec!["qkv_norm_rope_append"]),
    ])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct QkParams {
    rows: u32,
    heads: u32,
    head_dim: u32,
    n_pos: u32,
    capacity: u32,
    pos: u32,
    eps: f32,
    /// qkv_norm_rope_append: the kv heads (`heads` being the query heads)
    kv_heads: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DecodeParams {
    batch: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    pos: u32,
    window: u32,
    scale: f32,
}

impl DecodeParams {
    fn new(op: &str, s: &DecodeShape) -> Result<Self> {
        ensure!(
            s.head_dim > 0 && s.head_dim <= MAX_HEAD_DIM,
            "{op}: head_dim {} outside 1..={MAX_HEAD_DIM}",
            s.head_dim
        );
        ensure!(
            s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
            "{op}: {} query heads are not a multiple of {} kv heads",
            s.heads,
            s.kv_heads
        );
        ensure!(s.capacity > 0, "{op}: the cache has no capacity");
        // A full layer's cache must hold every position; a windowed one at least its window
        // (older positions are overwritten in the ring, never read).
        if s.window == 0 {
            ensure!(
                s.pos < s.capacity,
                "{op}: position {} does not fit a full-attention cache of {} positions",
                s.pos,
                s.capacity
            );
        } else {
            ensure!(
                s.capacity >= s.window,
                "{op}: a cache of {} positions cannot hold a window of {}",
                s.capacity,
                s.window
            );
        }
        let u = |v: usize| u32::try_from(v).map_err(|_| anyhow::anyhow!("{op}: {v} exceeds u32"));
        Ok(Self {
            batch: u(s.batch)?,
            heads: u(s.heads)?,
            kv_heads: u(s.kv_heads)?,
            head_dim: u(s.head_dim)?,
            capacity: u(s.capacity)?,
            pos: u(s.pos)?,
            window: u(s.window)?,
            scale: s.scale,
        })
    }
}

/// The checks both fused per-head kernels share: `x [rows, heads, head_dim]` with an even
/// head_dim the shader's workgroup memory holds, `w [head_dim]`, `positions [rows]` u32, tables
/// for that head_dim.
fn check_norm_rope(
    op: &str,
    x: &GpuTensor,
    heads: usize,
    w: &GpuTensor,
    positions: &GpuTensor,
    tables: &RopeTables,
) -> Result<usize> {
    let head_dim = tables.head_dim;
    ensure!(
        head_dim > 0 && head_dim <= MAX_HEAD_DIM && head_dim.is_multiple_of(2),
        "{op}: head_dim {head_dim} must be even and at most {MAX_HEAD_DIM}"
    );
    ensure!(heads > 0, "{op}: no heads");
    let rows = x.numel() / (heads * head_dim);
    check(op, "x", x, DType::F32, rows * heads * head_dim)?;
    check(op, "w", w, DType::F32, head_dim)?;
    check(op, "positions", positions, DType::U32, rows)?;
    Ok(rows)
}

/// What a step's keys and values into the caches need (`decode_kv_norm_rope_append`, alone or
/// fused with q's): a valid shape, RoPE tables for its head_dim, `k` and `v` [batch, kv_heads,
/// head_dim] with k's norm weight and positions, caches [batch, kv_heads, capacity, head_dim].
#[allow(clippy::too_many_arguments)]
fn check_kv_append(
    op: &str,
    s: &DecodeShape,
    k: &GpuTensor,
    v: &GpuTensor,
    w: &GpuTensor,
    positions: &GpuTensor,
    tables: &RopeTables,
    k_cache: &GpuTensor,
    v_cache: &GpuTensor,
) -> Result<DecodeParams> {
    let d = DecodeParams::new(op, s)?;
    ensure!(
        tables.head_dim == s.head_dim,
        "{op}: head_dim {} but RoPE tables for {}",
        s.head_dim,
        tables.head_dim
    );
    let rows = check_norm_rope(op, k, s.kv_heads, w, positions, tables)?;
    ensure!(
        rows == s.batch,
        "{op}: k has {rows} rows, the batch {}",
        s.batch
    );
    check(op, "v", v, DType::F32, rows * s.kv_heads * s.head_dim)?;
    let cache_len = rows * s.kv_heads * s.capacity * s.head_dim;
    check(op, "k_cache", k_cache, DType::F32, cache_len)?;
    check(op, "v_cache", v_cache, DType::F32, cache_len)?;
    Ok(d)
}

impl Gpu {
    /// Decoding's `q = rope(rmsnorm(q; w))` per head, in place, in one dispatch: the same bits
    /// as [`Gpu::rmsnorm_forward`] over each head then [`Gpu::rope`] (rmsnorm_forward's
    /// workgroup-per-row kernel, which GPUs run; CPU adapters sum its rows in another order).
    /// q: f32 [rows, heads, head_dim]; w: [head_dim] (Gemma's q_norm); positions: [rows] u32.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_q_norm_rope(
        &self,
        rec: &mut Recorder,
        q: &GpuTensor,
        heads: usize,
        w: &GpuTensor,
        positions: &GpuTensor,
        tables: &RopeTables,
        eps: f32,
    ) -> Result<()> {
        let rows = check_norm_rope("decode_q_norm_rope", q, heads, w, positions, tables)?;
        let p = QkParams {
            rows: rows as u32,
            heads: heads as u32,
            head_dim: tables.head_dim as u32,
            n_pos: tables.n_pos as u32,
            capacity: 0,
            pos: 0,
            eps,
            kv_heads: 0,
        };
        let k = self.kernel(&qk_shader()?, "q_norm_rope", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[
                q.view()?,
                w.view()?,
                positions.view()?,
                tables.cos.view()?,
                tables.sin.view()?,
            ],
            groups_1d(self, (rows * heads) as u32),
        );
        Ok(())
    }

    /// Decoding's new keys and values into the caches in one dispatch: `rope(rmsnorm(k; w))` per
    /// kv head into the key cache and `v` into the value cache at slot `s.pos % s.capacity` — the
    /// same bits as [`Gpu::rmsnorm_forward`] (its GPUs' kernel, as above), [`Gpu::rope`] and two
    /// [`Gpu::kv_append`]s. k, v: f32 [batch, kv_heads, head_dim]; w: [head_dim] (Gemma's
    /// k_norm); positions: [batch] u32; caches: f32 [batch, kv_heads, capacity, head_dim].
    #[allow(clippy::too_many_arguments)]
    pub fn decode_kv_norm_rope_append(
        &self,
        rec: &mut Recorder,
        s: &DecodeShape,
        k: &GpuTensor,
        v: &GpuTensor,
        w: &GpuTensor,
        positions: &GpuTensor,
        tables: &RopeTables,
        eps: f32,
        k_cache: &GpuTensor,
        v_cache: &GpuTensor,
    ) -> Result<()> {
        let op = "decode_kv_norm_rope_append";
        let d = check_kv_append(op, s, k, v, w, positions, tables, k_cache, v_cache)?;
        let p = QkParams {
            rows: d.batch,
            heads: d.kv_heads,
            head_dim: d.head_dim,
            n_pos: tables.n_pos as u32,
            capacity: d.capacity,
            pos: d.pos,
            eps,
            kv_heads: 0,
        };
        let kernel = self.kernel(&qk_shader()?, "kv_norm_rope_append", &[])?;
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&p),
            &[
                k.view()?,
                w.view()?,
                positions.view()?,
                tables.cos.view()?,
                tables.sin.view()?,
                v.view()?,
                k_cache.view()?,
                v_cache.view()?,
            ],
            groups_1d(self, (s.batch * s.kv_heads) as u32),
        );
        Ok(())
    }

    /// [`Gpu::decode_q_norm_rope`] (q with `wq`, `s.heads` heads) and
    /// [`Gpu::decode_kv_norm_rope_append`] (k with `wk`) in one dispatch where the adapter
    /// allows its ten storage buffers, else those two: the same bits either way.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_qkv_norm_rope_append(
        &self,
        rec: &mut Recorder,
        s: &DecodeShape,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        wq: &GpuTensor,
        wk: &GpuTensor,
        positions: &GpuTensor,
        tables: &RopeTables,
        eps: f32,
        k_cache: &GpuTensor,
        v_cache: &GpuTensor,
    ) -> Result<()> {
        if self.limits().max_storage_buffers_per_shader_stage < QKV_STORAGE_BUFFERS {
            self.decode_q_norm_rope(rec, q, s.heads, wq, positions, tables, eps)?;
            return self.decode_kv_norm_rope_append(
                rec, s, k, v, wk, positions, tables, eps, k_cache, v_cache,
            );
        }
        let op = "decode_qkv_norm_rope_append";
        let d = check_kv_append(op, s, k, v, wk, positions, tables, k_cache, v_cache)?;
        let rows = check_norm_rope(op, q, s.heads, wq, positions, tables)?;
        ensure!(
            rows == s.batch,
            "{op}: q has {rows} rows, the batch {}",
            s.batch
        );
        let p = QkParams {
            rows: d.batch,
            heads: d.heads,
            head_dim: d.head_dim,
            n_pos: tables.n_pos as u32,
            capacity: d.capacity,
            pos: d.pos,
            eps,
            kv_heads: d.kv_heads,
        };
        let kernel = self.kernel(&qkv_shader()?, "qkv_norm_rope_append", &[])?;
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&p),
            &[
                q.view()?,
                wq.view()?,
                positions.view()?,
                tables.cos.view()?,
                tables.sin.view()?,
                v.view()?,
                k_cache.view()?,
                v_cache.view()?,
                k.view()?,
                wk.view()?,
            ],
            groups_1d(self, (rows * (s.heads + s.kv_heads)) as u32),
        );
        Ok(())
    }

    /// `cache[b, g, pos % capacity, :] = new[b, g, :]`. new: f32 [batch, kv_heads, head_dim];
    /// cache: f32 [batch, kv_heads, capacity, head_dim].
    pub fn kv_append(
        &self,
        rec: &mut Recorder,
        s: &DecodeShape,
        new: &GpuTensor,
        cache: &GpuTensor,
    ) -> Result<()> {
        let p = DecodeParams::new("kv_append", s)?;
        let rows = s.batch * s.kv_heads;
        check("kv_append", "new", new, DType::F32, rows * s.head_dim)?;
        check(
            "kv_append",
            "cache",
            cache,
            DType::F32,
            rows * s.capacity * s.head_dim,
        )?;
        let k = self.kernel(&shader()?, "append", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[new.view()?, cache.view()?],
            groups_1d(self, (rows * s.head_dim).div_ceil(256) as u32),
        );
        Ok(())
    }

    /// The prompt's keys or values into the cache (`s.pos` = the prompt length n): new: f32
    /// [batch, n, kv_heads, head_dim] (a prompt forward's rows); cache: f32 [batch, kv_heads,
    /// capacity, head_dim]. Position p goes to slot p % capacity; a ring smaller than the prompt
    /// keeps its last `capacity` positions.
    pub fn kv_prefill(
        &self,
        rec: &mut Recorder,
        s: &DecodeShape,
        new: &GpuTensor,
        cache: &GpuTensor,
    ) -> Result<()> {
        ensure!(s.pos > 0, "kv_prefill: the prompt is empty");
        // The params' checks are those of the last prompt position.
        let mut p = DecodeParams::new(
            "kv_prefill",
            &DecodeShape {
                pos: s.pos - 1,
                ..*s
            },
        )?;
        p.pos = s.pos as u32;
        let row = s.kv_heads * s.head_dim;
        check("kv_prefill", "new", new, DType::F32, s.batch * s.pos * row)?;
        check(
            "kv_prefill",
            "cache",
            cache,
            DType::F32,
            s.batch * s.kv_heads * s.capacity * s.head_dim,
        )?;
        let kept = s.pos.min(s.capacity);
        let k = self.kernel(&shader()?, "prefill", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[new.view()?, cache.view()?],
            groups_1d(self, (s.batch * kept * row).div_ceil(256) as u32),
        );
        Ok(())
    }

    /// out [batch, heads, head_dim] = softmax(q·Kᵀ·scale)·V over the keys row b sees
    /// (past its left padding `start[b]`, inside the window, up to `pos`); a row that sees no
    /// key gets zeros. q: f32 [batch, heads, head_dim]; k_cache, v_cache: f32
    /// [batch, kv_heads, capacity, head_dim]; start: u32 [batch].
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        rec: &mut Recorder,
        s: &DecodeShape,
        q: &GpuTensor,
        k_cache: &GpuTensor,
        v_cache: &GpuTensor,
        start: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        let p = DecodeParams::new("decode_attention", s)?;
        let rows = s.batch * s.heads;
        let cache = s.batch * s.kv_heads * s.capacity * s.head_dim;
        check("decode_attention", "q", q, DType::F32, rows * s.head_dim)?;
        check("decode_attention", "k_cache", k_cache, DType::F32, cache)?;
        check("decode_attention", "v_cache", v_cache, DType::F32, cache)?;
        check("decode_attention", "start", start, DType::U32, s.batch)?;
        check(
            "decode_attention",
            "out",
            out,
            DType::F32,
            rows * s.head_dim,
        )?;
        // CPU adapters: the caches staged into textures (a copy per step, cheap beside the
        // per-lane storage-buffer loads it replaces) for `decode_subgroup`
        let lanes = crate::gpu::kernels::matmul::subgroup_width(self);
        if let Some(lanes) = lanes.filter(|_| s.head_dim.is_multiple_of(4)) {
            let staged = rec
                .stage(1, &k_cache.view()?, StageFormat::F32)
                .zip(rec.stage(2, &v_cache.view()?, StageFormat::F32));
            if let Some((kt, vt)) = staged {
                let k = self.kernel(
                    &subgroup_shader()?,
                    "decode_subgroup",
                    &[("LANES", lanes as f64)],
                )?;
                rec.dispatch_bound(
                    &k,
                    bytemuck::bytes_of(&p),
                    &[
                        Bound::Buffer(q.view()?),
                        Bound::Texture(&kt),
                        Bound::Texture(&vt),
                        Bound::Buffer(start.view()?),
                        Bound::Buffer(out.view()?),
                    ],
                    groups_1d(self, rows as u32),
                );
                return Ok(());
            }
        }
        let module = if s.head_dim.is_multiple_of(4) {
            vec4_shader()?
        } else {
            shader()?
        };
        let k = self.kernel(&module, "decode", &[])?;
        rec.dispatch(
            &k,
            bytemuck::bytes_of(&p),
            &[
                q.view()?,
                k_cache.view()?,
                v_cache.view()?,
                start.view()?,
                out.view()?,
            ],
            groups_1d(self, rows as u32),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{rel_frobenius, test_gpu, TestRng};
    use crate::reference::decode_attention as reference;

    /// The fused per-head kernels of a decode step against the references composed (rmsnorm
    /// per head, rope, append) and bit for bit against the kernels they replace, and the single
    /// dispatch of both against the two: fresh random
    /// inputs, caches of garbage, a head_dim of four columns per lane (256) and an odd one (38),
    /// a ring (pos past the capacity), a position per row.
    /// Bit for bit against `rmsnorm_forward`'s workgroup-per-row kernel, which GPUs run: CPU
    /// adapters run its `_rows` kernel, whose sums are in another order.
    #[test]
    fn fused_norm_rope_append_match_the_unfused_kernels() {
        crate::gpu::staging::without_staging(compare_with_unfused);
    }

    fn compare_with_unfused() {
        use crate::reference::{norm, rope};
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &(batch, heads, kv_heads, head_dim, capacity, pos) in &[
            (2usize, 4usize, 1usize, 256usize, 9usize, 12usize),
            (3, 6, 3, 38, 5, 3),
        ] {
            let n_pos = 64;
            let eps = 1e-6;
            let tables = gpu.rope_tables(10000.0, 1.0, head_dim, n_pos).unwrap();
            let (cos, sin) = (
                gpu.read_f32(&tables.cos).unwrap(),
                gpu.read_f32(&tables.sin).unwrap(),
            );
            let positions: Vec<u32> = (0..batch).map(|_| (rng.next_u64() % 60) as u32).collect();
            let gpos = gpu.upload_u32(&[batch], &positions).unwrap();
            let scaled = |rng: &mut TestRng, n: usize, by: f32| -> Vec<f32> {
                rng.vec_normal(n).iter().map(|v| v * by).collect()
            };
            let q = scaled(&mut rng, batch * heads * head_dim, 3.0);
            let k = scaled(&mut rng, batch * kv_heads * head_dim, 3.0);
            let v = rng.vec_normal(batch * kv_heads * head_dim);
            let (wq, wk) = (
                scaled(&mut rng, head_dim, 0.3),
                scaled(&mut rng, head_dim, 0.3),
            );
            let cache_shape = [batch, kv_heads, capacity, head_dim];
            let garbage = rng.vec_normal(batch * kv_heads * capacity * head_dim);
            let s = DecodeShape {
                batch,
                heads,
                kv_heads,
                head_dim,
                capacity,
                pos,
                window: capacity,
                scale: 1.0,
            };
            let up = |v: &[f32], shape: &[usize]| gpu.upload_f32(shape, v).unwrap();
            let (gwq, gwk) = (up(&wq, &[head_dim]), up(&wk, &[head_dim]));
            let (gk, gv) = (
                up(&k, &[batch, kv_heads, head_dim]),
                up(&v, &[batch, kv_heads, head_dim]),
            );

            // fused
            let fused_q = up(&q, &[batch, heads, head_dim]);
            let (fused_k, fused_v) = (up(&garbage, &cache_shape), up(&garbage, &cache_shape));
            let mut rec = Recorder::new(gpu);
            gpu.decode_q_norm_rope(&mut rec, &fused_q, heads, &gwq, &gpos, &tables, eps)
                .unwrap();
            gpu.decode_kv_norm_rope_append(
                &mut rec, &s, &gk, &gv, &gwk, &gpos, &tables, eps, &fused_k, &fused_v,
            )
            .unwrap();
            // all three in one dispatch (this adapter allows ten storage buffers)
            assert!(gpu.limits().max_storage_buffers_per_shader_stage >= QKV_STORAGE_BUFFERS);
            let one_q = up(&q, &[batch, heads, head_dim]);
            let (one_k, one_v) = (up(&garbage, &cache_shape), up(&garbage, &cache_shape));
            gpu.decode_qkv_norm_rope_append(
                &mut rec, &s, &one_q, &gk, &gv, &gwq, &gwk, &gpos, &tables, eps, &one_k, &one_v,
            )
            .unwrap();
            // unfused: rmsnorm_forward, rope, kv_append
            let gq = up(&q, &[batch, heads, head_dim]);
            let nq = gpu.empty(&[batch, heads, head_dim], DType::F32).unwrap();
            let nk = gpu.empty(&[batch, kv_heads, head_dim], DType::F32).unwrap();
            let (rstd_q, rstd_k) = (
                gpu.empty(&[batch * heads], DType::F32).unwrap(),
                gpu.empty(&[batch * kv_heads], DType::F32).unwrap(),
            );
            let (plain_k, plain_v) = (up(&garbage, &cache_shape), up(&garbage, &cache_shape));
            gpu.rmsnorm_forward(&mut rec, &gq, &gwq, &nq, &rstd_q, eps)
                .unwrap();
            gpu.rmsnorm_forward(&mut rec, &gk, &gwk, &nk, &rstd_k, eps)
                .unwrap();
            gpu.rope(&mut rec, &nq, &gpos, &tables, false).unwrap();
            gpu.rope(&mut rec, &nk, &gpos, &tables, false).unwrap();
            gpu.kv_append(&mut rec, &s, &nk, &plain_k).unwrap();
            gpu.kv_append(&mut rec, &s, &gv, &plain_v).unwrap();
            rec.submit();

            let read = |t: &GpuTensor| gpu.read_f32(t).unwrap();
            let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let what = format!("seed {seed}: head_dim {head_dim}");
            assert_eq!(bits(read(&fused_q)), bits(read(&nq)), "{what}: q");
            assert_eq!(
                bits(read(&fused_k)),
                bits(read(&plain_k)),
                "{what}: k cache"
            );
            assert_eq!(
                bits(read(&fused_v)),
                bits(read(&plain_v)),
                "{what}: v cache"
            );
            for (name, one, two) in [
                ("q", &one_q, &fused_q),
                ("k cache", &one_k, &fused_k),
                ("v cache", &one_v, &fused_v),
            ] {
                assert_eq!(
                    bits(read(one)),
                    bits(read(two)),
                    "{what}: {name}, one dispatch vs two"
                );
            }

            // the references composed
            let (want_q, _) = norm::rmsnorm_forward(&q, &wq, batch * heads, head_dim, eps);
            let want_q = rope::rope(&want_q, &positions, &cos, &sin, heads, head_dim, false);
            let (want_k, _) = norm::rmsnorm_forward(&k, &wk, batch * kv_heads, head_dim, eps);
            let want_k = rope::rope(&want_k, &positions, &cos, &sin, kv_heads, head_dim, false);
            let (mut want_kc, mut want_vc) = (garbage.clone(), garbage.clone());
            reference::append(&mut want_kc, &want_k, &s);
            reference::append(&mut want_vc, &v, &s);
            assert!(
                rel_frobenius(&read(&fused_q), &want_q) < 1e-6,
                "{what}: q vs reference"
            );
            assert!(
                rel_frobenius(&read(&fused_k), &want_kc) < 1e-6,
                "{what}: k cache vs reference"
            );
            assert_eq!(read(&fused_v), want_vc, "{what}: v cache vs reference");
        }
    }

    /// Decodes `steps` positions one at a time, appending each step's K and V through the GPU
    /// and the reference alike, and compares every step's output with fresh random inputs.
    /// Odd sizes (head_dim 37, 6 heads over 3 kv heads, more keys than a workgroup holds, a
    /// ring smaller than the sequence), left padding per row (one row all padding for a while),
    /// outputs poisoned before each dispatch.
    fn decode_sequence(gpu: &Gpu, window: usize, capacity: usize, steps: usize, head_dim: usize) {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let (batch, heads, kv_heads) = (3usize, 6usize, 3usize);
        let start = [0u32, 5, (steps as u32).saturating_sub(3)];
        let base = DecodeShape {
            batch,
            heads,
            kv_heads,
            head_dim,
            capacity,
            pos: 0,
            window,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let cache_len = batch * kv_heads * capacity * head_dim;
        // Stale values in the cache must never be read: start from garbage, not zeros.
        let mut k_ref = rng.vec_normal(cache_len);
        let mut v_ref = rng.vec_normal(cache_len);
        let k_gpu = gpu
            .upload_f32(&[batch, kv_heads, capacity, head_dim], &k_ref)
            .unwrap();
        let v_gpu = gpu
            .upload_f32(&[batch, kv_heads, capacity, head_dim], &v_ref)
            .unwrap();
        let gstart = gpu.upload_u32(&[batch], &start).unwrap();
        let out = gpu.empty(&[batch, heads, head_dim], DType::F32).unwrap();
        for pos in 0..steps {
            let s = DecodeShape { pos, ..base };
            // Scores of several units: a softmax far from uniform.
            let k_new: Vec<f32> = rng.vec_normal(batch * kv_heads * head_dim);
            let v_new = rng.vec_normal(batch * kv_heads * head_dim);
            let q: Vec<f32> = rng
                .vec_normal(batch * heads * head_dim)
                .iter()
                .map(|x| 3.0 * x)
                .collect();
            reference::append(&mut k_ref, &k_new, &s);
            reference::append(&mut v_ref, &v_new, &s);
            let gk = gpu
                .upload_f32(&[batch, kv_heads, head_dim], &k_new)
                .unwrap();
            let gv = gpu
                .upload_f32(&[batch, kv_heads, head_dim], &v_new)
                .unwrap();
            let gq = gpu.upload_f32(&[batch, heads, head_dim], &q).unwrap();
            gpu.poison(&out);
            let mut rec = Recorder::new(gpu);
            gpu.kv_append(&mut rec, &s, &gk, &k_gpu).unwrap();
            gpu.kv_append(&mut rec, &s, &gv, &v_gpu).unwrap();
            gpu.decode_attention(&mut rec, &s, &gq, &k_gpu, &v_gpu, &gstart, &out)
                .unwrap();
            rec.submit();
            assert_eq!(
                gpu.read_f32(&k_gpu).unwrap(),
                k_ref,
                "seed {seed} pos {pos}: K cache"
            );
            assert_eq!(
                gpu.read_f32(&v_gpu).unwrap(),
                v_ref,
                "seed {seed} pos {pos}: V cache"
            );
            let got = gpu.read_f32(&out).unwrap();
            assert!(
                got.iter().all(|v| v.is_finite()),
                "seed {seed} pos {pos}: an output was not written (poison left)"
            );
            let want = reference::decode(&q, &k_ref, &v_ref, &start, &s);
            let err = rel_frobenius(&got, &want);
            // Both sides sum the keys in f32 in different orders: the rounding grows with
            // their number (~sqrt for random terms).
            let tolerance = 2e-6 * (1.0 + (pos as f64 / 256.0).sqrt());
            assert!(
                err < tolerance,
                "seed {seed} pos {pos} window {window}: rel err {err}"
            );
        }
    }

    /// A prompt's rows into a full cache and into rings smaller and larger than the prompt
    /// (garbage beforehand: untouched slots must keep it), against the reference, which equals
    /// one `append` per position.
    #[test]
    fn prefill_matches_reference_and_appends() {
        let gpu = test_gpu();
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let (batch, kv_heads, head_dim, n) = (2usize, 3usize, 5usize, 11usize);
        for (capacity, window) in [(14usize, 0usize), (4, 4), (13, 6)] {
            let s = DecodeShape {
                batch,
                heads: kv_heads,
                kv_heads,
                head_dim,
                capacity,
                pos: n,
                window,
                scale: 1.0,
            };
            let cache_len = batch * kv_heads * capacity * head_dim;
            let mut want = rng.vec_normal(cache_len);
            let gcache = gpu
                .upload_f32(&[batch, kv_heads, capacity, head_dim], &want)
                .unwrap();
            let new = rng.vec_normal(batch * n * kv_heads * head_dim);
            let mut by_append = want.clone();
            for t in 0..n {
                let rows: Vec<f32> = (0..batch)
                    .flat_map(|b| {
                        new[(b * n + t) * kv_heads * head_dim..][..kv_heads * head_dim].to_vec()
                    })
                    .collect();
                reference::append(&mut by_append, &rows, &DecodeShape { pos: t, ..s });
            }
            reference::prefill(&mut want, &new, &s);
            assert_eq!(
                want, by_append,
                "seed {seed} capacity {capacity}: reference"
            );
            let gnew = gpu
                .upload_f32(&[batch, n, kv_heads, head_dim], &new)
                .unwrap();
            let mut rec = Recorder::new(gpu);
            gpu.kv_prefill(&mut rec, &s, &gnew, &gcache).unwrap();
            rec.submit();
            assert_eq!(
                gpu.read_f32(&gcache).unwrap(),
                want,
                "seed {seed} capacity {capacity} window {window}"
            );
        }
    }

    #[test]
    fn full_attention_matches_reference() {
        // 70 keys: more than one key per lane; head_dim 37 reads scalars, 36 vec4s.
        decode_sequence(test_gpu(), 0, 73, 70, 37);
        decode_sequence(test_gpu(), 0, 73, 70, 36);
    }

    #[test]
    fn keys_past_one_tile_rescale_the_running_sums() {
        // 1100 keys: a second tile of the online softmax (TILE = 1024), after a first whose
        // maximum is not the row's, with the scalar and the vec4 reads.
        for head_dim in [5, 8] {
            decode_sequence(test_gpu(), 0, 1100, 1100, head_dim);
        }
    }

    #[test]
    fn sliding_window_ring_matches_reference() {
        // Window 5 in a ring of 5, then a ring larger than its window.
        decode_sequence(test_gpu(), 5, 5, 19, 37);
        decode_sequence(test_gpu(), 7, 9, 23, 8);
    }

    #[test]
    fn gemma_head_dim_256() {
        decode_sequence(test_gpu(), 0, 12, 11, MAX_HEAD_DIM);
    }

    /// Where the adapter stages operands (lavapipe) the tests above run `decode_subgroup` for
    /// every head_dim % 4 == 0; this runs the storage-buffer kernel that GPUs get on the same
    /// cases: full, past one tile, a ring, and Gemma's head_dim.
    #[test]
    fn storage_buffer_kernel_matches_reference() {
        crate::gpu::staging::without_staging(|| {
            decode_sequence(test_gpu(), 0, 73, 70, 36);
            decode_sequence(test_gpu(), 0, 1100, 1100, 8);
            decode_sequence(test_gpu(), 7, 9, 23, 8);
            decode_sequence(test_gpu(), 0, 12, 11, MAX_HEAD_DIM);
        });
    }

    #[test]
    fn bad_shapes_are_refused() {
        let gpu = test_gpu();
        let s = DecodeShape {
            batch: 1,
            heads: 3,
            kv_heads: 2,
            head_dim: 4,
            capacity: 4,
            pos: 0,
            window: 0,
            scale: 1.0,
        };
        let t = gpu.empty(&[48], DType::F32).unwrap();
        let u = gpu.empty(&[1], DType::U32).unwrap();
        let mut rec = Recorder::new(gpu);
        let err = gpu
            .decode_attention(&mut rec, &s, &t, &t, &t, &u, &t)
            .unwrap_err();
        assert!(err.to_string().contains("kv heads"), "{err}");
        let full = DecodeShape {
            heads: 2,
            pos: 4,
            ..s
        };
        let err = gpu.kv_append(&mut rec, &full, &t, &t).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let big = DecodeShape {
            heads: 2,
            head_dim: 257,
            ..s
        };
        let err = gpu.kv_append(&mut rec, &big, &t, &t).unwrap_err();
        assert!(err.to_string().contains("head_dim"), "{err}");
    }
}
