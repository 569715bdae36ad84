//! TensorBoard event files, written without TensorFlow or protobuf libraries.
//!
//! The format (tensorboard `summary/writer/event_file_writer.py`, `record_writer.py`;
//! tensorflow `core/util/event.proto`, `core/framework/summary.proto`):
//! a file of TFRecords, each `u64le length | u32le masked_crc32c(length bytes) | data |
//! u32le masked_crc32c(data)`, where `data` is a serialized `Event` protobuf. The first record
//! carries `file_version = "brain.Event:2"`; scalars are `Event{wall_time, step, summary{value{tag,
//! simple_value}}}`, exactly as torch's `SummaryWriter.add_scalar` writes them, so that the
//! committed golden file written by torch is reproduced byte for byte (see the tests).
//!
//! The Event messages this writer needs are few and flat, so they are encoded by hand here: the
//! protobuf wire format for them is five field kinds, and a generated-code dependency would be
//! larger than this file.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// What a TFRecord's checksums hide from accidental CRC-of-CRC matches: rotate right by 15 and
/// add a constant (tensorflow `core/lib/hash/crc32c.h`, `Mask`).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: the framing around a serialized Event.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Minimal protobuf encoding (proto3: default-valued scalars are omitted, as protobuf does).
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire));
    }

    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        if v != 0.0 || v.is_sign_negative() {
            key(out, field, 1);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A float member of a `oneof`: protobuf tracks its presence, so it is written even when 0
    /// (torch's golden file has `simple_value = 0.0` encoded).
    pub fn oneof_float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn int64(out: &mut Vec<u8>, field: u32, v: i64) {
        if v != 0 {
            key(out, field, 0);
            // Negative int64 values are encoded as their two's complement in 10 bytes.
            varint(out, v as u64);
        }
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }

    /// A string field: omitted when empty (proto3).
    pub fn string(out: &mut Vec<u8>, field: u32, v: &str) {
        if !v.is_empty() {
            bytes(out, field, v.as_bytes());
        }
    }
}

// Field numbers (event.proto, summary.proto, tensor.proto, tensor_shape.proto).
const EVENT_WALL_TIME: u32 = 1;
const EVENT_STEP: u32 = 2;
const EVENT_FILE_VERSION: u32 = 3;
const EVENT_SUMMARY: u32 = 5;
const EVENT_SOURCE_METADATA: u32 = 10;
const SOURCE_METADATA_WRITER: u32 = 1;
const SUMMARY_VALUE: u32 = 1;
const VALUE_TAG: u32 = 1;
const VALUE_SIMPLE_VALUE: u32 = 2;
const VALUE_TENSOR: u32 = 8;
const VALUE_METADATA: u32 = 9;
const METADATA_PLUGIN_DATA: u32 = 1;
const PLUGIN_DATA_NAME: u32 = 1;
const TENSOR_DTYPE: u32 = 1;
const TENSOR_SHAPE: u32 = 2;
const TENSOR_STRING_VAL: u32 = 8;
const SHAPE_DIM: u32 = 2;
const DIM_SIZE: u32 = 1;
/// tensorflow `DataType.DT_STRING`.
const DT_STRING: u64 = 7;

/// The first record of every event file.
pub fn encode_file_version_event(wall_time: f64, writer: &str) -> Vec<u8> {
    let mut ev = Vec::new();
    pb::double(&mut ev, EVENT_WALL_TIME, wall_time);
    pb::string(&mut ev, EVENT_FILE_VERSION, "brain.Event:2");
    if !writer.is_empty() {
        let mut meta = Vec::new();
        pb::string(&mut meta, SOURCE_METADATA_WRITER, writer);
        pb::bytes(&mut ev, EVENT_SOURCE_METADATA, &meta);
    }
    ev
}

fn encode_event_with_value(wall_time: f64, step: i64, value: &[u8]) -> Vec<u8> {
    let mut summary = Vec::new();
    pb::bytes(&mut summary, SUMMARY_VALUE, value);
    let mut ev = Vec::new();
    pb::double(&mut ev, EVENT_WALL_TIME, wall_time);
    pb::int64(&mut ev, EVENT_STEP, step);
    pb::bytes(&mut ev, EVENT_SUMMARY, &summary);
    ev
}

/// `Event{wall_time, step, summary{value[{tag, simple_value}]}}`: what `add_scalar` writes.
pub fn encode_scalar_event(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::new();
    pb::string(&mut v, VALUE_TAG, tag);
    pb::oneof_float(&mut v, VALUE_SIMPLE_VALUE, value);
    encode_event_with_value(wall_time, step, &v)
}

