//! Generation with a KV cache on the GPU: the prompt forward (vision tower once, bidirectional
//! image blocks, left padding) fills every layer's cache through `kv_prefill`; each decode step
//! then runs one new row per sequence through the decoder, appending its keys and values
//! (`kv_append`) and attending over the cache (`decode_attention`). Full-attention layers keep
//! every position (prompt + `max_new_tokens`); sliding-window layers keep only their window, as a
//! ring. The twin of transformers' `generate` with its dynamic/hybrid cache: same positions
//! (counted from each row's first real token), same masks, same token order.

use std::collections::VecDeque;

use anyhow::{ensure, Context, Result};

use super::decoder::GpuDecoderLayer;
use super::linear::{GpuLinear, LoraRun};
use super::model::Gemma3Gpu;
use crate::reference::gemma3::TextDims;
use data::collate::Batch;
use engine::gpu::kernels::decode_attention::DecodeShape;
use engine::gpu::kernels::greedy::GreedyRows;
use engine::gpu::{DType, Gpu, GpuTensor, PendingRead, Recorder, RopeTables};

/// One layer's cache: keys (rotated) and values, f32 `[batch, kv_heads, capacity, head_dim]`.
struct LayerKv {
    k: GpuTensor,
    v: GpuTensor,
    capacity: usize,
    /// 0: full attention.
    window: usize,
}

/// The decoding state of one batch of prompts.
pub struct KvCache {
    pub batch: usize,
    /// The (left-padded) prompt length: the absolute position of the first new token.
    pub prompt_len: usize,
    /// Prompt + `max_new_tokens`: the positions full-attention layers hold.
    pub max_len: usize,
    layers: Vec<LayerKv>,
    /// `[batch]` u32: each row's left padding (the first key it sees).
    start: GpuTensor,
    /// RoPE tables per (base, factor), covering `max_len` positions.
    ropes: Vec<((u64, u64), RopeTables)>,
    /// The RoPE position of each row's next token (its real tokens so far).
    next_position: Vec<u32>,
    /// The absolute position (cache slot index) of the next token, shared by all rows.
    pos: usize,
    /// Keeps the frozen weights staged for the whole generation on CPU adapters.
    _staged_weights: engine::gpu::staging::StagedWeightsHold,
}

impl KvCache {
    /// Device bytes the caches hold.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| (l.k.numel() + l.v.numel()) as u64 * 4)
            .sum()
    }

    /// New tokens decoded so far.
    pub fn generated(&self) -> usize {
        self.pos - self.prompt_len
    }

    fn rope(&self, layer: &GpuDecoderLayer) -> Result<&RopeTables> {
        let key = (
            layer.rope_theta.to_bits(),
            layer.rope_linear_factor.to_bits(),
        );
        self.ropes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, t)| t)
            .context("no RoPE tables for this layer")
    }
}

/// Positions as transformers' generation computes them for a left-padded mask:
/// `cumsum(mask) - 1`, padding at 0.
pub fn left_padded_positions(attention_mask: &[i64], batch: usize, seq: usize) -> Vec<u32> {
    let mut out = vec![0u32; batch * seq];
    for b in 0..batch {
        let mut n = 0u32;
        for t in 0..seq {
            if attention_mask[b * seq + t] != 0 {
                out[b * seq + t] = n;
                n += 1;
            }
        }
    }
    out
}

fn rmsnorm(
    gpu: &Gpu,
    rec: &mut Recorder,
    x: &GpuTensor,
    w: &GpuTensor,
    eps: f32,
) -> Result<GpuTensor> {
    let y = gpu.empty(x.shape(), DType::F32)?;
    let rstd = gpu.empty(&[x.numel() / w.numel()], DType::F32)?;
    gpu.rmsnorm_forward(rec, x, w, &y, &rstd, eps)?;
    Ok(y)
}

