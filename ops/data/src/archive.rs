//! Zip archives of a dataset (the `files` artifact): which archives, and their extraction, each
//! `X.zip` into `X/` (as the guide's `zipfile.extractall(zip_filename.replace(".zip", ""))`
//! does), in parallel.
//!
//! Safety: entries that would land outside their folder (`..` components, absolute paths),
//! symlinks, encrypted entries and archives whose total uncompressed size passes
//! `max_total_bytes` are refused, naming the archive and the entry; the declared sizes are
//! checked before anything is written and enforced again while writing (a zip bomb can lie
//! about sizes). Each file is written as `<name>.partial` and renamed when complete and
//! CRC-checked, so no partial file ever looks finished.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use glob::{MatchOptions, Pattern};
use op_api::Progress;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// File name of the listing inside a `files` artifact.
pub const FILES_MANIFEST: &str = "files.json";

/// `files.json`: what was extracted where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilesManifest {
    pub archives: Vec<ArchiveSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiveSummary {
    /// The archive's path in the dataset (`2D-spatial.zip`).
    pub archive: String,
    /// Folder of the output it was extracted into (`2D-spatial`).
    pub dir: String,
    /// Entries in the archive (files and folders).
    pub entries: usize,
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
}

impl FilesManifest {
    /// Reads `files.json` of a `files` artifact directory.
    pub fn read(artifact_dir: &Path) -> Result<Self> {
        let path = artifact_dir.join(FILES_MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The archives among a dataset's files: those matching `patterns`, or every `*.zip`.
pub fn select_archives(files: &[String], patterns: Option<&[String]>) -> Result<Vec<String>> {
    let options = MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let selected: Vec<String> = match patterns {
        None => files
            .iter()
            .filter(|f| f.to_ascii_lowercase().ends_with(".zip"))
            .cloned()
            .collect(),
        Some(patterns) => {
            let mut out = BTreeSet::new();
            for pattern in patterns {
                let compiled = Pattern::new(pattern)
                    .with_context(|| format!("invalid pattern `{pattern}`"))?;
                let matched: Vec<&String> = files
                    .iter()
                    .filter(|f| compiled.matches_with(f, options))
                    .collect();
                if matched.is_empty() {
                    bail!("`archives` pattern `{pattern}` matches no file of the dataset");
                }
                for m in matched {
                    if !m.to_ascii_lowercase().ends_with(".zip") {
                        bail!("`{m}` (from `archives` pattern `{pattern}`) is not a .zip archive");
                    }
                    out.insert(m.clone());
                }
            }
            out.into_iter().collect()
        }
    };
    if selected.is_empty() {
        bail!("the dataset has no .zip archives to extract");
    }
    for name in &selected {
        let dir = archive_dir(name);
        if dir.is_empty() || dir.ends_with('/') || dir == FILES_MANIFEST {
            bail!(
                "archive `{name}` has no usable name to extract into (it would land in the output's root); \
                 rename it, or leave it out with `archives`"
            );
        }
    }
    // Two archives with the same stem would extract into the same folder.
    let mut dirs = BTreeSet::new();
    for name in &selected {
        if !dirs.insert(archive_dir(name)) {
            bail!(
                "two archives would extract into the same folder `{}`",
                archive_dir(name)
            );
        }
    }
    Ok(selected)
}

/// `2D-spatial.zip` → `2D-spatial`; `sub/x.zip` → `sub/x` (the guide's `.replace(".zip", "")`
/// relative to where the archive sits in the repo).
pub fn archive_dir(archive: &str) -> String {
    archive[..archive.len() - 4].to_string()
}

/// One entry, checked: where it goes and how big it says it is.
struct PlannedEntry {
    index: usize,
    rel: PathBuf,
    is_dir: bool,
    size: u64,
}

/// The zip-bomb guards.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_total_bytes: u64,
    pub max_compression_ratio: f64,
}

/// Below this many declared bytes an archive's compression ratio is not checked (a small text
/// file compresses far better than images, and cannot hurt).
const RATIO_FLOOR_BYTES: u64 = 16 << 20;

/// Checks every archive's entries, then extracts all archives in parallel into
/// `out_dir/<archive dir>/`.
pub fn extract_all(
    archives: &[(String, PathBuf)],
    out_dir: &Path,
    limits: &Limits,
    progress: &dyn Progress,
) -> Result<FilesManifest> {
    let max_total_bytes = limits.max_total_bytes;
    let plans: Vec<(usize, Vec<PlannedEntry>)> = archives
        .par_iter()
        .map(|(name, path)| plan_archive(name, path))
        .collect::<Result<_>>()?;
    for ((name, path), (_, entries)) in archives.iter().zip(&plans) {
        let declared: u64 = entries.iter().map(|e| e.size).fold(0, u64::saturating_add);
        let size = std::fs::metadata(path)
            .with_context(|| format!("archive `{name}`: reading {}", path.display()))?
            .len()
            .max(1);
        let ratio = declared as f64 / size as f64;
        if declared > RATIO_FLOOR_BYTES && ratio > limits.max_compression_ratio {
            bail!(
                "archive `{name}` ({size} bytes) declares {declared} uncompressed bytes, {ratio:.0} times its size, \
                 more than max_compression_ratio = {} (zip bomb?); raise `max_compression_ratio` if this is expected",
                limits.max_compression_ratio
            );
        }
    }
    check_collisions(archives, &plans)?;
    let declared: u64 = plans
        .iter()
        .flat_map(|(_, entries)| entries)
        .map(|e| e.size)
        .fold(0u64, u64::saturating_add);
    if declared > max_total_bytes {
        bail!(
            "the archives declare {declared} uncompressed bytes, more than max_total_bytes = \
             {max_total_bytes}; raise `max_total_bytes` if this is expected"
        );
    }
    progress.set_length(declared);
    let written = AtomicU64::new(0);
    let cancelled = AtomicBool::new(false);
    let summaries = archives
        .par_iter()
        .zip(plans.par_iter())
        .map(|((name, path), (entry_count, entries))| {
            let result = extract_archive(
                name,
                path,
                entries,
                out_dir,
                max_total_bytes,
                &written,
                &cancelled,
                progress,
            )
            .map(|(files, bytes)| ArchiveSummary {
                archive: name.clone(),
                dir: archive_dir(name),
                entries: *entry_count,
                files,
                bytes,
            });
            if result.is_err() {
                cancelled.store(true, Ordering::Relaxed);
            }
            result
        })
        .collect::<Vec<_>>();
    // Report the first real error, not a "cancelled" one caused by it.
    let mut first_cancelled = None;
    let mut out = Vec::new();
    for result in summaries {
        match result {
            Ok(summary) => out.push(summary),
            Err(e) if e.is::<Cancelled>() => first_cancelled = first_cancelled.or(Some(e)),
            Err(e) => return Err(e),
        }
    }
    if let Some(e) = first_cancelled {
        return Err(e);
    }
    Ok(FilesManifest { archives: out })
}

/// Refuses two entries (of one archive or of two: `a.zip` and a nested `a/b.zip` share `a/b/`)
/// that would write the same file, or a file where another entry needs a folder: extraction
/// would silently overwrite one, or fail halfway with an unclear error.
fn check_collisions(
    archives: &[(String, PathBuf)],
    plans: &[(usize, Vec<PlannedEntry>)],
) -> Result<()> {
    use std::collections::BTreeMap;
    // Output path -> (archive, entry) that makes it a file or, through its descendants, a folder.
    let mut files: BTreeMap<PathBuf, (&str, String)> = BTreeMap::new();
    let mut dirs: BTreeMap<PathBuf, (&str, String)> = BTreeMap::new();
    for ((name, _), (_, entries)) in archives.iter().zip(plans) {
        let root = PathBuf::from(archive_dir(name));
        for e in entries {
            let target = root.join(&e.rel);
            let who = (name.as_str(), e.rel.display().to_string());
            let clash = |(a, entry): &(&str, String)| {
                anyhow!(
                    "archive `{name}`: entry `{}` collides with entry `{entry}` of archive `{a}` \
                     (both would write {}); leave one archive out with `archives`, or fix the archive",
                    who.1,
                    target.display()
                )
            };
            if let Some(other) = files.get(&target) {
                return Err(clash(other));
            }
            if !e.is_dir {
                if let Some(other) = dirs.get(&target) {
                    return Err(clash(other));
                }
                files.insert(target.clone(), who.clone());
            }
            for ancestor in target.ancestors().skip(usize::from(!e.is_dir)) {
                if ancestor.as_os_str().is_empty() {
                    break;
                }
                if let Some(other) = files.get(ancestor) {
                    return Err(clash(other));
                }
                dirs.entry(ancestor.to_path_buf())
                    .or_insert_with(|| who.clone());
            }
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled because another archive failed")
    }
}

impl std::error::Error for Cancelled {}

fn open_archive(name: &str, path: &Path) -> Result<zip::ZipArchive<BufReader<File>>> {
    let file = File::open(path)
        .with_context(|| format!("archive `{name}`: opening {}", path.display()))?;
    zip::ZipArchive::new(BufReader::new(file)).with_context(|| {
        format!(
            "archive `{name}` ({}) is not a readable zip file (corrupt or truncated?)",
            path.display()
        )
    })
}

fn plan_archive(name: &str, path: &Path) -> Result<(usize, Vec<PlannedEntry>)> {
    let mut archive = open_archive(name, path)?;
    let mut entries = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let entry = archive
            .by_index_raw(index)
            .with_context(|| format!("archive `{name}` is corrupt: cannot read entry #{index}"))?;
        let entry_name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        let rel = safe_relative_path(&entry_name)
            .with_context(|| format!("archive `{name}`: refusing entry `{entry_name}`"))?;
        if entry.is_symlink() {
            bail!("archive `{name}`: refusing entry `{entry_name}`: it is a symbolic link");
        }
        if entry.encrypted() {
            bail!("archive `{name}`: entry `{entry_name}` is encrypted");
        }
        entries.push(PlannedEntry {
            index,
            rel,
            is_dir: entry.is_dir(),
            size: entry.size(),
        });
    }
    Ok((archive.len(), entries))
}

/// The entry's path, if it stays inside the extraction folder: relative, no `..`, no root
/// or drive prefix, no backslashes (which would be separators on Windows).
fn safe_relative_path(entry_name: &str) -> Result<PathBuf> {
    if entry_name.contains('\0') {
        bail!("the name contains a NUL byte");
    }
    if entry_name.contains('\\') {
        bail!("the name contains a backslash");
    }
    let path = Path::new(entry_name);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => bail!("it escapes the extraction folder (`..`)"),
            Component::RootDir | Component::Prefix(_) => bail!("it is an absolute path"),
        }
    }
    if out.as_os_str().is_empty() {
        bail!("the name is empty");
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn extract_archive(
    name: &str,
    path: &Path,
    entries: &[PlannedEntry],
    out_dir: &Path,
    max_total_bytes: u64,
    written: &AtomicU64,
    cancelled: &AtomicBool,
    progress: &dyn Progress,
) -> Result<(usize, u64)> {
    let mut archive = open_archive(name, path)?;
    let root = out_dir.join(archive_dir(name));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut files = 0;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    for planned in entries {
        if cancelled.load(Ordering::Relaxed) {
            return Err(Cancelled.into());
        }
        let target = root.join(&planned.rel);
        let entry_label = planned.rel.display().to_string();
        if planned.is_dir {
            std::fs::create_dir_all(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut entry = archive
            .by_index(planned.index)
            .with_context(|| format!("archive `{name}` is corrupt at entry `{entry_label}`"))?;
        let partial = PathBuf::from(format!("{}.partial", target.display()));
        let mut out =
            File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let mut entry_bytes = 0u64;
        let copied = (|| -> Result<()> {
            loop {
                let n = entry.read(&mut buf).with_context(|| {
                    format!("archive `{name}` is corrupt at entry `{entry_label}`")
                })?;
                if n == 0 {
                    break;
                }
                entry_bytes += n as u64;
                if entry_bytes > planned.size {
                    bail!(
                    "archive `{name}`: entry `{entry_label}` inflates past its declared size of \
                     {} bytes (zip bomb?)",
                    planned.size
                );
                }
                let total = written.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                if total > max_total_bytes {
                    bail!(
                        "archive `{name}`: entry `{entry_label}` takes the extracted total past \
                     max_total_bytes = {max_total_bytes} (zip bomb?)"
                    );
                }
                out.write_all(&buf[..n])
                    .with_context(|| format!("writing {}", partial.display()))?;
                progress.inc(n as u64);
            }
            Ok(())
        })();
        if let Err(e) = copied {
            drop(out);
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        // The zip reader checks the CRC-32 when the entry is read to its end (above).
        drop(out);
        std::fs::rename(&partial, &target)
            .with_context(|| format!("writing {}", target.display()))?;
        files += 1;
        bytes += entry_bytes;
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use op_api::NoProgress;
    use zip::write::SimpleFileOptions;

    fn make_zip(path: &Path, entries: &[(&str, &[u8])]) {
        let mut w = zip::ZipWriter::new(File::create(path).unwrap());
        for (name, data) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, SimpleFileOptions::default())
                    .unwrap();
            } else {
                w.start_file(*name, SimpleFileOptions::default()).unwrap();
                w.write_all(data).unwrap();
            }
        }
        w.finish().unwrap();
    }

    fn extract(dir: &Path, names: &[&str], max: u64) -> Result<FilesManifest> {
        let archives: Vec<(String, PathBuf)> =
            names.iter().map(|n| (n.to_string(), dir.join(n))).collect();
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let limits = Limits {
            max_total_bytes: max,
            max_compression_ratio: 100.0,
        };
        extract_all(&archives, &out, &limits, &NoProgress)
    }

    /// Every regular file under `dir`, relative, sorted.
    fn tree(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in walk(dir) {
            out.push(entry.strip_prefix(dir).unwrap().display().to_string());
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd {
                let p = e.unwrap().path();
                if p.is_dir() {
                    out.extend(walk(&p));
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    #[test]
    fn extracts_each_archive_into_its_stem() {
        let dir = tempfile::tempdir().unwrap();
        let jpeg = [0xffu8, 0xd8, 0xff, 0xe0, 1, 2, 3];
        make_zip(
            &dir.path().join("Low-level-semantic.zip"),
            &[
                ("forensic_detection_blink/", b""),
                ("forensic_detection_blink/f_0_0.jpg", &jpeg),
                ("forensic_detection_blink/f_0_1.jpg", b"xy"),
            ],
        );
        make_zip(&dir.path().join("2D-spatial.zip"), &[("t/a.png", b"png")]);
        let m = extract(
            dir.path(),
            &["2D-spatial.zip", "Low-level-semantic.zip"],
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            tree(&dir.path().join("out")),
            [
                "2D-spatial/t/a.png",
                "Low-level-semantic/forensic_detection_blink/f_0_0.jpg",
                "Low-level-semantic/forensic_detection_blink/f_0_1.jpg"
            ]
        );
        assert_eq!(
            std::fs::read(
                dir.path()
                    .join("out/Low-level-semantic/forensic_detection_blink/f_0_0.jpg")
            )
            .unwrap(),
            jpeg
        );
        assert_eq!(
            m.archives[1],
            ArchiveSummary {
                archive: "Low-level-semantic.zip".into(),
                dir: "Low-level-semantic".into(),
                entries: 3,
                files: 2,
                bytes: 9
            }
        );
    }

    #[test]
    fn refuses_zip_slip_and_absolute_entries() {
        let dir = tempfile::tempdir().unwrap();
        make_zip(
            &dir.path().join("evil.zip"),
            &[("ok.txt", b"fine"), ("../../escaped.txt", b"pwned")],
        );
        let err = format!(
            "{:#}",
            extract(dir.path(), &["evil.zip"], 1 << 20).unwrap_err()
        );
        assert!(
            err.contains("evil.zip")
                && err.contains("../../escaped.txt")
                && err.contains("escapes"),
            "{err}"
        );
        assert!(
            tree(&dir.path().join("out")).is_empty(),
            "nothing written when an entry is refused"
        );
        assert!(!dir.path().parent().unwrap().join("escaped.txt").exists());

        make_zip(&dir.path().join("abs.zip"), &[("/etc/evil.txt", b"x")]);
        let err = format!(
            "{:#}",
            extract(dir.path(), &["abs.zip"], 1 << 20).unwrap_err()
        );
        assert!(
            err.contains("abs.zip") && err.contains("/etc/evil.txt") && err.contains("absolute"),
            "{err}"
        );
    }

    #[test]
    fn refuses_symlink_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = zip::ZipWriter::new(File::create(dir.path().join("link.zip")).unwrap());
        w.start_file("a.txt", SimpleFileOptions::default()).unwrap();
        w.write_all(b"a").unwrap();
        w.add_symlink("passwd", "/etc/passwd", SimpleFileOptions::default())
            .unwrap();
        w.finish().unwrap();
        let err = format!(
            "{:#}",
            extract(dir.path(), &["link.zip"], 1 << 20).unwrap_err()
        );
        assert!(
            err.contains("link.zip") && err.contains("`passwd`") && err.contains("symbolic link"),
            "{err}"
        );
        assert!(tree(&dir.path().join("out")).is_empty());
    }

    #[test]
    fn refuses_zip_bombs_by_declared_and_by_actual_size() {
        let dir = tempfile::tempdir().unwrap();
        // 1 MiB of zeros deflates to about a kilobyte.
        let zeros = vec![0u8; 1 << 20];
        let mut w = zip::ZipWriter::new(File::create(dir.path().join("bomb.zip")).unwrap());
        w.start_file(
            "zeros.bin",
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated),
        )
        .unwrap();
        w.write_all(&zeros).unwrap();
        w.finish().unwrap();
        assert!(
            std::fs::metadata(dir.path().join("bomb.zip"))
                .unwrap()
                .len()
                < 20_000
        );
        let err = format!(
            "{:#}",
            extract(dir.path(), &["bomb.zip"], 500_000).unwrap_err()
        );
        assert!(
            err.contains("1048576") && err.contains("max_total_bytes = 500000"),
            "{err}"
        );
        assert!(tree(&dir.path().join("out")).is_empty());

        // An archive lying about its size: patch the declared uncompressed size (central
        // directory and local header) down to 1000 bytes; the inflater still yields 1 MiB.
        let mut bytes = std::fs::read(dir.path().join("bomb.zip")).unwrap();
        let real = (1u32 << 20).to_le_bytes();
        let mut patched = 0;
        for i in 0..bytes.len() - 4 {
            if bytes[i..i + 4] == real {
                bytes[i..i + 4].copy_from_slice(&1000u32.to_le_bytes());
                patched += 1;
            }
        }
        assert_eq!(patched, 2, "local header and central directory");
        std::fs::write(dir.path().join("liar.zip"), &bytes).unwrap();
        let err = format!(
            "{:#}",
            extract(dir.path(), &["liar.zip"], 1 << 30).unwrap_err()
        );
        assert!(
            err.contains("liar.zip") && err.contains("zeros.bin"),
            "{err}"
        );
        let left = tree(&dir.path().join("out"));
        assert!(left.is_empty(), "no file left behind: {left:?}");
    }

    #[test]
    fn corrupt_archives_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("junk.zip"), b"PK\x03\x04 this is not a zip").unwrap();
        let err = format!(
            "{:#}",
            extract(dir.path(), &["junk.zip"], 1 << 20).unwrap_err()
        );
        assert!(
            err.contains("junk.zip") && err.contains("not a readable zip"),
            "{err}"
        );

        // Flip bytes inside the stored data of an entry: the CRC check catches it.
        make_zip(
            &dir.path().join("crc.zip"),
            &[("a.txt", b"hello hello hello hello")],
        );
        let mut bytes = std::fs::read(dir.path().join("crc.zip")).unwrap();
        let at = bytes
            .windows(5)
            .position(|w| w == b"hello")
            .unwrap_or_else(|| {
                // Deflated by default: corrupt the compressed stream right after the local header.
                30 + "a.txt".len() + 2
            });
        bytes[at] ^= 0xff;
        bytes[at + 1] ^= 0xff;
        std::fs::write(dir.path().join("crc.zip"), &bytes).unwrap();
        let err = format!(
            "{:#}",
            extract(dir.path(), &["crc.zip"], 1 << 20).unwrap_err()
        );
        assert!(
            err.contains("crc.zip") && err.contains("corrupt") && err.contains("a.txt"),
            "{err}"
        );
        assert!(
            !dir.path().join("out/crc/a.txt").exists(),
            "no complete-looking file"
        );
    }

    #[test]
    fn archive_selection() {
        let files: Vec<String> = [
            "README.md",
            "all.parquet",
            "2D-spatial.zip",
            "3D-spatial.zip",
            "x/2D-spatial.zip",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            select_archives(&files, None).unwrap(),
            ["2D-spatial.zip", "3D-spatial.zip", "x/2D-spatial.zip"]
        );
        assert_eq!(
            select_archives(&files, Some(&["3D-*.zip".to_string()])).unwrap(),
            ["3D-spatial.zip"]
        );
        let err = select_archives(&files, Some(&["all.parquet".to_string()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a .zip"), "{err}");
        let err = select_archives(&files, Some(&["9D-*.zip".to_string()]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("matches no file"), "{err}");
        assert!(select_archives(&files[..2], None)
            .unwrap_err()
            .to_string()
            .contains("no .zip"));
    }
}