/// What torch's `add_text(tag, text)` writes: a string tensor of shape [1] under
/// `<tag>/text_summary`, marked for TensorBoard's text plugin.
pub fn encode_text_event(wall_time: f64, step: i64, tag: &str, text: &str) -> Vec<u8> {
    let mut dim = Vec::new();
    pb::int64(&mut dim, DIM_SIZE, 1);
    let mut shape = Vec::new();
    pb::bytes(&mut shape, SHAPE_DIM, &dim);
    let mut tensor = Vec::new();
    pb::int64(&mut tensor, TENSOR_DTYPE, DT_STRING as i64);
    pb::bytes(&mut tensor, TENSOR_SHAPE, &shape);
    pb::bytes(&mut tensor, TENSOR_STRING_VAL, text.as_bytes());
    let mut plugin = Vec::new();
    pb::string(&mut plugin, PLUGIN_DATA_NAME, "text");
    let mut metadata = Vec::new();
    pb::bytes(&mut metadata, METADATA_PLUGIN_DATA, &plugin);
    let mut v = Vec::new();
    pb::string(&mut v, VALUE_TAG, &format!("{tag}/text_summary"));
    pb::bytes(&mut v, VALUE_TENSOR, &tensor);
    pb::bytes(&mut v, VALUE_METADATA, &metadata);
    encode_event_with_value(wall_time, step, &v)
}

/// The run folder transformers' TensorBoardCallback uses under `output_dir` when no logging dir
/// is given (`default_logdir()`: `runs/<%b%d_%H-%M-%S>_<hostname>`, local time, as PyTorch).
/// `local_time` is `(month 1-12, day, hour, minute, second)`.
pub fn default_run_dir(local_time: (u32, u32, u32, u32, u32), hostname: &str) -> PathBuf {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (month, day, hour, minute, second) = local_time;
    let name = format!(
        "{}{day:02}_{hour:02}-{minute:02}-{second:02}_{hostname}",
        MONTHS[(month.clamp(1, 12) - 1) as usize]
    );
    Path::new("runs").join(name)
}

/// The machine's host name, as Python's `socket.gethostname()` reports it (for file names).
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends events to one event file, flushing after every write so that TensorBoard (and a crash)
/// sees every logged step.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `log_dir` and a new event file in it named as tensorboard's `EventFileWriter` does:
    /// `events.out.tfevents.<unix seconds, 10 digits>.<hostname>.<pid>.<n>`, where `n` counts
    /// writers opened by this process (so two writers never collide).
    pub fn create(log_dir: &Path) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static WRITER_UID: AtomicU64 = AtomicU64::new(0);
        let now = now_secs();
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            now as u64,
            hostname(),
            std::process::id(),
            WRITER_UID.fetch_add(1, Ordering::SeqCst)
        );
        Self::create_file(&log_dir.join(name), now)
    }

    /// Creates the event file at exactly `path` (its folder is created) and writes the
    /// file-version record with `wall_time`.
    pub fn create_file(path: &Path, wall_time: f64) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating TensorBoard folder {}", dir.display()))?;
        }
        let file = File::create(path)
            .with_context(|| format!("creating TensorBoard event file {}", path.display()))?;
        let mut writer = Self {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
        };
        writer.write_event(&encode_file_version_event(wall_time, "runner"))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one serialized Event as a record and flushes it to the OS.
    pub fn write_event(&mut self, event: &[u8]) -> anyhow::Result<()> {
        self.file
            .write_all(&frame_record(event))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing TensorBoard event file {}", self.path.display()))
    }

    /// `add_scalar(tag, value, step)` with the current time.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> anyhow::Result<()> {
        self.add_scalar_at(tag, value, step, now_secs())
    }

    /// As [`add_scalar`](Self::add_scalar) with an explicit wall time (seconds since the epoch).
    /// TensorBoard stores scalars as f32, as torch does.
    pub fn add_scalar_at(
        &mut self,
        tag: &str,
        value: f64,
        step: i64,
        wall_time: f64,
    ) -> anyhow::Result<()> {
        self.write_event(&encode_scalar_event(wall_time, step, tag, value as f32))
    }

    /// One event per scalar, all with the same step and time — what transformers'
    /// TensorBoardCallback does for each log (`train/loss`, `train/grad_norm`, ...).
    pub fn add_scalars(&mut self, step: i64, scalars: &[(&str, f64)]) -> anyhow::Result<()> {
        let now = now_secs();
        for (tag, value) in scalars {
            self.add_scalar_at(tag, *value, step, now)?;
        }
        Ok(())
    }

    /// `add_text(tag, text, step)` (transformers logs its arguments as `args` at step 0).
    pub fn add_text(&mut self, tag: &str, text: &str, step: i64) -> anyhow::Result<()> {
        self.add_text_at(tag, text, step, now_secs())
    }

    pub fn add_text_at(
        &mut self,
        tag: &str,
        text: &str,
        step: i64,
        wall_time: f64,
    ) -> anyhow::Result<()> {
        self.write_event(&encode_text_event(wall_time, step, tag, text))
    }

    /// Flushes and syncs the file to disk (call at checkpoints and at the end of training).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.file.flush()?;
        self.file
            .get_ref()
            .sync_all()
            .with_context(|| format!("syncing TensorBoard event file {}", self.path.display()))
    }
}

