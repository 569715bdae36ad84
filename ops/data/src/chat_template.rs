//! Chat templates rendered with minijinja the way transformers renders them with Jinja2.
//!
//! transformers (`utils/chat_template_utils.py`, `_cached_compile_jinja_template`) uses an
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[AssistantTracker, loopcontrols])` with a `tojson` filter that is `json.dumps`
//! (no HTML escaping, `ensure_ascii=False`), globals `raise_exception`, `strftime_now`, `dict`,
//! `namespace`, and renders with `messages`, `tools`, `documents`, `add_generation_prompt` and the
//! tokenizer's special tokens (`bos_token`, ...) as variables. The processor's
//! `apply_chat_template` passes `tokenizer.special_tokens_map` the same way. We mirror all of it.
//!
//! `{% generation %}...{% endgeneration %}` (TRL's training templates) is rewritten into marker
//! characters so the assistant spans can be recovered for `assistant_only_loss`; the rewrite
//! keeps trim/lstrip behaviour identical (a block tag stays at each end). The spans are what
//! transformers' `AssistantTracker` records: the output of each generation block.
//!
//! `assistant_only_loss` picks its template as TRL 1.16's `SFTTrainer.__init__` does
//! (`trl/trainer/sft_trainer.py`: `if args.assistant_only_loss and not
//! has_generation_markers(processing_class.chat_template): self.chat_template =
//! get_training_chat_template(processing_class)`): the model's template when it has generation
//! markers, else TRL's training variant of it, found by comparing the whole template text with the
//! templates TRL knows (`trl/chat_template_utils.py`, `get_training_chat_template`). The runner
//! bundles TRL's Gemma 3 pair (`trl_templates/`, Apache-2.0); any other template without markers is
//! an error that says how to supply one.

use std::path::Path;

use anyhow::{bail, Context, Result};
use minijinja::value::{Kwargs, Rest, Value};
use minijinja::{Environment, Error, ErrorKind, State};

/// Private-use characters marking generation spans in the raw render; stripped before output.
const GEN_START: char = '\u{10FFFD}';
const GEN_END: char = '\u{10FFFC}';

/// TRL 1.16 `trl/chat_templates/gemma3.jinja`: the Gemma 3 template as google/gemma-3-*-it ship it.
pub const TRL_GEMMA3_TEMPLATE: &str = include_str!("trl_templates/gemma3.jinja");
/// TRL 1.16 `trl/chat_templates/gemma3_training.jinja`: the same with `{% generation %}` around
/// each assistant turn's content and its `<end_of_turn>\n` (the `<start_of_turn>model\n` cue
/// stays outside).
pub const TRL_GEMMA3_TRAINING_TEMPLATE: &str = include_str!("trl_templates/gemma3_training.jinja");

/// TRL's `has_generation_markers`: `re.search(r"\{%-?\s*generation\s*-?%\}", template)`.
pub fn has_generation_markers(source: &str) -> bool {
    static MARKER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    MARKER
        .get_or_init(|| regex::Regex::new(r"\{%-?\s*generation\s*-?%\}").expect("valid regex"))
        .is_match(source)
}

/// TRL's `get_training_chat_template` for the templates the runner bundles: the training variant
/// of a template that equals one TRL knows, compared as whole strings as TRL does.
pub fn training_template_for(source: &str) -> Option<&'static str> {
    (source == TRL_GEMMA3_TEMPLATE).then_some(TRL_GEMMA3_TRAINING_TEMPLATE)
}

/// Which template text a `template` op renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The model's own template, or the one the recipe named.
    AsGiven,
    /// TRL's training variant swapped in for `assistant_only_loss` (its file name).
    TrlTraining(&'static str),
}

impl std::fmt::Display for TemplateChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateChoice::AsGiven => f.write_str("as given"),
            TemplateChoice::TrlTraining(name) => write!(f, "trl:{name}"),
        }
    }
}

/// A compiled chat template plus the variables transformers passes besides the messages.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Special tokens (`bos_token`, `eos_token`, `boi_token`, ...) given to the template.
    special_tokens: serde_json::Map<String, serde_json::Value>,
    has_generation_tags: bool,
}

