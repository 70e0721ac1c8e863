//! One micro-batch through the policy and the reference: sequence log-probs, the loss, stats.

use candle_core::{Device, Result, Tensor};
use dpo_loader::Batch;
use dpo_model::{AttentionMask, CausalLm};

use crate::config::{LossType, TrainConfig};
use crate::logprobs::{CompletionIndex, LmHead, sequence_logps};
use crate::loss::{self, LossOutput, PairLogps};
use crate::metrics::BatchStats;

/// A batch on the device: token ids, attention bias, and which positions are scored.
pub struct DeviceBatch {
    pub ids: Tensor,
    pub mask: AttentionMask,
    pub index: CompletionIndex,
    /// Completion tokens per row, `[chosen..., rejected...]` (TRL's `completion_mask.sum(1)`).
    pub completion_lengths: Vec<usize>,
    pub pairs: usize,
    pub tokens: usize,
}

/// A batch laid out for the model but still on the host: the trainer builds it on the
/// prefetch thread, so that a step only uploads it ([`HostBatch::upload`]). The prefix-sharing
/// layout's mask alone is `pairs * width^2` entries (4.7 M for 8 pairs of 256 + 256 + 256).
#[derive(Debug, Clone)]
pub struct HostBatch {
    ids: Vec<u32>,
    rows: usize,
    seq: usize,
    mask: HostMask,
    /// Scored positions: `(flat position r * seq + t, target token, owning sequence)`.
    scored: Vec<(u32, u32, usize)>,
    completion_lengths: Vec<usize>,
    pairs: usize,
    tokens: usize,
}

#[derive(Debug, Clone)]
enum HostMask {
    /// Causal, with key padding (1 on real tokens) and an optional sliding window.
    Causal { key_valid: Vec<u8>, window: Option<usize> },
    /// `allowed[(r * seq + i) * seq + j]` (0/1) and each token's rotary position.
    Custom { allowed: Vec<u8>, positions: Vec<u32> },
}

impl HostBatch {
    /// `batch` in the prefix-sharing layout where `prefix_sharing`, else as collated.
    pub fn of(batch: &Batch, prefix_sharing: bool, window: Option<usize>) -> Self {
        if prefix_sharing { Self::shared_prefix(batch, window) } else { Self::standard(batch, window) }
    }

    /// The batch as collated: one row per sequence, `[chosen..., rejected...]`.
    pub fn standard(batch: &Batch, window: Option<usize>) -> Self {
        let (rows, seq) = (batch.n_rows(), batch.seq_len);
        HostBatch {
            ids: batch.input_ids.clone(),
            rows,
            seq,
            mask: HostMask::Causal { key_valid: batch.attention_mask.clone(), window },
            scored: CompletionIndex::scored(&batch.input_ids, &batch.completion_mask, rows, seq),
            completion_lengths: completion_lengths(batch),
            pairs: batch.n_pairs,
            tokens: batch.n_tokens,
        }
    }

