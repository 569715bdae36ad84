//! Op `score`: generated answers against their references — MMIU's multiple-choice rule
//! (`metric = "choice"`, per task and the unweighted mean over tasks) or a normalized exact
//! match (`metric = "exact"`). The rules live in [`crate::generation::score`].
//!
//! Input: a `generations.jsonl` file (`path`, relative to the recipe), one JSON object per line
//! with `row`, `prompt`, `reference` (string or null), `text` and optionally `images` (the
//! conversation's image paths; MMIU's task is their folder) — the format the `generate` op is
//! specified to write (issue #15), so answers produced elsewhere (e.g. by transformers'
//! `generate`) can be scored the same way.
//!
//! Output: `scores.json` (metric, overall, micro accuracy, per-task counts, per-row verdicts);
//! the per-task table is printed.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::generation::read_generations;
use crate::generation::score::{self, Answer, Metric};
use crate::params::{OpParams, ParamError, ParamSpec};
use crate::{op_params, ArtifactType, Op, Port, RecipeInfo, RunCtx};

/// The op's output file.
pub const SCORES_JSON: &str = "scores.json";

op_params! {
    pub struct ScoreParams {
        /// The answers when they come from elsewhere: a JSON Lines file (relative to the recipe) of objects with `row`, `prompt`, `reference`, `text` and optionally `images`. Unset: the `generations` input (a generate op).
        path: Option<String> = None,
        /// "choice": MMIU's rule (a letter A–N, else an `X:` label, else the option whose text the answer contains, else unanswered; correct when the choice is in the reference; overall = mean of per-task accuracies, a task being the folder of a row's first image). "exact": lowercase, whitespace-collapsed, edge-punctuation-stripped equality.
        metric: String = "choice".to_string(),
    }
}

impl ScoreParams {
    fn metric(&self) -> Result<Metric, ParamError> {
        Metric::parse(&self.metric).ok_or_else(|| ParamError {
            key: Some("metric".into()),
            message: format!(
                "`metric` must be \"choice\" or \"exact\", got \"{}\"",
                self.metric
            ),
        })
    }
}

pub struct ScoreOp;

