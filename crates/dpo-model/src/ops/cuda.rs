//! Launchers for the kernels of `kernels/dpo_ops.cu` (PTX built by build.rs, loaded once per
//! device as the custom module `dpo_ops`). Kernel names are `<base>_<dtype>`.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dpo_ops.ptx"));
const MODULE: &str = "dpo_ops";

/// An element type with kernels, and the type those kernels accumulate in.
trait Kern: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType {
    type Acc: CudaDType + DeviceRepr;
}
impl Kern for f32 {
    type Acc = f32;
}
impl Kern for f64 {
    type Acc = f64;
}
impl Kern for half::bf16 {
    type Acc = f32;
}
impl Kern for half::f16 {
    type Acc = f32;
}

macro_rules! dispatch {
    ($dt:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dt {
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dt => candle_core::bail!("fused op: no CUDA kernel for {dt:?}"),
        }
    };
}

/// The kernel `<base>_<T>`.
fn func<T: WithDType>(dev: &CudaDevice, base: &str) -> Result<Kernel> {
    func_named(dev, &format!("{base}_{}", T::DTYPE.as_str()))
}

fn func_named(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function();
    Ok(Kernel { name: name.to_string(), f, stream: dev.cuda_stream() })
}

/// A kernel of the module on its device's stream, with its name for the argument check of
/// [`Launch`].
struct Kernel {
    name: String,
    f: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    fn builder(&self) -> Launch<'_> {
        Launch { kernel: self, args: self.stream.launch_builder(&self.f), sizes: Vec::new() }
    }
}

/// A launch whose arguments are checked against the kernel's parameters, as the driver reports
/// them (`cuFuncGetParamInfo`), before its first run: a missing or extra
/// argument, or one of the wrong size (an f64 for a `float`, an `i32` for a `long long`), is an
/// error naming the kernel and the argument instead of a kernel reading garbage. Once per kernel
/// and device; skipped where the driver cannot tell (before CUDA 12.4), and with
/// `DPO_TRAIN_SKIP_ARG_CHECK=1` (should a driver report its parameters otherwise).
struct Launch<'a> {
    kernel: &'a Kernel,
    args: LaunchArgs<'a>,
    sizes: Vec<usize>,
}

/// The bytes an argument puts in a kernel's parameter list: a device buffer is its address.
trait ArgSize {
    const SIZE: usize;
}
macro_rules! arg_size {
    ($($t:ty),*) => { $(impl ArgSize for &$t { const SIZE: usize = std::mem::size_of::<$t>(); })* };
}
arg_size!(i32, i64, u64, f32, f64);
impl<T> ArgSize for &CudaSlice<T> {
    const SIZE: usize = 8;
}
impl<T> ArgSize for &mut CudaSlice<T> {
    const SIZE: usize = 8;
}
impl<T> ArgSize for &CudaView<'_, T> {
    const SIZE: usize = 8;
}
impl<T> ArgSize for &mut CudaViewMut<'_, T> {
    const SIZE: usize = 8;
}

impl<'a> Launch<'a> {
    fn arg<A: ArgSize>(&mut self, a: A) -> &mut Self
    where
        LaunchArgs<'a>: PushKernelArg<A>,
    {
        self.sizes.push(A::SIZE);
        self.args.arg(a);
        self
    }

    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the buffers hold what the kernel reads and are as long
    /// as it indexes (the argument list itself is checked).
    unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        check_params(self.kernel, &self.sizes)?;
        // SAFETY: see the function's contract.
        unsafe { self.args.launch(cfg) }.w()?;
        Ok(())
    }
}

/// Compares `sizes` with `kernel`'s parameters (once per kernel and device). The parameter count is
/// where `cuFuncGetParamInfo` stops answering (`cuFuncGetParamCount` is CUDA 13.2).
fn check_params(kernel: &Kernel, sizes: &[usize]) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // Function handles, one per kernel and device (the module is loaded once per device).
    static CHECKED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *SKIP.get_or_init(|| std::env::var_os("DPO_TRAIN_SKIP_ARG_CHECK").is_some()) {
        return Ok(());
    }
    let handle = kernel.f.cu_function() as usize;
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.contains(&handle) {
        return Ok(());
    }
    let param = |i: usize| {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: a live function handle and valid out-pointers; an index past the last
        // parameter is an error return, not undefined behaviour.
        let r = unsafe { sys::cuFuncGetParamInfo(kernel.f.cu_function(), i, &mut offset, &mut size) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(size)
    };
    let name = &kernel.name;
    if param(0).is_none() {
        return Ok(()); // the driver cannot tell (every kernel here has parameters)
    }
    for (i, &size) in sizes.iter().enumerate() {
        match param(i) {
            None => candle_core::bail!(
                "kernel {name}: launched with {} arguments for {i} parameters",
                sizes.len()
            ),
            Some(want) if want != size => {
                candle_core::bail!("kernel {name}: argument {i} has {size} bytes, the parameter {want}")
            }
            Some(_) => {}
        }
    }
    if param(sizes.len()).is_some() {
        candle_core::bail!("kernel {name}: launched with {} arguments, it has more parameters", sizes.len());
    }
    checked.push(handle);
    Ok(())
}

fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// The elements `x` `[rows, heads, seq, d]` spans from its first (contiguous head rows, any
/// other strides; see [`super::rope::head_strides`]).
fn head_rows_view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let [offset, ..] = super::rope::head_strides(l)?;
    let span = match l.shape().elem_count() {
        0 => 0,
        _ => 1 + l.dims().iter().zip(l.stride()).map(|(n, s)| (n - 1) * s).sum::<usize>(),
    };
    Ok(s.as_cuda_slice::<T>()?.slice(offset..offset + span))
}

fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{what}: size {n} too large for the kernel")))
}

/// Threads per block for a kernel that runs one block per row of `len` elements.
fn row_threads(len: usize) -> u32 {
    len.div_ceil(4).next_power_of_two().clamp(32, 1024) as u32
}

