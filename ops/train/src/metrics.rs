//! `metrics.jsonl`: one JSON object per logging step, appended durably so that a crash loses
//! nothing already logged and a resumed run continues the same file.
//!
//! Field names are transformers' log keys (`loss`, `grad_norm`, `learning_rate`, `epoch`) and
//! TRL's (`mean_token_accuracy`, `num_tokens`), plus the optimizer `step` the log belongs to.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The conventional file name inside a training output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Optimizer steps done (transformers' `state.global_step`).
    pub step: u64,
    /// Mean loss over the steps since the previous log (transformers' `loss`).
    pub loss: f64,
    /// Global L2 norm of the gradients before clipping, of the last step.
    pub grad_norm: f64,
    /// The learning rate the scheduler gives for the last step.
    pub learning_rate: f64,
    /// Fraction of label tokens whose argmax prediction is right (TRL).
    pub mean_token_accuracy: f64,
    /// Tokens seen so far, padding included as TRL counts them (TRL's `num_tokens`).
    pub num_tokens: u64,
    /// Fractional epoch, `step / steps_per_epoch`.
    pub epoch: f64,
}

impl LogRecord {
    /// The TensorBoard scalars transformers writes for this log (`train/<key>`).
    pub fn tensorboard_scalars(&self) -> [(&'static str, f64); 6] {
        [
            ("train/loss", self.loss),
            ("train/grad_norm", self.grad_norm),
            ("train/learning_rate", self.learning_rate),
            ("train/mean_token_accuracy", self.mean_token_accuracy),
            ("train/num_tokens", self.num_tokens as f64),
            ("train/epoch", self.epoch),
        ]
    }
}

/// Appends [`LogRecord`]s to a metrics.jsonl file.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending, creating it (and its folder) if needed.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// For a resumed run: keeps only the records up to `last_step` (those the checkpoint covers;
    /// later ones came from the interrupted run and will be logged again) and opens for appending.
    /// The rewrite goes through a temporary file and a rename, so a crash leaves either file whole.
    pub fn resume(path: &Path, last_step: u64) -> anyhow::Result<Self> {
        if !path.exists() {
            return Self::open(path);
        }
        let kept: Vec<LogRecord> = read_metrics(path)?
            .into_iter()
            .filter(|r| r.step <= last_step)
            .collect();
        Self::create_with(path, &kept)
    }

    /// Replaces `path` with exactly `records` (atomically: a crash leaves the old file or the
    /// new one whole) and opens it for appending.
    pub fn create_with(path: &Path, records: &[LogRecord]) -> anyhow::Result<Self> {
        op_api::atomic_file::write_with(path, |w| {
            for r in records {
                writeln!(w, "{}", serde_json::to_string(r)?)?;
            }
            Ok(())
        })?;
        Self::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line and syncs it to disk before returning.
    pub fn log(&mut self, record: &LogRecord) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Reads every record of a metrics.jsonl; a bad line is an error naming the file and line. An
/// empty last line (the file's final newline) is fine.
pub fn read_metrics(path: &Path) -> anyhow::Result<Vec<LogRecord>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: LogRecord = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not a metrics record", path.display(), i + 1))?;
        out.push(rec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> LogRecord {
        LogRecord {
            step,
            loss,
            grad_norm: 0.5,
            learning_rate: 2e-5,
            mean_token_accuracy: 0.25,
            num_tokens: 1234,
            epoch: 0.125,
        }
    }

    #[test]
    fn appends_one_object_per_line_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/metrics.jsonl");
        let mut w = MetricsWriter::open(&path).unwrap();
        w.log(&rec(10, 2.5)).unwrap();
        w.log(&rec(20, 1.5)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"step":10,"loss":2.5,"grad_norm":0.5,"learning_rate":0.00002,"mean_token_accuracy":0.25,"num_tokens":1234,"epoch":0.125}"#
        );
        assert_eq!(
            read_metrics(&path).unwrap(),
            vec![rec(10, 2.5), rec(20, 1.5)]
        );
        // Reopening appends.
        drop(w);
        MetricsWriter::open(&path)
            .unwrap()
            .log(&rec(30, 1.0))
            .unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 3);
    }

    #[test]
    fn resume_drops_records_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::open(&path).unwrap();
        for s in [10, 20, 30] {
            w.log(&rec(s, s as f64)).unwrap();
        }
        let mut w = MetricsWriter::resume(&path, 20).unwrap();
        w.log(&rec(30, 9.0)).unwrap();
        let steps: Vec<(u64, f64)> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|r| (r.step, r.loss))
            .collect();
        assert_eq!(steps, vec![(10, 10.0), (20, 20.0), (30, 9.0)]);
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        fs::write(
            &path,
            format!(
                "{}\n{{\"step\": 1}}\n",
                serde_json::to_string(&rec(1, 1.0)).unwrap()
            ),
        )
        .unwrap();
        let err = format!("{:#}", read_metrics(&path).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn tensorboard_tags_are_transformers_names() {
        let tags: Vec<&str> = rec(1, 1.0)
            .tensorboard_scalars()
            .iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(
            tags,
            [
                "train/loss",
                "train/grad_norm",
                "train/learning_rate",
                "train/mean_token_accuracy",
                "train/num_tokens",
                "train/epoch"
            ]
        );
    }
}
