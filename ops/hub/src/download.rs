//! Resolving and downloading Hub repos into the standard cache (see `cache.rs`).
//!
//! A revision is resolved once to a commit sha (offline: `refs/<revision>`; online: one call to
//! `GET /api/{kind}s/{id}/revision/{rev}?blobs=true`, which also lists every file with its
//! size and blob id), then every file is read from `snapshots/<sha>/` or downloaded from
//! `{endpoint}/{prefix}{id}/resolve/{sha}/{path}`.
//!
//! Why not hf-hub's `ApiRepo::download`: in 0.5 its metadata request is never retried, its
//! HTTP agent has no timeouts, a resumed range is appended without checking that the server
//! honoured it, and the finished file's size is not checked. The transfer here uses ureq
//! directly: retries with backoff on network errors, 5xx and 429; resumes with `Range` only
//! on a 206; checks size and (for LFS files) sha256 before renaming `<blob>.incomplete` into
//! place; locks the blob as huggingface_hub does. hf-hub still names the cache folders.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::cache::{
    is_commit_sha, kind_plural, kind_singular, url_prefix, validate_repo_id, validate_repo_path,
    CachedRepo, HubEnv, RepoType,
};
use op_api::Progress;

/// How failed requests are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubles each time up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, retry: u32) -> Duration {
        self.base_delay
            .saturating_mul(1 << retry.min(16))
            .min(self.max_delay)
    }
}

/// One file of a repo at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path inside the repo (`data/train-00000-of-00020.parquet`).
    pub path: String,
    /// Size in bytes, when the listing gave it.
    pub size: Option<u64>,
    /// Cache blob name: the LFS sha256, else the git blob id (what huggingface_hub uses).
    pub etag: Option<String>,
    /// Set for LFS files: the content's sha256, checked after download.
    pub sha256: Option<String>,
}

/// A repo revision resolved to a commit, with its file listing.
#[derive(Debug, Clone)]
pub struct RepoSnapshot {
    pub repo_id: String,
    pub kind: RepoType,
    /// The revision asked for (`main`, a tag, a sha).
    pub revision: String,
    /// The commit it resolved to.
    pub sha: String,
    pub files: Vec<RepoFile>,
    pub cache: CachedRepo,
    /// Set when the Hub could not be reached and the cache answered instead.
    pub note: Option<String>,
}

impl RepoSnapshot {
    /// The folder whose files are this commit's (`snapshots/<sha>`).
    pub fn dir(&self) -> PathBuf {
        self.cache.snapshot_dir(&self.sha)
    }

    pub fn file_names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    pub fn file(&self, path: &str) -> Option<&RepoFile> {
        self.files.iter().find(|f| f.path == path)
    }

    fn describe(&self) -> String {
        format!(
            "{} `{}` at `{}`",
            kind_singular(self.kind),
            self.repo_id,
            self.revision
        )
    }
}

/// The Hub, as the environment describes it.
#[derive(Debug, Clone)]
pub struct Hub {
    env: HubEnv,
    retry: RetryPolicy,
    agent: ureq::Agent,
}

/// What went wrong with one request.
enum Failure {
    /// Worth another try: connection trouble, timeouts, 5xx, 429.
    Transient(anyhow::Error),
    /// Retrying will not help (401, 403, 404, bad data).
    Fatal(anyhow::Error),
}

impl Hub {
    pub fn new(env: HubEnv) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            env,
            retry: RetryPolicy::default(),
            agent,
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn env(&self) -> &HubEnv {
        &self.env
    }