/// One block per row.
fn rows_cfg(rows: usize, len: usize, what: &str) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (int(rows, what)? as u32, 1, 1),
        block_dim: (row_threads(len), 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The longest rows the warp-per-row kernels take (`dpo_softmax_*_warp`: 32 lanes x
/// `SOFTMAX_WARP_C` entries in registers); longer rows get a block each.
const WARP_ROW_MAX: usize = 1024;

/// One warp per row, 8 rows a block.
fn warp_rows_cfg(rows: usize, what: &str) -> Result<LaunchConfig> {
    let blocks = int(rows.div_ceil(8), what)? as u32;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
}

/// An element-wise launch over `n` elements for the kernels that take `VEC_W` (8) at a time
/// (`elementwise` in `dpo_ops.cu`): a thread per 8 elements.
fn vector_cfg(n: usize) -> LaunchConfig {
    elementwise_cfg(n.div_ceil(8))
}

/// A launch of a kernel with a tensor per `blockIdx.y` (`PART` in `dpo_ops.cu`), `parts` of them,
/// the longest of `n` elements, 8 at a time: at most 1,024 blocks a part (grid-stride). A grid
/// sized to the longest part alone would start, for each shorter part, blocks that find no
/// work: 15 x 66,000 of them beside the tied embedding's AdamW.
pub(super) fn parts_cfg(n: usize, parts: usize) -> LaunchConfig {
    let mut cfg = vector_cfg(n);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
    cfg.grid_dim.1 = parts as u32;
    cfg
}

/// The RoPE kernels over `n` elements: a thread per 8 entries of a head row's first half and
/// their 8 partners in the second (`rope_kernel` in `dpo_ops.cu`).
fn rope_cfg(n: usize) -> LaunchConfig {
    elementwise_cfg(n.div_ceil(16))
}

/// A grid-stride element-wise launch over `n` elements.
fn elementwise_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

// ---------------------------------------------------------------------------------------------

pub(super) fn softmax_fwd(
    s: &CudaStorage,
    sl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    scale: f64,
) -> Result<CudaStorage> {
    dispatch!(s.dtype(), softmax_fwd_t(s, sl, b, bl, scale))
}

fn softmax_fwd_t<T: Kern>(
    s: &CudaStorage,
    sl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    scale: f64,
) -> Result<CudaStorage> {
    let dev = s.device().clone();
    let x = view::<T>(s, sl, "masked_softmax")?;
    let bias = view::<f32>(b, bl, "masked_softmax bias")?;
    let (r, h, q, k) = sl.shape().dims4()?;
    let rows = r * h * q;
    let bias_bcast = i32::from(bl.shape().dims()[0] == 1 && r != 1);
    let (k32, q32, hq32) = (int(k, "softmax")?, int(q, "softmax")?, int(h * q, "softmax")?);
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(rows * k)? };
    if rows * k > 0 && k <= WARP_ROW_MAX {
        let f = func::<T>(&dev, "dpo_softmax_fwd_warp")?;
        let mut lb = f.builder();
        let rows64 = rows as i64;
        lb.arg(&x).arg(&bias).arg(&mut out).arg(&rows64).arg(&k32).arg(&q32).arg(&hq32).arg(&bias_bcast);
        lb.arg(&scale);
        // SAFETY: argument types match the kernel's signature; sizes were checked above.
        unsafe { lb.launch(warp_rows_cfg(rows, "softmax")?) }?;
    } else if rows * k > 0 {
        let f = func::<T>(&dev, "dpo_softmax_fwd")?;
        let mut lb = f.builder();
        lb.arg(&x).arg(&bias).arg(&mut out).arg(&k32).arg(&q32).arg(&hq32).arg(&bias_bcast).arg(&scale);
        // SAFETY: argument types match the kernel's signature; sizes were checked above.
        unsafe { lb.launch(rows_cfg(rows, k, "softmax")?) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

pub(super) fn softmax_bwd(
    p: &CudaStorage,
    pl: &Layout,
    dp: &CudaStorage,
    dpl: &Layout,
    scale: f64,
) -> Result<CudaStorage> {
    dispatch!(p.dtype(), softmax_bwd_t(p, pl, dp, dpl, scale))
}

fn softmax_bwd_t<T: Kern>(
    p: &CudaStorage,
    pl: &Layout,
    dp: &CudaStorage,
    dpl: &Layout,
    scale: f64,
) -> Result<CudaStorage> {
    let dev = p.device().clone();
    let pv = view::<T>(p, pl, "masked_softmax backward")?;
    let dpv = view::<T>(dp, dpl, "masked_softmax backward")?;
    let n = pl.shape().elem_count();
    let k = pl.shape().dims().last().copied().unwrap_or(1).max(1);
    let k32 = int(k, "softmax backward")?;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 && k <= WARP_ROW_MAX {
        let f = func::<T>(&dev, "dpo_softmax_bwd_warp")?;
        let mut lb = f.builder();
        let rows64 = (n / k) as i64;
        lb.arg(&pv).arg(&dpv).arg(&mut out).arg(&rows64).arg(&k32).arg(&scale);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(warp_rows_cfg(n / k, "softmax backward")?) }?;
    } else if n > 0 {
        let f = func::<T>(&dev, "dpo_softmax_bwd")?;
        let mut lb = f.builder();
        lb.arg(&pv).arg(&dpv).arg(&mut out).arg(&k32).arg(&scale);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(rows_cfg(n / k, k, "softmax backward")?) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

// ---------------------------------------------------------------------------------------------

/// The norm of `x` (in `x`'s dtype, or from f32 into `out`: bf16 or f16).
pub(super) fn rms_norm_fwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
    out: Option<DType>,
) -> Result<CudaStorage> {
    match out {
        None => dispatch!(x.dtype(), rms_norm_fwd_same(x, xl, w, wl, eps)),
        Some(out) => dispatch!(out, rms_norm_fwd_from_f32(x, xl, w, wl, eps)),
    }
}

fn rms_norm_fwd_same<T: Kern>(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    rms_norm_fwd_t::<T, T>(x, xl, w, wl, eps, "dpo_rmsnorm_fwd")
}

fn rms_norm_fwd_from_f32<O: Kern>(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    rms_norm_fwd_t::<f32, O>(x, xl, w, wl, eps, "dpo_rmsnorm_fwd_f32_to")
}

/// Inputs in `T`, output in `O`; the kernel is `<kernel>_<O>`.
fn rms_norm_fwd_t<T: Kern, O: Kern>(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
    kernel: &str,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let xv = view::<T>(x, xl, "rms_norm")?;
    let wv = view::<T>(w, wl, "rms_norm weight")?;
    let n = xl.shape().elem_count();
    let d = wl.shape().elem_count().max(1);
    let d32 = int(d, "rms_norm")?;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<O>(n)? };
    if n > 0 {
        let f = func::<O>(&dev, kernel)?;
        let mut lb = f.builder();
        lb.arg(&xv).arg(&wv).arg(&mut out).arg(&d32).arg(&eps);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(rows_cfg(n / d, d, "rms_norm")?) }?;
    }
    Ok(O::wrap_cuda_slice(out, dev))
}

/// `(h + f32(y), O(RMSNorm(h + f32(y), w)))` for an f32 `h` `[rows, D]`, a `y` of `h`'s shape in
/// `O` (bf16 or f16) and an f32 `w` `[D]`, in one pass: the residual add of [`add_cast`] and the
/// norm of [`rms_norm_fwd`] to `O`, which it computes bit for bit.
pub(super) fn add_rms_norm_fwd(
    h: &CudaStorage,
    hl: &Layout,
    y: &CudaStorage,
    yl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    dispatch!(y.dtype(), add_rms_norm_fwd_t(h, hl, y, yl, w, wl, eps))
}

fn add_rms_norm_fwd_t<O: Kern>(
    h: &CudaStorage,
    hl: &Layout,
    y: &CudaStorage,
    yl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = h.device().clone();
    let hv = view::<f32>(h, hl, "add_rms_norm")?;
    let yv = view::<O>(y, yl, "add_rms_norm branch")?;
    let wv = view::<f32>(w, wl, "add_rms_norm weight")?;
    let n = hl.shape().elem_count();
    if yl.shape().elem_count() != n {
        candle_core::bail!("add_rms_norm: branch {:?} for h {:?}", yl.shape(), hl.shape());
    }
    let d = wl.shape().elem_count().max(1);
    let d32 = int(d, "add_rms_norm")?;
    // SAFETY: every element of both is written by the kernel.
    let (mut sum, mut out) = unsafe { (dev.alloc::<f32>(n)?, dev.alloc::<O>(n)?) };
    if n > 0 {
        let f = func::<O>(&dev, "dpo_add_rmsnorm_fwd_f32_to")?;
        let mut lb = f.builder();
        lb.arg(&hv).arg(&yv).arg(&wv).arg(&mut sum).arg(&mut out).arg(&d32).arg(&eps);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(rows_cfg(n / d, d, "add_rms_norm")?) }?;
    }
    Ok((f32::wrap_cuda_slice(sum, dev.clone()), O::wrap_cuda_slice(out, dev)))
}

/// `h + f32(y)` for an f32 `h` and a bf16 or f16 `y` of the same shape.
pub(super) fn add_cast(h: &CudaStorage, hl: &Layout, y: &CudaStorage, yl: &Layout) -> Result<CudaStorage> {
    dispatch!(y.dtype(), add_cast_t(h, hl, y, yl))
}

fn add_cast_t<T: Kern>(h: &CudaStorage, hl: &Layout, y: &CudaStorage, yl: &Layout) -> Result<CudaStorage> {
    elementwise2::<f32, T, f32>(h, hl, y, yl, "dpo_add_cast", "add_cast")
}

/// `<kernel>_<B>(a, b, out, n)` (8 elements a thread, [`vector_cfg`]): one output element of `O`
/// per element of `a` (`A`) and `b` (`B`),
/// both contiguous with `a`'s element count.
fn elementwise2<A: Kern, B: Kern, O: Kern>(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    kernel: &str,
    what: &str,
) -> Result<CudaStorage> {
    let dev = a.device().clone();
    let av = view::<A>(a, al, what)?;
    let bv = view::<B>(b, bl, what)?;
    let n = al.shape().elem_count();
    let n64 = n as i64;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<O>(n)? };
    if n > 0 {
        let f = func::<B>(&dev, kernel)?;
        let mut lb = f.builder();
        lb.arg(&av).arg(&bv).arg(&mut out).arg(&n64);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(vector_cfg(n)) }?;
    }
    Ok(O::wrap_cuda_slice(out, dev))
}

