//! The `format` op's domain: dataset rows -> conversations (transformers chat format) with
//! image references, as the guide's `format_data` builds them for MMIU, or validated
//! pass-through for rows that already hold conversations (llava's `messages` + `images`).
//!
//! Unlike the guide (which prints and silently drops an image that fails to open), a bad row is
//! skipped and counted, or fails the op (`on_error`); never silent. A whole dataset goes
//! through [`rows::format_dataset`].

pub mod rows;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use op_api::ParamError;

use super::conversation::{count_image_items, ConversationRecord, ImageRef};
use super::dataset::Row;
use super::value::Value;

/// A text template: literal text with `{field}` substitutions (`{{` / `}}` for braces).
#[derive(Debug, Clone, PartialEq)]
pub struct TextTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Field(String),
}

impl TextTemplate {
    pub fn parse(src: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => bail!("template {src:?}: unclosed `{{`"),
                        }
                    }
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        bail!("template {src:?}: empty `{{}}` (write `{{{{` for a literal brace)");
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => bail!("template {src:?}: lone `}}` (write `}}}}` for a literal brace)"),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Self { parts })
    }

    /// The single field when the template is exactly `{field}` (used for image lists).
    pub fn single_field(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Field(f)] => Some(f),
            _ => None,
        }
    }

    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Lit(_) => None,
        })
    }

    pub fn render(&self, row: &Row) -> std::result::Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Field(f) => out.push_str(&text_field(row, f)?),
            }
        }
        Ok(out)
    }
}

fn text_field(row: &Row, name: &str) -> std::result::Result<String, String> {
    match row.get(name) {
        None => Err(format!("missing field `{name}`")),
        Some(Value::Str(s)) => Ok(s.clone()),
        Some(Value::Int(i)) => Ok(i.to_string()),
        Some(Value::Float(f)) => Ok(f.to_string()),
        Some(Value::Bool(b)) => Ok(if *b { "True" } else { "False" }.to_string()),
        Some(Value::Bytes(b)) => String::from_utf8(b.clone())
            .map_err(|e| format!("field `{name}` is not UTF-8 text ({e})")),
        Some(Value::Null) => Err(format!("field `{name}` is null")),
        Some(other) => Err(format!(
            "field `{name}` is a {}, not text",
            other.type_name()
        )),
    }
}

/// How rows become conversations.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapping {
    /// Build messages from templates (MMIU). Images go before the text in the user turn, as in
    /// the guide's `format_data`.
    Build {
        system: Option<TextTemplate>,
        user_text: Option<TextTemplate>,
        user_images: Option<String>,
        assistant: Option<TextTemplate>,
    },
    /// Rows already hold `messages` (and `images`); validated and passed through.
    PassThrough {
        messages: String,
        images: Option<String>,
    },
}

impl Mapping {
    /// The mapping the `format` op's params describe: `system`, `user` (a text template, or a
    /// table of `text` and `images`) and `assistant` templates, or, with none of them set,
    /// conversations already in the rows' `messages` and `images` fields. Errors name the param.
    pub fn from_params(
        system: Option<&str>,
        user: Option<&toml::Value>,
        assistant: Option<&str>,
        messages: &str,
        images: &str,
    ) -> Result<Mapping, ParamError> {
        if system.is_none() && user.is_none() && assistant.is_none() {
            return Ok(Mapping::PassThrough {
                messages: messages.to_string(),
                images: Some(images.to_string()),
            });
        }
        let tmpl = |key: &str, s: &str| {
            TextTemplate::parse(s).map_err(|e| ParamError::at(key, format!("`{key}`: {e}")))
        };
        let (user_text, user_images) = match user {
            None => (None, None),
            Some(toml::Value::String(s)) => (Some(tmpl("user", s)?), None),
            Some(toml::Value::Table(t)) => {
                for k in t.keys() {
                    if k != "text" && k != "images" {
                        return Err(ParamError::at(
                            "user",
                            format!("`user` has unknown key `{k}` (expected `text`, `images`)"),
                        ));
                    }
                }
                let text = match t.get("text") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(tmpl("user", s)?),
                    Some(_) => {
                        return Err(ParamError::at(
                            "user",
                            "`user.text` must be a string template",
                        ))
                    }
                };
                let images = match t.get("images") {
                    None => None,
                    Some(toml::Value::String(s)) => Some(
                        tmpl("user", s)?
                            .single_field()
                            .map(str::to_string)
                            .ok_or_else(|| ParamError::at("user", format!("`user.images` must name one field, like \"{{input_image_path}}\", got {s:?}")))?,
                    ),
                    Some(_) => return Err(ParamError::at("user", "`user.images` must be a string like \"{input_image_path}\"")),
                };
                (text, images)
            }
            Some(other) => {
                return Err(ParamError::at(
                    "user",
                    format!(
                        "`user` must be a string or a table, got {}",
                        other.type_str()
                    ),
                ))
            }
        };
        Ok(Mapping::Build {
            system: system.map(|s| tmpl("system", s)).transpose()?,
            user_text,
            user_images,
            assistant: assistant.map(|s| tmpl("assistant", s)).transpose()?,
        })
    }
}

