//! Learning-rate schedules, as `transformers.get_scheduler` defines them. `step` counts
//! optimizer steps already taken (0 for the first update); warmup rises linearly from 0.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

/// The multiplier of the base learning rate at `step` of `total` with `warmup` warmup steps.
pub fn lr_factor(kind: LrSchedule, step: u64, warmup: u64, total: u64) -> f64 {
    let (s, w, n) = (step as f64, warmup as f64, total as f64);
    if kind != LrSchedule::Constant && step < warmup {
        return s / w.max(1.0);
    }
    match kind {
        LrSchedule::Constant | LrSchedule::ConstantWithWarmup => 1.0,
        LrSchedule::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
        LrSchedule::Cosine => {
            let progress = (s - w) / (n - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay() {
        let f: Vec<f64> = (0..6).map(|s| lr_factor(LrSchedule::Linear, s, 2, 6)).collect();
        assert_eq!(f, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25]);
    }

    #[test]
    fn cosine_reaches_zero_at_the_end() {
        assert_eq!(lr_factor(LrSchedule::Cosine, 0, 0, 10), 1.0);
        assert!((lr_factor(LrSchedule::Cosine, 5, 0, 10) - 0.5).abs() < 1e-12);
        assert!(lr_factor(LrSchedule::Cosine, 10, 0, 10).abs() < 1e-12);
    }

    #[test]
    fn constant_ignores_warmup_and_constant_with_warmup_does_not() {
        assert_eq!(lr_factor(LrSchedule::Constant, 0, 5, 10), 1.0);
        assert_eq!(lr_factor(LrSchedule::ConstantWithWarmup, 1, 4, 10), 0.25);
    }
}
