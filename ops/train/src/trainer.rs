//! The training loop of transformers' Trainer (5.24) + TRL's SFTTrainer, over any
//! [`TrainModel`]: accumulation cycles per epoch (the last, short cycle of an epoch steps with
//! its real micro-batches only), the loss normalised over the label tokens of the whole cycle
//! (`num_items_in_batch`), global-norm clipping, torch AdamW and the LR schedule on the GPU;
//! logs every `logging_steps` (metrics.jsonl + TensorBoard), checkpoints, resume, and a stop on
//! a non-finite loss or gradient.
//!
//! Per optimizer step the host reads back only the `[4]` cross-entropy totals of each
//! micro-batch and the gradient norm.
//!
//! Under several data-parallel ranks ([`dist`]) each rank's stream holds every
//! `world_size`-th micro-batch; a step gathers the label counts first (the normalisation covers
//! the global batch), numbers dropout calls by global position, sums the gradients across ranks
//! as the last micro-batch's backward finishes them ([`super::grad_sync`]), and sums loss terms,
//! accuracies and tokens in the global order, so every rank takes the step one process with
//! `world_size ×` the accumulation takes; rank 0 alone writes logs, checkpoints and the adapter.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::checkpoint::{self, HostTensors, LogWindow, TrainerState};
use super::grad_sync::{GradSync, ReadbackPool};
use super::metrics::{self, LogRecord, MetricsWriter};
use super::optimizer::{record_norm_and_clip, write_f32, zero_grads, GpuAdamW, Optim};
use super::schedule::{warmup_steps, LrSchedule};
use super::tensorboard::EventWriter;
use data::collate::Batch;
use dist::distinct_rows;
use engine::gpu::{DType, Gpu, Recorder};
use model::peft::{self, AdapterConfig, HostTensor};
use model::reference::loss::{count_label_tokens, shift_labels};
use model::train_model::{Parameter, TrainModel};
use op_api::Progress;

pub use super::sources::{BatchSource, StreamSource, VecSource};
pub use super::train_config::{
    LossNormalizationKind, NonFiniteError, Resume, SaveStrategy, TrainConfig, TrainOutputs,
    TrainSummary,
};

/// The steps a run takes: `(updates per epoch, total steps, epochs to stream)`, as
/// transformers' `set_initial_training_values`.
pub fn run_length(batches_per_epoch: usize, cfg: &TrainConfig) -> Result<(u64, u64, usize)> {
    ensure!(batches_per_epoch > 0, "the batch stream is empty");
    ensure!(
        cfg.gradient_accumulation_steps > 0,
        "gradient_accumulation_steps must be at least 1"
    );
    let per_epoch = batches_per_epoch
        .div_ceil(cfg.gradient_accumulation_steps)
        .max(1) as u64;
    let total = match cfg.max_steps {
        Some(m) => m,
        None => (cfg.num_train_epochs * per_epoch as f64).ceil() as u64,
    };
    ensure!(
        total > 0,
        "nothing to train: num_train_epochs {} and max_steps {:?} give 0 steps",
        cfg.num_train_epochs,
        cfg.max_steps
    );
    Ok((per_epoch, total, total.div_ceil(per_epoch) as usize))
}

/// The settings a resumed run must share with the checkpoint for the same curve.
fn fingerprint(cfg: &TrainConfig, batches_per_epoch: usize, total_steps: u64) -> serde_json::Value {
    serde_json::json!({
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_steps,
        "warmup_ratio": cfg.warmup_ratio,
        "adamw": cfg.adamw,
        "max_grad_norm": cfg.max_grad_norm,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "loss_normalization": cfg.loss_normalization,
        "seed": cfg.seed,
        "batches_per_epoch": batches_per_epoch,
        "total_steps": total_steps,
    })
}

/// The trainable tensors read back by PEFT key.
pub fn params_to_host(gpu: &Gpu, params: &[Parameter]) -> Result<HostTensors> {
    params
        .iter()
        .map(|p| {
            Ok((
                p.key.clone(),
                (p.value.shape().to_vec(), gpu.read_f32(&p.value)?),
            ))
        })
        .collect()
}

