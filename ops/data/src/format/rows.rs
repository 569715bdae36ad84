//! A whole dataset through [`format_row`]: rows read in chunks and formatted in parallel, the
//! records streamed to a JSON-lines writer in row order, bad rows skipped and counted (or
//! failing the run) per `on_error`.

use std::io::Write;

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::{
    check_fields, format_row, read_for_check, reason_kind, verify_image, FormatReport, Mapping,
    PathRoots, VerifyImages,
};
use crate::conversation::ImageRef;
use crate::dataset::{Dataset, Row};

/// Rows formatted together (read, then formatted on the rayon pool).
const CHUNK_ROWS: usize = 256;

/// What to do with bad rows and how to check images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatPolicy {
    pub verify: VerifyImages,
    /// `on_error = "fail"`: the first bad row ends the run.
    pub fail_on_bad_row: bool,
    /// How many skipped rows are reported by row, file and reason.
    pub report: usize,
}

/// What [`format_dataset`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct FormattedDataset {
    pub report: FormatReport,
    /// Some record names an image stored in a dataset row (not a file).
    pub any_row_images: bool,
}

/// Formats every row of `dataset`, writing one conversation record per usable row to `out`.
/// `on_rows(n)` is told after each chunk; `on_skip(line)` gets the report line of each of the
/// first `policy.report` skipped rows. No usable row at all is an error.
pub fn format_dataset(
    dataset: &Dataset,
    mapping: &Mapping,
    roots: &PathRoots,
    policy: FormatPolicy,
    out: &mut dyn Write,
    mut on_rows: impl FnMut(usize),
    mut on_skip: impl FnMut(&str),
) -> Result<FormattedDataset> {
    let mut report = FormatReport::default();
    let mut any_row_images = false;
    let mut rows = dataset.rows();
    let mut first = true;
    loop {
        // A row that cannot be read (invalid JSON, non-UTF-8 bytes) is a bad row like any
        // other: its error already names the row and the data file.
        let chunk: Vec<Result<Row>> = rows.by_ref().take(CHUNK_ROWS).collect();
        if chunk.is_empty() {
            break;
        }
        if first {
            check_fields(mapping, chunk.iter().filter_map(|r| r.as_ref().ok()))?;
            first = false;
        }
        let results: Vec<_> = chunk
            .par_iter()
            .map(|row| {
                // Err: the report line (naming row and data file) and the reason's kind.
                let row = row
                    .as_ref()
                    .map_err(|e| (format!("{e:#}"), reason_kind(&e.root_cause().to_string())))?;
                let at = |why: String| {
                    let kind = reason_kind(&why);
                    (format!("row {} ({}): {why}", row.index, row.file), kind)
                };
                let f = format_row(row, mapping, roots).map_err(at)?;
                for (i, r) in f.record.images.iter().enumerate() {
                    let bytes = match f.inline_images.iter().find(|(k, _)| *k == i) {
                        Some((_, b)) => Ok(b.clone()),
                        None => read_for_check(r, roots.files_root.as_deref()),
                    };
                    verify_image(bytes, policy.verify)
                        .map_err(|e| at(format!("image {i} ({}): {e}", r.describe())))?;
                }
                Ok::<_, (String, &str)>(f.record)
            })
            .collect();
        for r in results {
            report.rows += 1;
            match r {
                Ok(rec) => {
                    any_row_images |= rec.images.iter().any(|i| matches!(i, ImageRef::Row { .. }));
                    report.images += rec.images.len();
                    report.conversations += 1;
                    serde_json::to_writer(&mut *out, &rec)?;
                    out.write_all(b"\n")?;
                }
                Err((line, kind)) => {
                    if policy.fail_on_bad_row {
                        bail!("{line} (on_error = \"fail\"; set on_error = \"skip\" to skip such rows)");
                    }
                    report.skipped += 1;
                    *report
                        .skipped_by_reason
                        .entry(kind.to_string())
                        .or_default() += 1;
                    if report.skipped_examples.len() < policy.report {
                        on_skip(&line);
                        report.skipped_examples.push(line);
                    }
                }
            }
        }
        on_rows(chunk.len());
    }
    if report.conversations == 0 {
        bail!(
            "no usable rows: {} rows read, {} skipped{}",
            report.rows,
            report.skipped,
            report
                .skipped_examples
                .first()
                .map(|s| format!(" (first: {s})"))
                .unwrap_or_default()
        );
    }
    Ok(FormattedDataset {
        report,
        any_row_images,
    })
}
