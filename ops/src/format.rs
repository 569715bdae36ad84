//! `format`: dataset rows -> conversations with image references (see `data::format`).

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::data::conversation::{write_json, ImageRef, ImageSources};
use crate::data::dataset::Row;
use crate::data::format::{
    check_fields, format_row, read_for_check, reason_kind, verify_image, FormatReport, Mapping,
    PathRoots, TextTemplate, VerifyImages,
};
use crate::params::OpParams;
use crate::{op_params, ArtifactType, Op, ParamError, ParamSpec, Port, RunCtx};

op_params! {
    pub struct FormatParams {
        /// System message text template, e.g. "{context}" (`{field}` substitutes a row field; `{{`/`}}` are braces). Unset: no system message.
        system: Option<String> = None,
        /// User message: a text template ("{question}") or a table `{ images = "{input_image_path}", text = "{question}" }`; images go before the text (the guide's format_data). Unset (with system/assistant unset too): rows already hold conversations.
        user: Option<toml::Value> = None,
        /// Assistant message text template, e.g. "{output}".
        assistant: Option<String> = None,
        /// For conversational rows: the field holding the messages (llava: "messages").
        messages: String = "messages".to_string(),
        /// For conversational rows: the field holding their images (llava: "images"); image items in the messages must match its length.
        images: String = "images".to_string(),
        /// A bad row (missing image file, undecodable image, missing field, image count mismatch, non-UTF-8 text): "skip" (counted and reported) or "fail".
        on_error: String = "skip".to_string(),
        /// "decode": decode every image now (finds corrupt files before training); "exists": only check the file is there.
        verify_images: String = "decode".to_string(),
        /// How many skipped rows are reported by row, file and reason.
        report: usize = 10,
        /// Read images a row names by an absolute path outside the dataset's folder and the `files` input (off: such a row is a bad row, skipped or failed per on_error).
        allow_paths_outside: bool = false,
    }
}

pub struct FormatOp;

fn param_err(key: &str, message: String) -> ParamError {
    ParamError {
        key: Some(key.to_string()),
        message,
    }
}

impl FormatParams {
    fn mapping(&self) -> Result<Mapping, ParamError> {
        if self.system.is_none() && self.user.is_none() && self.assistant.is_none() {
            return Ok(Mapping::PassThrough {
                messages: self.messages.clone(),
                images: Some(self.images.clone()),
            });
        }
        let tmpl = |key: &str, s: &str| {
            TextTemplate::parse(s).map_err(|e| param_err(key, format!("`{key}`: {e}")))
        };
        let (user_text, user_images) = match &self.user {
            None => (None, None),
            Some(toml::Value::String(s)) => (Some(tmpl("user", s)?), None),
            Some(toml::Value::Table(t)) => {
                for k in t.keys() {
                    if k != "text" && k != "images" {
                        return Err(param_err(
                            "user",
                            format!("`user` has unknown key `{k}` (expected `text`, `images`)"),
                        ));
                    }
                }
                let text = match t.get("text") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(tmpl("user", s)?),
                    Some(_) => {
                        return Err(param_err(
                            "user",
                            "`user.text` must be a string template".into(),
                        ))
                    }
                };
                let images = match t.get("images") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(
                        tmpl("user", s)?
                            .single_field()
                            .map(str::to_string)
                            .ok_or_else(|| param_err("user", format!("`user.images` must name one field, like \"{{input_image_path}}\", got {s:?}")))?,
                    ),
                    Some(_) => return Err(param_err("user", "`user.images` must be a string like \"{input_image_path}\"".into())),
                };
                (text, images)
            }
            Some(other) => {
                return Err(param_err(
                    "user",
                    format!(
                        "`user` must be a string or a table, got {}",
                        other.type_str()
                    ),
                ))
            }
        };
        Ok(Mapping::Build {
            system: self
                .system
                .as_deref()
                .map(|s| tmpl("system", s))
                .transpose()?,
            user_text,
            user_images,
            assistant: self
                .assistant
                .as_deref()
                .map(|s| tmpl("assistant", s))
                .transpose()?,
        })
    }

    fn validate(&self) -> Result<(), ParamError> {
        self.mapping()?;
        if !matches!(self.on_error.as_str(), "skip" | "fail") {
            return Err(param_err(
                "on_error",
                format!(
                    "on_error must be \"skip\" or \"fail\", got {:?}",
                    self.on_error
                ),
            ));
        }
        if !matches!(self.verify_images.as_str(), "decode" | "exists") {
            return Err(param_err(
                "verify_images",
                format!(
                    "verify_images must be \"decode\" or \"exists\", got {:?}",
                    self.verify_images
                ),
            ));
        }
        Ok(())
    }
}

