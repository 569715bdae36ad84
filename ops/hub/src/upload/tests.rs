//! The upload protocol against a local mock of the Hub that checks every request.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::*;
use crate::test_server::{Request, Response, TestServer};

const TOKEN: &str = "hf_SeCrEtTokenValue123";
const REPO: &str = "me/adapter";

/// What the mock Hub should do differently.
#[derive(Default, Clone)]
struct Faults {
    /// Answer this many first commit requests with HTTP 500.
    commit_500s: usize,
    /// Drop the connection on this many first LFS PUTs.
    put_drops: usize,
    /// Reject the token everywhere with 401, echoing the Authorization header in the body.
    reject_token: bool,
    /// The repo exists already (create answers 409).
    repo_exists: bool,
    /// Use multipart with this chunk size.
    multipart_chunk: Option<u64>,
    /// Remote oids the preupload reports (path → oid), to exercise unchanged-file skipping.
    remote_oids: HashMap<String, String>,
}

struct MockHub {
    server: TestServer,
    problems: Arc<Mutex<Vec<String>>>,
    /// Bytes received by PUT, by oid (parts concatenated).
    stored: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    commits: Arc<Mutex<Vec<Vec<Value>>>>,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

impl MockHub {
    fn start(faults: Faults) -> Self {
        let problems = Arc::new(Mutex::new(Vec::<String>::new()));
        let stored = Arc::new(Mutex::new(HashMap::<String, Vec<u8>>::new()));
        let commits = Arc::new(Mutex::new(Vec::new()));
        let commit_calls = Arc::new(AtomicUsize::new(0));
        let put_calls = Arc::new(AtomicUsize::new(0));
        let url_cell: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
        let sizes: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(HashMap::new()));
        let (p, s, c, u) = (
            problems.clone(),
            stored.clone(),
            commits.clone(),
            url_cell.clone(),
        );
        let server = TestServer::start(move |req: &Request| {
            let problem = |m: String| p.lock().unwrap().push(m);
            let base = u.lock().unwrap().clone();
            let authed = req.header("authorization") == Some(&format!("Bearer {TOKEN}"));
            let json_body = || serde_json::from_slice::<Value>(&req.body).unwrap_or(Value::Null);
            if req.header("user-agent").map(|a| a.starts_with("runner/")) != Some(true) {
                problem(format!("{} {}: no runner user-agent", req.method, req.path));
            }
            let is_storage = req.path.starts_with("/s3/");
            if is_storage && req.header("authorization").is_some() {
                problem(format!(
                    "the token was sent to the storage URL {}",
                    req.path
                ));
            }
            if faults.reject_token && !is_storage {
                // A server that echoes what it got: the client must still never show the token.
                let echo = format!(
                    "{{\"error\":\"Invalid credentials in Authorization header: {}\"}}",
                    req.header("authorization").unwrap_or("")
                );
                return Response::new(401, echo);
            }
            if !is_storage && !req.path.starts_with("/complete/") && !authed {
                problem(format!(
                    "{} {}: missing or wrong Authorization",
                    req.method, req.path
                ));
                return Response::empty(401);
            }
            match (req.method.as_str(), req.path.as_str()) {
                ("POST", "/api/repos/create") => {
                    let b = json_body();
                    if b != json!({"name": "adapter", "organization": "me", "visibility": "private"})
                    {
                        problem(format!("create body {b}"));
                    }
                    if faults.repo_exists {
                        Response::json(
                            409,
                            &json!({"error": "You already created this model repo"}),
                        )
                    } else {
                        Response::json(200, &json!({"url": format!("{base}/{REPO}")}))
                    }
                }
                ("POST", "/api/models/me/adapter/preupload/main") => {
                    let b = json_body();
                    let mut answer = vec![];
                    for f in b["files"].as_array().cloned().unwrap_or_default() {
                        let path = f["path"].as_str().unwrap_or("").to_string();
                        let sample = base64::engine::general_purpose::STANDARD
                            .decode(f["sample"].as_str().unwrap_or(""))
                            .unwrap_or_default();
                        if sample.len() > 512
                            || (sample.len() as u64) < f["size"].as_u64().unwrap_or(0).min(512)
                        {
                            problem(format!(
                                "preupload sample of {path}: {} bytes",
                                sample.len()
                            ));
                        }
                        let mode = if path.ends_with(".safetensors") {
                            "lfs"
                        } else {
                            "regular"
                        };
                        let mut e = json!({"path": path, "uploadMode": mode, "shouldIgnore": path == "ignored.txt"});
                        if let Some(oid) = faults.remote_oids.get(&path) {
                            e["oid"] = json!(oid);
                        }
                        answer.push(e);
                    }
                    Response::json(200, &json!({"files": answer, "commitOid": "0000"}))
                }
                ("POST", "/me/adapter.git/info/lfs/objects/batch") => {
                    if req.header("content-type") != Some(LFS_CONTENT_TYPE)
                        || req.header("accept") != Some(LFS_CONTENT_TYPE)
                    {
                        problem(format!("LFS batch headers {:?}", req.headers));
                    }
                    let b = json_body();
                    if b["operation"] != "upload"
                        || b["transfers"] != json!(["basic", "multipart"])
                        || b["hash_algo"] != "sha256"
                        || b["ref"] != json!({"name": "main"})
                    {
                        problem(format!("LFS batch body {b}"));
                    }
                    let mut objects = vec![];
                    for o in b["objects"].as_array().cloned().unwrap_or_default() {
                        let oid = o["oid"].as_str().unwrap_or("").to_string();
                        let size = o["size"].as_u64().unwrap_or(0);
                        sizes.lock().unwrap().insert(oid.clone(), size);
                        let upload = match faults.multipart_chunk {
                            None => json!({"href": format!("{base}/s3/{oid}"), "header": {}}),
                            Some(chunk) => {
                                let mut header = json!({"chunk_size": chunk.to_string()});
                                for i in 1..=size.div_ceil(chunk) {
                                    header[i.to_string()] =
                                        json!(format!("{base}/s3/{oid}?part={i}"));
                                }
                                json!({"href": format!("{base}/complete/{oid}"), "header": header})
                            }
                        };
                        objects.push(json!({"oid": oid, "size": size, "authenticated": true,
                            "actions": {"upload": upload, "verify": {"href": format!("{base}/verify/{oid}")}}}));
                    }
                    Response::json(200, &json!({"transfer": "basic", "objects": objects}))
                }
                ("PUT", path) if path.starts_with("/s3/") => {
                    if put_calls.fetch_add(1, Ordering::SeqCst) < faults.put_drops {
                        return Response::dropped();
                    }
                    let oid = path[4..].split('?').next().unwrap().to_string();
                    if req
                        .header("content-length")
                        .map(|l| l.parse::<usize>().ok())
                        != Some(Some(req.body.len()))
                    {
                        problem(format!(
                            "PUT {path} without the right content-length: {:?}",
                            req.headers
                        ));
                    }
                    let part: usize = path
                        .split("part=")
                        .nth(1)
                        .map(|p| p.parse().unwrap())
                        .unwrap_or(1);
                    let mut st = s.lock().unwrap();
                    let entry = st.entry(oid.clone()).or_default();
                    if let Some(chunk) = faults.multipart_chunk {
                        if entry.len() as u64 != (part as u64 - 1) * chunk {
                            problem(format!("part {part} of {oid} arrived out of order"));
                        }
                    }
                    entry.extend_from_slice(&req.body);
                    Response::empty(200).with_header("etag", &format!("\"etag-{part}\""))
                }
                ("POST", path) if path.starts_with("/complete/") => {
                    let oid = &path[10..];
                    let b = json_body();
                    let n = s
                        .lock()
                        .unwrap()
                        .get(oid)
                        .map(|v| v.len() as u64)
                        .unwrap_or(0)
                        .div_ceil(faults.multipart_chunk.unwrap());
                    let want: Vec<Value> = (1..=n)
                        .map(|i| json!({"partNumber": i, "etag": format!("\"etag-{i}\"")}))
                        .collect();
                    if b != json!({"oid": oid, "parts": want})
                        || req.header("content-type") != Some(LFS_CONTENT_TYPE)
                    {
                        problem(format!("completion body {b} headers {:?}", req.headers));
                    }
                    Response::json(200, &json!({}))
                }
                ("POST", path) if path.starts_with("/verify/") => {
                    let oid = &path[8..];
                    let b = json_body();
                    let st = s.lock().unwrap();
                    let data = st.get(oid).cloned().unwrap_or_default();
                    if sha256_hex(&data) != oid {
                        problem(format!(
                            "stored bytes of {oid} hash to {}",
                            sha256_hex(&data)
                        ));
                    }
                    if b != json!({"oid": oid, "size": data.len()})
                        || sizes.lock().unwrap().get(oid) != Some(&(data.len() as u64))
                    {
                        problem(format!("verify body {b} for {} stored bytes", data.len()));
                    }
                    Response::json(200, &json!({}))
                }
                ("POST", "/api/models/me/adapter/commit/main") => {
                    if commit_calls.fetch_add(1, Ordering::SeqCst) < faults.commit_500s {
                        return Response::json(500, &json!({"error": "Internal Error"}));
                    }
                    if req.header("content-type") != Some("application/x-ndjson") {
                        problem(format!(
                            "commit content-type {:?}",
                            req.header("content-type")
                        ));
                    }
                    let text = String::from_utf8(req.body.clone()).unwrap();
                    if !text.ends_with('\n') {
                        problem("NDJSON body does not end with a newline".into());
                    }
                    let lines: Vec<Value> = text
                        .lines()
                        .map(|l| serde_json::from_str(l).unwrap())
                        .collect();
                    c.lock().unwrap().push(lines);
                    Response::json(
                        200,
                        &json!({"commitOid": "c0ffee", "commitUrl": format!("{base}/{REPO}/commit/c0ffee")}),
                    )
                }
                (m, path) => {
                    problem(format!("unexpected request {m} {path}"));
                    Response::empty(404)
                }
            }
        });
        *url_cell.lock().unwrap() = server.url.clone();
        Self {
            server,
            problems,
            stored,
            commits,
        }
    }

