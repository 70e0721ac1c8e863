//! One micro-batch through the policy and the reference: sequence log-probs, the loss, stats.

use candle_core::{Device, Result, Tensor};
use dpo_loader::Batch;
use dpo_model::{AttentionMask, CausalLm};

use crate::config::LossType;
use crate::logprobs::{CompletionIndex, sequence_logps};
use crate::loss::{self, LossOutput, PairLogps};
use crate::metrics::BatchStats;

/// A batch on the device: token ids, attention bias, and which positions are scored.
pub struct DeviceBatch {
    pub ids: Tensor,
    pub mask: AttentionMask,
    pub index: CompletionIndex,
    pub pairs: usize,
    pub tokens: usize,
}

impl DeviceBatch {
    pub fn new(batch: &Batch, window: Option<usize>, device: &Device) -> Result<Self> {
        let (rows, seq) = (batch.n_rows(), batch.seq_len);
        Ok(DeviceBatch {
            ids: Tensor::from_slice(&batch.input_ids, (rows, seq), device)?,
            mask: AttentionMask::causal(&batch.attention_mask, rows, seq, window, device)?,
            index: CompletionIndex::new(&batch.input_ids, &batch.completion_mask, rows, seq, device)?,
            pairs: batch.n_pairs,
            tokens: batch.n_tokens,
        })
    }

    /// Per-sequence completion log-probs under `model`, `[2 * pairs]`: chosen rows, then rejected.
    pub fn logps(&self, model: &CausalLm, chunk: usize) -> Result<Tensor> {
        let hidden = model.hidden_states(&self.ids, &self.mask)?;
        sequence_logps(&hidden, &model.lm_head()?, &self.index, chunk)
    }
}

/// `[chosen..., rejected...]` log-probs of policy and reference, split into pairs.
pub fn pair_logps(policy: &Tensor, reference: &Tensor, pairs: usize) -> Result<PairLogps> {
    Ok(PairLogps {
        policy_chosen: policy.narrow(0, 0, pairs)?,
        policy_rejected: policy.narrow(0, pairs, pairs)?,
        ref_chosen: reference.narrow(0, 0, pairs)?,
        ref_rejected: reference.narrow(0, pairs, pairs)?,
    })
}

/// The loss of `loss_type` on a batch of pairs.
pub fn loss_of(loss_type: LossType, x: &PairLogps, beta: f64) -> Result<LossOutput> {
    match loss_type {
        LossType::Sigmoid => loss::sigmoid(x, beta),
    }
}

/// The mean loss (differentiable) and the batch's statistics.
pub fn score(x: &PairLogps, out: &LossOutput, tokens: usize) -> Result<(Tensor, BatchStats)> {
    let mean_loss = out.per_pair.mean_all()?;
    let v = |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(candle_core::DType::F64)?.to_vec1() };
    let (rw, rl) = (v(&out.chosen_rewards)?, v(&out.rejected_rewards)?);
    let avg = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let margins: Vec<f64> = rw.iter().zip(&rl).map(|(a, b)| a - b).collect();
    let wins: Vec<f64> = rw.iter().zip(&rl).map(|(a, b)| if a > b { 1.0 } else { 0.0 }).collect();
    let stats = BatchStats {
        loss: mean_loss.to_dtype(candle_core::DType::F64)?.to_scalar()?,
        pairs: rw.len(),
        tokens,
        chosen_reward: avg(&rw),
        rejected_reward: avg(&rl),
        accuracy: avg(&wins),
        margin: avg(&margins),
        chosen_logp: avg(&v(&x.policy_chosen)?),
        rejected_logp: avg(&v(&x.policy_rejected)?),
    };
    Ok((mean_loss, stats))
}
