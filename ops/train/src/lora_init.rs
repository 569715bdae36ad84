//! The adapter training starts from, as PEFT 0.21 builds it: which linears get LoRA pairs
//! (`target_modules` = "all-linear", names or a regex), PEFT's init (A kaiming-uniform with
//! a = √5, i.e. U(±1/√in), from a seeded RNG; B zeros), the `modules_to_save` copies (the base
//! weights, untied), or an existing PEFT folder (`init_adapter`).
//!
//! Module names are the canonical (transformers 5 in-memory) paths of
//! `Gemma3ForConditionalGeneration`, so PEFT keys are `base_model.model.<module>...`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rand::{RngExt, SeedableRng};

use model::config::ModelConfig;
use model::names::{expected_tensors, TensorKind, EMBED_TOKENS, LM_HEAD};
use model::peft::{self, AdapterConfig, TargetModules};
use model::reference::lora::{Adapter, LoraPair, LoraSettings};
use model::Weights;

/// PEFT's `MIN_TARGET_MODULES_FOR_OPTIMIZATION`: from this many targets on, the saved
/// `target_modules` is condensed to suffixes.
const MIN_TARGETS_TO_CONDENSE: usize = 20;

/// `target_modules` as a recipe gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    /// Every `nn.Linear` but the output embedding (PEFT `all-linear`; vision tower included).
    AllLinear,
    /// Module names matched as suffixes (`q_proj` matches `...self_attn.q_proj`).
    Names(Vec<String>),
    /// A regex the whole module name must match.
    Regex(String),
}

/// The LoRA settings of a new adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraOptions {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetSpec,
    /// Supported: `lm_head`, `embed_tokens`.
    pub modules_to_save: Vec<String>,
    pub use_rslora: bool,
    /// Seeds A's init and the dropout masks.
    pub seed: u64,
}

/// A linear layer of the model: module path, in and out features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearModule {
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// Every `nn.Linear` of the model except the output embedding (lm_head), in model order.
pub fn linear_modules(config: &ModelConfig) -> Vec<LinearModule> {
    expected_tensors(config)
        .into_iter()
        .filter(|t| t.kind == TensorKind::LinearWeight)
        .map(|t| LinearModule {
            module: t.module().to_string(),
            in_features: t.shape[1],
            out_features: t.shape[0],
        })
        .collect()
}

/// Module names of the model that are not LoRA targets (containers, norms, embeddings, ...):
/// what PEFT's suffix condensing must not match.
fn other_module_names(config: &ModelConfig, targets: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in expected_tensors(config) {
        let module = t
            .name
            .rsplit_once('.')
            .map(|(m, _)| m.to_string())
            .unwrap_or_default();
        let parts: Vec<&str> = module.split('.').collect();
        for k in 1..=parts.len() {
            out.insert(parts[..k].join("."));
        }
    }
    out.retain(|m| !targets.contains(m));
    out
}

/// PEFT `_find_minimal_target_modules`: the fewest name suffixes that select exactly `targets`.
pub fn minimal_target_suffixes(
    targets: &BTreeSet<String>,
    others: &BTreeSet<String>,
) -> BTreeSet<String> {
    let suffixes = |s: &str| -> Vec<String> {
        let parts: Vec<&str> = s.split('.').collect();
        (0..parts.len())
            .rev()
            .map(|i| parts[i..].join("."))
            .collect()
    };
    let other_suffixes: BTreeSet<String> = others.iter().flat_map(|o| suffixes(o)).collect();
    let mut items: Vec<(String, Vec<String>)> =
        targets.iter().map(|t| (t.clone(), suffixes(t))).collect();
    items.sort_by(|a, b| a.1.cmp(&b.1));
    let mut required: BTreeSet<String> = BTreeSet::new();
    for (item, sfx) in items {
        for s in sfx {
            if required.contains(&s) || other_suffixes.contains(&s) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.insert(s);
                break;
            }
        }
    }
    if required.is_empty() {
        targets.clone()
    } else {
        required
    }
}

