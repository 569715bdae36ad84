//! The `dataset` artifact: a small `dataset.json` naming data files inside a folder (usually a
//! Hub cache snapshot, so nothing is copied), and a reader that yields typed rows from them —
//! sequentially, or one at a time by global row number for shuffled access without loading
//! the data whole.
//!
//! Formats: parquet (through the `parquet` crate's Arrow reader; nested columns stay typed),
//! JSON arrays of objects, and JSON Lines (`.jsonl`, `.ndjson`, or a `.json` file that is not
//! an array, as `datasets`' json loader accepts).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use parquet::file::metadata::PageIndexPolicy;
use serde::{Deserialize, Serialize};

use super::value::Value;

/// File name of the manifest inside a `dataset` artifact directory.
pub const MANIFEST: &str = "dataset.json";

/// Extensions of the data files this reader understands.
pub const DATA_EXTENSIONS: &[&str] = &["parquet", "json", "jsonl", "ndjson"];

/// Contents of `dataset.json`, the manifest of a `dataset` artifact (written by `load`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetManifest {
    /// `org/name` for a Hub dataset, `None` for a local path.
    pub repo_id: Option<String>,
    /// The resolved commit sha of a Hub dataset.
    pub revision: Option<String>,
    /// Absolute folder holding the repo files (a cache snapshot or the local folder).
    pub root: PathBuf,
    pub split: Option<String>,
    /// The data files of the selected split, relative to `root`, in reading order.
    pub data_files: Vec<String>,
    /// Every file of the repo snapshot (or local folder), relative to `root`.
    pub files: Vec<String>,
}

impl DatasetManifest {
    pub fn write(&self, artifact_dir: &Path) -> Result<()> {
        let path = artifact_dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(artifact_dir: &Path) -> Result<Self> {
        let path = artifact_dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading dataset manifest {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// One row: its global number, the data file it came from (relative to the root), its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Global row number across all data files, in order.
    pub index: usize,
    /// The data file it came from, relative to the dataset root.
    pub file: String,
    pub fields: BTreeMap<String, Value>,
}

impl Row {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// The field, or an error naming the row, file and the fields that exist.
    pub fn field(&self, name: &str) -> Result<&Value> {
        self.fields.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.fields.keys().map(String::as_str).collect();
            anyhow!(
                "row {} ({}): no field `{name}` (fields: {})",
                self.index,
                self.file,
                names.join(", ")
            )
        })
    }
}

/// Opens the dataset of a `dataset` artifact directory, restricted to the rows of its
/// [`SELECTION`] file when a `load` with `holdout` wrote one.
pub fn open(artifact_dir: &Path) -> Result<Dataset> {
    let dataset = Dataset::from_manifest(DatasetManifest::read(artifact_dir)?)?;
    match KeptRows::read(artifact_dir)? {
        Some(selection) => dataset.restrict(selection.rows),
        None => Ok(dataset),
    }
}

/// File name of the row selection inside a `dataset` artifact (absent: every row).
pub const SELECTION: &str = "rows.json";

/// The rows a `load` with `holdout` kept, and the split that chose them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptRows {
    pub holdout: super::holdout::Holdout,
    /// Global row numbers, ascending.
    pub rows: Vec<usize>,
}

