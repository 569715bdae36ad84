//! Uploading a folder to the Hugging Face Hub in one commit, over the same HTTP API and in the
//! same order as huggingface_hub's `create_repo` + `upload_folder` on its legacy LFS path
//! (`hf_api.py`, `_commit_api.py`, `lfs.py`):
//!
//! 1. `POST {endpoint}/api/repos/create` (409 = it exists already);
//! 2. `POST {endpoint}/api/{type}s/{repo}/preupload/{revision}`: which files go through LFS, which
//!    are ignored, and the remote oid of each (unchanged files are left out of the commit);
//! 3. `POST {endpoint}/{prefix}{repo}.git/info/lfs/objects/batch`, then for each object the
//!    server wants: one `PUT` of the bytes (basic), or one `PUT` per part and a completion `POST`
//!    (multipart, when the action carries `chunk_size`), then the optional verify `POST`;
//! 4. `POST {endpoint}/api/{type}s/{repo}/commit/{revision}` with an NDJSON body: a `header`
//!    line, a `file` line (base64 content) per regular file, an `lfsFile` line per LFS file.
//!
//! Requests are retried with exponential backoff on 408/429/5xx and on dropped connections, as
//! huggingface_hub's `http_backoff`. The token is sent only to the Hub's own endpoints (never to
//! the presigned storage URLs) and never appears in errors or logs: every message this module
//! produces goes through [`Token::redact`].

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;

use http::Body;

/// The Hub's default endpoint (huggingface_hub `_HF_DEFAULT_ENDPOINT`).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Files per preupload / LFS batch request (huggingface_hub uses chunks of 256).
const BATCH: usize = 256;
/// Bytes of each file sent to preupload as its `sample`.
const SAMPLE_LEN: usize = 512;
const LFS_CONTENT_TYPE: &str = "application/vnd.git-lfs+json";

/// A Hub access token. It has no `Display`, and its `Debug` hides the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// `text` with every occurrence of the token replaced.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "<token>")
        }
    }
}

pub use super::cache::TokenSource;

/// Reads one environment variable (injectable, so tests need not touch the process environment).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub use super::cache::{kind_plural, parse_repo_type, url_prefix, RepoType};

/// How requests are retried (huggingface_hub `http_backoff`: 5 retries, waits 1, 2, 4, 8, 8 s).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base_wait: Duration,
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            base_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(8),
        }
    }
}

/// Python's `urllib.parse.quote(s, safe="")`: everything but unreserved characters escaped.
pub fn quote_all(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What to upload and where.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    pub repo_id: String,
    pub repo_type: RepoType,
    /// Branch to commit to (`main` by default).
    pub revision: String,
    pub commit_message: String,
    pub commit_description: String,
    /// Create the repo when it does not exist.
    pub create_repo: bool,
    /// Visibility for a newly created repo: `None` leaves the namespace's default.
    pub private: Option<bool>,
}

/// The outcome of [`HubClient::upload_folder`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitReceipt {
    pub endpoint: String,
    pub repo_id: String,
    pub repo_type: RepoType,
    pub revision: String,
    /// `None` when nothing changed and no commit was made.
    pub commit_oid: Option<String>,
    pub commit_url: Option<String>,
    /// Whether this upload created the repo.
    pub created_repo: bool,
    /// Paths committed as LFS files / as regular files; paths left out (unchanged or ignored).
    pub lfs_files: Vec<String>,
    pub regular_files: Vec<String>,
    pub unchanged_files: Vec<String>,
    /// LFS objects whose bytes were sent (the others were already on the Hub).
    pub uploaded_objects: usize,
}

