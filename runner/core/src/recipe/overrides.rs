//! `--set PATH=VALUE` overrides: parsing them and applying them to the recipe's sections, each
//! value keeping the origin of the argument.

use std::collections::BTreeMap;

use super::*;
use crate::diag::{suggestion, Origin};

/// One `--set PATH=VALUE` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as given, for messages.
    pub arg: String,
    /// `["ops", "train", "learning_rate"]`; quoted TOML keys are allowed (`ops."my op".x`).
    pub path: Vec<String>,
    pub value: toml::Value,
}

impl Override {
    /// Parses `PATH=VALUE`. VALUE is read as a TOML value (`1e-4`, `true`, `[1, 2]`, `"s"`);
    /// anything that is not valid TOML is taken as a plain string, so `--set ops.m.model=org/name` works.
    pub fn parse(arg: &str) -> Result<Override, String> {
        let usage = "expected `ops.NAME.PARAM=VALUE`, `vars.NAME=VALUE` or `recipe.KEY=VALUE`";
        let Some((key, value)) = arg.split_once('=') else {
            return Err(format!("`--set {arg}`: no `=`; {usage}"));
        };
        let key = key.trim();
        let path = key_path(key)
            .ok_or_else(|| format!("`--set {arg}`: `{key}` is not a key path; {usage}"))?;
        let min_len = match path[0].as_str() {
            "ops" => 3,
            "vars" | "recipe" => 2,
            other => {
                return Err(format!(
                    "`--set {arg}`: a path starts with `ops`, `vars` or `recipe`, not `{other}`{}; {usage}",
                    suggestion(other, ["ops", "vars", "recipe"])
                ))
            }
        };
        if path.len() < min_len {
            return Err(format!("`--set {arg}`: `{key}` is too short; {usage}"));
        }
        let value_text = value.trim();
        let value = match toml::from_str::<toml::Table>(&format!("v = {value_text}")) {
            Ok(mut t) => t.remove("v").expect("parsed table has `v`"),
            Err(_) => toml::Value::String(value_text.to_string()),
        };
        Ok(Override {
            arg: arg.to_string(),
            path,
            value,
        })
    }
}

/// Splits a TOML dotted key (quoted parts allowed) by letting the TOML parser read it.
pub(super) fn key_path(key: &str) -> Option<Vec<String>> {
    if key.is_empty() {
        return None;
    }
    let table = toml::from_str::<toml::Table>(&format!("{key} = 0")).ok()?;
    let mut path = Vec::new();
    let mut current = &table;
    loop {
        let (k, v) = current.iter().next()?;
        path.push(k.clone());
        match v {
            toml::Value::Table(t) => current = t,
            _ => return Some(path),
        }
    }
}

pub(super) fn set_origin(o: &Override, near: Option<&Origin>) -> Origin {
    Origin::Set {
        arg: o.arg.clone(),
        near: match near {
            Some(Origin::File(r)) => Some(r.clone()),
            Some(Origin::Set { near, .. }) => near.clone(),
            None => None,
        },
    }
}

pub(super) fn apply_override(
    sections: &mut BTreeMap<&str, Node>,
    o: &Override,
) -> Result<(), String> {
    let section = o.path[0].as_str();
    match section {
        "ops" | "vars" => {
            let Some(table) = sections.get_mut(section) else {
                return Err(format!("the recipe has no `[{section}]`"));
            };
            let name = &o.path[1];
            let names: Vec<String> = table
                .entries()
                .unwrap_or_default()
                .iter()
                .map(|e| e.key.clone())
                .collect();
            let entries = table.entries_mut().expect("sections are tables");
            let Some(entry) = entries.iter_mut().find(|e| &e.key == name) else {
                let what = if section == "ops" { "op" } else { "variable" };
                return Err(format!(
                    "the recipe has no {what} `{name}`{}",
                    suggestion(name, names.iter().map(String::as_str))
                ));
            };
            if o.path.len() == 2 {
                let origin = set_origin(o, Some(&entry.node.origin));
                entry.node = Node::from_set(o.value.clone(), &origin);
                Ok(())
            } else {
                let near = entry.node.origin.clone();
                set_path(
                    &mut entry.node,
                    &o.path[2..],
                    o,
                    &near,
                    &o.path[..2].join("."),
                )
            }
        }
        "recipe" => {
            let node = sections.entry("recipe").or_insert_with(|| Node {
                value: NodeValue::Table(Vec::new()),
                origin: set_origin(o, None),
            });
            let near = node.origin.clone();
            set_path(node, &o.path[1..], o, &near, "recipe")
        }
        _ => unreachable!("Override::parse checks the section"),
    }
}

/// Sets `path` inside the table `node`, creating intermediate tables.
pub(super) fn set_path(
    node: &mut Node,
    path: &[String],
    o: &Override,
    near: &Origin,
    prefix: &str,
) -> Result<(), String> {
    let type_name = node.type_name();
    let Some(entries) = node.entries_mut() else {
        return Err(format!("`{prefix}` is {type_name}, not a table"));
    };
    let key = &path[0];
    let position = entries.iter().position(|e| &e.key == key);
    let index = match position {
        Some(i) => i,
        None => {
            let origin = set_origin(o, Some(near));
            entries.push(Entry {
                key: key.clone(),
                key_origin: origin.clone(),
                node: Node {
                    value: NodeValue::Table(Vec::new()),
                    origin,
                },
            });
            entries.len() - 1
        }
    };
    let entry = &mut entries[index];
    if path.len() == 1 {
        let origin = set_origin(o, Some(&entry.key_origin));
        entry.key_origin = origin.clone();
        entry.node = Node::from_set(o.value.clone(), &origin);
        Ok(())
    } else {
        let near = entry.key_origin.clone();
        set_path(
            &mut entry.node,
            &path[1..],
            o,
            &near,
            &format!("{prefix}.{key}"),
        )
    }
}
