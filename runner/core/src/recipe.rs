//! The recipe file: TOML with spans, `${vars.NAME}` interpolation and `--set` overrides.
//!
//! ```toml
//! [recipe]
//! name = "demo"        # default: the file's stem
//! seed = 42            # default 42
//! cache_dir = "cache"  # default `.runner-cache` beside the recipe (`--cache-dir`, RUNNER_CACHE win)
//! output_dir = "out"   # default: the recipe's name, beside the recipe
//!
//! [vars]
//! model = "google/gemma-3-4b-it"
//!
//! [ops.base]
//! op = "load"
//! model = "${vars.model}"
//!
//! [ops.nf4]
//! op = "quantize"
//! inputs = { model = "base" }
//! ```
//!
//! Every value keeps where it came from ([`Origin`]) so that later stages (param checks, the
//! graph) can point at the offending line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::{suggestion, Diagnostic, Origin, SourceFile};

mod overrides;
mod vars;

pub use overrides::Override;
use overrides::*;
use vars::*;

/// A recipe value with its origin, kept until interpolation and overrides are done.
#[derive(Debug, Clone)]
pub struct Node {
    pub value: NodeValue,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub enum NodeValue {
    Leaf(toml::Value),
    Array(Vec<Node>),
    /// Entries in file order.
    Table(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub key_origin: Origin,
    pub node: Node,
}

impl Node {
    fn from_toml(de: &Spanned<DeValue<'_>>, value: &toml::Value) -> Node {
        let origin = Origin::File(de.span());
        let value = match (de.get_ref(), value) {
            (DeValue::Table(de_table), toml::Value::Table(table)) => {
                let mut entries: Vec<Entry> = de_table
                    .iter()
                    .filter_map(|(k, v)| {
                        let key: &str = k.get_ref();
                        table.get(key).map(|tv| Entry {
                            key: key.to_string(),
                            key_origin: Origin::File(k.span()),
                            node: Node::from_toml(v, tv),
                        })
                    })
                    .collect();
                entries.sort_by_key(|e| e.key_origin.start());
                NodeValue::Table(entries)
            }
            (DeValue::Array(de_array), toml::Value::Array(array)) => NodeValue::Array(
                de_array
                    .iter()
                    .zip(array)
                    .map(|(d, v)| Node::from_toml(d, v))
                    .collect(),
            ),
            _ => NodeValue::Leaf(value.clone()),
        };
        Node { value, origin }
    }

    /// A value from the command line: every part of it has the same origin.
    fn from_set(value: toml::Value, origin: &Origin) -> Node {
        Node {
            value: NodeValue::Leaf(value),
            origin: origin.clone(),
        }
    }

    pub fn to_toml(&self) -> toml::Value {
        match &self.value {
            NodeValue::Leaf(v) => v.clone(),
            NodeValue::Array(items) => {
                toml::Value::Array(items.iter().map(Node::to_toml).collect())
            }
            NodeValue::Table(entries) => toml::Value::Table(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.node.to_toml()))
                    .collect(),
            ),
        }
    }

    fn entries(&self) -> Option<&[Entry]> {
        match &self.value {
            NodeValue::Table(e) => Some(e),
            NodeValue::Leaf(_) | NodeValue::Array(_) => None,
        }
    }

    fn entries_mut(&mut self) -> Option<&mut Vec<Entry>> {
        // A table that arrived whole (from `--set` or a `${vars.x}` substitution) is split into
        // entries so that it can be edited like one from the file.
        if let NodeValue::Leaf(toml::Value::Table(t)) = &self.value {
            let entries = t
                .iter()
                .map(|(k, v)| Entry {
                    key: k.clone(),
                    key_origin: self.origin.clone(),
                    node: Node::from_set(v.clone(), &self.origin),
                })
                .collect();
            self.value = NodeValue::Table(entries);
        }
        match &mut self.value {
            NodeValue::Table(e) => Some(e),
            _ => None,
        }
    }

