//! Rows of a table by index, `y[j] = W[ids[j]]` (the embedding lookup, and the LM head's pick of
//! the scored positions), with the backward `dW[v] = sum_{j : ids[j] = v} dy[j]` summed in
//! position order, in parallel over the rows it writes.
//!
//! candle's `index_select` has the same forward, but its backward (`index_add`) runs on CUDA as
//! one thread per column, each walking every index in turn: for 8,192 tokens and hidden 896,
//! 896 threads of 8,192 dependent steps each. The sums are the same, in the same order.

use std::collections::HashMap;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{Elem, check_float, cpu_dispatch, cpu_slice};

/// `table[ids]`, `[n, h]` for `table` `[vocab, h]` and `ids` `[n]` (u32), differentiable in
/// `table`. Positions whose id is `no_grad` (a pad token, as `nn.Embedding(padding_idx)`) give
/// their row but send it no gradient. An id outside the table is an error on the CPU and a NaN
/// row on CUDA.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let w = Var::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
/// let ids = Tensor::new(&[2u32, 0, 2, 1], &Device::Cpu)?;
/// let y = dpo_model::ops::gather_rows(&w, &ids, Some(1))?;
/// assert_eq!(y.to_vec2::<f32>()?, [[5.0, 6.0], [1.0, 2.0], [5.0, 6.0], [3.0, 4.0]]);
/// let dy = Tensor::new(&[[1f32, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]], &Device::Cpu)?;
/// let grads = (y * dy)?.sum_all()?.backward()?;
/// // Row 2 sums positions 0 and 2; row 1 (no_grad) gets nothing.
/// assert_eq!(grads.get(&w).unwrap().to_vec2::<f32>()?, [[2.0, 2.0], [0.0, 0.0], [5.0, 5.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn gather_rows(table: &Tensor, ids: &Tensor, no_grad: Option<u32>) -> Result<Tensor> {
    let _timed = crate::profile::op(table.device(), "gather_rows");
    check_float(table, "gather_rows")?;
    let (_, h) = table.dims2()?;
    if ids.dtype() != DType::U32 || ids.rank() != 1 || h == 0 {
        candle_core::bail!(
            "gather_rows: ids must be u32 [n] and rows not empty (got {:?} {:?})",
            ids.dtype(),
            ids.dims()
        );
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, GatherRows { no_grad })
}

/// `acc + dW`, for `dW` the gradient [`gather_rows`] sends its table `[vocab, h]` from the
/// upstream `dy` `[n, h]` at positions `ids` (a tied embedding's: `acc` its gradient as the LM
/// head). On CUDA, for f32, the sums are added into `acc`'s rows in place, which is why the call
/// takes `acc`: no `[vocab, h]` gradient is made, zeroed or added (2 GB of traffic a step at
/// Qwen2.5-0.5B's vocabulary), only the named rows are touched. Elsewhere the backward and an
/// add. The same numbers either way (`acc[v] + sum`, the sum in position order).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let acc = Tensor::new(&[[1f32, 1.0], [1.0, 1.0], [1.0, 1.0]], &Device::Cpu)?;
/// let ids = Tensor::new(&[2u32, 0, 2, 1], &Device::Cpu)?;
/// let dy = Tensor::new(&[[1f32, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]], &Device::Cpu)?;
/// let g = dpo_model::ops::add_gather_rows_backward(acc, &dy, &ids, Some(1))?;
/// assert_eq!(g.to_vec2::<f32>()?, [[3.0, 3.0], [1.0, 1.0], [6.0, 6.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn add_gather_rows_backward(
    acc: Tensor,
    dy: &Tensor,
    ids: &Tensor,
    no_grad: Option<u32>,
) -> Result<Tensor> {
    let _timed = crate::profile::op(dy.device(), "gather_rows_bwd");
    let (vocab, h) = acc.dims2()?;
    if dy.dims2()?.1 != h || ids.dtype() != DType::U32 || ids.dims() != [dy.dim(0)?] {
        candle_core::bail!(
            "gather_rows backward: acc {:?}, dy {:?}, ids {:?} {:?}",
            acc.dims(),
            dy.dims(),
            ids.dtype(),
            ids.dims()
        );
    }
    let dy = dy.to_dtype(acc.dtype())?.contiguous()?;
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() && acc.dtype() == DType::F32 && acc.is_contiguous() {
        super::cuda::scatter_rows_add_inplace(&acc, &dy, &ids.contiguous()?, no_grad)?;
        return Ok(acc);
    }
    let dw = dy.apply_op2_no_bwd(&ids.contiguous()?, &ScatterRows { vocab, no_grad })?;
    acc + dw
}

