//! Per-sequence completion log-probs from hidden states, without full-vocabulary logits.
//!
//! ```text
//! logp(y | x) = sum_{t in completion} [ h_{t-1} . w_{y_t} - logsumexp_v(h_{t-1} . w_v) ]
//! ```
//! Only positions whose next token is a completion token are scored (TRL's shifted completion
//! mask). The LM head runs over those rows in chunks, inside a custom op whose backward
//! recomputes each chunk's softmax: the graph keeps `h` and `W`, never `[positions, vocab]`
//! logits. Gradients: `d logp_t / d z = onehot(y_t) - softmax(z)`, `dh = dz W`, `dW = dz^T h`.

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use dpo_model::ops;
use dpo_model::{accum_dtype, matmul};

/// Rows of the LM head computed at once; `chunk x vocab` f32 logits exist at a time.
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
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        let mut owner = Vec::new();
        let mut counts = vec![0usize; rows];
        for r in 0..rows {
            for t in 0..seq.saturating_sub(1) {
                if completion_mask[r * seq + t + 1] != 0 {
                    positions.push((r * seq + t) as u32);
                    targets.push(input_ids[r * seq + t + 1]);
                    owner.push(r);
                    counts[r] += 1;
                }
            }
        }
        let n = positions.len();
        let mut seg = vec![0f32; rows * n];
        for (i, &r) in owner.iter().enumerate() {
            seg[r * n + i] = 1.0;
        }
        Ok(CompletionIndex {
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            segments: Tensor::from_vec(seg, (rows, n), device)?,
            counts,
        })
    }
}

/// Per-token log-probs `[n]` (f32, or f64 for f64 inputs) of `targets` under `softmax(h @ w^T)`, for `h: [n, hidden]`
/// and `w: [vocab, hidden]` (same dtype), differentiable in `h` and `w`.
pub fn token_logps(h: &Tensor, w: &Tensor, targets: &Tensor, chunk: usize) -> Result<Tensor> {
    let _timed = dpo_model::profile::op(h.device(), "log_probs");
    let value = token_logps_nograd(&h.detach(), &w.detach(), targets, chunk)?;
    if !(h.track_op() || w.track_op()) {
        return Ok(value); // the reference: no graph to record, no copy
    }
    h.apply_op2(w, ChunkedLogProbs { value, targets: targets.clone(), chunk })
}

/// Per-sequence completion log-probs `[rows]` (f32) from final hidden states `[rows, seq, hidden]`.
pub fn sequence_logps(
    hidden: &Tensor,
    lm_head: &Tensor,
    index: &CompletionIndex,
    chunk: usize,
) -> Result<Tensor> {
    let (rows, seq, h) = hidden.dims3()?;
    if index.counts.iter().sum::<usize>() == 0 {
        return Tensor::zeros(rows, DType::F32, hidden.device());
    }
    let selected = hidden.reshape((rows * seq, h))?.index_select(&index.positions, 0)?;
    let per_token = token_logps(&selected.to_dtype(lm_head.dtype())?, lm_head, &index.targets, chunk)?;
    matmul(&index.segments.to_dtype(per_token.dtype())?, &per_token.unsqueeze(1)?)?.squeeze(1)
}

/// `sum_t KL(softmax(hp_t Wp^T) || softmax(hr_t Wr^T))` over the rows of `hp`/`hr` (`[n, hidden]`,
/// the policy's and the reference's hidden states at the same positions), chunked, no gradient.
pub fn token_kl_sum(hp: &Tensor, wp: &Tensor, hr: &Tensor, wr: &Tensor, chunk: usize) -> Result<f64> {
    let n = hp.dim(0)?;
    let acc = accum_dtype(hp.dtype());
    let log_softmax = |h: &Tensor, w: &Tensor, start: usize, len: usize| -> Result<Tensor> {
        let logits = matmul(&h.narrow(0, start, len)?, &w.t()?)?.to_dtype(acc)?;
        logits.broadcast_sub(&logsumexp(&logits)?.unsqueeze(1)?)
    };
    let (hp, hr) = (hp.to_dtype(wp.dtype())?, hr.to_dtype(wr.dtype())?);
    let (hp, hr) = (&hp, &hr);
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let (lp, lq) = (log_softmax(hp, wp, start, len)?, log_softmax(hr, wr, start, len)?);
        let kl = (lp.exp()? * (lp - lq)?)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += kl;
        start += len;
    }
    Ok(total)
}

fn token_logps_nograd(h: &Tensor, w: &Tensor, targets: &Tensor, chunk: usize) -> Result<Tensor> {
    let n = h.dim(0)?;
    let mut parts = Vec::with_capacity(n.div_ceil(chunk.max(1)));
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = matmul(&h.narrow(0, start, len)?, &w.t()?)?.to_dtype(accum_dtype(h.dtype()))?;
        let tgt = targets.narrow(0, start, len)?.unsqueeze(1)?;
        let picked = logits.gather(&tgt, 1)?.squeeze(1)?;
        parts.push((picked - logsumexp(&logits)?)?);
        start += len;
    }
    Tensor::cat(&parts, 0)
}

fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?.add(&max)?.squeeze(D::Minus1)
}

struct ChunkedLogProbs {
    value: Tensor,
    targets: Tensor,
    chunk: usize,
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
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timed = dpo_model::profile::op(h.device(), "log_probs_bwd");
        let (h, w) = (h.detach(), w.detach());
        let dtype = h.dtype();
        let acc = accum_dtype(dtype);
        let n = h.dim(0)?;
        let vocab = w.dim(0)?;
        let mut grad_h = Vec::new();
        let mut grad_w = w.zeros_like()?.to_dtype(acc)?;
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let hc = h.narrow(0, start, len)?;
            let g = grad.narrow(0, start, len)?.to_dtype(acc)?.unsqueeze(1)?;
            let logits = matmul(&hc, &w.t()?)?.to_dtype(acc)?;
            // Values only (detached inputs, no graph): this backward is the gradient itself.
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            let tgt = self.targets.narrow(0, start, len)?.unsqueeze(1)?;
            let onehot_g = Tensor::zeros((len, vocab), acc, h.device())?.scatter_add(&tgt, &g, 1)?;
            let dz = (onehot_g - probs.broadcast_mul(&g)?)?.to_dtype(dtype)?;
            grad_h.push(matmul(&dz, &w)?);
            grad_w = (grad_w + matmul(&dz.t()?, &hc)?.to_dtype(acc)?)?;
            start += len;
        }
        Ok((Some(Tensor::cat(&grad_h, 0)?), Some(grad_w.to_dtype(dtype)?)))
    }
}
