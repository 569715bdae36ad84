//! Greedy choice of the next token on the GPU (`shaders/greedy.wgsl`): each row's argmax as
//! torch.argmax picks it, the pad id for rows that have stopped, and stop marks kept on the GPU,
//! so a decode step can take its input ids from the previous step without the host reading the
//! logits in between. Reference: [`crate::reference::greedy`].

use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

use crate::gpu::{DType, Gpu, GpuTensor, Recorder, Shader};

fn shader() -> Result<Shader> {
    Shader::compose("greedy", &[])
}

/// Every module and entry point this family dispatches (validated by `gpu::shader`'s tests).
pub(crate) fn variants() -> Result<Vec<super::Variant>> {
    Ok(vec![(shader()?, vec!["choose", "choose4"])])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    vocab: u32,
    first_row: u32,
    stop_count: u32,
    pad_id: u32,
}

/// The rows of a greedy generation as the GPU tracks them between steps.
pub struct GreedyRows {
    /// `[max(stop ids, 1)]` u32 (one unused word when there are none).
    stop_ids: GpuTensor,
    stop_count: u32,
    /// `[rows]` u32: 1 once a row has produced a stop id.
    stopped: GpuTensor,
    pad_id: u32,
}

impl GreedyRows {
    pub fn rows(&self) -> usize {
        self.stopped.numel()
    }
}

impl Gpu {
    /// `rows` rows that have not stopped; a row stops after producing one of `stop_ids`, and is
    /// fed `pad_id` from then on.
    pub fn greedy_rows(&self, rows: usize, stop_ids: &[u32], pad_id: u32) -> Result<GreedyRows> {
        ensure!(rows > 0, "greedy choice needs at least one row");
        let words = if stop_ids.is_empty() {
            &[0][..]
        } else {
            stop_ids
        };
        Ok(GreedyRows {
            stop_ids: self.upload_u32(&[words.len()], words)?,
            stop_count: stop_ids.len() as u32,
            stopped: self.upload_u32(&[rows], &vec![0; rows])?,
            pad_id,
        })
    }