    /// The same pairs with each prompt computed once (prefix sharing): one row per pair,
    /// `[prompt, chosen, rejected]`, where the rejected tokens see the prompt but not the chosen
    /// ones and restart their positions after the prompt. Log-probs are those of the standard
    /// layout; about a third fewer tokens go through the model when prompt and completions
    /// are of similar length.
    pub fn shared_prefix(batch: &Batch, window: Option<usize>) -> Self {
        let (b, seq) = (batch.n_pairs, batch.seq_len);
        let row = |r: usize| -> (&[u32], usize, usize) {
            let mask = &batch.completion_mask[r * seq..(r + 1) * seq];
            let len = batch.attention_mask[r * seq..(r + 1) * seq].iter().filter(|&&m| m != 0).count();
            let prompt = mask[..len].iter().take_while(|&&m| m == 0).count();
            (&batch.input_ids[r * seq..r * seq + len], prompt, len)
        };
        let layouts: Vec<_> = (0..b).map(|i| (row(i), row(b + i))).collect();
        let width = layouts.iter().map(|((_, p, lc), (_, _, lr))| lc + (lr - p)).max().unwrap_or(1).max(1);
        // Padding slots hold token 0; they only attend to themselves and are never scored.
        let mut ids = vec![0u32; b * width];
        let mut positions = vec![0u32; b * width];
        let mut allowed = vec![0u8; b * width * width];
        let mut scored = Vec::new();
        for (i, ((chosen, p, lc), (rejected, p_r, lr))) in layouts.iter().enumerate() {
            debug_assert_eq!(p, p_r, "chosen and rejected rows share their prompt");
            let (p, lc, lr) = (*p, *lc, *lr);
            let seg_r = lr - p; // rejected completion tokens, placed after the chosen ones
            let base = i * width;
            ids[base..base + lc].copy_from_slice(chosen);
            ids[base + lc..base + lc + seg_r].copy_from_slice(&rejected[p..]);
            // Slot t's part: prompt [0, p), chosen [p, lc), rejected [lc, lc + seg_r); a query
            // sees the prompt and its own branch up to itself (and, with a window, only keys
            // less than `window` positions back).
            let pos_of = |t: usize| if t < lc { t } else { p + t - lc };
            for t in 0..lc + seg_r {
                positions[base + t] = pos_of(t) as u32;
                let row = &mut allowed[(base + t) * width..(base + t + 1) * width];
                let branch_start = if t < p {
                    0
                } else if t < lc {
                    p
                } else {
                    lc
                };
                row[..p.min(t + 1)].fill(1);
                row[branch_start.max(p.min(t + 1))..=t].fill(1);
                if let Some(w) = window {
                    for (u, a) in row.iter_mut().enumerate().take(t + 1) {
                        *a &= u8::from(pos_of(t) < pos_of(u) + w);
                    }
                }
            }
            for t in lc + seg_r..width {
                allowed[(base + t) * width + t] = 1; // padding: attend to itself only
            }
            // Scored positions: hidden state predicting each completion token (TRL never scores
            // the first token of a sequence, so with an empty prompt the first is skipped).
            for k in 0..lc - p {
                let target_slot = p + k;
                if target_slot > 0 {
                    scored.push(((base + target_slot - 1) as u32, chosen[p + k], i));
                }
            }
            for k in 0..seg_r {
                let pred = if k == 0 { p.checked_sub(1) } else { Some(lc + k - 1) };
                if let Some(pred) = pred {
                    scored.push(((base + pred) as u32, rejected[p + k], b + i));
                }
            }
        }
        HostBatch {
            ids,
            rows: b,
            seq: width,
            mask: HostMask::Custom { allowed, positions },
            scored,
            completion_lengths: completion_lengths(batch),
            pairs: b,
            tokens: batch.n_tokens,
        }
    }

    /// The batch on `device`: the host's arrays uploaded, nothing recomputed.
    pub fn upload(&self, device: &Device) -> Result<DeviceBatch> {
        let (rows, seq) = (self.rows, self.seq);
        let mask = match &self.mask {
            HostMask::Causal { key_valid, window } => {
                AttentionMask::causal(key_valid, rows, seq, *window, device)?
            }
            HostMask::Custom { allowed, positions } => {
                AttentionMask::custom(allowed, positions.clone(), rows, seq, device)?
            }
        };
        Ok(DeviceBatch {
            ids: Tensor::from_slice(&self.ids, (rows, seq), device)?,
            mask,
            index: CompletionIndex::from_parts(&self.scored, 2 * self.pairs, device)?,
            completion_lengths: self.completion_lengths.clone(),
            pairs: self.pairs,
            tokens: self.tokens,
        })
    }
}

/// For [`dpo_loader::BatchIter::prefetch_with`]: each batch with its layout
/// ([`HostBatch::of`]), made on the prefetch thread.
pub fn with_layout(
    prefix_sharing: bool,
    window: Option<usize>,
) -> impl FnMut(Batch) -> (Batch, HostBatch) + Send {
    move |batch| {
        let host = HostBatch::of(&batch, prefix_sharing, window);
        (batch, host)
    }
}