    fn client(&self) -> HubClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .new_agent();
        HubClient::with_agent(&self.server.url, Token::new(TOKEN), agent).with_retry(RetryPolicy {
            max_retries: 3,
            base_wait: Duration::from_millis(5),
            max_wait: Duration::from_millis(20),
        })
    }

    fn assert_no_problems(&self) {
        let p = self.problems.lock().unwrap();
        assert!(p.is_empty(), "the mock Hub saw problems:\n{}", p.join("\n"));
    }
}

fn request() -> CommitRequest {
    CommitRequest {
        repo_id: REPO.into(),
        repo_type: RepoType::Model,
        revision: "main".into(),
        commit_message: "End of training".into(),
        commit_description: "trained with runner".into(),
        create_repo: true,
        private: Some(true),
    }
}

/// A folder like a saved adapter: a binary LFS file, small text files, a nested one, an empty one.
fn folder() -> (tempfile::TempDir, BTreeMap<String, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    let weights: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    files.insert("adapter_model.safetensors".to_string(), weights);
    files.insert(
        "adapter_config.json".to_string(),
        b"{\n  \"r\": 16\n}".to_vec(),
    );
    files.insert(
        "README.md".to_string(),
        "# Model card \u{1F600}\n".as_bytes().to_vec(),
    );
    files.insert(
        "runs/events.out.tfevents.1.h.1.0".to_string(),
        vec![1, 2, 3, 0, 255],
    );
    files.insert("empty.safetensors".to_string(), vec![]);
    for (rel, bytes) in &files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    std::fs::create_dir_all(dir.path().join(".git")).unwrap();
    std::fs::write(dir.path().join(".git/HEAD"), "ref").unwrap();
    (dir, files)
}