/// The targeted linears and the `target_modules` PEFT saves for them.
pub fn resolve_targets(
    config: &ModelConfig,
    spec: &TargetSpec,
    modules_to_save: &[String],
) -> Result<(Vec<LinearModule>, TargetModules)> {
    let linears = linear_modules(config);
    let probe = |tm: TargetModules| {
        let mut c = AdapterConfig::new(1, 1.0, 0.0, tm);
        c.modules_to_save = (!modules_to_save.is_empty()).then(|| modules_to_save.to_vec());
        c
    };
    let chosen: Vec<LinearModule> = match spec {
        TargetSpec::AllLinear => {
            let c = probe(TargetModules::Names(vec![]));
            linears
                .iter()
                .filter(|l| !c.saves_module(&l.module))
                .cloned()
                .collect()
        }
        TargetSpec::Names(n) => {
            let c = probe(TargetModules::Names(n.clone()));
            let mut out = Vec::new();
            for l in &linears {
                if c.targets(&l.module)? {
                    out.push(l.clone());
                }
            }
            out
        }
        TargetSpec::Regex(re) => {
            let c = probe(TargetModules::Regex(re.clone()));
            let mut out = Vec::new();
            for l in &linears {
                if c.targets(&l.module)? {
                    out.push(l.clone());
                }
            }
            out
        }
    };
    if chosen.is_empty() {
        let examples: Vec<&str> = linears.iter().take(8).map(|l| l.module.as_str()).collect();
        bail!(
            "target_modules {spec:?} matches no linear layer of the model; its linears are named like {}",
            examples.join(", ")
        );
    }
    let names: BTreeSet<String> = chosen.iter().map(|l| l.module.clone()).collect();
    let saved = match spec {
        TargetSpec::Regex(re) => TargetModules::Regex(re.clone()),
        TargetSpec::Names(n) if n.len() < MIN_TARGETS_TO_CONDENSE => {
            TargetModules::Names(n.clone())
        }
        TargetSpec::AllLinear if names.len() < MIN_TARGETS_TO_CONDENSE => {
            TargetModules::Names(names.iter().cloned().collect())
        }
        TargetSpec::Names(n) => {
            // PEFT condenses a long list only when that shortens it.
            let given: BTreeSet<String> = n.iter().cloned().collect();
            let others = other_module_names(config, &names);
            let min = minimal_target_suffixes(&given, &others);
            TargetModules::Names(
                if min.len() < given.len() { min } else { given }
                    .into_iter()
                    .collect(),
            )
        }
        TargetSpec::AllLinear => {
            let others = other_module_names(config, &names);
            TargetModules::Names(
                minimal_target_suffixes(&names, &others)
                    .into_iter()
                    .collect(),
            )
        }
    };
    Ok((chosen, saved))
}

fn check_modules_to_save(modules: &[String]) -> Result<()> {
    for m in modules {
        ensure!(
            m == "lm_head" || m == "embed_tokens",
            "modules_to_save entry {m:?} is not supported; use \"lm_head\" and/or \"embed_tokens\""
        );
    }
    Ok(())
}

/// The base weight a `modules_to_save` copy starts from (lm_head is the tied embedding when the
/// checkpoint has none).
fn base_copy(weights: &Weights, which: &str) -> Result<Vec<f32>> {
    match which {
        "lm_head" if weights.contains(LM_HEAD) => weights.to_f32(LM_HEAD),
        _ => weights.to_f32(EMBED_TOKENS),
    }
}

