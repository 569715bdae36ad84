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
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

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

/// An HTTP failure, with what the user should check.
fn status_error(
    status: u16,
    what: &str,
    server_message: &str,
    ctx: &CommitRequest,
) -> anyhow::Error {
    let server = if server_message.is_empty() {
        String::new()
    } else {
        format!(" (the Hub says: {server_message})")
    };
    let hint = match status {
        401 => "the token was rejected: check that HF_TOKEN (or the token file under HF_HOME) holds a valid, unexpired Hub token".to_string(),
        403 => format!(
            "the token may not write to `{}`: check that it is a write token (a fine-grained token needs write access to this repo or its namespace) and that you may create repos in that namespace",
            ctx.repo_id
        ),
        404 => format!(
            "not found: check repo_id `{}`, repo_type and revision `{}` (with create_repo = false the repo must exist; the branch must exist)",
            ctx.repo_id, ctx.revision
        ),
        _ => "the Hub returned an error".to_string(),
    };
    anyhow::anyhow!("{what} failed with HTTP {status}{server}: {hint}")
}

/// The Hub's error text: the `X-Error-Message` header, or the body's `error` field, or the body.
fn server_message(headers: &ureq::http::HeaderMap, body: &str) -> String {
    if let Some(m) = headers.get("x-error-message").and_then(|v| v.to_str().ok()) {
        return m.to_string();
    }
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            return e.to_string();
        }
    }
    body.chars().take(300).collect()
}

struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self, what: &str) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("{what}: the Hub's reply is not JSON"))
    }
}

enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A byte range of a local file, sent with its length.
    FileRange {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
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

    fn say(&self, line: &str) {
        (self.log)(&self.token.redact(line));
    }

    /// `fix_hf_endpoint_in_url`: URLs the Hub returns name the public Hub; behind a proxy
    /// endpoint they must go to the proxy.
    fn fix_url(&self, url: &str) -> String {
        if self.endpoint == DEFAULT_ENDPOINT || self.endpoint == "https://hub-ci.huggingface.co" {
            url.to_string()
        } else {
            url.replace(DEFAULT_ENDPOINT, &self.endpoint)
        }
    }

    /// One request with retries. `auth` adds the token (Hub endpoints only).
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        auth: bool,
        body: Body,
    ) -> anyhow::Result<Reply> {
        let mut attempt = 0u32;
        let mut wait = self.retry.base_wait;
        loop {
            let result = self.send_once(method, url, headers, auth, &body);
            let retry_reason = match &result {
                Ok(r) if [408, 429, 500, 502, 503, 504].contains(&r.status) => {
                    Some(format!("HTTP {}", r.status))
                }
                Ok(_) => None,
                Err(e) if is_transient(e) => Some(format!("{e}")),
                Err(_) => None,
            };
            match retry_reason {
                Some(reason) if attempt < self.retry.max_retries => {
                    attempt += 1;
                    self.say(&format!(
                        "{method} {url}: {reason}; retry {attempt}/{} in {:.1}s",
                        self.retry.max_retries,
                        wait.as_secs_f64()
                    ));
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(self.retry.max_wait);
                }
                _ => {
                    return result.map_err(|e| {
                        anyhow::anyhow!("{method} {url}: {}", self.token.redact(&e.to_string()))
                    })
                }
            }
        }
    }

    fn send_once(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        auth: bool,
        body: &Body,
    ) -> Result<Reply, ureq::Error> {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(url)
            .header("user-agent", &self.user_agent);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if auth {
            req = req.header("authorization", self.token.bearer());
        }
        let mut resp = match body {
            Body::Empty => self.agent.run(
                req.body(())
                    .map_err(|e| ureq::Error::BadUri(e.to_string()))?,
            )?,
            Body::Bytes(b) => self.agent.run(
                req.body(b.to_vec())
                    .map_err(|e| ureq::Error::BadUri(e.to_string()))?,
            )?,
            Body::FileRange { path, offset, len } => {
                let mut f = File::open(path)?;
                if *offset == 0 && f.metadata()?.len() == *len {
                    // A whole file streams from disk; ureq sends its length.
                    self.agent.run(
                        req.body(f)
                            .map_err(|e| ureq::Error::BadUri(e.to_string()))?,
                    )?
                } else {
                    // One multipart chunk: the Hub's chunk sizes fit in memory.
                    f.seek(SeekFrom::Start(*offset))?;
                    let mut chunk = Vec::with_capacity(*len as usize);
                    f.take(*len).read_to_end(&mut chunk)?;
                    self.agent.run(
                        req.body(chunk)
                            .map_err(|e| ureq::Error::BadUri(e.to_string()))?,
                    )?
                }
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Checks a reply's status; errors say what to check and never carry the token.
    fn expect_ok(&self, reply: &Reply, what: &str, ctx: &CommitRequest) -> anyhow::Result<()> {
        if (200..300).contains(&reply.status) {
            return Ok(());
        }
        Err(self.failure(reply, what, ctx))
    }

    fn failure(&self, reply: &Reply, what: &str, ctx: &CommitRequest) -> anyhow::Error {
        let msg = self
            .token
            .redact(&server_message(&reply.headers, &reply.text()));
        status_error(reply.status, what, &msg, ctx)
    }

    fn json_post(
        &self,
        url: &str,
        payload: &Value,
        auth: bool,
        lfs: bool,
    ) -> anyhow::Result<Reply> {
        let body = serde_json::to_vec(payload)?;
        let ct = if lfs {
            LFS_CONTENT_TYPE
        } else {
            "application/json"
        };
        let mut headers = vec![("content-type", ct)];
        if lfs {
            headers.push(("accept", LFS_CONTENT_TYPE));
        }
        self.send("POST", url, &headers, auth, Body::Bytes(&body))
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

    /// One LFS batch request and the uploads it asks for; returns the number of objects sent.
    fn upload_lfs_batch(&self, files: &[&LocalFile], req: &CommitRequest) -> anyhow::Result<usize> {
        let url = format!(
            "{}/{}{}.git/info/lfs/objects/batch",
            self.endpoint,
            url_prefix(req.repo_type),
            req.repo_id
        );
        let payload = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": req.revision},
        });
        let reply = self.json_post(&url, &payload, true, true)?;
        self.expect_ok(&reply, "LFS batch", req)?;
        let v = reply.json("LFS batch")?;
        let objects = v["objects"]
            .as_array()
            .context("LFS batch: malformed reply (no `objects` list)")?;
        let mut sent = 0;
        for obj in objects {
            let oid = obj["oid"]
                .as_str()
                .context("LFS batch: an object has no oid")?;
            let file = files.iter().find(|f| f.sha256 == oid).with_context(|| {
                format!("LFS batch: the Hub answered for an object we did not send ({oid})")
            })?;
            if let Some(err) = obj.get("error") {
                bail!(
                    "LFS batch: the Hub refused `{}` (code {}): {}",
                    file.path_in_repo,
                    err["code"],
                    self.token.redact(err["message"].as_str().unwrap_or(""))
                );
            }
            let Some(actions) = obj.get("actions").filter(|a| !a.is_null()) else {
                continue; // already on the Hub
            };
            self.lfs_upload(file, actions, req)
                .with_context(|| format!("uploading `{}` to the Hub", file.path_in_repo))?;
            sent += 1;
        }
        Ok(sent)
    }

    fn lfs_upload(
        &self,
        file: &LocalFile,
        actions: &Value,
        req: &CommitRequest,
    ) -> anyhow::Result<()> {
        let upload = &actions["upload"];
        let href = self.fix_url(
            upload["href"]
                .as_str()
                .context("LFS batch: upload action without href")?,
        );
        let header = upload.get("header").cloned().unwrap_or(Value::Null);
        let chunk_size = header.get("chunk_size").map(|c| match c {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        });
        match chunk_size {
            Some(None) => bail!("LFS batch: malformed chunk_size {}", header["chunk_size"]),
            Some(Some(chunk)) => self.upload_multipart(file, &header, chunk, &href, req)?,
            None => {
                // Basic transfer: the presigned URL needs no token.
                self.say(&format!(
                    "uploading {} ({} bytes)",
                    file.path_in_repo, file.size
                ));
                let reply = self.send(
                    "PUT",
                    &href,
                    &[],
                    false,
                    Body::FileRange {
                        path: &file.local,
                        offset: 0,
                        len: file.size,
                    },
                )?;
                self.expect_ok(&reply, "LFS upload", req)?;
            }
        }
        if let Some(verify) = actions.get("verify").filter(|v| !v.is_null()) {
            let href = self.fix_url(
                verify["href"]
                    .as_str()
                    .context("LFS batch: verify action without href")?,
            );
            let reply = self.json_post(
                &href,
                &json!({"oid": file.sha256, "size": file.size}),
                true,
                false,
            )?;
            self.expect_ok(&reply, "LFS verify", req)?;
        }
        Ok(())
    }

    fn upload_multipart(
        &self,
        file: &LocalFile,
        header: &Value,
        chunk: u64,
        href: &str,
        req: &CommitRequest,
    ) -> anyhow::Result<()> {
        if chunk == 0 {
            bail!("LFS batch: chunk_size 0");
        }
        let mut parts: Vec<(u64, String)> = header
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            .map(|(k, v)| {
                Ok((
                    k.parse::<u64>()?,
                    v.as_str().context("part URL is not a string")?.to_string(),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        parts.sort_by_key(|p| p.0);
        let expected = file.size.div_ceil(chunk);
        if parts.len() as u64 != expected {
            bail!(
                "LFS batch: {} part URLs for {} bytes in chunks of {chunk} (expected {expected})",
                parts.len(),
                file.size
            );
        }
        self.say(&format!(
            "uploading {} ({} bytes, {} parts)",
            file.path_in_repo,
            file.size,
            parts.len()
        ));
        let mut etags = Vec::with_capacity(parts.len());
        for (i, (_, url)) in parts.iter().enumerate() {
            let offset = i as u64 * chunk;
            let len = chunk.min(file.size - offset);
            let reply = self.send(
                "PUT",
                &self.fix_url(url),
                &[],
                false,
                Body::FileRange {
                    path: &file.local,
                    offset,
                    len,
                },
            )?;
            self.expect_ok(&reply, &format!("LFS upload of part {}", i + 1), req)?;
            let etag = reply
                .headers
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .filter(|e| !e.is_empty())
                .with_context(|| format!("LFS upload: no etag returned for part {}", i + 1))?;
            etags.push(json!({"partNumber": i + 1, "etag": etag}));
        }
        let reply = self.json_post(
            href,
            &json!({"oid": file.sha256, "parts": etags}),
            false,
            true,
        )?;
        self.expect_ok(&reply, "LFS multipart completion", req)
    }
}

/// Dropped connections, timeouts and refused connections are retried (huggingface_hub retries
/// httpx's TimeoutException, NetworkError and RemoteProtocolError).
fn is_transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed
    )
}

#[cfg(test)]
mod tests;
