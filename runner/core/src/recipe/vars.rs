//! `[vars]` and `${vars.NAME}` interpolation: every string of the recipe, with errors that point
//! at the reference and suggest the nearest defined name.

use std::collections::BTreeMap;

use super::*;
use crate::diag::Diagnostic;

/// Resolves `[vars]`; a variable may refer to others (`"${vars.org}/model"`), never to itself.
pub(super) fn resolve_vars(
    file: &SourceFile,
    vars: Option<&Node>,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, toml::Value> {
    struct Resolver<'a> {
        raw: BTreeMap<String, Node>,
        done: BTreeMap<String, Option<toml::Value>>,
        stack: Vec<String>,
        file: &'a SourceFile,
        diags: Vec<Diagnostic>,
    }
    impl Resolver<'_> {
        fn resolve(&mut self, name: &str) -> Result<toml::Value, String> {
            if let Some(done) = self.done.get(name) {
                // A variable that failed already has its own error; don't repeat it at each use.
                return done.clone().ok_or_else(String::new);
            }
            let Some(mut node) = self.raw.get(name).cloned() else {
                return Err(undefined_var(name, self.raw.keys()));
            };
            if let Some(start) = self.stack.iter().position(|n| n == name) {
                let mut cycle: Vec<&str> = self.stack[start..].iter().map(String::as_str).collect();
                cycle.push(name);
                return Err(format!(
                    "variables refer to each other in a cycle: {}",
                    cycle.join(" -> ")
                ));
            }
            self.stack.push(name.to_string());
            let mut errors = Vec::new();
            let file = self.file;
            interpolate_with(&mut node, &mut |n| self.resolve(n), file, &mut errors);
            self.stack.pop();
            let value = errors.is_empty().then(|| node.to_toml());
            self.diags.extend(errors);
            self.done.insert(name.to_string(), value.clone());
            value.ok_or_else(String::new)
        }
    }
    let Some(vars) = vars else {
        return BTreeMap::new();
    };
    let raw: BTreeMap<String, Node> = vars
        .entries()
        .unwrap_or_default()
        .iter()
        .map(|e| (e.key.clone(), e.node.clone()))
        .collect();
    let names: Vec<String> = raw.keys().cloned().collect();
    let mut resolver = Resolver {
        raw,
        done: BTreeMap::new(),
        stack: Vec::new(),
        file,
        diags: Vec::new(),
    };
    let mut out = BTreeMap::new();
    for name in names {
        if let Ok(v) = resolver.resolve(&name) {
            out.insert(name, v);
        }
    }
    dedup_into(diags, resolver.diags);
    out
}

pub(super) fn dedup_into(diags: &mut Vec<Diagnostic>, new: Vec<Diagnostic>) {
    for d in new {
        if !diags.contains(&d) {
            diags.push(d);
        }
    }
}

pub(super) fn undefined_var<'a>(name: &str, defined: impl Iterator<Item = &'a String>) -> String {
    let defined: Vec<&str> = defined.map(String::as_str).collect();
    match op_api::params::nearest(name, defined.iter().copied()) {
        Some(near) => format!("undefined variable `${{vars.{name}}}`; did you mean `{near}`?"),
        None => format!("undefined variable `${{vars.{name}}}`: define `{name}` under `[vars]`"),
    }
}

/// Replaces `${vars.NAME}` in every string of `node` with resolved variables.
pub(super) fn interpolate(
    node: &mut Node,
    vars: &BTreeMap<String, toml::Value>,
    file: &SourceFile,
    diags: &mut Vec<Diagnostic>,
) {
    let mut lookup = |name: &str| -> Result<toml::Value, String> {
        vars.get(name)
            .cloned()
            .ok_or_else(|| undefined_var(name, vars.keys()))
    };
    interpolate_with(node, &mut lookup, file, diags);
}

pub(super) fn interpolate_with(
    node: &mut Node,
    lookup: &mut dyn FnMut(&str) -> Result<toml::Value, String>,
    file: &SourceFile,
    diags: &mut Vec<Diagnostic>,
) {
    match &mut node.value {
        NodeValue::Leaf(value) => match interpolate_value(value, lookup) {
            Ok(Some(v)) => *value = v,
            Ok(None) => {}
            Err(message) if message.is_empty() => {}
            Err(message) => diags.push(file.at(&node.origin, message)),
        },
        NodeValue::Array(items) => items
            .iter_mut()
            .for_each(|n| interpolate_with(n, lookup, file, diags)),
        NodeValue::Table(entries) => entries
            .iter_mut()
            .for_each(|e| interpolate_with(&mut e.node, lookup, file, diags)),
    }
}

/// `Ok(None)` when nothing changes. Values nested in a whole-table leaf (from `--set`) are
/// interpolated too.
pub(super) fn interpolate_value(
    value: &toml::Value,
    lookup: &mut dyn FnMut(&str) -> Result<toml::Value, String>,
) -> Result<Option<toml::Value>, String> {
    match value {
        toml::Value::String(s) => interpolate_str(s, lookup),
        toml::Value::Array(items) => {
            let mut changed = false;
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match interpolate_value(item, lookup)? {
                    Some(v) => {
                        changed = true;
                        out.push(v)
                    }
                    None => out.push(item.clone()),
                }
            }
            Ok(changed.then_some(toml::Value::Array(out)))
        }
        toml::Value::Table(table) => {
            let mut changed = false;
            let mut out = toml::Table::new();
            for (k, item) in table {
                match interpolate_value(item, lookup)? {
                    Some(v) => {
                        changed = true;
                        out.insert(k.clone(), v);
                    }
                    None => {
                        out.insert(k.clone(), item.clone());
                    }
                }
            }
            Ok(changed.then_some(toml::Value::Table(out)))
        }
        _ => Ok(None),
    }
}

/// A string that is exactly one `${vars.x}` takes the variable's value with its type (so
/// `learning_rate = "${vars.lr}"` stays a float); inside longer text the variable is spliced in
/// as text. `$${` writes a literal `${`.
pub(super) fn interpolate_str(
    s: &str,
    lookup: &mut dyn FnMut(&str) -> Result<toml::Value, String>,
) -> Result<Option<toml::Value>, String> {
    if !s.contains("${") {
        return Ok(None);
    }
    let reference = |inner: &str| -> Result<String, String> {
        match inner.strip_prefix("vars.") {
            Some(name) if !name.is_empty() => Ok(name.to_string()),
            _ => Err(format!(
                "`${{{inner}}}` is not a variable reference: write `${{vars.NAME}}` (or `$${{` for a literal `${{`)"
            )),
        }
    };
    if let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        if !inner.contains('}') && !inner.contains("${") {
            return lookup(&reference(inner)?).map(Some);
        }
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated `${{` in `{s}`: write `${{vars.NAME}}` (or `$${{` for a literal `${{`)"));
        };
        let name = reference(&after[..end])?;
        match lookup(&name)? {
            toml::Value::String(v) => out.push_str(&v),
            v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) | toml::Value::Datetime(_)) => {
                out.push_str(&v.to_string())
            }
            other => {
                return Err(format!(
                    "`${{vars.{name}}}` is {} and cannot be spliced into text; use it as the whole value (\"${{vars.{name}}}\")",
                    other.type_str()
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Some(toml::Value::String(out)))
}

pub(super) type RecipeSettings = (String, u64, Option<String>, Option<String>);
