//! `format`: dataset rows -> conversations with image references (see `data::format`).

use anyhow::{Context, Result};

use crate::data::conversation::{write_json, ImageSources};
use crate::data::format::rows::{format_dataset, FormatPolicy};
use crate::data::format::{Mapping, PathRoots, VerifyImages};
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

impl FormatParams {
    fn mapping(&self) -> Result<Mapping, ParamError> {
        Mapping::from_params(
            self.system.as_deref(),
            self.user.as_ref(),
            self.assistant.as_deref(),
            &self.messages,
            &self.images,
        )
    }

    fn validate(&self) -> Result<(), ParamError> {
        self.mapping()?;
        if !matches!(self.on_error.as_str(), "skip" | "fail") {
            return Err(ParamError::at(
                "on_error",
                format!(
                    "on_error must be \"skip\" or \"fail\", got {:?}",
                    self.on_error
                ),
            ));
        }
        if !matches!(self.verify_images.as_str(), "decode" | "exists") {
            return Err(ParamError::at(
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
        let policy = FormatPolicy {
            verify: if p.verify_images == "decode" {
                VerifyImages::Decode
            } else {
                VerifyImages::Exists
            },
            fail_on_bad_row: p.on_error == "fail",
            report: p.report,
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

        // Records stream to disk (a 259k-row dataset's conversations need not fit in memory).
        let out_path = ctx.out_dir.join("conversations.jsonl");
        let tmp_path = ctx.out_dir.join("conversations.jsonl.partial");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp_path)?);
        let formatted = format_dataset(
            &dataset,
            &mapping,
            &roots,
            policy,
            &mut out,
            |n| ctx.progress.inc(n as u64),
            |line| {
                ctx.progress
                    .println(format!("format `{}`: skipped {line}", ctx.name))
            },
        )?;
        let report = formatted.report;
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
            dataset_dir: formatted
                .any_row_images
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
