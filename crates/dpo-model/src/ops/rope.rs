//! Rotate-half RoPE, `y = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]`.
//! Its transpose is `rotate_half^T([a1, a2]) = [a2, -a1]`, so `dx = dy * cos + rotate_half^T(dy * sin)`.
//! The backward is the same op run with [`Rope::bwd`] set.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{Elem, check_float, cpu_dispatch, cpu_slice, on_device};

/// RoPE on `x` `[rows, heads, seq, head_dim]` with `cos`/`sin` `[seq, head_dim]` (the same
/// positions on every row) or `[rows, seq, head_dim]` (per-row positions), cast to x's dtype.
/// Computed in f32 (f64 for f64). Differentiable in `x`; the tables take no gradient.
///
/// `x` may be any view whose head rows (the last dimension) are contiguous, such as the heads
/// of a projection's output `[rows, seq, heads, head_dim]` transposed: the op reads it in place
/// and writes the contiguous result, so splitting the heads costs no copy of its own.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let _timed = crate::profile::op(x.device(), "rope");
    check_float(x, "rope")?;
    if !tables_fit(x, cos, sin)? {
        candle_core::bail!(
            "rope: x {:?} with cos {:?} and sin {:?} (expected [seq, d] or [rows, seq, d], d even)",
            x.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    let (cos, sin) = (table(cos, x)?, table(sin, x)?);
    let x = if x.stride()[3] == 1 { x.clone() } else { x.contiguous()? };
    x.apply_op3(&cos, &sin, Rope { bwd: false, bias: None })
}

/// [`rope`] of `x + bias`, `bias` `[heads * head_dim]` (each head's row added to every position,
/// rounded to x's dtype as an add of its own would round it): a projection's bias folded into
/// the RoPE that reads its output anyway, instead of a pass over the whole projection. No graph
/// (the frozen reference's forward and the hand-written backward's): an error if `x` or `bias`
/// has one.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let x = Tensor::arange(0f32, 16.0, &dev)?.reshape((1, 2, 2, 4))?; // [rows, heads, seq, d]
/// let bias = Tensor::new(&[1f32, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0], &dev)?;
/// let (cos, sin) = (Tensor::new(&[[0.6f32; 4]; 2], &dev)?, Tensor::new(&[[0.8f32; 4]; 2], &dev)?);
/// let y = dpo_model::ops::rope_with_bias(&x, &bias, &cos, &sin)?;
/// let want = dpo_model::ops::rope(&x.broadcast_add(&bias.reshape((2, 1, 4))?)?, &cos, &sin)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
/// // Head 0, position 0: x + b = [1, 3, 5, 7]; y = [1, 3, 5, 7] * 0.6 + [-5, -7, 1, 3] * 0.8.
/// let first = y.flatten_all()?.narrow(0, 0, 4)?.to_vec1::<f32>()?;
/// for (got, want) in first.iter().zip([-3.4f32, -3.8, 3.8, 6.6]) {
///     assert!((got - want).abs() < 1e-6);
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn rope_with_bias(x: &Tensor, bias: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let _timed = crate::profile::op(x.device(), "rope");
    check_float(x, "rope")?;
    let (_, heads, _, d) = x.dims4()?;
    if !tables_fit(x, cos, sin)? || bias.elem_count() != heads * d || x.track_op() || bias.track_op() {
        candle_core::bail!(
            "rope_with_bias: x {:?} (no graph) with bias {:?} (no graph, [heads * d]), cos {:?} and sin {:?}",
            x.shape(),
            bias.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    let (cos, sin) = (table(cos, x)?, table(sin, x)?);
    let bias = Some(bias.to_dtype(x.dtype())?.contiguous()?);
    let x = if x.stride()[3] == 1 { x.clone() } else { x.contiguous()? };
    x.apply_op3_no_bwd(&cos, &sin, &Rope { bwd: false, bias })
}

/// Whether `cos` and `sin` are tables for `x` `[rows, heads, seq, d]` (`d` even): `[seq, d]`, or
/// `[rows, seq, d]` with per-row positions.
fn tables_fit(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<bool> {
    let (r, _, s, d) = x.dims4()?;
    let fits = match cos.dims() {
        [ts, td] => *ts == s && *td == d,
        [tr, ts, td] => *tr == r && *ts == s && *td == d,
        _ => false,
    };
    Ok(d % 2 == 0 && fits && cos.shape() == sin.shape())
}

/// A cos/sin table in `x`'s dtype, contiguous, without gradient.
fn table(t: &Tensor, x: &Tensor) -> Result<Tensor> {
    t.to_dtype(x.dtype())?.detach().contiguous()
}

/// The backward of [`rope`] (the inverse rotation) applied to the upstream `dy` (no graph).
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let _timed = crate::profile::op(dy.device(), "rope_bwd");
    dy.contiguous()?.apply_op3_no_bwd(&table(cos, dy)?, &table(sin, dy)?, &Rope { bwd: true, bias: None })
}

/// The gradient of a stacked q/k/v projection's output `[rows, seq, (heads + 2 kv_heads) * d]`
/// from those of the rotated queries and keys and of the values (`[rows, heads or kv_heads,
/// seq, d]`): RoPE's backward on `dq` and `dk`, and the three merged back into the projection's
/// layout in one pass (no graph). It replaces `merge(cat([rope_backward(dq), rope_backward(dk),
/// dv], 1))`, six kernels: two RoPEs, three copies into the concatenation, one to merge heads.
pub fn rope_backward_merged(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let _timed = crate::profile::op(dq.device(), "rope_bwd");
    check_float(dq, "rope_backward_merged")?;
    let (r, _, s, d) = dq.dims4()?;
    let (kr, _, ks, kd) = dk.dims4()?;
    let same = (kr, ks, kd) == (r, s, d)
        && dv.dims() == dk.dims()
        && dk.dtype() == dq.dtype()
        && dv.dtype() == dq.dtype();
    if !same || !tables_fit(dq, cos, sin)? {
        candle_core::bail!(
            "rope_backward_merged: dq {:?}, dk {:?}, dv {:?} with cos {:?} (expected [rows, heads, seq, d], d even)",
            dq.shape(),
            dk.shape(),
            dv.shape(),
            cos.shape()
        );
    }
    let op = RopeBackwardMerged { cos: table(cos, dq)?, sin: table(sin, dq)? };
    dq.contiguous()?.apply_op3_no_bwd(&dk.contiguous()?, &dv.contiguous()?, &op)
}

/// The reference: [`crate::rope::apply`] (differentiable candle ops), with `[rows, seq, d]`
/// tables broadcast over heads.
pub fn rope_slow(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cos.rank() == 3 {
        crate::rope::apply(x, &cos.unsqueeze(1)?, &sin.unsqueeze(1)?)
    } else {
        crate::rope::apply(x, cos, sin)
    }
}

/// `[offset, row, head, position]`: where `x`'s first element is and its element strides over
/// rows, heads and positions, for `x` `[rows, heads, seq, d]` with contiguous head rows.
pub(crate) fn head_strides(l: &Layout) -> Result<[usize; 4]> {
    match l.stride() {
        [r, h, p, 1] => Ok([l.start_offset(), *r, *h, *p]),
        s => candle_core::bail!("rope: x {:?} with strides {s:?} (needs contiguous head rows)", l.dims()),
    }
}

pub(crate) struct Rope {
    /// Apply the transpose (the backward): `dy * cos + rotate_half^T(dy * sin)`.
    pub bwd: bool,
    /// `[heads * head_dim]`, contiguous, x's dtype: added to x first (forward only, no graph).
    pub bias: Option<Tensor>,
}

fn rope_cpu<T: Elem>(
    x: &CpuStorage,
    xl: &Layout,
    c: &CpuStorage,
    cl: &Layout,
    s: &CpuStorage,
    sl: &Layout,
    op: &Rope,
) -> Result<CpuStorage> {
    let xs = T::cpu_storage_as_slice(x)?;
    let bias = op.bias.as_ref().map(|b| b.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()).transpose()?;
    let bwd = op.bwd;
    let [offset, row_stride, head_stride, pos_stride] = head_strides(xl)?;
    let cos = cpu_slice::<T>(c, cl, "rope cos")?;
    let sin = cpu_slice::<T>(s, sl, "rope sin")?;
    let (_, heads, seq, d) = xl.shape().dims4()?;
    let per_row = cl.shape().rank() == 3;
    let mut out = vec![T::from_acc(T::cst(0.0)); xl.shape().elem_count()];
    if d > 0 {
        out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |biased, (t, y)| {
            let (pos, head, row) = (t % seq, (t / seq) % heads, t / (heads * seq));
            let start = offset + row * row_stride + head * head_stride + pos * pos_stride;
            let mut x = &xs[start..start + d];
            if let Some(b) = &bias {
                let b = &b[head * d..(head + 1) * d];
                biased.clear();
                biased.extend(x.iter().zip(b).map(|(&x, &b)| T::from_acc(x.acc() + b.acc())));
                x = biased;
            }
            let off = if per_row { (row * seq + pos) * d } else { pos * d };
            rotate_row(x, &cos[off..off + d], &sin[off..off + d], y, bwd);
        });
    }
    Ok(T::to_cpu_storage_owned(out))
}

/// One head row: `y = x * c + rotate_half(x) * s`, or with `bwd` its transpose.
fn rotate_row<T: Elem>(x: &[T], c: &[T], s: &[T], y: &mut [T], bwd: bool) {
    let h = x.len() / 2;
    for j in 0..x.len() {
        let (p, first) = if j < h { (j + h, true) } else { (j - h, false) };
        let v = if !bwd {
            let rot = if first { -x[p].acc() } else { x[p].acc() };
            x[j].acc() * c[j].acc() + rot * s[j].acc()
        } else {
            let ps = x[p].acc() * s[p].acc();
            x[j].acc() * c[j].acc() + if first { ps } else { -ps }
        };
        y[j] = T::from_acc(v);
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.bwd { "dpo-rope-bwd" } else { "dpo-rope" }
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_dispatch!(x, rope_cpu(x, xl, c, cl, s, sl, self))?;
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = bias.as_ref().map(|b| on_device(b, "the RoPE bias")).transpose()?;
        Ok((super::cuda::rope(x, xl, bias, c, cl, s, sl, self.bwd)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timed = crate::profile::op(grad.device(), "rope_bwd");
        if self.bias.is_some() {
            candle_core::bail!("rope_with_bias has no backward (it takes no graph)");
        }
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { bwd: !self.bwd, bias: None })?;
        Ok((Some(dx), None, None))
    }
}

/// [`rope_backward_merged`]: the inputs are `dq`, `dk`, `dv`; the tables ride along.
struct RopeBackwardMerged {
    cos: Tensor,
    sin: Tensor,
}

impl RopeBackwardMerged {
    /// `[rows, seq, (heads + 2 kv_heads) * d]` for `dq` `[rows, heads, seq, d]`, `dk` `[.., kv_heads, ..]`.
    fn shape(ql: &Layout, kl: &Layout) -> Result<Shape> {
        let (r, hq, s, d) = ql.shape().dims4()?;
        Ok(Shape::from((r, s, (hq + 2 * kl.dims()[1]) * d)))
    }

    /// The tables' storages on the device of `S`, with their layouts.
    fn tables<'a, S: super::DeviceStorage>(
        cos: &'a (candle_core::StorageRef<'a>, &'a Layout),
        sin: &'a (candle_core::StorageRef<'a>, &'a Layout),
    ) -> Result<(&'a S, &'a Layout, &'a S, &'a Layout)> {
        let ((c, cl), (s, sl)) = (on_device(cos, "rope cos")?, on_device(sin, "rope sin")?);
        Ok((c, cl, s, sl))
    }
}

#[allow(clippy::too_many_arguments)]
fn rope_backward_merged_cpu<T: Elem>(
    q: &CpuStorage,
    ql: &Layout,
    k: &CpuStorage,
    kl: &Layout,
    v: &CpuStorage,
    vl: &Layout,
    (c, cl, s, sl): (&CpuStorage, &Layout, &CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let (dq, dk, dv) =
        (cpu_slice::<T>(q, ql, "dq")?, cpu_slice::<T>(k, kl, "dk")?, cpu_slice::<T>(v, vl, "dv")?);
    let cos = cpu_slice::<T>(c, cl, "rope cos")?;
    let sin = cpu_slice::<T>(s, sl, "rope sin")?;
    let (_, hq, seq, d) = ql.shape().dims4()?;
    let hk = kl.dims()[1];
    let heads = hq + 2 * hk;
    let per_row = cl.shape().rank() == 3;
    let mut out = vec![T::from_acc(T::cst(0.0)); RopeBackwardMerged::shape(ql, kl)?.elem_count()];
    if d > 0 {
        out.par_chunks_mut(d).enumerate().for_each(|(t, y)| {
            let (head, pos, row) = (t % heads, (t / heads) % seq, t / (heads * seq));
            let (src, n, at) = match head {
                h if h < hq => (dq, hq, h),
                h if h < hq + hk => (dk, hk, h - hq),
                h => (dv, hk, h - hq - hk),
            };
            let start = ((row * n + at) * seq + pos) * d;
            let x = &src[start..start + d];
            if head >= hq + hk {
                y.copy_from_slice(x);
            } else {
                let off = if per_row { (row * seq + pos) * d } else { pos * d };
                rotate_row(x, &cos[off..off + d], &sin[off..off + d], y, true);
            }
        });
    }
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for RopeBackwardMerged {
    fn name(&self) -> &'static str {
        "dpo-rope-bwd-merged"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (cos, sin) = (self.cos.storage_and_layout(), self.sin.storage_and_layout());
        let tables = Self::tables::<CpuStorage>(&cos, &sin)?;
        let out = cpu_dispatch!(q, rope_backward_merged_cpu(q, ql, k, kl, v, vl, tables))?;
        Ok((out, Self::shape(ql, kl)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (cos, sin) = (self.cos.storage_and_layout(), self.sin.storage_and_layout());
        let tables = Self::tables::<candle_core::CudaStorage>(&cos, &sin)?;
        Ok((super::cuda::rope_backward_merged(q, ql, k, kl, v, vl, tables)?, Self::shape(ql, kl)?))
    }
}
