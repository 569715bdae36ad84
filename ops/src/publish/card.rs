//! The model card (`README.md`) of a saved adapter: Hub metadata (base model, datasets, tags) in
//! YAML front matter, then the base model, datasets, LoRA and training hyperparameters, the final
//! metrics and the training log from `metrics.jsonl`, how to load it, and the recipe itself.

use std::fmt::Write as _;

use crate::train::adapter::{AdapterConfig, TargetModules};
use crate::train::metrics::LogRecord;

/// Everything the card shows.
#[derive(Debug, Clone, Default)]
pub struct CardInputs {
    /// The recipe's name (`[recipe] name`).
    pub model_name: String,
    /// The base model's Hub id, or its path when it is local.
    pub base_model: String,
    /// Whether `base_model` is a Hub id (linked and put in the metadata) or a local path.
    pub base_model_on_hub: bool,
    /// Hub dataset ids the recipe loads.
    pub datasets: Vec<String>,
    /// `image-text-to-text` for a vision-language base, `text-generation` otherwise.
    pub pipeline_tag: String,
    /// The training op's parameters, as TOML (the recipe's `lora-train` table).
    pub training_params: Option<String>,
    pub metrics: Vec<LogRecord>,
    /// The recipe file's name and text.
    pub recipe: Option<(String, String)>,
    /// The Hub repo the adapter will be pushed to, if the recipe pushes.
    pub hub_repo: Option<String>,
    /// A merged full model was written under `merged/`.
    pub merged: bool,
}

/// A YAML scalar: always double-quoted JSON-style, which YAML reads as the same string.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn fence_for(text: &str) -> String {
    let mut fence = "```".to_string();
    while text.contains(&fence) {
        fence.push('`');
    }
    fence
}

fn fmt_f(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() < 1e-3 || x.abs() >= 1e6 {
        format!("{x:.4e}")
    } else {
        format!("{x:.4}")
    }
}

