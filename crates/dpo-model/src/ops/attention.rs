//! Attention whose graph keeps no `[seq, seq]` tensor:
//!
//! ```text
//! S = Q K^T,  P = softmax(S * scale + bias),  O = P V
//! ```
//! The forward keeps only `Q`, `K`, `V` (the op's inputs) for the backward, which recomputes `P`
//! (one more `Q K^T`, the cheapest matmul of a block; [`attention_keeping_probs`] and
//! [`attention_backward_kept`] keep it instead, for the hand-written backward) and then, as
//! FlashAttention does:
//!
//! ```text
//! dV = P^T dO,  dP = dO V^T,  dS = scale * P * (dP - rowsum(dP * P)),  dQ = dS K,  dK = dS^T Q
//! ```
//! Composed autograd keeps the scores and the probabilities of every layer instead: for 16
//! rows x 14 heads x 512^2 in bf16 that is 235 MB a layer, 5.6 GB for 24 layers.
//!
//! Grouped-query attention without repeating K and V: the `n_rep` query heads that share a KV
//! head are contiguous, so `Q [rows, kv * n_rep, seq, d]` is viewed as `[rows, kv, n_rep * seq,
//! d]`, one matmul per KV head serves the whole group, and `dK`, `dV` sum over the group inside
//! the matmul. The matmuls run in the inputs' dtype (bf16 on tensor cores), the masked softmax
//! and its backward in f32 ([`super::masked_softmax`]'s kernels). Rows are processed in chunks of
//! at most [`SCORE_BUDGET`] score elements, so long sequences never hold all scores at once.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::check_float;
use super::softmax::{MaskedSoftmax, MaskedSoftmaxBwd};
use crate::matmul;

/// Score elements (`rows x heads x seq x seq`) computed at once.
pub const SCORE_BUDGET: usize = 1 << 27;

/// `softmax(Q K^T * scale + bias) V` for `q` `[rows, heads, seq, d]`, `k` and `v`
/// `[rows, kv_heads, seq, d]` (`heads` a multiple of `kv_heads`; same float dtype) and an
/// additive bias `[rows or 1, 1, seq, seq]` (f32; see [`crate::AttentionMask`]). Returns
/// `[rows, heads, seq, d]` in the inputs' dtype; differentiable in `q`, `k` and `v`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// // Equal scores (q = 0): query 0 sees key 0 only (causal), query 1 averages both values.
/// let dev = Device::Cpu;
/// let q = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &dev)?;
/// let k = Tensor::new(&[[[[1f32, 0.0], [0.0, 1.0]]]], &dev)?;
/// let v = Tensor::new(&[[[[2f32, 4.0], [6.0, 8.0]]]], &dev)?;
/// let bias = Tensor::new(&[[[[0f32, -1e30], [0.0, 0.0]]]], &dev)?;
/// let out = dpo_model::ops::attention(&q, &k, &v, &bias, 1.0)?;
/// assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, [2.0, 4.0, 4.0, 6.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let _timed = crate::profile::op(q.device(), "attention");
    Ok(forward_in_chunks(q, k, v, bias, scale, SCORE_BUDGET, false)?.0)
}

/// The probabilities `P` of an [`attention_keeping_probs`] forward, for
/// [`attention_backward_kept`]: one `[rows, heads, seq, seq]` tensor in the inputs' dtype per
/// chunk of rows.
pub struct KeptProbs(Vec<Tensor>);

/// [`attention`] without a graph (no input may track one), also returning the probabilities
/// `P`, so that [`attention_backward_kept`] recomputes neither `Q K^T` nor the softmax: the same
/// gradients as [`attention_backward`], bit for bit, for `rows x heads x seq^2` elements kept.
/// `None` where the tensor-core kernels compute attention (no `P` exists there).
pub fn attention_keeping_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<(Tensor, Option<KeptProbs>)> {
    let _timed = crate::profile::op(q.device(), "attention");
    forward_in_chunks(q, k, v, bias, scale, SCORE_BUDGET, true)
}

