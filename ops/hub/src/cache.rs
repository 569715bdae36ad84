//! The Hub environment (as huggingface_hub reads it) and the standard cache layout, so files
//! that Python downloaded are reused and ours are reusable by Python:
//!
//! ```text
//! <HF_HUB_CACHE>/{models|datasets|spaces}--{org}--{name}/
//!     refs/<revision>            the commit sha the revision (branch, tag) resolved to
//!     blobs/<etag>               file contents (etag = sha256 for LFS files, git sha1 otherwise)
//!     snapshots/<sha>/<path>     relative symlinks into ../../blobs/<etag>
//! <HF_HUB_CACHE>/.locks/<repo folder>/<etag>.lock
//! ```
//!
//! hf-hub 0.5 reads only HF_HOME and HF_ENDPOINT, so the environment is resolved here
//! (huggingface_hub `constants.py` rules) and passed explicitly; tests build a [`HubEnv`]
//! directly instead of mutating the process environment.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A Hub repo's kind (huggingface_hub's `repo_type`), serialized by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoType {
    Model,
    Dataset,
    Space,
}

impl From<RepoType> for hf_hub::RepoType {
    fn from(kind: RepoType) -> Self {
        match kind {
            RepoType::Model => hf_hub::RepoType::Model,
            RepoType::Dataset => hf_hub::RepoType::Dataset,
            RepoType::Space => hf_hub::RepoType::Space,
        }
    }
}

/// The default endpoint (huggingface_hub `_HF_DEFAULT_ENDPOINT`).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to reach the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    /// The hub cache folder (`HF_HUB_CACHE`, default `$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT` without a trailing slash.
    pub endpoint: String,
    /// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, default `$HF_HOME/token`).
    pub token: Option<String>,
    /// Where the token came from, for error messages (never the value).
    pub token_source: Option<TokenSource>,
    /// `HF_HOME` (where `hf auth login` writes its token file).
    pub hf_home: PathBuf,
    /// A token file that exists but could not be read (the token then counts as unset; an
    /// upload, which needs the token, reports this instead).
    pub token_error: Option<String>,
    /// `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` is truthy: no network at all.
    pub offline: bool,
}

impl HubEnv {
    /// Resolves the environment through `var` (a lookup of variable names), exactly as
    /// huggingface_hub's `constants.py` does:
    /// - `HF_HOME` = `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`
    /// - cache = `HF_HUB_CACHE`, else legacy `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`
    /// - token = `HF_TOKEN`, else legacy `HUGGING_FACE_HUB_TOKEN`, else the file
    ///   `HF_TOKEN_PATH` (default `$HF_HOME/token`); blank values count as unset
    /// - offline = `HF_HUB_OFFLINE` or else `TRANSFORMERS_OFFLINE` in {1, ON, YES, TRUE}
    /// - endpoint = `HF_ENDPOINT` (default `https://huggingface.co`) without trailing `/`
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let nonempty = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home = home_from(&var);
        let hf_home = hf_home_from(&var);
        let cache_dir = nonempty("HF_HUB_CACHE")
            .or_else(|| nonempty("HUGGINGFACE_HUB_CACHE"))
            .map(|p| expand_home(&p, &home))
            .unwrap_or_else(|| hf_home.join("hub"));
        let (token, token_source, token_error) = match token_from(&var) {
            Ok(Some((t, source))) => (Some(t), Some(source), None),
            Ok(None) => (None, None, None),
            Err(e) => (None, None, Some(format!("{e:#}"))),
        };
        // Python: `_is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))`
        // — an empty HF_HUB_OFFLINE falls through to TRANSFORMERS_OFFLINE.
        let offline = var("HF_HUB_OFFLINE")
            .filter(|v| !v.is_empty())
            .or_else(|| var("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| is_true(&v));
        Self {
            cache_dir,
            endpoint: endpoint_from(&var),
            token,
            token_source,
            hf_home,
            token_error,
            offline,
        }
    }

    /// A cache-only environment (tests, and fixtures used with `HF_HUB_OFFLINE=1`).
    pub fn offline_at(cache_dir: impl Into<PathBuf>) -> Self {
        let cache_dir = cache_dir.into();
        Self {
            hf_home: cache_dir.clone(),
            cache_dir,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            token_source: None,
            token_error: None,
            offline: true,
        }
    }

    pub fn repo(&self, repo_id: &str, kind: RepoType) -> CachedRepo {
        CachedRepo::new(&self.cache_dir, repo_id, kind)
    }

    /// The repo's page, where its license is accepted.
    pub fn repo_page(&self, repo_id: &str, kind: RepoType) -> String {
        format!("{}/{}{repo_id}", self.endpoint, url_prefix(kind))
    }
}

/// Where a token came from, for messages (never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `HF_TOKEN`, or the legacy `HUGGING_FACE_HUB_TOKEN`.
    EnvVar(&'static str),
    File(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::EnvVar(name) => write!(f, "the {name} environment variable"),
            TokenSource::File(p) => write!(f, "the token file {}", p.display()),
        }
    }
}