/// Shifted label tokens of a micro-batch, counted as the reference's `train_step` counts them.
fn label_tokens(b: &Batch) -> usize {
    let mask: Vec<u32> = b.attention_mask.iter().map(|&v| v as u32).collect();
    count_label_tokens(&shift_labels(
        &b.labels,
        &mask,
        b.batch_size,
        b.seq_len,
        true,
    ))
}

fn gpu_errors_to_result(
    step: u64,
    validation: Option<wgpu::Error>,
    memory: Option<wgpu::Error>,
) -> Result<()> {
    if let Some(e) = memory {
        bail!(
            "the GPU ran out of memory at step {step}: {e}. Lower the batch size or sequence length (collate: batch_size, max_length), or set gradient_checkpointing = true"
        );
    }
    if let Some(e) = validation {
        bail!("GPU error at step {step}: {e}");
    }
    Ok(())
}

/// Trains `model` on `data`; writes the final adapter (PEFT folder with `adapter_config`) into
/// `outputs.out_dir`. The model's parameters must hold the initial adapter.
#[allow(clippy::too_many_arguments)]
pub fn train(
    gpu: &Gpu,
    model: &mut dyn TrainModel,
    data: &dyn BatchSource,
    cfg: &TrainConfig,
    adapter_config: &AdapterConfig,
    outputs: &TrainOutputs,
    resume: &Resume,
    progress: &dyn Progress,
) -> Result<TrainSummary> {
    train_with_optim(
        gpu,
        model,
        data,
        cfg,
        Optim::AdamWTorch,
        adapter_config,
        outputs,
        resume,
        progress,
    )
}

