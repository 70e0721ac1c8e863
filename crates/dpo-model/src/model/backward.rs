//! The hand-written backward of a decoder block ([`CausalLm::manual_grads`]).
//!
//! candle's autograd keeps every intermediate tensor of the forward alive until the backward
//! (each graph node holds its inputs), and runs one generic rule per op. Here the forward keeps
//! what the backward needs, as PyTorch's saved tensors do, and the backward is written out:
//!
//! ```text
//! forward                                  backward, from dout = d loss / d out
//! x1 = T(RMSNorm(h, g1))                   dact = T(dout) Wd          dWd = T(dout)^T act
//! q, k, v = rope(x1 Wq^T + bq), ...        dgate, dup = silu_mul'(gate, up) dact
//! a = Attn(q, k, v)                        dx2 = dgate Wg + dup Wu    dWg = dgate^T x2, ...
//! h2 = h + a Wo^T                          dh2 = dout + RMSNorm'(h2, g2) dx2
//! x2 = T(RMSNorm(h2, g2))                  da = T(dh2) Wo             dWo = T(dh2)^T a
//! gate, up = x2 Wg^T, x2 Wu^T              dq, dk, dv = rope'(Attn'(q, k, v) da)
//! act = silu(gate) * up                    dx1 = dq Wq + dk Wk + dv Wv, dWq = dq^T x1, ...
//! out = h2 + act Wd^T                      dh = dh2 + RMSNorm'(h, g1) dx1
//! ```
//! `T` is the cast to the compute dtype (bf16 in bf16 runs; the residual stream and the norms
//! stay in f32). Kept per block: `h` and `h2` (the residual stream), the norms' outputs `x1` and
//! `x2` (in `T`: half of `h`'s bytes, where recomputing them read `h` and wrote them again), `q`,
//! `k`, `v`, `a`, `gate` and `up`, and with `recompute_attention` off the attention
//! probabilities `P` (`rows x heads x seq^2` in `T`; else the backward computes `Q K^T` and the
//! softmax again); `act` comes out of
//! the SiLU gate's backward, which reads `gate` and `up` anyway (`dact` is computed first). The weight
//! gradients come out in the dtype of the weights (f32 master weights). The ops are those of
//! [`crate::ops`] (fused RMSNorm, RoPE, SiLU gate and attention) and matmuls.
//!
//! With stacked projections ([`Block::qkv`], [`Block::gate_up`], the default here) `q`, `k`, `v`
//! are one layer `[Wq; Wk; Wv]`: `dx1 = [dq dk dv] [Wq; Wk; Wv]` is one matmul (its sum runs in
//! the matmul's f32 accumulator rather than over three rounded products) and `[dWq; dWk; dWv]`
//! another; likewise `gate`, `up`, which run transposed (`[gate^T; up^T] = [Wg; Wu] x2^T`), so
//! that their gradients `[dgate^T; dup^T]` come out of the SiLU gate's backward already stacked.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, TensorId};

use super::{Block, CausalLm, Linear, merge_heads};
use crate::{AttentionMask, accum_dtype, matmul, matmul_bf16_f32, ops};

/// What a block's backward needs from its forward ([`CausalLm::block_saving`]): its input `h`
/// and its norm `x1`, the rotated `q`, `k` and the values `v` (KV heads not repeated), the
/// attention probabilities `p` where kept (`recompute_attention` off), the
/// attention output `a` (heads merged), the residual `h2` after attention and its norm `x2`, and
/// the MLP's `gate` and `up` (`[rows, seq, inter]`; with [`Block::gate_up`] transposed, `[inter,
/// rows * seq]`).
pub(super) struct Saved {
    pub(super) h: Tensor,
    pub(super) x1: Tensor,
    pub(super) q: Tensor,
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    pub(super) p: Option<ops::KeptProbs>,
    pub(super) a: Tensor,
    pub(super) h2: Tensor,
    pub(super) x2: Tensor,
    pub(super) gate: Tensor,
    pub(super) up: Tensor,
}

/// Adds `g` (cast to `key`'s dtype) to the gradient of `key`.
pub(super) fn add_grad(grads: &mut HashMap<TensorId, Tensor>, key: &Tensor, g: &Tensor) -> Result<()> {
    let g = g.to_dtype(key.dtype())?;
    let sum = match grads.remove(&key.id()) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    grads.insert(key.id(), sum);
    Ok(())
}