    fn get(&self, key: &str) -> Option<&Entry> {
        self.entries()?.iter().find(|e| e.key == key)
    }

    fn type_name(&self) -> &'static str {
        match &self.value {
            NodeValue::Leaf(v) => v.type_str(),
            NodeValue::Array(_) => "array",
            NodeValue::Table(_) => "table",
        }
    }
}

/// `inputs = { PORT = "OP" }` of one op.
#[derive(Debug, Clone)]
pub struct InputDecl {
    pub port: String,
    pub port_origin: Origin,
    pub from: String,
    pub from_origin: Origin,
}

/// One `[ops.NAME]` table, interpolated and overridden.
#[derive(Debug, Clone)]
pub struct OpDecl {
    pub name: String,
    /// The `[ops.NAME]` header (or wherever the table begins).
    pub header: Origin,
    pub kind: String,
    pub kind_origin: Origin,
    pub inputs: Vec<InputDecl>,
    /// Everything except `op` and `inputs`, as written (defaults not yet filled).
    pub params: toml::Table,
    /// Where each param's key is written (or the `--set` that introduced it).
    pub param_origins: BTreeMap<String, Origin>,
}

/// A parsed recipe: ready for [`crate::graph::build`].
#[derive(Debug, Clone)]
pub struct Recipe {
    pub file: SourceFile,
    /// Absolute path of the recipe file.
    pub path: PathBuf,
    pub name: String,
    pub seed: u64,
    /// `[recipe] cache_dir`, resolved against the recipe's folder.
    pub cache_dir: Option<PathBuf>,
    /// `[recipe] output_dir`, resolved against the recipe's folder.
    pub output_dir: PathBuf,
    pub vars: BTreeMap<String, toml::Value>,
    /// In file order.
    pub ops: Vec<OpDecl>,
}

impl Recipe {
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    pub fn op(&self, name: &str) -> Option<&OpDecl> {
        self.ops.iter().find(|o| o.name == name)
    }

    pub fn info(&self) -> op_api::RecipeInfo {
        op_api::RecipeInfo {
            name: self.name.clone(),
            seed: self.seed,
            path: self.path.clone(),
            output_dir: self.output_dir.clone(),
            env: op_api::Environment::process(),
        }
    }
}

pub const DEFAULT_SEED: u64 = 42;
pub const RECIPE_KEYS: [&str; 4] = ["name", "seed", "cache_dir", "output_dir"];
const TOP_LEVEL_KEYS: [&str; 3] = ["recipe", "vars", "ops"];

/// Reads, parses, overrides and interpolates a recipe. All problems found are returned together.
pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, Vec<Diagnostic>> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            path: display.clone(),
            position: None,
            message: format!("cannot read the recipe: {e}"),
        }]
    })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    parse(SourceFile::new(display, text), absolute, overrides)
}

