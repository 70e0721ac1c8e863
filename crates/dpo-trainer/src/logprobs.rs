//! Per-sequence completion log-probs from hidden states, without full-vocabulary logits.
//!
//! ```text
//! logp(y | x) = sum_{t in completion} [ h_{t-1} . w_{y_t} - logsumexp_v(h_{t-1} . w_v) ]
//! ```
//! Only positions whose next token is a completion token are scored (TRL's shifted completion
//! mask). The LM head runs over those rows in chunks, inside a custom op whose backward
//! recomputes the logits a slice of the vocabulary at a time (all rows, the same number of
//! logits as a forward chunk) and, from the logsumexp the forward kept, their softmax: the
//! graph keeps `h` and `W`, and `[positions, vocab]` logits only where one chunk held every
//! position (`chunk >= positions`: memory for one matmul less, the backward's). Gradients:
//! `d logp_t / d z = onehot(y_t) - softmax(z)`, `dh = dz W`, `dW = dz^T h`. With the fused ops
//! each chunk's log-softmax at the targets, and its gradient, is one pass over the logits
//! ([`ops::target_logprobs`]).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use dpo_model::ops;
use dpo_model::{accum_dtype, matmul, matmul_bf16_f32};

/// Rows of the LM head computed at once; `chunk x vocab` logits exist at a time.
pub const DEFAULT_CHUNK: usize = 1024;

/// Which positions of a padded batch are scored.
#[derive(Debug, Clone)]
pub struct CompletionIndex {
    /// Flat row index `r * seq + t` of each scored hidden state (predicting token `t + 1`).
    pub positions: Tensor,
    /// The token each scored position predicts.
    pub targets: Tensor,
    /// `[rows, n]` 0/1 matrix summing per-token values into per-sequence ones.
    pub segments: Tensor,
    /// Completion tokens per row.
    pub counts: Vec<usize>,
}

impl CompletionIndex {
    /// From scored positions: `(flat position r * seq + t, target token, owning sequence)`, for
    /// `n_seqs` sequences.
    pub fn from_parts(
        parts: &[(u32, u32, usize)],
        n_seqs: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let n = parts.len();
        let mut counts = vec![0usize; n_seqs];
        let mut seg = vec![0f32; n_seqs * n];
        for (i, &(_, _, owner)) in parts.iter().enumerate() {
            seg[owner * n + i] = 1.0;
            counts[owner] += 1;
        }
        Ok(CompletionIndex {
            positions: Tensor::from_vec(parts.iter().map(|p| p.0).collect(), n, device)?,
            targets: Tensor::from_vec(parts.iter().map(|p| p.1).collect(), n, device)?,
            segments: Tensor::from_vec(seg, (n_seqs, n), device)?,
            counts,
        })
    }

    /// From `input_ids` and `completion_mask`, both `[rows, seq]` row-major.
    pub fn new(
        input_ids: &[u32],
        completion_mask: &[u8],
        rows: usize,
        seq: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Self::from_parts(&Self::scored(input_ids, completion_mask, rows, seq), rows, device)
    }

    /// The scored positions of `[rows, seq]` `input_ids` and `completion_mask`, in row order,
    /// as [`CompletionIndex::from_parts`] takes them: each position whose next token is a
    /// completion token.
    pub fn scored(
        input_ids: &[u32],
        completion_mask: &[u8],
        rows: usize,
        seq: usize,
    ) -> Vec<(u32, u32, usize)> {
        let mut parts = Vec::new();
        for r in 0..rows {
            for t in 0..seq.saturating_sub(1) {
                if completion_mask[r * seq + t + 1] != 0 {
                    parts.push(((r * seq + t) as u32, input_ids[r * seq + t + 1], r));
                }
            }
        }
        parts
    }
}

/// A model's LM head as the log-probs use it.
#[derive(Debug, Clone)]
pub struct LmHead {
    /// `[vocab, hidden]`: a trainable model's in the head's dtype, a frozen one's as the
    /// matmul takes it (`CausalLm::lm_head`).
    pub weight: Tensor,
    /// Rows of logits computed at once: `chunk x vocab` logits exist at a time (the backward
    /// computes as many, all rows by slices of the vocabulary).
    pub chunk: usize,
    /// The log-softmax at the targets and its gradient by the fused ops
    /// ([`ops::target_logprobs`]), else by candle ops (the model's `fused_ops`).
    pub fused: bool,
    /// f32 logits from bf16 operands ([`matmul_bf16_f32`]; the model's `head_operands`), else
    /// one matmul in the weight's dtype.
    pub bf16_operands: bool,
}