/// One rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Byte ranges of `text` inside `{% generation %}` blocks (empty if the template has none).
    pub assistant_spans: Vec<(usize, usize)>,
}

/// Template instructions one render may execute: the Gemma 3 template spends a few hundred per
/// message, so this allows conversations of tens of thousands of messages and stops a runaway
/// template within seconds.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    /// Loads the model's own template (see `template_source`), or the override file. Special
    /// tokens come from `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_model_dir(dir: &Path, override_path: Option<&Path>) -> Result<Self> {
        let (source, _) = template_source(dir, override_path)?;
        Self::new(&source, special_tokens(dir)?)
    }

    /// The template `assistant_only_loss` renders with, chosen as TRL's SFTTrainer chooses it:
    /// the given template if it has `{% generation %}` markers, else TRL's training variant of it
    /// (bundled: Gemma 3), else an error saying how to provide one.
    pub fn for_assistant_only_loss(
        dir: &Path,
        override_path: Option<&Path>,
    ) -> Result<(Self, TemplateChoice)> {
        let (source, origin) = template_source(dir, override_path)?;
        let (source, choice) = if has_generation_markers(&source) {
            (source.as_str(), TemplateChoice::AsGiven)
        } else if let Some(training) = training_template_for(&source) {
            (
                training,
                TemplateChoice::TrlTraining("gemma3_training.jinja"),
            )
        } else {
            bail!(
                "assistant_only_loss needs a chat template with {{% generation %}}...{{% endgeneration %}} around \
                 the assistant turns; {origin} has none and is not a template TRL ships a training variant of that \
                 the runner bundles (Gemma 3's). Set the `template` op's `chat_template` to a copy of the template \
                 with those markers around each assistant message (TRL's trl/chat_templates/*_training.jinja are \
                 examples)"
            );
        };
        Ok((Self::new(source, special_tokens(dir)?)?, choice))
    }

    pub fn new(
        source: &str,
        special_tokens: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        let has_generation_tags = has_generation_markers(source);
        let source = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        // A model's template is code from the Hub: bound what one render may execute, so a
        // hostile template (nested `range(100000)` loops) fails instead of hanging the run.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source)
            .map_err(|e| anyhow::anyhow!("chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            special_tokens,
            has_generation_tags,
        })
    }

    pub fn has_generation_tags(&self) -> bool {
        self.has_generation_tags
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`: the raw render
    /// (no strip). `messages` is the JSON conversation (list of `{role, content}`).
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        let mut ctx = self.special_tokens.clone();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let tmpl = self
            .env
            .get_template("chat")
            .expect("template added in new()");
        let raw = tmpl
            .render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| {
                if e.kind() == minijinja::ErrorKind::OutOfFuel {
                    return anyhow::anyhow!(
                        "chat template: rendering one conversation took more than {TEMPLATE_FUEL} template instructions \
                         (a template that loops without end, or a hostile one); fix the model's chat template \
                         or set the template op's `chat_template` to a trusted file"
                    );
                }
                let mut msg = format!("chat template: {e}");
                if let Some(d) = e.detail() {
                    if !msg.contains(d) {
                        msg.push_str(&format!(": {d}"));
                    }
                }
                anyhow::anyhow!(msg)
            })?;
        Ok(strip_markers(&raw))
    }

    /// The guide's `apply_chat_template(...).strip()`; spans are moved and clipped with the text.
    pub fn render_stripped(&self, messages: &serde_json::Value) -> Result<Rendered> {
        let r = self.render(messages, false)?;
        Ok(python_strip(r))
    }
}

/// The template text a model folder provides (or the override file), and where it came from:
/// `chat_template.jinja`, else `chat_template.json` (`{"chat_template": ...}`), else
/// `tokenizer_config.json`'s `chat_template` (a string, or the list of named templates, where
/// `default` is used).
fn template_source(dir: &Path, override_path: Option<&Path>) -> Result<(String, String)> {
    if let Some(p) = override_path {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read chat template {}", p.display()))?;
        return Ok((text, format!("the chat template {}", p.display())));
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok((text, format!("the model's {}", jinja.display())));
    }
    let json = dir.join("chat_template.json");
    if let Some(v) = read_json_opt(&json)? {
        let text = template_from_json(v.get("chat_template"))
            .with_context(|| format!("{}: no usable `chat_template`", json.display()))?;
        return Ok((text, format!("the model's {}", json.display())));
    }
    let tokenizer_config = dir.join("tokenizer_config.json");
    if let Some(text) = read_json_opt(&tokenizer_config)?
        .as_ref()
        .and_then(|c| template_from_json(c.get("chat_template")))
    {
        return Ok((
            text,
            format!("the chat_template of {}", tokenizer_config.display()),
        ));
    }
    bail!(
        "model folder {} has no chat template (looked for chat_template.jinja, chat_template.json and \
         tokenizer_config.json's chat_template); set `chat_template = \"path/to/template.jinja\"`",
        dir.display()
    );
}

