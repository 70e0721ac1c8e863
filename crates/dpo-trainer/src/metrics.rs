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
    /// Fraction of pairs whose chosen response the policy / the reference gives the higher
    /// log-prob (the model's own preference, before any reference is subtracted).
    pub policy_prefers_chosen: f64,
    pub reference_prefers_chosen: f64,
    /// Per pair: the reference's "noise" `log gamma = beta (log pi_ref(y_l) - log pi_ref(y_w))`.
    pub log_gamma: Vec<f64>,
    /// Per pair: `|d loss / d margin|`, how hard the pair pulls on the policy.
    pub grad_weight: Vec<f64>,
}

impl BatchStats {
    /// The TRL-named metrics of this batch, excluding `loss`.
    fn named(&self) -> [(&'static str, f64); 8] {
        [
            ("rewards/chosen", self.chosen_reward),
            ("rewards/rejected", self.rejected_reward),
            ("rewards/accuracies", self.accuracy),
            ("rewards/margins", self.margin),
            ("logps/chosen", self.chosen_logp),
            ("logps/rejected", self.rejected_logp),
            ("preference/policy", self.policy_prefers_chosen),
            ("preference/reference", self.reference_prefers_chosen),
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
        insert_noise(&mut out, "", &self.batches);
        *self = Window::default();
        out
    }
}

/// Whether a record's field measures the machine (throughput, memory) rather than training: the
/// fields two runs of the same training may differ in.
pub fn is_measurement(key: &str) -> bool {
    key == "tokens_per_second" || key.starts_with("memory/")
}

/// Averages of an evaluation pass, keys prefixed with `eval_`.
pub fn eval_metrics(batches: &[BatchStats]) -> Map<String, Value> {
    let pairs: usize = batches.iter().map(|b| b.pairs).sum();
    let loss = batches.iter().map(|b| b.loss * b.pairs as f64).sum::<f64>() / pairs.max(1) as f64;
    let mut out = Map::new();
    out.insert("eval_loss".into(), loss.into());
    insert_batch_means(&mut out, "eval_", batches);
    insert_noise(&mut out, "eval_", batches);
    out
}

fn insert_batch_means(out: &mut Map<String, Value>, prefix: &str, batches: &[BatchStats]) {
    let Some(first) = batches.first() else { return };
    for (i, (name, _)) in first.named().iter().enumerate() {
        let values: Vec<f64> = batches.iter().map(|b| b.named()[i].1).collect();
        out.insert(format!("{prefix}{name}"), mean(&values).into());
    }
}

/// The noise-adaptive view of the paper (Sec. 5, eq. 12), over every pair of the window:
/// DPO's per-pair penalty is `log(gamma + u)` with the reference's odds against the chosen
/// response as the "noise" `gamma`; `gamma > 1` means the reference already prefers the
/// rejected response. Which pairs drive the update is read off the gradient weights.
fn insert_noise(out: &mut Map<String, Value>, prefix: &str, batches: &[BatchStats]) {
    let lg: Vec<f64> = batches.iter().flat_map(|b| b.log_gamma.iter().copied()).collect();
    let gw: Vec<f64> = batches.iter().flat_map(|b| b.grad_weight.iter().copied()).collect();
    if lg.is_empty() || lg.len() != gw.len() {
        return;
    }
    let wrong: Vec<bool> = lg.iter().map(|&g| g > 0.0).collect();
    let pick = |want: bool| -> Vec<f64> {
        gw.iter().zip(&wrong).filter(|(_, w)| **w == want).map(|(g, _)| *g).collect()
    };
    let n_wrong = wrong.iter().filter(|&&w| w).count();
    let mut put = |k: &str, v: f64| {
        out.insert(format!("{prefix}noise/{k}"), v.into());
    };
    put("log_gamma_mean", mean(&lg));
    for (name, q) in [("log_gamma_q10", 0.1), ("log_gamma_q50", 0.5), ("log_gamma_q90", 0.9)] {
        put(name, quantile(&lg, q));
    }
    put("ref_wrong_fraction", n_wrong as f64 / lg.len() as f64);
    put("grad_weight_mean", mean(&gw));
    put("grad_weight_q90", quantile(&gw, 0.9));
    // Mean pull of the pairs the reference gets wrong (gamma > 1) and right (gamma < 1).
    if n_wrong > 0 {
        put("grad_weight_mean_ref_wrong", mean(&pick(true)));
    }
    if n_wrong < lg.len() {
        put("grad_weight_mean_ref_right", mean(&pick(false)));
    }
}

/// Linear-interpolated quantile (numpy's default).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
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
    fn noise_statistics_over_the_window() {
        let mut w = Window::default();
        w.push(BatchStats { log_gamma: vec![-1.0, 2.0], grad_weight: vec![0.2, 0.8], ..stats(1.0, 2, 1.0) });
        w.push(BatchStats { log_gamma: vec![0.5, -3.0], grad_weight: vec![0.6, 0.1], ..stats(1.0, 2, 1.0) });
        let m = w.drain();
        assert_eq!(m["noise/log_gamma_mean"], -0.375);
        assert_eq!(m["noise/ref_wrong_fraction"], 0.5);
        assert_eq!(m["noise/log_gamma_q50"], -0.25);
        assert!((m["noise/grad_weight_mean_ref_wrong"].as_f64().unwrap() - 0.7).abs() < 1e-12);
        assert!((m["noise/grad_weight_mean_ref_right"].as_f64().unwrap() - 0.15).abs() < 1e-12);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.1), 1.3);
    }

    #[test]
    fn eval_loss_is_pair_weighted() {
        let m = eval_metrics(&[stats(1.0, 4, 1.0), stats(4.0, 2, 0.0)]);
        assert_eq!(m["eval_loss"], 2.0);
        assert_eq!(m["eval_rewards/accuracies"], 0.5);
    }
}