/// `(h, y)`: `h = residual + rmsnorm(x; w_post)`, `y = rmsnorm(h; w_pre)`, one dispatch.
fn norm_residual_norm(
    gpu: &Gpu,
    rec: &mut Recorder,
    x: &GpuTensor,
    residual: &GpuTensor,
    w_post: &GpuTensor,
    w_pre: &GpuTensor,
    eps: f32,
) -> Result<(GpuTensor, GpuTensor)> {
    let h = gpu.empty(residual.shape(), DType::F32)?;
    let y = gpu.empty(residual.shape(), DType::F32)?;
    gpu.rmsnorm_residual_rmsnorm(rec, x, residual, w_post, w_pre, &h, &y, eps)?;
    Ok((h, y))
}

impl GpuDecoderLayer {
    /// One decode step: `x [batch, hidden]` (one new token per row at RoPE `positions [batch]`
    /// u32, absolute position `pos`) and `n1`, its input_layernorm, -> the layer's output
    /// `[batch, hidden]` and that output normed by `next_norm` (the next layer's
    /// input_layernorm, or the final norm), its keys and values appended to the layer's cache.
    /// The same computation as [`GpuDecoderLayer::forward`] with the attention over the cache;
    /// each sublayer's post-norm, residual add and the next pre-norm are one dispatch
    /// ([`Gpu::rmsnorm_residual_rmsnorm`], the same bits as three).
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &GpuTensor,
        n1: &GpuTensor,
        next_norm: &GpuTensor,
        dims: &TextDims,
        positions: &GpuTensor,
        rope: &RopeTables,
        kv: &LayerKv,
        start: &GpuTensor,
        pos: usize,
        run: &LoraRun,
    ) -> Result<(GpuTensor, GpuTensor)> {
        let eps = dims.rms_eps;
        let rows = x.rows();
        let (hd, heads, kvh) = (dims.head_dim, dims.heads, dims.kv_heads);
        // q, k and v read the same n1, gate and up the same n2: one dispatch each where it can
        let qkv = GpuLinear::forward_inference_group(
            gpu,
            rec,
            n1,
            &[&self.q_proj, &self.k_proj, &self.v_proj],
            run,
        )?;
        let [q, k, v] = <[GpuTensor; 3]>::try_from(qkv).expect("three outputs");
        // q_norm and RoPE on q in place; k_norm and RoPE on k into the key cache, v into the
        // value cache: one dispatch (the same bits as norm, rope and append separately)
        let q = q.reshape(&[rows, heads, hd])?;
        let shape = DecodeShape {
            batch: rows,
            heads,
            kv_heads: kvh,
            head_dim: hd,
            capacity: kv.capacity,
            pos,
            window: kv.window,
            scale: dims.attn_scale,
        };
        gpu.decode_qkv_norm_rope_append(
            rec,
            &shape,
            &q,
            &k.reshape(&[rows, kvh, hd])?,
            &v.reshape(&[rows, kvh, hd])?,
            &self.q_norm,
            &self.k_norm,
            positions,
            rope,
            eps,
            &kv.k,
            &kv.v,
        )?;
        let attn = gpu.empty(&[rows, heads, hd], DType::F32)?;
        gpu.decode_attention(rec, &shape, &q, &kv.k, &kv.v, start, &attn)?;
        let (o, _) = self
            .o_proj
            .forward(gpu, rec, &attn.reshape(&[rows, heads * hd])?, run)?;
        let (h, n2) = norm_residual_norm(
            gpu,
            rec,
            &o,
            x,
            &self.post_attention_layernorm,
            &self.pre_feedforward_layernorm,
            eps,
        )?;
        let act =
            GpuLinear::forward_inference_geglu(gpu, rec, &n2, &self.gate_proj, &self.up_proj, run)?;
        let (down, _) = self.down_proj.forward(gpu, rec, &act, run)?;
        norm_residual_norm(
            gpu,
            rec,
            &down,
            &h,
            &self.post_feedforward_layernorm,
            next_norm,
            eps,
        )
    }
}

impl Gemma3Gpu {
    fn eval_run(&self) -> LoraRun {
        LoraRun {
            settings: self.settings,
            training: false,
            call: 0,
            precision: self.matmul_precision,
        }
    }

