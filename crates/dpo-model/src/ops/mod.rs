//! Fused training ops with a backward: masked softmax, RMSNorm, rotate-half RoPE, SiLU gate, an
//! attention that recomputes its probabilities in the backward ([`attention`]), and the two
//! places mixed precision changes dtype: the norm that feeds a matmul ([`rms_norm_to`]) and the
//! residual add of a matmul's output ([`add_cast`]). Also the LM head's log-softmax at the
//! target tokens and its gradient ([`target_logprobs`], [`target_logprobs_backward`]; no graph),
//! and rows of a table by index with a parallel backward ([`gather_rows`]: the embedding).
//!
//! candle's own fused ops (`softmax_last_dim`, `rms_norm`, `rope`, ...) have no backward, so the
//! model used to spell each of these as a chain of differentiable candle ops. Each op here is one
//! [`candle_core::CustomOp2`]/[`candle_core::CustomOp3`] whose forward is a single pass (plain Rust
//! over rows with rayon on the CPU, one kernel from `kernels/dpo_ops.cu` on CUDA) and whose `bwd`
//! is another such op, so forward and backward are each one fused pass.
//!
//! Every op has its slow reference next to it (`*_slow`: the composition of candle ops the model
//! used before; for `rms_norm_to` and `add_cast`, the two ops each fuses), and [`self_check`]
//! compares the two, and the device against the CPU; [`verify`] is its short form, which a
//! training run on a GPU passes before it starts.
//!
//! Numerics: bf16/f16/f32 inputs are computed in f32, f64 in f64; results are rounded to the
//! input dtype once (`rms_norm_to`: to its output dtype). Inputs are made contiguous by the
//! public functions.

mod attention;
mod cast;
mod check;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
mod gather;
mod logprobs;
mod residual;
mod rms_norm;
mod rope;
mod silu;
mod softmax;
#[cfg(test)]
mod tests;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, WithDType};

pub use check::{randn_tensor, self_check, verify};
#[cfg(feature = "cuda")]
pub(crate) use cuda::gemm_bf16_f32;

/// `[norm, factor]` (f64, on the device) for gradients `grads` (f32) on CUDA: the global norm
/// `sqrt(sum_i ||g_i||^2)` and PyTorch's clipping factor `min(1, max_norm / (norm + 1e-6))` (1
/// when `max_norm <= 0`; NaN when the norm is not finite, which makes [`adamw_fused`] write
/// nothing). Computed without a synchronization, in a launch per 16 tensors and one to add up;
/// `None` off CUDA.
pub fn clip_fused(grads: &[Tensor], max_norm: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Some(first) = grads.first()
        && first.device().is_cuda()
        && grads.iter().all(|g| g.dtype() == DType::F32 && g.device().same_device(first.device()))
    {
        let grads = grads.iter().map(|g| g.contiguous()).collect::<Result<Vec<_>>>()?;
        let stash = Stash::default();
        stash.put(cuda::clip(&grads, max_norm)?, candle_core::Shape::from(2));
        return stash.take(first).map(Some);
    }
    let _ = (grads, max_norm);
    Ok(None)
}

/// `(norm, factor)` of a [`clip_fused`] result, on the host (this waits for the device).
pub fn read_clip(clip: &Tensor) -> Result<(f64, f64)> {
    match clip.to_vec1::<f64>()?[..] {
        [norm, factor] => Ok((norm, factor)),
        _ => candle_core::bail!("the clipping tensor is not [norm, factor]"),
    }
}

/// One parameter's AdamW update for [`adamw_fused`]: `p`, `m`, `v` (f32) updated in place from
/// the gradient `g`; `decay` is `1 - lr * weight_decay` (1 where the parameter does not decay).
pub struct AdamWPart<'a> {
    pub p: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    pub decay: f64,
}

/// One AdamW step of every part in place on CUDA, in a launch per 16 parameters, each gradient
/// scaled by the clipping factor `clip[1]` (from [`clip_fused`], read where it is) as it is
/// read; nothing is written if that factor is NaN. `Ok(false)`, with nothing done, unless every
/// tensor is f32, contiguous and on one CUDA device (the caller then uses tensor ops).
pub fn adamw_fused(
    parts: &[AdamWPart],
    clip: &Tensor,
    betas_eps: (f64, f64, f64),
    step_size: f64,
    bc2_sqrt: f64,
) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if clip.device().is_cuda()
        && parts
            .iter()
            .flat_map(|x| [x.p, x.m, x.v, x.g])
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(clip.device()))
    {
        let parts: Vec<cuda::AdamWPart> = parts
            .iter()
            .map(|x| cuda::AdamWPart { p: x.p, m: x.m, v: x.v, g: x.g, decay: x.decay as f32 })
            .collect();
        cuda::adamw(&parts, &clip.contiguous()?, betas_eps, step_size as f32, bc2_sqrt as f32)?;
        return Ok(true);
    }
    let _ = (parts, clip, betas_eps, step_size, bc2_sqrt);
    Ok(false)
}

pub use attention::{
    KeptProbs, SCORE_BUDGET, attention, attention_backward, attention_backward_kept, attention_keeping_probs,
    attention_slow,
};
pub use cast::{cast_cat, cast_cat_slow};
pub use gather::{add_gather_rows_backward, gather_rows, gather_rows_slow};
pub use logprobs::{
    target_logprobs, target_logprobs_backward, target_logprobs_backward_slow, target_logprobs_backward_to,
    target_logprobs_slow,
};
pub use residual::add_cast;
pub use rms_norm::{
    add_rms_norm_to, rms_norm, rms_norm_backward, rms_norm_backward_add, rms_norm_backward_add_lo,
    rms_norm_slow, rms_norm_to,
};
pub use rope::{rope, rope_backward, rope_backward_merged, rope_slow, rope_with_bias};
pub use silu::{
    silu_mul, silu_mul_backward, silu_mul_backward_and_value, silu_mul_backward_stacked_and_value,
    silu_mul_slow,
};
pub use softmax::{masked_softmax, masked_softmax_slow};

