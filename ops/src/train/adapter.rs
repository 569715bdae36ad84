//! The `adapter` artifact: a PEFT LoRA adapter folder exactly as `PeftModel.save_pretrained`
//! writes it (peft 0.21.2), so that `PeftModel.from_pretrained(base, dir)` loads it.
//!
//! - `adapter_config.json`: every key PEFT writes, `json.dumps(indent=2, sort_keys=True)` with no
//!   final newline, `inference_mode` true (PEFT sets it while saving).
//! - `adapter_model.safetensors`: metadata `{"format": "pt"}`; keys
//!   `base_model.model.<module path>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`
//!   (the adapter name `default` removed), and for `modules_to_save`
//!   `base_model.model.<module path>.weight` (the trained copy). Module paths are the in-memory
//!   names of the transformers model (`model.language_model.layers.0.self_attn.q_proj`,
//!   `model.vision_tower.encoder.layers.0.mlp.fc1`, `lm_head`, ...).
//!
//! The training loop also writes `metrics.jsonl` ([`super::metrics`]), `runs/` (TensorBoard,
//! [`super::tensorboard`]) and `trainer_state.json` beside these files; PEFT ignores them.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context};
use serde_json::{Map, Value};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's key prefix: `PeftModel.base_model` (LoraModel) `.model` (the transformers model).
pub const KEY_PREFIX: &str = "base_model.model.";
/// The PEFT version whose file format this module writes (and records in `peft_version`).
pub const PEFT_VERSION: &str = "0.21.2";

/// `adapter_config.json`. The fields the runner reads or sets are typed; every other key PEFT
/// writes lives in `other` with PEFT's default (or the value read from a file), so a config read
/// from PEFT is written back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The base model's Hub id (or path), what `PeftModel.from_pretrained` reports and the Hub
    /// links the adapter to.
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision, when not the default branch.
    pub revision: Option<String>,
    /// `"CAUSAL_LM"` for the guide's models.
    pub task_type: Option<String>,
    pub r: u32,
    /// Written as an integer when integral (as PEFT writes an int `lora_alpha`).
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module name suffixes (as PEFT saves a resolved `all-linear`), or one regex matched against
    /// the full module name.
    pub target_modules: TargetModules,
    /// Module names (suffixes) trained in full and saved whole, e.g. `["lm_head", "embed_tokens"]`.
    pub modules_to_save: Option<Vec<String>>,
    /// `"none"`: the runner trains no biases.
    pub bias: String,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// `true` (kaiming-uniform A, zero B), `"gaussian"`, ... as PEFT accepts.
    pub init_lora_weights: Value,
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides: key = module-name suffix pattern (PEFT `get_pattern_key`).
    pub rank_pattern: BTreeMap<String, u32>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub inference_mode: bool,
    /// Every other key, with PEFT's defaults for a new config.
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Suffixes: module `m` is targeted when `m == t` or `m` ends with `.t`.
    Names(Vec<String>),
    /// A regex that must match the whole module name (PEFT `re.fullmatch`).
    Regex(String),
}

