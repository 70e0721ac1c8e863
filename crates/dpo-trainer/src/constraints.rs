//! The constraint set `S_pi` of a run, as a record.
//!
//! DPO's derivation assumes the policy minimizes the loss over *all* policies; a real run never
//! does (Prop. 3.1 of the paper). Each member below restricts the reachable policies; the record
//! says which were active and what they did, and goes into `run_summary.json`.

use serde::{Deserialize, Serialize};

use crate::config::{Precision, TrainConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightDecay {
    pub active: bool,
    pub value: f64,
    pub decayed_tensors: usize,
    pub exempt_tensors: usize,
    /// L2 norm of the decayed weights before the first and after the last step.
    pub weight_norm_start: f64,
    pub weight_norm_end: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepBudget {
    /// Always active: training stops after `allowed` optimizer steps.
    pub active: bool,
    pub allowed: u64,
    pub used: u64,
    pub from: String,
    pub epochs_allowed: f64,
    pub steps_per_epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub active: bool,
    pub patience: Option<u64>,
    pub threshold: f64,
    pub triggered: bool,
    pub triggered_at_step: Option<u64>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// Evaluations in a row without a threshold-sized improvement.
    pub counter: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GradClipping {
    pub active: bool,
    pub max_grad_norm: f64,
    pub clipped_steps: u64,
    pub steps: u64,
    /// Mean of `max_grad_norm / grad_norm` over the clipped steps (how hard they were cut).
    pub mean_clip_factor: Option<f64>,
    pub max_grad_norm_seen: f64,
    /// Running sum behind `mean_clip_factor` (kept for exact resume).
    pub clip_factor_sum: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Constraints {
    pub weight_decay: WeightDecay,
    pub step_budget: StepBudget,
    pub early_stopping: EarlyStopping,
    pub gradient_clipping: GradClipping,
    /// Numerical precision of the forward/backward (`f32`, or `bf16` over f32 master weights).
    pub precision: Precision,
    /// Capacity: every parameter of the policy is trainable.
    pub trainable_parameters: usize,
    /// How far the policy moved from the reference, measured at the end on the eval set.
    pub implicit_kl_to_reference: Option<ImplicitKl>,
    /// The names of the active members, for a quick read.
    pub active: Vec<String>,
}

/// The distance the constraints allowed the policy to travel from the reference, measured on
/// the eval pairs (teacher-forced: the contexts are the data's, not samples of the policy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImplicitKl {
    /// Mean over eval completion positions of `KL(pi_theta(.|x, y_<t) || pi_ref(.|x, y_<t))`,
    /// full vocabulary, in nats per token.
    pub per_token_kl_mean: f64,
    pub positions: usize,
    /// Mean `log pi_theta(y|x) - log pi_ref(y|x)` over the eval chosen / rejected responses
    /// (the implicit reward divided by beta).
    pub mean_log_ratio_chosen: f64,
    pub mean_log_ratio_rejected: f64,
}

impl Constraints {
    pub fn new(
        cfg: &TrainConfig,
        total_steps: u64,
        steps_per_epoch: u64,
        groups: (usize, usize),
        weight_norm_start: f64,
        trainable_parameters: usize,
    ) -> Self {
        let mut c = Constraints {
            weight_decay: WeightDecay {
                active: cfg.weight_decay > 0.0,
                value: cfg.weight_decay,
                decayed_tensors: groups.0,
                exempt_tensors: groups.1,
                weight_norm_start,
                weight_norm_end: None,
            },
            step_budget: StepBudget {
                active: true,
                allowed: total_steps,
                used: 0,
                from: if cfg.max_steps.is_some() { "max_steps" } else { "num_train_epochs" }.into(),
                epochs_allowed: total_steps as f64 / steps_per_epoch.max(1) as f64,
                steps_per_epoch,
            },
            early_stopping: EarlyStopping {
                active: cfg.early_stopping_patience.is_some(),
                patience: cfg.early_stopping_patience,
                threshold: cfg.early_stopping_threshold,
                triggered: false,
                triggered_at_step: None,
                best_eval_loss: None,
                best_step: None,
                counter: 0,
            },
            gradient_clipping: GradClipping {
                active: cfg.max_grad_norm > 0.0,
                max_grad_norm: cfg.max_grad_norm,
                clipped_steps: 0,
                steps: 0,
                mean_clip_factor: None,
                max_grad_norm_seen: 0.0,
                clip_factor_sum: 0.0,
            },
            precision: cfg.dtype.clone(),
            trainable_parameters,
            implicit_kl_to_reference: None,
            active: Vec::new(),
        };
        c.refresh_active();
        c
    }

    fn refresh_active(&mut self) {
        let mut a = vec!["step_budget", "capacity"];
        if self.weight_decay.active {
            a.push("weight_decay");
        }
        if self.gradient_clipping.active {
            a.push("gradient_clipping");
        }
        if self.early_stopping.active {
            a.push("early_stopping");
        }
        if self.precision == Precision::Bf16 {
            a.push("bf16_precision");
        }
        self.active = a.into_iter().map(String::from).collect();
    }

    /// Records one optimizer step's pre-clip gradient norm.
    pub fn record_step(&mut self, grad_norm: f64, clipped: bool) {
        self.step_budget.used += 1;
        let g = &mut self.gradient_clipping;
        g.steps += 1;
        g.max_grad_norm_seen = g.max_grad_norm_seen.max(grad_norm);
        if clipped {
            g.clipped_steps += 1;
            g.clip_factor_sum += g.max_grad_norm / (grad_norm + 1e-6);
            g.mean_clip_factor = Some(g.clip_factor_sum / g.clipped_steps as f64);
        }
    }

    /// HF's EarlyStoppingCallback on an evaluation; returns whether training should stop.
    /// The counter resets on an improvement larger than the threshold over the best value
    /// *before* this evaluation; the best value then moves on any strict improvement.
    pub fn record_eval(&mut self, step: u64, eval_loss: f64) -> bool {
        let e = &mut self.early_stopping;
        let improved = match e.best_eval_loss {
            None => true,
            Some(best) => eval_loss < best && (eval_loss - best).abs() > e.threshold,
        };
        e.counter = if improved { 0 } else { e.counter + 1 };
        if e.best_eval_loss.is_none_or(|best| eval_loss < best) {
            e.best_eval_loss = Some(eval_loss);
            e.best_step = Some(step);
        }
        let stop = e.patience.is_some_and(|p| e.counter >= p);
        if stop && !e.triggered {
            e.triggered = true;
            e.triggered_at_step = Some(step);
        }
        stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(patience: u64, threshold: f64) -> Constraints {
        let cfg = TrainConfig {
            early_stopping_patience: Some(patience),
            early_stopping_threshold: threshold,
            ..Default::default()
        };
        Constraints::new(&cfg, 10, 5, (3, 2), 1.0, 100)
    }

    #[test]
    fn early_stopping_follows_hf_semantics() {
        let mut c = record(2, 0.0);
        assert!(!c.record_eval(1, 1.0));
        assert!(!c.record_eval(2, 1.1)); // counter 1
        assert!(!c.record_eval(3, 0.9)); // improvement: counter 0
        assert!(!c.record_eval(4, 0.95)); // 1
        assert!(c.record_eval(5, 0.95)); // 2 >= patience
        let e = &c.early_stopping;
        assert!(e.triggered && e.triggered_at_step == Some(5));
        assert_eq!((e.best_eval_loss, e.best_step), (Some(0.9), Some(3)));
    }

    #[test]
    fn sub_threshold_improvement_counts_as_none_but_moves_the_best() {
        let mut c = record(1, 0.1);
        c.record_eval(1, 1.0);
        assert!(c.record_eval(2, 0.95));
        assert_eq!(c.early_stopping.best_eval_loss, Some(0.95));
    }

    #[test]
    fn clipping_statistics() {
        let mut c = record(1, 0.0);
        c.record_step(2.0, true);
        c.record_step(0.5, false);
        let g = &c.gradient_clipping;
        assert_eq!((g.clipped_steps, g.steps), (1, 2));
        assert!((g.mean_clip_factor.unwrap() - 1.0 / (2.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(c.step_budget.used, 2);
        assert!(
            c.active.iter().any(|a| a == "gradient_clipping")
                && c.active.iter().any(|a| a == "early_stopping")
        );
    }
}
