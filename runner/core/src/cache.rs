//! The content-addressed store of op outputs.
//!
//! Layout of a cache directory:
//! ```text
//! <cache>/<key>/            a complete op output (an artifact directory), never modified again
//! <cache>/.tmp/<key>.<host>.<pid>.<n>/       an output being written
//! <cache>/.tmp/<key>.<host>.<pid>.<n>.lock   held (OS file lock) by the process writing it
//! ```
//! Several processes may share one cache (the ranks of a data-parallel run, on one machine or
//! on several over a shared filesystem): the host name keeps their temporary names apart, and
//! when two of them make the same output the first rename wins and the other copy is dropped.
//! An output is written into `.tmp` and renamed to `<key>` only once its op returned `Ok`; a
//! rename within one filesystem is atomic, so `<key>/` either does not exist or is complete.
//! A process killed mid-op leaves only a `.tmp` entry whose lock the OS has released; the next
//! run deletes it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Bumped when the key derivation changes, so old entries are never misread.
const KEY_SCHEME: &str = "runner-cache-key-v1";
/// Hex digits of the key: 128 bits.
const KEY_HEX_LEN: usize = 32;

/// Everything a cache key covers.
pub struct KeyParts<'a> {
    pub kind: &'a str,
    pub version: u32,
    /// Canonical params (defaults filled), so writing a default explicitly keeps the key.
    pub params: &'a toml::Table,
    /// Port -> key of the artifact connected to it.
    pub inputs: &'a std::collections::BTreeMap<String, String>,
    pub fingerprint: Option<&'a str>,
}

/// sha256 over an unambiguous encoding of the parts (tables sorted by key, floats by their
/// bits, every item tagged with its type and length-prefixed), truncated to 128 bits.
pub fn key(parts: &KeyParts) -> String {
    let mut h = Sha256::new();
    let mut feed = |tag: &str, bytes: &[u8]| {
        h.update(tag.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    feed("scheme", KEY_SCHEME.as_bytes());
    feed("kind", parts.kind.as_bytes());
    feed("version", &parts.version.to_le_bytes());
    let mut params = Vec::new();
    encode_value(&toml::Value::Table(parts.params.clone()), &mut params);
    feed("params", &params);
    for (port, key) in parts.inputs {
        feed("input-port", port.as_bytes());
        feed("input-key", key.as_bytes());
    }
    match parts.fingerprint {
        Some(f) => feed("fingerprint", f.as_bytes()),
        None => feed("no-fingerprint", &[]),
    }
    let digest = hex::encode(h.finalize());
    digest[..KEY_HEX_LEN].to_string()
}

fn encode_value(v: &toml::Value, out: &mut Vec<u8>) {
    let bytes = |tag: u8, b: &[u8], out: &mut Vec<u8>| {
        out.push(tag);
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    match v {
        toml::Value::String(s) => bytes(b's', s.as_bytes(), out),
        toml::Value::Integer(i) => bytes(b'i', &i.to_le_bytes(), out),
        toml::Value::Float(f) => bytes(b'f', &f.to_bits().to_le_bytes(), out),
        toml::Value::Boolean(b) => bytes(b'b', &[*b as u8], out),
        toml::Value::Datetime(d) => bytes(b'd', d.to_string().as_bytes(), out),
        toml::Value::Array(items) => {
            bytes(b'a', &(items.len() as u64).to_le_bytes(), out);
            items.iter().for_each(|i| encode_value(i, out));
        }
        toml::Value::Table(t) => {
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            bytes(b't', &(keys.len() as u64).to_le_bytes(), out);
            for k in keys {
                bytes(b'k', k.as_bytes(), out);
                encode_value(&t[k], out);
            }
        }
    }
}

pub struct Cache {
    root: PathBuf,
}

static PENDING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    /// Does not touch the disk: `plan` must work on a cache that does not exist yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entry_dir(key).is_dir()
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// Creates the cache and deletes what killed runs left in `.tmp` (entries whose writer's
    /// lock is free). Returns how many were deleted.
    pub fn prepare(&self) -> anyhow::Result<usize> {
        let tmp = self.tmp_dir();
        fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create the cache at {}", self.root.display()))?;
        let mut removed = 0;
        for entry in fs::read_dir(&tmp)? {
            let path = entry?.path();
            if !path.is_dir() {
                continue;
            }
            let lock_path = path.with_extension(lock_extension(&path));
            let stale = match File::open(&lock_path) {
                Ok(lock) => lock.try_lock().is_ok(),
                // Cleanup deletes the directory before its lock file, so a directory without a
                // lock file is the remains of an interrupted cleanup.
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(_) => false,
            };
            if stale {
                remove_dir_all_if_exists(&path)?;
                let _ = fs::remove_file(&lock_path);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// A fresh, empty directory for an op to write the output with `key` into, locked by this
    /// process until it is published or dropped.
    pub fn begin(&self, key: &str) -> anyhow::Result<Pending> {
        let tmp = self.tmp_dir();
        fs::create_dir_all(&tmp)?;
        let n = PENDING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let writer = format!("{}.{}.{n}", host_name(), std::process::id());
        let dir = tmp.join(format!("{key}.{writer}"));
        let lock_path = dir.with_extension(lock_extension(&dir));
        // The lock is taken before the directory exists: cleanup only looks at directories, so
        // it can never see one whose writer is alive but not yet holding the lock.
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        lock.lock()?;
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Pending {
            dir,
            lock_path,
            _lock: lock,
            final_dir: self.entry_dir(key),
            trash: tmp.join(format!("{key}.{writer}.old")),
            published: false,
        })
    }
}

/// This machine's name as a file-name part (processes on two machines sharing the cache over a
/// network filesystem may have the same pid).
fn host_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let raw = fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::env::var("COMPUTERNAME").ok())
            .unwrap_or_default();
        let name: String = raw
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() {
            "host".to_string()
        } else {
            name
        }
    })
    .clone()
}