/// Keys PEFT 0.21.2's `LoraConfig` writes that the runner does not set, with their defaults
/// (read off a config written by PEFT 0.21.2; see tests/fixtures/publish/peft_adapter).
fn peft_default_other_keys() -> BTreeMap<String, Value> {
    let null = Value::Null;
    [
        ("alora_invocation_tokens", null.clone()),
        ("arrow_config", null.clone()),
        ("auto_mapping", null.clone()),
        ("corda_config", null.clone()),
        ("ensure_weight_tying", Value::Bool(false)),
        ("eva_config", null.clone()),
        ("exclude_modules", null.clone()),
        ("kasa_config", null.clone()),
        ("layer_replication", null.clone()),
        ("layers_pattern", null.clone()),
        ("layers_to_transform", null.clone()),
        ("loftq_config", Value::Object(Map::new())),
        ("lora_bias", Value::Bool(false)),
        ("lora_ga_config", null.clone()),
        ("megatron_config", null.clone()),
        ("megatron_core", Value::String("megatron.core".into())),
        ("monteclora_config", null.clone()),
        ("peft_type", Value::String("LORA".into())),
        ("peft_version", Value::String(PEFT_VERSION.into())),
        ("qalora_group_size", Value::from(16)),
        ("target_parameters", null.clone()),
        ("trainable_token_indices", null.clone()),
        ("use_bdlora", null.clone()),
        ("use_qalora", Value::Bool(false)),
        ("velora_config", null),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

const TYPED_KEYS: [&str; 16] = [
    "base_model_name_or_path",
    "revision",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "inference_mode",
];

impl AdapterConfig {
    /// A LoRA config for a causal LM with PEFT's defaults for everything not given.
    pub fn new(r: u32, lora_alpha: f64, lora_dropout: f64, target_modules: TargetModules) -> Self {
        Self {
            base_model_name_or_path: None,
            revision: None,
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            modules_to_save: None,
            bias: "none".into(),
            use_rslora: false,
            use_dora: false,
            init_lora_weights: Value::Bool(true),
            fan_in_fan_out: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            inference_mode: true,
            other: peft_default_other_keys(),
        }
    }

    /// The JSON object PEFT writes (keys sorted at every level).
    pub fn to_json(&self) -> Value {
        let mut m: BTreeMap<String, Value> = self.other.clone();
        let opt = |s: &Option<String>| s.clone().map(Value::String).unwrap_or(Value::Null);
        m.insert(
            "base_model_name_or_path".into(),
            opt(&self.base_model_name_or_path),
        );
        m.insert("revision".into(), opt(&self.revision));
        m.insert("task_type".into(), opt(&self.task_type));
        m.insert("r".into(), Value::from(self.r));
        m.insert("lora_alpha".into(), number(self.lora_alpha));
        m.insert("lora_dropout".into(), Value::from(self.lora_dropout));
        m.insert(
            "target_modules".into(),
            match &self.target_modules {
                TargetModules::Names(v) => Value::from(v.clone()),
                TargetModules::Regex(s) => Value::String(s.clone()),
            },
        );
        m.insert(
            "modules_to_save".into(),
            self.modules_to_save
                .clone()
                .map(Value::from)
                .unwrap_or(Value::Null),
        );
        m.insert("bias".into(), Value::String(self.bias.clone()));
        m.insert("use_rslora".into(), Value::Bool(self.use_rslora));
        m.insert("use_dora".into(), Value::Bool(self.use_dora));
        m.insert("init_lora_weights".into(), self.init_lora_weights.clone());
        m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        m.insert(
            "rank_pattern".into(),
            Value::Object(
                self.rank_pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(*v)))
                    .collect(),
            ),
        );
        m.insert(
            "alpha_pattern".into(),
            Value::Object(
                self.alpha_pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), number(*v)))
                    .collect(),
            ),
        );
        m.insert("inference_mode".into(), Value::Bool(self.inference_mode));
        sorted(Value::Object(m.into_iter().collect()))
    }

    /// `adapter_config.json`'s exact text: Python's `json.dumps(d, indent=2, sort_keys=True)`
    /// (non-ASCII escaped as `\uXXXX`, as Python's default `ensure_ascii`), no final newline.
    pub fn to_json_string(&self) -> String {
        python_json_dumps_indent2(&self.to_json())
    }

    /// Parses a config PEFT (any recent version) wrote. Unknown keys are kept in `other`.
    pub fn from_json(v: &Value) -> anyhow::Result<Self> {
        let obj = v
            .as_object()
            .context("adapter_config.json must hold a JSON object")?;
        let peft_type = obj.get("peft_type").and_then(Value::as_str).unwrap_or("");
        ensure!(
            peft_type == "LORA",
            "adapter_config.json: peft_type is {peft_type:?}; only LORA adapters are supported"
        );
        let get = |k: &str| obj.get(k).cloned().unwrap_or(Value::Null);
        let opt_str = |k: &str| -> anyhow::Result<Option<String>> {
            match get(k) {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s)),
                other => bail!("adapter_config.json: `{k}` must be a string or null, got {other}"),
            }
        };
        let bool_of = |k: &str, default: bool| -> anyhow::Result<bool> {
            match get(k) {
                Value::Null => Ok(default),
                Value::Bool(b) => Ok(b),
                other => bail!("adapter_config.json: `{k}` must be true or false, got {other}"),
            }
        };
        let f64_of = |k: &str, default: f64| -> anyhow::Result<f64> {
            match get(k) {
                Value::Null => Ok(default),
                Value::Number(n) => n.as_f64().context("not a number"),
                other => bail!("adapter_config.json: `{k}` must be a number, got {other}"),
            }
        };
        let r = obj
            .get("r")
            .and_then(Value::as_u64)
            .context("adapter_config.json: `r` must be a positive integer")?;
        ensure!(r > 0, "adapter_config.json: `r` must be positive");
        let target_modules = match get("target_modules") {
            Value::String(s) => TargetModules::Regex(s),
            Value::Array(a) => TargetModules::Names(
                a.iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .context("adapter_config.json: `target_modules` must list strings")?,
            ),
            other => bail!("adapter_config.json: `target_modules` must be a list of names or a regex, got {other}"),
        };
        let modules_to_save = match get("modules_to_save") {
            Value::Null => None,
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .context("adapter_config.json: `modules_to_save` must list strings")?,
            ),
            other => bail!("adapter_config.json: `modules_to_save` must be a list, got {other}"),
        };
        let pattern = |k: &str| -> anyhow::Result<BTreeMap<String, f64>> {
            match get(k) {
                Value::Null => Ok(BTreeMap::new()),
                Value::Object(m) => m
                    .into_iter()
                    .map(|(key, v)| {
                        let x = v.as_f64().with_context(|| {
                            format!("adapter_config.json: `{k}.{key}` must be a number")
                        })?;
                        Ok((key, x))
                    })
                    .collect(),
                other => bail!("adapter_config.json: `{k}` must be an object, got {other}"),
            }
        };
        let other = obj
            .iter()
            .filter(|(k, _)| !TYPED_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Self {
            base_model_name_or_path: opt_str("base_model_name_or_path")?,
            revision: opt_str("revision")?,
            task_type: opt_str("task_type")?,
            r: r as u32,
            lora_alpha: f64_of("lora_alpha", 8.0)?,
            lora_dropout: f64_of("lora_dropout", 0.0)?,
            target_modules,
            modules_to_save,
            bias: opt_str("bias")?.unwrap_or_else(|| "none".into()),
            use_rslora: bool_of("use_rslora", false)?,
            use_dora: bool_of("use_dora", false)?,
            init_lora_weights: match get("init_lora_weights") {
                Value::Null => Value::Bool(true),
                v => v,
            },
            fan_in_fan_out: bool_of("fan_in_fan_out", false)?,
            rank_pattern: pattern("rank_pattern")?
                .into_iter()
                .map(|(k, v)| (k, v as u32))
                .collect(),
            alpha_pattern: pattern("alpha_pattern")?,
            inference_mode: bool_of("inference_mode", true)?,
            other,
        })
    }

    /// Whether PEFT would put a LoRA layer on the module with this full name (`target_modules`,
    /// minus `exclude_modules` and modules_to_save, as `check_target_module_exists`). The
    /// `layers_to_transform` filter is not applied (the runner never sets it).
    pub fn targets(&self, module: &str) -> anyhow::Result<bool> {
        match self.other.get("exclude_modules") {
            Some(Value::String(re)) if full_match(re, module)? => return Ok(false),
            Some(Value::Array(a))
                if a.iter()
                    .filter_map(Value::as_str)
                    .any(|e| suffix_match(module, e)) =>
            {
                return Ok(false)
            }
            _ => {}
        }
        if self.saves_module(module) {
            return Ok(false);
        }
        Ok(match &self.target_modules {
            TargetModules::Names(names) => names.iter().any(|t| suffix_match(module, t)),
            TargetModules::Regex(re) => full_match(re, module)?,
        })
    }

    /// Whether `module` is (inside) one of `modules_to_save` (PEFT: `(^|.*\.)m($|\..*)`).
    pub fn saves_module(&self, module: &str) -> bool {
        self.modules_to_save.iter().flatten().any(|m| {
            module == m
                || module.ends_with(&format!(".{m}"))
                || module.starts_with(&format!("{m}."))
                || module.contains(&format!(".{m}."))
        })
    }

    /// The rank of the module's LoRA (`rank_pattern` overrides `r`).
    pub fn rank_for(&self, module: &str) -> u32 {
        pattern_value(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r)
    }

    /// `lora_alpha / r`, or `/ sqrt(r)` with rsLoRA, with the module's pattern overrides.
    pub fn scaling_for(&self, module: &str) -> f64 {
        let r = f64::from(self.rank_for(module));
        let alpha = pattern_value(&self.alpha_pattern, module)
            .copied()
            .unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

fn suffix_match(module: &str, name: &str) -> bool {
    module == name || module.ends_with(&format!(".{name}"))
}

fn full_match(re: &str, s: &str) -> anyhow::Result<bool> {
    let re = regex::Regex::new(&format!("^(?:{re})$"))
        .with_context(|| format!("invalid module regex {re:?}"))?;
    Ok(re.is_match(s))
}

/// PEFT `get_pattern_key`: the first pattern key `k` with `re.match(rf"(.*\.)?({k})$", module)`.
fn pattern_value<'a, T>(patterns: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    patterns.iter().find_map(|(k, v)| {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).ok()?;
        re.is_match(module).then_some(v)
    })
}