/// `[dx (+ res) | dw]` of RMSNorm for `dy` of `x`'s dtype, or bf16/f16 for an f32 `x` (then with
/// `res`, the manual backward's case).
#[allow(clippy::too_many_arguments)]
pub(super) fn rms_norm_bwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    res: Option<(&CudaStorage, &Layout)>,
    eps: f64,
    lo: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    use half::{bf16, f16};
    match (x.dtype(), dy.dtype()) {
        (DType::F32, DType::BF16) => rms_norm_bwd_t::<f32, bf16>(x, xl, w, wl, dy, dyl, res, eps, lo),
        (DType::F32, DType::F16) => rms_norm_bwd_t::<f32, f16>(x, xl, w, wl, dy, dyl, res, eps, lo),
        (DType::F32, DType::F32) => rms_norm_bwd_t::<f32, f32>(x, xl, w, wl, dy, dyl, res, eps, lo),
        (DType::F64, DType::F64) => rms_norm_bwd_t::<f64, f64>(x, xl, w, wl, dy, dyl, res, eps, lo),
        (DType::BF16, DType::BF16) => rms_norm_bwd_t::<bf16, bf16>(x, xl, w, wl, dy, dyl, res, eps, lo),
        (DType::F16, DType::F16) => rms_norm_bwd_t::<f16, f16>(x, xl, w, wl, dy, dyl, res, eps, lo),
        (a, b) => candle_core::bail!("rms_norm backward: no kernel for x {a:?} with dy {b:?}"),
    }
}

/// Rows each thread of the `dw` partial-sum kernel adds up (before the sum over row groups).
const DW_ROWS_PER_THREAD: usize = 16;

/// The kernels for `x` in `T` and `dy` in `U`: `<name>_<T>` where `U` is `T`, else (`T` f32)
/// `<name>_f32_from_<U>`, which exist with the residual gradient only, and write (with `lo`) the
/// output's `dx` in `U` too, returned second.
#[allow(clippy::too_many_arguments)]
fn rms_norm_bwd_t<T: Kern, U: Kern>(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    res: Option<(&CudaStorage, &Layout)>,
    eps: f64,
    lo: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dev = x.device().clone();
    let xv = view::<T>(x, xl, "rms_norm backward")?;
    let wv = view::<T>(w, wl, "rms_norm backward")?;
    let dyv = view::<U>(dy, dyl, "rms_norm backward")?;
    let resv = res.map(|(r, rl)| view::<T>(r, rl, "rms_norm backward residual")).transpose()?;
    let mixed = T::DTYPE != U::DTYPE;
    if mixed && res.is_none() {
        candle_core::bail!(
            "rms_norm backward: dy {:?} for x {:?} needs the residual gradient",
            U::DTYPE,
            T::DTYPE
        );
    }
    if lo && !mixed {
        candle_core::bail!("rms_norm backward: dx in dy's dtype is for f32 x and bf16/f16 dy");
    }
    let kernel = |name: &str| match mixed {
        true => func::<U>(&dev, &format!("{name}_f32_from")),
        false => func::<T>(&dev, name),
    };
    let n = xl.shape().elem_count();
    let d = wl.shape().elem_count().max(1);
    let rows = n / d;
    let (d32, rows32) = (int(d, "rms_norm backward")?, int(rows, "rms_norm backward")?);
    if rows == 0 {
        let zeros = dev.alloc_zeros::<T>(n + d)?;
        let out_lo =
            lo.then(|| dev.alloc_zeros::<U>(n)).transpose()?.map(|z| U::wrap_cuda_slice(z, dev.clone()));
        return Ok((T::wrap_cuda_slice(zeros, dev), out_lo));
    }
    // SAFETY: the dx kernel writes out[..n], out_lo and rs, the final kernel out[n..].
    let mut out = unsafe { dev.alloc::<T>(n + d)? };
    let mut out_lo = lo.then(|| unsafe { dev.alloc::<U>(n) }).transpose()?;
    let mut rs = unsafe { dev.alloc::<T::Acc>(rows)? };
    let groups = rows.div_ceil(8 * DW_ROWS_PER_THREAD).clamp(1, 1024);
    let g32 = groups as i32;
    // SAFETY: the partial kernel writes every partial[g, j].
    let mut partial = unsafe { dev.alloc::<T::Acc>(groups * d)? };
    {
        let f = kernel(if resv.is_some() { "dpo_rmsnorm_bwd_dx_add" } else { "dpo_rmsnorm_bwd_dx" })?;
        let mut lb = f.builder();
        lb.arg(&xv).arg(&wv).arg(&dyv);
        if let Some(resv) = &resv {
            lb.arg(resv);
        }
        lb.arg(&mut out);
        let null = 0u64; // no dx in U
        if mixed {
            match &mut out_lo {
                Some(lo) => lb.arg(lo),
                None => lb.arg(&null),
            };
        }
        lb.arg(&mut rs).arg(&d32).arg(&eps);
        // SAFETY: argument types match the kernel's signature (with `res` and `out_lo` where it
        // has them).
        unsafe { lb.launch(rows_cfg(rows, d, "rms_norm backward")?) }?;
    }
    {
        let f = kernel("dpo_rmsnorm_bwd_dw_partial")?;
        let mut lb = f.builder();
        lb.arg(&xv).arg(&dyv).arg(&rs).arg(&mut partial).arg(&rows32).arg(&d32);
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(32) as u32, groups as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match the kernel's signature; the kernel assumes block (32, 8).
        unsafe { lb.launch(cfg) }?;
    }
    {
        let f = func::<T>(&dev, "dpo_rmsnorm_bwd_dw_final")?;
        let mut lb = f.builder();
        let offset = n as i64;
        lb.arg(&partial).arg(&mut out).arg(&offset).arg(&g32).arg(&d32);
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(cfg) }?;
    }
    let out_lo = out_lo.map(|lo| U::wrap_cuda_slice(lo, dev.clone()));
    Ok((T::wrap_cuda_slice(out, dev), out_lo))
}

// ---------------------------------------------------------------------------------------------

/// [`super::rope`] (`bias` contiguous `[heads * d]`, added first: [`super::rope_with_bias`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn rope(
    x: &CudaStorage,
    xl: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    c: &CudaStorage,
    cl: &Layout,
    s: &CudaStorage,
    sl: &Layout,
    bwd: bool,
) -> Result<CudaStorage> {
    dispatch!(x.dtype(), rope_t(x, xl, bias, c, cl, s, sl, bwd))
}

/// [`super::rope_backward_merged`]: `dq`, `dk`, `dv` contiguous, then the tables.
pub(super) fn rope_backward_merged(
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    tables: (&CudaStorage, &Layout, &CudaStorage, &Layout),
) -> Result<CudaStorage> {
    dispatch!(q.dtype(), rope_backward_merged_t(q, ql, k, kl, v, vl, tables))
}

