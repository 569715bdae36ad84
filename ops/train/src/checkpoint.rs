//! Training checkpoints: `<checkpoint_dir>/checkpoint-<step>/` holding
//!
//! - `adapter_config.json` + `adapter_model.safetensors`: the adapter at that step (a PEFT folder
//!   on its own, loadable as `init_adapter` or by PEFT);
//! - `optimizer.safetensors`: AdamW's `<key>.exp_avg` / `<key>.exp_avg_sq` (f32);
//! - `trainer_state.json`: [`TrainerState`] — step, scheduler length, data position (epoch,
//!   batch), RNG state (seed and the micro-batch counter the dropout masks derive from), the
//!   logging window and the settings fingerprint a resume must agree with;
//! - `metrics.jsonl`: every record logged so far, so a resumed run's output holds the whole curve.
//!
//! Each checkpoint is written into a hidden temporary folder beside it and renamed into place
//! when complete: a crash never leaves a `checkpoint-N` that looks whole but is not.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::metrics::{self, LogRecord, MetricsWriter};
use model::peft::{self, AdapterConfig, HostTensor};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const PREFIX: &str = "checkpoint-";

/// Host tensors by name: (shape, f32 values).
pub type HostTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Metric sums since the last log (transformers' `tr_loss` window and TRL's metric lists).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogWindow {
    /// Σ step losses since the last log.
    pub loss_sum: f64,
    pub steps: u64,
    /// One token accuracy per micro-batch since the last log.
    pub accuracies: Vec<f64>,
}

/// Where training stands after `global_step` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: u64,
    /// The run's length in optimizer steps (the scheduler's T).
    pub total_steps: u64,
    /// Data position: the next micro-batch is batch `next_batch` of epoch `next_epoch`.
    pub next_epoch: usize,
    pub next_batch: usize,
    /// Fractional epoch reached (transformers' `state.epoch`).
    pub epoch: f64,
    /// RNG state: the dropout base seed and the number of micro-batches run so far (each
    /// micro-batch's masks derive from (seed, module, call)).
    pub seed: u64,
    pub next_call: u64,
    /// Σ attention_mask over every micro-batch so far (TRL's `num_tokens`).
    pub num_tokens: u64,
    /// Σ of every step's loss (for the final `train_loss`).
    pub total_loss: f64,
    pub window: LogWindow,
    /// The settings that change the numbers (learning rate, schedule, accumulation, data
    /// shape, ...): a resume with different ones is refused.
    pub fingerprint: serde_json::Value,
    /// Data-parallel ranks of the run that wrote it (1 for checkpoints from before ranks
    /// existed): the data position and the global batch depend on it, so a resume needs the
    /// same number.
    #[serde(default = "one_rank")]
    pub world_size: usize,
}

fn one_rank() -> usize {
    1
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainerState,
    /// Adapter tensors by PEFT key.
    pub params: HostTensors,
    pub optimizer: HostTensors,
    pub metrics: Vec<LogRecord>,
}

fn to_host_tensors(t: &HostTensors) -> BTreeMap<String, HostTensor> {
    t.iter()
        .map(|(k, (shape, v))| (k.clone(), HostTensor::from_f32(shape.clone(), v)))
        .collect()
}

fn read_f32_safetensors(path: &Path) -> Result<HostTensors> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        ensure!(
            view.dtype() == safetensors::Dtype::F32,
            "{}: tensor `{name}` is {:?}, expected F32",
            path.display(),
            view.dtype()
        );
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The folder of the checkpoint after `step` steps.
pub fn checkpoint_path(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{PREFIX}{step}"))
}

/// Every complete checkpoint under `root`, oldest (lowest step) first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for entry in fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().join(STATE_FILE).is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `root`.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

