//! The LFS half of a commit: the batch request, then each object's upload (one `PUT`, or one per
//! part and a completion `POST`) and its optional verify.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::*;

impl HubClient {
    /// One LFS batch request and the uploads it asks for; returns the number of objects sent.
    pub(super) fn upload_lfs_batch(
        &self,
        files: &[&LocalFile],
        req: &CommitRequest,
    ) -> anyhow::Result<usize> {
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

    pub(super) fn lfs_upload(
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

    pub(super) fn upload_multipart(
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
