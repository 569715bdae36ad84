//! The HTTP layer of the upload: one request with retries and backoff, the Hub's error text,
//! and errors that say what to check.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use super::*;

/// An HTTP failure, with what the user should check.
pub(super) fn status_error(
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
pub(super) fn server_message(headers: &ureq::http::HeaderMap, body: &str) -> String {
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

pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: ureq::http::HeaderMap,
    pub(super) body: Vec<u8>,
}

impl Reply {
    pub(super) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(super) fn json(&self, what: &str) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("{what}: the Hub's reply is not JSON"))
    }
}

pub(super) enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A byte range of a local file, sent with its length.
    FileRange {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

impl HubClient {
    pub(super) fn say(&self, line: &str) {
        (self.log)(&self.token.redact(line));
    }

    /// `fix_hf_endpoint_in_url`: URLs the Hub returns name the public Hub; behind a proxy
    /// endpoint they must go to the proxy.
    pub(super) fn fix_url(&self, url: &str) -> String {
        if self.endpoint == DEFAULT_ENDPOINT || self.endpoint == "https://hub-ci.huggingface.co" {
            url.to_string()
        } else {
            url.replace(DEFAULT_ENDPOINT, &self.endpoint)
        }
    }

    /// One request with retries. `auth` adds the token (Hub endpoints only).
    pub(super) fn send(
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

    pub(super) fn send_once(
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
    pub(super) fn expect_ok(
        &self,
        reply: &Reply,
        what: &str,
        ctx: &CommitRequest,
    ) -> anyhow::Result<()> {
        if (200..300).contains(&reply.status) {
            return Ok(());
        }
        Err(self.failure(reply, what, ctx))
    }

    pub(super) fn failure(&self, reply: &Reply, what: &str, ctx: &CommitRequest) -> anyhow::Error {
        let msg = self
            .token
            .redact(&server_message(&reply.headers, &reply.text()));
        status_error(reply.status, what, &msg, ctx)
    }

    pub(super) fn json_post(
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
}

/// Dropped connections, timeouts and refused connections are retried (huggingface_hub retries
/// httpx's TimeoutException, NetworkError and RemoteProtocolError).
pub(super) fn is_transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed
    )
}