/// An integral f64 as a JSON integer (PEFT's `lora_alpha: int`), otherwise a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// Rebuilds objects with their keys inserted in sorted order, which is the written order whether
/// or not serde_json's `preserve_order` feature is on in this build.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let b: BTreeMap<String, Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(b.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// `json.dumps(v, indent=2)` for values whose objects are already in the wanted order:
/// serde_json's pretty printer has the same layout (2 spaces, `": "`, `{}`/`[]` when empty);
/// what differs is Python escaping every non-ASCII character.
pub fn python_json_dumps_indent2(v: &Value) -> String {
    let text = serde_json::to_string_pretty(v).expect("JSON values always serialize");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            // Non-ASCII characters only occur inside strings, where \u escapes are valid.
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// Element types of host tensors: the float types adapter files use, and I64 for the token
/// tensors recorded beside them (eval's logits file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
        }
    }

    fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            DType::I64 => safetensors::Dtype::I64,
        }
    }

    /// The float types an adapter file may hold; anything else (I64 included) is not a weight.
    fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            _ => None,
        }
    }
}

/// A tensor in host memory: little-endian element bytes, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        Self {
            dtype: DType::F32,
            shape,
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }

    /// Rounds to bf16 (round to nearest even, as torch's `.to(torch.bfloat16)`).
    pub fn from_f32_as_bf16(shape: Vec<usize>, data: &[f32]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        let bytes = data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        Self {
            dtype: DType::BF16,
            shape,
            bytes,
        }
    }

    pub fn from_i64(shape: Vec<usize>, data: &[i64]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} does not hold {} values",
            data.len()
        );
        Self {
            dtype: DType::I64,
            shape,
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            DType::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            // Exact for token ids and masks (|v| < 2^24).
            DType::I64 => self
                .bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
        }
    }
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// What one adapter tensor is, from its PEFT key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKey<'a> {
    /// `lora_A` of the module: `[r, in_features]`.
    LoraA(&'a str),
    /// `lora_B` of the module: `[out_features, r]`.
    LoraB(&'a str),
    /// The trained full copy of a `modules_to_save` module's weight.
    Saved(&'a str),
}

impl<'a> AdapterKey<'a> {
    /// Parses `base_model.model.<module>.{lora_A.weight, lora_B.weight, weight}`.
    pub fn parse(key: &'a str) -> Option<Self> {
        let rest = key.strip_prefix(KEY_PREFIX)?;
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            Some(AdapterKey::LoraA(m))
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            Some(AdapterKey::LoraB(m))
        } else {
            rest.strip_suffix(".weight").map(AdapterKey::Saved)
        }
    }

    pub fn module(&self) -> &'a str {
        match self {
            AdapterKey::LoraA(m) | AdapterKey::LoraB(m) | AdapterKey::Saved(m) => m,
        }
    }
}