/// `$HOME` (`/` when unset), for `~` in paths.
fn home_from(var: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    var("HOME")
        .filter(|v| !v.trim().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// `HF_HOME` as huggingface_hub resolves it: `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`,
/// else `~/.cache/huggingface` (blank values count as unset; `~` expanded).
pub fn hf_home_from(var: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let home = home_from(var);
    let nonempty = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    nonempty("HF_HOME")
        .map(|p| expand_home(&p, &home))
        .unwrap_or_else(|| {
            nonempty("XDG_CACHE_HOME")
                .map(|p| expand_home(&p, &home))
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        })
}

/// `HF_ENDPOINT` (default `https://huggingface.co`), trimmed, without a trailing `/`.
pub fn endpoint_from(var: &dyn Fn(&str) -> Option<String>) -> String {
    var("HF_ENDPOINT")
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

/// The token as huggingface_hub finds it: `HF_TOKEN`, else the legacy `HUGGING_FACE_HUB_TOKEN`,
/// else the file at `HF_TOKEN_PATH` (default `$HF_HOME/token`), whitespace stripped; `None`
/// when none holds one, an error when the file exists but cannot be read.
pub fn token_from(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<(String, TokenSource)>> {
    for name in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Some(t) = var(name).filter(|v| !v.trim().is_empty()) {
            return Ok(Some((t.trim().to_string(), TokenSource::EnvVar(name))));
        }
    }
    let home = home_from(var);
    let path = var("HF_TOKEN_PATH")
        .filter(|v| !v.trim().is_empty())
        .map(|p| expand_home(&p, &home))
        .unwrap_or_else(|| hf_home_from(var).join("token"));
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some((t.trim().to_string(), TokenSource::File(path)))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the Hub token file {}", path.display())),
    }
}

/// huggingface_hub's `_is_true`.
pub fn is_true(value: &str) -> bool {
    matches!(
        value.to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

fn expand_home(path: &str, home: &Path) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None if path == "~" => home.to_path_buf(),
        None => PathBuf::from(path),
    }
}

/// `model`, `dataset` or `space`: huggingface_hub's `repo_type` names.
pub fn kind_singular(kind: RepoType) -> &'static str {
    match kind {
        RepoType::Model => "model",
        RepoType::Dataset => "dataset",
        RepoType::Space => "space",
    }
}

/// A `repo_type` name ([`kind_singular`]) back to its kind.
pub fn parse_repo_type(s: &str) -> Result<RepoType> {
    match s {
        "model" => Ok(RepoType::Model),
        "dataset" => Ok(RepoType::Dataset),
        "space" => Ok(RepoType::Space),
        _ => bail!("repo_type must be \"model\", \"dataset\" or \"space\", not {s:?}"),
    }
}

/// `datasets/`, `spaces/` or nothing: the URL prefix of a repo kind.
pub fn url_prefix(kind: RepoType) -> &'static str {
    match kind {
        RepoType::Model => "",
        RepoType::Dataset => "datasets/",
        RepoType::Space => "spaces/",
    }
}

/// `models`, `datasets` or `spaces`, as in API paths and cache folder names.
pub fn kind_plural(kind: RepoType) -> &'static str {
    match kind {
        RepoType::Model => "models",
        RepoType::Dataset => "datasets",
        RepoType::Space => "spaces",
    }
}

/// A full commit sha (what `snapshots/` is keyed by).
pub fn is_commit_sha(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks `org/name` (or `name`) before it becomes a path component.
pub fn validate_repo_id(repo_id: &str) -> Result<()> {
    let ok = !repo_id.is_empty()
        && repo_id.split('/').count() <= 2
        && repo_id.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if !ok {
        bail!("invalid repo id `{repo_id}`: expected `org/name` (letters, digits, `-`, `_`, `.`)");
    }
    Ok(())
}

/// Checks a repo-relative file path before it is joined under a snapshot folder.
pub fn validate_repo_path(path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        bail!("invalid file path `{path}` in repo listing");
    }
    Ok(())
}

/// One repo's folder in the hub cache.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    pub repo_id: String,
    pub kind: RepoType,
    /// `<cache>/<kind>s--org--name`.
    pub dir: PathBuf,
    cache_dir: PathBuf,
}