/// The forward of [`attention`], or with `keep` of [`attention_keeping_probs`], computing at
/// most `budget` score elements at once (at least one row).
pub(crate) fn forward_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    budget: usize,
    keep: bool,
) -> Result<(Tensor, Option<KeptProbs>)> {
    check_inputs(q, k, v, bias)?;
    let graph = q.track_op() || k.track_op() || v.track_op();
    if keep && graph {
        candle_core::bail!("attention_keeping_probs builds no graph: its inputs may not track one");
    }
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // Without a graph the tensor-core kernel may write the heads merged (the op below hands its
    // value over as a contiguous [rows, heads, seq, d]).
    let (value, kept) = match flash_forward(&q, &k, &v, &bias, scale, !graph)? {
        Some(value) => (value, None),
        None => {
            let mut kept = Vec::new();
            let value = chunked(&q, &bias, budget, |(start, len), b| {
                let rows = |x: &Tensor| x.narrow(0, start, len);
                let p = probs(&rows(&q)?, &rows(&k)?, b, scale)?;
                let out = weigh_values(&p, &rows(&v)?)?;
                if keep {
                    kept.push(p);
                }
                Ok(out)
            })?;
            (value, keep.then_some(KeptProbs(kept)))
        }
    };
    if !graph {
        return Ok((value, kept)); // no graph to record (a frozen model): no op, no copy
    }
    Ok((q.apply_op3(&k, &v, Attention { value: Mutex::new(Some(value)), bias, scale, budget })?, None))
}

/// The backward of [`attention_keeping_probs`] from its probabilities `p`: `(dq, dk, dv)` for the
/// upstream `dy` `[rows, heads, seq, d]` (no graph).
pub fn attention_backward_kept(
    p: &KeptProbs,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _timed = crate::profile::op(q.device(), "attention_bwd");
    let (q, k, v) = (q.detach().contiguous()?, k.detach().contiguous()?, v.detach().contiguous()?);
    let dy = dy.to_dtype(q.dtype())?.contiguous()?;
    let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    for p in &p.0 {
        let len = p.dim(0)?;
        let rows = |x: &Tensor| x.narrow(0, start, len);
        let (a, b, c) = backward_from(p, &rows(&q)?, &rows(&k)?, &rows(&v)?, &rows(&dy)?, scale)?;
        dq.push(a);
        dk.push(b);
        dv.push(c);
        start += len;
    }
    if start != q.dim(0)? {
        candle_core::bail!("attention_backward_kept: probabilities of {start} rows for q {:?}", q.shape());
    }
    Ok((cat(dq)?, cat(dk)?, cat(dv)?))
}

/// The shapes and dtypes [`attention`] takes.
fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<()> {
    check_float(q, "attention")?;
    let (rows, heads, seq, d) = q.dims4()?;
    let kv = k.dims4()?;
    let (rb, one, qb, kb) = bias.dims4()?;
    let fits = kv.0 == rows
        && kv.1 > 0
        && heads % kv.1 == 0
        && kv.2 == seq
        && kv.3 == d
        && v.dims() == k.dims()
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && (rb == rows || rb == 1)
        && one == 1
        && qb == seq
        && kb == seq;
    if !fits {
        candle_core::bail!(
            "attention: q {:?} {:?}, k {:?} {:?}, v {:?} {:?}, bias {:?} do not fit",
            q.shape(),
            q.dtype(),
            k.shape(),
            k.dtype(),
            v.shape(),
            v.dtype(),
            bias.shape()
        );
    }
    Ok(())
}

/// Whether the tensor-core kernels (`kernels/dpo_ops.cu`, `flash_*`) compute attention for these
/// inputs: with `DPO_TRAIN_FLASH_ATTENTION=1` (`=forward`: the forward only), on CUDA, bf16, head
/// size 32 or 64, compute capability 8.0 or newer. Off by default: on the GPU
/// benchmark (H200) they were slower than cuBLAS and the materialized softmax (BENCHMARKS.md).
#[cfg(feature = "cuda")]
fn flash_applies(q: &Tensor, k: &Tensor, v: &Tensor, backward: bool) -> Result<bool> {
    static SETTING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let setting = SETTING.get_or_init(|| std::env::var("DPO_TRAIN_FLASH_ATTENTION").unwrap_or_default());
    if !(setting == "1" || (!backward && setting == "forward")) {
        return Ok(false);
    }
    let candle_core::Device::Cuda(dev) = q.device() else { return Ok(false) };
    let (rows, heads, _, d) = q.dims4()?;
    let aligned = |x: &Tensor| x.layout().start_offset().is_multiple_of(8) && x.is_contiguous();
    Ok(q.dtype() == DType::BF16
        && (d == 32 || d == 64)
        && rows * heads <= 65_535
        && [q, k, v].into_iter().all(aligned)
        && super::cuda::has_flash_attention(dev))
}

/// The forward as one kernel without a `[seq, seq]` tensor, where [`flash_applies`]; `None`
/// elsewhere. `[rows, heads, seq, d]`; with `merged`, a view of `[rows, seq, heads, d]` in
/// memory, whose heads the output projection then reads merged without a copy.
#[cfg(feature = "cuda")]
pub(super) fn flash_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    merged: bool,
) -> Result<Option<Tensor>> {
    if !flash_applies(q, k, v, false)? {
        return Ok(None);
    }
    let op = Flash { bias: bias.clone(), dy: None, out: None, scale, merged };
    let out = q.apply_op3_no_bwd(k, v, &op)?;
    Ok(Some(if merged { out.transpose(1, 2)? } else { out }))
}