/// `base_model.model.<module>.lora_A.weight`.
pub fn lora_a_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_A.weight")
}

/// `base_model.model.<module>.lora_B.weight`.
pub fn lora_b_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_B.weight")
}

/// `base_model.model.<module>.weight`: a modules_to_save copy.
pub fn saved_module_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.weight")
}

/// A PEFT adapter folder as stored: its config and its tensors by PEFT key, each in its saved
/// dtype (the weights as the model uses them are [`crate::model::reference::lora::Adapter`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFolder {
    pub config: AdapterConfig,
    /// PEFT key → tensor.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl AdapterFolder {
    /// Module names with a LoRA pair, sorted.
    pub fn lora_modules(&self) -> Vec<&str> {
        self.tensors
            .keys()
            .filter_map(|k| match AdapterKey::parse(k) {
                Some(AdapterKey::LoraA(m)) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// Modules saved whole (modules_to_save copies), sorted.
    pub fn saved_modules(&self) -> Vec<&str> {
        self.tensors
            .keys()
            .filter_map(|k| match AdapterKey::parse(k) {
                Some(AdapterKey::Saved(m)) => Some(m),
                _ => None,
            })
            .collect()
    }
}

/// A tensor's type and shape, without its data (from a safetensors header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Checks that the tensors are what PEFT would save for this config: PEFT key names, an A and a
/// B for every LoRA module with ranks agreeing with `r`/`rank_pattern`, modules matched by
/// `target_modules`, saved modules listed in `modules_to_save`. Errors name the tensor.
pub fn validate(
    config: &AdapterConfig,
    tensors: &BTreeMap<String, HostTensor>,
) -> anyhow::Result<()> {
    for (key, t) in tensors {
        ensure!(
            t.bytes.len() == t.numel() * t.dtype.size(),
            "adapter tensor `{key}`: {} bytes for shape {:?} of {:?}",
            t.bytes.len(),
            t.shape,
            t.dtype
        );
    }
    let metas = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                TensorMeta {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                },
            )
        })
        .collect();
    validate_shapes(config, &metas)
}