impl Op for ScoreOp {
    fn kind(&self) -> &'static str {
        "score"
    }
    fn doc(&self) -> &'static str {
        "Accuracy of generated answers against the references: MMIU's multiple-choice rule per task, or exact match"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port {
            name: "generations",
            accepts: &[ArtifactType::Generations],
            required: false,
            doc: "the answers of a generate op (else the `path` param names a file)",
        }]
    }
    fn params(&self) -> Vec<ParamSpec> {
        ScoreParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        ScoreParams::from_table(params)?.metric()?;
        ScoreParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Scores
    }
    /// The answers file's content: scores follow the answers, not the file's name (a
    /// `generations` input is keyed by the cache itself).
    fn fingerprint(&self, params: &toml::Table, recipe: &RecipeInfo) -> Result<Option<String>> {
        let Some(path) = ScoreParams::from_table(params)?.path else {
            return Ok(None);
        };
        let path = recipe.resolve(path);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading the answers file {}", path.display()))?;
        Ok(Some(format!(
            "sha256 {}",
            hex::encode(Sha256::digest(&bytes))
        )))
    }
    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let params = ScoreParams::from_table(ctx.params)?;
        let metric = params.metric()?;
        let path = match (ctx.optional_input("generations"), &params.path) {
            (Some(_), Some(_)) => bail!(
                "op `{}` (score): both a `generations` input and a `path` are given; keep one",
                ctx.name
            ),
            (Some(g), None) => g.dir.join(crate::generate::GENERATIONS_FILE),
            (None, Some(p)) => ctx.recipe.resolve(p),
            (None, None) => bail!(
                "op `{}` (score): no answers to score: set `inputs = {{ generations = \"NAME\" }}` \
                 (a generate op) or `path = \"answers.jsonl\"`",
                ctx.name
            ),
        };
        let records = read_generations(&path).with_context(|| format!("op `{}`", ctx.name))?;
        let answers: Vec<Answer> = records
            .into_iter()
            .map(|r| Answer {
                row: r.row,
                task: score::task_of(&r.images),
                prompt: r.prompt,
                reference: r.reference,
                text: r.text,
            })
            .collect();
        let scores = score::score(&answers, metric).with_context(|| {
            format!(
                "op `{}`: none of the {} rows of {} has a reference answer \
                 (the conversation's trailing assistant message): nothing to score",
                ctx.name,
                answers.len(),
                path.display()
            )
        })?;
        for line in score::table(&scores) {
            // The runner prefixes the op's name.
            ctx.progress.println(line);
        }
        std::fs::write(
            ctx.out_dir.join(SCORES_JSON),
            serde_json::to_string_pretty(&scores)?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::generation::GenerationRecord;
    use crate::NoProgress;

    fn record(row: usize, task: &str, text: &str, reference: Option<&str>) -> GenerationRecord {
        GenerationRecord {
            row,
            prompt: "Which?\nA: the first image\nB: the second image\n".into(),
            reference: reference.map(str::to_string),
            text: text.into(),
            token_ids: vec![1, 2],
            finish_reason: Some("eos".into()),
            images: vec![format!("./Low-level-semantic/{task}/{task}_{row}_0.jpg")],
        }
    }

    fn run(records: &[GenerationRecord], mut params: toml::Table) -> Result<serde_json::Value> {
        let input = tempfile::tempdir()?;
        let out = tempfile::tempdir()?;
        let lines: Vec<String> = records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        std::fs::write(input.path().join("answers.jsonl"), lines.join("\n"))?;
        params.insert("path".into(), "answers.jsonl".into());
        let inputs = BTreeMap::new();
        let params = ScoreOp.check(&params).map_err(anyhow::Error::msg)?;
        let recipe = RecipeInfo {
            name: "r".into(),
            seed: 0,
            path: input.path().join("r.toml"),
            output_dir: input.path().join("out"),
            env: crate::Environment::process(),
        };
        ScoreOp.run(&RunCtx {
            name: "scores",
            params: &params,
            inputs: &inputs,
            out_dir: out.path(),
            recipe: &recipe,
            progress: &NoProgress,
        })?;
        Ok(serde_json::from_slice(&std::fs::read(
            out.path().join(SCORES_JSON),
        )?)?)
    }

    #[test]
    fn writes_per_task_and_overall_scores() {
        let records = [
            record(0, "forensic_detection_blink", "A", Some("A")),
            record(1, "forensic_detection_blink", "the second image", Some("A")),
            record(2, "jigsaw_puzzle_solving", "B: the second image", Some("B")),
        ];
        let v = run(&records, toml::Table::new()).unwrap();
        assert_eq!(v["metric"], "choice");
        assert_eq!(v["tasks"]["forensic_detection_blink"]["correct"], 1);
        assert_eq!(v["tasks"]["jigsaw_puzzle_solving"]["accuracy"], 1.0);
        assert_eq!(v["overall"], 0.75);
        assert_eq!(v["rows"][1]["answer"], "B");
    }

    #[test]
    fn errors_name_the_op_and_what_is_wrong() {
        let mut bad = toml::Table::new();
        bad.insert("path".into(), "a.jsonl".into());
        bad.insert("metric".into(), "fuzzy".into());
        let err = ScoreOp.check(&bad).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("metric"));
        let err = run(&[record(0, "t", "A", None)], toml::Table::new()).unwrap_err();
        assert!(format!("{err:#}").contains("has a reference"), "{err:#}");
    }

    /// A file written elsewhere needs only row, prompt, reference and text; a line that is not
    /// a record is an error naming the file and line.
    #[test]
    fn reads_answers_made_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(
            &path,
            "{\"row\": 4, \"prompt\": \"A: x\\nB: y\", \"reference\": \"B\", \"text\": \"y\"}\n\n",
        )
        .unwrap();
        let records = read_generations(&path).unwrap();
        assert_eq!(records[0].row, 4);
        assert!(records[0].images.is_empty() && records[0].finish_reason.is_none());
        std::fs::write(&path, "{\"row\": 4}\n").unwrap();
        let err = format!("{:#}", read_generations(&path).unwrap_err());
        assert!(err.contains("line 1"), "{err}");
    }
}