impl LmHead {
    /// `model`'s head (`CausalLm::lm_head`), fused where its blocks are.
    pub fn of(model: &dpo_model::CausalLm, chunk: usize) -> Result<Self> {
        let bf16_operands = model.head_dtype() == DType::F32 && model.head_operands() == DType::BF16;
        Ok(LmHead { weight: model.lm_head()?, chunk, fused: model.fused_ops(), bf16_operands })
    }

    /// The dtype of the matmul's operands: what `h` is cast to.
    pub fn operand_dtype(&self) -> DType {
        if self.bf16_operands { DType::BF16 } else { self.weight.dtype() }
    }

    /// `w` (rows of the weight) as the matmul takes it.
    fn operand(&self, w: &Tensor) -> Result<Tensor> {
        w.to_dtype(self.operand_dtype())
    }

    /// `a @ b` as the head multiplies: f32 from bf16 operands, or in their dtype.
    fn mm(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.bf16_operands {
            matmul_bf16_f32(&a.to_dtype(DType::BF16)?, &b.to_dtype(DType::BF16)?)
        } else {
            matmul(a, b)
        }
    }

    /// The rows of `hidden` `[n, h]` at `positions` (differentiable).
    fn select(&self, hidden: &Tensor, positions: &Tensor) -> Result<Tensor> {
        if self.fused {
            ops::gather_rows(hidden, positions, None)
        } else {
            ops::gather_rows_slow(hidden, positions, None)
        }
    }

    /// `(logp, lse)` of `targets` under `softmax(logits)`.
    fn logprobs(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.fused {
            ops::target_logprobs(logits, targets)
        } else {
            ops::target_logprobs_slow(logits, targets)
        }
    }

    /// `d(sum_i g_i logp_i) / d logits` for `logits`, the vocabulary's columns `first..`, as the
    /// matmuls take it (`lse`: the whole rows').
    fn logprobs_grad(
        &self,
        logits: &Tensor,
        lse: &Tensor,
        targets: &Tensor,
        g: &Tensor,
        first: usize,
    ) -> Result<Tensor> {
        if self.fused {
            ops::target_logprobs_backward_to(logits, lse, targets, g, first, self.operand_dtype())
        } else {
            ops::target_logprobs_backward_slow(logits, lse, targets, g, first)?.to_dtype(self.operand_dtype())
        }
    }
}

/// Per-token log-probs `[n]` (f32, or f64 for f64 inputs) of `targets` under
/// `softmax(h @ head.weight^T)`, for `h: [n, hidden]` (the head's operand dtype), differentiable
/// in `h` and the weight.
pub fn token_logps(h: &Tensor, head: &LmHead, targets: &Tensor) -> Result<Tensor> {
    let _timed = dpo_model::profile::op(h.device(), "log_probs");
    let w = head.operand(&head.weight.detach())?; // cast once, for the backward too
    let grad = h.track_op() || head.weight.track_op();
    let (value, lse, logits) = token_logps_nograd(&h.detach(), &w, targets, head, grad)?;
    if !grad {
        return Ok(value); // the reference: no graph to record, no copy
    }
    let logits = std::sync::Mutex::new(logits);
    h.apply_op2(
        &head.weight,
        ChunkedLogProbs { value, lse, targets: targets.clone(), head: head.clone(), w, logits },
    )
}

/// Per-sequence completion log-probs `[rows]` (f32) from final hidden states `[rows, seq, hidden]`.
pub fn sequence_logps(hidden: &Tensor, head: &LmHead, index: &CompletionIndex) -> Result<Tensor> {
    let (rows, seq, h) = hidden.dims3()?;
    if index.counts.iter().sum::<usize>() == 0 {
        return Tensor::zeros(rows, DType::F32, hidden.device());
    }
    let selected = head.select(&hidden.reshape((rows * seq, h))?, &index.positions)?;
    let per_token = token_logps(&selected.to_dtype(head.operand_dtype())?, head, &index.targets)?;
    // A masked sum rather than a matmul: with TF32 switched on (`lm_head_bf16_operands = false`)
    // an f32 matmul would round each log-prob to 10 bits of mantissa (0.006 at -12) first.
    index.segments.to_dtype(per_token.dtype())?.broadcast_mul(&per_token.unsqueeze(0)?)?.sum(1)
}