/// A device's storage inside a [`candle_core::Storage`].
pub trait DeviceStorage: candle_core::backend::BackendStorage + Sized {
    fn pick(s: &candle_core::Storage) -> Option<&Self>;
}

impl DeviceStorage for CpuStorage {
    fn pick(s: &candle_core::Storage) -> Option<&Self> {
        if let candle_core::Storage::Cpu(s) = s { Some(s) } else { None }
    }
}

#[cfg(feature = "cuda")]
impl DeviceStorage for candle_core::CudaStorage {
    fn pick(s: &candle_core::Storage) -> Option<&Self> {
        if let candle_core::Storage::Cuda(s) = s { Some(s) } else { None }
    }
}

#[cfg(feature = "metal")]
impl DeviceStorage for candle_core::MetalStorage {
    fn pick(s: &candle_core::Storage) -> Option<&Self> {
        if let candle_core::Storage::Metal(s) = s { Some(s) } else { None }
    }
}

/// A tensor an op carries besides its inputs (locked with [`Tensor::storage_and_layout`]), as
/// the storage of the device the op runs on.
pub(crate) fn on_device<'a, S: DeviceStorage>(
    t: &'a (candle_core::StorageRef<'a>, &'a Layout),
    what: &str,
) -> Result<(&'a S, &'a Layout)> {
    match S::pick(&t.0) {
        Some(s) => Ok((s, t.1)),
        None => candle_core::bail!("{what} is on another device than the op's inputs"),
    }
}

/// Hands a value computed beforehand with tensor ops over as a custom op's output (candle's
/// custom-op forward sees raw storage only, the backward sees tensors): a copy of its storage.
pub fn hand_over<S: DeviceStorage>(value: &Tensor) -> Result<(S, candle_core::Shape)> {
    let locked = value.storage_and_layout();
    let (s, layout) = on_device::<S>(&locked, "a custom op's value")?;
    Ok((s.try_clone(layout)?, value.shape().clone()))
}

/// A second output of a custom op on CUDA (candle's custom ops return one storage): the op's
/// CUDA forward leaves it here, and [`Stash::take`] makes it a tensor, without a copy.
#[cfg(feature = "cuda")]
#[derive(Default)]
pub(crate) struct Stash(std::sync::Mutex<Option<(candle_core::CudaStorage, candle_core::Shape)>>);

#[cfg(feature = "cuda")]
impl Stash {
    pub(crate) fn put(&self, storage: candle_core::CudaStorage, shape: candle_core::Shape) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((storage, shape));
    }

    /// The stashed storage as a tensor (`anchor`: any tensor on its device, the op's input).
    pub(crate) fn take(&self, anchor: &Tensor) -> Result<Tensor> {
        anchor.apply_op1_no_bwd(self)
    }
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for Stash {
    fn name(&self) -> &'static str {
        "dpo-stash"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        candle_core::bail!("a stashed output exists on CUDA only")
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(stashed) => Ok(stashed),
            None => candle_core::bail!("no stashed output (the op did not run on CUDA, or it was taken)"),
        }
    }
}

/// An element type the fused ops take, with the type they compute in.
pub(crate) trait Elem: WithDType + Copy + Send + Sync {
    type A: WithDType + num_traits::Float + std::ops::AddAssign + std::iter::Sum + Send + Sync;
    fn acc(self) -> Self::A;
    fn from_acc(a: Self::A) -> Self;
    /// `a` rounded through `Self` (a cast to `Self` and back).
    fn round(a: Self::A) -> Self::A {
        Self::from_acc(a).acc()
    }
    fn cst(x: f64) -> Self::A {
        <Self::A as num_traits::NumCast>::from(x).expect("float constant")
    }
}

impl Elem for f32 {
    type A = f32;
    fn acc(self) -> f32 {
        self
    }
    fn from_acc(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    fn acc(self) -> f64 {
        self
    }
    fn from_acc(a: f64) -> Self {
        a
    }
}

impl Elem for half::bf16 {
    type A = f32;
    fn acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
}

impl Elem for half::f16 {
    type A = f32;
    fn acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(a: f32) -> Self {
        half::f16::from_f32(a)
    }
}

/// Calls `$f::<T>($args)` for the float type `T` of CPU storage `$s`.
macro_rules! cpu_dispatch {
    ($s:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $s {
            candle_core::CpuStorage::BF16(_) => $f::<half::bf16>($($arg),*),
            candle_core::CpuStorage::F16(_) => $f::<half::f16>($($arg),*),
            candle_core::CpuStorage::F32(_) => $f::<f32>($($arg),*),
            candle_core::CpuStorage::F64(_) => $f::<f64>($($arg),*),
            other => candle_core::bail!("fused op: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(other)),
        }
    };
}
pub(crate) use cpu_dispatch;

/// The contiguous part of `s` that `l` describes.
pub(crate) fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let s = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Rows per rayon task for element-wise loops.
pub(crate) const CPU_CHUNK: usize = 4096;

/// The dtypes the fused ops accept.
pub(crate) fn check_float(t: &Tensor, what: &str) -> Result<()> {
    match t.dtype() {
        DType::BF16 | DType::F16 | DType::F32 | DType::F64 => Ok(()),
        dt => candle_core::bail!("{what}: unsupported dtype {dt:?}"),
    }
}
