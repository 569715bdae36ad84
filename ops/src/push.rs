//! Op `push`: uploads the saved adapter folder to a Hub repo in one commit (see
//! [`crate::hub::upload`]). Token from `HF_TOKEN` or the token file (`HF_TOKEN_PATH`, default
//! `$HF_HOME/token`); endpoint from `HF_ENDPOINT`. With `enabled = false` the op is skipped
//! (`runner plan` says so) and writes a receipt saying it was skipped.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::hub::upload::{self, CommitRequest, EnvLookup, HubClient};
use crate::params::{OpParams, ParamError, ParamSpec};
use crate::{op_params, ArtifactType, Op, Port, RunCtx};

/// The receipt's file in the op's output.
pub const RECEIPT_FILE: &str = "receipt.json";

op_params! {
    pub struct PushParams {
        /// The Hub repo: `name` (your namespace) or `namespace/name`.
        repo_id: String,
        /// Visibility of a newly created repo; unset keeps the namespace's default.
        private: Option<bool> = None,
        /// Branch to commit to.
        revision: String = "main".to_string(),
        /// The commit's title (transformers' Trainer uses "End of training").
        commit_message: String = "End of training".to_string(),
        /// The commit's description.
        commit_description: String = String::new(),
        /// Create the repo when it does not exist.
        create_repo: bool = true,
        /// `false` skips the upload (no token needed); `runner plan` shows the op as skipped.
        enabled: bool = true,
        /// "model", "dataset" or "space".
        repo_type: String = "model".to_string(),
    }
}

pub struct PushOp;

/// Hub repo names: `[namespace/]name`, letters, digits, `-`, `_`, `.`, at most 96 characters
/// each part, not starting or ending with `-` or `.`, no `--` or `..` (huggingface_hub
/// `validate_repo_id`).
pub fn validate_repo_id(repo_id: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "repo_id {repo_id:?} must be `name` or `namespace/name`"
        ));
    }
    for p in parts {
        let ok_chars = p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let bad_edges = p.starts_with(['-', '.']) || p.ends_with(['-', '.']);
        if !ok_chars || bad_edges || p.contains("--") || p.contains("..") || p.len() > 96 {
            return Err(format!(
                "repo_id {repo_id:?}: `{p}` may only use letters, digits, '-', '_' and '.', not start or end with '-' or '.', nor contain '--' or '..' (96 characters at most)"
            ));
        }
    }
    Ok(())
}

impl Op for PushOp {
    fn kind(&self) -> &'static str {
        "push"
    }
    fn doc(&self) -> &'static str {
        "Upload the saved folder to a Hugging Face Hub repo in one commit (creates the repo; HF_TOKEN / HF_HOME token / HF_ENDPOINT)"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port {
            name: "saved",
            accepts: &[ArtifactType::Saved],
            required: true,
            doc: "the folder written by `save`",
        }]
    }
    fn params(&self) -> Vec<ParamSpec> {
        PushParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        let p = PushParams::from_table(params)?;
        validate_repo_id(&p.repo_id).map_err(|message| ParamError {
            key: Some("repo_id".into()),
            message,
        })?;
        upload::parse_repo_type(&p.repo_type).map_err(|e| ParamError {
            key: Some("repo_type".into()),
            message: e.to_string(),
        })?;
        if p.revision.trim().is_empty() {
            return Err(ParamError {
                key: Some("revision".into()),
                message: "revision must name a branch".into(),
            });
        }
        PushParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Receipt
    }
    fn skip_reason(&self, params: &toml::Table) -> Option<String> {
        match PushParams::from_table(params) {
            Ok(p) if !p.enabled => Some("enabled = false: nothing is uploaded".into()),
            _ => None,
        }
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        let p = PushParams::from_table(ctx.params)?;
        let env = |k: &str| ctx.recipe.env.var(k);
        push(
            ctx.name,
            &p,
            &ctx.input("saved")?.dir,
            ctx.out_dir,
            &env,
            &|l| ctx.progress.println(l),
        )
    }
}

