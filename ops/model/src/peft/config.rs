//! `adapter_config.json`: every key PEFT writes, typed where the runner reads or sets it.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context};
use serde_json::{Map, Value};

use super::*;

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
