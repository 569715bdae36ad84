//! A checkpoint's weights under canonical names (see [`super::names`]), memory-mapped,
//! checked against the config, in any of the key layouts, dense (bf16/f16/f32) or NF4 as
//! bitsandbytes saves it (transformers' 4-bit `save_pretrained`, or our `quantize` op).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::bnb::{self, QuantState};
use super::config::{FloatDtype, ModelConfig};
use super::names::{canonical_name, expected_tensors, ExpectedTensor, TensorKind};
use super::safetensors_io::{self, Dtype, RawTensor, SafetensorsSet};

/// Where a canonical tensor lives.
#[derive(Debug, Clone)]
enum Entry {
    /// A plain tensor: its key in the files.
    Dense(String),
    /// A bitsandbytes 4-bit linear weight: the keys of its parts and its parsed state.
    Nf4(Box<Nf4Keys>),
}

#[derive(Debug, Clone)]
struct Nf4Keys {
    weight: String,
    absmax: String,
    quant_map: String,
    nested_absmax: Option<String>,
    nested_quant_map: Option<String>,
    state: QuantState,
}

/// A checkpoint folder's weights, validated against a config.
pub struct Weights {
    set: SafetensorsSet,
    expected: Vec<ExpectedTensor>,
    entries: BTreeMap<String, Entry>,
    unexpected: Vec<String>,
}

/// A borrowed dense tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// The key in the checkpoint file.
    pub key: &'a str,
    pub file: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Little-endian element bytes, straight from the memory map.
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_f32(&self) -> Result<Vec<f32>> {
        safetensors_io::to_f32(self.dtype, self.bytes)
            .with_context(|| format!("{}: tensor `{}`", self.file.display(), self.key))
    }

    /// The values as bf16 bits (for upload kept as bf16): bf16 is copied, f16/f32 rounded to
    /// nearest even as torch's `.to(bfloat16)` does.
    pub fn to_bf16_bits(&self) -> Result<Vec<u16>> {
        if self.dtype == Dtype::BF16 {
            return Ok(self
                .bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect());
        }
        Ok(self
            .to_f32()?
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_bits())
            .collect())
    }

    pub fn float_dtype(&self) -> Option<FloatDtype> {
        match self.dtype {
            Dtype::F32 => Some(FloatDtype::F32),
            Dtype::F16 => Some(FloatDtype::F16),
            Dtype::BF16 => Some(FloatDtype::BF16),
            _ => None,
        }
    }
}

/// The stored absmax of an NF4 weight: plain f32 per block, or double-quantized.
#[derive(Debug, Clone)]
pub enum Nf4Absmax<'a> {
    Plain(Vec<f32>),
    /// `absmax[b] = nested_quant_map[q8[b]] * nested_absmax[b / nested_blocksize] + offset`.
    Nested {
        q8: &'a [u8],
        nested_absmax: Vec<f32>,
        nested_quant_map: Vec<f32>,
        nested_blocksize: usize,
        offset: f32,
    },
}

/// A 4-bit weight as bitsandbytes lays it out.
#[derive(Debug, Clone)]
pub struct Nf4Tensor<'a> {
    pub key: &'a str,
    pub file: &'a Path,
    /// Packed codes, first element in the high nibble: `[ceil(n/2)]` bytes (whatever the storage dtype).
    pub packed: &'a [u8],
    /// The safetensors dtype the packed bytes are stored as (`bnb_4bit_quant_storage`).
    pub storage: Dtype,
    pub absmax: Nf4Absmax<'a>,
    /// The 16-entry code (`quant_map`), as stored.
    pub quant_map: Vec<f32>,
    pub state: QuantState,
}

