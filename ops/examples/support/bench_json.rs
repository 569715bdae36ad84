//! Machine-readable benchmark results: with `RUNNER_BENCH_JSON=FILE` set, each measurement is
//! appended to FILE as one JSON line (tools/gpu-check.sh collects them into one table).

use std::io::Write;

/// Appends `record` to `$RUNNER_BENCH_JSON`, if set; a file that cannot be written only warns.
pub fn record(record: &serde_json::Value) {
    let Some(path) = std::env::var_os("RUNNER_BENCH_JSON").filter(|p| !p.is_empty()) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{record}"));
    if let Err(e) = written {
        eprintln!("warning: RUNNER_BENCH_JSON {}: {e}", path.to_string_lossy());
    }
}