fn check_commit(hub: &MockHub, files: &BTreeMap<String, Vec<u8>>) {
    let commits = hub.commits.lock().unwrap();
    assert_eq!(commits.len(), 1);
    let lines = &commits[0];
    assert_eq!(
        lines[0],
        json!({"key": "header", "value": {"summary": "End of training", "description": "trained with runner"}})
    );
    let mut seen = BTreeMap::new();
    for l in &lines[1..] {
        let v = &l["value"];
        let path = v["path"].as_str().unwrap().to_string();
        match l["key"].as_str().unwrap() {
            "file" => {
                assert_eq!(v["encoding"], "base64");
                seen.insert(
                    path,
                    base64::engine::general_purpose::STANDARD
                        .decode(v["content"].as_str().unwrap())
                        .unwrap(),
                );
            }
            "lfsFile" => {
                assert_eq!(v["algo"], "sha256");
                let oid = v["oid"].as_str().unwrap();
                let stored = hub
                    .stored
                    .lock()
                    .unwrap()
                    .get(oid)
                    .cloned()
                    .expect("LFS object committed but never uploaded");
                assert_eq!(v["size"].as_u64().unwrap(), stored.len() as u64);
                seen.insert(path, stored);
            }
            k => panic!("unexpected commit line key {k}"),
        }
    }
    assert_eq!(
        &seen, files,
        "the commit must carry exactly the folder's files (no .git)"
    );
}