impl Op for FormatOp {
    fn kind(&self) -> &'static str {
        "format"
    }
    fn doc(&self) -> &'static str {
        "Dataset rows -> chat conversations (system/user/assistant with image references); bad rows skipped and counted, or fail"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "rows",
                accepts: &[ArtifactType::Dataset],
                required: true,
                doc: "the dataset",
            },
            Port {
                name: "files",
                accepts: &[ArtifactType::Files],
                required: false,
                doc: "extracted files that image paths resolve against (unzip output)",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        FormatParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn fingerprint(
        &self,
        _params: &toml::Table,
        _recipe: &crate::RecipeInfo,
    ) -> Result<Option<String>> {
        // Which images are refused as decompression bombs depends on the limit in force.
        let limit = crate::data::image::max_image_pixels()?;
        Ok(Some(format!("max image pixels {limit:?}")))
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        FormatParams::from_table(params)?.validate()?;
        FormatParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Conversations
    }
    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let p = FormatParams::from_table(ctx.params)?;
        let mapping = p.mapping()?;
        let fail = p.on_error == "fail";
        let verify = if p.verify_images == "decode" {
            VerifyImages::Decode
        } else {
            VerifyImages::Exists
        };
        let dataset_art = ctx.input("rows")?;
        let dataset = crate::data::dataset::open(&dataset_art.dir)?;
        let files_root = ctx.optional_input("files").map(|a| a.dir.clone());
        let roots = PathRoots {
            files_root: files_root.clone(),
            dataset_root: dataset.root().to_path_buf(),
            allow_outside: p.allow_paths_outside,
        };
        ctx.progress.set_length(dataset.len() as u64);

        let mut report = FormatReport::default();
        // Records stream to disk (a 259k-row dataset's conversations need not fit in memory).
        let out_path = ctx.out_dir.join("conversations.jsonl");
        let tmp_path = ctx.out_dir.join("conversations.jsonl.partial");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp_path)?);
        let mut any_row_images = false;
        let mut rows = dataset.rows();
        let mut first = true;
        loop {
            // A row that cannot be read (invalid JSON, non-UTF-8 bytes) is a bad row like any
            // other: its error already names the row and the data file.
            let chunk: Vec<Result<Row>> = rows.by_ref().take(256).collect();
            if chunk.is_empty() {
                break;
            }
            if first {
                check_fields(&mapping, chunk.iter().filter_map(|r| r.as_ref().ok()))?;
                first = false;
            }
            let results: Vec<_> = chunk
                .par_iter()
                .map(|row| {
                    // Err: the report line (naming row and data file) and the reason's kind.
                    let row = row.as_ref().map_err(|e| {
                        (format!("{e:#}"), reason_kind(&e.root_cause().to_string()))
                    })?;
                    let at = |why: String| {
                        let kind = reason_kind(&why);
                        (format!("row {} ({}): {why}", row.index, row.file), kind)
                    };
                    let f = format_row(row, &mapping, &roots).map_err(at)?;
                    for (i, r) in f.record.images.iter().enumerate() {
                        let bytes = match f.inline_images.iter().find(|(k, _)| *k == i) {
                            Some((_, b)) => Ok(b.clone()),
                            None => read_for_check(r, files_root.as_deref()),
                        };
                        verify_image(bytes, verify)
                            .map_err(|e| at(format!("image {i} ({}): {e}", r.describe())))?;
                    }
                    Ok::<_, (String, &str)>(f.record)
                })
                .collect();
            for r in results {
                report.rows += 1;
                match r {
                    Ok(rec) => {
                        any_row_images |=
                            rec.images.iter().any(|i| matches!(i, ImageRef::Row { .. }));
                        report.images += rec.images.len();
                        report.conversations += 1;
                        serde_json::to_writer(&mut out, &rec)?;
                        std::io::Write::write_all(&mut out, b"\n")?;
                    }
                    Err((line, kind)) => {
                        if fail {
                            bail!("{line} (on_error = \"fail\"; set on_error = \"skip\" to skip such rows)");
                        }
                        report.skipped += 1;
                        *report
                            .skipped_by_reason
                            .entry(kind.to_string())
                            .or_default() += 1;
                        if report.skipped_examples.len() < p.report {
                            ctx.progress
                                .println(format!("format `{}`: skipped {line}", ctx.name));
                            report.skipped_examples.push(line);
                        }
                    }
                }
            }
            ctx.progress.inc(chunk.len() as u64);
        }
        if report.conversations == 0 {
            bail!(
                "no usable rows: {} rows read, {} skipped{}",
                report.rows,
                report.skipped,
                report
                    .skipped_examples
                    .first()
                    .map(|s| format!(" (first: {s})"))
                    .unwrap_or_default()
            );
        }
        if report.skipped > 0 {
            ctx.progress.println(format!(
                "format `{}`: skipped {} of {} rows ({})",
                ctx.name,
                report.skipped,
                report.rows,
                report
                    .skipped_by_reason
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let sources = ImageSources {
            dataset_dir: any_row_images
                .then(|| crate::artifact::entry_ref(&dataset_art.dir, ctx.out_dir)),
            files_root: files_root.map(|f| crate::artifact::entry_ref(&f, ctx.out_dir)),
        };
        out.into_inner()
            .map_err(|e| e.into_error())
            .context("writing conversations")?
            .sync_all()?;
        std::fs::rename(&tmp_path, &out_path)?;
        write_json(&ctx.out_dir.join("source.json"), &sources)?;
        write_json(&ctx.out_dir.join("conversations.json"), &report)?;
        Ok(())
    }
}