/// Completion tokens per row of a collated batch (TRL's `completion_mask.sum(1)`).
fn completion_lengths(batch: &Batch) -> Vec<usize> {
    (batch.completion_mask.chunks(batch.seq_len.max(1)))
        .map(|row| row.iter().filter(|&&m| m != 0).count())
        .collect()
}

impl DeviceBatch {
    /// `batch` as collated ([`HostBatch::standard`]), on `device`.
    pub fn new(batch: &Batch, window: Option<usize>, device: &Device) -> Result<Self> {
        HostBatch::standard(batch, window).upload(device)
    }

    /// `batch` in the prefix-sharing layout ([`HostBatch::shared_prefix`]), on `device`.
    pub fn shared_prefix(batch: &Batch, window: Option<usize>, device: &Device) -> Result<Self> {
        HostBatch::shared_prefix(batch, window).upload(device)
    }

    /// Per-sequence completion log-probs under `model`, `[2 * pairs]`: chosen rows, then rejected.
    pub fn logps(&self, model: &CausalLm, chunk: usize) -> Result<Tensor> {
        let hidden = model.hidden_states(&self.ids, &self.mask)?;
        sequence_logps(&hidden, &LmHead::of(model, chunk)?, &self.index)
    }
}

/// `[chosen..., rejected...]` log-probs of policy and reference on `db`, split into pairs, with
/// the completion lengths (IPO) and the scored chosen tokens (SFT).
pub fn pair_logps(policy: &Tensor, reference: &Tensor, db: &DeviceBatch) -> Result<PairLogps> {
    let pairs = db.pairs;
    let x = PairLogps::new(
        policy.narrow(0, 0, pairs)?,
        policy.narrow(0, pairs, pairs)?,
        reference.narrow(0, 0, pairs)?,
        reference.narrow(0, pairs, pairs)?,
    )?;
    let (chosen, rejected) = db.completion_lengths.split_at(pairs);
    x.with_lengths(chosen, rejected, db.index.counts[..pairs].iter().sum())
}

/// The configured loss on a batch of pairs: `loss_type` (with `beta`, `label_smoothing`), plus
/// `sft_weight * sft` when `sft_weight > 0`.
pub fn loss_of(cfg: &TrainConfig, x: &PairLogps) -> Result<LossOutput> {
    let beta = cfg.beta;
    let out = match cfg.loss_type {
        LossType::Sigmoid => loss::sigmoid(x, beta),
        LossType::Gaussian => loss::gaussian(x, beta),
        LossType::Ipo => loss::ipo(x, beta),
        LossType::Hinge => loss::hinge(x, beta),
        LossType::Robust => loss::robust(x, beta, cfg.label_smoothing),
    }?;
    if cfg.sft_weight > 0.0 { out.with_sft(x, cfg.sft_weight) } else { Ok(out) }
}

/// The mean loss (differentiable) and the batch's statistics, still on the device
/// ([`Scored::read`] brings them to the host).
pub fn score(x: &PairLogps, out: &LossOutput, tokens: usize) -> Result<(Tensor, Scored)> {
    let mean_loss = out.total()?;
    let per_pair = [
        &out.chosen_rewards,
        &out.rejected_rewards,
        &x.policy_chosen,
        &x.policy_rejected,
        &x.ref_chosen,
        &x.ref_rejected,
        &out.log_gamma,
        &out.grad_weight,
    ]
    .map(|t| t.detach().to_dtype(candle_core::DType::F64));
    let rows = Tensor::stack(&per_pair.into_iter().collect::<Result<Vec<_>>>()?, 0)?;
    let loss = mean_loss.detach().to_dtype(candle_core::DType::F64)?.reshape(1)?;
    let packed = Tensor::cat(&[rows.flatten_all()?, loss], 0)?;
    Ok((mean_loss, Scored { packed, pairs: x.policy_chosen.elem_count(), tokens }))
}

