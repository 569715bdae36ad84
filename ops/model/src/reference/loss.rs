//! The causal-LM loss of `Gemma3ForConditionalGeneration` with transformers' Trainer
//! normalisation: cross-entropy of `logits[:, :-1]` against `labels[:, 1:]`, ignoring -100,
//! summed and divided by `num_items_in_batch` (the label tokens of the whole accumulated batch;
//! transformers 5.24 + TRL 1.16), or the guide-era mean of micro-batch means.

use anyhow::{ensure, Result};

use engine::reference::cross_entropy::IGNORE_INDEX;

/// How a micro-batch's summed cross-entropy becomes its share of the step loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossNormalization {
    /// `Σ CE / num_items` where `num_items` counts the label tokens of every micro-batch of the
    /// optimizer step (transformers 5.24 default). A lone batch: its own label count.
    TokenMean { num_items: usize },
    /// `(Σ CE / this micro-batch's count) / accumulation_steps` (transformers ~4.53-4.55, where
    /// Gemma 3 had `accepts_loss_kwargs = False`).
    MicroBatchMean { accumulation_steps: usize },
}

impl LossNormalization {
    /// The factor the summed loss (and so every gradient) of a micro-batch with `counted`
    /// label tokens is multiplied by.
    pub fn scale(&self, counted: usize) -> Result<f64> {
        match *self {
            LossNormalization::TokenMean { num_items } => {
                ensure!(
                    num_items > 0,
                    "num_items_in_batch is 0: the batch has no label tokens"
                );
                Ok(1.0 / num_items as f64)
            }
            LossNormalization::MicroBatchMean { accumulation_steps } => {
                ensure!(counted > 0, "the micro-batch has no label tokens");
                ensure!(
                    accumulation_steps > 0,
                    "accumulation_steps must be at least 1"
                );
                Ok(1.0 / (counted * accumulation_steps) as f64)
            }
        }
    }
}

/// Shifted labels `[batch, seq]`: row `t` holds `labels[t + 1]` (the token position `t`
/// predicts), the last position of each row is ignored. With `crop_to_attention_mask`, positions
/// whose `attention_mask[t + 1]` is 0 are ignored too (`Gemma3ForConditionalGeneration.forward`
/// of transformers 4.5x; 5.24 does not crop, which gives the same loss when padding labels are
/// -100 as the collator writes them).
pub fn shift_labels(
    labels: &[i64],
    attention_mask: &[u32],
    batch: usize,
    seq: usize,
    crop_to_attention_mask: bool,
) -> Vec<i32> {
    let mut out = vec![IGNORE_INDEX; batch * seq];
    for b in 0..batch {
        for t in 0..seq.saturating_sub(1) {
            let next = b * seq + t + 1;
            if crop_to_attention_mask && attention_mask[next] == 0 {
                continue;
            }
            out[b * seq + t] = labels[next] as i32;
        }
    }
    out
}

/// Label tokens a micro-batch contributes to `num_items_in_batch`.
pub fn count_label_tokens(shifted: &[i32]) -> usize {
    shifted.iter().filter(|&&l| l != IGNORE_INDEX).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_and_normalisations() {
        // 1 row, 5 tokens: position t predicts labels[t+1]; the last position predicts nothing.
        let labels = [5, -100, 7, 8, 9];
        let mask = [1, 1, 1, 1, 0];
        assert_eq!(
            shift_labels(&labels, &mask, 1, 5, false),
            vec![-100, 7, 8, 9, -100]
        );
        assert_eq!(
            shift_labels(&labels, &mask, 1, 5, true),
            vec![-100, 7, 8, -100, -100]
        );
        assert_eq!(count_label_tokens(&[-100, 7, 8, -100]), 2);
        // Token mean over 10 items of the accumulated batch; micro-batch mean of 4 tokens, GA 2.
        assert_eq!(
            LossNormalization::TokenMean { num_items: 10 }
                .scale(4)
                .unwrap(),
            0.1
        );
        let mbm = LossNormalization::MicroBatchMean {
            accumulation_steps: 2,
        };
        assert_eq!(mbm.scale(4).unwrap(), 0.125);
        assert!(LossNormalization::TokenMean { num_items: 0 }
            .scale(0)
            .is_err());
    }
}