/// `(dq, dk, dv)` by the kernels, where [`flash_applies`] (`dy` in `q`'s dtype, any layout:
/// copied where its rows do not fit the kernels); `None` elsewhere. `out`: the forward's output,
/// where kept (see [`attention_backward`]).
#[cfg(feature = "cuda")]
fn flash_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    dy: &Tensor,
    out: Option<&Tensor>,
    scale: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !flash_applies(q, k, v, true)? {
        return Ok(None);
    }
    // The kernels read dy 16 bytes at a time, as q, k and v, its heads as they come or merged.
    let dy = match super::cuda::head_rows(dy.layout(), q.layout()) {
        Some(_) => dy.clone(),
        None => dy.force_contiguous()?,
    };
    let out = out.filter(|o| o.dtype() == q.dtype() && o.device().same_device(q.device())).cloned();
    let op = Flash { bias: bias.clone(), dy: Some(dy), out, scale, merged: false };
    let flat = q.apply_op3_no_bwd(k, v, &op)?;
    let (nq, nk) = (q.elem_count(), k.elem_count());
    let part = |start: usize, len: usize, like: &Tensor| flat.narrow(0, start, len)?.reshape(like.shape());
    Ok(Some((part(0, nq, q)?, part(nq, nk, k)?, part(nq + nk, nk, v)?)))
}

#[cfg(not(feature = "cuda"))]
pub(super) fn flash_forward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f64,
    _: bool,
) -> Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
fn flash_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: Option<&Tensor>,
    _: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    Ok(None)
}

/// The kernels as an op of `(q, k, v)`, the bias and scale carried: the output (with `merged`,
/// `[rows, seq, heads, d]`), or with the upstream `dy` the gradients `[dq, dk, dv]` flattened
/// (from the forward's output `out`, where kept).
#[cfg(feature = "cuda")]
struct Flash {
    bias: Tensor,
    dy: Option<Tensor>,
    out: Option<Tensor>,
    scale: f64,
    merged: bool,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "dpo-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::CudaStorage;
        let bias = self.bias.storage_and_layout();
        let bias = super::on_device::<CudaStorage>(&bias, "the attention bias")?;
        match &self.dy {
            None => {
                let (id, merged) = (self.bias.id(), self.merged);
                let out =
                    super::cuda::flash_attention((q, ql), (k, kl), (v, vl), bias, id, self.scale, merged)?;
                let (rows, heads, seq, d) = ql.shape().dims4()?;
                Ok((out, if merged { Shape::from((rows, seq, heads, d)) } else { ql.shape().clone() }))
            }
            Some(dy) => {
                let dy = dy.storage_and_layout();
                let dy = super::on_device::<CudaStorage>(&dy, "the upstream gradient")?;
                let out = self.out.as_ref().map(|o| o.storage_and_layout());
                let out = match &out {
                    Some(o) => Some(super::on_device::<CudaStorage>(o, "the attention output")?),
                    None => None,
                };
                let grads = super::cuda::flash_attention_backward(
                    (q, ql),
                    (k, kl),
                    (v, vl),
                    (bias, self.bias.id()),
                    dy,
                    out,
                    self.scale,
                )?;
                Ok((grads, Shape::from(ql.shape().elem_count() + 2 * kl.shape().elem_count())))
            }
        }
    }
}

/// The backward of [`attention`]: `(dq, dk, dv)` for the upstream `dy` `[rows, heads, seq, d]`
/// (no graph; recomputes the probabilities). `bias` as for [`attention`]. `out`: the forward's
/// output `[rows, heads, seq, d]` (any strides with contiguous rows: heads merged is fine) where
/// the caller kept it; the tensor-core backward then recomputes only the softmax statistics, not
/// `P V`. The other paths do not need it.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    dy: &Tensor,
    out: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let _timed = crate::profile::op(q.device(), "attention_bwd");
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    backward_in_chunks(&q, &k, &v, &bias, scale, dy, out, SCORE_BUDGET)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    dy: &Tensor,
    out: Option<&Tensor>,
    budget: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let dy = dy.to_dtype(q.dtype())?;
    if let Some(grads) = flash_backward(&q, &k, &v, bias, &dy, out, scale)? {
        return Ok(grads);
    }
    let dy = dy.contiguous()?;
    let (mut dk, mut dv) = (Vec::new(), Vec::new());
    let dq = chunked(&q, bias, budget, |(start, len), b| {
        let rows = |x: &Tensor| x.narrow(0, start, len);
        let (dq, k_part, v_part) = backward(&rows(&q)?, &rows(&k)?, &rows(&v)?, b, &rows(&dy)?, scale)?;
        dk.push(k_part);
        dv.push(v_part);
        Ok(dq)
    })?;
    Ok((dq, cat(dk)?, cat(dv)?))
}