impl Nf4Tensor<'_> {
    pub fn numel(&self) -> usize {
        self.state.numel()
    }

    /// `[out, in]`.
    pub fn shape(&self) -> &[usize] {
        &self.state.shape
    }

    /// Per-block absmax in f32, double quantization undone as bitsandbytes does
    /// (`code8[q] * absmax2[i / 256]`, then `+ offset`, in f32).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Nf4Absmax::Plain(a) => a.clone(),
            Nf4Absmax::Nested {
                q8,
                nested_absmax,
                nested_quant_map,
                nested_blocksize,
                offset,
            } => q8
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    nested_quant_map[q as usize] * nested_absmax[i / nested_blocksize] + offset
                })
                .collect(),
        }
    }

    /// The dequantized weight in f32 (`code[nibble] * absmax[block]`), row-major `[out, in]`.
    /// bitsandbytes then casts to the state's dtype; [`Self::dequantize_as_stored_dtype`] does both.
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax_f32();
        let bs = self.state.blocksize;
        let code = &self.quant_map;
        let packed = self.packed;
        let mut out = vec![0f32; self.numel()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = c * CHUNK;
                for (j, o) in chunk.iter_mut().enumerate() {
                    let i = base + j;
                    let byte = packed[i / 2];
                    let nibble = if i.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 0x0f
                    };
                    *o = code[nibble as usize] * absmax[i / bs];
                }
            });
        out
    }

    /// What `dequantize_4bit` returns: the f32 product rounded to the state's dtype (bf16 ...).
    pub fn dequantize_as_stored_dtype(&self) -> Result<Vec<f32>> {
        let dtype = FloatDtype::parse_float(&self.state.dtype)?;
        let mut w = self.dequantize();
        w.par_iter_mut().for_each(|x| *x = dtype.round(*x));
        Ok(w)
    }
}

impl Weights {
    /// Opens the safetensors of `dir` and checks them against `config`.
    pub fn open(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let set = SafetensorsSet::open_dir(dir)?;
        Self::from_set(set, config)
    }

    pub fn from_set(set: SafetensorsSet, config: &ModelConfig) -> Result<Self> {
        let causal_lm = matches!(config, ModelConfig::CausalLm(_));
        // Canonical name -> every key that maps to it (a tensor must not appear twice).
        let mut by_canonical: BTreeMap<String, String> = BTreeMap::new();
        let mut unexpected = Vec::new();
        for t in set.tensors() {
            match canonical_name(&t.key, causal_lm) {
                Some(c) => {
                    if let Some(other) = by_canonical.insert(c.clone(), t.key.clone()) {
                        bail!(
                            "{}: tensors `{other}` and `{}` are the same model tensor (`{c}`) in two key layouts",
                            set.source().display(),
                            t.key
                        );
                    }
                }
                None => unexpected.push(t.key.clone()),
            }
        }
        let expected = expected_tensors(config);
        let mut entries = BTreeMap::new();
        let mut claimed: std::collections::BTreeSet<String> = Default::default();
        for e in &expected {
            let Some(key) = by_canonical.get(&e.name) else {
                if e.optional {
                    continue;
                }
                bail!(
                    "{}: tensor `{}` is missing (looked for it in every known key layout: {})",
                    set.source().display(),
                    e.name,
                    "language_model.model.*, model.language_model.*, vision_tower[.vision_model].*, multi_modal_projector.*"
                );
            };
            claimed.insert(e.name.clone());
            let raw = set.get(key).expect("key came from the set");
            let nf4_state_key = format!("{}{}", e.name, bnb::QUANT_STATE_NF4);
            let fp4_state_key = format!("{}{}", e.name, bnb::QUANT_STATE_FP4);
            if by_canonical.contains_key(&fp4_state_key) {
                bail!(
                    "{}: tensor `{key}` is FP4-quantized; only NF4 checkpoints are supported",
                    set.file_of(raw).display()
                );
            }
            if let Some(state_key) = by_canonical.get(&nf4_state_key) {
                if e.kind == TensorKind::Other {
                    bail!(
                        "{}: `{key}` is 4-bit quantized but is not a Linear weight",
                        set.file_of(raw).display()
                    );
                }
                let keys = Self::nf4_keys(&set, &by_canonical, e, key, state_key, &mut claimed)?;
                entries.insert(e.name.clone(), Entry::Nf4(Box::new(keys)));
            } else {
                if raw.shape != e.shape {
                    bail!(
                        "{}: tensor `{key}` has shape {:?} but the config implies {:?}",
                        set.file_of(raw).display(),
                        raw.shape,
                        e.shape
                    );
                }
                if !matches!(raw.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    bail!(
                        "{}: tensor `{key}` has dtype {:?} (expected bf16, f16 or f32)",
                        set.file_of(raw).display(),
                        raw.dtype
                    );
                }
                entries.insert(e.name.clone(), Entry::Dense(key.clone()));
            }
        }
        for (canon, key) in &by_canonical {
            if !claimed.contains(canon) {
                unexpected.push(key.clone());
            }
        }
        unexpected.sort();
        Ok(Weights {
            set,
            expected,
            entries,
            unexpected,
        })
    }