    /// Resolves `revision` of a repo to a commit and lists its files. Offline (or when the
    /// Hub cannot be reached and the cache has the revision) the cache answers.
    pub fn resolve(&self, repo_id: &str, kind: RepoType, revision: &str) -> Result<RepoSnapshot> {
        validate_repo_id(repo_id)?;
        let cache = self.env.repo(repo_id, kind);
        if self.env.offline {
            return self.resolve_cached(&cache, revision, None);
        }
        match self.resolve_online(&cache, revision) {
            Ok(snapshot) => Ok(snapshot),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Transient(e)) => match cache.cached_commit(revision)? {
                Some(_) => self.resolve_cached(
                    &cache,
                    revision,
                    Some(format!(
                        "the Hub could not be reached ({e:#}); using the cached copy"
                    )),
                ),
                None => Err(e),
            },
        }
    }

    /// The commit sha of a revision, as cheaply as possible (for cache keys): a commit sha
    /// as is, the cached ref offline, else one API call.
    pub fn commit_sha(&self, repo_id: &str, kind: RepoType, revision: &str) -> Result<String> {
        if is_commit_sha(revision) {
            return Ok(revision.to_string());
        }
        Ok(self.resolve(repo_id, kind, revision)?.sha)
    }

    fn resolve_cached(
        &self,
        cache: &CachedRepo,
        revision: &str,
        note: Option<String>,
    ) -> Result<RepoSnapshot> {
        let what = format!(
            "{} `{}` at `{revision}`",
            kind_singular(cache.kind),
            cache.repo_id
        );
        let Some(sha) = cache.cached_commit(revision)? else {
            bail!(
                "{what} is not in the Hub cache {} and HF_HUB_OFFLINE is set: download it \
                 once with network access (unset HF_HUB_OFFLINE), or point HF_HUB_CACHE/HF_HOME \
                 at a cache that has it",
                self.env.cache_dir.display()
            );
        };
        let files = cache
            .snapshot_files(&sha)?
            .into_iter()
            .map(|path| RepoFile {
                path,
                size: None,
                etag: None,
                sha256: None,
            })
            .collect();
        Ok(RepoSnapshot {
            repo_id: cache.repo_id.clone(),
            kind: cache.kind,
            revision: revision.to_string(),
            sha,
            files,
            cache: cache.clone(),
            note,
        })
    }

    fn resolve_online(&self, cache: &CachedRepo, revision: &str) -> Result<RepoSnapshot, Failure> {
        let url = format!(
            "{}/api/{}/{}/revision/{}?blobs=true",
            self.env.endpoint,
            kind_plural(cache.kind),
            cache.repo_id,
            encode_component(revision)
        );
        let what = format!(
            "{} `{}` at `{revision}`",
            kind_singular(cache.kind),
            cache.repo_id
        );
        let info: RepoInfo = self.with_retries(&what, || {
            let mut response = self.get(&url).call().map_err(transport)?;
            check_status(&response, &self.env, &cache.repo_id, cache.kind, None)?;
            response
                .body_mut()
                .with_config()
                .limit(256 << 20)
                .read_json::<RepoInfo>()
                .map_err(|e| Failure::Transient(anyhow!("reading the repo listing: {e}")))
        })?;
        if !is_commit_sha(&info.sha) {
            return Err(Failure::Fatal(anyhow!(
                "the Hub answered a malformed commit sha `{}`",
                info.sha
            )));
        }
        let mut files = Vec::with_capacity(info.siblings.len());
        for s in info.siblings {
            validate_repo_path(&s.rfilename).map_err(Failure::Fatal)?;
            let sha256 = s.lfs.as_ref().map(|l| l.sha256.clone());
            let size = s.lfs.as_ref().map(|l| l.size).or(s.size);
            let etag = sha256.clone().or(s.blob_id);
            files.push(RepoFile {
                path: s.rfilename,
                size,
                etag,
                sha256,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        cache
            .write_ref(revision, &info.sha)
            .map_err(Failure::Fatal)?;
        Ok(RepoSnapshot {
            repo_id: cache.repo_id.clone(),
            kind: cache.kind,
            revision: revision.to_string(),
            sha: info.sha,
            files,
            cache: cache.clone(),
            note: None,
        })
    }

    /// The local path of `file` of the snapshot: the cached copy when there is one (also
    /// one that Python downloaded), else a download. Offline, a missing file is an error
    /// naming it.
    pub fn fetch(
        &self,
        snapshot: &RepoSnapshot,
        file: &str,
        progress: &dyn Progress,
    ) -> Result<PathBuf> {
        validate_repo_path(file)?;
        let pointer = snapshot.dir().join(file);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let what = format!("`{file}` of {}", snapshot.describe());
        if self.env.offline {
            bail!(
                "{what} is not in the Hub cache ({} missing) and HF_HUB_OFFLINE is set: \
                 download it once with network access (unset HF_HUB_OFFLINE)",
                pointer.display()
            );
        }
        if snapshot.note.is_some() {
            bail!(
                "{what} is not cached and the Hub could not be reached: {}",
                snapshot.note.as_deref().unwrap()
            );
        }
        let entry = snapshot
            .file(file)
            .ok_or_else(|| anyhow!("{what}: no such file in the repo"))?
            .clone();
        let etag = match &entry.etag {
            Some(etag) => etag.clone(),
            None => bail!("{what}: the Hub listing gave no blob id for it"),
        };
        if etag.is_empty() || etag.contains('/') || etag.contains("..") {
            bail!("{what}: malformed blob id `{etag}`");
        }
        let cache = &snapshot.cache;
        let blob = cache.blob_path(&etag);
        std::fs::create_dir_all(blob.parent().unwrap())?;
        let lock_path = cache.lock_path(&etag);
        std::fs::create_dir_all(lock_path.parent().unwrap())?;
        let lock = File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;

        let blob_ok = std::fs::metadata(&blob)
            .map(|m| m.is_file() && entry.size.is_none_or(|s| s == m.len()))
            .unwrap_or(false);
        if !blob_ok {
            let url = format!(
                "{}/{}{}/resolve/{}/{}",
                self.env.endpoint,
                url_prefix(snapshot.kind),
                snapshot.repo_id,
                snapshot.sha,
                file.split('/')
                    .map(encode_component)
                    .collect::<Vec<_>>()
                    .join("/")
            );
            let incomplete = PathBuf::from(format!("{}.incomplete", blob.display()));
            self.with_retries(&what, || {
                self.download_once(&url, &incomplete, &entry, snapshot, progress)
            })?;
            std::fs::rename(&incomplete, &blob)
                .with_context(|| format!("moving the download into {}", blob.display()))?;
        }
        let pointer = cache.link_blob(&snapshot.sha, file, &etag)?;
        drop(lock);
        Ok(pointer)
    }

    /// One attempt: resumes `incomplete` if the server honours the range, then checks size
    /// and sha256. A mismatch deletes the partial file (the next attempt starts over).
    fn download_once(
        &self,
        url: &str,
        incomplete: &Path,
        entry: &RepoFile,
        snapshot: &RepoSnapshot,
        progress: &dyn Progress,
    ) -> Result<(), Failure> {
        let have = std::fs::metadata(incomplete).map(|m| m.len()).unwrap_or(0);
        let mut request = self.get(url);
        if have > 0 {
            request = request.header("Range", &format!("bytes={have}-"));
        }
        let response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        if status == 416 {
            // Nothing left to send: what we have is either complete or wrong; verify below.
        } else {
            check_status(
                &response,
                &self.env,
                &snapshot.repo_id,
                snapshot.kind,
                Some(&entry.path),
            )?;
        }
        let append = status == 206 && have > 0;
        let mut file = OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append && status != 416)
            .open(incomplete)
            .map_err(|e| Failure::Fatal(anyhow!("opening {}: {e}", incomplete.display())))?;
        if let Some(size) = entry.size {
            progress.set_length(size);
        }
        if status != 416 {
            progress.inc(if append { have } else { 0 });
            let mut body = response.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = body
                    .read(&mut buf)
                    .map_err(|e| Failure::Transient(anyhow!("download interrupted: {e}")))?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n]).map_err(|e| {
                    Failure::Fatal(anyhow!("writing {}: {e}", incomplete.display()))
                })?;
                progress.inc(n as u64);
            }
        }
        file.sync_all()
            .map_err(|e| Failure::Fatal(anyhow!("writing {}: {e}", incomplete.display())))?;
        drop(file);
        let got = std::fs::metadata(incomplete).map(|m| m.len()).unwrap_or(0);
        if let Some(size) = entry.size {
            if got != size {
                if got > size {
                    let _ = std::fs::remove_file(incomplete);
                }
                return Err(Failure::Transient(anyhow!("got {got} of {size} bytes")));
            }
        }
        if let Some(expected) = &entry.sha256 {
            let actual = sha256_file(incomplete).map_err(Failure::Fatal)?;
            if !actual.eq_ignore_ascii_case(expected) {
                let _ = std::fs::remove_file(incomplete);
                return Err(Failure::Transient(anyhow!(
                    "content sha256 {actual} differs from the Hub's {expected}"
                )));
            }
        }
        Ok(())
    }

    fn get(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let mut request = self.agent.get(url);
        if let Some(token) = &self.env.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        request
    }

    fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let mut retry = 0;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(Failure::Fatal(e)),
                Err(Failure::Transient(e)) => {
                    retry += 1;
                    if retry >= self.retry.attempts {
                        return Err(Failure::Transient(e.context(op_api::RunTimeFailure(
                            format!(
                                "{what}: failed {} times talking to {}; check the network \
                                 (or set HF_HUB_OFFLINE=1 to use only the local cache)",
                                self.retry.attempts, self.env.endpoint
                            ),
                        ))));
                    }
                    std::thread::sleep(self.retry.delay(retry - 1));
                }
            }
        }
    }
}