/// Writes a checkpoint atomically and returns its folder.
pub fn write(
    root: &Path,
    adapter_config: &AdapterConfig,
    params: &HostTensors,
    optimizer: &HostTensors,
    state: &TrainerState,
    records: &[LogRecord],
) -> Result<PathBuf> {
    fs::create_dir_all(root)
        .with_context(|| format!("creating the checkpoint folder {}", root.display()))?;
    let final_dir = checkpoint_path(root, state.global_step);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{PREFIX}{}.tmp-", state.global_step))
        .tempdir_in(root)
        .with_context(|| format!("creating a temporary folder in {}", root.display()))?;
    let mut adapter_config = adapter_config.clone();
    adapter_config.inference_mode = true;
    peft::write_adapter(tmp.path(), &adapter_config, &to_host_tensors(params))?;
    let bytes = safetensors::serialize(to_host_tensors(optimizer).iter(), None)
        .context("serializing the optimizer state")?;
    fs::write(tmp.path().join(OPTIMIZER_FILE), bytes)?;
    fs::write(
        tmp.path().join(STATE_FILE),
        serde_json::to_string_pretty(state)?,
    )?;
    let mut m = MetricsWriter::open(&tmp.path().join(metrics::METRICS_FILE))?;
    for r in records {
        m.log(r)?;
    }
    for f in fs::read_dir(tmp.path())? {
        fs::File::open(f?.path())?.sync_all()?;
    }
    if final_dir.exists() {
        // A checkpoint of the same step from an earlier attempt: replace it whole.
        fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    let kept = tmp.keep();
    fs::rename(&kept, &final_dir)
        .with_context(|| format!("renaming {} to {}", kept.display(), final_dir.display()))?;
    Ok(final_dir)
}

/// Deletes the oldest checkpoints until at most `limit` remain (transformers'
/// `save_total_limit`; `limit` 0 is treated as 1 so the newest always survives).
pub fn prune(root: &Path, limit: usize) -> Result<Vec<PathBuf>> {
    let all = list(root)?;
    let excess = all.len().saturating_sub(limit.max(1));
    let mut removed = Vec::new();
    for (_, dir) in all.into_iter().take(excess) {
        fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// The checkpoint at rank 0's `dir` on every rank of a data-parallel run: rank 0 reads the
/// folder's files and broadcasts them, the others read them from a private temporary folder,
/// so no rank needs to see rank 0's filesystem. `dir` matters on rank 0 only; every rank's
/// [`Checkpoint::dir`] is rank 0's path.
pub fn broadcast(comm: &dyn dist::Comm, dir: Option<&Path>) -> Result<Checkpoint> {
    let mut packed = Vec::new();
    if comm.world().is_main() {
        let dir = dir.context("rank 0 names the checkpoint")?;
        let ck = read(dir)?; // checked before it is sent
        let name = dir.to_string_lossy().into_owned();
        push_field(&mut packed, name.as_bytes());
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() {
                let file = path.file_name().unwrap_or_default().to_string_lossy();
                push_field(&mut packed, file.as_bytes());
                push_field(
                    &mut packed,
                    &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                );
            }
        }
        comm.broadcast_bytes(0, &mut packed);
        return Ok(ck);
    }
    comm.broadcast_bytes(0, &mut packed);
    let mut fields = Fields(&packed);
    let name =
        String::from_utf8_lossy(fields.next().context("empty checkpoint message")?).into_owned();
    let tmp = tempfile::tempdir().context("creating a temporary folder for the checkpoint")?;
    while let Some(file) = fields.next() {
        let file = String::from_utf8_lossy(file).into_owned();
        ensure!(
            !file.contains('/') && !file.contains('\\') && file != ".." && file != ".",
            "rank 0 sent a checkpoint file named {file:?}"
        );
        let data = fields
            .next()
            .context("a checkpoint file without its bytes")?;
        fs::write(tmp.path().join(&file), data)?;
    }
    let mut ck = read(tmp.path()).with_context(|| format!("the checkpoint {name} from rank 0"))?;
    ck.dir = PathBuf::from(name);
    Ok(ck)
}

fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Length-prefixed fields of a [`push_field`] message.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let len = u64::from_le_bytes(self.0.get(..8)?.try_into().ok()?) as usize;
        let field = self.0.get(8..8 + len)?;
        self.0 = &self.0[8 + len..];
        Some(field)
    }
}

