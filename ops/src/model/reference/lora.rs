//! Frozen linear layers with an optional PEFT LoRA branch, and the adapter (LoRA pairs plus the
//! `modules_to_save` copies of lm_head and embed_tokens) with its gradients.
//!
//! `y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ` with `A [r, in]`, `B [out, r]`, `s = lora_alpha / r`
//! (`lora_alpha / √r` with rslora), PEFT's `Linear.forward`. Module names are the canonical
//! (transformers 5 in-memory) module paths, so the PEFT key of a tensor is
//! `base_model.model.<module>.lora_A.weight`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::kernels::{accumulate_dyt_x, matmul_xw, matmul_xwt};
use crate::model::names::{EMBED_TOKENS, LM_HEAD};
use crate::model::safetensors_io::SafetensorsSet;

/// PEFT's prefix of every adapter key.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// A tensor's shape and values.
type Shaped = (Vec<usize>, Vec<f32>);

/// One LoRA pair. `a [rank, in]`, `b [out, rank]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
}

/// LoRA hyper-parameters shared by every pair of an adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSettings {
    /// `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`.
    pub scaling: f32,
    /// `lora_dropout` probability on the LoRA input (training only).
    pub dropout: f32,
    /// Seed of the dropout masks (see [`dropout_keep`]).
    pub dropout_seed: u64,
}

impl LoraSettings {
    pub fn new(r: usize, lora_alpha: f64, use_rslora: bool, dropout: f32) -> Self {
        let scaling = if use_rslora {
            lora_alpha / (r as f64).sqrt()
        } else {
            lora_alpha / r as f64
        };
        Self {
            scaling: scaling as f32,
            dropout,
            dropout_seed: 0,
        }
    }
}

/// A trainable adapter: LoRA pairs by module path, and the `modules_to_save` copies.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub settings: LoraSettings,
    /// Canonical module path (`model.language_model.layers.0.self_attn.q_proj`) -> pair.
    pub pairs: BTreeMap<String, LoraPair>,
    /// Trainable lm_head copy `[vocab, hidden]` (untied from embed_tokens), if saved.
    pub lm_head: Option<Vec<f32>>,
    /// Trainable embed_tokens copy `[vocab, hidden]`, if saved.
    pub embed_tokens: Option<Vec<f32>>,
}

impl Adapter {
    /// Reads a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
    /// `dropout_override` replaces the config's `lora_dropout` (e.g. 0 to evaluate).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let get_f64 = |k: &str| {
            cfg.get(k)
                .and_then(|v| v.as_f64())
                .with_context(|| format!("{}: missing number `{k}`", cfg_path.display()))
        };
        let r = get_f64("r")? as usize;
        let alpha = get_f64("lora_alpha")?;
        let dropout = cfg
            .get("lora_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0) as f32;
        let rslora = cfg
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        for unsupported in ["use_dora", "lora_bias"] {
            if cfg.get(unsupported).and_then(|v| v.as_bool()) == Some(true) {
                bail!("{}: `{unsupported}` is not supported", cfg_path.display());
            }
        }
        if cfg
            .get("bias")
            .and_then(|v| v.as_str())
            .is_some_and(|b| b != "none")
        {
            bail!(
                "{}: only `bias = \"none\"` is supported",
                cfg_path.display()
            );
        }
        let settings = LoraSettings::new(r, alpha, rslora, dropout);
        let set = SafetensorsSet::open_file(&dir.join("adapter_model.safetensors"))?;
        let mut tensors = BTreeMap::new();
        for t in set.tensors() {
            let values = crate::model::safetensors_io::to_f32(t.dtype, set.bytes(t))
                .with_context(|| format!("adapter tensor `{}`", t.key))?;
            tensors.insert(t.key.clone(), (t.shape.clone(), values));
        }
        Self::from_peft_tensors(settings, tensors)
            .with_context(|| format!("adapter {}", dir.display()))
    }

    /// Builds an adapter from PEFT-named tensors (`key -> (shape, values)`).
    pub fn from_peft_tensors(
        settings: LoraSettings,
        mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<Self> {
        let mut lm_head = None;
        let mut embed_tokens = None;
        if let Some((_, v)) = tensors.remove(&format!("{PEFT_PREFIX}{LM_HEAD}")) {
            lm_head = Some(v);
        }
        if let Some((_, v)) = tensors.remove(&format!("{PEFT_PREFIX}{EMBED_TOKENS}")) {
            embed_tokens = Some(v);
        }
        let mut halves: BTreeMap<String, (Option<Shaped>, Option<Shaped>)> = BTreeMap::new();
        for (key, value) in tensors {
            let rest = key
                .strip_prefix(PEFT_PREFIX)
                .with_context(|| format!("adapter key `{key}` lacks the `{PEFT_PREFIX}` prefix"))?;
            if let Some(module) = rest.strip_suffix(".lora_A.weight") {
                halves.entry(module.to_string()).or_default().0 = Some(value);
            } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
                halves.entry(module.to_string()).or_default().1 = Some(value);
            } else {
                bail!(
                    "adapter key `{key}` is neither a LoRA A/B weight nor a modules_to_save copy"
                );
            }
        }
        let mut pairs = BTreeMap::new();
        for (module, (a, b)) in halves {
            let (Some((sa, a)), Some((sb, b))) = (a, b) else {
                bail!("module `{module}` has only one of lora_A / lora_B");
            };
            ensure!(
                sa.len() == 2 && sb.len() == 2 && sa[0] == sb[1],
                "module `{module}`: lora_A {sa:?} and lora_B {sb:?} do not share a rank"
            );
            pairs.insert(module, LoraPair { a, b, rank: sa[0] });
        }
        Ok(Self {
            settings,
            pairs,
            lm_head,
            embed_tokens,
        })
    }
}