/// `<name>.lock` for a directory `<name>` whose name contains dots.
fn lock_extension(dir: &Path) -> String {
    match dir.extension() {
        Some(ext) => format!("{}.lock", ext.to_string_lossy()),
        None => "lock".to_string(),
    }
}

fn remove_dir_all_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// An output being written. Dropped unpublished (the op failed or panicked), it is deleted.
pub struct Pending {
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    final_dir: PathBuf,
    trash: PathBuf,
    published: bool,
}

impl Pending {
    /// Where the op writes its output.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the output into place. With `replace` (a forced rerun) an existing entry is
    /// swapped out first; without it, an entry that appeared meanwhile (another process made
    /// the same output) wins and this copy is dropped.
    pub fn publish(mut self, replace: bool) -> anyhow::Result<PathBuf> {
        if replace && self.final_dir.exists() {
            fs::rename(&self.final_dir, &self.trash)
                .with_context(|| format!("cannot move aside {}", self.final_dir.display()))?;
        }
        match fs::rename(&self.dir, &self.final_dir) {
            Ok(()) => {}
            Err(_) if self.final_dir.is_dir() && !replace => {
                remove_dir_all_if_exists(&self.dir)?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot publish {} as {}",
                        self.dir.display(),
                        self.final_dir.display()
                    )
                })
            }
        }
        self.published = true;
        remove_dir_all_if_exists(&self.trash)?;
        Ok(self.final_dir.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.published {
            let _ = remove_dir_all_if_exists(&self.dir);
        }
        // The directory is gone (published or deleted) before the lock file, see `Cache::prepare`.
        let _ = fs::remove_file(&self.lock_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    fn key_of(params: &str, inputs: &[(&str, &str)], fingerprint: Option<&str>) -> String {
        let inputs: BTreeMap<String, String> = inputs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        key(&KeyParts {
            kind: "k",
            version: 1,
            params: &table(params),
            inputs: &inputs,
            fingerprint,
        })
    }

    #[test]
    fn key_covers_every_part_and_ignores_key_order() {
        let base = key_of("a = 1\nb = 'x'", &[("p", "k1")], None);
        assert_eq!(base.len(), 32);
        assert_eq!(base, key_of("b = 'x'\na = 1", &[("p", "k1")], None));
        assert_ne!(
            base,
            key_of("a = 1.0\nb = 'x'", &[("p", "k1")], None),
            "int vs float"
        );
        assert_ne!(base, key_of("a = 1\nb = 'y'", &[("p", "k1")], None));
        assert_ne!(base, key_of("a = 1\nb = 'x'", &[("p", "k2")], None));
        assert_ne!(base, key_of("a = 1\nb = 'x'", &[("q", "k1")], None));
        assert_ne!(base, key_of("a = 1\nb = 'x'", &[("p", "k1")], Some("")));
        assert_ne!(
            key_of("a = ['xy']", &[], None),
            key_of("a = ['x', 'y']", &[], None),
            "length prefixes keep lists apart"
        );
        let other_version = key(&KeyParts {
            kind: "k",
            version: 2,
            params: &table("a = 1\nb = 'x'"),
            inputs: &[("p".to_string(), "k1".to_string())].into(),
            fingerprint: None,
        });
        assert_ne!(base, other_version);
    }

    #[test]
    fn publish_is_atomic_and_failures_leave_nothing() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        cache.prepare().unwrap();

        let pending = cache.begin("aaaa").unwrap();
        fs::write(pending.dir().join("half"), "x").unwrap();
        assert!(!cache.contains("aaaa"));
        drop(pending);
        assert!(!cache.contains("aaaa"));
        assert_eq!(fs::read_dir(root.path().join(".tmp")).unwrap().count(), 0);

        let pending = cache.begin("aaaa").unwrap();
        fs::write(pending.dir().join("out"), "1").unwrap();
        let dir = pending.publish(false).unwrap();
        assert_eq!(fs::read_to_string(dir.join("out")).unwrap(), "1");

        let pending = cache.begin("aaaa").unwrap();
        fs::write(pending.dir().join("out"), "2").unwrap();
        pending.publish(true).unwrap();
        assert_eq!(
            fs::read_to_string(cache.entry_dir("aaaa").join("out")).unwrap(),
            "2"
        );
        assert_eq!(fs::read_dir(root.path().join(".tmp")).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_writers_of_one_key_leave_one_complete_entry() {
        // The ranks of a data-parallel run sharing a cache make the same CPU outputs at the
        // same time: each writes its own temporary folder, the first rename wins, the others
        // drop their copies, and nobody fails.
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        cache.prepare().unwrap();
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for w in 0..8 {
                let (cache, start) = (&cache, &start);
                s.spawn(move || {
                    let pending = cache.begin("dddd").unwrap();
                    fs::write(pending.dir().join("a"), format!("{w}")).unwrap();
                    start.wait();
                    fs::write(pending.dir().join("b"), format!("{w}")).unwrap();
                    pending.publish(false).unwrap();
                });
            }
        });
        let a = fs::read_to_string(cache.entry_dir("dddd").join("a")).unwrap();
        let b = fs::read_to_string(cache.entry_dir("dddd").join("b")).unwrap();
        assert_eq!(a, b, "the entry is one writer's, whole");
        assert_eq!(fs::read_dir(root.path().join(".tmp")).unwrap().count(), 0);
    }

    #[test]
    fn prepare_removes_only_abandoned_temp_dirs() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::new(root.path());
        cache.prepare().unwrap();
        // Abandoned: a directory whose lock file nobody holds.
        let abandoned = root.path().join(".tmp/bbbb.1.0");
        fs::create_dir(&abandoned).unwrap();
        fs::write(root.path().join(".tmp/bbbb.1.0.lock"), "").unwrap();
        // Live: held by this process.
        let live = cache.begin("cccc").unwrap();
        assert_eq!(cache.prepare().unwrap(), 1);
        assert!(!abandoned.exists());
        assert!(live.dir().is_dir());
    }
}