/// Renders README.md.
pub fn render(inputs: &CardInputs, adapter: &AdapterConfig) -> String {
    let mut s = String::new();
    s.push_str("---\n");
    if inputs.base_model_on_hub {
        let _ = writeln!(s, "base_model: {}", yaml_str(&inputs.base_model));
    }
    s.push_str("library_name: peft\n");
    let _ = writeln!(s, "model_name: {}", yaml_str(&inputs.model_name));
    if !inputs.datasets.is_empty() {
        s.push_str("datasets:\n");
        for d in &inputs.datasets {
            let _ = writeln!(s, "- {}", yaml_str(d));
        }
    }
    let _ = writeln!(s, "pipeline_tag: {}", yaml_str(&inputs.pipeline_tag));
    s.push_str("tags:\n");
    if inputs.base_model_on_hub {
        let _ = writeln!(
            s,
            "- {}",
            yaml_str(&format!("base_model:adapter:{}", inputs.base_model))
        );
    }
    for t in ["lora", "sft", "transformers", "runner"] {
        let _ = writeln!(s, "- {t}");
    }
    s.push_str("---\n\n");

    let _ = writeln!(s, "# {}\n", inputs.model_name);
    let base_link = if inputs.base_model_on_hub {
        format!("[{0}](https://huggingface.co/{0})", inputs.base_model)
    } else {
        format!("`{}`", inputs.base_model)
    };
    let on = if inputs.datasets.is_empty() {
        String::new()
    } else {
        let links: Vec<String> = inputs
            .datasets
            .iter()
            .map(|d| format!("[{d}](https://huggingface.co/datasets/{d})"))
            .collect();
        format!(" on {}", links.join(", "))
    };
    let _ = writeln!(
        s,
        "A LoRA adapter for {base_link}, fine-tuned{on} with supervised fine-tuning (QLoRA, as TRL's SFTTrainer does it) by [runner](https://github.com/) from the recipe below. It is a PEFT adapter folder: `adapter_config.json` and `adapter_model.safetensors`, plus the processor files.\n"
    );

    s.push_str("## Quick start\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n\n");
    let here = inputs
        .hub_repo
        .clone()
        .unwrap_or_else(|| "path/to/this/folder".into());
    let _ = writeln!(
        s,
        "base = AutoModelForImageTextToText.from_pretrained({}, dtype=\"auto\")\nmodel = PeftModel.from_pretrained(base, {})\nprocessor = AutoProcessor.from_pretrained({})\n```\n",
        py_str(&inputs.base_model),
        py_str(&here),
        py_str(&here)
    );
    if inputs.merged {
        s.push_str("The folder `merged/` holds the base model with this adapter merged into its weights (bf16), loadable with `from_pretrained` alone.\n\n");
    }

    s.push_str("## LoRA\n\n| Setting | Value |\n|---|---|\n");
    let targets = match &adapter.target_modules {
        TargetModules::Names(n) => {
            let mut n = n.clone();
            n.sort();
            n.join(", ")
        }
        TargetModules::Regex(r) => format!("regex `{r}`"),
    };
    let rows = [
        ("r", adapter.r.to_string()),
        ("lora_alpha", fmt_f(adapter.lora_alpha)),
        ("lora_dropout", fmt_f(adapter.lora_dropout)),
        (
            "scaling",
            fmt_f(if adapter.use_rslora {
                adapter.lora_alpha / f64::from(adapter.r).sqrt()
            } else {
                adapter.lora_alpha / f64::from(adapter.r)
            }),
        ),
        ("use_rslora", adapter.use_rslora.to_string()),
        ("target_modules", targets),
        (
            "modules_to_save",
            adapter
                .modules_to_save
                .as_ref()
                .map(|m| m.join(", "))
                .unwrap_or_else(|| "none".into()),
        ),
        ("bias", adapter.bias.clone()),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push('\n');

    if let Some(params) = &inputs.training_params {
        let fence = fence_for(params);
        let _ = writeln!(
            s,
            "## Training hyperparameters\n\n{fence}toml\n{}\n{fence}\n",
            params.trim_end()
        );
    }

    if let Some(last) = inputs.metrics.last() {
        s.push_str("## Final metrics\n\n| Metric | Value |\n|---|---|\n");
        let _ = writeln!(s, "| step | {} |", last.step);
        let _ = writeln!(s, "| epoch | {} |", fmt_f(last.epoch));
        let _ = writeln!(s, "| loss | {} |", fmt_f(last.loss));
        let _ = writeln!(s, "| grad_norm | {} |", fmt_f(last.grad_norm));
        let _ = writeln!(s, "| learning_rate | {} |", fmt_f(last.learning_rate));
        let _ = writeln!(
            s,
            "| mean_token_accuracy | {} |",
            fmt_f(last.mean_token_accuracy)
        );
        let _ = writeln!(s, "| num_tokens | {} |", last.num_tokens);
        s.push_str("\n### Training log\n\n| Step | Epoch | Loss | Grad norm | Learning rate | Token accuracy |\n|---|---|---|---|---|---|\n");
        // At most ~50 rows: every k-th log, and always the last.
        let k = inputs.metrics.len().div_ceil(50).max(1);
        for (i, r) in inputs.metrics.iter().enumerate() {
            if i % k == 0 || i + 1 == inputs.metrics.len() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.step,
                    fmt_f(r.epoch),
                    fmt_f(r.loss),
                    fmt_f(r.grad_norm),
                    fmt_f(r.learning_rate),
                    fmt_f(r.mean_token_accuracy)
                );
            }
        }
        s.push_str(
            "\nThe full log is in `metrics.jsonl`, and as TensorBoard scalars under `runs/`.\n\n",
        );
    }

    if let Some((name, text)) = &inputs.recipe {
        let fence = fence_for(text);
        let _ = writeln!(s, "## Recipe\n\nProduced by `runner run {name}` from this recipe (also saved beside this card as `{name}`):\n\n{fence}toml\n{}\n{fence}\n", text.trim_end());
    }

    let _ = writeln!(
        s,
        "## Framework versions\n\n- runner {}\n- PEFT adapter format {}\n",
        env!("CARGO_PKG_VERSION"),
        crate::train::adapter::PEFT_VERSION
    );
    s
}

fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// Dataset and model ids a recipe loads: every `[ops.*]` table with `op = "load"` and a string
/// `dataset`, with `${vars.NAME}` taken from `[vars]`.
pub fn recipe_datasets(recipe: &toml::Table) -> Vec<String> {
    let vars = recipe
        .get("vars")
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_default();
    let interpolate = |s: &str| -> String {
        let mut out = s.to_string();
        for (k, v) in &vars {
            if let Some(v) = v.as_str() {
                out = out.replace(&format!("${{vars.{k}}}"), v);
            }
        }
        out
    };
    let mut out = Vec::new();
    if let Some(ops) = recipe.get("ops").and_then(|o| o.as_table()) {
        for op in ops.values().filter_map(|o| o.as_table()) {
            if op.get("op").and_then(|o| o.as_str()) == Some("load") {
                if let Some(d) = op.get("dataset").and_then(|d| d.as_str()) {
                    let d = interpolate(d);
                    if !out.contains(&d) {
                        out.push(d);
                    }
                }
            }
        }
    }
    out
}

