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

use super::kernels::{matmul_xw, matmul_xwt};
use crate::names::{EMBED_TOKENS, LM_HEAD};
use crate::safetensors_io::SafetensorsSet;
use engine::reference::lora::hash32;

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
    /// Seed of the dropout masks (see [`lora_dropout_seed`]).
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
            let values = crate::safetensors_io::to_f32(t.dtype, set.bytes(t))
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

/// The dropout seed of one LoRA module in one forward call: the GPU model must derive its
/// per-call seeds the same way to reproduce the reference's masks (the mask itself is
/// [`engine::reference::lora::dropout_keep`] of this seed and the element index of `x [rows, in]`).
pub fn lora_dropout_seed(base_seed: u64, module: &str, call: u64) -> u32 {
    // FNV-1a of the module path (stable across runs and platforms), folded with the call and seed.
    let module_hash = module.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    let mut s = hash32(module_hash ^ base_seed as u32);
    s = hash32(s ^ (base_seed >> 32) as u32);
    s = hash32(s ^ call as u32);
    hash32(s ^ (call >> 32) as u32)
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
    /// `[rows, rank]` the LoRA intermediate `dropout(x)·Aᵀ`.
    pub xa: Vec<f32>,
    /// Dropout probability and seed used (p = 0 outside training).
    pub dropout: f32,
    pub seed: u32,
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
            let p = if lora.training { s.dropout } else { 0.0 };
            let seed = lora_dropout_seed(s.dropout_seed, &self.module, lora.call);
            let (with_lora, xa) = engine::reference::lora::lora_forward(
                x,
                &pair.a,
                &pair.b,
                &y,
                rows,
                self.in_features,
                self.out_features,
                pair.rank,
                s.scaling,
                p,
                seed,
                // The whole call's mask: x is every row of the call.
                0,
            );
            y = with_lora;
            cache.xa = xa;
            cache.dropout = p;
            cache.seed = seed;
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
            let (da, db, dx_lora) = engine::reference::lora::lora_backward(
                &cache.x,
                &pair.a,
                &pair.b,
                &cache.xa,
                dy,
                rows,
                self.in_features,
                self.out_features,
                pair.rank,
                s.scaling,
                cache.dropout,
                cache.seed,
                0,
            );
            if let Some(grads) = grads {
                let (ga, gb) = grads
                    .pairs
                    .get_mut(&self.module)
                    .expect("AdapterGrads made from the same adapter");
                ga.iter_mut().zip(&da).for_each(|(g, d)| *g += d);
                gb.iter_mut().zip(&db).for_each(|(g, d)| *g += d);
            }
            dx.iter_mut().zip(&dx_lora).for_each(|(o, v)| *o += v);
        }
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear_with_adapter(p: f32) -> (Linear, Adapter) {
        let (inp, out, rank) = (5, 3, 2);
        let vals = |n: usize, k: usize| {
            (0..n)
                .map(|i| ((i * 7 + k) % 11) as f32 * 0.1 - 0.5)
                .collect::<Vec<f32>>()
        };
        let linear = Linear {
            module: "m.q_proj".into(),
            weight: vals(out * inp, 1),
            bias: Some(vals(out, 2)),
            in_features: inp,
            out_features: out,
        };
        let mut pairs = BTreeMap::new();
        pairs.insert(
            "m.q_proj".to_string(),
            LoraPair {
                a: vals(rank * inp, 3),
                b: vals(out * rank, 4),
                rank,
            },
        );
        let adapter = Adapter {
            settings: LoraSettings {
                dropout: p,
                ..LoraSettings::new(rank, 4.0, true, p)
            },
            pairs,
            lm_head: None,
            embed_tokens: None,
        };
        (linear, adapter)
    }

    #[test]
    fn rslora_scaling_and_dropout_only_in_training() {
        assert_eq!(LoraSettings::new(16, 16.0, false, 0.0).scaling, 1.0);
        assert_eq!(LoraSettings::new(4, 16.0, true, 0.0).scaling, 8.0);
        let (linear, adapter) = linear_with_adapter(0.5);
        let x: Vec<f32> = (0..4 * 5).map(|i| (i as f32 * 0.37).sin()).collect();
        let call = |training, call| LoraCall {
            adapter: Some(&adapter),
            training,
            call,
        };
        let (eval_a, _) = linear.forward(&x, &call(false, 0));
        let (eval_b, _) = linear.forward(&x, &call(false, 1));
        let (train_a, _) = linear.forward(&x, &call(true, 0));
        let (train_b, _) = linear.forward(&x, &call(true, 1));
        assert_eq!(eval_a, eval_b, "no dropout in eval mode");
        assert_ne!(eval_a, train_a, "dropout acts in training");
        assert_ne!(train_a, train_b, "each call draws its own mask");
        assert_ne!(
            lora_dropout_seed(0, "m.q_proj", 0),
            lora_dropout_seed(0, "m.k_proj", 0),
            "each module draws its own mask"
        );
    }

    #[test]
    fn linear_backward_with_dropout_matches_finite_differences() {
        let (linear, adapter) = linear_with_adapter(0.3);
        let x: Vec<f32> = (0..4 * 5).map(|i| (i as f32 * 0.37).sin()).collect();
        let dy: Vec<f32> = (0..4 * 3).map(|i| (i as f32 * 0.91).cos()).collect();
        let call = LoraCall {
            adapter: Some(&adapter),
            training: true,
            call: 7,
        };
        let loss = |ad: &Adapter, x: &[f32]| {
            let c = LoraCall {
                adapter: Some(ad),
                ..call
            };
            let (y, _) = linear.forward(x, &c);
            y.iter()
                .zip(&dy)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        let (_, cache) = linear.forward(&x, &call);
        let mut grads = AdapterGrads::zeros_like(&adapter);
        let dx = linear.backward(&cache, &dy, &call, Some(&mut grads));
        let (da, db) = &grads.pairs["m.q_proj"];
        let h = 1e-3f32;
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (loss(&adapter, &xp) - loss(&adapter, &xm)) / (2.0 * h as f64);
            assert!(
                (dx[i] as f64 - num).abs() < 1e-3,
                "dx[{i}] {} vs {num}",
                dx[i]
            );
        }
        for (which, grad) in [(0, da), (1, db)] {
            for (i, &g) in grad.iter().enumerate() {
                let (mut ap, mut am) = (adapter.clone(), adapter.clone());
                let bump = |ad: &mut Adapter, d: f32| {
                    let p = ad.pairs.get_mut("m.q_proj").unwrap();
                    if which == 0 {
                        p.a[i] += d
                    } else {
                        p.b[i] += d
                    }
                };
                bump(&mut ap, h);
                bump(&mut am, -h);
                let num = (loss(&ap, &x) - loss(&am, &x)) / (2.0 * h as f64);
                assert!(
                    (g as f64 - num).abs() < 1e-3,
                    "d{which}[{i}] {} vs {num}",
                    g
                );
            }
        }
    }
}