/// Gradients of every adapter tensor, shaped like the adapter.
#[derive(Debug, Clone, Default)]
pub struct AdapterGrads {
    /// module -> (dA [rank, in], dB [out, rank]).
    pub pairs: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    pub lm_head: Option<Vec<f32>>,
    pub embed_tokens: Option<Vec<f32>>,
}

impl AdapterGrads {
    /// Zero gradients for every tensor of `adapter`.
    pub fn zeros_like(adapter: &Adapter) -> Self {
        Self {
            pairs: adapter
                .pairs
                .iter()
                .map(|(m, p)| (m.clone(), (vec![0.0; p.a.len()], vec![0.0; p.b.len()])))
                .collect(),
            lm_head: adapter.lm_head.as_ref().map(|v| vec![0.0; v.len()]),
            embed_tokens: adapter.embed_tokens.as_ref().map(|v| vec![0.0; v.len()]),
        }
    }

    /// Every gradient under its PEFT adapter key.
    pub fn by_peft_key(&self) -> BTreeMap<String, &[f32]> {
        let mut out = BTreeMap::new();
        for (m, (da, db)) in &self.pairs {
            out.insert(format!("{PEFT_PREFIX}{m}.lora_A.weight"), da.as_slice());
            out.insert(format!("{PEFT_PREFIX}{m}.lora_B.weight"), db.as_slice());
        }
        if let Some(g) = &self.lm_head {
            out.insert(format!("{PEFT_PREFIX}{LM_HEAD}"), g.as_slice());
        }
        if let Some(g) = &self.embed_tokens {
            out.insert(format!("{PEFT_PREFIX}{EMBED_TOKENS}"), g.as_slice());
        }
        out
    }
}

impl Adapter {
    /// Every tensor under its PEFT adapter key (the inverse of [`Adapter::from_peft_tensors`]).
    pub fn by_peft_key(&self) -> BTreeMap<String, &[f32]> {
        let mut out = BTreeMap::new();
        for (m, p) in &self.pairs {
            out.insert(format!("{PEFT_PREFIX}{m}.lora_A.weight"), p.a.as_slice());
            out.insert(format!("{PEFT_PREFIX}{m}.lora_B.weight"), p.b.as_slice());
        }
        if let Some(g) = &self.lm_head {
            out.insert(format!("{PEFT_PREFIX}{LM_HEAD}"), g.as_slice());
        }
        if let Some(g) = &self.embed_tokens {
            out.insert(format!("{PEFT_PREFIX}{EMBED_TOKENS}"), g.as_slice());
        }
        out
    }

    /// Mutable views of every tensor under its PEFT key (for optimizers).
    pub fn tensors_mut(&mut self) -> BTreeMap<String, &mut Vec<f32>> {
        let mut out = BTreeMap::new();
        for (m, p) in self.pairs.iter_mut() {
            out.insert(format!("{PEFT_PREFIX}{m}.lora_A.weight"), &mut p.a);
            out.insert(format!("{PEFT_PREFIX}{m}.lora_B.weight"), &mut p.b);
        }
        if let Some(g) = self.lm_head.as_mut() {
            out.insert(format!("{PEFT_PREFIX}{LM_HEAD}"), g);
        }
        if let Some(g) = self.embed_tokens.as_mut() {
            out.insert(format!("{PEFT_PREFIX}{EMBED_TOKENS}"), g);
        }
        out
    }
}

