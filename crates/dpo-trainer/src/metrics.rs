//! Per-batch statistics and their averages over a logging window, under TRL's metric names.
//!
//! TRL's averaging: `loss` is the mean over optimizer steps of each step's mean micro-batch loss;
//! `rewards/*` and `logps/*` are plain means over all micro-batches of the window. In eval,
//! `eval_loss` is weighted by pairs, the other `eval_*` metrics are plain means over batches.

use serde_json::{Map, Value};

/// What one micro-batch contributes to the logs (each a mean over its pairs).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct BatchStats {
    pub loss: f64,
    pub pairs: usize,
    pub tokens: usize,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub accuracy: f64,
    pub margin: f64,
    pub chosen_logp: f64,
    pub rejected_logp: f64,
}

impl BatchStats {
    /// The TRL-named metrics of this batch, excluding `loss`.
    fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("rewards/chosen", self.chosen_reward),
            ("rewards/rejected", self.rejected_reward),
            ("rewards/accuracies", self.accuracy),
            ("rewards/margins", self.margin),
            ("logps/chosen", self.chosen_logp),
            ("logps/rejected", self.rejected_logp),
        ]
    }
}

/// Micro-batches since the last log, grouped by optimizer step.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Window {
    batches: Vec<BatchStats>,
    step_losses: Vec<f64>,
    open_step: Vec<f64>,
}

impl Window {
    pub fn push(&mut self, s: BatchStats) {
        self.open_step.push(s.loss);
        self.batches.push(s);
    }

    /// Closes the current optimizer step (its loss is the mean over its micro-batches).
    pub fn end_step(&mut self) {
        if !self.open_step.is_empty() {
            self.step_losses.push(mean(&self.open_step));
            self.open_step.clear();
        }
    }

    /// The loss of the last closed step (NaN before any).
    pub fn last_step_loss(&self) -> f64 {
        self.step_losses.last().copied().unwrap_or(f64::NAN)
    }

    pub fn tokens(&self) -> usize {
        self.batches.iter().map(|b| b.tokens).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// `loss` and the TRL metrics averaged over the window; empties it.
    pub fn drain(&mut self) -> Map<String, Value> {
        self.end_step();
        let mut out = Map::new();
        out.insert("loss".into(), mean(&self.step_losses).into());
        insert_batch_means(&mut out, "", &self.batches);
        *self = Window::default();
        out
    }
}

/// Averages of an evaluation pass, keys prefixed with `eval_`.
pub fn eval_metrics(batches: &[BatchStats]) -> Map<String, Value> {
    let pairs: usize = batches.iter().map(|b| b.pairs).sum();
    let loss = batches.iter().map(|b| b.loss * b.pairs as f64).sum::<f64>() / pairs.max(1) as f64;
    let mut out = Map::new();
    out.insert("eval_loss".into(), loss.into());
    insert_batch_means(&mut out, "eval_", batches);
    out
}

fn insert_batch_means(out: &mut Map<String, Value>, prefix: &str, batches: &[BatchStats]) {
    let Some(first) = batches.first() else { return };
    for (i, (name, _)) in first.named().iter().enumerate() {
        let values: Vec<f64> = batches.iter().map(|b| b.named()[i].1).collect();
        out.insert(format!("{prefix}{name}"), mean(&values).into());
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(loss: f64, pairs: usize, acc: f64) -> BatchStats {
        BatchStats { loss, pairs, accuracy: acc, ..Default::default() }
    }

    #[test]
    fn train_loss_is_mean_of_step_means_and_metrics_are_batch_means() {
        let mut w = Window::default();
        w.push(stats(1.0, 4, 1.0));
        w.push(stats(3.0, 4, 0.0));
        w.end_step(); // step loss 2
        w.push(stats(5.0, 1, 0.5));
        let m = w.drain(); // step loss 5
        assert_eq!(m["loss"], 3.5);
        assert_eq!(m["rewards/accuracies"], 0.5);
        assert!(w.is_empty());
    }

    #[test]
    fn eval_loss_is_pair_weighted() {
        let m = eval_metrics(&[stats(1.0, 4, 1.0), stats(4.0, 2, 0.0)]);
        assert_eq!(m["eval_loss"], 2.0);
        assert_eq!(m["eval_rewards/accuracies"], 0.5);
    }
}