    /// Runs the prompts of a left-padded `batch` (images included: the vision tower runs here,
    /// once) and returns the cache, sized for `max_new_tokens` more positions, and the logits of
    /// every row's last position, `[batch, vocab]`.
    pub fn start_generation(
        &self,
        gpu: &Gpu,
        batch: &Batch,
        max_new_tokens: usize,
    ) -> Result<(KvCache, Vec<f32>)> {
        let mut rec = Recorder::new(gpu);
        let (cache, logits) = self.record_start(gpu, &mut rec, batch, max_new_tokens)?;
        // no wait here: the readback's own submission runs after this one (one queue)
        rec.submit();
        Ok((cache, gpu.read_f32(&logits)?))
    }

    /// [`Gemma3Gpu::start_generation`] with every kernel timed (timestamp queries, where the
    /// adapter has them): the cache, the logits and the per-kernel GPU seconds (benchmarks).
    pub fn start_generation_timed(
        &self,
        gpu: &Gpu,
        batch: &Batch,
        max_new_tokens: usize,
    ) -> Result<(KvCache, Vec<f32>, Vec<engine::gpu::KernelTime>)> {
        let mut rec = Recorder::timed(gpu);
        let (cache, logits) = self.record_start(gpu, &mut rec, batch, max_new_tokens)?;
        let times = rec.submit_timed()?.unwrap_or_default();
        Ok((cache, gpu.read_f32(&logits)?, times))
    }