/// [`validate`] on types and shapes only.
pub fn validate_shapes(
    config: &AdapterConfig,
    tensors: &BTreeMap<String, TensorMeta>,
) -> anyhow::Result<()> {
    ensure!(config.r > 0, "LoRA rank r must be positive");
    ensure!(
        config.bias == "none",
        "bias = {:?} is not supported (the runner trains no biases)",
        config.bias
    );
    ensure!(
        !config.use_dora,
        "DoRA adapters (use_dora = true) are not supported"
    );
    ensure!(!tensors.is_empty(), "the adapter has no tensors");
    for (key, t) in tensors {
        match AdapterKey::parse(key) {
            None => bail!(
                "adapter tensor `{key}` is not a PEFT key (expected `{KEY_PREFIX}<module>.lora_A.weight`, `.lora_B.weight` or a modules_to_save `<module>.weight`)"
            ),
            Some(AdapterKey::Saved(m)) => ensure!(
                config.saves_module(m),
                "adapter tensor `{key}`: module `{m}` is not in modules_to_save {:?}",
                config.modules_to_save.as_deref().unwrap_or(&[])
            ),
            Some(AdapterKey::LoraA(m)) => {
                let b = tensors
                    .get(&lora_b_key(m))
                    .with_context(|| format!("adapter tensor `{key}` has no matching `{}`", lora_b_key(m)))?;
                let r = config.rank_for(m) as usize;
                ensure!(
                    t.shape.len() == 2 && t.shape[0] == r,
                    "adapter tensor `{key}` has shape {:?}, expected [{r}, in_features]",
                    t.shape
                );
                ensure!(
                    b.shape.len() == 2 && b.shape[1] == r,
                    "adapter tensor `{}` has shape {:?}, expected [out_features, {r}]",
                    lora_b_key(m),
                    b.shape
                );
                ensure!(
                    config.targets(m)?,
                    "adapter tensor `{key}`: module `{m}` is not matched by target_modules {:?}",
                    config.target_modules
                );
            }
            Some(AdapterKey::LoraB(m)) => ensure!(
                tensors.contains_key(&lora_a_key(m)),
                "adapter tensor `{key}` has no matching `{}`",
                lora_a_key(m)
            ),
        }
    }
    Ok(())
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if needed),
/// each through a temporary file renamed into place. The tensors are validated first.
pub fn write_adapter(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &BTreeMap<String, HostTensor>,
) -> anyhow::Result<()> {
    validate(config, tensors)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors.iter(), Some(metadata))
        .context("serializing the adapter tensors")?;
    crate::atomic_file::write(&dir.join(WEIGHTS_FILE), &bytes)?;
    crate::atomic_file::write(&dir.join(CONFIG_FILE), config.to_json_string().as_bytes())?;
    Ok(())
}