/// How images are checked while formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyImages {
    /// Fully decoded (as the guide's `Image.open(...).convert("RGB")`): corrupt files are found now.
    Decode,
    /// Only checked to exist / be non-empty.
    Exists,
}

/// Where relative image paths are looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct PathRoots {
    /// The `files` artifact (unzip output), if connected.
    pub files_root: Option<PathBuf>,
    /// The dataset's own folder (for datasets that ship loose image files).
    pub dataset_root: PathBuf,
    /// `allow_paths_outside = true`: absolute paths anywhere on the machine are read. Off, a row
    /// can only name images inside the two roots, so a hostile dataset cannot make runner read
    /// (and train on, and push) any image file of the host.
    pub allow_outside: bool,
}

impl PathRoots {
    /// Resolves a row's image path. Returns the reference to store (relative to the files root
    /// when found there, else absolute) or why it cannot be found. MMIU paths look like
    /// `./Category/task/file.jpg`; the archive `Category.zip` is extracted under `Category/`, and if
    /// the archive itself has a top folder `Category/` the file is at `Category/Category/task/...`
    /// — both are tried.
    pub fn resolve(&self, raw: &str) -> std::result::Result<ImageRef, String> {
        let p = Path::new(raw);
        if p.is_absolute() {
            let inside = |root: &Path| lexical(p).starts_with(lexical(root));
            let in_roots =
                self.files_root.as_deref().is_some_and(inside) || inside(&self.dataset_root);
            if !self.allow_outside && !in_roots {
                return Err(format!(
                    "image path {raw:?} is absolute and outside the dataset's folder and the `files` input; \
                     images are read only from there unless the `format` op sets allow_paths_outside = true"
                ));
            }
            return if p.is_file() {
                Ok(ImageRef::File {
                    path: raw.to_string(),
                })
            } else {
                Err(format!("image file {raw} does not exist"))
            };
        }
        let rel: PathBuf = p
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        if rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!("image path {raw:?} leaves its root (`..`)"));
        }
        let mut candidates = vec![rel.clone()];
        if let Some(first) = rel.components().next() {
            candidates.push(Path::new(first.as_os_str()).join(&rel));
        }
        if let Some(root) = &self.files_root {
            for c in &candidates {
                if root.join(c).is_file() {
                    return Ok(ImageRef::File {
                        path: c.to_string_lossy().into_owned(),
                    });
                }
            }
        }
        for c in &candidates {
            let full = self.dataset_root.join(c);
            if full.is_file() {
                return Ok(ImageRef::File {
                    path: full.to_string_lossy().into_owned(),
                });
            }
        }
        let looked: Vec<String> = self
            .files_root
            .iter()
            .chain(std::iter::once(&self.dataset_root))
            .flat_map(|r| {
                candidates
                    .iter()
                    .map(move |c| r.join(c).display().to_string())
            })
            .collect();
        Err(format!(
            "image {raw:?} not found (looked at {})",
            looked.join(", ")
        ))
    }
}

/// The path with `.` and `..` removed without touching the disk (a Hub snapshot's files are
/// symlinks into its blob store, so canonical paths would all be outside the snapshot).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// A formatted row before image verification: the record and, for images in the row, their
/// bytes (borrowed from the row for checking, never stored).
pub struct Formatted {
    pub record: ConversationRecord,
    pub inline_images: Vec<(usize, Vec<u8>)>,
}

