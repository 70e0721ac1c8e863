//! The residual add of a branch computed in the matmul dtype: `out = h + f32(y)` for the f32
//! residual stream `h` and a bf16/f16 branch output `y` (attention or MLP), in one pass instead
//! of a cast and an add. Backward: `dh = dout`, `dy = T(dout)`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{CPU_CHUNK, Elem, cpu_slice};

/// `h + y` with `y` cast to `h`'s dtype first; differentiable in both. One pass for an f32 `h`
/// and a bf16/f16 `y` of the same shape; otherwise the cast and the add.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let h = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// let y = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?.to_dtype(DType::BF16)?;
/// let out = dpo_model::ops::add_cast(&h, &y)?;
/// assert_eq!((out.dtype(), out.to_vec1::<f32>()?), (DType::F32, vec![1.5, 2.25]));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn add_cast(h: &Tensor, y: &Tensor) -> Result<Tensor> {
    let fused =
        h.dtype() == DType::F32 && matches!(y.dtype(), DType::BF16 | DType::F16) && h.shape() == y.shape();
    if !fused {
        return h + y.to_dtype(h.dtype())?;
    }
    let _timed = crate::profile::op(h.device(), "add_cast");
    h.contiguous()?.apply_op2(&y.contiguous()?, AddCast)
}

struct AddCast;

fn fwd_cpu<T: Elem<A = f32>>(h: &CpuStorage, hl: &Layout, y: &CpuStorage, yl: &Layout) -> Result<CpuStorage> {
    let h = cpu_slice::<f32>(h, hl, "add_cast")?;
    let y = cpu_slice::<T>(y, yl, "add_cast")?;
    let mut out = vec![0f32; h.len()];
    out.par_chunks_mut(CPU_CHUNK).zip(h.par_chunks(CPU_CHUNK).zip(y.par_chunks(CPU_CHUNK))).for_each(
        |(o, (h, y))| {
            for ((o, &h), &y) in o.iter_mut().zip(h).zip(y) {
                *o = h + y.acc();
            }
        },
    );
    Ok(CpuStorage::F32(out))
}

impl CustomOp2 for AddCast {
    fn name(&self) -> &'static str {
        "dpo-add-cast"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        hl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match y {
            CpuStorage::BF16(_) => fwd_cpu::<half::bf16>(h, hl, y, yl),
            CpuStorage::F16(_) => fwd_cpu::<half::f16>(h, hl, y, yl),
            _ => candle_core::bail!("add_cast: the branch must be bf16 or f16"),
        }?;
        Ok((out, hl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        hl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::add_cast(h, hl, y, yl)?, hl.shape().clone()))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.to_dtype(y.dtype())?)))
    }
}