impl Linear {
    /// `dx` of `y = x W^T + b` for `x` `[rows, seq, in]` and `dy` `[rows, seq, out]` (compute
    /// dtype `dt`); adds the weights' gradients ([`Linear::add_weight_grads`]).
    fn backward(
        &self,
        keys: &[&Linear],
        x: &Tensor,
        dy: &Tensor,
        dt: DType,
        grads: &mut HashMap<TensorId, Tensor>,
    ) -> Result<Tensor> {
        let _timed = crate::profile::op(x.device(), "linear_bwd");
        let (r, t, i) = x.dims3()?;
        let dy = dy.reshape((r * t, dy.dim(2)?))?;
        Self::add_weight_grads(keys, &x.reshape((r * t, i))?, &dy, dt, grads)?;
        matmul(&dy, &self.w.to_dtype(dt)?)?.reshape((r, t, i))
    }

    /// Adds `dW = dy^T x` and `db = sum dy` to `grads` for `x` `[n, in]` and `dy` `[n, out]`
    /// (any strides a matmul takes), split by output rows over `keys` (one layer, or the layers
    /// [`Linear::stack`] stacked), under their ids.
    fn add_weight_grads(
        keys: &[&Linear],
        x: &Tensor,
        dy: &Tensor,
        dt: DType,
        grads: &mut HashMap<TensorId, Tensor>,
    ) -> Result<()> {
        // In the weights' dtype (f32 master weights), each layer's part then a view of rows,
        // which add_grad keeps without a copy. With bf16 operands and f32 weights, straight from
        // the GEMM: the bf16 products summed in f32 and written in f32, nothing rounded to bf16
        // (and no cast pass); `db = 1^T dy` likewise, a GEMM with a row of ones.
        let wdt = keys.first().map_or(dt, |k| k.w.dtype());
        let to_f32 = dt == DType::BF16 && wdt == DType::F32;
        let dw = match to_f32 {
            true => matmul_bf16_f32(&dy.t()?, x)?,
            false => matmul(&dy.t()?, x)?.to_dtype(wdt)?,
        };
        let db = match (keys.iter().any(|k| k.b.is_some()), to_f32) {
            (false, _) => None,
            (true, true) => {
                let ones = Tensor::ones((1, dy.dim(0)?), DType::BF16, dy.device())?;
                Some(matmul_bf16_f32(&ones, dy)?.squeeze(0)?)
            }
            (true, false) => Some(dy.to_dtype(accum_dtype(dt))?.sum(0)?),
        };
        let mut start = 0;
        for key in keys {
            let n = key.w.dim(0)?;
            add_grad(grads, &key.w, &dw.narrow(0, start, n)?)?;
            if let (Some(key), Some(db)) = (&key.b, &db) {
                add_grad(grads, key, &db.narrow(0, start, n)?)?;
            }
            start += n;
        }
        Ok(())
    }
}

/// `[rows, seq, n * d]` viewed as `[rows, n, seq, d]` (no copy: the attention's backward reads
/// the heads merged on the tensor-core path, and copies them out elsewhere).
fn split_heads(x: &Tensor, n: usize) -> Result<Tensor> {
    let (r, s, nd) = x.dims3()?;
    x.reshape((r, s, n, nd / n))?.transpose(1, 2)
}