/// Images of a field: a list (or single value) of paths, `{bytes, path}` structs, or bytes.
fn image_refs(
    row: &Row,
    field: &str,
    roots: &PathRoots,
    inline: &mut Vec<(usize, Vec<u8>)>,
) -> std::result::Result<Vec<ImageRef>, String> {
    let v = row
        .get(field)
        .ok_or_else(|| format!("missing field `{field}`"))?;
    let items: Vec<&Value> = match v {
        Value::List(items) => items.iter().collect(),
        Value::Null => return Err(format!("field `{field}` is null")),
        single => vec![single],
    };
    let mut refs = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let r = match item {
            Value::Str(path) => roots.resolve(path)?,
            Value::Bytes(b) => {
                inline.push((refs.len(), b.clone()));
                ImageRef::Row {
                    row: row.index,
                    column: field.to_string(),
                    index,
                }
            }
            Value::Struct(s) => match (s.get("bytes"), s.get("path")) {
                (Some(Value::Bytes(b)), _) if !b.is_empty() => {
                    inline.push((refs.len(), b.clone()));
                    ImageRef::Row {
                        row: row.index,
                        column: field.to_string(),
                        index,
                    }
                }
                (_, Some(Value::Str(path))) => roots.resolve(path)?,
                _ => {
                    return Err(format!(
                        "image {index} of `{field}` has neither bytes nor a path"
                    ))
                }
            },
            other => {
                return Err(format!(
                    "image {index} of `{field}` is a {}, not a path or image",
                    other.type_name()
                ))
            }
        };
        refs.push(r);
    }
    Ok(refs)
}

/// Formats one row; `Err` is the reason the row is unusable (the caller skips or fails).
pub fn format_row(
    row: &Row,
    mapping: &Mapping,
    roots: &PathRoots,
) -> std::result::Result<Formatted, String> {
    let mut inline = Vec::new();
    let (messages, images) = match mapping {
        Mapping::Build {
            system,
            user_text,
            user_images,
            assistant,
        } => {
            let mut messages = Vec::new();
            if let Some(t) = system {
                messages.push(json!({"role": "system", "content": [{"type": "text", "text": t.render(row)?}]}));
            }
            let images = match user_images {
                Some(field) => image_refs(row, field, roots, &mut inline)?,
                None => Vec::new(),
            };
            if user_text.is_some() || !images.is_empty() {
                let mut content: Vec<serde_json::Value> =
                    images.iter().map(|_| json!({"type": "image"})).collect();
                if let Some(t) = user_text {
                    content.push(json!({"type": "text", "text": t.render(row)?}));
                }
                messages.push(json!({"role": "user", "content": content}));
            }
            if let Some(t) = assistant {
                messages.push(json!({"role": "assistant", "content": [{"type": "text", "text": t.render(row)?}]}));
            }
            (serde_json::Value::Array(messages), images)
        }
        Mapping::PassThrough { messages, images } => {
            let m = row
                .get(messages)
                .ok_or_else(|| format!("missing field `{messages}`"))?;
            let json = m.to_json();
            validate_messages(&json, messages)?;
            let refs = match images {
                Some(field) if row.get(field).is_some_and(|v| !v.is_null()) => {
                    image_refs(row, field, roots, &mut inline)?
                }
                _ => Vec::new(),
            };
            let items = count_image_items(&json);
            if items != refs.len() {
                return Err(format!(
                    "image count mismatch: the messages have {items} image items but `{}` holds {} images",
                    images.as_deref().unwrap_or("images"),
                    refs.len()
                ));
            }
            (json, refs)
        }
    };
    Ok(Formatted {
        record: ConversationRecord {
            row: row.index,
            file: row.file.clone(),
            messages,
            images,
        },
        inline_images: inline,
    })
}