/// [`train`] with the AdamW states where `optim` puts them. It is no part of the resume
/// fingerprint: both keep the same state, so a run may resume with the other.
#[allow(clippy::too_many_arguments)]
pub fn train_with_optim(
    gpu: &Gpu,
    model: &mut dyn TrainModel,
    data: &dyn BatchSource,
    cfg: &TrainConfig,
    optim: Optim,
    adapter_config: &AdapterConfig,
    outputs: &TrainOutputs,
    resume: &Resume,
    progress: &dyn Progress,
) -> Result<TrainSummary> {
    let started = Instant::now();
    let comm = dist::comm();
    let (rank, world) = comm.map_or((0, 1), |c| (c.world().rank, c.world().size));
    // Rank 0 alone writes what the run leaves behind; the others only compute.
    let main = rank == 0;
    let bpe = data.batches_per_epoch();
    let (_, total_steps, epochs) = run_length(bpe, cfg)?;
    let ga = cfg.gradient_accumulation_steps;
    ensure!(cfg.logging_steps > 0, "logging_steps must be at least 1");
    let schedule = LrSchedule {
        kind: cfg.lr_scheduler_type,
        base_lr: cfg.learning_rate,
        warmup_steps: warmup_steps(total_steps, cfg.warmup_steps, cfg.warmup_ratio)?,
        total_steps,
    };
    let params = model.parameters();
    ensure!(!params.is_empty(), "the model has no trainable tensors");
    let mut optimizer = GpuAdamW::with_optim(gpu, &params, cfg.adamw, optim)?;
    let mut state = TrainerState {
        global_step: 0,
        total_steps,
        next_epoch: 0,
        next_batch: 0,
        epoch: 0.0,
        seed: cfg.seed,
        next_call: 0,
        num_tokens: 0,
        total_loss: 0.0,
        window: LogWindow::default(),
        fingerprint: fingerprint(cfg, bpe, total_steps),
        world_size: world,
    };
    let mut records = Vec::new();

    // Under several ranks rank 0 alone looks for the checkpoint (the others may not see its
    // filesystem) and sends it.
    let resume_dir = match resume {
        Resume::No => None,
        _ if !main => None,
        Resume::Latest => Some(checkpoint::latest(&outputs.checkpoint_dir)?.with_context(|| {
            format!(
                "resume_from_checkpoint = true, but {} holds no checkpoint (set it to false to start afresh)",
                outputs.checkpoint_dir.display()
            )
        })?),
        Resume::Path(p) => Some(p.clone()),
    };
    let checkpoint = match (comm, &resume_dir) {
        (None, Some(dir)) => Some(checkpoint::read(dir)?),
        (None, None) => None,
        (Some(_), _) if matches!(resume, Resume::No) => None,
        // Rank 0 reads it and sends it: the other ranks need no view of its filesystem.
        (Some(c), _) => Some(checkpoint::broadcast(c, resume_dir.as_deref())?),
    };
    if let Some(ck) = checkpoint {
        let dir = &ck.dir;
        if ck.state.world_size != world {
            bail!(
                "{} was written by a run on {} rank(s) and this run has {world}: its data position and global batch (batch_size x ranks x gradient_accumulation_steps) belong to {} rank(s); resume with the same number of ranks (mpirun -n {}), or start afresh (resume_from_checkpoint = false)",
                dir.display(),
                ck.state.world_size,
                ck.state.world_size,
                ck.state.world_size
            );
        }
        if ck.state.fingerprint != state.fingerprint {
            bail!(
                "{} was written with other training settings ({}) than this run's ({}); resume with the same settings or start afresh",
                dir.display(),
                ck.state.fingerprint,
                state.fingerprint
            );
        }
        let mut rec = Recorder::new(gpu);
        ensure!(
            ck.params.len() == params.len(),
            "{}: the checkpoint holds {} adapter tensors, the model {}",
            dir.display(),
            ck.params.len(),
            params.len()
        );
        for p in &params {
            let (shape, values) = ck
                .params
                .get(&p.key)
                .with_context(|| format!("{}: the checkpoint has no `{}`", dir.display(), p.key))?;
            ensure!(
                shape.as_slice() == p.value.shape(),
                "{}: `{}` has shape {shape:?}, the model's {:?}",
                dir.display(),
                p.key,
                p.value.shape()
            );
            write_f32(gpu, &mut rec, &p.value, values)?;
        }
        optimizer
            .load(gpu, &mut rec, &ck.optimizer, ck.state.global_step)
            .with_context(|| format!("{}", dir.display()))?;
        rec.submit_and_wait()?;
        state = ck.state;
        records = ck.metrics;
        records.retain(|r| r.step <= state.global_step);
        progress.println(format!(
            "resuming from {} (step {} of {total_steps})",
            dir.display(),
            state.global_step
        ));
    }

    std::fs::create_dir_all(&outputs.out_dir)?;
    let mut metrics_out = main
        .then(|| MetricsWriter::create_with(&outputs.out_dir.join(metrics::METRICS_FILE), &records))
        .transpose()?;
    let mut tensorboard = match &outputs.tensorboard_dir {
        Some(dir) if main => {
            let mut w = EventWriter::create(dir)?;
            for r in &records {
                w.add_scalars(r.step as i64, &r.tensorboard_scalars())?;
            }
            Some(w)
        }
        _ => None,
    };

    progress.set_length(total_steps);
    progress.inc(state.global_step);
    let first_step = state.global_step;
    let mut last_checkpoint = resume_dir.clone();
    let mut stream = data.open(epochs, state.next_epoch, state.next_batch)?;
    let norm = gpu.empty(&[1], DType::F32)?;
    let (mut allreduce_total, mut allreduce_max) = (0u64, 0u64);
    let mut readback = ReadbackPool::default();

    while state.global_step < total_steps {
        let step_no = state.global_step + 1;
        let (epoch, first) = (state.next_epoch, state.next_batch);
        let cycle = ga.min(bpe - first);
        let mut micro = Vec::with_capacity(cycle);
        for k in 0..cycle {
            let b = stream
                .next()
                .with_context(|| {
                    format!(
                        "the batch stream ended early (epoch {epoch}, batch {})",
                        first + k
                    )
                })?
                .with_context(|| format!("making batch {} of epoch {epoch}", first + k))?;
            ensure!(
                b.epoch == epoch && b.index_in_epoch == first + k,
                "the batch stream gave batch {} of epoch {} where batch {} of epoch {epoch} was due",
                b.index_in_epoch,
                b.epoch,
                first + k
            );
            micro.push(b);
        }
        let counts: Vec<usize> = micro.iter().map(label_tokens).collect();
        // The step's micro-batches over all ranks, in the global order (rank r's k-th is the
        // global k·W + r-th): one process with W× the accumulation sees these, in this order.
        let global_len = cycle * world;
        let global_counts: Vec<usize> = match comm {
            None => counts.clone(),
            Some(c) => in_global_order(
                &c.all_gather_u64(&counts.iter().map(|&n| n as u64).collect::<Vec<_>>()),
                world,
                cycle,
                1,
            )
            .into_iter()
            .map(|n| n as usize)
            .collect(),
        };
        let num_items: usize = global_counts.iter().sum();
        // Row-sparse gradients travel as the rows some rank's batches touch.
        let mut small_bytes = 16 * cycle as u64;
        let sparse = match comm {
            None => Default::default(),
            Some(c) => {
                let mut sparse = std::collections::BTreeMap::new();
                for p in 0..params.len() {
                    let mine: Option<Vec<u32>> = micro
                        .iter()
                        .map(|b| model.gradient_rows(p, b))
                        .collect::<Option<Vec<_>>>()
                        .map(|rows| distinct_rows(rows.into_iter().flatten()));
                    if let Some(mine) = mine {
                        small_bytes += 4 * mine.len() as u64 + 8;
                        let all = c.all_gather_var_u32(&mine);
                        sparse.insert(p, distinct_rows(all.into_iter().flatten()));
                    }
                }
                sparse
            }
        };
        let sparse_rows: usize = sparse.values().map(Vec::len).sum();
        let mut sync = comm.map(|c| GradSync::new(c, &params, &mut readback, sparse));

        let memory_scope = gpu
            .device()
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = gpu.device().push_error_scope(wgpu::ErrorFilter::Validation);
        zero_grads(gpu, &params);
        // Per micro-batch: its loss term, token accuracy and attention-mask tokens.
        let mut terms: Vec<[f64; 3]> = Vec::with_capacity(cycle);
        for (k, (b, &counted)) in micro.iter().zip(&counts).enumerate() {
            let scale = match cfg.loss_normalization {
                LossNormalizationKind::TokenMean => 1.0 / num_items.max(1) as f64,
                LossNormalizationKind::MicroBatchMean if counted == 0 => 0.0,
                LossNormalizationKind::MicroBatchMean => 1.0 / (counted * global_len) as f64,
            };
            // Dropout masks follow the micro-batch's place in the global order.
            let call = state.next_call + (k * world + rank) as u64;
            let mut rec = Recorder::new(gpu);
            let totals = match sync.as_mut() {
                // The last micro-batch's backward finishes each gradient: sum it across ranks
                // while the rest of the backward runs.
                Some(sync) if k + 1 == cycle => {
                    model.accumulate_notify(gpu, &mut rec, b, scale as f32, call, &mut |indices| {
                        sync.ready(gpu, indices)
                    })
                }
                _ => model.accumulate(gpu, &mut rec, b, scale as f32, call),
            }
            .with_context(|| {
                format!(
                    "step {step_no}: forward/backward of batch {} of epoch {}",
                    b.index_in_epoch, b.epoch
                )
            })?;
            rec.submit();
            if let Some(sync) = sync.as_mut().filter(|_| k + 1 == cycle) {
                sync.drain(gpu)?;
            }
            let stats = gpu
                .read_cross_entropy_totals(&totals)
                .with_context(|| format!("step {step_no}: reading the loss"))?;
            terms.push([
                stats.loss_sum * scale,
                if stats.counted > 0 {
                    stats.correct as f64 / stats.counted as f64
                } else {
                    0.0
                },
                b.attention_mask.iter().sum::<i64>() as f64,
            ]);
        }
        let terms: Vec<[f64; 3]> = match comm {
            None => terms,
            Some(c) => {
                let bits: Vec<u64> = terms.iter().flatten().map(|v| v.to_bits()).collect();
                in_global_order(&c.all_gather_u64(&bits), world, cycle, 3)
                    .chunks(3)
                    .map(|t| [0, 1, 2].map(|i| f64::from_bits(t[i])))
                    .collect()
            }
        };
        // Summed in the global order, as one process sums its micro-batches.
        let mut loss = 0.0f64;
        for [term, accuracy, tokens] in terms {
            loss += term;
            state.window.accuracies.push(accuracy);
            state.num_tokens += tokens as u64;
        }
        state.next_call += global_len as u64;
        if let Some(sync) = sync {
            let (buckets, early) = (sync.buckets, sync.started_early);
            let gradients = sync.finish(gpu)?;
            let bytes = gradients + small_bytes;
            if step_no == first_step + 1 {
                progress.println(format!(
                    "data-parallel step on {world} ranks: all-reduce of {bytes} bytes per rank per step ({:.1} MiB): {gradients} bytes of gradients in {buckets} buckets ({sparse_rows} embed_tokens rows; {early} already summing when the backward was all queued), + {small_bytes} bytes of label counts, losses and row ids",
                    bytes as f64 / (1u64 << 20) as f64,
                ));
            }
            allreduce_total += bytes;
            allreduce_max = allreduce_max.max(bytes);
        }
        let mut rec = Recorder::new(gpu);
        record_norm_and_clip(gpu, &mut rec, &params, &norm, cfg.max_grad_norm)?;
        rec.submit();
        let grad_norm = gpu
            .read_f32(&norm)
            .with_context(|| format!("step {step_no}: reading the gradient norm"))?[0]
            as f64;
        if !loss.is_finite() || !grad_norm.is_finite() {
            drop(validation_scope);
            drop(memory_scope);
            return Err(NonFiniteError {
                step: step_no,
                what: if loss.is_finite() {
                    "gradient norm"
                } else {
                    "loss"
                },
                loss,
                grad_norm,
                last_checkpoint,
            }
            .into());
        }
        let lr = schedule.lr(state.global_step);
        let mut rec = Recorder::new(gpu);
        optimizer.step(gpu, &mut rec, &params, lr)?;
        rec.submit();
        gpu.wait()
            .with_context(|| format!("step {step_no}: the GPU stopped responding"))?;
        let validation = pollster::block_on(validation_scope.pop());
        let memory = pollster::block_on(memory_scope.pop());
        gpu_errors_to_result(step_no, validation, memory)?;

        // Bookkeeping as transformers: global_step, fractional epoch, data position.
        state.global_step = step_no;
        let last_index = first + cycle - 1;
        state.epoch = epoch as f64 + (last_index + 1) as f64 / bpe as f64;
        let epoch_done = last_index + 1 == bpe;
        (state.next_epoch, state.next_batch) = if epoch_done {
            (epoch + 1, 0)
        } else {
            (epoch, last_index + 1)
        };
        state.total_loss += loss;
        state.window.loss_sum += loss;
        state.window.steps += 1;

        if step_no.is_multiple_of(cfg.logging_steps) {
            let w = std::mem::take(&mut state.window);
            let record = LogRecord {
                step: step_no,
                loss: w.loss_sum / w.steps as f64,
                grad_norm,
                learning_rate: lr,
                mean_token_accuracy: w.accuracies.iter().sum::<f64>()
                    / w.accuracies.len().max(1) as f64,
                num_tokens: state.num_tokens,
                epoch: state.epoch,
            };
            if let Some(m) = metrics_out.as_mut() {
                m.log(&record)?;
            }
            if let Some(tb) = tensorboard.as_mut() {
                tb.add_scalars(step_no as i64, &record.tensorboard_scalars())?;
            }
            records.push(record);
        }

        let last = step_no >= total_steps;
        let save = match cfg.save_strategy {
            SaveStrategy::No => false,
            SaveStrategy::Steps(n) => last || (n > 0 && step_no.is_multiple_of(n)),
            SaveStrategy::Epoch => last || epoch_done,
        };
        if save && !main {
            last_checkpoint = Some(checkpoint::checkpoint_path(
                &outputs.checkpoint_dir,
                step_no,
            ));
        } else if save {
            let dir = checkpoint::write(
                &outputs.checkpoint_dir,
                adapter_config,
                &params_to_host(gpu, &params)?,
                &optimizer.to_host(gpu)?,
                &state,
                &records,
            )?;
            if let Some(limit) = cfg.save_total_limit {
                checkpoint::prune(&outputs.checkpoint_dir, limit)?;
            }
            if let Some(tb) = tensorboard.as_mut() {
                tb.sync()?;
            }
            last_checkpoint = Some(dir);
        }

        progress.inc(1);
        let done = (step_no - first_step) as f64;
        let per_step = started.elapsed().as_secs_f64() / done;
        progress.message(format!(
            "step {step_no}/{total_steps} loss {loss:.4} lr {lr:.3e} ETA {}",
            format_duration(per_step * (total_steps - step_no) as f64)
        ));
    }

    let summary = TrainSummary {
        global_step: state.global_step,
        total_steps,
        epoch: state.epoch,
        train_loss: state.total_loss / state.global_step.max(1) as f64,
        records,
        resumed_from: resume_dir,
        last_checkpoint,
        seconds: started.elapsed().as_secs_f64(),
        steps_run: state.global_step - first_step,
        world_size: world,
        allreduce_bytes_total: allreduce_total,
        allreduce_bytes_max: allreduce_max,
    };
    if !main {
        return Ok(summary);
    }
    let host = params_to_host(gpu, &params)?;
    // Each tensor in its training dtype, as PEFT saves a model's parameters: the bf16
    // modules_to_save copies as bf16 (exact: the values are bf16), the LoRA pairs as f32.
    let bf16_keys: std::collections::BTreeSet<&str> = params
        .iter()
        .filter(|p| p.value.dtype() == DType::BF16)
        .map(|p| p.key.as_str())
        .collect();
    let tensors: std::collections::BTreeMap<String, HostTensor> = host
        .iter()
        .map(|(k, (shape, v))| {
            let t = if bf16_keys.contains(k.as_str()) {
                HostTensor::from_f32_as_bf16(shape.clone(), v)
            } else {
                HostTensor::from_f32(shape.clone(), v)
            };
            (k.clone(), t)
        })
        .collect();
    peft::write_adapter(&outputs.out_dir, adapter_config, &tensors)?;
    if let Some(tb) = tensorboard.as_mut() {
        tb.sync()?;
    }
    let trainer_state = serde_json::json!({
        "global_step": summary.global_step,
        "max_steps": summary.total_steps,
        "epoch": summary.epoch,
        "train_loss": summary.train_loss,
        "train_runtime": summary.seconds,
        "log_history": summary.records,
    });
    std::fs::write(
        outputs.out_dir.join(checkpoint::STATE_FILE),
        serde_json::to_string_pretty(&trainer_state)?,
    )?;
    Ok(summary)
}

/// Gathered per-micro-batch values (`per` each, rank after rank, `cycle` micro-batches per
/// rank) in the global order: rank r's k-th micro-batch is the global (k·world + r)-th.
fn in_global_order(all: &[u64], world: usize, cycle: usize, per: usize) -> Vec<u64> {
    let mut out = vec![0u64; all.len()];
    for r in 0..world {
        for k in 0..cycle {
            let (from, to) = ((r * cycle + k) * per, (k * world + r) * per);
            out[to..to + per].copy_from_slice(&all[from..from + per]);
        }
    }
    out
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_values_are_put_in_the_global_order() {
        // 2 ranks x 3 micro-batches, 2 values each: rank 0 holds globals 0, 2, 4, rank 1 1, 3, 5.
        let all = [0, 0, 2, 2, 4, 4, 1, 1, 3, 3, 5, 5];
        assert_eq!(
            in_global_order(&all, 2, 3, 2),
            vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        );
        assert_eq!(in_global_order(&[7, 8], 1, 2, 1), vec![7, 8]);
    }
}