/// The special tokens transformers passes to the template (`tokenizer.special_tokens_map`), from
/// `special_tokens_map.json` and `tokenizer_config.json`.
fn special_tokens(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut special = serde_json::Map::new();
    for cfg in [
        read_json_opt(&dir.join("special_tokens_map.json"))?,
        read_json_opt(&dir.join("tokenizer_config.json"))?,
    ]
    .into_iter()
    .flatten()
    {
        collect_special_tokens(&cfg, &mut special);
    }
    Ok(special)
}

fn template_from_json(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
        format!("{} is not valid JSON", path.display())
    })?))
}

/// `special_tokens_map`: every `*_token` entry (string, or AddedToken `{content: ...}`), plus the
/// named `extra_special_tokens` (Gemma 3: `boi_token`, `eoi_token`, `image_token`).
fn collect_special_tokens(
    cfg: &serde_json::Value,
    out: &mut serde_json::Map<String, serde_json::Value>,
) {
    let Some(obj) = cfg.as_object() else { return };
    let token_text = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    for (k, v) in obj {
        if k.ends_with("_token") {
            if let Some(t) = token_text(v) {
                out.entry(k.clone()).or_insert(t.into());
            }
        }
    }
    if let Some(extra) = obj.get("extra_special_tokens").and_then(|e| e.as_object()) {
        for (k, v) in extra {
            if let Some(t) = token_text(v) {
                out.entry(k.clone()).or_insert(t.into());
            }
        }
    }
}

/// `{% generation %}` / `{% endgeneration %}` -> a marker output between two block tags, keeping
/// the tag's whitespace control (`{%-`, `-%}`) and the block-tag rules on both sides.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close_rel) = rest[open..].find("%}") else {
            break;
        };
        let close = open + close_rel + 2;
        let inner = rest[open + 2..close - 2]
            .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let (lead_ws, trail_ws) = (&rest[open..open + 3], &rest[close - 3..close]);
        let open_tag = if lead_ws.ends_with('-') { "{%-" } else { "{%" };
        let close_tag = if trail_ws.starts_with('-') {
            "-%}"
        } else {
            "%}"
        };
        out.push_str(&rest[..open]);
        // `{%- generation -%}` -> `{%- if true %}{{ MARK }}{% endif -%}`: the first tag takes the
        // left whitespace control and lstrip, the last the right one and trim_blocks, so the
        // text around the marker is exactly what Jinja2 leaves around the original tag.
        let marker = match inner {
            "generation" => Some(GEN_START),
            "endgeneration" => Some(GEN_END),
            _ => None,
        };
        match marker {
            Some(mark) => out.push_str(&format!(
                "{open_tag} if true %}}{{{{ \"{mark}\" }}}}{{% endif {close_tag}"
            )),
            None => out.push_str(&rest[open..close]),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

fn strip_markers(raw: &str) -> Rendered {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut start = None;
    for c in raw.chars() {
        match c {
            GEN_START => start = Some(text.len()),
            GEN_END => {
                if let Some(s) = start.take() {
                    spans.push((s, text.len()));
                }
            }
            _ => text.push(c),
        }
    }
    Rendered {
        text,
        assistant_spans: spans,
    }
}

/// Python's `str.strip()` (Unicode whitespace), moving spans with the text.
pub fn python_strip(r: Rendered) -> Rendered {
    let is_ws = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    let trimmed_start = r.text.len() - r.text.trim_start_matches(is_ws).len();
    let text = r.text.trim_matches(is_ws).to_string();
    let end = text.len();
    let assistant_spans = r
        .assistant_spans
        .into_iter()
        .map(|(s, e)| {
            (
                s.saturating_sub(trimmed_start).min(end),
                e.saturating_sub(trimmed_start).min(end),
            )
        })
        .filter(|(s, e)| s < e)
        .collect();
    Rendered {
        text,
        assistant_spans,
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {message}"),
    ))
}