    /// Records [`Gemma3Gpu::start_generation`]'s work (flushing after each decoder layer) and
    /// returns the cache and the logits tensor.
    fn record_start(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        max_new_tokens: usize,
    ) -> Result<(KvCache, GpuTensor)> {
        let (bsz, seq) = (batch.batch_size, batch.seq_len);
        ensure!(seq > 0, "generation needs a prompt of at least one token");
        ensure!(max_new_tokens > 0, "max_new_tokens must be at least 1");
        let mut start = Vec::with_capacity(bsz);
        let mut next_position = Vec::with_capacity(bsz);
        for b in 0..bsz {
            let mask = &batch.attention_mask[b * seq..(b + 1) * seq];
            let pad = mask.iter().take_while(|&&m| m == 0).count();
            ensure!(
                pad < seq && mask[pad..].iter().all(|&m| m != 0),
                "row {b}: generation needs left padding (its attention mask has zeros after its \
                 first token, or no token at all)"
            );
            start.push(pad as u32);
            next_position.push((seq - pad) as u32);
        }
        let max_len = seq + max_new_tokens;
        let d = self.dims;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let capacity = l.sliding_window.unwrap_or(max_len);
                let shape = [bsz, d.kv_heads, capacity, d.head_dim];
                Ok(LayerKv {
                    k: gpu.empty(&shape, DType::F32)?,
                    v: gpu.empty(&shape, DType::F32)?,
                    capacity,
                    window: l.sliding_window.unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut ropes: Vec<((u64, u64), RopeTables)> = Vec::new();
        for l in &self.layers {
            let key = (l.rope_theta.to_bits(), l.rope_linear_factor.to_bits());
            if !ropes.iter().any(|(k, _)| *k == key) {
                let tables = gpu.rope_tables(
                    l.rope_theta as f32,
                    l.rope_linear_factor as f32,
                    d.head_dim,
                    max_len,
                )?;
                ropes.push((key, tables));
            }
        }
        let positions = left_padded_positions(&batch.attention_mask, bsz, seq);
        let staged_weights = gpu.hold_staged_weights();
        let normed = self.prefill(gpu, rec, batch, &positions, |rec, i, k, v| {
            let kv = &layers[i];
            let shape = DecodeShape {
                batch: bsz,
                heads: d.heads,
                kv_heads: d.kv_heads,
                head_dim: d.head_dim,
                capacity: kv.capacity,
                pos: seq,
                window: kv.window,
                scale: d.attn_scale,
            };
            gpu.kv_prefill(rec, &shape, k, &kv.k)?;
            gpu.kv_prefill(rec, &shape, v, &kv.v)
        })?;
        let logits = self.logits_of(gpu, rec, &normed)?;
        let cache = KvCache {
            batch: bsz,
            prompt_len: seq,
            max_len,
            layers,
            start: gpu.upload_u32(&[bsz], &start)?,
            ropes,
            next_position,
            pos: seq,
            _staged_weights: staged_weights,
        };
        Ok((cache, logits))
    }

    /// One decode step: `ids [batch]` (the token each row just produced; finished rows pass
    /// anything, e.g. the pad id, as transformers does) -> the next logits `[batch, vocab]`.
    pub fn decode_step(&self, gpu: &Gpu, cache: &mut KvCache, ids: &[u32]) -> Result<Vec<f32>> {
        let mut rec = Recorder::new(gpu);
        let ids = self.upload_ids(gpu, cache, ids)?;
        let logits = self.record_decode_step(gpu, &mut rec, cache, &ids)?;
        // no wait here: the readback's own submission runs after this one (one queue)
        rec.submit();
        gpu.read_f32(&logits)
    }

    /// [`Gemma3Gpu::decode_step`] with every kernel timed (timestamp queries, where the adapter
    /// has them): the logits and the per-kernel GPU seconds (benchmarks).
    pub fn decode_step_timed(
        &self,
        gpu: &Gpu,
        cache: &mut KvCache,
        ids: &[u32],
    ) -> Result<(Vec<f32>, Vec<engine::gpu::KernelTime>)> {
        let mut rec = Recorder::timed(gpu);
        let ids = self.upload_ids(gpu, cache, ids)?;
        let logits = self.record_decode_step(gpu, &mut rec, cache, &ids)?;
        let times = rec.submit_timed()?.unwrap_or_default();
        Ok((gpu.read_f32(&logits)?, times))
    }

    /// Host ids for a decode step, checked: one per row, each in the vocabulary.
    fn upload_ids(&self, gpu: &Gpu, cache: &KvCache, ids: &[u32]) -> Result<GpuTensor> {
        ensure!(
            ids.len() == cache.batch,
            "decode step: {} ids for a batch of {}",
            ids.len(),
            cache.batch
        );
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.dims.vocab) {
            anyhow::bail!(
                "decode step: token {bad} is outside the vocabulary ({})",
                self.dims.vocab
            );
        }
        gpu.upload_u32(&[ids.len()], ids)
    }

    /// Records one decode step into `rec` and advances the cache; `gids [batch]` u32 are the
    /// rows' input tokens (on the GPU, in the vocabulary). Returns the logits tensor.
    fn record_decode_step(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        cache: &mut KvCache,
        gids: &GpuTensor,
    ) -> Result<GpuTensor> {
        ensure!(
            gids.numel() == cache.batch,
            "decode step: {} ids for a batch of {}",
            gids.numel(),
            cache.batch
        );
        ensure!(
            cache.pos < cache.max_len,
            "decode step: the cache holds {} positions and is full",
            cache.max_len
        );
        let run = self.eval_run();
        let positions = gpu.upload_u32(&[cache.batch], &cache.next_position)?;
        let mut x = self.embed_ids(gpu, rec, gids)?;
        let first_norm = self
            .layers
            .first()
            .map_or(&self.final_norm, |l| &l.input_layernorm);
        // every layer's input arrives normed by the previous layer's last dispatch
        let mut normed = rmsnorm(gpu, rec, &x, first_norm, self.dims.rms_eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.final_norm, |l| &l.input_layernorm);
            (x, normed) = layer
                .decode(
                    gpu,
                    rec,
                    &x,
                    &normed,
                    next_norm,
                    &self.dims,
                    &positions,
                    cache.rope(layer)?,
                    &cache.layers[i],
                    &cache.start,
                    cache.pos,
                    &run,
                )
                .with_context(|| format!("decoder layer {i} (decode step)"))?;
        }
        drop(x);
        let logits = self.logits_of(gpu, rec, &normed)?;
        cache.pos += 1;
        for p in &mut cache.next_position {
            *p += 1;
        }
        Ok(logits)
    }
}

