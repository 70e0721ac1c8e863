//! `y = a @ b`, with the operand layouts cuBLAS takes checked on every device.
//!
//! candle's CUDA matmul hands both operands to cuBLAS as they are. cuBLAS takes a matrix only
//! when it is contiguous or the transpose of a contiguous one (its leading dimension equal to
//! its column or row count), and batch dimensions only with one batch stride. Anything else
//! (a column slice, a batch of permuted heads) fails with `MatMulNonContiguous`, but **only on
//! the GPU**: the CPU's gemm takes any strides. So a layout that CUDA rejects would pass every
//! CPU test and fail at the first step of a GPU run.
//!
//! [`matmul`] checks candle's CUDA rule (`gemm_config` in candle-core 0.11.1's
//! `cuda_backend/mod.rs`, ported as [`cublas_takes`]) before it multiplies, in debug builds on
//! every device, so the CPU tests fail where the GPU would. Release builds leave the check to
//! candle on CUDA and skip it on the CPU, where any layout works.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
//! let y = dpo_model::matmul(&a, &a.t()?)?; // a @ a^T: a transposed view cuBLAS takes
//! assert_eq!(y.to_vec2::<f32>()?, [[5.0, 11.0], [11.0, 25.0]]);
//! // Two columns of a 2 x 3 matrix: leading dimension 3, row length 2; cuBLAS takes neither.
//! let b = Tensor::new(&[[1f32, 0.0, 9.0], [0.0, 1.0, 9.0]], &Device::Cpu)?.narrow(1, 0, 2)?;
//! assert!(!dpo_model::cublas_takes(a.layout(), b.layout()));
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Layout, Result, Tensor};

/// `a @ b` (candle's [`Tensor::matmul`]); in debug builds an error first if cuBLAS would not take
/// the operands' layouts ([`cublas_takes`]), on any device.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_layouts(a, b)?;
    a.matmul(b)
}

/// `a @ b` in f32 for bf16 `a` `[m, k]` and `b` `[k, n]`: the products of the operands' bf16
/// values summed in f32, nothing rounded after the operands. On CUDA one cuBLAS GEMM with bf16
/// operands and an f32 result (bf16 tensor-core speed, twice TF32's on an H100); elsewhere the
/// operands cast to f32 and multiplied. No gradient (the LM head's op has its own backward).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// // 1 + 2^-8 is no bf16: the operands are rounded first, the products and the sum are not.
/// let a = Tensor::new(&[[1f32 + 1.0 / 256.0, 3.0]], &Device::Cpu)?.to_dtype(DType::BF16)?;
/// let b = Tensor::new(&[[1f32 / 3.0], [1.0 / 3.0]], &Device::Cpu)?.to_dtype(DType::BF16)?;
/// let y = dpo_model::matmul_bf16_f32(&a, &b)?;
/// assert_eq!(y.dtype(), DType::F32);
/// // bf16(1/3) = 0.333984375; 1 * 0.333984375 + 3 * 0.333984375, exactly.
/// assert_eq!(y.to_vec2::<f32>()?, [[1.3359375]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn matmul_bf16_f32(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ((_, k), (kb, _)) = (a.dims2()?, b.dims2()?);
    if a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || k != kb {
        candle_core::bail!(
            "matmul_bf16_f32 of {:?} {:?} and {:?} {:?}: two bf16 matrices [m, k] and [k, n]",
            a.dtype(),
            a.dims(),
            b.dtype(),
            b.dims()
        );
    }
    check_layouts(a, b)?;
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() && a.elem_count() > 0 && b.elem_count() > 0 {
        return a.apply_op2_no_bwd(b, &MatmulBf16F32);
    }
    matmul(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)
}

/// [`matmul_bf16_f32`] on CUDA.
#[cfg(feature = "cuda")]
struct MatmulBf16F32;

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for MatmulBf16F32 {
    fn name(&self) -> &'static str {
        "matmul-bf16-f32"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("matmul-bf16-f32 runs as an op on CUDA only")
    }

    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (m, n) = (al.dims()[0], bl.dims()[1]);
        Ok((crate::ops::gemm_bf16_f32((a, al), (b, bl))?, (m, n).into()))
    }
}

/// In debug builds, an error if cuBLAS would not take the operands' layouts ([`cublas_takes`]).
fn check_layouts(a: &Tensor, b: &Tensor) -> Result<()> {
    if cfg!(debug_assertions) && !cublas_takes(a.layout(), b.layout()) {
        candle_core::bail!(
            "matmul of {:?} (strides {:?}) and {:?} (strides {:?}): a layout cuBLAS does not take \
             (the CUDA run would fail here); make the operand contiguous",
            a.dims(),
            a.stride(),
            b.dims(),
            b.stride()
        );
    }
    Ok(())
}