    /// `logits [rows, vocab]` (f32, chunked or not) -> the next ids `[rows]` u32: each row's
    /// argmax (the first maximum, a NaN above every number), or the pad id for a row that has
    /// stopped; marks rows whose id is a stop id as stopped.
    pub fn choose_greedy(
        &self,
        rec: &mut Recorder,
        logits: &GpuTensor,
        state: &GreedyRows,
    ) -> Result<GpuTensor> {
        let rows = state.rows();
        ensure!(
            logits.dtype() == DType::F32 && logits.shape().len() == 2 && logits.rows() == rows,
            "choose_greedy: logits must be f32 [{rows}, vocab], got {:?} {:?}",
            logits.dtype(),
            logits.shape()
        );
        let vocab = logits.row_len();
        ensure!(
            vocab > 0 && vocab < u32::MAX as usize,
            "choose_greedy: vocabulary of {vocab}"
        );
        let ids = self.empty(&[rows], DType::U32)?;
        let entry = if vocab.is_multiple_of(4) {
            "choose4"
        } else {
            "choose"
        };
        let kernel = self.kernel(&shader()?, entry, &[])?;
        for c in logits.chunks() {
            let p = Params {
                vocab: vocab as u32,
                first_row: c.first_row as u32,
                stop_count: state.stop_count,
                pad_id: state.pad_id,
            };
            rec.dispatch(
                &kernel,
                bytemuck::bytes_of(&p),
                &[
                    state.stop_ids.view()?,
                    state.stopped.view()?,
                    ids.view()?,
                    c.view(),
                ],
                [c.rows as u32, 1, 1],
            );
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{test_gpu, tiny_binding_gpu, TestRng};
    use crate::reference::greedy as reference;

    /// Random rows with the cases argmax must get right planted in them: a maximum repeated
    /// (the first wins), a NaN (wins over every number; the first NaN), a row of equal values,
    /// -inf and +inf, and a maximum in the last position; then three steps with stop ids.
    fn check(gpu: &Gpu, vocab: usize, rows: usize, seed: u64) {
        let mut rng = TestRng::new(seed);
        let mut logits = rng.vec_normal(rows * vocab);
        let row = |r: usize| r % rows * vocab;
        if vocab > 1 {
            let tie = rng.below(vocab - 1);
            logits[row(0) + tie] = 50.0;
            logits[row(0) + vocab - 1] = 50.0;
        }
        if rows > 1 {
            let at = row(1) + rng.below(vocab);
            logits[at] = f32::NAN;
            logits[row(1) + vocab - 1] = f32::NAN;
        }
        if rows > 2 {
            logits[row(2)..row(2) + vocab].fill(-1.5);
        }
        if rows > 3 {
            logits[row(3)..row(3) + vocab].fill(f32::NEG_INFINITY);
        }
        if rows > 4 {
            logits[row(4) + vocab - 1] = f32::INFINITY;
        }
        let stop_ids: Vec<u32> = (0..3).map(|_| rng.below(vocab) as u32).collect();
        let pad_id = rng.below(vocab) as u32;
        let state = gpu.greedy_rows(rows, &stop_ids, pad_id).unwrap();
        let mut stopped = vec![false; rows];
        for step in 0..3 {
            // from the second step, some rows' maxima are stop ids
            if step > 0 {
                for r in (step - 1..rows).step_by(2) {
                    let at = row(r) + stop_ids[r % 3] as usize;
                    logits[at] = 1e30;
                }
            }
            let t = gpu.upload_f32(&[rows, vocab], &logits).unwrap();
            let mut rec = Recorder::new(gpu);
            let ids = gpu.choose_greedy(&mut rec, &t, &state).unwrap();
            gpu.poison(&ids);
            rec.submit();
            let want = reference::choose_next(&logits, vocab, &mut stopped, &stop_ids, pad_id);
            assert_eq!(
                gpu.read_u32(&ids).unwrap(),
                want,
                "seed {seed}: vocab {vocab}, {rows} rows, step {step}"
            );
            let marks: Vec<bool> = gpu
                .read_u32(&state.stopped)
                .unwrap()
                .iter()
                .map(|&s| s != 0)
                .collect();
            assert_eq!(marks, stopped, "seed {seed}: stop marks, step {step}");
        }
        assert!(stopped.iter().any(|&s| s), "the test must stop some row");
    }

    #[test]
    fn greedy_choice_matches_reference() {
        let seed = TestRng::fresh_seed();
        // odd (scalar reads), multiples of 4 (vec4 reads), fewer than 256, one value
        for (vocab, rows) in [(301, 7), (1000, 5), (4099, 3), (7, 6), (1, 2), (32768, 1)] {
            check(test_gpu(), vocab, rows, seed ^ vocab as u64);
        }
    }

    #[test]
    fn greedy_choice_over_chunked_logits() {
        // 4 KiB bindings: three rows of 301 per chunk, two of 512
        let seed = TestRng::fresh_seed();
        check(tiny_binding_gpu(), 301, 8, seed);
        check(tiny_binding_gpu(), 512, 5, seed ^ 1);
    }

    #[test]
    fn the_reference_is_torch_argmax() {
        // hand-computed: first maximum; a NaN beats every number, the first NaN wins
        assert_eq!(reference::argmax(&[0.0, 2.0, -1.0, 2.0]), 1);
        assert_eq!(reference::argmax(&[0.0, f32::NAN, 9.0, f32::NAN]), 1);
        assert_eq!(reference::argmax(&[f32::NAN, 9.0]), 0);
        assert_eq!(reference::argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(reference::argmax(&[-0.0, 0.0]), 0);
        let mut stopped = vec![false, true, false];
        let ids = reference::choose_next(&[0.0, 1.0, 1.0, 0.0, 5.0, 4.0], 2, &mut stopped, &[0], 7);
        assert_eq!(ids, vec![1, 7, 0]);
        assert_eq!(stopped, vec![false, true, true]);
    }
}