/// [`load`] on text already read; `path` is where relative paths resolve from.
pub fn parse(
    file: SourceFile,
    path: PathBuf,
    overrides: &[String],
) -> Result<Recipe, Vec<Diagnostic>> {
    let root = parse_toml(&file)?;
    let mut diags = Vec::new();

    let mut parsed_overrides = Vec::new();
    for arg in overrides {
        match Override::parse(arg) {
            Ok(o) => parsed_overrides.push(o),
            Err(message) => diags.push(Diagnostic {
                path: file.display.clone(),
                position: None,
                message,
            }),
        }
    }

    let mut sections: BTreeMap<&str, Node> = BTreeMap::new();
    for entry in root.entries().unwrap_or_default() {
        if TOP_LEVEL_KEYS.contains(&entry.key.as_str()) {
            let key = TOP_LEVEL_KEYS
                .iter()
                .find(|k| **k == entry.key)
                .expect("checked");
            if entry.node.entries().is_none() {
                diags.push(file.at(
                    &entry.key_origin,
                    format!("`{}` must be a table (write `[{}]`)", entry.key, entry.key),
                ));
                continue;
            }
            sections.insert(key, entry.node.clone());
        } else {
            diags.push(file.at(
                &entry.key_origin,
                format!(
                    "unknown top-level key `{}`{}; a recipe has `[recipe]`, `[vars]` and `[ops.NAME]` tables",
                    entry.key,
                    suggestion(&entry.key, TOP_LEVEL_KEYS)
                ),
            ));
        }
    }

    for o in &parsed_overrides {
        if let Err(message) = apply_override(&mut sections, o) {
            let near = match o.path[0].as_str() {
                "ops" => sections
                    .get("ops")
                    .and_then(|ops| ops.get(&o.path[1]))
                    .map(|e| e.node.origin.clone()),
                _ => None,
            };
            diags.push(match near {
                Some(origin) => file.at(&set_origin(o, Some(&origin)), message),
                None => Diagnostic {
                    path: file.display.clone(),
                    position: None,
                    message: format!("`--set {}`: {message}", o.arg),
                },
            });
        }
    }

    let vars = resolve_vars(&file, sections.get("vars"), &mut diags);

    let mut recipe_section = sections.remove("recipe");
    if let Some(node) = &mut recipe_section {
        interpolate(node, &vars, &file, &mut diags);
    }
    let (name, seed, cache_dir, output_dir) =
        recipe_settings(&file, &path, recipe_section.as_ref(), &mut diags);

    let mut op_decls = Vec::new();
    match sections.remove("ops") {
        Some(ops_node) => {
            let entries = ops_node.entries().unwrap_or_default();
            if entries.is_empty() {
                diags.push(file.at(&ops_node.origin, empty_recipe_message()));
            }
            for entry in entries {
                let mut node = entry.node.clone();
                interpolate(&mut node, &vars, &file, &mut diags);
                if let Some(decl) = op_decl(&file, &entry.key, &node, &mut diags) {
                    op_decls.push(decl);
                }
            }
        }
        None => diags.push(file.at_start(empty_recipe_message())),
    }

    if !diags.is_empty() {
        sort_diagnostics(&mut diags);
        return Err(diags);
    }
    let resolve = |p: &str| path.parent().unwrap_or(Path::new(".")).join(p);
    Ok(Recipe {
        output_dir: resolve(output_dir.as_deref().unwrap_or(&name)),
        cache_dir: cache_dir.as_deref().map(resolve),
        file,
        path: path.clone(),
        name,
        seed,
        vars,
        ops: op_decls,
    })
}

fn empty_recipe_message() -> String {
    "the recipe defines no ops; add an `[ops.NAME]` table with `op = \"KIND\"` (`runner ops` lists the kinds)"
        .to_string()
}

pub fn sort_diagnostics(diags: &mut [Diagnostic]) {
    diags.sort_by_key(|d| d.position.unwrap_or((0, 0)));
}

fn parse_toml(file: &SourceFile) -> Result<Node, Vec<Diagnostic>> {
    let parsed = toml::from_str::<toml::Table>(&file.text)
        .map_err(|e| (e.message().to_string(), e.span()))
        .and_then(|table| {
            DeTable::parse(&file.text)
                .map(|de| (table, de))
                .map_err(|e| (e.message().to_string(), e.span()))
        });
    match parsed {
        Ok((table, de)) => {
            let de_value = Spanned::new(de.span(), DeValue::Table(de.into_inner()));
            Ok(Node::from_toml(&de_value, &toml::Value::Table(table)))
        }
        Err((message, span)) => {
            let offset = span.map_or(0, |s| s.start);
            Err(vec![file.at(
                &Origin::File(offset..offset),
                toml_error_message(file, &message, offset),
            )])
        }
    }
}