    fn nf4_keys(
        set: &SafetensorsSet,
        by_canonical: &BTreeMap<String, String>,
        e: &ExpectedTensor,
        key: &str,
        state_key: &str,
        claimed: &mut std::collections::BTreeSet<String>,
    ) -> Result<Nf4Keys> {
        let raw = set.get(key).expect("present");
        let file = set.file_of(raw).display().to_string();
        let part = |suffix: &str,
                    required: bool,
                    claimed: &mut std::collections::BTreeSet<String>|
         -> Result<Option<String>> {
            let canon = format!("{}{suffix}", e.name);
            match by_canonical.get(&canon) {
                Some(k) => {
                    claimed.insert(canon);
                    Ok(Some(k.clone()))
                }
                None if required => {
                    bail!("{file}: 4-bit weight `{key}` lacks its `{key}{suffix}` tensor")
                }
                None => Ok(None),
            }
        };
        part(bnb::QUANT_STATE_NF4, true, claimed)?;
        let state_raw = set.get(state_key).expect("present");
        let state = QuantState::parse(set.bytes(state_raw)).with_context(|| {
            format!("{}: tensor `{state_key}`", set.file_of(state_raw).display())
        })?;
        if state.shape != e.shape {
            bail!(
                "{file}: 4-bit weight `{key}` has shape {:?} in its quant_state but the config implies {:?}",
                state.shape,
                e.shape
            );
        }
        if state.quant_type != "nf4" {
            bail!(
                "{file}: `{state_key}` says quant_type `{}`, expected nf4",
                state.quant_type
            );
        }
        let n = state.numel();
        let packed_len = raw.numel() * raw.dtype.bitsize() / 8;
        if packed_len != n.div_ceil(2) {
            bail!(
                "{file}: 4-bit weight `{key}` holds {packed_len} bytes; {n} values need {}",
                n.div_ceil(2)
            );
        }
        if state.blocksize == 0 {
            bail!("{file}: `{state_key}` has blocksize 0");
        }
        let blocks = n.div_ceil(state.blocksize);
        let absmax = part(bnb::ABSMAX, true, claimed)?.expect("required");
        let quant_map = part(bnb::QUANT_MAP, true, claimed)?.expect("required");
        let (nested_absmax, nested_quant_map) = if state.is_nested() {
            (
                part(bnb::NESTED_ABSMAX, true, claimed)?,
                part(bnb::NESTED_QUANT_MAP, true, claimed)?,
            )
        } else {
            (None, None)
        };
        let check = |k: &str, dtype: Dtype, len: usize| -> Result<()> {
            let t = set.get(k).expect("present");
            if t.dtype != dtype || t.numel() != len {
                bail!(
                    "{}: `{k}` is {:?} {:?}; expected {dtype:?} with {len} elements",
                    set.file_of(t).display(),
                    t.dtype,
                    t.shape
                );
            }
            Ok(())
        };
        check(&quant_map, Dtype::F32, 16)?;
        if let (Some(na), Some(nm)) = (&nested_absmax, &nested_quant_map) {
            let nbs = state.nested_blocksize.expect("nested");
            check(&absmax, Dtype::U8, blocks)?;
            check(na, Dtype::F32, blocks.div_ceil(nbs.max(1)))?;
            check(nm, Dtype::F32, 256)?;
        } else {
            check(&absmax, Dtype::F32, blocks)?;
        }
        Ok(Nf4Keys {
            weight: key.to_string(),
            absmax,
            quant_map,
            nested_absmax,
            nested_quant_map,
            state,
        })
    }

