//! Learning-rate schedules exactly as transformers' `get_scheduler` builds them (LambdaLR over
//! `optimization.py`'s lambdas), and the warmup length as `TrainingArguments.get_warmup_steps`.
//!
//! [`LrSchedule::lr`] gives the rate used by the optimizer step that follows `steps_done`
//! earlier steps (the first step uses `lr(0)`), which is also what transformers 5.24 logs as
//! `learning_rate` for that step.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl ScheduleKind {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            other => bail!(
                "lr_scheduler_type {other:?} is not supported; use \"linear\", \"cosine\", \"constant\" or \"constant_with_warmup\""
            ),
        })
    }
}

/// The warmup length in steps: `warmup_steps` when ≥ 1 (whole steps), a fraction of the run
/// when in (0, 1) (transformers 5 `get_warmup_steps`), otherwise `ceil(total · warmup_ratio)`
/// (transformers 4's `warmup_ratio`, used only when `warmup_steps` is 0).
pub fn warmup_steps(total_steps: u64, warmup_steps: f64, warmup_ratio: f64) -> Result<u64> {
    if !(warmup_steps >= 0.0 && (0.0..=1.0).contains(&warmup_ratio)) {
        bail!("warmup_steps must be ≥ 0 and warmup_ratio in [0, 1] (got {warmup_steps}, {warmup_ratio})");
    }
    if warmup_steps > 0.0 && warmup_ratio > 0.0 {
        bail!("set warmup_steps or warmup_ratio, not both");
    }
    Ok(if warmup_steps >= 1.0 {
        warmup_steps as u64
    } else if warmup_steps > 0.0 {
        (total_steps as f64 * warmup_steps).ceil() as u64
    } else {
        (total_steps as f64 * warmup_ratio).ceil() as u64
    })
}

/// A schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The multiplier of `base_lr` after `steps_done` scheduler steps (the LambdaLR lambda).
    pub fn factor(&self, steps_done: u64) -> f64 {
        let (s, w, t) = (
            steps_done as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if self.kind != ScheduleKind::Constant && steps_done < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                // num_cycles = 0.5: half a cosine from 1 down to 0.
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of the optimizer step that follows `steps_done` steps.
    pub fn lr(&self, steps_done: u64) -> f64 {
        self.base_lr * self.factor(steps_done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1e-3,
            warmup_steps: warmup,
            total_steps: total,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 * b.abs().max(1e-300)
    }

    #[test]
    fn linear_matches_transformers() {
        // transformers get_linear_schedule_with_warmup(num_warmup_steps=2, num_training_steps=10):
        // lambdas 0, .5, 1, 7/8, 6/8, ..., 1/8, 0.
        let s = sched(ScheduleKind::Linear, 2, 10);
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        for (step, w) in want.iter().enumerate() {
            assert!(close(s.factor(step as u64), *w), "step {step}");
        }
        // The golden run: lr0 (T − s)/T with T = 3, no warmup.
        let g = LrSchedule {
            base_lr: 1e-2,
            ..sched(ScheduleKind::Linear, 0, 3)
        };
        assert_eq!(g.lr(0), 0.01);
        assert!(close(g.lr(1), 0.006666666666666666));
        assert!(close(g.lr(2), 0.003333333333333333));
    }

    #[test]
    fn cosine_matches_transformers() {
        // get_cosine_schedule_with_warmup(num_warmup_steps=1, num_training_steps=5): after warmup
        // progress p = (s−1)/4 and factor 0.5(1 + cos(πp)): 1, .853553, .5, .146447, 0.
        let s = sched(ScheduleKind::Cosine, 1, 5);
        let want = [
            0.0,
            1.0,
            0.853_553_390_593_273_8,
            0.5,
            0.146_446_609_406_726_24,
            0.0,
        ];
        for (step, w) in want.iter().enumerate() {
            assert!(
                (s.factor(step as u64) - w).abs() < 1e-15,
                "step {step}: {} vs {w}",
                s.factor(step as u64)
            );
        }
    }

    #[test]
    fn constant_schedules() {
        let c = sched(ScheduleKind::Constant, 3, 10);
        assert_eq!(c.factor(0), 1.0, "constant ignores warmup");
        let cw = sched(ScheduleKind::ConstantWithWarmup, 4, 10);
        assert_eq!(cw.factor(1), 0.25);
        assert_eq!(cw.factor(4), 1.0);
        assert_eq!(cw.factor(10), 1.0);
    }

    #[test]
    fn warmup_length_as_training_arguments() {
        assert_eq!(warmup_steps(100, 5.0, 0.0).unwrap(), 5);
        // transformers 5: a float below 1 is a ratio, rounded up.
        assert_eq!(warmup_steps(7, 0.1, 0.0).unwrap(), 1);
        assert_eq!(warmup_steps(100, 0.03, 0.0).unwrap(), 3);
        // transformers 4 warmup_ratio: ceil(T·ratio).
        assert_eq!(warmup_steps(33, 0.0, 0.1).unwrap(), 4);
        assert_eq!(warmup_steps(33, 0.0, 0.0).unwrap(), 0);
        assert!(warmup_steps(33, 2.0, 0.1).is_err());
        assert!(ScheduleKind::parse("polynomial").is_err());
    }
}