/// Explains a TOML syntax error in recipe terms: which op it is in, and for a duplicate
/// `[ops.NAME]` where the first one is.
fn toml_error_message(file: &SourceFile, message: &str, offset: usize) -> String {
    let (line_no, _) = file.line_col(offset);
    let lines: Vec<&str> = file.text.lines().collect();
    let header_op = |line: &str| -> Option<String> {
        let inner = line.trim().strip_prefix('[')?.split(']').next()?.trim();
        let rest = inner
            .strip_prefix("ops")?
            .trim_start()
            .strip_prefix('.')?
            .trim();
        Some(rest.trim_matches(|c| c == '"' || c == '\'').to_string())
    };
    if message.contains("duplicate key") {
        if let Some(name) = lines.get(line_no - 1).and_then(|l| header_op(l)) {
            let first = lines[..line_no - 1]
                .iter()
                .position(|l| header_op(l).as_deref() == Some(name.as_str()));
            let first = first.map_or(String::new(), |i| format!(" (first at line {})", i + 1));
            return format!(
                "op `{name}` is defined twice{first}; op names must be unique: rename one of them"
            );
        }
    }
    // The toml crate reports a too-large integer as a type error about i128.
    let message = match message
        .strip_prefix("invalid type: integer `")
        .and_then(|m| m.split_once("` as i128"))
    {
        Some((n, _)) => format!(
            "integer {n} is out of range: TOML integers are 64-bit ({} to {})",
            i64::MIN,
            i64::MAX
        ),
        None => message.to_string(),
    };
    let enclosing = lines[..line_no.min(lines.len())]
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .and_then(|l| header_op(l));
    match enclosing {
        Some(name) => format!("invalid TOML in op `{name}`: {message}"),
        None => format!("invalid TOML: {message}"),
    }
}

fn recipe_settings(
    file: &SourceFile,
    path: &Path,
    node: Option<&Node>,
    diags: &mut Vec<Diagnostic>,
) -> RecipeSettings {
    let mut name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "recipe".into());
    let mut seed = DEFAULT_SEED;
    let mut cache_dir = None;
    let mut output_dir = None;
    for entry in node.and_then(Node::entries).unwrap_or_default() {
        let value = entry.node.to_toml();
        let wrong = |expected: &str| {
            file.at(
                &entry.node.origin,
                format!(
                    "`[recipe] {}` must be {expected}, got {} `{value}`",
                    entry.key,
                    value.type_str()
                ),
            )
        };
        match (entry.key.as_str(), &value) {
            ("name", toml::Value::String(s)) if !s.is_empty() => name = s.clone(),
            ("name", _) => diags.push(wrong("a non-empty string")),
            ("seed", toml::Value::Integer(i)) if *i >= 0 => seed = *i as u64,
            ("seed", _) => diags.push(wrong("a non-negative integer")),
            ("cache_dir", toml::Value::String(s)) if !s.is_empty() => cache_dir = Some(s.clone()),
            ("cache_dir", _) => diags.push(wrong("a non-empty path string")),
            ("output_dir", toml::Value::String(s)) if !s.is_empty() => output_dir = Some(s.clone()),
            ("output_dir", _) => diags.push(wrong("a non-empty path string")),
            (key, _) => diags.push(file.at(
                &entry.key_origin,
                format!(
                    "unknown key `{key}` in `[recipe]`{}",
                    suggestion(key, RECIPE_KEYS)
                ),
            )),
        }
    }
    (name, seed, cache_dir, output_dir)
}