fn validate_messages(m: &serde_json::Value, field: &str) -> std::result::Result<(), String> {
    let list = m
        .as_array()
        .ok_or_else(|| format!("field `{field}` is not a list of messages"))?;
    if list.is_empty() {
        return Err(format!("field `{field}` holds no messages"));
    }
    for (i, msg) in list.iter().enumerate() {
        let role = msg
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| format!("message {i} has no text `role`"))?;
        match msg.get("content") {
            Some(serde_json::Value::String(_)) => {}
            Some(serde_json::Value::Array(items)) => {
                for (j, it) in items.iter().enumerate() {
                    let ty = it.get("type").and_then(|t| t.as_str()).unwrap_or("");
                    if ty == "text" && !it.get("text").is_some_and(|t| t.is_string()) {
                        return Err(format!(
                            "message {i} ({role}) item {j} is a text item without text"
                        ));
                    }
                    if it
                        .as_object()
                        .is_some_and(|o| o.values().any(|v| v.get("$bytes").is_some()))
                    {
                        return Err(format!("message {i} ({role}) item {j} embeds bytes; put images in the images column"));
                    }
                }
            }
            _ => return Err(format!("message {i} ({role}) has no content")),
        }
    }
    Ok(())
}

/// Checks one image as configured; `Err` names what is wrong.
pub fn verify_image(
    bytes_or_path: Result<Vec<u8>>,
    how: VerifyImages,
) -> std::result::Result<(), String> {
    let bytes = bytes_or_path.map_err(|e| format!("{e:#}"))?;
    if bytes.is_empty() {
        return Err("image file is empty".into());
    }
    if how == VerifyImages::Decode {
        super::image::decode_rgb(&bytes).map_err(|e| format!("undecodable image: {e:#}"))?;
    }
    Ok(())
}

/// Summary written to `conversations.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FormatReport {
    pub rows: usize,
    pub conversations: usize,
    pub images: usize,
    pub skipped: usize,
    /// The first skipped rows: `row N (file): reason`.
    pub skipped_examples: Vec<String>,
    /// Skips per reason kind (`missing image`, `undecodable image`, ...).
    pub skipped_by_reason: BTreeMap<String, usize>,
}

/// A short kind for a skip reason, for the per-reason counts.
pub fn reason_kind(reason: &str) -> &'static str {
    if reason.contains("not found") || reason.contains("does not exist") {
        "missing image"
    } else if reason.contains("undecodable") || reason.contains("empty") {
        "undecodable image"
    } else if reason.contains("count mismatch") {
        "image count mismatch"
    } else if reason.contains("missing field") || reason.contains("is null") {
        "missing field"
    } else if reason.contains("UTF-8") {
        "invalid text"
    } else if reason.contains("invalid JSON") || reason.contains("expected a JSON object") {
        "unreadable row"
    } else {
        "invalid row"
    }
}

/// Checks that each field a mapping uses exists in at least one of `rows` (the first chunk),
/// for an early clear error on a mistyped field. A field only some rows lack is a bad row,
/// handled per `on_error` (JSON rows need not all have the same fields).
pub fn check_fields<'a>(
    mapping: &Mapping,
    rows: impl Iterator<Item = &'a Row> + Clone,
) -> Result<()> {
    let names: Vec<&str> = match mapping {
        Mapping::Build {
            system,
            user_text,
            user_images,
            assistant,
        } => system
            .iter()
            .chain(user_text)
            .chain(assistant)
            .flat_map(|t| t.fields())
            .chain(user_images.as_deref())
            .collect(),
        Mapping::PassThrough { messages, .. } => vec![messages.as_str()],
    };
    let Some(first) = rows.clone().next() else {
        return Ok(());
    };
    for n in names {
        if !rows.clone().any(|r| r.get(n).is_some()) {
            let have: Vec<&str> = first.fields.keys().map(String::as_str).collect();
            bail!(
                "the dataset has no field `{n}` (fields of row {} ({}): {}); fix the format op's templates",
                first.index,
                first.file,
                have.join(", ")
            );
        }
    }
    Ok(())
}

/// Reads an image reference's bytes for verification.
pub fn read_for_check(r: &ImageRef, files_root: Option<&Path>) -> Result<Vec<u8>> {
    match r {
        ImageRef::File { path } => {
            let p = Path::new(path);
            let full = match (files_root, p.is_absolute()) {
                (Some(root), false) => root.join(p),
                _ => p.to_path_buf(),
            };
            std::fs::read(&full).with_context(|| format!("cannot read image {}", full.display()))
        }
        ImageRef::Row { .. } => bail!("inline image bytes are checked from the row"),
    }
}