/// The dropout mask element `i` of call `call` of a module: kept with probability `1 − p`.
/// Counter-based (SplitMix64 of seed, module, call and element) so a GPU kernel can reproduce
/// it without sharing RNG state.
pub fn dropout_keep(seed: u64, module_id: u64, call: u64, i: u64, p: f32) -> bool {
    let mut z = seed
        ^ module_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ call.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ i.wrapping_mul(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 / (1u64 << 24) as f32;
    u >= p
}

fn masked(x: &[f32], mask: Option<&[f32]>) -> Vec<f32> {
    match mask {
        Some(m) => x.iter().zip(m).map(|(a, b)| a * b).collect(),
        None => x.to_vec(),
    }
}

/// A frozen `nn.Linear` (`weight [out, in]`, optional `bias [out]`) by canonical module path.
#[derive(Debug, Clone)]
pub struct Linear {
    pub module: String,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

/// What [`Linear::forward`] keeps for the backward.
#[derive(Debug, Clone, Default)]
pub struct LinearCache {
    /// `[rows, in]` the input (needed for dA).
    pub x: Vec<f32>,
    /// `[rows, in]` the dropout multiplier (0 or `1/(1-p)`), when dropout is active.
    pub dropout_mask: Option<Vec<f32>>,
    /// `[rows, rank]` the LoRA intermediate `dropout(x)·Aᵀ`.
    pub xa: Vec<f32>,
}

/// Training-time context of a LoRA forward: dropout is applied only when `training`.
#[derive(Debug, Clone, Copy)]
pub struct LoraCall<'a> {
    pub adapter: Option<&'a Adapter>,
    pub training: bool,
    /// Distinguishes the dropout masks of successive micro-batches.
    pub call: u64,
}

impl Linear {
    fn pair<'a>(&self, lora: &LoraCall<'a>) -> Option<(&'a LoraPair, LoraSettings)> {
        let adapter = lora.adapter?;
        adapter
            .pairs
            .get(&self.module)
            .map(|p| (p, adapter.settings))
    }

    fn module_id(&self) -> u64 {
        // FNV-1a of the module path: stable across runs and platforms.
        self.module.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// `x [rows, in]` -> `y [rows, out]`.
    pub fn forward(&self, x: &[f32], lora: &LoraCall) -> (Vec<f32>, LinearCache) {
        let rows = x.len() / self.in_features;
        let mut y = matmul_xwt(x, &self.weight, rows, self.in_features, self.out_features);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_features) {
                row.iter_mut().zip(b).for_each(|(o, bv)| *o += bv);
            }
        }
        let mut cache = LinearCache {
            x: x.to_vec(),
            ..Default::default()
        };
        if let Some((pair, s)) = self.pair(lora) {
            let dropout_mask = (lora.training && s.dropout > 0.0).then(|| {
                let keep_scale = 1.0 / (1.0 - s.dropout);
                let id = self.module_id();
                (0..x.len() as u64)
                    .map(|i| {
                        if dropout_keep(s.dropout_seed, id, lora.call, i, s.dropout) {
                            keep_scale
                        } else {
                            0.0
                        }
                    })
                    .collect::<Vec<f32>>()
            });
            let lora_in = masked(x, dropout_mask.as_deref());
            let xa = matmul_xwt(&lora_in, &pair.a, rows, self.in_features, pair.rank);
            let xab = matmul_xwt(&xa, &pair.b, rows, pair.rank, self.out_features);
            y.iter_mut()
                .zip(&xab)
                .for_each(|(o, v)| *o += s.scaling * v);
            cache.xa = xa;
            cache.dropout_mask = dropout_mask;
        }
        (y, cache)
    }

    /// Backward: accumulates dA, dB into `grads` (when this module has a pair) and returns
    /// `dx [rows, in]` through the frozen weight and the LoRA branch.
    pub fn backward(
        &self,
        cache: &LinearCache,
        dy: &[f32],
        lora: &LoraCall,
        grads: Option<&mut AdapterGrads>,
    ) -> Vec<f32> {
        let rows = dy.len() / self.out_features;
        let mut dx = matmul_xw(dy, &self.weight, rows, self.out_features, self.in_features);
        if let Some((pair, s)) = self.pair(lora) {
            // d(xa) [rows, rank] = s · dy · B
            let mut dxa = matmul_xw(dy, &pair.b, rows, self.out_features, pair.rank);
            dxa.iter_mut().for_each(|v| *v *= s.scaling);
            if let Some(grads) = grads {
                let (da, db) = grads
                    .pairs
                    .get_mut(&self.module)
                    .expect("AdapterGrads made from the same adapter");
                accumulate_dyt_x(
                    db,
                    dy,
                    &cache.xa,
                    rows,
                    pair.rank,
                    self.out_features,
                    s.scaling,
                );
                let lora_in = masked(&cache.x, cache.dropout_mask.as_deref());
                accumulate_dyt_x(da, &dxa, &lora_in, rows, self.in_features, pair.rank, 1.0);
            }
            let dx_lora = matmul_xw(&dxa, &pair.a, rows, pair.rank, self.in_features);
            let dx_lora = masked(&dx_lora, cache.dropout_mask.as_deref());
            dx.iter_mut().zip(&dx_lora).for_each(|(o, v)| *o += v);
        }
        dx
    }
}
