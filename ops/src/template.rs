//! `template`: renders the model's own chat template over each conversation, as the guide's
//! `processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False).strip()`;
//! with `assistant_only_loss`, as TRL 1.16's SFTTrainer renders for its vision collator (TRL's
//! training template when the model's has no `{% generation %}` blocks, no `.strip()`).

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::data::chat_template::{python_strip, ChatTemplate, TemplateChoice};
use crate::data::conversation::{write_json, ConversationRecord, TemplatedRecord};
use crate::params::OpParams;
use crate::{op_params, ArtifactType, Op, ParamError, ParamSpec, Port, RunCtx};

op_params! {
    pub struct TemplateParams {
        /// A chat template file to use instead of the model's own (e.g. TRL's gemma3_training.jinja, whose {% generation %} blocks `assistant_only_loss` needs). Relative to the recipe.
        chat_template: Option<String> = None,
        /// Append the generation prompt (`<start_of_turn>model\n` for Gemma); the guide trains with false.
        add_generation_prompt: bool = false,
        /// Python `.strip()` the rendered text, as the guide does. Unset with `assistant_only_loss = true`, it becomes false: TRL's collator does not strip (the final `<end_of_turn>\n` stays and is trained).
        strip: bool = true,
        /// Render as TRL 1.16's SFTTrainer does for `assistant_only_loss`: the template itself if it has {% generation %} blocks, else TRL's training variant of it (bundled for Gemma 3: trl/chat_templates/gemma3_training.jinja), else an error. Pair it with the collate op's `assistant_only_loss`.
        assistant_only_loss: bool = false,
    }
}

pub struct TemplateOp;

impl Op for TemplateOp {
    fn kind(&self) -> &'static str {
        "template"
    }
    fn doc(&self) -> &'static str {
        "Renders the model's chat template over each conversation (transformers' apply_chat_template semantics, then .strip())"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "conversations",
                accepts: &[ArtifactType::Conversations],
                required: true,
                doc: "formatted conversations",
            },
            Port {
                name: "model",
                accepts: &[ArtifactType::Model, ArtifactType::QuantizedModel],
                required: true,
                doc: "the model whose chat template and special tokens are used",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        TemplateParams::specs()
    }
    fn version(&self) -> u32 {
        // 2: `assistant_only_loss`; `generation_tags` now means real {% generation %} markers.
        2
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        let p = TemplateParams::from_table(params)?;
        let mut table = params.clone();
        if p.assistant_only_loss && !table.contains_key("strip") {
            table.insert("strip".into(), toml::Value::Boolean(false));
        }
        TemplateParams::canonical(&table)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Templated
    }
    fn fingerprint(
        &self,
        params: &toml::Table,
        recipe: &crate::RecipeInfo,
    ) -> Result<Option<String>> {
        // A template file outside the cache: its content is part of the key.
        let p = TemplateParams::from_table(params)?;
        Ok(match p.chat_template {
            Some(path) => {
                let full = recipe.resolve(&path);
                let text = std::fs::read(&full)
                    .with_context(|| format!("cannot read chat template {}", full.display()))?;
                use sha2::Digest;
                Some(hex::encode(sha2::Sha256::digest(&text)))
            }
            None => None,
        })
    }
    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let p = TemplateParams::from_table(ctx.params)?;
        let model = crate::data::model_dir::open(&ctx.input("model")?.dir)?;
        let override_path = p.chat_template.as_ref().map(|t| ctx.recipe.resolve(t));
        let (template, choice) = if p.assistant_only_loss {
            ChatTemplate::for_assistant_only_loss(model.root(), override_path.as_deref())?
        } else {
            (
                ChatTemplate::from_model_dir(model.root(), override_path.as_deref())?,
                TemplateChoice::AsGiven,
            )
        };
        let conv_dir = &ctx.input("conversations")?.dir;
        let in_path = conv_dir.join("conversations.jsonl");
        let reader = std::io::BufReader::new(
            std::fs::File::open(&in_path)
                .with_context(|| format!("cannot open {}", in_path.display()))?,
        );
        let tmp = ctx.out_dir.join("templated.jsonl.partial");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut lines = reader.lines().enumerate();
        let mut count = 0usize;
        loop {
            let chunk: Vec<(usize, String)> = lines
                .by_ref()
                .take(1024)
                .map(|(i, l)| {
                    l.map(|l| (i, l))
                        .with_context(|| format!("{}: line {}", in_path.display(), i + 1))
                })
                .collect::<Result<_>>()?;
            if chunk.is_empty() {
                break;
            }
            let rendered: Vec<Result<TemplatedRecord>> = chunk
                .par_iter()
                .map(|(i, line)| {
                    let rec: ConversationRecord =
                        serde_json::from_str(line).with_context(|| {
                            format!(
                                "{}: line {} is not a conversation",
                                in_path.display(),
                                i + 1
                            )
                        })?;
                    let r = template
                        .render(&rec.messages, p.add_generation_prompt)
                        .with_context(|| format!("row {} ({})", rec.row, rec.file))?;
                    let r = if p.strip { python_strip(r) } else { r };
                    Ok(TemplatedRecord {
                        row: rec.row,
                        file: rec.file,
                        text: r.text,
                        assistant_spans: r.assistant_spans,
                        images: rec.images,
                    })
                })
                .collect();
            for r in rendered {
                serde_json::to_writer(&mut out, &r?)?;
                out.write_all(b"\n")?;
                count += 1;
            }
            ctx.progress.inc(chunk.len() as u64);
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, ctx.out_dir.join("templated.jsonl"))?;
        std::fs::copy(
            conv_dir.join("source.json"),
            ctx.out_dir.join("source.json"),
        )
        .context("conversations artifact has no source.json")?;
        write_json(
            &ctx.out_dir.join("templated.json"),
            &serde_json::json!({
                "count": count,
                "generation_tags": template.has_generation_tags(),
                "template": choice.to_string(),
                "assistant_only_loss": p.assistant_only_loss,
                "strip": p.strip,
            }),
        )?;
        Ok(())
    }
}