/// Reads a PEFT LoRA adapter folder (written by PEFT or by [`write_adapter`]).
pub fn read_adapter(dir: &Path) -> anyhow::Result<AdapterFolder> {
    let config = read_config(dir)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        bail!(
            "{}: only adapter_model.safetensors is supported, not the pickle adapter_model.bin",
            dir.display()
        );
    }
    let bytes =
        fs::read(&weights_path).with_context(|| format!("reading {}", weights_path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", weights_path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = DType::from_safetensors(view.dtype()).with_context(|| {
            format!(
                "{}: tensor `{name}` has dtype {:?}; expected F32, BF16 or F16",
                weights_path.display(),
                view.dtype()
            )
        })?;
        tensors.insert(
            name,
            HostTensor {
                dtype,
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            },
        );
    }
    validate(&config, &tensors).with_context(|| format!("in {}", dir.display()))?;
    Ok(AdapterFolder { config, tensors })
}

/// Reads `adapter_config.json` of an adapter folder.
pub fn read_config(dir: &Path) -> anyhow::Result<AdapterConfig> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).with_context(|| {
        format!(
            "reading {} (is {} a PEFT adapter folder?)",
            config_path.display(),
            dir.display()
        )
    })?;
    let json: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    AdapterConfig::from_json(&json).with_context(|| format!("in {}", config_path.display()))
}