#[test]
fn uploads_a_folder_in_one_commit_as_huggingface_hub_does() {
    let hub = MockHub::start(Faults::default());
    let (dir, files) = folder();
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = logs.clone();
    let receipt = hub
        .client()
        .with_log(move |s| l.lock().unwrap().push(s.to_string()))
        .upload_folder(dir.path(), &request())
        .unwrap();
    hub.assert_no_problems();
    check_commit(&hub, &files);
    assert_eq!(receipt.commit_oid.as_deref(), Some("c0ffee"));
    assert!(receipt.created_repo);
    assert_eq!(receipt.lfs_files, vec!["adapter_model.safetensors"]);
    assert_eq!(receipt.uploaded_objects, 1);
    // The empty .safetensors goes as a regular file even though the Hub says lfs.
    assert!(receipt
        .regular_files
        .contains(&"empty.safetensors".to_string()));
    let methods: Vec<String> = hub
        .server
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path.split('?').next().unwrap()))
        .collect();
    let oid = sha256_hex(&files["adapter_model.safetensors"]);
    assert_eq!(
        methods,
        vec![
            "POST /api/repos/create".to_string(),
            "POST /api/models/me/adapter/preupload/main".into(),
            "POST /me/adapter.git/info/lfs/objects/batch".into(),
            format!("PUT /s3/{oid}"),
            format!("POST /verify/{oid}"),
            "POST /api/models/me/adapter/commit/main".into(),
        ]
    );
    assert!(logs.lock().unwrap().iter().all(|l| !l.contains(TOKEN)));
}

#[test]
fn multipart_upload_and_existing_repo() {
    let hub = MockHub::start(Faults {
        multipart_chunk: Some(1024),
        repo_exists: true,
        ..Faults::default()
    });
    let (dir, files) = folder();
    let receipt = hub.client().upload_folder(dir.path(), &request()).unwrap();
    hub.assert_no_problems();
    check_commit(&hub, &files);
    assert!(!receipt.created_repo);
    let parts = hub
        .server
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(parts, 3, "3000 bytes in 1024-byte parts");
}