/// Whether candle's CUDA matmul passes `lhs` `[.., m, k]` and `rhs` `[.., k, n]` to cuBLAS
/// (rather than failing with `MatMulNonContiguous`): each matrix contiguous or transposed
/// contiguous, a size-1 dimension taking any stride, and at most two batch dimensions that
/// collapse into one stride.
pub fn cublas_takes(lhs: &Layout, rhs: &Layout) -> bool {
    let (ld, rd) = (lhs.dims(), rhs.dims());
    let rank = ld.len();
    if rank < 2 || rd.len() != rank {
        return false; // candle's own shape check rejects these on every device
    }
    let (m, k, n) = (ld[rank - 2], ld[rank - 1], rd[rank - 1]);
    if lhs.shape().elem_count() == 0 || n == 0 {
        return true; // candle returns zeros without calling cuBLAS
    }
    matrix_ok(rhs.stride(), k, n) && matrix_ok(lhs.stride(), m, k) && batch_ok(lhs) && batch_ok(rhs)
}

/// A `[rows, cols]` matrix with these trailing strides: row-major with leading dimension `cols`,
/// or column-major with leading dimension `rows` (`gemm_config`'s `transa`/`transb` cases).
fn matrix_ok(stride: &[usize], rows: usize, cols: usize) -> bool {
    cublas_operand(stride, rows, cols).is_some()
}

/// How cuBLAS takes a `[rows, cols]` matrix with these trailing strides: `(false, cols)`
/// row-major (no transpose, leading dimension `cols`), `(true, rows)` the transpose of a
/// row-major matrix; `None` neither ([`matrix_ok`]; [`matmul_bf16_f32`]'s GEMM on CUDA).
pub(crate) fn cublas_operand(stride: &[usize], rows: usize, cols: usize) -> Option<(bool, usize)> {
    let (minor, major) = (stride[stride.len() - 1], stride[stride.len() - 2]);
    if (minor == 1 || cols == 1) && (major == cols || rows == 1) {
        Some((false, cols))
    } else if (minor == rows || cols == 1) && (major == 1 || rows == 1) {
        Some((true, rows))
    } else {
        None
    }
}

/// The batch dimensions (all but the last two) reduce to one batch stride.
fn batch_ok(l: &Layout) -> bool {
    let (dims, stride) = (l.dims(), l.stride());
    match stride[..stride.len() - 2] {
        [] | [_] => true,
        [s1, s2] => s1 == s2 * dims[1] || dims[0] == 1 || dims[1] == 1,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn t(dims: &[usize]) -> Tensor {
        let n = dims.iter().product::<usize>() as f32;
        Tensor::arange(0f32, n, &Device::Cpu).unwrap().reshape(dims).unwrap()
    }

    /// The layouts the model uses pass; the ones cuBLAS rejects fail, and `matmul` refuses them
    /// (debug builds: the test profile).
    #[test]
    fn cublas_layout_rules() {
        let ok = |a: &Tensor, b: &Tensor| cublas_takes(a.layout(), b.layout());
        let (a, w) = (t(&[6, 4]), t(&[5, 4]));
        assert!(ok(&a, &w.t().unwrap())); // x @ W^T
        assert!(ok(&a.t().unwrap(), &a)); // x^T @ x
        assert!(ok(&a.narrow(0, 2, 3).unwrap(), &w.t().unwrap())); // a block of rows
        // A block of columns: leading dimension 4, 3 columns.
        let cols = a.narrow(1, 0, 3).unwrap();
        assert!(!ok(&cols, &t(&[3, 2])));
        assert!(!ok(&t(&[2, 6]), &cols.t().unwrap().t().unwrap()));
        // Heads: [rows, heads, seq, d] contiguous, and K^T per head.
        let q = t(&[2, 3, 5, 4]);
        assert!(ok(&q, &q.t().unwrap()));
        // Heads split off [rows, seq, heads, d] without a copy: the batch strides do not collapse.
        let view = t(&[2, 5, 3, 4]).transpose(1, 2).unwrap();
        assert!(!ok(&view, &q.t().unwrap()));
        assert!(ok(&view.contiguous().unwrap(), &q.t().unwrap()));
        // One batch row narrowed from a larger batch (offset only): fine.
        assert!(ok(&q.narrow(0, 1, 1).unwrap(), &q.narrow(0, 1, 1).unwrap().t().unwrap()));
        // A size-1 dimension takes any stride (one row of a column block), but a column
        // slice is no column vector.
        assert!(ok(&t(&[3, 6]).narrow(1, 0, 4).unwrap().narrow(0, 1, 1).unwrap(), &t(&[4, 2])));
        assert!(!ok(&t(&[2, 4]), &t(&[4, 6]).narrow(1, 0, 1).unwrap()));
        // Rank 5 batches are beyond gemm_config.
        let r5 = t(&[2, 2, 2, 3, 3]);
        assert!(!ok(&r5, &r5));

        let e = matmul(&cols, &t(&[3, 2])).unwrap_err().to_string();
        assert!(e.contains("cuBLAS does not take"), "{e}");
        let y = matmul(&a, &w.t().unwrap()).unwrap();
        let want = a.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(
            y.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
            want.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
        );
    }
}