/// A fresh adapter as PEFT initialises it, and its `adapter_config.json`.
pub fn new_adapter(
    config: &ModelConfig,
    weights: &Weights,
    opts: &LoraOptions,
) -> Result<(AdapterConfig, Adapter)> {
    ensure!(opts.r > 0, "r must be at least 1");
    ensure!(
        (0.0..1.0).contains(&opts.lora_dropout),
        "lora_dropout must be in [0, 1), got {}",
        opts.lora_dropout
    );
    check_modules_to_save(&opts.modules_to_save)?;
    let (targets, saved) = resolve_targets(config, &opts.target_modules, &opts.modules_to_save)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut pairs = BTreeMap::new();
    for l in &targets {
        // kaiming_uniform_(A, a=√5): gain √(2/(1+5)), bound = √3·gain/√fan_in = 1/√in.
        let bound = 1.0 / (l.in_features as f64).sqrt();
        let a: Vec<f32> = (0..opts.r * l.in_features)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        pairs.insert(
            l.module.clone(),
            LoraPair {
                a,
                b: vec![0.0; l.out_features * opts.r],
                rank: opts.r,
            },
        );
    }
    let mut settings = LoraSettings::new(
        opts.r,
        opts.lora_alpha,
        opts.use_rslora,
        opts.lora_dropout as f32,
    );
    settings.dropout_seed = opts.seed;
    let saves = |m: &str| opts.modules_to_save.iter().any(|s| s == m);
    let adapter = Adapter {
        settings,
        pairs,
        lm_head: if saves("lm_head") {
            Some(base_copy(weights, "lm_head")?)
        } else {
            None
        },
        embed_tokens: if saves("embed_tokens") {
            Some(base_copy(weights, "embed_tokens")?)
        } else {
            None
        },
    };
    let mut cfg = AdapterConfig::new(opts.r as u32, opts.lora_alpha, opts.lora_dropout, saved);
    cfg.use_rslora = opts.use_rslora;
    cfg.modules_to_save = (!opts.modules_to_save.is_empty()).then(|| opts.modules_to_save.clone());
    Ok((cfg, adapter))
}