#[test]
fn retries_a_500_and_a_dropped_connection() {
    let hub = MockHub::start(Faults {
        commit_500s: 1,
        put_drops: 1,
        ..Faults::default()
    });
    let (dir, files) = folder();
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = logs.clone();
    let receipt = hub
        .client()
        .with_log(move |s| l.lock().unwrap().push(s.to_string()))
        .upload_folder(dir.path(), &request())
        .unwrap();
    hub.assert_no_problems();
    check_commit(&hub, &files);
    assert_eq!(receipt.commit_oid.as_deref(), Some("c0ffee"));
    let reqs = hub.server.requests();
    assert_eq!(
        reqs.iter()
            .filter(|r| r.path.ends_with("/commit/main"))
            .count(),
        2
    );
    assert_eq!(reqs.iter().filter(|r| r.method == "PUT").count(), 2);
    let logs = logs.lock().unwrap();
    assert!(
        logs.iter()
            .any(|l| l.contains("HTTP 500") && l.contains("retry 1/3")),
        "{logs:?}"
    );
}

#[test]
fn gives_up_after_the_retries_with_the_status() {
    let hub = MockHub::start(Faults {
        commit_500s: 100,
        ..Faults::default()
    });
    let (dir, _) = folder();
    let err = format!(
        "{:#}",
        hub.client()
            .upload_folder(dir.path(), &request())
            .unwrap_err()
    );
    assert!(err.contains("commit failed with HTTP 500"), "{err}");
    assert_eq!(
        hub.server
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/commit/main"))
            .count(),
        4
    );
}

#[test]
fn a_401_says_what_to_check_and_never_shows_the_token() {
    let hub = MockHub::start(Faults {
        reject_token: true,
        ..Faults::default()
    });
    let (dir, _) = folder();
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = logs.clone();
    let err = hub
        .client()
        .with_log(move |s| l.lock().unwrap().push(s.to_string()))
        .upload_folder(dir.path(), &request())
        .unwrap_err();
    let text = format!("{err:#} {err:?}");
    assert!(text.contains("HTTP 401"), "{text}");
    assert!(text.contains("HF_TOKEN"), "{text}");
    assert!(
        !text.contains(TOKEN),
        "the token leaked into the error: {text}"
    );
    assert!(
        text.contains("<token>"),
        "the server's echo should be kept, redacted: {text}"
    );
    assert!(logs.lock().unwrap().iter().all(|l| !l.contains(TOKEN)));
    assert_eq!(format!("{:?}", Token::new(TOKEN)), "Token(<redacted>)");
}

#[test]
fn unchanged_files_are_left_out_and_nothing_changed_means_no_commit() {
    let (dir, files) = folder();
    let readme = &files["README.md"];
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", readme.len()).as_bytes());
    h.update(readme);
    let readme_oid = hex::encode(h.finalize());
    let hub = MockHub::start(Faults {
        remote_oids: HashMap::from([
            ("README.md".to_string(), readme_oid),
            (
                "adapter_model.safetensors".to_string(),
                sha256_hex(&files["adapter_model.safetensors"]),
            ),
        ]),
        ..Faults::default()
    });
    let receipt = hub.client().upload_folder(dir.path(), &request()).unwrap();
    hub.assert_no_problems();
    assert_eq!(
        receipt.unchanged_files,
        vec!["README.md", "adapter_model.safetensors"]
    );
    assert!(hub
        .server
        .requests()
        .iter()
        .all(|r| !r.path.contains("lfs")));
    let commits = hub.commits.lock().unwrap();
    let paths: Vec<&str> = commits[0][1..]
        .iter()
        .map(|l| l["value"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec![
            "adapter_config.json",
            "empty.safetensors",
            "runs/events.out.tfevents.1.h.1.0"
        ]
    );
}

#[test]
fn quote_all_is_pythons_quote_safe_empty() {
    assert_eq!(quote_all("main"), "main");
    assert_eq!(quote_all("refs/pr/1"), "refs%2Fpr%2F1");
    assert_eq!(quote_all("a b~c"), "a%20b~c");
}