/// The first `lora-train` op's table, minus `op` and `inputs`, as TOML text.
pub fn recipe_training_params(recipe: &toml::Table) -> Option<String> {
    let ops = recipe.get("ops")?.as_table()?;
    let (_, op) = ops
        .iter()
        .find(|(_, o)| o.get("op").and_then(|k| k.as_str()) == Some("lora-train"))?;
    let mut t = op.as_table()?.clone();
    t.remove("op");
    t.remove("inputs");
    toml::to_string(&t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::adapter::TargetModules;

    const RECIPE: &str = r#"
[recipe]
name = "gemma-3-4b-it-trl-sft-MMIU-Benchmark"

[vars]
data = "FanqingM/MMIU-Benchmark"

[ops.raw]
op = "load"
dataset = "${vars.data}"
split = "test"

[ops.base]
op = "load"
model = "google/gemma-3-4b-it"

[ops.train]
op = "lora-train"
inputs = { model = "base" }
learning_rate = 2e-5
num_train_epochs = 1
"#;

    #[test]
    fn card_has_metadata_hyperparameters_metrics_and_recipe() {
        let recipe: toml::Table = RECIPE.parse().unwrap();
        let mut adapter = AdapterConfig::new(
            16,
            16.0,
            0.05,
            TargetModules::Names(vec!["v_proj".into(), "q_proj".into()]),
        );
        adapter.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
        let rec = |step: u64, loss: f64| LogRecord {
            step,
            loss,
            grad_norm: 1.5,
            learning_rate: 2e-5,
            mean_token_accuracy: 0.625,
            num_tokens: 4096 * step,
            epoch: step as f64 / 100.0,
        };
        let inputs = CardInputs {
            model_name: "gemma-3-4b-it-trl-sft-MMIU-Benchmark".into(),
            base_model: "google/gemma-3-4b-it".into(),
            base_model_on_hub: true,
            datasets: recipe_datasets(&recipe),
            pipeline_tag: "image-text-to-text".into(),
            training_params: recipe_training_params(&recipe),
            metrics: (1..=120).map(|i| rec(i * 10, 3.0 / i as f64)).collect(),
            recipe: Some(("mmiu.toml".into(), RECIPE.into())),
            hub_repo: Some("me/gemma-3-4b-it-trl-sft-MMIU-Benchmark".into()),
            merged: false,
        };
        let card = render(&inputs, &adapter);
        let front = card.split("---\n").nth(1).unwrap();
        assert!(
            front.contains("base_model: \"google/gemma-3-4b-it\"\n"),
            "{front}"
        );
        assert!(
            front.contains("datasets:\n- \"FanqingM/MMIU-Benchmark\"\n"),
            "{front}"
        );
        assert!(
            front.contains("- \"base_model:adapter:google/gemma-3-4b-it\"\n"),
            "{front}"
        );
        assert!(front.contains("library_name: peft\n"));
        assert!(card.contains("| target_modules | q_proj, v_proj |"));
        assert!(card.contains("| modules_to_save | lm_head, embed_tokens |"));
        assert!(card.contains("learning_rate = 2e-5"), "{card}");
        assert!(
            !card
                .split("## Training hyperparameters")
                .nth(1)
                .unwrap()
                .split("## Final metrics")
                .next()
                .unwrap()
                .contains("inputs = "),
            "the training table drops ports"
        );
        // Final metrics are the last log's.
        assert!(card.contains("| step | 1200 |"));
        assert!(card.contains("| loss | 0.0250 |"), "{card}");
        assert!(card.contains("| num_tokens | 4915200 |"));
        let log_rows = card
            .lines()
            .filter(|l| l.starts_with("| ") && l.split('|').count() == 8)
            .count();
        assert!(log_rows <= 52, "{log_rows} rows");
        assert!(
            card.contains("```toml\n\n[recipe]\nname = \"gemma-3-4b-it-trl-sft-MMIU-Benchmark\"")
        );
        assert!(card.contains(
            "PeftModel.from_pretrained(base, \"me/gemma-3-4b-it-trl-sft-MMIU-Benchmark\")"
        ));
    }

    #[test]
    fn fences_survive_backticks_in_the_recipe() {
        assert_eq!(fence_for("a ``` b"), "````");
        assert_eq!(fence_for("plain"), "```");
    }
}