impl From<Failure> for anyhow::Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Transient(e) | Failure::Fatal(e) => e,
        }
    }
}

fn transport(e: ureq::Error) -> Failure {
    match e {
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
            Failure::Fatal(anyhow!("bad request: {e}"))
        }
        other => Failure::Transient(anyhow!("network error: {other}")),
    }
}

/// Turns an unsuccessful status into an error that says what to do.
fn check_status(
    response: &ureq::http::Response<ureq::Body>,
    env: &HubEnv,
    repo_id: &str,
    kind: RepoType,
    file: Option<&str>,
) -> Result<(), Failure> {
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(());
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let hub_message = header("x-error-message")
        .map(|m| format!(" (Hub: {m})"))
        .unwrap_or_default();
    let error_code = header("x-error-code").unwrap_or_default();
    let what = match file {
        Some(f) => format!("`{f}` of {} `{repo_id}`", kind_singular(kind)),
        None => format!("{} `{repo_id}`", kind_singular(kind)),
    };
    let page = env.repo_page(repo_id, kind);
    let token_note = match &env.token_source {
        Some(source) => format!("the token in use (from {source}) has no access"),
        None => "no token is set (HF_TOKEN unset and no token file)".to_string(),
    };
    match status {
        401 | 403 if error_code != "RepoNotFound" => Err(Failure::Fatal(anyhow!(
            "access to {what} was refused (HTTP {status}){hub_message}: the repo is gated or \
             private and {token_note}. Accept its license at {page} while logged in, then set \
             HF_TOKEN to a token of that account (https://huggingface.co/settings/tokens)"
        ))),
        401 | 404 if error_code == "RepoNotFound" || file.is_none() => {
            Err(Failure::Fatal(anyhow!(
                "{what} was not found (HTTP {status}){hub_message}: check the name and revision; \
             if it is private, set HF_TOKEN ({token_note})"
            )))
        }
        404 => Err(Failure::Fatal(anyhow!(
            "{what} was not found at that revision (HTTP 404){hub_message}"
        ))),
        408 | 429 | 500..=599 => Err(Failure::Transient(anyhow!(
            "the Hub answered HTTP {status} for {what}{hub_message}"
        ))),
        _ => Err(Failure::Fatal(anyhow!(
            "the Hub answered HTTP {status} for {what}{hub_message}"
        ))),
    }
}