/// Reads a checkpoint folder.
pub fn read(dir: &Path) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        bail!(
            "{} is not a training checkpoint (no {STATE_FILE})",
            dir.display()
        );
    }
    let state: TrainerState = serde_json::from_slice(
        &fs::read(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("parsing {}", state_path.display()))?;
    let params = read_f32_safetensors(&dir.join(peft::WEIGHTS_FILE))?;
    let optimizer = read_f32_safetensors(&dir.join(OPTIMIZER_FILE))?;
    let metrics_path = dir.join(metrics::METRICS_FILE);
    let metrics = if metrics_path.exists() {
        metrics::read_metrics(&metrics_path)?
    } else {
        Vec::new()
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        params,
        optimizer,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::peft::TargetModules;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            global_step: step,
            total_steps: 10,
            next_epoch: 1,
            next_batch: 2,
            epoch: 1.5,
            seed: 42,
            next_call: 7,
            num_tokens: 1234,
            total_loss: 3.5,
            window: LogWindow {
                loss_sum: 1.25,
                steps: 1,
                accuracies: vec![0.5, 0.25],
            },
            fingerprint: serde_json::json!({"learning_rate": 1e-3}),
            world_size: 1,
        }
    }

    #[test]
    fn round_trip_atomic_and_pruned() {
        let root = tempfile::tempdir().unwrap();
        let config = AdapterConfig::new(2, 4.0, 0.0, TargetModules::Names(vec!["q_proj".into()]));
        let key_a = "base_model.model.model.layers.0.q_proj.lora_A.weight".to_string();
        let key_b = "base_model.model.model.layers.0.q_proj.lora_B.weight".to_string();
        let params: HostTensors = [
            (
                key_a.clone(),
                (vec![2, 3], vec![1.0, -2.0, 3.5, 0.25, 5.0, 6.0]),
            ),
            (key_b.clone(), (vec![4, 2], vec![0.5; 8])),
        ]
        .into_iter()
        .collect();
        let optimizer: HostTensors = [
            (format!("{key_a}.exp_avg"), (vec![2, 3], vec![0.125; 6])),
            (format!("{key_a}.exp_avg_sq"), (vec![2, 3], vec![1e-9; 6])),
        ]
        .into_iter()
        .collect();
        let rec = LogRecord {
            step: 1,
            loss: 2.0,
            grad_norm: 0.5,
            learning_rate: 1e-3,
            mean_token_accuracy: 0.5,
            num_tokens: 10,
            epoch: 0.5,
        };
        for step in 1..=3 {
            write(
                root.path(),
                &config,
                &params,
                &optimizer,
                &state(step),
                std::slice::from_ref(&rec),
            )
            .unwrap();
        }
        // A leftover temporary folder (a crash mid-write) is not a checkpoint.
        fs::create_dir_all(root.path().join(".checkpoint-4.tmp-x")).unwrap();
        assert_eq!(
            latest(root.path()).unwrap().unwrap(),
            checkpoint_path(root.path(), 3)
        );
        let back = read(&checkpoint_path(root.path(), 2)).unwrap();
        assert_eq!(back.state, state(2));
        assert_eq!(back.params, params);
        assert_eq!(back.optimizer, optimizer);
        assert_eq!(back.metrics, vec![rec]);
        // The adapter inside is a PEFT folder.
        let a = peft::read_adapter(&checkpoint_path(root.path(), 2)).unwrap();
        assert_eq!(a.tensors.len(), 2);
        let removed = prune(root.path(), 2).unwrap();
        assert_eq!(removed, vec![checkpoint_path(root.path(), 1)]);
        let steps: Vec<u64> = list(root.path()).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, vec![2, 3]);
        assert!(read(root.path()).is_err());
    }
}