impl KeptRows {
    pub fn write(&self, artifact_dir: &Path) -> Result<()> {
        let path = artifact_dir.join(SELECTION);
        std::fs::write(&path, serde_json::to_string(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(artifact_dir: &Path) -> Result<Option<Self>> {
        let path = artifact_dir.join(SELECTION);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// A readable dataset: the manifest plus an index of every data file's rows.
/// `Send + Sync`: worker threads may call [`Dataset::row`] concurrently.
#[derive(Debug)]
pub struct Dataset {
    manifest: DatasetManifest,
    files: Vec<DataFile>,
    /// `starts[k]` = global index of the first row of `files[k]`; one extra entry = len.
    starts: Vec<usize>,
    /// The global rows this dataset consists of (ascending), when restricted; else all.
    selection: Option<Vec<usize>>,
}

impl Dataset {
    /// Indexes the manifest's data files (parquet footers, JSON Lines offsets, JSON arrays).
    pub fn from_manifest(manifest: DatasetManifest) -> Result<Self> {
        let mut files = Vec::with_capacity(manifest.data_files.len());
        let mut starts = vec![0];
        for rel in &manifest.data_files {
            let file = DataFile::open(&manifest.root, rel)?;
            starts.push(starts.last().unwrap() + file.len());
            files.push(file);
        }
        Ok(Self {
            manifest,
            files,
            starts,
            selection: None,
        })
    }

    /// The dataset made of the given global rows only (ascending, each in range). Rows keep
    /// their global numbers, so messages and image references name the row of the data files.
    pub fn restrict(mut self, rows: Vec<usize>) -> Result<Self> {
        let total = self.total_rows();
        if let Some(bad) = rows.windows(2).find(|w| w[0] >= w[1]) {
            bail!(
                "row selection is not ascending at rows {} and {}",
                bad[0],
                bad[1]
            );
        }
        if let Some(&last) = rows.last() {
            if last >= total {
                bail!("row selection names row {last}, but the data files hold {total} rows (did they change since `load`?)");
            }
        }
        self.selection = Some(rows);
        Ok(self)
    }

    /// Rows in the data files, selected or not.
    pub fn total_rows(&self) -> usize {
        *self.starts.last().unwrap()
    }

    pub fn manifest(&self) -> &DatasetManifest {
        &self.manifest
    }

    pub fn root(&self) -> &Path {
        &self.manifest.root
    }

    /// Every file of the repo snapshot, relative to the root.
    pub fn files(&self) -> &[String] {
        &self.manifest.files
    }

    /// The data files rows are read from, relative to the root.
    pub fn data_files(&self) -> &[String] {
        &self.manifest.data_files
    }

    /// Rows of the dataset (the selected ones when restricted).
    pub fn len(&self) -> usize {
        self.selection
            .as_ref()
            .map_or_else(|| self.total_rows(), Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `index` (global), reading only what it needs: one parquet row group's pages for
    /// that row, one JSON line, or one element of an already parsed JSON array.
    /// `index` is the global row number (a restricted dataset's rows keep theirs).
    pub fn row(&self, index: usize) -> Result<Row> {
        if index >= self.total_rows() {
            bail!(
                "row {index} out of range: the dataset has {} rows",
                self.total_rows()
            );
        }
        let k = self.starts.partition_point(|&s| s <= index) - 1;
        let file = &self.files[k];
        let local = index - self.starts[k];
        let fields = file
            .row(local)
            .with_context(|| format!("row {index} ({})", file.rel))?;
        Ok(Row {
            index,
            file: file.rel.clone(),
            fields,
        })
    }

    /// All rows in order (the selected ones when restricted), read in batches (parquet) or
    /// line by line (JSON Lines).
    pub fn rows(&self) -> impl Iterator<Item = Result<Row>> + '_ {
        let kept = move |index: usize| {
            self.selection
                .as_ref()
                .is_none_or(|s| s.binary_search(&index).is_ok())
        };
        self.files.iter().enumerate().flat_map(move |(k, file)| {
            let start = self.starts[k];
            file.iter()
                .enumerate()
                .filter(move |(local, _)| kept(start + local))
                .map(move |(local, fields)| {
                    let index = start + local;
                    fields
                        .with_context(|| format!("row {index} ({})", file.rel))
                        .map(|fields| Row {
                            index,
                            file: file.rel.clone(),
                            fields,
                        })
                })
        })
    }
}

/// One data file and what random access into it needs.
#[derive(Debug)]
struct DataFile {
    rel: String,
    path: PathBuf,
    kind: DataKind,
}

#[derive(Debug)]
enum DataKind {
    Parquet {
        metadata: ArrowReaderMetadata,
        /// First row of each row group; one extra entry = total rows.
        group_starts: Vec<usize>,
    },
    JsonLines {
        /// Byte range and 1-based line number of each non-blank line.
        lines: Vec<(u64, usize, usize)>,
    },
    JsonArray {
        rows: Arc<Vec<BTreeMap<String, Value>>>,
    },
}

const PARQUET_BATCH_ROWS: usize = 256;

impl DataFile {
    fn open(root: &Path, rel: &str) -> Result<Self> {
        let path = root.join(rel);
        let ext = Path::new(rel)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let kind = match ext.as_str() {
            "parquet" => open_parquet(&path),
            "jsonl" | "ndjson" => index_json_lines(&path),
            "json" => {
                if first_non_space_byte(&path)? == Some(b'[') {
                    parse_json_array(&path)
                } else {
                    index_json_lines(&path)
                }
            }
            _ => bail!(
                "unsupported data file `{rel}`: expected one of .{}",
                DATA_EXTENSIONS.join(", .")
            ),
        }
        .with_context(|| format!("data file {}", path.display()))?;
        Ok(Self {
            rel: rel.to_string(),
            path,
            kind,
        })
    }

    fn len(&self) -> usize {
        match &self.kind {
            DataKind::Parquet { group_starts, .. } => *group_starts.last().unwrap(),
            DataKind::JsonLines { lines } => lines.len(),
            DataKind::JsonArray { rows } => rows.len(),
        }
    }

    fn row(&self, local: usize) -> Result<BTreeMap<String, Value>> {
        match &self.kind {
            DataKind::Parquet {
                metadata,
                group_starts,
            } => {
                let group = group_starts.partition_point(|&s| s <= local) - 1;
                let in_group = local - group_starts[group];
                let file = File::open(&self.path)
                    .with_context(|| format!("opening {}", self.path.display()))?;
                let selection =
                    RowSelection::from(vec![RowSelector::skip(in_group), RowSelector::select(1)]);
                let mut reader =
                    ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata.clone())
                        .with_row_groups(vec![group])
                        .with_row_selection(selection)
                        .with_batch_size(1)
                        .build()?;
                let batch = reader
                    .next()
                    .ok_or_else(|| anyhow!("row group {group} ended early"))??;
                batch_row(&batch, 0)
            }
            DataKind::JsonLines { lines } => {
                let (offset, len, line_no) = lines[local];
                let mut file = File::open(&self.path)?;
                file.seek(SeekFrom::Start(offset))?;
                let mut buf = vec![0u8; len];
                file.read_exact(&mut buf)?;
                parse_json_object(&buf).with_context(|| format!("line {line_no}"))
            }
            DataKind::JsonArray { rows } => Ok(rows[local].clone()),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Result<BTreeMap<String, Value>>> + '_> {
        match &self.kind {
            DataKind::Parquet { metadata, .. } => {
                let reader = File::open(&self.path)
                    .map_err(anyhow::Error::from)
                    .and_then(|file| {
                        Ok(ParquetRecordBatchReaderBuilder::new_with_metadata(
                            file,
                            metadata.clone(),
                        )
                        .with_batch_size(PARQUET_BATCH_ROWS)
                        .build()?)
                    });
                match reader {
                    Ok(reader) => Box::new(ParquetRows {
                        reader,
                        batch: None,
                        next: 0,
                    }),
                    Err(e) => Box::new(std::iter::once(Err(e))),
                }
            }
            DataKind::JsonLines { lines } => {
                let reader = File::open(&self.path).map(BufReader::new);
                match reader {
                    Ok(mut reader) => Box::new(lines.iter().map(move |&(offset, len, line_no)| {
                        reader.seek(SeekFrom::Start(offset))?;
                        let mut buf = vec![0u8; len];
                        reader.read_exact(&mut buf)?;
                        parse_json_object(&buf).with_context(|| format!("line {line_no}"))
                    })),
                    Err(e) => Box::new(std::iter::once(Err(e.into()))),
                }
            }
            DataKind::JsonArray { rows } => Box::new(rows.iter().cloned().map(Ok)),
        }
    }
}

struct ParquetRows {
    reader: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    next: usize,
}

impl Iterator for ParquetRows {
    type Item = Result<BTreeMap<String, Value>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(batch) = &self.batch {
                if self.next < batch.num_rows() {
                    self.next += 1;
                    return Some(batch_row(batch, self.next - 1));
                }
            }
            match self.reader.next()? {
                Ok(batch) => {
                    self.batch = Some(batch);
                    self.next = 0;
                }
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

fn batch_row(batch: &RecordBatch, row: usize) -> Result<BTreeMap<String, Value>> {
    let schema = batch.schema();
    let mut fields = BTreeMap::new();
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let value = Value::from_arrow(column.as_ref(), row)
            .with_context(|| format!("column `{}`", field.name()))?;
        fields.insert(field.name().clone(), value);
    }
    Ok(fields)
}

fn open_parquet(path: &Path) -> Result<DataKind> {
    let file = File::open(path).context("opening")?;
    let metadata = ArrowReaderMetadata::load(
        &file,
        // The offset index, when the writer stored one, lets `row(i)` skip whole pages.
        ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional),
    )
    .context("reading the parquet footer (not a parquet file, or truncated?)")?;
    let mut group_starts = vec![0usize];
    for group in metadata.metadata().row_groups() {
        let rows = usize::try_from(group.num_rows()).context("negative row count")?;
        group_starts.push(group_starts.last().unwrap() + rows);
    }
    Ok(DataKind::Parquet {
        metadata,
        group_starts,
    })
}

fn first_non_space_byte(path: &Path) -> Result<Option<u8>> {
    let mut reader = BufReader::new(File::open(path).context("opening")?);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(&b) = buf.iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(Some(b));
        }
        let n = buf.len();
        reader.consume(n);
    }
}

fn index_json_lines(path: &Path) -> Result<DataKind> {
    let mut reader = BufReader::new(File::open(path).context("opening")?);
    let mut lines = Vec::new();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    for line_no in 1.. {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.iter().any(|b| !b.is_ascii_whitespace()) {
            lines.push((offset, n, line_no));
        }
        offset += n as u64;
    }
    Ok(DataKind::JsonLines { lines })
}

fn parse_json_object(bytes: &[u8]) -> Result<BTreeMap<String, Value>> {
    if let Err(e) = std::str::from_utf8(bytes) {
        bail!(
            "not valid UTF-8 text (invalid byte at column {})",
            e.valid_up_to() + 1
        );
    }
    let json: serde_json::Value = serde_json::from_slice(bytes).context("invalid JSON")?;
    json_object(json)
}

fn json_object(json: serde_json::Value) -> Result<BTreeMap<String, Value>> {
    match Value::from_json(json) {
        Value::Struct(fields) => Ok(fields),
        other => bail!("expected a JSON object, got {}", other.type_name()),
    }
}

fn parse_json_array(path: &Path) -> Result<DataKind> {
    let reader = BufReader::new(File::open(path).context("opening")?);
    let items: Vec<serde_json::Value> =
        serde_json::from_reader(reader).context("invalid JSON array")?;
    let rows = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| json_object(item).with_context(|| format!("array element {i}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(DataKind::JsonArray {
        rows: Arc::new(rows),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use arrow_array::builder::{
        BinaryBuilder, Int64Builder, ListBuilder, StringBuilder, StructBuilder,
    };
    use arrow_array::{ArrayRef, StringArray};
    use arrow_schema::{DataType, Field, Fields, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    fn content_fields() -> Fields {
        Fields::from(vec![
            Field::new("index", DataType::Int64, true),
            Field::new("text", DataType::Utf8, true),
            Field::new("type", DataType::Utf8, true),
        ])
    }

    fn image_fields() -> Fields {
        Fields::from(vec![
            Field::new("bytes", DataType::Binary, true),
            Field::new("path", DataType::Utf8, true),
        ])
    }

    /// A llava-instruct-mix-vsft-shaped parquet: `messages` list<struct<content:
    /// list<struct<index,text,type>>, role>>, `images` list<struct<bytes,path>>, written in
    /// row groups of 2 so random access crosses group boundaries. Row r has r+1 turns of
    /// text `t{r}.{turn}` and one image of bytes [r; 3].
    fn write_llava_parquet(path: &Path, rows: usize) {
        let message_fields = Fields::from(vec![
            Field::new(
                "content",
                DataType::List(Arc::new(Field::new(
                    "item",
                    DataType::Struct(content_fields()),
                    true,
                ))),
                true,
            ),
            Field::new("role", DataType::Utf8, true),
        ]);
        let content_builder = || {
            ListBuilder::new(StructBuilder::new(
                content_fields(),
                vec![
                    Box::new(Int64Builder::new()),
                    Box::new(StringBuilder::new()),
                    Box::new(StringBuilder::new()),
                ],
            ))
        };
        let mut messages = ListBuilder::new(StructBuilder::new(
            message_fields,
            vec![Box::new(content_builder()), Box::new(StringBuilder::new())],
        ));
        let mut images = ListBuilder::new(StructBuilder::new(
            image_fields(),
            vec![
                Box::new(BinaryBuilder::new()),
                Box::new(StringBuilder::new()),
            ],
        ));
        for r in 0..rows {
            let msgs = messages.values();
            for turn in 0..=r {
                let content = msgs.field_builder::<ListBuilder<StructBuilder>>(0).unwrap();
                let items = content.values();
                if turn == 0 {
                    items
                        .field_builder::<Int64Builder>(0)
                        .unwrap()
                        .append_value(0);
                    items
                        .field_builder::<StringBuilder>(1)
                        .unwrap()
                        .append_null();
                    items
                        .field_builder::<StringBuilder>(2)
                        .unwrap()
                        .append_value("image");
                    items.append(true);
                }
                items
                    .field_builder::<Int64Builder>(0)
                    .unwrap()
                    .append_null();
                items
                    .field_builder::<StringBuilder>(1)
                    .unwrap()
                    .append_value(format!("t{r}.{turn}"));
                items
                    .field_builder::<StringBuilder>(2)
                    .unwrap()
                    .append_value("text");
                items.append(true);
                content.append(true);
                let role = if turn.is_multiple_of(2) {
                    "user"
                } else {
                    "assistant"
                };
                msgs.field_builder::<StringBuilder>(1)
                    .unwrap()
                    .append_value(role);
                msgs.append(true);
            }
            messages.append(true);
            let imgs = images.values();
            imgs.field_builder::<BinaryBuilder>(0)
                .unwrap()
                .append_value([r as u8; 3]);
            imgs.field_builder::<StringBuilder>(1)
                .unwrap()
                .append_null();
            imgs.append(true);
            images.append(true);
        }
        let messages: ArrayRef = Arc::new(messages.finish());
        let images: ArrayRef = Arc::new(images.finish());
        let ids: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..rows).map(|r| format!("id{r}")),
        ));
        let schema = Arc::new(Schema::new(vec![
            Field::new("messages", messages.data_type().clone(), true),
            Field::new("images", images.data_type().clone(), true),
            Field::new("id", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), vec![messages, images, ids]).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(2))
            .build();
        let mut writer =
            ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    fn check_llava_row(row: &Row, r: usize) {
        let messages = row.field("messages").unwrap().as_list().unwrap();
        assert_eq!(messages.len(), r + 1);
        let first = messages[0].get("content").unwrap().as_list().unwrap();
        assert_eq!(first[0].get("type").unwrap().as_str(), Some("image"));
        assert_eq!(first[0].get("index"), Some(&Value::Int(0)));
        assert_eq!(first[0].get("text"), Some(&Value::Null));
        assert_eq!(
            first[1].get("text").unwrap().as_str(),
            Some(format!("t{r}.0").as_str())
        );
        let last = messages[r].get("content").unwrap().as_list().unwrap();
        assert_eq!(
            last.last().unwrap().get("text").unwrap().as_str(),
            Some(format!("t{r}.{r}").as_str())
        );
        let role = if r.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        assert_eq!(messages[r].get("role").unwrap().as_str(), Some(role));
        let images = row.field("images").unwrap().as_list().unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(
            images[0].get("bytes").unwrap().as_bytes(),
            Some(&[r as u8; 3][..])
        );
        assert_eq!(images[0].get("path"), Some(&Value::Null));
        assert_eq!(
            row.field("id").unwrap().as_str(),
            Some(format!("id{r}").as_str())
        );
    }

    fn manifest(root: &Path, data_files: &[&str]) -> DatasetManifest {
        DatasetManifest {
            repo_id: None,
            revision: None,
            root: root.to_path_buf(),
            split: None,
            data_files: data_files.iter().map(|s| s.to_string()).collect(),
            files: data_files.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn parquet_nested_columns_sequential_and_random_access() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        write_llava_parquet(&dir.path().join("data/train-00000-of-00002.parquet"), 5);
        write_llava_parquet(&dir.path().join("data/train-00001-of-00002.parquet"), 3);
        let m = manifest(
            dir.path(),
            &[
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet",
            ],
        );
        m.write(dir.path()).unwrap();
        let ds = open(dir.path()).unwrap();
        assert_eq!(ds.len(), 8);
        let rows: Vec<Row> = ds.rows().collect::<Result<_>>().unwrap();
        assert_eq!(rows.len(), 8);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.index, i);
            let (file, r) = if i < 5 {
                ("data/train-00000-of-00002.parquet", i)
            } else {
                ("data/train-00001-of-00002.parquet", i - 5)
            };
            assert_eq!(row.file, file);
            check_llava_row(row, r);
        }
        // Random access in a shuffled order matches the sequential read.
        for i in [7, 0, 4, 2, 5, 3, 6, 1] {
            assert_eq!(ds.row(i).unwrap(), rows[i]);
        }
        let err = ds.row(8).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        let err = rows[0].field("question").unwrap_err().to_string();
        assert!(
            err.contains("row 0") && err.contains("train-00000") && err.contains("messages"),
            "{err}"
        );
    }

    #[test]
    fn json_array_and_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"[{"question": "q0", "input_image_path": ["./A/t/0.jpg", "./A/t/1.jpg"], "n": 1},
                {"question": "q1", "input_image_path": [], "n": 2.5}]"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.jsonl"),
            "{\"question\": \"q2\"}\n\n  \n{\"question\": \"q3\"}\n",
        )
        .unwrap();
        // A .json file holding JSON Lines, as `datasets` accepts.
        std::fs::write(dir.path().join("c.json"), "{\"question\": \"q4\"}\n").unwrap();
        let ds =
            Dataset::from_manifest(manifest(dir.path(), &["a.json", "b.jsonl", "c.json"])).unwrap();
        assert_eq!(ds.len(), 5);
        let rows: Vec<Row> = ds.rows().collect::<Result<_>>().unwrap();
        let questions: Vec<&str> = rows
            .iter()
            .map(|r| r.get("question").unwrap().as_str().unwrap())
            .collect();
        assert_eq!(questions, ["q0", "q1", "q2", "q3", "q4"]);
        assert_eq!(
            rows[0].get("input_image_path").unwrap().as_list().unwrap()[1].as_str(),
            Some("./A/t/1.jpg")
        );
        assert_eq!(rows[1].get("n"), Some(&Value::Float(2.5)));
        assert_eq!(ds.row(3).unwrap(), rows[3]);
        assert_eq!(ds.row(3).unwrap().file, "b.jsonl");
    }

    #[test]
    fn bad_json_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = b"{\"a\": \"ok\"}\n[1, 2]\n{\"a\": \"".to_vec();
        bytes.extend_from_slice(b"\xff\xfe\"}\n");
        std::fs::write(dir.path().join("bad.jsonl"), bytes).unwrap();
        let ds = Dataset::from_manifest(manifest(dir.path(), &["bad.jsonl"])).unwrap();
        let err = format!("{:#}", ds.row(1).unwrap_err());
        assert!(
            err.contains("row 1")
                && err.contains("bad.jsonl")
                && err.contains("line 2")
                && err.contains("expected a JSON object"),
            "{err}"
        );
        let err = format!("{:#}", ds.row(2).unwrap_err());
        assert!(
            err.contains("row 2 (bad.jsonl)")
                && err.contains("line 3")
                && err.contains("not valid UTF-8 text (invalid byte at column 8)"),
            "{err}"
        );
        let results: Vec<Result<Row>> = ds.rows().collect();
        assert!(results[0].is_ok() && results[1].is_err() && results[2].is_err());
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.parquet"), b"not parquet").unwrap();
        std::fs::write(dir.path().join("x.csv"), b"a,b").unwrap();
        let err = format!(
            "{:#}",
            Dataset::from_manifest(manifest(dir.path(), &["x.parquet"])).unwrap_err()
        );
        assert!(
            err.contains("x.parquet") && err.contains("parquet footer"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            Dataset::from_manifest(manifest(dir.path(), &["x.csv"])).unwrap_err()
        );
        assert!(err.contains("unsupported data file `x.csv`"), "{err}");
        let err = format!(
            "{:#}",
            Dataset::from_manifest(manifest(dir.path(), &["gone.jsonl"])).unwrap_err()
        );
        assert!(err.contains("gone.jsonl"), "{err}");
    }
}
