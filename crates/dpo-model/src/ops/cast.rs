//! Groups of tensors, each group stacked along its first dimension and cast, all into one
//! buffer: `out[g] = cat(groups[g], 0).to_dtype(dtype)`, without a graph.
//!
//! The manual backward's per-step copy of the f32 master weights in the matmul dtype, stacked as
//! the stacked projections take them (`[Wq; Wk; Wv]`, `[Wgate; Wup]`). On CUDA one kernel reads
//! each f32 weight once and writes its bf16 rows in place in the stack, 16 tensors a launch
//! (`dpo_cast_parts_f32_to_*`), where a cast per tensor and then the stacking's copies wrote the
//! stacked weights twice and read them once more. Elsewhere, and for other dtypes, it is the
//! casts and the `cat`s (a one-tensor group already in `dtype` shares its storage).

use candle_core::{DType, Result, Shape, Tensor};

/// `cat(group, 0).to_dtype(dtype)` for each group, detached (no gradient flows back).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let a = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let b = Tensor::new(&[[3f32, 4.5], [5.0, 6.0]], &Device::Cpu)?;
/// let c = Tensor::new(&[0.25f32], &Device::Cpu)?;
/// let out = dpo_model::ops::cast_cat(&[&[&a, &b], &[&c]], DType::BF16)?;
/// assert_eq!(out[0].dims(), &[3, 2]);
/// assert_eq!(out[0].to_dtype(DType::F32)?.to_vec2::<f32>()?, [[1.0, 2.0], [3.0, 4.5], [5.0, 6.0]]);
/// assert_eq!((out[1].dtype(), out[1].to_dtype(DType::F32)?.to_vec1::<f32>()?), (DType::BF16, vec![0.25]));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn cast_cat(groups: &[&[&Tensor]], dtype: DType) -> Result<Vec<Tensor>> {
    let shapes = groups.iter().map(|g| stacked_shape(g)).collect::<Result<Vec<_>>>()?;
    #[cfg(feature = "cuda")]
    if fused(groups, dtype) {
        let _timed = crate::profile::op(groups[0][0].device(), "cast_cat");
        return cuda_cast_cat(groups, &shapes, dtype);
    }
    let _ = shapes;
    cast_cat_slow(groups, dtype)
}

/// [`cast_cat`] as candle's casts and `cat`s.
pub fn cast_cat_slow(groups: &[&[&Tensor]], dtype: DType) -> Result<Vec<Tensor>> {
    groups
        .iter()
        .map(|g| {
            let cast = g.iter().map(|t| t.detach().to_dtype(dtype)).collect::<Result<Vec<_>>>()?;
            match cast.as_slice() {
                [one] => Ok(one.clone()),
                _ => Tensor::cat(&cast, 0),
            }
        })
        .collect()
}

/// The shape of `cat(group, 0)`: every tensor of a group has the same trailing dimensions.
fn stacked_shape(group: &[&Tensor]) -> Result<Shape> {
    let Some(first) = group.first() else { candle_core::bail!("cast_cat: an empty group") };
    let mut dims = first.dims().to_vec();
    if dims.is_empty() {
        candle_core::bail!("cast_cat: a scalar cannot be stacked");
    }
    for t in &group[1..] {
        if t.rank() != dims.len() || t.dims()[1..] != dims[1..] {
            candle_core::bail!("cast_cat: cannot stack {:?} on {:?}", t.dims(), first.dims());
        }
        dims[0] += t.dims()[0];
    }
    Ok(Shape::from(dims))
}

/// One kernel pass: f32 tensors, contiguous, on one CUDA device, into bf16 or f16.
#[cfg(feature = "cuda")]
fn fused(groups: &[&[&Tensor]], dtype: DType) -> bool {
    let Some(dev) = groups.first().and_then(|g| g.first()).map(|t| t.device()) else { return false };
    matches!(dtype, DType::BF16 | DType::F16)
        && dev.is_cuda()
        && groups
            .iter()
            .flat_map(|g| g.iter())
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(dev))
}

/// Each group starts 16-byte aligned in the buffer (whole vectors for the kernel and cuBLAS);
/// a group's tensors follow one another as `cat` places them.
#[cfg(feature = "cuda")]
fn cuda_cast_cat(groups: &[&[&Tensor]], shapes: &[Shape], dtype: DType) -> Result<Vec<Tensor>> {
    let align = 16 / dtype.size_in_bytes();
    let mut parts = Vec::new();
    let mut starts = Vec::with_capacity(groups.len());
    let mut at = 0;
    for (g, shape) in groups.iter().zip(shapes) {
        starts.push(at);
        let mut off = at;
        for t in g.iter() {
            parts.push((*t, off));
            off += t.elem_count();
        }
        at = (at + shape.elem_count()).next_multiple_of(align);
    }
    let storage = super::cuda::cast_parts(&parts, at, dtype)?;
    let stash = super::Stash::default();
    stash.put(storage, Shape::from(at));
    let flat = stash.take(groups[0][0])?;
    starts
        .iter()
        .zip(shapes)
        .map(|(&start, shape)| flat.narrow(0, start, shape.elem_count())?.reshape(shape))
        .collect()
}