/// `sum_t KL(softmax(hp_t Wp^T) || softmax(hr_t Wr^T))` over the rows of `hp`/`hr` (`[n, hidden]`,
/// the policy's and the reference's hidden states at the same positions), in chunks of the
/// policy head's, no gradient.
pub fn token_kl_sum(hp: &Tensor, p: &LmHead, hr: &Tensor, r: &LmHead) -> Result<f64> {
    let n = hp.dim(0)?;
    let zeros = Tensor::zeros(p.chunk.min(n), DType::U32, hp.device())?;
    let log_softmax = |h: &Tensor, head: &LmHead, start: usize, len: usize| -> Result<Tensor> {
        let logits = head.mm(&h.narrow(0, start, len)?, &head.weight.t()?)?;
        // Only the logsumexp is wanted: any target will do.
        let (_, lse) = head.logprobs(&logits, &zeros.narrow(0, 0, len)?)?;
        logits.to_dtype(lse.dtype())?.broadcast_sub(&lse.unsqueeze(1)?)
    };
    let (hp, hr) = (hp.to_dtype(p.operand_dtype())?, hr.to_dtype(r.operand_dtype())?);
    let (hp, hr) = (&hp, &hr);
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let len = p.chunk.min(n - start);
        let (lp, lq) = (log_softmax(hp, p, start, len)?, log_softmax(hr, r, start, len)?);
        let kl = (lp.exp()? * (lp - lq)?)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += kl;
        start += len;
    }
    Ok(total)
}

/// Per-token `(logp, lse)`, each `[n]`, chunk by chunk (`w`: the weight as the matmul takes it),
/// and with `keep`, the logits `[n, vocab]` where one chunk held every row (the backward then
/// reuses them instead of computing them again).
fn token_logps_nograd(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    head: &LmHead,
    keep: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let n = h.dim(0)?;
    let (mut logp, mut lse) = (Vec::new(), Vec::new());
    let mut kept = None;
    let mut start = 0;
    while start < n {
        let len = head.chunk.min(n - start);
        let logits = head.mm(&h.narrow(0, start, len)?, &w.t()?)?;
        let (l, s) = head.logprobs(&logits, &targets.narrow(0, start, len)?)?;
        logp.push(l);
        lse.push(s);
        if keep && len == n {
            kept = Some(logits);
        }
        start += len;
    }
    Ok((Tensor::cat(&logp, 0)?, Tensor::cat(&lse, 0)?, kept))
}

struct ChunkedLogProbs {
    value: Tensor,
    /// Each row's `log sum_v exp(z_v)`, for the backward.
    lse: Tensor,
    targets: Tensor,
    head: LmHead,
    /// The weight as the matmul takes it (the forward's cast, kept for the backward).
    w: Tensor,
    /// The forward's logits, where one chunk held every row (`chunk >= n`): the backward's
    /// one vocabulary slice is then these, not a second matmul (taken by the backward).
    logits: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp2 for ChunkedLogProbs {
    fn name(&self) -> &'static str {
        "chunked-completion-logprobs"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        ops::hand_over(&self.value)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        ops::hand_over(&self.value)
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        ops::hand_over(&self.value)
    }