/// A greedy generation whose tokens are chosen on the GPU ([`Gpu::choose_greedy`]: torch's
/// argmax, the pad id for rows that have stopped). Each decode step reads its input ids from the
/// previous step's choice, so the logits never leave the device, and the host may record and
/// submit step s+1 before it reads step s's tokens (its recording and the readback then overlap
/// the device's work; `ops::generation::decode::runs_ahead` says when that pays). The tokens are
/// the ones the host loop over [`Gemma3Gpu::decode_step`] picks.
pub struct GreedyGeneration {
    cache: KvCache,
    rows: GreedyRows,
    /// The latest submitted choice: the next step's input ids.
    last_ids: GpuTensor,
    /// Choices submitted and not yet read, oldest first.
    pending: VecDeque<PendingRead>,
}

impl GreedyGeneration {
    /// Waits for the oldest choice not yet read (the first is the prompt's): `[batch]` ids,
    /// the pad id for rows that had stopped before it.
    pub fn next_ids(&mut self) -> Result<Vec<u32>> {
        let read = self
            .pending
            .pop_front()
            .context("every submitted greedy choice has been read")?;
        let ids = read.wait_u32()?;
        ensure!(
            ids.len() == self.cache.batch,
            "greedy choice: {} ids for a batch of {}",
            ids.len(),
            self.cache.batch
        );
        Ok(ids)
    }
}

impl Gemma3Gpu {
    /// Submits the prompts of a left-padded `batch` (as [`Gemma3Gpu::start_generation`]) and the
    /// greedy choice of each row's first token, without waiting. A row stops after producing one
    /// of `stop_ids` and is fed `pad_id` from then on.
    pub fn start_greedy(
        &self,
        gpu: &Gpu,
        batch: &Batch,
        max_new_tokens: usize,
        stop_ids: &[u32],
        pad_id: u32,
    ) -> Result<GreedyGeneration> {
        ensure!(
            (pad_id as usize) < self.dims.vocab,
            "the pad id {pad_id} is outside the vocabulary ({}): rows that stop are fed it",
            self.dims.vocab
        );
        let rows = gpu.greedy_rows(batch.batch_size, stop_ids, pad_id)?;
        let mut rec = Recorder::new(gpu);
        let (cache, logits) = self.record_start(gpu, &mut rec, batch, max_new_tokens)?;
        let ids = gpu.choose_greedy(&mut rec, &logits, &rows)?;
        let read = rec.submit_reading(&ids);
        Ok(GreedyGeneration {
            cache,
            rows,
            last_ids: ids,
            pending: VecDeque::from([read]),
        })
    }

    /// Submits one decode step on the latest choice and the greedy choice after it, without
    /// waiting; [`GreedyGeneration::next_ids`] reads the choices in order.
    pub fn submit_greedy_step(&self, gpu: &Gpu, g: &mut GreedyGeneration) -> Result<()> {
        let mut rec = Recorder::new(gpu);
        let ids = self.record_greedy_step(gpu, &mut rec, g)?;
        g.pending.push_back(rec.submit_reading(&ids));
        g.last_ids = ids;
        Ok(())
    }

    /// Records a decode step on the latest choice and the greedy choice after it: the new ids.
    fn record_greedy_step(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        g: &mut GreedyGeneration,
    ) -> Result<GpuTensor> {
        let logits = self.record_decode_step(gpu, rec, &mut g.cache, &g.last_ids)?;
        gpu.choose_greedy(rec, &logits, &g.rows)
    }

    /// [`Gemma3Gpu::submit_greedy_step`] with every kernel timed (timestamp queries, where the
    /// adapter has them), waiting for it: the per-kernel GPU seconds (benchmarks).
    pub fn greedy_step_timed(
        &self,
        gpu: &Gpu,
        g: &mut GreedyGeneration,
    ) -> Result<Vec<engine::gpu::KernelTime>> {
        let mut rec = Recorder::timed(gpu);
        let ids = self.record_greedy_step(gpu, &mut rec, g)?;
        let times = rec.submit_timed()?.unwrap_or_default();
        g.pending.push_back(Recorder::new(gpu).submit_reading(&ids));
        g.last_ids = ids;
        Ok(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_real_tokens_from_the_left_padding() {
        let mask = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
        assert_eq!(
            left_padded_positions(&mask, 2, 5),
            vec![0, 0, 0, 1, 2, 0, 1, 2, 3, 4]
        );
    }
}