impl CausalLm {
    /// `d loss / d h` of a block from `dout = d loss / d out`, and the same in the compute dtype
    /// (for the next block's `dout_lo`: the norm's backward writes both, so that no cast pass
    /// reads the f32 gradient again; `dout_lo` None: `dout` is cast); adds the gradients of its
    /// weights to `grads`, keyed by the ids of `keys`' weights (the trainable tensors; `b` holds
    /// the same values without a graph).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_backward(
        &self,
        b: &Block,
        keys: &Block,
        s: Saved,
        (dout, dout_lo): (&Tensor, Option<Tensor>),
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        grads: &mut HashMap<TensorId, Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (dt, eps) = (self.compute_dtype, self.config.rms_norm_eps);
        let dout_lo = match dout_lo {
            Some(lo) => lo,
            None => dout.to_dtype(dt)?,
        };
        // MLP. `dact = dout Wd` first: the SiLU gate's backward then gives `act` too, from the
        // same pass over `gate` and `up`, for `dWd = dout^T act`.
        let x2 = &s.x2;
        let dx2 = match &b.gate_up {
            // Stacked, transposed (see `block_saving`): gate^T, up^T and act^T are [inter, n].
            Some(gate_up) => {
                let (rows, seq, hidden) = dout.dims3()?;
                let dy = dout_lo.reshape((rows * seq, hidden))?;
                let dact_t = {
                    let _timed = crate::profile::op(dy.device(), "linear_bwd");
                    matmul(&b.down.w.to_dtype(dt)?.t()?, &dy.t()?)? // (dy Wd)^T
                };
                let (dgu_t, act_t) = ops::silu_mul_backward_stacked_and_value(&s.gate, &s.up, &dact_t)?;
                let _timed = crate::profile::op(dy.device(), "linear_bwd");
                Linear::add_weight_grads(&[&keys.down], &act_t.t()?, &dy, dt, grads)?;
                drop(act_t);
                let x2 = x2.reshape((rows * seq, hidden))?;
                Linear::add_weight_grads(&[&keys.gate, &keys.up], &x2, &dgu_t.t()?, dt, grads)?;
                matmul(&dgu_t.t()?, &gate_up.w.to_dtype(dt)?)?.reshape((rows, seq, hidden))?
            }
            None => {
                let dy = dout_lo.flatten_to(1)?;
                let dact = {
                    let _timed = crate::profile::op(dy.device(), "linear_bwd");
                    matmul(&dy, &b.down.w.to_dtype(dt)?)?.reshape(s.gate.shape())? // dy Wd
                };
                let (dgate, dup, act) = ops::silu_mul_backward_and_value(&s.gate, &s.up, &dact)?;
                {
                    let _timed = crate::profile::op(dy.device(), "linear_bwd");
                    Linear::add_weight_grads(&[&keys.down], &act.flatten_to(1)?, &dy, dt, grads)?;
                }
                drop(act);
                (b.gate.backward(&[&keys.gate], x2, &dgate, dt, grads)?
                    + b.up.backward(&[&keys.up], x2, &dup, dt, grads)?)?
            }
        };
        let (dh2, dg2, dh2_lo) = ops::rms_norm_backward_add_lo(&s.h2, &b.post_norm, eps, &dx2, dout, dt)?;
        add_grad(grads, &keys.post_norm, &dg2)?;
        // Attention.
        let nh = self.config.num_attention_heads;
        let da = split_heads(&b.o.backward(&[&keys.o], &s.a, &dh2_lo, dt, grads)?, nh)?;
        // The forward's output as kept (heads merged), viewed as heads: no copy.
        let (rows, seq, _) = s.a.dims3()?;
        let a = s.a.reshape((rows, seq, nh, self.config.head_dim))?.transpose(1, 2)?;
        let scale = self.attention_scale();
        let (dq, dk, dv) = match &s.p {
            Some(p) => ops::attention_backward_kept(p, &s.q, &s.k, &s.v, scale, &da)?,
            None => ops::attention_backward(&s.q, &s.k, &s.v, &mask.bias, scale, &da, Some(&a))?,
        };
        drop(s.p);
        let x1 = &s.x1;
        let dx1 = match &b.qkv {
            // Stacked: RoPE's backward writes the heads side by side as the forward's output.
            Some(qkv) => {
                let dy = ops::rope_backward_merged(&dq, &dk, &dv, cos, sin)?;
                qkv.backward(&[&keys.q, &keys.k, &keys.v], x1, &dy, dt, grads)?
            }
            None => {
                let (dq, dk) = (ops::rope_backward(&dq, cos, sin)?, ops::rope_backward(&dk, cos, sin)?);
                ((b.q.backward(&[&keys.q], x1, &merge_heads(&dq)?, dt, grads)?
                    + b.k.backward(&[&keys.k], x1, &merge_heads(&dk)?, dt, grads)?)?
                    + b.v.backward(&[&keys.v], x1, &merge_heads(&dv)?, dt, grads)?)?
            }
        };
        let (dh, dg1, dh_lo) = ops::rms_norm_backward_add_lo(&s.h, &b.input_norm, eps, &dx1, &dh2, dt)?;
        add_grad(grads, &keys.input_norm, &dg1)?;
        Ok((dh, dh_lo))
    }
}