/// Reads every record of an event file back, checking both checksums of each (for tests and for
/// tools that inspect a run). A truncated last record — a crash mid-write — is an error naming
/// its offset.
pub fn read_records(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let bad =
            |what: &str| anyhow::anyhow!("{}: {what} in the record at byte {at}", path.display());
        if bytes.len() - at < 12 {
            return Err(bad("truncated length header"));
        }
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        if len_crc != masked_crc32c(len_bytes) {
            return Err(bad("length checksum mismatch"));
        }
        let data_at = at + 12;
        if bytes.len() < data_at + len + 4 {
            return Err(bad("truncated data"));
        }
        let data = &bytes[data_at..data_at + len];
        let data_crc =
            u32::from_le_bytes(bytes[data_at + len..data_at + len + 4].try_into().unwrap());
        if data_crc != masked_crc32c(data) {
            return Err(bad("data checksum mismatch"));
        }
        records.push(data.to_vec());
        at = data_at + len + 4;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/publish")
            .join(rel)
    }

    #[test]
    fn crc32c_and_mask_match_hand_computed_values() {
        // The CRC-32C check value of "123456789" (RFC 3720 / every crc32c implementation).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // mask(0xE3069283) = ror(0xE3069283, 15) + 0xa282ead8
        //   ror: 0xE3069283 >> 15 = 0x0001C60D, 0xE3069283 << 17 = 0x25060000 -> 0x2507C60D
        //   + 0xa282ead8 = 0xC78AB0E5
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn scalar_event_bytes_match_the_spec_by_hand() {
        // Event{wall_time=1.5, step=10, summary{value{tag:"a", simple_value:2.0}}}
        let ev = encode_scalar_event(1.5, 10, "a", 2.0);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 10]); // step: field 2 varint
                                             // summary (field 5, len 10) { value (field 1, len 8) { tag "a" ; simple_value 2.0 } }
        want.extend_from_slice(&[0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(ev, want);
        // Step 0 is a proto3 default and is omitted; simple_value sits in a oneof, so 0.0 is
        // still written (both as in the torch golden file).
        let ev0 = encode_scalar_event(1.5, 0, "a", 0.0);
        assert_eq!(
            &ev0[9..],
            &[0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15, 0, 0, 0, 0]
        );
        // Steps above 127 take a multi-byte varint: 300 = 0xAC 0x02.
        assert_eq!(
            &encode_scalar_event(1.5, 300, "a", 1.0)[9..12],
            &[0x10, 0xac, 0x02]
        );
    }

    #[test]
    fn framing_by_hand() {
        let framed = frame_record(b"xyz");
        assert_eq!(&framed[..8], &3u64.to_le_bytes());
        assert_eq!(
            &framed[8..12],
            &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&framed[12..15], b"xyz");
        assert_eq!(&framed[15..], &masked_crc32c(b"xyz").to_le_bytes());
    }

    /// The golden file was written by torch's SummaryWriter (tools/fixtures/publish.py) with fixed
    /// wall times; every record after the first (whose time is the writer's creation time) must be
    /// reproduced byte for byte, checksums included.
    #[test]
    fn reproduces_torch_summary_writer_records() {
        let golden = read_records(&fixture("tensorboard/events.out.tfevents.golden")).unwrap();
        assert_eq!(golden.len(), 9);
        // First record: wall_time (field 1), file_version "brain.Event:2" (field 3), source_metadata.
        let first = &golden[0];
        assert_eq!(first[0], 0x09);
        assert_eq!(&first[9..11], &[0x1a, 13]);
        assert_eq!(&first[11..24], b"brain.Event:2");
        let ours =
            encode_file_version_event(f64::from_le_bytes(first[1..9].try_into().unwrap()), "");
        assert_eq!(&first[..24], &ours[..]);

        let mut expected = vec![encode_text_event(
            1700000000.25,
            0,
            "args",
            r#"{"learning_rate": 2e-05}"#,
        )];
        for (step, (loss, lr)) in [(2.5f64, 2e-5f64), (1.25, 1e-5), (0.5, 0.0)]
            .iter()
            .enumerate()
        {
            let step = step as i64 + 1;
            let wall = 1700000000.5 + step as f64;
            expected.push(encode_scalar_event(
                wall,
                step * 10,
                "train/loss",
                *loss as f32,
            ));
            expected.push(encode_scalar_event(
                wall,
                step * 10,
                "train/learning_rate",
                *lr as f32,
            ));
        }
        expected.push(encode_scalar_event(
            1700000099.0,
            300,
            "train/num_tokens",
            123456789.0,
        ));
        assert_eq!(golden[1..].len(), expected.len());
        for (i, (g, e)) in golden[1..].iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "record {}", i + 1);
        }
        // And the framed bytes of the whole file after the first record.
        let bytes = fs::read(fixture("tensorboard/events.out.tfevents.golden")).unwrap();
        let first_len = 8 + 4 + golden[0].len() + 4;
        let ours: Vec<u8> = expected.iter().flat_map(|e| frame_record(e)).collect();
        assert_eq!(&bytes[first_len..], &ours[..]);
    }

    #[test]
    fn writer_file_reads_back_and_is_flushed_after_each_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&dir.path().join("runs/x")).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        let parts: Vec<&str> = name.split('.').collect();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(parts[3].len(), 10, "{name}");
        assert!(parts.last().unwrap().parse::<u64>().is_ok(), "{name}");
        w.add_scalars(7, &[("train/loss", 1.5), ("train/grad_norm", 0.25)])
            .unwrap();
        // Not synced or dropped: the data must already be in the file.
        let recs = read_records(w.path()).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(&recs[1][9..11], &[0x10, 7]);
        assert!(recs[2].windows(15).any(|win| win == b"train/grad_norm"));

        // A truncated file is reported, not silently accepted.
        let bytes = fs::read(w.path()).unwrap();
        let cut = dir.path().join("cut");
        fs::write(&cut, &bytes[..bytes.len() - 2]).unwrap();
        assert!(read_records(&cut)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    /// The events a fixed run writes; `tests/fixtures/publish/tensorboard/runner.tfevents` holds
    /// them as this writer wrote them, and tools/fixtures/publish_check_tensorboard.py showed that
    /// tensorboard's own EventFileLoader reads that file back (output recorded beside it).
    fn write_fixed_run(path: &Path) {
        let mut w = EventWriter::create_file(path, 1700000000.0).unwrap();
        w.add_text_at(
            "args",
            r#"{"learning_rate": 2e-05, "num_train_epochs": 1}"#,
            0,
            1700000000.5,
        )
        .unwrap();
        for step in [10i64, 20, 30] {
            let wall = 1700000000.0 + step as f64;
            let scalars = [
                ("train/loss", 3.0 / step as f64),
                ("train/grad_norm", 0.5 + step as f64 / 100.0),
                ("train/learning_rate", 2e-5 * (1.0 - step as f64 / 30.0)),
                ("train/mean_token_accuracy", step as f64 / 40.0),
                ("train/num_tokens", 1000.0 * step as f64),
                ("train/epoch", step as f64 / 30.0),
            ];
            for (tag, v) in scalars {
                w.add_scalar_at(tag, v, step, wall).unwrap();
            }
        }
        w.sync().unwrap();
    }

    #[test]
    fn writer_output_is_the_file_tensorboard_read_back() {
        let committed = fixture("tensorboard/runner.tfevents");
        if std::env::var_os("RUNNER_WRITE_TB_FIXTURE").is_some() {
            write_fixed_run(&committed);
        }
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("runner.tfevents");
        write_fixed_run(&ours);
        assert_eq!(fs::read(&ours).unwrap(), fs::read(&committed).unwrap());
        assert_eq!(read_records(&ours).unwrap().len(), 2 + 3 * 6);
    }

    #[test]
    fn default_run_dir_like_transformers() {
        assert_eq!(
            default_run_dir((11, 28, 9, 5, 3), "vm"),
            Path::new("runs/Nov28_09-05-03_vm")
        );
    }
}