impl CachedRepo {
    pub fn new(cache_dir: &Path, repo_id: &str, kind: RepoType) -> Self {
        let folder = hf_hub::Repo::new(repo_id.to_string(), kind.into()).folder_name();
        Self {
            repo_id: repo_id.to_string(),
            kind,
            dir: cache_dir.join(folder),
            cache_dir: cache_dir.to_path_buf(),
        }
    }

    pub fn folder_name(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    pub fn ref_path(&self, revision: &str) -> PathBuf {
        self.dir.join("refs").join(revision)
    }

    pub fn snapshot_dir(&self, sha: &str) -> PathBuf {
        self.dir.join("snapshots").join(sha)
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// huggingface_hub's lock file for a blob: `<cache>/.locks/<repo folder>/<etag>.lock`.
    pub fn lock_path(&self, etag: &str) -> PathBuf {
        self.cache_dir
            .join(".locks")
            .join(self.folder_name())
            .join(format!("{etag}.lock"))
    }

    /// The commit a revision resolves to from the cache alone: `refs/<revision>`, or the
    /// revision itself when it is a sha with a snapshot folder.
    pub fn cached_commit(&self, revision: &str) -> Result<Option<String>> {
        let ref_path = self.ref_path(revision);
        match std::fs::read_to_string(&ref_path) {
            Ok(sha) => {
                let sha = sha.trim().to_string();
                if !is_commit_sha(&sha) {
                    bail!(
                        "corrupt cache ref {}: `{sha}` is not a commit sha",
                        ref_path.display()
                    );
                }
                Ok(Some(sha))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if is_commit_sha(revision) && self.snapshot_dir(revision).is_dir() {
                    Ok(Some(revision.to_string()))
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", ref_path.display())),
        }
    }

    /// Records `refs/<revision>` = sha (not for shas themselves, as huggingface_hub does),
    /// written to a temporary file and renamed so a reader never sees half a sha.
    pub fn write_ref(&self, revision: &str, sha: &str) -> Result<()> {
        if revision == sha {
            return Ok(());
        }
        let path = self.ref_path(revision);
        let parent = path.parent().unwrap();
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        op_api::atomic_file::write(&path, sha.as_bytes())
    }

    /// Every file of a snapshot, relative, sorted (symlinks followed; dangling links, whose
    /// blob is gone, are left out since they cannot be read).
    pub fn snapshot_files(&self, sha: &str) -> Result<Vec<String>> {
        let root = self.snapshot_dir(sha);
        let mut out = Vec::new();
        walk_files(&root, &root, &mut out)
            .with_context(|| format!("listing cached snapshot {}", root.display()))?;
        out.sort();
        Ok(out)
    }

    /// Points `snapshots/<sha>/<file>` at `blobs/<etag>` with a relative symlink, replacing
    /// whatever was there.
    pub fn link_blob(&self, sha: &str, file: &str, etag: &str) -> Result<PathBuf> {
        validate_repo_path(file)?;
        let pointer = self.snapshot_dir(sha).join(file);
        let parent = pointer.parent().unwrap();
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        // snapshots/<sha>/<a>/<b>/file -> ../../../../blobs/<etag>: one `..` per component
        // of `<sha>/<file>` below the repo folder, minus the file name itself.
        let depth = 1 + file.split('/').count();
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let tmp = parent.join(format!(
            ".{}.link-{}",
            file.rsplit('/').next().unwrap(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        symlink(&target, &tmp).with_context(|| format!("linking {}", pointer.display()))?;
        std::fs::rename(&tmp, &pointer)
            .with_context(|| format!("linking {}", pointer.display()))?;
        Ok(pointer)
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

/// Where symlinks are unavailable, huggingface_hub copies; a hard copy keeps the layout valid.
#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    let source = link.parent().unwrap().join(target);
    std::fs::copy(source, link).map(|_| ())
}

fn walk_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        // `metadata` follows symlinks: a snapshot entry is a link to a blob file.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk_files(root, &path, out)?,
            Ok(meta) if meta.is_file() => {
                let rel = path.strip_prefix(root).unwrap();
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> HubEnv {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_defaults_and_overrides() {
        let e = env(&[("HOME", "/home/u")]);
        assert_eq!(e.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(e.endpoint, "https://huggingface.co");
        assert!(!e.offline);
        assert_eq!(e.token, None);

        let e = env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(e.cache_dir, PathBuf::from("/x/huggingface/hub"));
        let e = env(&[("HOME", "/home/u"), ("HF_HOME", "~/hf")]);
        assert_eq!(e.cache_dir, PathBuf::from("/home/u/hf/hub"));
        let e = env(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c")]);
        assert_eq!(e.cache_dir, PathBuf::from("/c"));
        let e = env(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")]);
        assert_eq!(e.cache_dir, PathBuf::from("/legacy"));

        for (v, off) in [
            ("1", true),
            ("yes", true),
            ("On", true),
            ("TRUE", true),
            ("0", false),
            ("no", false),
        ] {
            assert_eq!(env(&[("HF_HUB_OFFLINE", v)]).offline, off, "{v}");
        }
        assert!(env(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
        assert!(!env(&[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")]).offline);
        assert_eq!(
            env(&[("HF_ENDPOINT", "http://127.0.0.1:9/")]).endpoint,
            "http://127.0.0.1:9"
        );
    }

    #[test]
    fn token_from_variable_then_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        assert_eq!(env(&[("HF_HOME", home)]).token, None);
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let e = env(&[("HF_HOME", home)]);
        assert_eq!(e.token.as_deref(), Some("hf_file"));
        assert_eq!(
            e.token_source,
            Some(TokenSource::File(dir.path().join("token")))
        );
        // A token file that exists but cannot be read is no token, and says why (an upload
        // reports it rather than "no token").
        let unreadable = env(&[("HF_HOME", home), ("HF_TOKEN_PATH", home)]);
        assert_eq!(unreadable.token, None);
        let why = unreadable.token_error.expect("the error is kept");
        assert!(
            why.contains("reading the Hub token file") && why.contains(home),
            "{why}"
        );
        assert_eq!(
            env(&[("HF_HOME", home), ("HF_TOKEN", "hf_var")])
                .token
                .as_deref(),
            Some("hf_var")
        );
        std::fs::write(dir.path().join("other"), "hf_other").unwrap();
        let other = dir.path().join("other");
        let e = env(&[
            ("HF_HOME", home),
            ("HF_TOKEN_PATH", other.to_str().unwrap()),
        ]);
        assert_eq!(e.token.as_deref(), Some("hf_other"));
        assert_eq!(
            env(&[("HF_HOME", home), ("HF_TOKEN", "  ")])
                .token
                .as_deref(),
            Some("hf_file")
        );
    }

    #[test]
    fn cache_layout_refs_snapshots_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let repo = CachedRepo::new(dir.path(), "org/name", RepoType::Dataset);
        assert_eq!(repo.dir, dir.path().join("datasets--org--name"));
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(repo.cached_commit("main").unwrap(), None);
        repo.write_ref("main", sha).unwrap();
        repo.write_ref("refs/pr/1", sha).unwrap();
        assert_eq!(repo.cached_commit("main").unwrap().as_deref(), Some(sha));
        assert_eq!(
            repo.cached_commit("refs/pr/1").unwrap().as_deref(),
            Some(sha)
        );
        assert_eq!(
            repo.cached_commit(sha).unwrap(),
            None,
            "no snapshot folder yet"
        );

        std::fs::create_dir_all(repo.blob_path("e").parent().unwrap()).unwrap();
        std::fs::write(repo.blob_path("e"), b"parquet bytes").unwrap();
        let pointer = repo.link_blob(sha, "data/train-0.parquet", "e").unwrap();
        assert_eq!(std::fs::read(&pointer).unwrap(), b"parquet bytes");
        assert_eq!(
            std::fs::read_link(&pointer).unwrap(),
            PathBuf::from("../../../blobs/e"),
            "relative link as huggingface_hub makes it"
        );
        repo.link_blob(sha, "README.md", "e").unwrap();
        // A dangling link (blob deleted) is not listed.
        std::os::unix::fs::symlink("../../blobs/gone", repo.snapshot_dir(sha).join("gone.txt"))
            .unwrap();
        assert_eq!(
            repo.snapshot_files(sha).unwrap(),
            ["README.md", "data/train-0.parquet"]
        );
        assert_eq!(repo.cached_commit(sha).unwrap().as_deref(), Some(sha));

        std::fs::write(repo.ref_path("bad"), "not a sha").unwrap();
        assert!(repo
            .cached_commit("bad")
            .unwrap_err()
            .to_string()
            .contains("corrupt cache ref"));
    }

    #[test]
    fn rejects_paths_that_escape() {
        assert!(validate_repo_id("org/name").is_ok());
        assert!(validate_repo_id("gpt2").is_ok());
        for bad in ["", "../x", "a/b/c", "a//b", "a/..", "a b/c"] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        assert!(validate_repo_path("data/x.parquet").is_ok());
        for bad in ["", "/etc/passwd", "a/../../b", "a//b", "./a"] {
            assert!(validate_repo_path(bad).is_err(), "{bad}");
        }
    }
}