fn op_decl(
    file: &SourceFile,
    name: &str,
    node: &Node,
    diags: &mut Vec<Diagnostic>,
) -> Option<OpDecl> {
    let mut node = node.clone();
    let Some(entries) = node.entries_mut().map(|e| e.clone()) else {
        diags.push(file.at(
            &node.origin,
            format!(
                "`ops.{name}` must be a table: write `[ops.{name}]` followed by `op = \"KIND\"`"
            ),
        ));
        return None;
    };
    let mut kind = None;
    let mut inputs = Vec::new();
    let mut params = toml::Table::new();
    let mut param_origins = BTreeMap::new();
    let mut ok = true;
    for mut entry in entries {
        match entry.key.as_str() {
            "op" => match &entry.node.value {
                NodeValue::Leaf(toml::Value::String(s)) => {
                    kind = Some((s.clone(), entry.node.origin.clone()))
                }
                _ => {
                    ok = false;
                    diags.push(file.at(
                        &entry.node.origin,
                        format!(
                            "op `{name}`: `op` must be a string naming the op kind (see `runner ops`), got {}",
                            entry.node.type_name()
                        ),
                    ));
                }
            },
            "inputs" => match entry.node.entries_mut() {
                Some(ports) => {
                    for port in ports {
                        match port.node.to_toml() {
                            toml::Value::String(from) => inputs.push(InputDecl {
                                port: port.key.clone(),
                                port_origin: port.key_origin.clone(),
                                from,
                                from_origin: port.node.origin.clone(),
                            }),
                            other => {
                                ok = false;
                                diags.push(file.at(
                                    &port.node.origin,
                                    format!(
                                        "op `{name}`: input `{}` must name another op as a string (`{} = \"OP\"`), got {}",
                                        port.key,
                                        port.key,
                                        other.type_str()
                                    ),
                                ));
                            }
                        }
                    }
                }
                None => {
                    ok = false;
                    diags.push(file.at(
                        &entry.node.origin,
                        format!(
                            "op `{name}`: `inputs` must be a table of `PORT = \"OP\"`, got {}",
                            entry.node.type_name()
                        ),
                    ));
                }
            },
            key => {
                params.insert(key.to_string(), entry.node.to_toml());
                param_origins.insert(key.to_string(), entry.key_origin.clone());
            }
        }
    }
    let Some((kind, kind_origin)) = kind else {
        if ok {
            diags.push(file.at(
                &node.origin,
                format!(
                    "op `{name}` has no `op = \"KIND\"`: add it (`runner ops` lists the kinds)"
                ),
            ));
        }
        return None;
    };
    ok.then(|| OpDecl {
        name: name.to_string(),
        header: node.origin.clone(),
        kind,
        kind_origin,
        inputs,
        params,
        param_origins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str, sets: &[&str]) -> Result<Recipe, Vec<Diagnostic>> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        parse(
            SourceFile::new("r.toml", text),
            PathBuf::from("/tmp/r.toml"),
            &sets,
        )
    }

    fn errors(text: &str, sets: &[&str]) -> Vec<String> {
        parse_str(text, sets)
            .unwrap_err()
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn override_values_are_toml_or_plain_strings() {
        let o = Override::parse("ops.train.learning_rate=1e-4").unwrap();
        assert_eq!(o.path, ["ops", "train", "learning_rate"]);
        assert_eq!(o.value, toml::Value::Float(1e-4));
        assert_eq!(
            Override::parse("ops.a.m=org/name").unwrap().value,
            toml::Value::String("org/name".into())
        );
        assert_eq!(
            Override::parse("ops.\"my op\".x=[1, 2]").unwrap().path,
            ["ops", "my op", "x"]
        );
        assert!(Override::parse("ops.a=1")
            .unwrap_err()
            .contains("too short"));
        assert!(Override::parse("opz.a.b=1")
            .unwrap_err()
            .contains("did you mean `ops`"));
        assert!(Override::parse("ops.a.b").unwrap_err().contains("no `=`"));
    }

    #[test]
    fn defaults_and_resolution() {
        let r = parse_str("[ops.a]\nop = 'k'\n", &[]).unwrap();
        assert_eq!(r.name, "r");
        assert_eq!(r.seed, 42);
        assert_eq!(r.output_dir, PathBuf::from("/tmp/r"));
        assert_eq!(r.cache_dir, None);
        let r = parse_str(
            "[recipe]\nname='n'\nseed=7\ncache_dir='c'\noutput_dir='/o'\n[ops.a]\nop = 'k'\n",
            &["recipe.seed=9"],
        )
        .unwrap();
        assert_eq!((r.name.as_str(), r.seed), ("n", 9));
        assert_eq!(r.cache_dir, Some(PathBuf::from("/tmp/c")));
        assert_eq!(r.output_dir, PathBuf::from("/o"));
    }

    #[test]
    fn interpolation_keeps_types_and_splices_text() {
        let r = parse_str(
            "[vars]\norg = 'google'\nmodel = '${vars.org}/gemma'\nlr = 2e-5\n\
             [ops.a]\nop = 'k'\nmodel = '${vars.model}'\nlearning_rate = '${vars.lr}'\n\
             note = 'lr=${vars.lr} $${literal}'\nlist = ['${vars.org}']\n",
            &[],
        )
        .unwrap();
        let p = &r.ops[0].params;
        assert_eq!(p["model"].as_str(), Some("google/gemma"));
        assert_eq!(p["learning_rate"].as_float(), Some(2e-5));
        assert_eq!(p["note"].as_str(), Some("lr=0.00002 ${literal}"));
        assert_eq!(p["list"].as_array().unwrap()[0].as_str(), Some("google"));
    }

    #[test]
    fn set_overrides_vars_params_and_inputs() {
        let r = parse_str(
            "[vars]\nlr = 1.0\n[ops.a]\nop = 'k'\nlearning_rate = '${vars.lr}'\nlora = { r = 8 }\n[ops.b]\nop='k'\n",
            &["vars.lr=3.0", "ops.a.lora.r=16", "ops.a.inputs.x=b", "ops.b.new=\"${vars.lr}\""],
        )
        .unwrap();
        let a = &r.ops[0];
        assert_eq!(a.params["learning_rate"].as_float(), Some(3.0));
        assert_eq!(a.params["lora"]["r"].as_integer(), Some(16));
        assert_eq!(a.inputs[0].port, "x");
        assert_eq!(a.inputs[0].from, "b");
        assert_eq!(r.ops[1].params["new"].as_float(), Some(3.0));
        assert!(matches!(r.ops[1].param_origins["new"], Origin::Set { .. }));
    }

    #[test]
    fn errors_point_at_lines() {
        let e = errors("[ops.a]\nop = 'k'\nx = '${vars.nope}'\n", &[]);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("r.toml:3:5: undefined variable `${vars.nope}`"),
            "{e:?}"
        );

        let e = errors(
            "[vars]\na = '${vars.b}'\nb = '${vars.a}'\n[ops.x]\nop='k'\n",
            &[],
        );
        assert!(e[0].contains("cycle: a -> b -> a"), "{e:?}");

        let e = errors("[ops.a]\nop = 'k'\n\n[ops.a]\nop = 'j'\n", &[]);
        assert_eq!(e, ["r.toml:4:6: op `a` is defined twice (first at line 1); op names must be unique: rename one of them"]);

        let e = errors("[ops.a]\nop = 'k'\nx = 'open\n", &[]);
        assert!(
            e[0].starts_with("r.toml:3:") && e[0].contains("invalid TOML in op `a`"),
            "{e:?}"
        );

        let e = errors("[ops.a]\nop = 'k'\nr = 99999999999999999999\n", &[]);
        assert!(
            e[0].starts_with("r.toml:3:")
                && e[0].contains(
                    "invalid TOML in op `a`: integer 99999999999999999999 is out of range: TOML integers are 64-bit"
                )
                && !e[0].contains("i128"),
            "{e:?}"
        );

        let e = errors("", &[]);
        assert!(
            e[0].starts_with("r.toml:1:1: the recipe defines no ops"),
            "{e:?}"
        );

        let e = errors("[ops.a]\nop = 'k'\n", &["ops.b.x=1"]);
        assert!(
            e[0].contains("`--set ops.b.x=1`: the recipe has no op `b`"),
            "{e:?}"
        );

        let e = errors("[recipe]\nseeed = 1\n[ops.a]\nop = 'k'\n", &[]);
        assert!(
            e[0].starts_with("r.toml:2:1: unknown key `seeed` in `[recipe]`; did you mean `seed`?"),
            "{e:?}"
        );

        let e = errors("[ops.a]\nkind = 'k'\n", &[]);
        assert!(
            e[0].starts_with("r.toml:1:1: op `a` has no `op = \"KIND\"`"),
            "{e:?}"
        );
    }
}