    fn bwd(
        &self,
        h: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timed = dpo_model::profile::op(h.device(), "log_probs_bwd");
        let (h, w) = (h.detach(), &self.w);
        let acc = accum_dtype(h.dtype());
        let (n, vocab) = (h.dim(0)?, w.dim(0)?);
        // By slices of the vocabulary, `n x cols` logits at a time (the forward's `chunk x
        // vocab` budget): each slice's dW rows are written once, not summed over row chunks,
        // and only `dh` (`n x hidden`) is summed over slices.
        let cols = (self.head.chunk.saturating_mul(vocab) / n.max(1)).clamp(1, vocab.max(1));
        let mut grad_h: Option<Tensor> = None;
        let mut grad_w = Vec::new();
        // Where the forward kept them, `cols` is the whole vocabulary: one slice, these logits.
        let mut kept = self.logits.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut first = 0;
        while first < vocab {
            let len = cols.min(vocab - first);
            let wc = w.narrow(0, first, len)?;
            let logits = match kept.take() {
                Some(z) if z.dims() == [n, len] => z,
                _ => self.head.mm(&h, &wc.t()?)?,
            };
            let dz = self.head.logprobs_grad(&logits, &self.lse, &self.targets, grad, first)?;
            let dh = self.head.mm(&dz, &wc)?.to_dtype(acc)?;
            grad_h = Some(match grad_h {
                Some(sum) => (sum + dh)?,
                None => dh,
            });
            grad_w.push(self.head.mm(&dz.t()?, &h)?.to_dtype(weight.dtype())?);
            first += len;
        }
        let grad_h = match grad_h {
            Some(g) => g.to_dtype(h.dtype())?,
            None => h.zeros_like()?,
        };
        let grad_w = if grad_w.is_empty() { weight.zeros_like()? } else { Tensor::cat(&grad_w, 0)? };
        Ok((Some(grad_h), Some(grad_w)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};
    use dpo_model::ops::randn_tensor;

    use super::*;

    fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
        let f64s =
            |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (got, want) = (f64s(got), f64s(want));
        let scale = want.iter().fold(1e-30f64, |m, w| m.max(w.abs()));
        got.iter().zip(&want).fold(0f64, |m, (g, w)| m.max((g - w).abs())) / scale
    }

    /// An f32 head from bf16 operands (`bf16_operands`: bf16 `h`, f32 weight rounded to bf16 for
    /// the matmul) against candle's autograd through the same roundings, in chunks of 3 rows and
    /// vocabulary slices of 21, 21 and 8, and in one chunk whose logits the backward reuses: the
    /// log-probs, `dh` (bf16) and `dW` (f32, the master weight's dtype; from `dz` rounded to
    /// bf16, hence the tolerance).
    #[test]
    fn bf16_operands_match_autograd() -> Result<()> {
        let (n, hidden, vocab) = (7, 16, 50);
        let h = Var::from_tensor(&randn_tensor(&[n, hidden], 1, 1.0)?.to_dtype(DType::BF16)?)?;
        let w = Var::from_tensor(&randn_tensor(&[vocab, hidden], 2, 0.5)?)?;
        let targets = Tensor::new(&[3u32, 0, 49, 7, 7, 20, 1], &Device::Cpu)?;
        let g = randn_tensor(&[n], 3, 1.0)?;
        // Chunks of 3: the backward computes the logits again; of 7: it reuses the forward's.
        for (fused, chunk) in [(true, 3), (false, 3), (true, 7), (false, 7)] {
            let head = LmHead { weight: w.as_tensor().clone(), chunk, fused, bf16_operands: true };
            assert_eq!(head.operand_dtype(), DType::BF16);
            let got = token_logps(h.as_tensor(), &head, &targets)?;
            let grads = (&got * &g)?.sum_all()?.backward()?;

            let wr = w.as_tensor().to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            let logits = h.as_tensor().to_dtype(DType::F32)?.matmul(&wr.t()?)?;
            let logp = logits.broadcast_sub(&logits.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
            let want = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
            let want_grads = (&want * &g)?.sum_all()?.backward()?;

            assert!(max_rel(&got, &want) < 1e-6, "log-probs (fused {fused}, chunk {chunk})");
            let (dh, dw) = (grads.get(h.as_tensor()).unwrap(), grads.get(w.as_tensor()).unwrap());
            assert_eq!((dh.dtype(), dw.dtype()), (DType::BF16, DType::F32));
            let dh_err = max_rel(dh, want_grads.get(h.as_tensor()).unwrap());
            let dw_err = max_rel(dw, want_grads.get(w.as_tensor()).unwrap());
            assert!(
                dh_err < 1e-2 && dw_err < 5e-3,
                "fused {fused}, chunk {chunk}: dh off by {dh_err:e}, dW by {dw_err:e}"
            );
        }
        Ok(())
    }
}
