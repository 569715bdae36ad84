//! Which files of a dataset repo make a split — the rules of `datasets.load_dataset`
//! (`datasets/data_files.py`, `utils/metadata.py`):
//!
//! 1. Explicit `data_files` (a pattern or list → every requested split reads them; a table
//!    `{split = pattern(s)}` → per split, as `datasets` takes a dict).
//! 2. The dataset card's YAML `configs:` (README.md front matter): the selected config's
//!    `data_files` (string, list, or list of `{split, path}`) under its `data_dir`.
//!    This is how FanqingM/MMIU-Benchmark declares its single `test` split.
//! 3. Otherwise the default patterns, first match wins: sharded `data/{split}-NNNNN-of-NNNNN*.*`
//!    (llava-instruct-mix-vsft); split keywords in directory names; in file names
//!    (`train`/`training`, `validation`/`valid`/`dev`/`val`, `test`/`testing`/`eval`/`evaluation`
//!    delimited by `-._ 0-9`); else every data file is `train`.
//!
//! Patterns are fsspec globs (`*` stays within a path component, `**` crosses them); hidden
//! files and folders and `__special__` folders are skipped unless the pattern names them, and
//! `README.md`-style metadata files are ignored, as in `datasets`.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use glob::{MatchOptions, Pattern};
use yaml_rust2::{Yaml, YamlLoader};

use super::dataset::DATA_EXTENSIONS;

/// Files `datasets` never treats as data (`FILES_TO_IGNORE`).
const FILES_TO_IGNORE: &[&str] = &[
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

const SPLIT_KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];
const NON_WORD_CHARS: &str = "-._ 0-9";

/// Split name → glob patterns.
pub type SplitPatterns = BTreeMap<String, Vec<String>>;

/// The `data_files` recipe parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum DataFilesSpec {
    /// Patterns that every requested split reads.
    Any(Vec<String>),
    /// Patterns per split.
    PerSplit(SplitPatterns),
}

impl DataFilesSpec {
    /// From the recipe value: a string, a list of strings, or a table of split → string(s).
    pub fn from_toml(value: &toml::Value) -> Result<Self> {
        fn patterns(v: &toml::Value) -> Result<Vec<String>> {
            match v {
                toml::Value::String(s) => Ok(vec![s.clone()]),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| anyhow!("expected a string, got `{i}`"))
                    })
                    .collect(),
                other => bail!("expected a pattern or a list of patterns, got `{other}`"),
            }
        }
        Ok(match value {
            toml::Value::Table(t) => DataFilesSpec::PerSplit(
                t.iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            patterns(v).with_context(|| format!("split `{k}`"))?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            ),
            other => DataFilesSpec::Any(patterns(other)?),
        })
    }
}

/// The resolved split: its name and its data files (sorted, relative to the repo root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitSelection {
    pub split: String,
    pub data_files: Vec<String>,
    /// How the files were chosen, for messages (`dataset card config \`default\``, ...).
    pub rule: String,
}