/// A batch's statistics on the device, packed into one tensor so that reading them costs one
/// synchronization, after the backward is queued (reading them between the loss and its
/// backward would leave the GPU idle while the backward is launched).
pub struct Scored {
    /// `[chosen reward, rejected reward, policy chosen, policy rejected, reference chosen,
    /// reference rejected, log gamma, grad weight]` per pair, then the mean loss; f64.
    packed: Tensor,
    pairs: usize,
    tokens: usize,
}

impl Scored {
    /// The statistics on the host.
    pub fn read(&self) -> Result<BatchStats> {
        let v: Vec<f64> = self.packed.to_vec1()?;
        let n = self.pairs;
        let row = |i: usize| &v[i * n..(i + 1) * n];
        let avg = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        // Fraction of pairs with `a > b` (a tie is not a win, as in TRL).
        let wins = |a: &[f64], b: &[f64]| a.iter().zip(b).filter(|(a, b)| a > b).count() as f64 / n as f64;
        let (rw, rl) = (row(0), row(1));
        let margins: Vec<f64> = rw.iter().zip(rl).map(|(a, b)| a - b).collect();
        Ok(BatchStats {
            loss: v[8 * n],
            pairs: n,
            tokens: self.tokens,
            chosen_reward: avg(rw),
            rejected_reward: avg(rl),
            accuracy: wins(rw, rl),
            margin: avg(&margins),
            chosen_logp: avg(row(2)),
            rejected_logp: avg(row(3)),
            policy_prefers_chosen: wins(row(2), row(3)),
            reference_prefers_chosen: wins(row(4), row(5)),
            log_gamma: row(6).to_vec(),
            grad_weight: row(7).to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two pairs; the second has an empty prompt, so its first completion token (position 0) is
    /// counted by TRL's `completion_mask.sum(1)` (IPO) but never scored (SFT).
    #[test]
    fn pair_logps_carries_ipo_lengths_and_scored_chosen_tokens() {
        #[rustfmt::skip]
        let completion_mask = vec![
            0, 0, 1, 1, 0, // chosen 0
            1, 1, 1, 0, 0, // chosen 1 (empty prompt)
            0, 0, 1, 0, 0, // rejected 0
            1, 1, 1, 1, 1, // rejected 1 (empty prompt)
        ];
        let attention_mask = vec![1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1];
        let batch = Batch {
            n_pairs: 2,
            seq_len: 5,
            input_ids: (0..20).collect(),
            n_tokens: attention_mask.iter().map(|&m| m as usize).sum(),
            attention_mask,
            completion_mask,
            sources: Vec::new(),
        };
        let db = DeviceBatch::new(&batch, None, &Device::Cpu).unwrap();
        assert_eq!(db.completion_lengths, [2, 3, 1, 5]);
        assert_eq!(db.index.counts, [2, 2, 1, 4]);
        let policy = Tensor::new(&[-1f32, -2.0, -3.0, -4.0], &Device::Cpu).unwrap();
        let x = pair_logps(&policy, &policy.zeros_like().unwrap(), &db).unwrap();
        assert_eq!(x.chosen_len.to_vec1::<f32>().unwrap(), [2.0, 3.0]);
        assert_eq!(x.rejected_len.to_vec1::<f32>().unwrap(), [1.0, 5.0]);
        assert_eq!(x.chosen_scored, 4);
        // sft = -(-1 - 2) / 4 on top of the mean sigmoid loss.
        let cfg = TrainConfig { sft_weight: 2.0, ..TrainConfig::default() };
        let with_sft = loss_of(&cfg, &x).unwrap().total().unwrap().to_scalar::<f32>().unwrap();
        let plain =
            loss_of(&TrainConfig::default(), &x).unwrap().total().unwrap().to_scalar::<f32>().unwrap();
        assert!((with_sft - plain - 1.5).abs() < 1e-6);
    }
}