/// The reference: candle's `index_select`, with `no_grad`'s positions detached.
pub fn gather_rows_slow(table: &Tensor, ids: &Tensor, no_grad: Option<u32>) -> Result<Tensor> {
    let rows = table.index_select(ids, 0)?;
    match no_grad {
        Some(id) if table.track_op() => {
            let skip = ids.eq(id)?.to_dtype(rows.dtype())?.unsqueeze(1)?;
            let keep = skip.affine(-1.0, 1.0)?;
            rows.broadcast_mul(&keep)? + rows.detach().broadcast_mul(&skip)?
        }
        _ => Ok(rows),
    }
}

pub(super) struct GatherRows {
    pub(super) no_grad: Option<u32>,
}

/// `(dy, ids) -> dW` `[vocab, h]`.
struct ScatterRows {
    vocab: usize,
    no_grad: Option<u32>,
}

fn check_ids(ids: &[u32], vocab: usize, what: &str) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => candle_core::bail!("{what}: index {bad} outside a table of {vocab} rows"),
        None => Ok(()),
    }
}

fn gather_cpu<T: Elem>(w: &CpuStorage, wl: &Layout, ids: &CpuStorage, il: &Layout) -> Result<CpuStorage> {
    let w = cpu_slice::<T>(w, wl, "gather_rows")?;
    let ids = cpu_slice::<u32>(ids, il, "gather_rows ids")?;
    let (vocab, h) = wl.shape().dims2()?;
    check_ids(ids, vocab, "gather_rows")?;
    let mut out = vec![T::from_acc(T::cst(0.0)); ids.len() * h];
    out.par_chunks_mut(h).zip(ids.par_iter()).for_each(|(y, &id)| {
        y.copy_from_slice(&w[id as usize * h..(id as usize + 1) * h]);
    });
    Ok(T::to_cpu_storage_owned(out))
}

fn scatter_cpu<T: Elem>(
    dy: &CpuStorage,
    dl: &Layout,
    ids: &CpuStorage,
    il: &Layout,
    op: &ScatterRows,
) -> Result<CpuStorage> {
    let dy = cpu_slice::<T>(dy, dl, "gather_rows backward")?;
    let ids = cpu_slice::<u32>(ids, il, "gather_rows backward ids")?;
    let h = dl.shape().dims2()?.1;
    check_ids(ids, op.vocab, "gather_rows backward")?;
    // Each row's positions, in order.
    let mut positions: HashMap<u32, Vec<usize>> = HashMap::new();
    for (j, &id) in ids.iter().enumerate() {
        if Some(id) != op.no_grad {
            positions.entry(id).or_default().push(j);
        }
    }
    let zero = T::cst(0.0);
    let mut out = vec![T::from_acc(zero); op.vocab * h];
    out.par_chunks_mut(h).enumerate().for_each(|(v, row)| {
        if let Some(js) = positions.get(&(v as u32)) {
            for (c, x) in row.iter_mut().enumerate() {
                *x = T::from_acc(js.iter().fold(zero, |acc, &j| acc + dy[j * h + c].acc()));
            }
        }
    });
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "dpo-gather-rows"
    }

    fn cpu_fwd(
        &self,
        w: &CpuStorage,
        wl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_dispatch!(w, gather_cpu(w, wl, ids, il))?;
        Ok((out, Shape::from((il.dims()[0], wl.dims()[1]))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::gather_rows(w, wl, ids, il)?, Shape::from((il.dims()[0], wl.dims()[1]))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::profile::op(grad.device(), "gather_rows_bwd");
        let op = ScatterRows { vocab: w.dim(0)?, no_grad: self.no_grad };
        let dw = grad.to_dtype(w.dtype())?.contiguous()?.apply_op2_no_bwd(ids, &op)?;
        Ok((Some(dw), None))
    }
}

impl CustomOp2 for ScatterRows {
    fn name(&self) -> &'static str {
        "dpo-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_dispatch!(dy, scatter_cpu(dy, dl, ids, il, self))?;
        Ok((out, Shape::from((self.vocab, dl.dims()[1]))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::scatter_rows(dy, dl, ids, il, self.vocab, self.no_grad)?;
        Ok((out, Shape::from((self.vocab, dl.dims()[1]))))
    }
}