    /// The tensors the config implies (canonical names, shapes, kinds).
    pub fn expected(&self) -> &[ExpectedTensor] {
        &self.expected
    }

    /// Keys in the files that no model tensor claims (e.g. a vision `head.*` the model does not use).
    pub fn unexpected(&self) -> &[String] {
        &self.unexpected
    }

    pub fn contains(&self, canonical: &str) -> bool {
        self.entries.contains_key(canonical)
    }

    pub fn is_nf4(&self, canonical: &str) -> bool {
        matches!(self.entries.get(canonical), Some(Entry::Nf4(_)))
    }

    /// The checkpoint key a canonical tensor was read from (its `weight` key for NF4).
    pub fn source_key(&self, canonical: &str) -> Option<&str> {
        self.entries.get(canonical).map(|e| match e {
            Entry::Dense(k) => k.as_str(),
            Entry::Nf4(k) => k.weight.as_str(),
        })
    }

    fn raw(&self, key: &str) -> &RawTensor {
        self.set
            .get(key)
            .expect("entries only hold keys of the set")
    }

    /// A dense tensor by canonical name.
    pub fn tensor(&self, canonical: &str) -> Result<TensorRef<'_>> {
        match self.entries.get(canonical) {
            Some(Entry::Dense(key)) => {
                let raw = self.raw(key);
                Ok(TensorRef {
                    key,
                    file: self.set.file_of(raw),
                    dtype: raw.dtype,
                    shape: &raw.shape,
                    bytes: self.set.bytes(raw),
                })
            }
            Some(Entry::Nf4(k)) => bail!("tensor `{}` is 4-bit quantized; use nf4()", k.weight),
            None => bail!("no tensor `{canonical}` in {}", self.set.source().display()),
        }
    }

    /// A 4-bit linear weight by canonical name.
    pub fn nf4(&self, canonical: &str) -> Result<Nf4Tensor<'_>> {
        let Some(Entry::Nf4(k)) = self.entries.get(canonical) else {
            bail!(
                "tensor `{canonical}` is not 4-bit quantized in {}",
                self.set.source().display()
            );
        };
        let f32s = |key: &str| -> Result<Vec<f32>> {
            let raw = self.raw(key);
            safetensors_io::to_f32(raw.dtype, self.set.bytes(raw))
        };
        let weight = self.raw(&k.weight);
        let absmax = match (&k.nested_absmax, &k.nested_quant_map) {
            (Some(na), Some(nm)) => Nf4Absmax::Nested {
                q8: self.set.bytes(self.raw(&k.absmax)),
                nested_absmax: f32s(na)?,
                nested_quant_map: f32s(nm)?,
                nested_blocksize: k.state.nested_blocksize.expect("nested"),
                offset: k.state.nested_offset.expect("nested") as f32,
            },
            _ => Nf4Absmax::Plain(f32s(&k.absmax)?),
        };
        Ok(Nf4Tensor {
            key: &k.weight,
            file: self.set.file_of(weight),
            packed: self.set.bytes(weight),
            storage: weight.dtype,
            absmax,
            quant_map: f32s(&k.quant_map)?,
            state: k.state.clone(),
        })
    }

    /// Any tensor as f32: dense converted, NF4 dequantized (rounded to its dtype as bitsandbytes does).
    pub fn to_f32(&self, canonical: &str) -> Result<Vec<f32>> {
        if self.is_nf4(canonical) {
            self.nf4(canonical)?.dequantize_as_stored_dtype()
        } else {
            self.tensor(canonical)?.to_f32()
        }
    }

    /// The file set (for writers that copy tensors byte for byte).
    pub fn files(&self) -> &SafetensorsSet {
        &self.set
    }
}