/// One local file to commit.
#[derive(Debug, Clone)]
struct LocalFile {
    path_in_repo: String,
    local: PathBuf,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

impl LocalFile {
    fn open(local: &Path, path_in_repo: String) -> anyhow::Result<Self> {
        let mut f = File::open(local).with_context(|| format!("opening {}", local.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut sample = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", local.display()))?;
            if n == 0 {
                break;
            }
            if sample.len() < SAMPLE_LEN {
                let take = (SAMPLE_LEN - sample.len()).min(n);
                sample.extend_from_slice(&buf[..take]);
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(Self {
            path_in_repo,
            local: local.to_path_buf(),
            size,
            sha256: hex::encode(hasher.finalize()),
            sample,
        })
    }

    fn read_all(&self) -> anyhow::Result<Vec<u8>> {
        std::fs::read(&self.local).with_context(|| format!("reading {}", self.local.display()))
    }

    /// git's blob id, the oid the Hub reports for a regular file (`sha.git_hash`).
    fn git_sha1(&self) -> anyhow::Result<String> {
        let content = self.read_all()?;
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", content.len()).as_bytes());
        h.update(&content);
        Ok(hex::encode(h.finalize()))
    }
}

/// Every file under `folder` with its repo path (`/`-separated), sorted; `.git/` and
/// `.cache/huggingface/` are skipped as huggingface_hub's `upload_folder` does.
pub fn list_folder(folder: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(PathBuf, String)>) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel_path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if rel_path == ".git" || rel_path == ".cache/huggingface" {
                continue;
            }
            let path = e.path();
            let meta =
                std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                walk(&path, &rel_path, out)?;
            } else {
                out.push((path, rel_path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(folder, "", &mut out)?;
    Ok(out)
}

/// A client for the Hub's write API.
pub struct HubClient {
    endpoint: String,
    token: Token,
    agent: ureq::Agent,
    retry: RetryPolicy,
    user_agent: String,
    /// Called with one line per step (never containing the token).
    log: Box<dyn Fn(&str) + Send + Sync>,
}

impl HubClient {
    pub fn new(endpoint: &str, token: Token) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Self::with_agent(endpoint, token, agent)
    }

    fn with_agent(endpoint: &str, token: Token, agent: ureq::Agent) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent,
            retry: RetryPolicy::default(),
            user_agent: format!("runner/{}", env!("CARGO_PKG_VERSION")),
            log: Box::new(|_| {}),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn with_log(mut self, log: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.log = Box::new(log);
        self
    }

    /// Creates the repo; `Ok(false)` when it already exists.
    pub fn create_repo(&self, req: &CommitRequest) -> anyhow::Result<bool> {
        let (organization, name) = match req.repo_id.split_once('/') {
            Some((o, n)) => (Some(o), n),
            None => (None, req.repo_id.as_str()),
        };
        let mut payload = json!({ "name": name, "organization": organization });
        if let Some(private) = req.private {
            payload["visibility"] = json!(if private { "private" } else { "public" });
        }
        if req.repo_type != RepoType::Model {
            payload["type"] = json!(match req.repo_type {
                RepoType::Dataset => "dataset",
                _ => "space",
            });
        }
        let reply = self.json_post(
            &format!("{}/api/repos/create", self.endpoint),
            &payload,
            true,
            false,
        )?;
        match reply.status {
            200..=299 => {
                self.say(&format!(
                    "created {} {}",
                    kind_plural(req.repo_type).trim_end_matches('s'),
                    req.repo_id
                ));
                Ok(true)
            }
            409 => Ok(false),
            // A token may lack the right to create while the repo exists (huggingface_hub then
            // checks the repo): go on if the repo is visible, else report the creation error.
            401..=403 if self.repo_exists(req)? => Ok(false),
            _ => Err(self.failure(&reply, &format!("creating repo `{}`", req.repo_id), req)),
        }
    }

    fn repo_exists(&self, req: &CommitRequest) -> anyhow::Result<bool> {
        let url = format!(
            "{}/api/{}/{}",
            self.endpoint,
            kind_plural(req.repo_type),
            req.repo_id
        );
        Ok((200..300).contains(&self.send("GET", &url, &[], true, Body::Empty)?.status))
    }

    /// Uploads every file under `folder` (see [`list_folder`]) in one commit.
    pub fn upload_folder(
        &self,
        folder: &Path,
        req: &CommitRequest,
    ) -> anyhow::Result<CommitReceipt> {
        self.upload_paths(&list_folder(folder)?, req)
    }

    /// Uploads the given files (local path, path in the repo) in one commit.
    pub fn upload_paths(
        &self,
        paths: &[(PathBuf, String)],
        req: &CommitRequest,
    ) -> anyhow::Result<CommitReceipt> {
        if paths.is_empty() {
            bail!("there are no files to upload");
        }
        let files = paths
            .iter()
            .map(|(p, rel)| LocalFile::open(p, rel.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.upload_files(&files, req)
    }

    fn upload_files(
        &self,
        files: &[LocalFile],
        req: &CommitRequest,
    ) -> anyhow::Result<CommitReceipt> {
        let created_repo = if req.create_repo {
            self.create_repo(req)?
        } else {
            false
        };
        let revision_q = quote_all(&req.revision);
        let api = format!(
            "{}/api/{}/{}",
            self.endpoint,
            kind_plural(req.repo_type),
            req.repo_id
        );

        // 2. preupload: upload mode, ignore flag and remote oid of each file.
        let mut modes: Vec<(String, bool, Option<String>)> = Vec::with_capacity(files.len());
        for chunk in files.chunks(BATCH) {
            let payload = json!({
                "files": chunk.iter().map(|f| json!({
                    "path": f.path_in_repo,
                    "sample": base64::engine::general_purpose::STANDARD.encode(&f.sample),
                    "size": f.size,
                })).collect::<Vec<_>>()
            });
            let reply = self.json_post(
                &format!("{api}/preupload/{revision_q}"),
                &payload,
                true,
                false,
            )?;
            self.expect_ok(&reply, "preupload", req)?;
            let v = reply.json("preupload")?;
            let answered = v["files"]
                .as_array()
                .context("preupload: the Hub's reply has no `files` list")?;
            for f in chunk {
                let info = answered
                    .iter()
                    .find(|a| a["path"].as_str() == Some(f.path_in_repo.as_str()))
                    .with_context(|| {
                        format!("preupload: the Hub did not answer for `{}`", f.path_in_repo)
                    })?;
                let mode = info["uploadMode"]
                    .as_str()
                    .context("preupload: missing uploadMode")?;
                // Empty files cannot go through LFS (huggingface_hub forces them regular).
                let lfs = mode == "lfs" && f.size > 0;
                if mode != "lfs" && mode != "regular" {
                    bail!("preupload: `{}` has upload mode {mode:?}; only \"lfs\" and \"regular\" are supported", f.path_in_repo);
                }
                let ignore = info["shouldIgnore"].as_bool().unwrap_or(false);
                let remote_oid = info["oid"].as_str().map(str::to_string);
                modes.push((
                    if ignore {
                        "ignore".into()
                    } else if lfs {
                        "lfs".into()
                    } else {
                        "regular".into()
                    },
                    lfs,
                    remote_oid,
                ));
            }
        }

        let mut receipt = CommitReceipt {
            endpoint: self.endpoint.clone(),
            repo_id: req.repo_id.clone(),
            repo_type: req.repo_type,
            revision: req.revision.clone(),
            commit_oid: None,
            commit_url: None,
            created_repo,
            lfs_files: vec![],
            regular_files: vec![],
            unchanged_files: vec![],
            uploaded_objects: 0,
        };
        let mut to_commit: Vec<(&LocalFile, bool)> = Vec::new();
        for (f, (mode, lfs, remote_oid)) in files.iter().zip(&modes) {
            if mode == "ignore" {
                receipt.unchanged_files.push(f.path_in_repo.clone());
                continue;
            }
            if let Some(remote) = remote_oid {
                let local = if *lfs {
                    f.sha256.clone()
                } else {
                    f.git_sha1()?
                };
                if *remote == local {
                    receipt.unchanged_files.push(f.path_in_repo.clone());
                    continue;
                }
            }
            to_commit.push((f, *lfs));
        }
        if to_commit.is_empty() {
            self.say("no file changed since the last commit: nothing to commit");
            return Ok(receipt);
        }

        // 3. LFS: batch, then upload what the Hub asks for.
        let lfs_files: Vec<&LocalFile> = to_commit
            .iter()
            .filter(|(_, lfs)| *lfs)
            .map(|(f, _)| *f)
            .collect();
        for chunk in lfs_files.chunks(BATCH) {
            receipt.uploaded_objects += self.upload_lfs_batch(chunk, req)?;
        }

        // 4. The commit.
        let mut ndjson = Vec::new();
        let header = json!({"key": "header", "value": {"summary": req.commit_message, "description": req.commit_description}});
        ndjson.extend_from_slice(serde_json::to_string(&header)?.as_bytes());
        ndjson.push(b'\n');
        for (f, lfs) in &to_commit {
            let line = if *lfs {
                receipt.lfs_files.push(f.path_in_repo.clone());
                json!({"key": "lfsFile", "value": {"path": f.path_in_repo, "algo": "sha256", "oid": f.sha256, "size": f.size}})
            } else {
                receipt.regular_files.push(f.path_in_repo.clone());
                json!({"key": "file", "value": {
                    "content": base64::engine::general_purpose::STANDARD.encode(f.read_all()?),
                    "path": f.path_in_repo,
                    "encoding": "base64",
                }})
            };
            ndjson.extend_from_slice(serde_json::to_string(&line)?.as_bytes());
            ndjson.push(b'\n');
        }
        let reply = self.send(
            "POST",
            &format!("{api}/commit/{revision_q}"),
            &[("content-type", "application/x-ndjson")],
            true,
            Body::Bytes(&ndjson),
        )?;
        self.expect_ok(&reply, "commit", req)?;
        let v = reply.json("commit")?;
        receipt.commit_oid = v["commitOid"].as_str().map(str::to_string);
        receipt.commit_url = v["commitUrl"].as_str().map(str::to_string);
        self.say(&format!(
            "committed {} file(s) to {} ({}){}",
            to_commit.len(),
            req.repo_id,
            req.revision,
            receipt
                .commit_url
                .as_deref()
                .map(|u| format!(": {u}"))
                .unwrap_or_default()
        ));
        Ok(receipt)
    }
}

mod http;
mod lfs;
#[cfg(test)]
mod tests;