/// The config and the tensors' types and shapes, validated, reading only the safetensors header
/// (an adapter with modules_to_save of a 262k vocabulary is gigabytes).
pub fn inspect_adapter(
    dir: &Path,
) -> anyhow::Result<(AdapterConfig, BTreeMap<String, TensorMeta>)> {
    use std::io::Read;
    let config = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let mut f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    ensure!(
        n < 100 << 20,
        "{}: safetensors header of {n} bytes is implausible",
        path.display()
    );
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: bad safetensors header", path.display()))?;
    let mut metas = BTreeMap::new();
    for (name, info) in v
        .as_object()
        .context("safetensors header is not an object")?
    {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info["dtype"].as_str() {
            Some("F32") => DType::F32,
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16",
                path.display()
            ),
        };
        let shape = info["shape"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .with_context(|| format!("{}: tensor `{name}` has no shape", path.display()))?;
        metas.insert(name.clone(), TensorMeta { dtype, shape });
    }
    validate_shapes(&config, &metas).with_context(|| format!("in {}", dir.display()))?;
    Ok((config, metas))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/publish/peft_adapter")
    }

    /// A config built from scratch with the fixture's settings serializes byte for byte as PEFT
    /// 0.21.2 wrote it (every key, order, layout).
    #[test]
    fn new_config_matches_peft_bytes() {
        let golden = fs::read_to_string(fixture().join(CONFIG_FILE)).unwrap();
        let golden_json: Value = serde_json::from_str(&golden).unwrap();
        // PEFT stores target_modules as a set: take the order it happened to write.
        let targets: Vec<String> = golden_json["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let mut c = AdapterConfig::new(4, 8.0, 0.05, TargetModules::Names(targets));
        c.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
        c.base_model_name_or_path = Some("runner-test/tiny-gemma-3".into());
        assert_eq!(c.to_json_string(), golden);
    }

    #[test]
    fn golden_adapter_reads_and_rewrites_identically() {
        let a = read_adapter(&fixture()).unwrap();
        assert_eq!(a.config.r, 4);
        assert_eq!(a.config.lora_alpha, 8.0);
        assert_eq!(
            a.config
                .scaling_for("model.language_model.layers.0.self_attn.q_proj"),
            2.0
        );
        assert_eq!(a.lora_modules().len(), 2 * 7 + 6);
        assert_eq!(
            a.saved_modules(),
            vec!["lm_head", "model.language_model.embed_tokens"]
        );
        let lm = &a.tensors[&saved_module_key("lm_head")];
        assert_eq!((lm.dtype, lm.shape.clone()), (DType::BF16, vec![64, 16]));
        let qa = &a.tensors[&lora_a_key("model.language_model.layers.1.self_attn.q_proj")];
        assert_eq!((qa.dtype, qa.shape.clone()), (DType::F32, vec![4, 16]));
        let fc1b = &a.tensors[&lora_b_key("model.vision_tower.encoder.layers.0.mlp.fc1")];
        assert_eq!(fc1b.shape, vec![12, 4]);

        let dir = tempfile::tempdir().unwrap();
        write_adapter(dir.path(), &a.config, &a.tensors).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap(),
            fs::read_to_string(fixture().join(CONFIG_FILE)).unwrap()
        );
        let back = read_adapter(dir.path()).unwrap();
        assert_eq!(back, a);
        let st_bytes = fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&st_bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
        // Python's safetensors uses the same Rust serializer: the files are identical.
        assert_eq!(st_bytes, fs::read(fixture().join(WEIGHTS_FILE)).unwrap());
    }

    #[test]
    fn target_and_pattern_matching_as_peft() {
        let mut c = AdapterConfig::new(
            8,
            16.0,
            0.0,
            TargetModules::Names(vec!["q_proj".into(), "fc1".into()]),
        );
        c.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
        assert!(c
            .targets("model.language_model.layers.0.self_attn.q_proj")
            .unwrap());
        assert!(c.targets("q_proj").unwrap());
        assert!(!c
            .targets("model.language_model.layers.0.self_attn.xq_proj")
            .unwrap());
        assert!(!c.targets("lm_head").unwrap());
        assert!(c.saves_module("model.language_model.embed_tokens"));
        c.target_modules = TargetModules::Regex(r".*language_model.*\.(q|v)_proj".into());
        assert!(c
            .targets("model.language_model.layers.3.self_attn.v_proj")
            .unwrap());
        assert!(!c
            .targets("model.vision_tower.encoder.layers.0.self_attn.v_proj")
            .unwrap());
        c.rank_pattern.insert("v_proj".into(), 4);
        c.alpha_pattern
            .insert("layers.3.self_attn.v_proj".into(), 2.0);
        assert_eq!(
            c.rank_for("model.language_model.layers.3.self_attn.v_proj"),
            4
        );
        assert_eq!(
            c.rank_for("model.language_model.layers.3.self_attn.q_proj"),
            8
        );
        assert_eq!(
            c.scaling_for("model.language_model.layers.3.self_attn.v_proj"),
            0.5
        );
        c.use_rslora = true;
        assert_eq!(
            c.scaling_for("model.language_model.layers.3.self_attn.q_proj"),
            16.0 / 8f64.sqrt()
        );
    }

    #[test]
    fn write_rejects_what_peft_would_not_save() {
        let c = AdapterConfig::new(2, 2.0, 0.0, TargetModules::Names(vec!["q_proj".into()]));
        let dir = tempfile::tempdir().unwrap();
        let a = HostTensor::from_f32(vec![2, 3], &[1.0; 6]);
        let b = HostTensor::from_f32(vec![4, 2], &[1.0; 8]);
        let mut t = BTreeMap::from([(lora_a_key("m.q_proj"), a.clone())]);
        let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
        assert!(
            err.contains("no matching") && err.contains("lora_B"),
            "{err}"
        );
        t.insert(
            lora_b_key("m.q_proj"),
            HostTensor::from_f32(vec![4, 3], &[1.0; 12]),
        );
        let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
        assert!(err.contains("expected [out_features, 2]"), "{err}");
        t.insert(lora_b_key("m.q_proj"), b.clone());
        t.insert("model.k_proj.weight".into(), a.clone());
        let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
        assert!(err.contains("not a PEFT key"), "{err}");
        t.remove("model.k_proj.weight");
        t.insert(lora_a_key("m.k_proj"), a);
        t.insert(lora_b_key("m.k_proj"), b);
        let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
        assert!(err.contains("not matched by target_modules"), "{err}");
        assert!(
            !dir.path().join(WEIGHTS_FILE).exists(),
            "nothing is written for an invalid adapter"
        );
    }

    #[test]
    fn json_escapes_non_ascii_like_python() {
        let mut c = AdapterConfig::new(1, 1.0, 0.0, TargetModules::Names(vec![]));
        c.base_model_name_or_path = Some("örg/m😀".into());
        assert!(c
            .to_json_string()
            .contains(r#""base_model_name_or_path": "\u00f6rg/m\ud83d\ude00","#));
        let back =
            AdapterConfig::from_json(&serde_json::from_str(&c.to_json_string()).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