/// The reference: repeated K/V heads and the composed, differentiable candle ops.
pub fn attention_slow(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        let (r, kv, s, d) = x.dims4()?;
        x.unsqueeze(2)?.broadcast_as((r, kv, n_rep, s, d))?.contiguous()?.reshape((r, kv * n_rep, s, d))
    };
    let scores = matmul(q, &repeat(k)?.t()?.contiguous()?)?;
    matmul(&super::masked_softmax_slow(&scores, bias, scale)?, &repeat(v)?)
}

/// Runs `f` over chunks of rows `(start, len)` of at most `budget` score elements, with
/// the chunk's rows of `bias` (a broadcast bias whole), and concatenates the results on dim 0.
fn chunked(
    q: &Tensor,
    bias: &Tensor,
    budget: usize,
    mut f: impl FnMut((usize, usize), &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (rows, heads, seq, _) = q.dims4()?;
    let per_row = (heads * seq * seq).max(1);
    let chunk = (budget / per_row).clamp(1, rows.max(1));
    let mut parts = Vec::with_capacity(rows.div_ceil(chunk));
    let mut start = 0;
    while start < rows {
        let len = chunk.min(rows - start);
        let b = if bias.dim(0)? == 1 { bias.clone() } else { bias.narrow(0, start, len)? };
        parts.push(f((start, len), &b)?);
        start += len;
    }
    cat(parts)
}

/// `parts` concatenated on dim 0 (the one part itself, without a copy).
fn cat(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 { Ok(parts.pop().expect("one part")) } else { Tensor::cat(&parts, 0) }
}

/// `P` `[rows, heads, seq, seq]` in the inputs' dtype.
fn probs(q: &Tensor, k: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (rows, heads, seq, _) = q.dims4()?;
    let scores = matmul(&per_kv_head(q, k)?, &k.t()?)?.reshape((rows, heads, seq, seq))?;
    scores.apply_op2_no_bwd(bias, &MaskedSoftmax { scale })
}

/// `x` `[rows, heads, seq, n]` viewed per KV head of `k`: `[rows, kv, heads / kv * seq, n]`.
fn per_kv_head(x: &Tensor, k: &Tensor) -> Result<Tensor> {
    let (rows, heads, seq, n) = x.dims4()?;
    let kv = k.dim(1)?;
    x.reshape((rows, kv, heads / kv * seq, n))
}

/// `O = P V`, `[rows, heads, seq, d]`.
fn weigh_values(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (rows, heads, seq, _) = p.dims4()?;
    matmul(&per_kv_head(p, v)?, v)?.reshape((rows, heads, seq, v.dim(3)?))
}

/// `(dQ, dK, dV)` of a chunk of rows, from the upstream `dO` `[rows, heads, seq, d]`.
fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    d_out: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_from(&probs(q, k, bias, scale)?, q, k, v, d_out, scale)
}

/// [`backward`] from the chunk's probabilities `p`.
fn backward_from(
    p: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_out: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (pg, dog) = (per_kv_head(p, k)?, per_kv_head(d_out, k)?);
    let dv = matmul(&pg.t()?, &dog)?;
    let dp = matmul(&dog, &v.t()?)?.reshape(p.shape())?;
    let ds = per_kv_head(&p.apply_op2_no_bwd(&dp, &MaskedSoftmaxBwd { scale })?, k)?;
    let dq = matmul(&ds, k)?.reshape(q.shape())?;
    let dk = matmul(&ds.t()?, &per_kv_head(q, k)?)?;
    Ok((dq, dk, dv))
}

struct Attention {
    /// The output, computed with tensor ops before the op is applied; taken by the forward.
    value: Mutex<Option<Tensor>>,
    bias: Tensor,
    scale: f64,
    budget: usize,
}

impl Attention {
    fn take_value(&self) -> Result<Tensor> {
        let mut slot = self.value.lock().unwrap_or_else(|e| e.into_inner());
        slot.take().ok_or_else(|| candle_core::Error::Msg("attention: forward run twice".into()))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "dpo-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::hand_over(&self.take_value()?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::hand_over(&self.take_value()?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::profile::op(q.device(), "attention_bwd");
        let (dq, dk, dv) = backward_in_chunks(q, k, v, &self.bias, self.scale, grad, Some(res), self.budget)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