fn rope_backward_merged_t<T: Kern>(
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    (c, cl, s, sl): (&CudaStorage, &Layout, &CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = q.device().clone();
    let (qv, kv, vv) = (view::<T>(q, ql, "dq")?, view::<T>(k, kl, "dk")?, view::<T>(v, vl, "dv")?);
    let cv = view::<T>(c, cl, "rope cos")?;
    let sv = view::<T>(s, sl, "rope sin")?;
    let (r, hq, seq, d) = ql.shape().dims4()?;
    let hk = kl.dims()[1];
    let n = r * seq * (hq + 2 * hk) * d;
    let what = "rope_backward_merged";
    let (n64, hq32, hk32, s32, d32) =
        (n as i64, int(hq, what)?, int(hk, what)?, int(seq, what)?, int(d, what)?);
    let per_row = i32::from(cl.shape().rank() == 3);
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let f = func::<T>(&dev, "dpo_rope_bwd_merged")?;
        let mut lb = f.builder();
        lb.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&cv)
            .arg(&sv)
            .arg(&mut out)
            .arg(&n64)
            .arg(&hq32)
            .arg(&hk32)
            .arg(&s32)
            .arg(&d32)
            .arg(&per_row);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(rope_cfg(n)) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

#[allow(clippy::too_many_arguments)]
fn rope_t<T: Kern>(
    x: &CudaStorage,
    xl: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    c: &CudaStorage,
    cl: &Layout,
    s: &CudaStorage,
    sl: &Layout,
    bwd: bool,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let xv = head_rows_view::<T>(x, xl)?;
    let bv = bias.map(|(b, bl)| view::<T>(b, bl, "rope bias")).transpose()?;
    if bv.as_ref().is_some_and(|b| b.len() != xl.dims()[1] * xl.dims()[3]) {
        candle_core::bail!("rope: a bias of {} elements for x {:?}", bv.map_or(0, |b| b.len()), xl.dims());
    }
    let cv = view::<T>(c, cl, "rope cos")?;
    let sv = view::<T>(s, sl, "rope sin")?;
    let (_, h, seq, d) = xl.shape().dims4()?;
    let n = xl.shape().elem_count();
    let (n64, h32, s32, d32) = (n as i64, int(h, "rope")?, int(seq, "rope")?, int(d, "rope")?);
    let [_, sr, sh, sp] = super::rope::head_strides(xl)?.map(|s| s as i64);
    let (per_row, bwd) = (i32::from(cl.shape().rank() == 3), i32::from(bwd));
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let f = func::<T>(&dev, "dpo_rope")?;
        let mut lb = f.builder();
        let null = 0u64; // the bias pointer where there is none
        lb.arg(&xv);
        match &bv {
            Some(bv) => lb.arg(bv),
            None => lb.arg(&null),
        };
        lb.arg(&cv)
            .arg(&sv)
            .arg(&mut out)
            .arg(&n64)
            .arg(&h32)
            .arg(&s32)
            .arg(&d32)
            .arg(&sr)
            .arg(&sh)
            .arg(&sp)
            .arg(&per_row)
            .arg(&bwd);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(rope_cfg(n)) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

// ---------------------------------------------------------------------------------------------

pub(super) fn silu_mul_fwd(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
) -> Result<CudaStorage> {
    dispatch!(g.dtype(), silu_mul_fwd_t(g, gl, u, ul))
}

fn silu_mul_fwd_t<T: Kern>(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
) -> Result<CudaStorage> {
    elementwise2::<T, T, T>(g, gl, u, ul, "dpo_silu_mul_fwd", "silu_mul")
}

/// `[dg, du]` (`[dg, du, y]` `with_y`) packed into one buffer.
pub(super) fn silu_mul_bwd(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    with_y: bool,
) -> Result<CudaStorage> {
    dispatch!(g.dtype(), silu_mul_bwd_t(g, gl, u, ul, dy, dyl, with_y))
}

fn silu_mul_bwd_t<T: Kern>(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    with_y: bool,
) -> Result<CudaStorage> {
    let dev = g.device().clone();
    let gv = view::<T>(g, gl, "silu_mul backward")?;
    let uv = view::<T>(u, ul, "silu_mul backward")?;
    let dyv = view::<T>(dy, dyl, "silu_mul backward")?;
    let n = gl.shape().elem_count();
    let n64 = n as i64;
    let parts = if with_y { 3 } else { 2 };
    // SAFETY: every element of every part is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(parts * n)? };
    if n > 0 {
        let f = func::<T>(&dev, "dpo_silu_mul_bwd")?;
        let mut lb = f.builder();
        let with_y = with_y as i32;
        lb.arg(&gv).arg(&uv).arg(&dyv).arg(&mut out).arg(&n64).arg(&with_y);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(vector_cfg(n)) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

// ---------------------------------------------------------------------------------------------

/// The raw device address of a contiguous f32 CUDA tensor.
fn f32_ptr(t: &candle_core::Tensor, what: &str) -> Result<u64> {
    ptr_of::<f32>(t, what)
}

/// The device address of a contiguous CUDA tensor of `T`'s dtype (its first element).
fn ptr_of<T: Kern>(t: &candle_core::Tensor, what: &str) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    if t.dtype() != T::DTYPE {
        candle_core::bail!("{what}: expected {:?}, got {:?}", T::DTYPE, t.dtype());
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else { candle_core::bail!("{what}: not on a CUDA device") };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: must be contiguous")
    };
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    let stream = s.device().cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr + (start * std::mem::size_of::<T>()) as u64)
}

/// Tensors a launch of a kernel with a tensor per `blockIdx.y` takes (`PARTS` in `dpo_ops.cu`).
const PARTS: usize = 16;

/// The f32 tensors `parts[i].0` (contiguous) cast to `dtype` (bf16 or f16) at element
/// `parts[i].1` of a new buffer of `len` elements, [`PARTS`] tensors a launch; elements no part
/// covers are left unwritten.
pub(super) fn cast_parts(
    parts: &[(&candle_core::Tensor, usize)],
    len: usize,
    dtype: DType,
) -> Result<CudaStorage> {
    match dtype {
        DType::BF16 => cast_parts_t::<half::bf16>(parts, len),
        DType::F16 => cast_parts_t::<half::f16>(parts, len),
        dt => candle_core::bail!("cast_parts: no kernel into {dt:?}"),
    }
}

fn cast_parts_t<T: Kern>(parts: &[(&candle_core::Tensor, usize)], len: usize) -> Result<CudaStorage> {
    let Some((first, _)) = parts.first() else { candle_core::bail!("cast_parts: no tensors") };
    let dev = cuda_of(first, "cast_parts")?;
    for &(t, off) in parts {
        if off + t.elem_count() > len {
            candle_core::bail!("cast_parts: {} elements at {off} overrun {len}", t.elem_count());
        }
    }
    // SAFETY: the caller reads only the ranges the parts write.
    let mut out = unsafe { dev.alloc::<T>(len.max(1))? };
    let f = func::<T>(&dev, "dpo_cast_parts_f32_to")?;
    for chunk in parts.chunks(PARTS) {
        let mut ptrs = [0u64; PARTS];
        let (mut offs, mut ns) = ([0i64; PARTS], [0i64; PARTS]);
        for (i, &(t, off)) in chunk.iter().enumerate() {
            (ptrs[i], offs[i], ns[i]) = (f32_ptr(t, "cast_parts")?, off as i64, t.elem_count() as i64);
        }
        let longest = chunk.iter().map(|(t, _)| t.elem_count()).max().unwrap_or(0);
        if longest == 0 {
            continue;
        }
        let cfg = parts_cfg(longest, chunk.len());
        let mut lb = f.builder();
        lb.arg(&mut out);
        for p in &ptrs {
            lb.arg(p);
        }
        for o in &offs {
            lb.arg(o);
        }
        for n in &ns {
            lb.arg(n);
        }
        // SAFETY: each pointer addresses a live contiguous f32 buffer of its n elements, each
        // range [off, off + n) lies in `out` (checked above); blocks past a part's end exit.
        unsafe { lb.launch(cfg) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

/// The indices of tensors of `sizes` elements in launches of up to `PARTS`, the largest
/// first, so that the tensors of a launch (whose grid is sized for its largest) are of similar
/// size; empty tensors left out.
fn opt_launches(sizes: impl Iterator<Item = usize>) -> Vec<Vec<usize>> {
    let mut order: Vec<(usize, usize)> = sizes.enumerate().filter(|&(_, n)| n > 0).collect();
    order.sort_by_key(|&(i, n)| (std::cmp::Reverse(n), i));
    order.chunks(PARTS).map(|c| c.iter().map(|&(i, _)| i).collect()).collect()
}

fn cuda_of(t: &candle_core::Tensor, what: &str) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("{what}: not on a CUDA device"),
    }
}

/// `[norm, factor]` (f64) for the f32 CUDA tensors `xs`: `norm = sqrt(sum_i ||x_i||^2)` and
/// PyTorch's clipping factor `min(1, max_norm / (norm + 1e-6))` (1 when `max_norm <= 0`, NaN when
/// the norm is not finite), computed on the device: nothing waits for it. A partial sum per block
/// (`dpo_sumsq_parts_f32`, a launch per 16 tensors), then one block adds them in a fixed order
/// (`dpo_clip_f64`): the same norm, bit for bit, on every run.
pub(crate) fn clip(xs: &[candle_core::Tensor], max_norm: f64) -> Result<CudaStorage> {
    let Some(first) = xs.first() else { candle_core::bail!("clip: no tensors") };
    let dev = cuda_of(first, "clip")?;
    // A partial sum per block.
    let launches: Vec<(Vec<usize>, LaunchConfig)> = opt_launches(xs.iter().map(|x| x.elem_count()))
        .into_iter()
        .map(|l| {
            let cfg = parts_cfg(xs[l[0]].elem_count(), l.len());
            (l, cfg)
        })
        .collect();
    let blocks = |cfg: &LaunchConfig| (cfg.grid_dim.0 * cfg.grid_dim.1) as usize;
    let total: usize = launches.iter().map(|(_, cfg)| blocks(cfg)).sum();
    let stream = dev.cuda_stream();
    // SAFETY: each launch writes a partial for each of its blocks, and the launches cover every
    // one.
    let mut partial = unsafe { stream.alloc::<f64>(total.max(1)) }.w()?;
    let sumsq = func_named(&dev, "dpo_sumsq_parts_f32")?;
    let mut at = 0;
    for (l, cfg) in &launches {
        let (mut ptrs, mut ns) = ([0u64; PARTS], [0i64; PARTS]);
        for (k, &i) in l.iter().enumerate() {
            (ptrs[k], ns[k]) = (f32_ptr(&xs[i], "clip")?, xs[i].elem_count() as i64);
        }
        let mut out = partial.slice_mut(at..at + blocks(cfg));
        let mut lb = sumsq.builder();
        lb.arg(&mut out);
        for p in &ptrs {
            lb.arg(p);
        }
        for n in &ns {
            lb.arg(n);
        }
        // SAFETY: each used pointer addresses a live contiguous f32 buffer of its n elements
        // (unused slots are never read: blockIdx.y < parts); `out` has a slot per block.
        unsafe { lb.launch(*cfg) }?;
        at += blocks(cfg);
    }
    // SAFETY: the kernel writes both elements.
    let mut out = unsafe { stream.alloc::<f64>(2) }.w()?;
    let n = total as i64;
    let add = func_named(&dev, "dpo_clip_f64")?;
    let mut lb = add.builder();
    lb.arg(&partial).arg(&n).arg(&max_norm).arg(&mut out);
    // SAFETY: `partial` holds `total` f64 values, all written above; one block writes `out`.
    unsafe { lb.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 }) }?;
    Ok(f64::wrap_cuda_slice(out, dev))
}

/// One parameter's share of an AdamW step on CUDA: `p`, `m`, `v` updated in place from `g`
/// (all f32, contiguous, of one size); `decay` is `1 - lr * weight_decay`, or 1.
pub(crate) struct AdamWPart<'a> {
    pub p: &'a candle_core::Tensor,
    pub m: &'a candle_core::Tensor,
    pub v: &'a candle_core::Tensor,
    pub g: &'a candle_core::Tensor,
    pub decay: f32,
}