/// The op's work, with the environment injected.
pub fn push(
    op_name: &str,
    p: &PushParams,
    saved_dir: &Path,
    out_dir: &Path,
    env: EnvLookup,
    log: &dyn Fn(String),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    if !p.enabled {
        let receipt = json!({"skipped": true, "reason": "enabled = false", "repo_id": p.repo_id});
        std::fs::write(
            out_dir.join(RECEIPT_FILE),
            serde_json::to_string_pretty(&receipt)? + "\n",
        )?;
        return Ok(());
    }
    // huggingface_hub refuses every call in offline mode; an upload must not wait on timeouts.
    let hub = crate::hub::cache::HubEnv::from_vars(env);
    if hub.offline {
        let var = if env("HF_HUB_OFFLINE").is_some_and(|v| !v.is_empty()) {
            "HF_HUB_OFFLINE"
        } else {
            "TRANSFORMERS_OFFLINE"
        };
        anyhow::bail!(
            "op `{op_name}`: {var} is set, so nothing is uploaded to the Hub; unset it to push, or set `enabled = false` in [ops.{op_name}]"
        );
    }
    if let Some(e) = &hub.token_error {
        anyhow::bail!("op `{op_name}`: {e}");
    }
    let (Some(token), Some(source)) = (hub.token.as_deref(), hub.token_source.clone()) else {
        anyhow::bail!(
            "op `{op_name}`: no Hugging Face token: set HF_TOKEN, or log in with `hf auth login` (which writes {}), or set `enabled = false` in [ops.{op_name}] to skip the upload",
            hub.hf_home.join("token").display()
        );
    };
    let token = upload::Token::new(token);
    let endpoint = hub.endpoint.clone();
    let req = CommitRequest {
        repo_id: p.repo_id.clone(),
        repo_type: upload::parse_repo_type(&p.repo_type)?,
        revision: p.revision.clone(),
        commit_message: p.commit_message.clone(),
        commit_description: p.commit_description.clone(),
        create_repo: p.create_repo,
        private: p.private,
    };
    log(format!(
        "op `{op_name}`: uploading to {endpoint}/{} (token from {source})",
        p.repo_id
    ));
    let files = crate::publish::folder::saved_files(saved_dir)?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let client = HubClient::new(&endpoint, token).with_log(move |l| {
        let _ = tx.send(l.to_string());
    });
    // The client logs from its own thread; lines reach the progress output as they come.
    let result = std::thread::scope(|s| {
        let worker = s.spawn(move || client.upload_paths(&files, &req));
        for line in rx.iter() {
            log(format!("op `{op_name}`: {line}"));
        }
        worker.join()
    });
    let receipt = result
        .map_err(|_| anyhow::anyhow!("the upload thread panicked"))?
        .with_context(|| format!("op `{op_name}`: pushing to {} failed", p.repo_id))?;
    if let Some(url) = &receipt.commit_url {
        log(format!("op `{op_name}`: pushed: {url}"));
    }
    std::fs::write(
        out_dir.join(RECEIPT_FILE),
        serde_json::to_string_pretty(&receipt)? + "\n",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn skipped_when_disabled_and_needs_no_token() {
        let op = PushOp;
        let t = params("repo_id = \"me/x\"\nenabled = false");
        assert!(op.check(&t).is_ok());
        assert!(op.skip_reason(&t).unwrap().contains("enabled = false"));
        assert!(op.skip_reason(&params("repo_id = \"me/x\"")).is_none());
        let out = tempfile::tempdir().unwrap();
        let p = PushParams::from_table(&t).unwrap();
        push(
            "push",
            &p,
            Path::new("/nonexistent"),
            out.path(),
            &|_| None,
            &|_| {},
        )
        .unwrap();
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join(RECEIPT_FILE)).unwrap()).unwrap();
        assert_eq!(r["skipped"], true);
    }

    #[test]
    fn no_token_is_a_clear_error() {
        let home = tempfile::tempdir().unwrap();
        let home_s = home.path().to_string_lossy().into_owned();
        let env = move |k: &str| (k == "HF_HOME").then(|| home_s.clone());
        let p = PushParams::from_table(&params("repo_id = \"me/x\"")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = push(
            "up",
            &p,
            Path::new("/nonexistent"),
            out.path(),
            &env,
            &|_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("no Hugging Face token")
                && err.contains("HF_TOKEN")
                && err.contains("enabled = false"),
            "{err}"
        );
        assert!(
            err.contains(&home.path().join("token").display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn token_sources_in_huggingface_hub_order() {
        use crate::hub::cache::HubEnv;
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_fromfile\n").unwrap();
        let custom = home.path().join("elsewhere");
        std::fs::write(&custom, "  hf_custom  ").unwrap();
        let h = home.path().to_string_lossy().into_owned();
        let c = custom.to_string_lossy().into_owned();
        let look = |vars: Vec<(&'static str, String)>| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        };
        let t = |vars| HubEnv::from_vars(look(vars)).token;
        assert_eq!(
            t(vec![("HF_TOKEN", "hf_env".into()), ("HF_HOME", h.clone())]),
            Some("hf_env".to_string())
        );
        assert_eq!(
            t(vec![("HF_TOKEN", "".into()), ("HF_HOME", h.clone())]),
            Some("hf_fromfile".to_string())
        );
        assert_eq!(
            t(vec![("HF_HOME", h.clone()), ("HF_TOKEN_PATH", c)]),
            Some("hf_custom".to_string())
        );
        assert_eq!(t(vec![("HF_HOME", "/nonexistent-home".into())]), None);
        assert_eq!(
            HubEnv::from_vars(|k| (k == "HF_ENDPOINT").then(|| "http://proxy:8080/ ".into()))
                .endpoint,
            "http://proxy:8080"
        );
        assert_eq!(
            HubEnv::from_vars(|_| None).endpoint,
            "https://huggingface.co"
        );
    }

    #[test]
    fn repo_ids_are_validated_at_check_time() {
        let op = PushOp;
        for bad in ["a/b/c", "me/-x", "me/x..y", "me/with space", "/x", ""] {
            let e = op
                .check(&params(&format!("repo_id = {bad:?}")))
                .unwrap_err();
            assert_eq!(e.key.as_deref(), Some("repo_id"), "{bad}");
        }
        assert!(op
            .check(&params(
                "repo_id = \"gemma-3-4b-it-trl-sft-MMIU-Benchmark\""
            ))
            .is_ok());
        let e = op
            .check(&params("repo_id = \"me/x\"\nrepo_type = \"modle\""))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("repo_type"));
    }
}
