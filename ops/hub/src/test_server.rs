//! A minimal HTTP/1.1 server on 127.0.0.1 for the download and upload tests (and, with the
//! `testing` feature, the tests of the crates above): one thread per connection, keep-alive,
//! Content-Length and chunked request bodies. The handler sees every request; each is recorded.
//! Raw sockets let a reply be cut off mid-body or a connection dropped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Lower-cased header names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Close the connection without answering (a dropped connection).
    pub drop_connection: bool,
    /// Send only this many body bytes (with the full Content-Length), then close.
    pub cut_after: Option<usize>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            body: body.into(),
            ..Self::empty(status)
        }
    }

    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(v).unwrap(),
            drop_connection: false,
            cut_after: None,
        }
    }

    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: vec![],
            body: vec![],
            drop_connection: false,
            cut_after: None,
        }
    }

    pub fn dropped() -> Self {
        Self {
            drop_connection: true,
            ..Self::empty(0)
        }
    }

    pub fn with_header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// Replies to a request; the count is how many earlier requests had the same path.
type Handler = dyn Fn(&Request, usize) -> Response + Send + Sync;

pub struct TestServer {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
}

impl TestServer {
    pub fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Self {
        Self::start_counting(move |req, _| handler(req))
    }

    fn start_counting(
        handler: impl Fn(&Request, usize) -> Response + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let handler = handler.clone();
                let log = log.clone();
                std::thread::spawn(move || serve_connection(stream, &*handler, &log));
            }
        });
        Self { url, requests }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// The path of every request so far, in order.
    pub fn paths(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.path).collect()
    }
}

/// A server whose handler also gets how many earlier requests had the same path (for replies
/// that fail first and then succeed).
pub fn serve(handler: impl Fn(&Request, usize) -> Response + Send + Sync + 'static) -> TestServer {
    TestServer::start_counting(handler)
}

fn serve_connection(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    while let Some(req) = read_request(&mut reader) {
        // Counted and logged under one lock, so concurrent requests of a path count in order.
        let earlier = {
            let mut log = log.lock().unwrap();
            let earlier = log.iter().filter(|r| r.path == req.path).count();
            log.push(req.clone());
            earlier
        };
        let resp = handler(&req, earlier);
        if resp.drop_connection {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
        let mut out = format!(
            "HTTP/1.1 {} X\r\ncontent-length: {}\r\n",
            resp.status,
            resp.body.len()
        );
        for (k, v) in &resp.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        let send = resp.cut_after.unwrap_or(resp.body.len());
        bytes.extend_from_slice(&resp.body[..send]);
        if writer.write_all(&bytes).is_err() {
            return;
        }
        if resp.cut_after.is_some() {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .map(|v| v.contains("chunked"))
        == Some(true)
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = headers.get("content-length") {
        body = vec![0u8; len.parse().ok()?];
        r.read_exact(&mut body).ok()?;
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

/// Serves `files` of one repo at `sha` as the Hub does: the revision API (blobs=true) and
/// resolve URLs with Range support. LFS entries (name ends `.parquet`/`.zip`) carry sha256.
pub fn repo_reply(
    req: &Request,
    kind_plural: &str,
    repo_id: &str,
    sha: &str,
    files: &[(&str, &[u8])],
) -> Option<Response> {
    use sha2::{Digest, Sha256};
    let prefix = if kind_plural == "models" {
        String::new()
    } else {
        format!("{kind_plural}/")
    };
    if req
        .path
        .starts_with(&format!("/api/{kind_plural}/{repo_id}/revision/"))
    {
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, data)| {
                let lfs = name.ends_with(".parquet") || name.ends_with(".zip");
                let mut s = serde_json::json!({"rfilename": name, "size": data.len(), "blobId": &hex::encode(Sha256::digest([b"blob ", *data].concat()))[..40]});
                if lfs {
                    s["lfs"] = serde_json::json!({"sha256": hex::encode(Sha256::digest(data)), "size": data.len(), "pointerSize": 130});
                }
                s
            })
            .collect();
        return Some(Response::new(
            200,
            serde_json::json!({"sha": sha, "siblings": siblings}).to_string(),
        ));
    }
    let resolve = format!("/{prefix}{repo_id}/resolve/{sha}/");
    let file = req.path.strip_prefix(&resolve)?;
    let (_, data) = files.iter().find(|(n, _)| *n == file)?;
    let start: usize = req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    Some(if start > 0 {
        Response::new(206, data[start..].to_vec()).with_header(
            "Content-Range",
            &format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
        )
    } else {
        Response::new(200, data.to_vec())
    })
}