/// One AdamW step of every part, a launch per 16 (`dpo_adamw_parts_f32`), each gradient scaled
/// by the clipping factor `clip[1]` (from [`clip`]) as it is read; nothing is written where that
/// factor is NaN.
pub(crate) fn adamw(
    parts: &[AdamWPart],
    clip: &candle_core::Tensor,
    (b1, b2, eps): (f64, f64, f64),
    step_size: f32,
    bc2_sqrt: f32,
) -> Result<()> {
    let Some(first) = parts.first() else { return Ok(()) };
    let dev = cuda_of(first.p, "adamw")?;
    if clip.elem_count() != 2 {
        candle_core::bail!(
            "adamw: the clipping tensor has {} elements, not [norm, factor]",
            clip.elem_count()
        );
    }
    let clip_ptr = ptr_of::<f64>(clip, "adamw clip")?;
    for part in parts {
        let n = part.p.elem_count();
        for (t, what) in [(part.m, "m"), (part.v, "v"), (part.g, "g")] {
            if t.elem_count() != n {
                candle_core::bail!("adamw: {what} has {} elements, the parameter {n}", t.elem_count());
            }
        }
    }
    let f = func_named(&dev, "dpo_adamw_parts_f32")?;
    // 1 - beta in f64 first, as the tensor-op path and PyTorch compute it.
    let hyper = [b1 as f32, (1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32, eps as f32, step_size, bc2_sqrt];
    for l in opt_launches(parts.iter().map(|p| p.p.elem_count())) {
        let mut ptrs = [[0u64; PARTS]; 4];
        let (mut ns, mut decay) = ([0i64; PARTS], [1f32; PARTS]);
        for (k, &i) in l.iter().enumerate() {
            let AdamWPart { p, m, v, g, decay: d } = &parts[i];
            for (slot, (t, what)) in
                ptrs.iter_mut().zip([(p, "adamw p"), (m, "adamw m"), (v, "adamw v"), (g, "adamw g")])
            {
                slot[k] = f32_ptr(t, what)?;
            }
            (ns[k], decay[k]) = (p.elem_count() as i64, *d);
            // The kernel writes p, m and v in place (and reads them `__restrict__`): four buffers
            // that overlap (moments made as clones of one zero tensor, say) would mix m with v.
            let bytes = 4 * p.elem_count() as u64;
            let mut ranges = [(ptrs[0][k], "p"), (ptrs[1][k], "m"), (ptrs[2][k], "v"), (ptrs[3][k], "g")];
            ranges.sort_unstable();
            if let Some(w) = ranges.windows(2).find(|w| bytes > 0 && w[0].0 + bytes > w[1].0) {
                candle_core::bail!("adamw: {} and {} of a parameter share device memory", w[0].1, w[1].1);
            }
        }
        let mut lb = f.builder();
        lb.arg(&clip_ptr);
        for h in &hyper {
            lb.arg(h);
        }
        for p in ptrs.iter().flatten() {
            lb.arg(p);
        }
        for n in &ns {
            lb.arg(n);
        }
        for d in &decay {
            lb.arg(d);
        }
        let cfg = parts_cfg(parts[l[0]].p.elem_count(), l.len());
        // SAFETY: the used pointers address live, contiguous f32 buffers of their part's n
        // elements (checked above), owned by the optimizer and the parameters; unused slots are
        // never read (blockIdx.y < parts). The kernel is ordered on the device's stream with every
        // other op on these buffers.
        unsafe { lb.launch(cfg) }?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

pub(super) fn target_logprobs(
    z: &CudaStorage,
    zl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
) -> Result<CudaStorage> {
    dispatch!(z.dtype(), target_logprobs_t(z, zl, t, tl))
}

fn target_logprobs_t<T: Kern>(
    z: &CudaStorage,
    zl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
) -> Result<CudaStorage> {
    let dev = z.device().clone();
    let zv = view::<T>(z, zl, "target_logprobs")?;
    let tv = view::<u32>(t, tl, "target_logprobs targets")?;
    let (n, v) = zl.shape().dims2()?;
    let (n32, v32) = (int(n, "target_logprobs")?, int(v, "target_logprobs")?);
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T::Acc>(2 * n)? };
    if n > 0 {
        let f = func::<T>(&dev, "dpo_target_logprobs_fwd")?;
        let mut lb = f.builder();
        lb.arg(&zv).arg(&tv).arg(&mut out).arg(&v32).arg(&n32);
        // SAFETY: argument types match the kernel's signature; sizes were checked above.
        unsafe { lb.launch(rows_cfg(n, v, "target_logprobs")?) }?;
    }
    Ok(T::Acc::wrap_cuda_slice(out, dev))
}

/// The gradient of the logits `z`, the vocabulary's columns `first..` (see `target_logprobs_bwd`
/// in `dpo_ops.cu`), in `out`: `dpo_target_logprobs_bwd_<dtype>`, or from f32 logits into
/// bf16/f16 `dpo_target_logprobs_bwd_f32_to_<dtype>`.
#[allow(clippy::too_many_arguments)]
pub(super) fn target_logprobs_bwd(
    z: &CudaStorage,
    zl: &Layout,
    lg: &CudaStorage,
    lgl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    first: usize,
    out: DType,
) -> Result<CudaStorage> {
    let args = (z, zl, lg, lgl, t, tl, first);
    match (z.dtype(), out) {
        (dt, out) if dt == out => dispatch!(dt, target_logprobs_bwd_same(args)),
        (DType::F32, DType::BF16) => {
            target_logprobs_bwd_t::<f32, half::bf16>(args, "dpo_target_logprobs_bwd_f32_to")
        }
        (DType::F32, DType::F16) => {
            target_logprobs_bwd_t::<f32, half::f16>(args, "dpo_target_logprobs_bwd_f32_to")
        }
        (dt, out) => candle_core::bail!("target_logprobs_backward: {dt:?} logits into {out:?}"),
    }
}

type LogProbsBwdArgs<'a> =
    (&'a CudaStorage, &'a Layout, &'a CudaStorage, &'a Layout, &'a CudaStorage, &'a Layout, usize);

fn target_logprobs_bwd_same<T: Kern>(args: LogProbsBwdArgs) -> Result<CudaStorage> {
    target_logprobs_bwd_t::<T, T>(args, "dpo_target_logprobs_bwd")
}

/// `T` logits into an `O` gradient by the kernel `<base>_<O>`.
fn target_logprobs_bwd_t<T: Kern, O: Kern>(
    (z, zl, lg, lgl, t, tl, first): LogProbsBwdArgs,
    base: &str,
) -> Result<CudaStorage> {
    let dev = z.device().clone();
    let zv = view::<T>(z, zl, "target_logprobs_backward")?;
    let lgv = view::<T::Acc>(lg, lgl, "target_logprobs_backward lse and g")?;
    let tv = view::<u32>(t, tl, "target_logprobs_backward targets")?;
    let (n, v) = zl.shape().dims2()?;
    let (n32, v32) = (int(n, "target_logprobs_backward")?, int(v, "target_logprobs_backward")?);
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<O>(n * v)? };
    if n * v > 0 {
        let f = func::<O>(&dev, base)?;
        let mut lb = f.builder();
        let first = first as i64;
        lb.arg(&zv).arg(&lgv).arg(&tv).arg(&mut out).arg(&v32).arg(&n32).arg(&first);
        // SAFETY: argument types match the kernel's signature; sizes were checked above.
        unsafe { lb.launch(rows_cfg(n, v, "target_logprobs_backward")?) }?;
    }
    Ok(O::wrap_cuda_slice(out, dev))
}

// ---------------------------------------------------------------------------------------------

pub(super) fn gather_rows(
    w: &CudaStorage,
    wl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
) -> Result<CudaStorage> {
    dispatch!(w.dtype(), gather_rows_t(w, wl, ids, il))
}

fn gather_rows_t<T: Kern>(
    w: &CudaStorage,
    wl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
) -> Result<CudaStorage> {
    let dev = w.device().clone();
    let wv = view::<T>(w, wl, "gather_rows")?;
    let iv = view::<u32>(ids, il, "gather_rows ids")?;
    let (vocab, h) = wl.shape().dims2()?;
    let n = il.shape().elem_count() * h;
    let (n64, h32, v32) = (n as i64, int(h, "gather_rows")?, int(vocab, "gather_rows")?);
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let f = func::<T>(&dev, "dpo_gather_rows")?;
        let mut lb = f.builder();
        lb.arg(&wv).arg(&iv).arg(&mut out).arg(&n64).arg(&h32).arg(&v32);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(elementwise_cfg(n)) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

/// The backward of [`gather_rows`]: `[vocab, h]`, each row the sum of `dy`'s rows at its ids.
pub(super) fn scatter_rows(
    dy: &CudaStorage,
    dl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    vocab: usize,
    no_grad: Option<u32>,
) -> Result<CudaStorage> {
    dispatch!(dy.dtype(), scatter_rows_t(dy, dl, ids, il, vocab, no_grad))
}

fn scatter_rows_t<T: Kern>(
    dy: &CudaStorage,
    dl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    vocab: usize,
    no_grad: Option<u32>,
) -> Result<CudaStorage> {
    let dev = dy.device().clone();
    let dv = view::<T>(dy, dl, "gather_rows backward")?;
    let iv = view::<u32>(ids, il, "gather_rows backward ids")?;
    let (n, h) = dl.shape().dims2()?;
    let what = "gather_rows backward";
    let (n32, h32, v32) = (int(n, what)?, int(h, what)?, int(vocab, what)?);
    let skip = no_grad.map_or(-1i64, i64::from);
    let mut out = dev.alloc_zeros::<T>(vocab * h)?;
    if n * h > 0 {
        let f = func::<T>(&dev, "dpo_scatter_rows")?;
        let mut lb = f.builder();
        let accumulate = 0i32;
        lb.arg(&dv).arg(&iv).arg(&mut out).arg(&n32).arg(&h32).arg(&v32).arg(&skip).arg(&accumulate);
        // SAFETY: argument types match the kernel's signature.
        unsafe { lb.launch(scatter_cfg(n, h)) }?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

/// One block per position and slice of up to 1024 columns, a thread per column.
fn scatter_cfg(n: usize, h: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, h.div_ceil(1024) as u32, 1),
        block_dim: (h.next_multiple_of(32).min(1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `acc[v] += sum_{j : ids[j] = v} dy[j]` in place (f32, `acc` `[vocab, h]` contiguous): the
/// rows no id names are not touched.
pub(crate) fn scatter_rows_add_inplace(
    acc: &candle_core::Tensor,
    dy: &candle_core::Tensor,
    ids: &candle_core::Tensor,
    no_grad: Option<u32>,
) -> Result<()> {
    let what = "gather_rows backward into a gradient";
    let ((vocab, h), (n, hd)) = (acc.dims2()?, dy.dims2()?);
    if h != hd || ids.dims() != [n] || ids.dtype() != DType::U32 {
        candle_core::bail!("{what}: acc {:?}, dy {:?}, ids {:?}", acc.shape(), dy.shape(), ids.shape());
    }
    let dev = cuda_of(acc, what)?;
    let (accp, dyp) = (f32_ptr(acc, what)?, f32_ptr(dy, what)?);
    let (is, il) = ids.storage_and_layout();
    let candle_core::Storage::Cuda(is) = &*is else { candle_core::bail!("{what}: ids not on a CUDA device") };
    let iv = view::<u32>(is, il, what)?;
    if n * h == 0 {
        return Ok(());
    }
    let (n32, h32, v32) = (int(n, what)?, int(h, what)?, int(vocab, what)?);
    let skip = no_grad.map_or(-1i64, i64::from);
    let f = func_named(&dev, "dpo_scatter_rows_f32")?;
    let mut lb = f.builder();
    let accumulate = 1i32;
    lb.arg(&dyp).arg(&iv).arg(&accp).arg(&n32).arg(&h32).arg(&v32).arg(&skip).arg(&accumulate);
    // SAFETY: the pointers address live, contiguous f32 buffers (`dy` [n, h], `acc` [vocab, h],
    // which the caller owns alone: ops::add_gather_rows_backward consumes it); each row of acc
    // is written by one block, after its reads, ordered on the stream with every other op.
    unsafe { lb.launch(scatter_cfg(n, h)) }?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// The shapes of a flash attention call, checked: `q` `[rows, heads, seq, d]`, `k` and `v`
/// `[rows, kv, seq, d]` (bf16, d of 32 or 64, starting 16-byte aligned), `bias`
/// `[rows or 1, 1, seq, seq]` f32; all contiguous.
struct Flash<'a> {
    q: CudaView<'a, half::bf16>,
    k: CudaView<'a, half::bf16>,
    v: CudaView<'a, half::bf16>,
    bias: CudaView<'a, f32>,
    /// The bias's 64 x 64 tile classes and each query tile's "some query sees no key" flag
    /// (`dpo_flash_tiles`), computed once per bias tensor ([`flash_tiles`]).
    tiles: Arc<FlashTiles>,
    rows: usize,
    heads: usize,
    kv: usize,
    seq: usize,
    d: usize,
    /// `seq, heads, kv, bias rows` as the kernels take them, then `scale`.
    ints: [i32; 4],
    scale: f32,
}

/// `cls` and `full` of [`Flash`].
struct FlashTiles {
    cls: CudaSlice<u8>,
    full: CudaSlice<u8>,
}

/// The tile classes of the bias tensor `id` (`bias` `[bias_rows, 1, seq, seq]`), from the last
/// call's when it had the same bias: every attention call of a step (each layer's, forward and
/// backward, the reference's and the policy's) shares one mask, so `dpo_flash_tiles` runs once
/// a step, not once a call (72 times with an online reference). Tensor ids are never reused, so
/// a later mask, wherever its memory lies, never meets classes that are not its own.
fn flash_tiles(
    dev: &CudaDevice,
    bias: &CudaView<'_, f32>,
    id: candle_core::TensorId,
    bias_rows: usize,
    ints: &[i32; 4],
) -> Result<Arc<FlashTiles>> {
    static LAST: Mutex<Option<(candle_core::TensorId, Arc<FlashTiles>)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((known, tiles)) = last.as_ref()
        && *known == id
    {
        return Ok(tiles.clone());
    }
    let tiles = (ints[0] as usize).div_ceil(64);
    // SAFETY: the kernel writes every element (none where there are no tiles).
    let (mut cls, mut full) = unsafe {
        (dev.alloc::<u8>((bias_rows * tiles * tiles).max(1))?, dev.alloc::<u8>((bias_rows * tiles).max(1))?)
    };
    if bias_rows * tiles > 0 {
        let f = func_named(dev, "dpo_flash_tiles")?;
        let mut lb = f.builder();
        lb.arg(bias).arg(&mut cls).arg(&mut full).arg(&ints[0]);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, bias_rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let _timed = kernel_timer(dev, "flash_tiles");
        // SAFETY: argument types match the kernel's signature; `cls` and `full` hold
        // `bias_rows x tiles (x tiles)` bytes.
        unsafe { lb.launch(cfg) }?;
    }
    let computed = Arc::new(FlashTiles { cls, full });
    *last = Some((id, computed.clone()));
    Ok(computed)
}

impl<'a> Flash<'a> {
    /// `bias_id`: the bias tensor's id, for [`flash_tiles`].
    fn new(
        (q, ql): (&'a CudaStorage, &Layout),
        (k, kl): (&'a CudaStorage, &Layout),
        (v, vl): (&'a CudaStorage, &Layout),
        (bias, bl): (&'a CudaStorage, &Layout),
        bias_id: candle_core::TensorId,
        scale: f64,
    ) -> Result<Self> {
        let what = "flash attention";
        let (rows, heads, seq, d) = ql.shape().dims4()?;
        let kv = kl.shape().dims4()?.1;
        let bias_rows = bl.shape().dims4()?.0;
        for l in [ql, kl, vl] {
            if l.contiguous_offsets().is_none_or(|(start, _)| !start.is_multiple_of(8)) {
                candle_core::bail!(
                    "{what}: q, k and v must be contiguous and start at a multiple of 8 elements"
                );
            }
        }
        if ![32, 64].contains(&d) || kv == 0 || heads % kv != 0 || rows * heads > 65_535 {
            candle_core::bail!(
                "{what}: head size {d} (32 or 64), {heads} heads over {kv} kv heads, {rows} rows"
            );
        }
        let ints = [int(seq, what)?, int(heads, what)?, int(kv, what)?, int(bias_rows, what)?];
        let bias = view::<f32>(bias, bl, what)?;
        let tiles = flash_tiles(q.device(), &bias, bias_id, bias_rows, &ints)?;
        Ok(Flash {
            q: view(q, ql, what)?,
            k: view(k, kl, what)?,
            v: view(v, vl, what)?,
            bias,
            tiles,
            rows,
            heads,
            kv,
            seq,
            d,
            ints,
            scale: scale as f32,
        })
    }

    /// A block of 4 warps per tile of 64 queries (or keys) of each of `heads` heads of a row.
    fn cfg(&self, heads: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.seq.div_ceil(64) as u32, (self.rows * heads) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn tail<'b>(&'b self, lb: &mut Launch<'b>) {
        let [s, h, kv, b] = &self.ints;
        lb.arg(s).arg(h).arg(kv).arg(b).arg(&self.scale);
    }

    /// The (row, head, position) strides of [`Flash::forward`]'s output.
    fn out_strides(&self, merged: bool) -> [i64; 3] {
        let (s, h, d) = (self.seq, self.heads, self.d);
        if merged { [s * h * d, d, h * d] } else { [h * s * d, s * d, d] }.map(|x| x as i64)
    }

    /// The output `[rows, heads, seq, d]`, or with `merged` its heads merged (`[rows, seq, heads,
    /// d]` in memory), and each query's softmax statistics `[rows, heads, seq, 2]`.
    fn forward(&self, dev: &CudaDevice, merged: bool) -> Result<(CudaSlice<half::bf16>, CudaSlice<f32>)> {
        let n = self.rows * self.heads * self.seq;
        // SAFETY: the kernel writes every element of both.
        let (mut out, mut stats) =
            unsafe { (dev.alloc::<half::bf16>(n * self.d)?, dev.alloc::<f32>(2 * n)?) };
        let strides = self.out_strides(merged);
        if n > 0 {
            let f = func_named(dev, &format!("dpo_flash_fwd_d{}_bf16", self.d))?;
            let mut lb = f.builder();
            lb.arg(&self.q)
                .arg(&self.k)
                .arg(&self.v)
                .arg(&self.bias)
                .arg(&self.tiles.cls)
                .arg(&self.tiles.full);
            lb.arg(&mut out).arg(&mut stats).arg(&strides[0]).arg(&strides[1]).arg(&strides[2]);
            self.tail(&mut lb);
            let _timed = kernel_timer(dev, "flash_fwd");
            // SAFETY: argument types match the kernel's signature; sizes were checked above.
            unsafe { lb.launch(self.cfg(self.heads)) }?;
        }
        Ok((out, stats))
    }

    /// Only the softmax statistics of [`Self::forward`] (`dpo_flash_stats`: no `V`, no `P V`),
    /// the same bit for bit.
    fn stats(&self, dev: &CudaDevice) -> Result<CudaSlice<f32>> {
        let n = self.rows * self.heads * self.seq;
        // SAFETY: the kernel writes every element.
        let mut stats = unsafe { dev.alloc::<f32>(2 * n)? };
        if n > 0 {
            let f = func_named(dev, &format!("dpo_flash_stats_d{}_bf16", self.d))?;
            let mut lb = f.builder();
            lb.arg(&self.q)
                .arg(&self.k)
                .arg(&self.bias)
                .arg(&self.tiles.cls)
                .arg(&self.tiles.full)
                .arg(&mut stats);
            self.tail(&mut lb);
            let _timed = kernel_timer(dev, "flash_stats");
            // SAFETY: argument types match the kernel's signature; sizes were checked in `new`.
            unsafe { lb.launch(self.cfg(self.heads)) }?;
        }
        Ok(stats)
    }
}

/// Whether the forward's output `[rows, heads, seq, d]` as kept, or the upstream gradient (layout
/// `ol`), serves the backward of the call whose `q` has layout `ql`: its shape, bf16 rows
/// contiguous, and every row starting 16 bytes aligned (the kernels read 16 bytes at a time).
/// As the forward wrote it, or with its heads merged (`[rows, seq, heads * d]` viewed as heads),
/// both do. Its strides (row, head, position) where it does.
pub(super) fn head_rows(ol: &Layout, ql: &Layout) -> Option<[i64; 3]> {
    let [offset, r, h, p] = super::rope::head_strides(ol).ok()?;
    let fits = ol.shape() == ql.shape() && [offset, r, h, p].iter().all(|x| x.is_multiple_of(8));
    fits.then_some([r, h, p].map(|x| x as i64))
}

/// Times a kernel under `DPO_TRAIN_PROFILE=ops` ([`crate::profile::kernel`]); nothing (not even a
/// device handle) otherwise.
fn kernel_timer(dev: &CudaDevice, name: &'static str) -> Option<crate::profile::KernelGuard> {
    use crate::profile::{Level, kernel, level};
    (level() == Level::Ops).then(|| kernel(&candle_core::Device::Cuda(dev.clone()), name))
}

/// Whether `dev` runs the flash attention kernels (bf16 tensor-core `mma`: compute capability
/// 8.0+). Asked of the driver once per device ordinal, not on every attention call.
pub(super) fn has_flash_attention(dev: &CudaDevice) -> bool {
    static KNOWN: Mutex<Vec<(usize, bool)>> = Mutex::new(Vec::new());
    let ordinal = dev.cuda_stream().context().ordinal();
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, yes)) = known.iter().find(|(o, _)| *o == ordinal) {
        return yes;
    }
    let yes = dev.cuda_stream().context().compute_capability().is_ok_and(|(major, _)| major >= 8);
    known.push((ordinal, yes));
    yes
}

/// `softmax(q k^T * scale + bias) v` by the tensor-core kernel `dpo_flash_fwd_d<D>_bf16` (shapes
/// as [`Flash`]): `[rows, heads, seq, d]`, or with `merged` `[rows, seq, heads, d]`.
pub(super) fn flash_attention(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    bias: (&CudaStorage, &Layout),
    bias_id: candle_core::TensorId,
    scale: f64,
    merged: bool,
) -> Result<CudaStorage> {
    let dev = q.0.device().clone();
    let (out, _) = Flash::new(q, k, v, bias, bias_id, scale)?.forward(&dev, merged)?;
    Ok(half::bf16::wrap_cuda_slice(out, dev))
}

/// The gradients of [`flash_attention`] for the upstream `dy` (`q`'s shape, bf16, laid out as
/// [`head_rows`] says: contiguous, or the heads merged that the output projection's backward
/// gives): `[dq, dk, dv]` flattened into one buffer. With the forward's output `out` where the
/// caller kept it (see [`head_rows`]), computes the softmax statistics again
/// (`dpo_flash_stats`, no `P V`); without, the whole forward. Then `dpo_flash_bwd_dot`, `_dkdv`,
/// `_group` and `_dq`.
pub(super) fn flash_attention_backward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    (bias, bias_id): ((&CudaStorage, &Layout), candle_core::TensorId),
    (dy, dyl): (&CudaStorage, &Layout),
    out: Option<(&CudaStorage, &Layout)>,
    scale: f64,
) -> Result<CudaStorage> {
    let what = "flash attention backward";
    let dev = q.0.device().clone();
    let fl = Flash::new(q, k, v, bias, bias_id, scale)?;
    let Some([d_row, d_head, d_pos]) = head_rows(dyl, q.1) else {
        candle_core::bail!(
            "{what}: upstream {:?} with strides {:?} from {} for q {:?}: rows of head_dim contiguous, \
             every stride and the start a multiple of 8 elements",
            dyl.shape(),
            dyl.stride(),
            dyl.start_offset(),
            q.1.shape()
        );
    };
    let dy = head_rows_view::<half::bf16>(dy, dyl)?;
    let (nq, nk) = (fl.rows * fl.heads * fl.seq, fl.rows * fl.kv * fl.seq);
    // SAFETY: the kernels write every element.
    let mut grads = unsafe { dev.alloc::<half::bf16>((nq + 2 * nk) * fl.d)? };
    if nq > 0 {
        let recomputed;
        let (o, [o_row, o_head, o_pos], stats) =
            match out.and_then(|(o, ol)| Some((o, ol, head_rows(ol, q.1)?))) {
                Some((o, ol, strides)) => (head_rows_view::<half::bf16>(o, ol)?, strides, fl.stats(&dev)?),
                None => {
                    let stats;
                    (recomputed, stats) = fl.forward(&dev, false)?;
                    (recomputed.slice(..), fl.out_strides(false), stats)
                }
            };
        // SAFETY: written by the kernel.
        let mut dvec = unsafe { dev.alloc::<f32>(nq)? };
        let f = func_named(&dev, "dpo_flash_bwd_dot_bf16")?;
        let (n64, d32) = (nq as i64, fl.d as i32);
        let mut lb = f.builder();
        lb.arg(&o).arg(&dy).arg(&mut dvec).arg(&n64).arg(&d32).arg(&fl.ints[1]).arg(&fl.ints[0]);
        lb.arg(&o_row).arg(&o_head).arg(&o_pos).arg(&d_row).arg(&d_head).arg(&d_pos);
        let timed = kernel_timer(&dev, "flash_bwd_dot");
        // SAFETY: argument types match the kernel's signature (d / 8 threads a row, 16-byte
        // aligned rows: checked in `Flash::new` and above).
        unsafe { lb.launch(elementwise_cfg(nq * fl.d / 8)) }?;
        drop(timed);
        let (mut dq, mut rest) = grads.split_at_mut(nq * fl.d);
        let (mut dk, mut dv) = rest.split_at_mut(nk * fl.d);
        // dK and dV per query head (a block per key tile and query head: 8 x 14 x 12 blocks on
        // the benchmark, where one per KV head gave 192 on 132 SMs), then each group's sum.
        // SAFETY: written by the kernel (every key of every query head).
        let (mut dkp, mut dvp) = unsafe { (dev.alloc::<f32>(nq * fl.d)?, dev.alloc::<f32>(nq * fl.d)?) };
        let f = func_named(&dev, &format!("dpo_flash_bwd_dkdv_d{}_bf16", fl.d))?;
        let mut lb = f.builder();
        lb.arg(&fl.q)
            .arg(&fl.k)
            .arg(&fl.v)
            .arg(&fl.bias)
            .arg(&fl.tiles.cls)
            .arg(&fl.tiles.full)
            .arg(&dy)
            .arg(&stats)
            .arg(&dvec)
            .arg(&mut dkp)
            .arg(&mut dvp)
            .arg(&d_row)
            .arg(&d_head)
            .arg(&d_pos);
        fl.tail(&mut lb);
        let timed = kernel_timer(&dev, "flash_bwd_dkdv");
        // SAFETY: as above.
        unsafe { lb.launch(fl.cfg(fl.heads)) }?;
        drop(timed);
        let f = func_named(&dev, "dpo_flash_bwd_group_bf16")?;
        let (n, sd, rep) = ((nk * fl.d) as i64, (fl.seq * fl.d) as i64, (fl.heads / fl.kv) as i32);
        let mut lb = f.builder();
        lb.arg(&dkp).arg(&dvp).arg(&mut dk).arg(&mut dv).arg(&n).arg(&sd).arg(&rep);
        let timed = kernel_timer(&dev, "flash_bwd_group");
        // SAFETY: as above; the partials hold `rep` heads for each of dk's.
        unsafe { lb.launch(elementwise_cfg(nk * fl.d)) }?;
        drop(timed);
        let f = func_named(&dev, &format!("dpo_flash_bwd_dq_d{}_bf16", fl.d))?;
        let mut lb = f.builder();
        lb.arg(&fl.q).arg(&fl.k).arg(&fl.v).arg(&fl.bias).arg(&fl.tiles.cls).arg(&fl.tiles.full);
        lb.arg(&dy).arg(&stats).arg(&dvec).arg(&mut dq).arg(&d_row).arg(&d_head).arg(&d_pos);
        fl.tail(&mut lb);
        let _timed = kernel_timer(&dev, "flash_bwd_dq");
        // SAFETY: as above.
        unsafe { lb.launch(fl.cfg(fl.heads)) }?;
    }
    Ok(half::bf16::wrap_cuda_slice(grads, dev))
}

// ---------------------------------------------------------------------------------------------

/// `a @ b` into a new f32 `[m, n]` for bf16 `a` `[m, k]` and `b` `[k, n]`, each row-major or the
/// transpose of a row-major matrix ([`crate::cublas_takes`]), by one cuBLAS GEMM with bf16
/// operands, f32 result and f32 compute ([`crate::matmul_bf16_f32`]).
pub(crate) fn gemm_bf16_f32(
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_strided_batched_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let what = "matmul_bf16_f32";
    let ((m, k), n) = (al.shape().dims2()?, bl.shape().dims2()?.1);
    // cuBLAS is column-major: row-major `C = A B` is its `C^T = B^T A^T`, so its first operand is
    // `b` and its second `a` (candle's `gemm_config`). A `[rows, cols]` matrix is row-major
    // (leading dimension `cols`, no transpose) or the transpose of one (`rows`, transposed).
    let op = |l: &Layout, rows: usize, cols: usize| -> Result<(sys::cublasOperation_t, i32)> {
        use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        match crate::matmul::cublas_operand(l.stride(), rows, cols) {
            Some((transposed, ld)) => {
                Ok((if transposed { CUBLAS_OP_T } else { CUBLAS_OP_N }, int(ld, what)?))
            }
            None => candle_core::bail!(
                "{what}: {:?} with strides {:?} is no matrix cuBLAS takes",
                l.dims(),
                l.stride()
            ),
        }
    };
    let ((op_b, ldb), (op_a, lda)) = (op(bl, k, n)?, op(al, m, k)?);
    let dev = a.device().clone();
    let av = a.as_cuda_slice::<half::bf16>()?.slice(al.start_offset()..);
    let bv = b.as_cuda_slice::<half::bf16>()?.slice(bl.start_offset()..);
    // SAFETY: the GEMM writes every element (beta = 0).
    let mut c = unsafe { dev.alloc::<f32>(m * n)? };
    let (alpha, beta) = (1f32, 0f32);
    let stream = dev.cuda_stream();
    {
        let (ap, _ga) = av.device_ptr(&stream);
        let (bp, _gb) = bv.device_ptr(&stream);
        let (cp, _gc) = c.device_ptr_mut(&stream);
        let blas = dev.cublas_handle();
        let _timed = kernel_timer(&dev, "gemm_bf16_f32");
        // SAFETY: the operands hold the matrices their leading dimensions describe (checked
        // above, from their layouts), the result `m x n` f32; one batch.
        unsafe {
            gemm_strided_batched_ex(
                *blas.handle(),
                op_b,
                op_a,
                int(n, what)?,
                int(m, what)?,
                int(k, what)?,
                (&alpha as *const f32).cast(),
                bp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                ldb,
                (k * n) as i64,
                ap as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                lda,
                (m * k) as i64,
                (&beta as *const f32).cast(),
                cp as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                int(n, what)?,
                (m * n) as i64,
                1,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .w()?;
    }
    Ok(f32::wrap_cuda_slice(c, dev))
}