fn strftime_now(format: String) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        )
    })?;
    Ok(out)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` — Python's default separators `", "` / `": "`, no HTML escaping.
fn tojson(_state: &State, value: Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = indent.or_else(|| args.first().cloned());
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(if let Some(s) = v.as_str() {
            s.to_string()
        } else {
            " ".repeat(i64::try_from(v)?.max(0) as usize)
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            if parts.len() != 2 {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson separators must be a pair",
                ));
            }
            (parts[0].to_string(), parts[1].to_string())
        }
        _ => (
            if indent.is_some() {
                ",".to_string()
            } else {
                ", ".to_string()
            },
            ": ".to_string(),
        ),
    };
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    write_py_json(&json, &opts, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_py_json(v: &serde_json::Value, o: &JsonOpts, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, d: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..d {
                out.push_str(ind);
            }
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                out.push_str(&py_float_repr(f));
            } else {
                out.push_str(&n.to_string());
            }
        }
        J::String(s) => write_py_str(s, o.ensure_ascii, out),
        J::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_py_json(it, o, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, it)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_py_str(k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                write_py_json(it, o, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// Python's `repr(float)` for JSON: shortest round-trip digits, `1.0` not `1`, exponent form
/// outside [1e-4, 1e16).
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{f:e}"); // e.g. 1e-5, 1.5e16
        let (mant, exp) = s.split_once('e').expect("exponent form");
        let exp: i32 = exp.parse().expect("exponent");
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn write_py_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmpl(src: &str) -> ChatTemplate {
        let mut sp = serde_json::Map::new();
        sp.insert("bos_token".into(), "<bos>".into());
        ChatTemplate::new(src, sp).unwrap()
    }

    #[test]
    fn trim_and_lstrip_blocks_like_jinja() {
        // Jinja2 with trim_blocks+lstrip_blocks renders this as "<bos>a\nb\n" (hand-checked).
        let t =
            tmpl("{{ bos_token }}\n  {% for m in messages %}\n{{ m.content }}\n  {% endfor %}\n");
        let r = t
            .render(
                &json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
                false,
            )
            .unwrap();
        assert_eq!(r.text, "<bos>\na\nb\n");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = tmpl("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}");
        let r = t
            .render(&json!([{"b": 1.0, "a": "<é>", "c": [1, 2.5e-5]}]), false)
            .unwrap();
        assert_eq!(r.text, "[{\"b\": 1.0, \"a\": \"<é>\", \"c\": [1, 2.5e-05]}]|{\n  \"b\": 1.0,\n  \"a\": \"<é>\",\n  \"c\": [\n    1,\n    2.5e-05\n  ]\n}");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t =
            tmpl("{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}");
        let e = t.render(&json!([]), false).unwrap_err().to_string();
        assert!(e.contains("no messages"), "{e}");
    }

    #[test]
    fn loop_controls_and_python_methods() {
        let t = tmpl("{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% endfor %}");
        let r = t
            .render(&json!([{"content": " x "}, {"content": "y"}]), false)
            .unwrap();
        assert_eq!(r.text, "X");
    }

    #[test]
    fn generation_markers_as_trl_detects_them() {
        // The plain Gemma 3 template says `add_generation_prompt` but has no generation block.
        assert!(!has_generation_markers(TRL_GEMMA3_TEMPLATE));
        assert!(TRL_GEMMA3_TEMPLATE.contains("generation"));
        assert!(has_generation_markers(TRL_GEMMA3_TRAINING_TEMPLATE));
        for marked in [
            "{% generation %}",
            "{%- generation %}",
            "{%- generation -%}",
            "{%generation%}",
        ] {
            assert!(has_generation_markers(marked), "{marked}");
        }
        assert!(!has_generation_markers("{% endgeneration %}"));
        assert!(!has_generation_markers("{{ generation }}"));
        assert_eq!(
            training_template_for(TRL_GEMMA3_TEMPLATE),
            Some(TRL_GEMMA3_TRAINING_TEMPLATE)
        );
        // Whole-string equality, as TRL compares: one more newline and it is another template.
        assert_eq!(
            training_template_for(&format!("{TRL_GEMMA3_TEMPLATE}\n")),
            None
        );
        let t = tmpl(TRL_GEMMA3_TEMPLATE);
        assert!(!t.has_generation_tags());
    }

    #[test]
    fn assistant_only_loss_swaps_in_trls_training_template_or_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<bos>"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), TRL_GEMMA3_TEMPLATE).unwrap();
        let (t, choice) = ChatTemplate::for_assistant_only_loss(dir.path(), None).unwrap();
        assert_eq!(choice, TemplateChoice::TrlTraining("gemma3_training.jinja"));
        let conv = json!([
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": " A cat. "}]}
        ]);
        let r = t.render(&conv, false).unwrap();
        // Hand-written from gemma3_training.jinja: the block holds the trimmed content and its
        // "<end_of_turn>\n"; the "<start_of_turn>model\n" cue stays outside.
        let want = "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What?<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n";
        assert_eq!(r.text, want);
        let start = want.find("A cat.").unwrap();
        assert_eq!(r.assistant_spans, vec![(start, want.len())]);
        // The plain template renders the same text.
        let plain = ChatTemplate::from_model_dir(dir.path(), None).unwrap();
        assert_eq!(plain.render(&conv, false).unwrap().text, want);

        // A template with its own markers is used as it is.
        let own = dir.path().join("own.jinja");
        std::fs::write(
            &own,
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
        )
        .unwrap();
        let (_, choice) = ChatTemplate::for_assistant_only_loss(dir.path(), Some(&own)).unwrap();
        assert_eq!(choice, TemplateChoice::AsGiven);

        // Any other template without markers: an error naming it and the fix.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        )
        .unwrap();
        let e = ChatTemplate::for_assistant_only_loss(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("chat_template.jinja")
                && e.contains("{% generation %}")
                && e.contains("`chat_template`"),
            "{e}"
        );
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        // Rendered by transformers 5.24 (`render_jinja_template(..., return_assistant_tokens_mask=True)`,
        // jinja2 3.1.6): "q\n<a>ans\n    |\n  tail\n", generation span (5, 15).
        let t = tmpl("{% for m in messages %}{% if m.role == 'assistant' %}\n  {{- '<a>' }}\n  {%- generation -%}\n    {{ m.content }}\n    {{ '|\n' }}\n  {%- endgeneration %}\n  tail\n{% else %}{{ m.content }}\n{% endif %}{% endfor %}");
        let r = t
            .render(
                &json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]),
                false,
            )
            .unwrap();
        assert_eq!(r.text, "q\n<a>ans\n    |\n  tail\n");
        assert_eq!(r.assistant_spans, vec![(5, 15)]);
    }

    #[test]
    fn generation_spans_survive_strip() {
        let t = tmpl("\n{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}");
        let r = t
            .render_stripped(
                &json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]),
            )
            .unwrap();
        // Jinja2 (trim_blocks) drops the newline after `{% endif %}`: "\nqans" -> strip -> "qans".
        assert_eq!(r.text, "qans");
        assert_eq!(r.assistant_spans, vec![(1, 4)]);
        assert!(t.has_generation_tags());
        // Block tags on their own lines: the rewrite must keep lstrip/trim exactly as Jinja2
        // renders the same template with `{% if true %}` in place of the generation tags
        // ("q\nans\n", checked with jinja2 3.1.6).
        let t = tmpl("{% for m in messages %}\n  {% if m.role == 'assistant' %}\n    {% generation %}\n{{ m.content }}\n    {% endgeneration %}\n  {% else %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}");
        let r = t
            .render(
                &json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]),
                false,
            )
            .unwrap();
        assert_eq!(r.text, "q\nans\n");
        assert_eq!(r.assistant_spans, vec![(2, 6)]);
    }
}