/// Percent-encodes one path component (huggingface_hub `quote(..., safe="")`).
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, rename = "blobId")]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    sha256: String,
    size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::{repo_reply, serve, Response};
    use op_api::NoProgress;

    const SHA: &str = "1111111111111111111111111111111111111111";

    fn hub(endpoint: &str, cache: &Path, token: Option<&str>) -> Hub {
        Hub::new(HubEnv {
            cache_dir: cache.to_path_buf(),
            endpoint: endpoint.to_string(),
            token: token.map(str::to_string),
            token_source: token.map(|_| crate::cache::TokenSource::EnvVar("HF_TOKEN")),
            hf_home: cache.to_path_buf(),
            token_error: None,
            offline: false,
        })
        .with_retry(RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        })
    }

    const PARQUET: &[u8] = b"PAR1 pretend parquet bytes PAR1";
    const README: &[u8] = b"---\nlicense: mit\n---\n";

    #[test]
    fn downloads_into_the_standard_layout_then_works_offline() {
        let server = serve(|req, _| {
            repo_reply(
                req,
                "datasets",
                "org/ds",
                SHA,
                &[
                    ("README.md", README),
                    ("data/train-00000-of-00001.parquet", PARQUET),
                ],
            )
            .unwrap_or_else(|| Response::new(404, ""))
        });
        let cache = tempfile::tempdir().unwrap();
        let h = hub(&server.url, cache.path(), None);
        let snap = h.resolve("org/ds", RepoType::Dataset, "main").unwrap();
        assert_eq!(snap.sha, SHA);
        assert_eq!(
            snap.file_names(),
            ["README.md", "data/train-00000-of-00001.parquet"]
        );
        let path = h
            .fetch(&snap, "data/train-00000-of-00001.parquet", &NoProgress)
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), PARQUET);

        let repo_dir = cache.path().join("datasets--org--ds");
        assert_eq!(
            std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
            SHA
        );
        let etag = hex::encode(Sha256::digest(PARQUET));
        assert_eq!(
            std::fs::read(repo_dir.join("blobs").join(&etag)).unwrap(),
            PARQUET,
            "blob named by the LFS sha256"
        );
        assert_eq!(
            path,
            repo_dir
                .join("snapshots")
                .join(SHA)
                .join("data/train-00000-of-00001.parquet")
        );
        assert_eq!(
            std::fs::read_link(&path).unwrap(),
            PathBuf::from(format!("../../../blobs/{etag}"))
        );

        // A second fetch is served by the cache: no new resolve request.
        let before = server.paths().len();
        h.fetch(&snap, "data/train-00000-of-00001.parquet", &NoProgress)
            .unwrap();
        assert_eq!(server.paths().len(), before);

        // Offline: the same cache answers without any server.
        let offline = Hub::new(HubEnv::offline_at(cache.path()));
        let snap = offline
            .resolve("org/ds", RepoType::Dataset, "main")
            .unwrap();
        assert_eq!(snap.sha, SHA);
        assert_eq!(
            snap.file_names(),
            ["data/train-00000-of-00001.parquet"],
            "offline lists what is cached"
        );
        assert_eq!(
            std::fs::read(
                offline
                    .fetch(&snap, "data/train-00000-of-00001.parquet", &NoProgress)
                    .unwrap()
            )
            .unwrap(),
            PARQUET
        );
        let err = format!(
            "{:#}",
            offline.fetch(&snap, "README.md", &NoProgress).unwrap_err()
        );
        assert!(
            err.contains("README.md") && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            offline
                .resolve("org/other", RepoType::Dataset, "main")
                .unwrap_err()
        );
        assert!(
            err.contains("org/other") && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
    }

    #[test]
    fn server_errors_are_retried_then_succeed() {
        let server = serve(|req, seen| {
            // The listing and the file each fail twice with 500 first.
            if seen < 2 {
                return Response::new(500, "busy");
            }
            repo_reply(req, "datasets", "org/ds", SHA, &[("x.parquet", PARQUET)])
                .unwrap_or_else(|| Response::new(404, ""))
        });
        let cache = tempfile::tempdir().unwrap();
        let h = hub(&server.url, cache.path(), None);
        let snap = h.resolve("org/ds", RepoType::Dataset, "main").unwrap();
        let path = h.fetch(&snap, "x.parquet", &NoProgress).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), PARQUET);
        let paths = server.paths();
        assert_eq!(paths.iter().filter(|p| p.contains("/api/")).count(), 3);
        assert_eq!(paths.iter().filter(|p| p.contains("/resolve/")).count(), 3);
    }

    #[test]
    fn persistent_failure_is_a_clear_error() {
        let server = serve(|_, _| Response::new(503, "down"));
        let cache = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            hub(&server.url, cache.path(), None)
                .resolve("org/ds", RepoType::Dataset, "main")
                .unwrap_err()
        );
        assert!(
            err.contains("failed 3 times")
                && err.contains("HTTP 503")
                && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
        assert_eq!(server.paths().len(), 3);
    }

    #[test]
    fn gated_repo_says_how_to_get_access() {
        let server = serve(|req, _| {
            if req.path.contains("/resolve/") {
                return Response::new(401, "")
                    .with_header("X-Error-Code", "GatedRepo")
                    .with_header(
                        "X-Error-Message",
                        "Access to model org/gated is restricted.",
                    );
            }
            repo_reply(req, "models", "org/gated", SHA, &[("config.json", b"{}")])
                .unwrap_or_else(|| Response::new(404, ""))
        });
        let cache = tempfile::tempdir().unwrap();
        let h = hub(&server.url, cache.path(), None);
        let snap = h.resolve("org/gated", RepoType::Model, "main").unwrap();
        let err = format!(
            "{:#}",
            h.fetch(&snap, "config.json", &NoProgress).unwrap_err()
        );
        assert!(
            err.contains("Accept its license at")
                && err.contains(&format!("{}/org/gated", server.url)),
            "{err}"
        );
        assert!(
            err.contains("HF_TOKEN")
                && err.contains("no token is set")
                && err.contains("restricted"),
            "{err}"
        );
        assert_eq!(
            server
                .paths()
                .iter()
                .filter(|p| p.contains("/resolve/"))
                .count(),
            1,
            "401 is not retried"
        );

        // With a token it is sent as a bearer token, and the message names its source.
        let h = hub(&server.url, cache.path(), Some("hf_secret"));
        let err = format!(
            "{:#}",
            h.fetch(&snap, "config.json", &NoProgress).unwrap_err()
        );
        assert!(
            err.contains("the token in use (from the HF_TOKEN environment variable) has no access"),
            "{err}"
        );
        let log = server.requests.lock().unwrap();
        assert_eq!(
            log.last()
                .unwrap()
                .headers
                .get("authorization")
                .map(String::as_str),
            Some("Bearer hf_secret")
        );
    }

    #[test]
    fn dropped_download_leaves_no_complete_file_and_resumes() {
        let big: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let big2 = big.clone();
        // Always cut: every attempt fails.
        let server = serve(move |req, _| {
            let mut r = repo_reply(req, "datasets", "org/ds", SHA, &[("a.zip", &big2)])
                .unwrap_or_else(|| Response::new(404, ""));
            if req.path.contains("/resolve/") {
                r.cut_after = Some(r.body.len() / 3);
            }
            r
        });
        let cache = tempfile::tempdir().unwrap();
        let h = hub(&server.url, cache.path(), None);
        let snap = h.resolve("org/ds", RepoType::Dataset, "main").unwrap();
        let err = format!("{:#}", h.fetch(&snap, "a.zip", &NoProgress).unwrap_err());
        assert!(
            err.contains("a.zip") && err.contains("failed 3 times"),
            "{err}"
        );
        let etag = hex::encode(Sha256::digest(&big));
        let repo_dir = cache.path().join("datasets--org--ds");
        assert!(
            !repo_dir.join("blobs").join(&etag).exists(),
            "no complete-looking blob"
        );
        assert!(
            !repo_dir.join("snapshots").join(SHA).join("a.zip").exists(),
            "no snapshot entry"
        );

        // Cut only the first transfer: the retry resumes with a Range request.
        let big3 = big.clone();
        let server = serve(move |req, seen| {
            let mut r = repo_reply(req, "datasets", "org/ds", SHA, &[("a.zip", &big3)])
                .unwrap_or_else(|| Response::new(404, ""));
            if req.path.contains("/resolve/") && seen == 0 {
                r.cut_after = Some(r.body.len() / 3);
            }
            r
        });
        let cache = tempfile::tempdir().unwrap();
        let h = hub(&server.url, cache.path(), None);
        let snap = h.resolve("org/ds", RepoType::Dataset, "main").unwrap();
        let path = h.fetch(&snap, "a.zip", &NoProgress).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), big);
        let log = server.requests.lock().unwrap();
        let ranges: Vec<Option<&String>> = log
            .iter()
            .filter(|r| r.path.contains("/resolve/"))
            .map(|r| r.headers.get("range"))
            .collect();
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], None);
        assert!(
            ranges[1].is_some_and(|r| r.starts_with("bytes=") && r != "bytes=0-"),
            "{ranges:?}"
        );
    }

    #[test]
    fn corrupted_content_is_rejected() {
        let server = serve(|req, _| {
            let mut r = repo_reply(req, "datasets", "org/ds", SHA, &[("x.parquet", PARQUET)])
                .unwrap_or_else(|| Response::new(404, ""));
            if req.path.contains("/resolve/") {
                r.body[3] ^= 1; // same size, different content
            }
            r
        });
        let cache = tempfile::tempdir().unwrap();
        let h = hub(&server.url, cache.path(), None);
        let snap = h.resolve("org/ds", RepoType::Dataset, "main").unwrap();
        let err = format!(
            "{:#}",
            h.fetch(&snap, "x.parquet", &NoProgress).unwrap_err()
        );
        assert!(err.contains("sha256") && err.contains("x.parquet"), "{err}");
        assert!(!snap.dir().join("x.parquet").exists());
    }
}