/// Chooses the data files of `split` (default: `train` if the repo has it, else its only
/// split) among `files`, the repo's relative paths.
pub fn select_split(
    files: &[String],
    readme: Option<&str>,
    config: Option<&str>,
    split: Option<&str>,
    explicit: Option<&DataFilesSpec>,
) -> Result<SplitSelection> {
    let mut by_default_rules = false;
    let (patterns, rule) = match explicit {
        Some(DataFilesSpec::Any(p)) => {
            let name = split.unwrap_or("train").to_string();
            (
                BTreeMap::from([(name, p.clone())]),
                "the `data_files` parameter".to_string(),
            )
        }
        Some(DataFilesSpec::PerSplit(map)) => {
            (map.clone(), "the `data_files` parameter".to_string())
        }
        None => match readme
            .map(|text| card_data_files(text, config))
            .transpose()?
            .flatten()
        {
            Some((name, map)) => (map, format!("the dataset card's config `{name}`")),
            None => {
                if let Some(config) = config {
                    bail!("config `{config}` requested, but the dataset card (README.md) declares no configs");
                }
                by_default_rules = true;
                (
                    default_patterns(files)?,
                    "the default file-name rules of `datasets`".to_string(),
                )
            }
        },
    };
    let split_name = match split {
        Some(s) => s.to_string(),
        None if patterns.contains_key("train") => "train".to_string(),
        None if patterns.len() == 1 => patterns.keys().next().unwrap().clone(),
        None => bail!(
            "the dataset has splits {}: set `split` to one of them",
            patterns
                .keys()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let Some(split_patterns) = patterns.get(&split_name) else {
        bail!(
            "split `{split_name}` not found: by {rule} the dataset has {}; set `split` to one \
             of them, or name the files with `data_files`",
            patterns
                .keys()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let mut data_files = Vec::new();
    if by_default_rules {
        // The default rules are tried over data files only; a keyword pattern may match none.
        let data: Vec<String> = files.iter().filter(|f| is_data_file(f)).cloned().collect();
        for pattern in split_patterns {
            for file in resolve_pattern(pattern, &data)? {
                if !data_files.contains(&file) {
                    data_files.push(file);
                }
            }
        }
        data_files.sort();
        return Ok(SplitSelection {
            split: split_name,
            data_files,
            rule,
        });
    }
    for pattern in split_patterns {
        let matched = resolve_pattern(pattern, files)?;
        if matched.is_empty() {
            bail!("split `{split_name}`: pattern `{pattern}` (from {rule}) matches no file of the dataset");
        }
        for file in matched {
            if !is_data_file(&file) {
                bail!(
                    "split `{split_name}`: `{file}` (from pattern `{pattern}`) is not a supported \
                     data file (.{})",
                    DATA_EXTENSIONS.join(", .")
                );
            }
            if !data_files.contains(&file) {
                data_files.push(file);
            }
        }
    }
    Ok(SplitSelection {
        split: split_name,
        data_files,
        rule,
    })
}

fn is_data_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| DATA_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// The files matching an fsspec-style pattern, sorted, with `datasets`' exclusions.
pub fn resolve_pattern(pattern: &str, files: &[String]) -> Result<Vec<String>> {
    let pattern = pattern.trim_start_matches("./");
    let compiled = Pattern::new(pattern).with_context(|| format!("invalid pattern `{pattern}`"))?;
    let options = MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let pattern_name = pattern.rsplit('/').next().unwrap_or(pattern);
    let mut out: Vec<String> = files
        .iter()
        .filter(|f| compiled.matches_with(f, options))
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or(f);
            !(FILES_TO_IGNORE.contains(&name) && name != pattern_name)
        })
        .filter(|f| count_hidden(f) == count_hidden(pattern))
        .filter(|f| count_special_dirs(f) == count_special_dirs(pattern))
        .cloned()
        .collect();
    out.sort();
    Ok(out)
}

/// Parts starting with `.` (not `.`/`..` themselves): hidden unless the pattern names them.
fn count_hidden(path: &str) -> usize {
    path.split('/')
        .filter(|p| p.starts_with('.') && !p.chars().all(|c| c == '.'))
        .count()
}

/// Parent folders starting with `__` (`__pycache__`).
fn count_special_dirs(path: &str) -> usize {
    let parts: Vec<&str> = path.split('/').collect();
    parts[..parts.len() - 1]
        .iter()
        .filter(|p| p.starts_with("__"))
        .count()
}

/// `datasets`' `_get_data_files_patterns` over the repo's data files.
fn default_patterns(files: &[String]) -> Result<SplitPatterns> {
    let data: Vec<String> = files.iter().filter(|f| is_data_file(f)).cloned().collect();
    if data.is_empty() {
        bail!(
            "the dataset has no data files (.{})",
            DATA_EXTENSIONS.join(", .")
        );
    }
    // data/{split}-NNNNN-of-NNNNN*.*
    let mut sharded = BTreeMap::<String, Vec<String>>::new();
    for f in &data {
        if let Some(split) = sharded_split(f) {
            sharded.entry(split.clone()).or_default().push(format!(
                "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"
            ));
        }
    }
    if !sharded.is_empty() {
        for patterns in sharded.values_mut() {
            patterns.dedup();
        }
        return Ok(sharded);
    }
    let sep = NON_WORD_CHARS;
    let in_dir = |k: &str| {
        vec![
            format!("**/{k}/**"),
            format!("**/{k}[{sep}]*/**"),
            format!("**/*[{sep}]{k}/**"),
            format!("**/*[{sep}]{k}[{sep}]*/**"),
        ]
    };
    let in_name = |k: &str| vec![format!("**/{k}[{sep}]*"), format!("**/*[{sep}]{k}[{sep}]*")];
    for make in [&in_dir as &dyn Fn(&str) -> Vec<String>, &in_name] {
        let mut found = SplitPatterns::new();
        for (split, keywords) in SPLIT_KEYWORDS {
            let patterns: Vec<String> = keywords.iter().flat_map(|k| make(k)).collect();
            let mut any = false;
            for p in &patterns {
                if !resolve_pattern(p, &data)?.is_empty() {
                    any = true;
                    break;
                }
            }
            if any {
                found.insert(split.to_string(), patterns);
            }
        }
        if !found.is_empty() {
            // Each split reads every pattern of its keywords; keep only those matching data.
            return Ok(found);
        }
    }
    Ok(BTreeMap::from([(
        "train".to_string(),
        vec!["**".to_string()],
    )]))
}

/// `train` from `data/train-00003-of-00020-abc.parquet`.
fn sharded_split(path: &str) -> Option<String> {
    let name = path.strip_prefix("data/")?;
    if name.contains('/') {
        return None;
    }
    let bytes = name.as_bytes();
    // Find "-NNNNN-of-NNNNN" followed by anything, then a dot somewhere after.
    for start in 1..bytes.len() {
        let rest = &bytes[start..];
        if rest.len() >= 15
            && rest[0] == b'-'
            && rest[1..6].iter().all(u8::is_ascii_digit)
            && &rest[6..10] == b"-of-"
            && rest[10..15].iter().all(u8::is_ascii_digit)
            && rest[15..].contains(&b'.')
        {
            let split = &name[..start];
            let valid = split
                .split('.')
                .all(|w| !w.is_empty() && w.chars().all(|c| c.is_alphanumeric() || c == '_'));
            return valid.then(|| split.to_string());
        }
    }
    None
}

/// The `data_files` of a config in the dataset card's YAML front matter: `None` when the
/// card has no `configs`.
pub fn card_data_files(
    readme: &str,
    config: Option<&str>,
) -> Result<Option<(String, SplitPatterns)>> {
    let Some(front) = front_matter(readme) else {
        return Ok(None);
    };
    let docs =
        YamlLoader::load_from_str(front).context("parsing the dataset card's YAML header")?;
    let Some(doc) = docs.first() else {
        return Ok(None);
    };
    let Some(configs) = doc["configs"].as_vec() else {
        return Ok(None);
    };
    let name_of = |c: &Yaml| c["config_name"].as_str().unwrap_or("default").to_string();
    let chosen = match config {
        Some(want) => configs.iter().find(|c| name_of(c) == want).ok_or_else(|| {
            anyhow!(
                "config `{want}` not found in the dataset card; it has {}",
                configs
                    .iter()
                    .map(|c| format!("`{}`", name_of(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None => configs
            .iter()
            .find(|c| c["default"].as_bool() == Some(true))
            .or_else(|| configs.iter().find(|c| name_of(c) == "default"))
            .or_else(|| (configs.len() == 1).then(|| &configs[0]))
            .ok_or_else(|| {
                anyhow!(
                    "the dataset card declares configs {} and none is the default: set `config`",
                    configs
                        .iter()
                        .map(|c| format!("`{}`", name_of(c)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
    };
    let name = name_of(chosen);
    let data_dir = chosen["data_dir"]
        .as_str()
        .map(|d| d.trim_end_matches('/').to_string());
    let with_dir = |p: &str| match &data_dir {
        Some(dir) if !dir.is_empty() => format!("{dir}/{p}"),
        _ => p.to_string(),
    };
    let strings = |y: &Yaml| -> Result<Vec<String>> {
        match y {
            Yaml::String(s) => Ok(vec![with_dir(s)]),
            Yaml::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(with_dir)
                        .ok_or_else(|| anyhow!("expected a path string in data_files"))
                })
                .collect(),
            _ => bail!("expected a path or a list of paths in data_files"),
        }
    };
    let data_files = &chosen["data_files"];
    let map = match data_files {
        Yaml::BadValue => match &data_dir {
            // A config with only data_dir: the default rules inside that folder.
            Some(dir) => BTreeMap::from([("train".to_string(), vec![format!("{dir}/**")])]),
            None => bail!("config `{name}` of the dataset card has no data_files"),
        },
        Yaml::String(_) => BTreeMap::from([("train".to_string(), strings(data_files)?)]),
        Yaml::Array(items) if items.iter().all(|i| matches!(i, Yaml::Hash(_))) => {
            let mut map = SplitPatterns::new();
            for item in items {
                let split = item["split"].as_str().unwrap_or("train").to_string();
                let paths = strings(&item["path"])
                    .with_context(|| format!("config `{name}`, split `{split}`"))?;
                if map.insert(split.clone(), paths).is_some() {
                    bail!("config `{name}` lists split `{split}` twice");
                }
            }
            map
        }
        Yaml::Array(_) => BTreeMap::from([("train".to_string(), strings(data_files)?)]),
        _ => bail!("config `{name}`: unsupported data_files form"),
    };
    Ok(Some((name, map)))
}

/// The YAML between the leading `---` lines of a dataset card.
fn front_matter(readme: &str) -> Option<&str> {
    let text = readme.strip_prefix('\u{feff}').unwrap_or(readme);
    let rest = text.strip_prefix("---")?;
    let rest = rest
        .strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            return Some(&rest[..offset]);
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const MMIU_CARD: &str = "---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: all.parquet\n---\n# MMIU\n";

    #[test]
    fn mmiu_card_declares_test_split() {
        let repo = files(&[
            ".gitattributes",
            "2D-spatial.zip",
            "3D-spatial.zip",
            "README.md",
            "all.parquet",
        ]);
        let s = select_split(&repo, Some(MMIU_CARD), None, Some("test"), None).unwrap();
        assert_eq!(s.data_files, ["all.parquet"]);
        assert_eq!(s.split, "test");
        // Its only split is the default when none is asked.
        assert_eq!(
            select_split(&repo, Some(MMIU_CARD), None, None, None)
                .unwrap()
                .split,
            "test"
        );
        let err = select_split(&repo, Some(MMIU_CARD), None, Some("train"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("split `train` not found") && err.contains("`test`"),
            "{err}"
        );
        // Without a card a lone file is `train`, as `datasets` does.
        let s = select_split(&repo, None, None, None, None).unwrap();
        assert_eq!(
            (s.split.as_str(), s.data_files.as_slice()),
            ("train", &["all.parquet".to_string()][..])
        );
    }

    #[test]
    fn llava_sharded_files() {
        let repo = files(&[
            "README.md",
            "data/test-00000-of-00002.parquet",
            "data/test-00001-of-00002.parquet",
            "data/train-00000-of-00020-5f0a.parquet",
            "data/train-00001-of-00020-77b2.parquet",
        ]);
        let s = select_split(&repo, Some("# no front matter\n"), None, None, None).unwrap();
        assert_eq!(s.split, "train");
        assert_eq!(
            s.data_files,
            [
                "data/train-00000-of-00020-5f0a.parquet",
                "data/train-00001-of-00020-77b2.parquet"
            ]
        );
        let s = select_split(&repo, None, None, Some("test"), None).unwrap();
        assert_eq!(
            s.data_files,
            [
                "data/test-00000-of-00002.parquet",
                "data/test-00001-of-00002.parquet"
            ]
        );
    }

    #[test]
    fn keyword_rules_dirs_then_names() {
        let repo = files(&[
            "train.jsonl",
            "valid.jsonl",
            "my_test-1.jsonl",
            "notes.txt",
            ".hidden/train.jsonl",
            "testimony.jsonl",
        ]);
        let s = select_split(&repo, None, None, Some("validation"), None).unwrap();
        assert_eq!(s.data_files, ["valid.jsonl"]);
        let s = select_split(&repo, None, None, Some("test"), None).unwrap();
        assert_eq!(
            s.data_files,
            ["my_test-1.jsonl"],
            "`testimony` is no keyword; `.hidden` is skipped"
        );
        let s = select_split(&repo, None, None, None, None).unwrap();
        assert_eq!(s.data_files, ["train.jsonl"]);
        let repo = files(&["train/a.parquet", "train/b.parquet", "test/c.parquet"]);
        let s = select_split(&repo, None, None, Some("test"), None).unwrap();
        assert_eq!(s.data_files, ["test/c.parquet"]);
    }

    #[test]
    fn explicit_data_files() {
        let repo = files(&["a/x.parquet", "a/y.parquet", "b/z.json", "README.md"]);
        let any = DataFilesSpec::from_toml(&toml::Value::String("a/*.parquet".into())).unwrap();
        let s = select_split(&repo, Some(MMIU_CARD), None, Some("test"), Some(&any)).unwrap();
        assert_eq!(s.data_files, ["a/x.parquet", "a/y.parquet"]);
        let per: toml::Value =
            toml::from_str::<toml::Table>("v = [\"b/z.json\"]\nt = \"a/y.parquet\"")
                .unwrap()
                .into();
        let per = DataFilesSpec::from_toml(&per).unwrap();
        assert_eq!(
            select_split(&repo, None, None, Some("v"), Some(&per))
                .unwrap()
                .data_files,
            ["b/z.json"]
        );
        let none = DataFilesSpec::Any(vec!["c/*.parquet".into()]);
        let err = select_split(&repo, None, None, None, Some(&none))
            .unwrap_err()
            .to_string();
        assert!(err.contains("matches no file"), "{err}");
        let zips = DataFilesSpec::Any(vec!["README.md".into()]);
        let err = select_split(&repo, None, None, None, Some(&zips))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a supported data file"), "{err}");
    }

    #[test]
    fn card_configs_forms() {
        let card = "---\nconfigs:\n- config_name: a\n  data_dir: sub\n  data_files: '*.jsonl'\n- config_name: b\n  default: true\n  data_files:\n  - split: train\n    path: [x.json, y.json]\n---\n";
        let (name, map) = card_data_files(card, None).unwrap().unwrap();
        assert_eq!(name, "b");
        assert_eq!(map["train"], ["x.json", "y.json"]);
        let (_, map) = card_data_files(card, Some("a")).unwrap().unwrap();
        assert_eq!(map["train"], ["sub/*.jsonl"]);
        let err = card_data_files(card, Some("c")).unwrap_err().to_string();
        assert!(err.contains("`a`, `b`"), "{err}");
        assert_eq!(
            card_data_files("---\nlicense: mit\n---\n", None).unwrap(),
            None
        );
        assert_eq!(card_data_files("no header", None).unwrap(), None);
    }
}