/// An existing PEFT adapter folder to start from: its config and tensors, checked against the
/// model (every module exists with the shapes of its pairs; copies shaped like the embedding).
pub fn load_adapter(
    dir: &Path,
    config: &ModelConfig,
    seed: u64,
) -> Result<(AdapterConfig, Adapter)> {
    let cfg = peft::read_config(dir)?;
    let mut loaded = Adapter::load(dir)?;
    loaded.settings.dropout_seed = seed;
    let linears: BTreeMap<String, LinearModule> = linear_modules(config)
        .into_iter()
        .map(|l| (l.module.clone(), l))
        .collect();
    for (m, p) in &loaded.pairs {
        let l = linears.get(m).with_context(|| {
            format!(
                "{}: the adapter has a LoRA pair for `{m}`, which is not a linear layer of this model",
                dir.display()
            )
        })?;
        ensure!(
            p.a.len() == p.rank * l.in_features && p.b.len() == l.out_features * p.rank,
            "{}: `{m}` has lora_A/lora_B for a {}x{} layer of rank {}, the model's layer is {}x{}",
            dir.display(),
            p.b.len() / p.rank.max(1),
            p.a.len() / p.rank.max(1),
            p.rank,
            l.out_features,
            l.in_features
        );
    }
    let t = config.text();
    for (name, copy) in [
        ("lm_head", &loaded.lm_head),
        ("embed_tokens", &loaded.embed_tokens),
    ] {
        if let Some(v) = copy {
            ensure!(
                v.len() == t.vocab_size * t.hidden_size,
                "{}: the `{name}` copy has {} values, the model's is {} x {}",
                dir.display(),
                v.len(),
                t.vocab_size,
                t.hidden_size
            );
        }
    }
    Ok((cfg, loaded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, Weights) {
        let hub = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf-cache/hub/models--runner-test--tiny-gemma-3");
        let commit = std::fs::read_to_string(hub.join("refs/main")).unwrap();
        let dir = hub.join("snapshots").join(commit.trim());
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = Weights::open(&dir, &config).unwrap();
        (config, weights)
    }

    fn golden_targets() -> serde_json::Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/golden/lora/targets.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn opts(target_modules: TargetSpec) -> LoraOptions {
        LoraOptions {
            r: 16,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            target_modules,
            modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
            use_rslora: false,
            seed: 42,
        }
    }

    #[test]
    fn all_linear_is_peft_all_linear() {
        let (config, weights) = tiny();
        let golden = golden_targets();
        let want_modules: BTreeSet<String> =
            serde_json::from_value::<Vec<String>>(golden["lora_module_names"].clone())
                .unwrap()
                .iter()
                .map(|m| m.strip_prefix("base_model.model.").unwrap().to_string())
                .collect();
        let want_saved: BTreeSet<String> =
            serde_json::from_value(golden["target_modules_saved"].clone()).unwrap();
        let (cfg, adapter) = new_adapter(&config, &weights, &opts(TargetSpec::AllLinear)).unwrap();
        let got: BTreeSet<String> = adapter.pairs.keys().cloned().collect();
        assert_eq!(got, want_modules);
        let TargetModules::Names(saved) = &cfg.target_modules else {
            panic!("{:?}", cfg.target_modules)
        };
        assert_eq!(saved.iter().cloned().collect::<BTreeSet<_>>(), want_saved);
        // Every trainable tensor PEFT makes, with its shape.
        let shapes: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(golden["trainable_parameters"].clone()).unwrap();
        let keys: BTreeSet<String> = adapter.by_peft_key().keys().cloned().collect();
        assert_eq!(keys, shapes.keys().cloned().collect::<BTreeSet<_>>());
        for (m, p) in &adapter.pairs {
            let a_shape = &shapes[&peft::lora_a_key(m)];
            assert_eq!(a_shape[0], 16);
            assert_eq!(p.a.len(), a_shape[0] * a_shape[1], "{m}");
            let bound = 1.0 / (a_shape[1] as f32).sqrt();
            assert!(p.a.iter().all(|v| v.abs() <= bound), "{m}: A within ±1/√in");
            // Not degenerate: the values spread over the interval.
            let max = p.a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(max > 0.5 * bound, "{m}");
            assert!(p.b.iter().all(|&v| v == 0.0), "{m}: B starts at zero");
        }
        // The copies start as the (tied) base embedding.
        let embed = weights.to_f32(EMBED_TOKENS).unwrap();
        assert_eq!(adapter.lm_head.as_ref().unwrap(), &embed);
        assert_eq!(adapter.embed_tokens.as_ref().unwrap(), &embed);
        // The same seed gives the same adapter; another seed another one.
        let (_, again) = new_adapter(&config, &weights, &opts(TargetSpec::AllLinear)).unwrap();
        assert_eq!(again.pairs, adapter.pairs);
        let other = LoraOptions {
            seed: 7,
            ..opts(TargetSpec::AllLinear)
        };
        let (_, other) = new_adapter(&config, &weights, &other).unwrap();
        assert_ne!(other.pairs, adapter.pairs);
    }

    #[test]
    fn names_regex_and_errors() {
        let (config, weights) = tiny();
        let (cfg, a) = new_adapter(
            &config,
            &weights,
            &opts(TargetSpec::Names(vec!["q_proj".into(), "fc1".into()])),
        )
        .unwrap();
        // 4 text q_proj + 2 vision q_proj + 2 vision fc1.
        assert_eq!(a.pairs.len(), 8);
        assert_eq!(
            cfg.target_modules,
            TargetModules::Names(vec!["q_proj".into(), "fc1".into()])
        );
        let (_, a) = new_adapter(
            &config,
            &weights,
            &opts(TargetSpec::Regex(
                r"model\.language_model\..*\.(q|v)_proj".into(),
            )),
        )
        .unwrap();
        assert_eq!(a.pairs.len(), 8);
        assert!(a
            .pairs
            .keys()
            .all(|k| k.starts_with("model.language_model.")));
        let err = new_adapter(
            &config,
            &weights,
            &opts(TargetSpec::Names(vec!["qkv".into()])),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("matches no linear layer"),
            "{err:#}"
        );
        let mut bad = opts(TargetSpec::AllLinear);
        bad.modules_to_save = vec!["multi_modal_projector".into()];
        assert!(new_adapter(&config, &weights, &bad).is_err());
    }

    #[test]
    fn minimal_suffixes_as_peft_docstring() {
        let mut targets = BTreeSet::new();
        for i in 0..100 {
            targets.insert(format!("model.decoder.layers.{i}.self_attn.q_proj"));
            targets.insert(format!("model.decoder.layers.{i}.self_attn.v_proj"));
        }
        let others: BTreeSet<String> = (0..100)
            .map(|i| format!("model.encoder.layers.{i}.self_attn.k_proj"))
            .collect();
        let got = minimal_target_suffixes(&targets, &others);
        assert_eq!(
            got,
            ["q_proj", "v_proj"].iter().map(|s| s.to_string()).collect()
        );
    }

    #[test]
    fn init_adapter_is_loaded_and_checked() {
        let (config, _) = tiny();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/golden/lora/adapter_init");
        let (cfg, a) = load_adapter(&dir, &config, 3).unwrap();
        assert_eq!(a.pairs.len(), 40);
        assert_eq!(a.settings.dropout_seed, 3);
        assert!(cfg.modules_to_save.is_some());
    }
}
