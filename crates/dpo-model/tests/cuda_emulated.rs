//! The CUDA kernels of `kernels/dpo_ops.cu`, run on the CPU under an emulation of CUDA's
//! threads, shared memory, barriers and warp shuffles (`tests/cuda-emu/`), against the CPU
//! kernels of the same ops. The project's CI and most of its sessions have no GPU: a wrong index,
//! stride or reduction in a kernel fails here instead of in the startup kernel check of a GPU
//! run. The launch arguments and grid shapes are given as `src/ops/cuda.rs` gives them; the
//! launchers themselves are tested by `src/ops/cuda_tests.rs` (`scripts/cuda-emu.sh`
//! runs them against an emulated driver built from the same emulation).
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`). With `CUDA_EMU_SANITIZE=thread` the emulator is
//! built with ThreadSanitizer, which fails a kernel whose threads race on shared or global
//! memory without a barrier between them; with `CUDA_EMU_SANITIZE=address`, AddressSanitizer,
//! which fails a kernel that reads or writes a byte outside its buffers (each allocated at its
//! exact size). `.ci/run` runs both. Every build checks alignment: a 16-byte vector load or store
//! at an address that is not a multiple of 16 faults on the GPU but works on the CPU, so the
//! emulator is compiled to stop there ([`ALIGNMENT_CHECK`]; the vector types of `emu.h` carry
//! CUDA's alignment).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};
use dpo_model::ops;
use half::{bf16, f16};

const CPU: Device = Device::Cpu;

/// The element types every kernel family has (`<name>_<dtype>`).
const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

/// The element types the tests run each kernel family in: all four, or under ThreadSanitizer f32
/// and bf16 only. A race between a block's threads is in the kernel's indexing and barriers, the
/// same code for every dtype; under the sanitizer each dtype costs as much as the rest of the run
/// (the sanitized CI run took 8 minutes with all four). AddressSanitizer keeps all four: a read
/// past a buffer's end can depend on the element's width (16-byte vectors of 2, 4 or 8 bytes).
fn dtypes() -> Vec<DType> {
    if thread_sanitized() { vec![DType::F32, DType::BF16] } else { DTYPES.to_vec() }
}

/// Whether the emulator runs under ThreadSanitizer (`CUDA_EMU_SANITIZE=thread`).
fn thread_sanitized() -> bool {
    std::env::var("CUDA_EMU_SANITIZE").is_ok_and(|s| s == "thread")
}

/// Every kernel of `kernels/dpo_ops.cu` (the emulator's registry).
fn kernels() -> Vec<String> {
    let per_dtype = [
        "dpo_softmax_fwd",
        "dpo_softmax_bwd",
        "dpo_softmax_fwd_warp",
        "dpo_softmax_bwd_warp",
        "dpo_rmsnorm_fwd",
        "dpo_rmsnorm_bwd_dx",
        "dpo_rmsnorm_bwd_dx_add",
        "dpo_rmsnorm_bwd_dw_partial",
        "dpo_rmsnorm_bwd_dw_final",
        "dpo_rope",
        "dpo_rope_bwd_merged",
        "dpo_silu_mul_fwd",
        "dpo_silu_mul_bwd",
        "dpo_target_logprobs_fwd",
        "dpo_target_logprobs_bwd",
        "dpo_gather_rows",
        "dpo_scatter_rows",
    ];
    let mixed = [
        "dpo_rmsnorm_fwd_f32_to",
        "dpo_add_rmsnorm_fwd_f32_to",
        "dpo_rmsnorm_bwd_dx_add_f32_from",
        "dpo_rmsnorm_bwd_dw_partial_f32_from",
        "dpo_add_cast",
        "dpo_cast_parts_f32_to",
        "dpo_target_logprobs_bwd_f32_to",
    ];
    let mut names: Vec<String> =
        per_dtype.iter().flat_map(|k| DTYPES.map(|dt| format!("{k}_{}", dt.as_str()))).collect();
    names.extend(mixed.iter().flat_map(|k| ["bf16", "f16"].map(|dt| format!("{k}_{dt}"))));
    names.extend(["dpo_sumsq_parts_f32", "dpo_clip_f64", "dpo_adamw_parts_f32"].map(String::from));
    names.extend(["fwd", "stats"].iter().flat_map(|k| [32, 64].map(|d| format!("dpo_flash_{k}_d{d}_bf16"))));
    names
        .extend(["dkdv", "dq"].iter().flat_map(|k| [32, 64].map(|d| format!("dpo_flash_bwd_{k}_d{d}_bf16"))));
    names.extend(["dpo_flash_tiles", "dpo_flash_bwd_dot_bf16", "dpo_flash_bwd_group_bf16"].map(String::from));
    names
}

/// A kernel added to `kernels/dpo_ops.cu` joins [`kernels`] (and so gets a test here).
#[test]
fn every_kernel_is_in_the_registry() {
    let cu = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/dpo_ops.cu")).unwrap();
    let names = kernels();
    let mut found = 0;
    for decl in cu.split("extern \"C\" __global__ void ").skip(1) {
        // Past `__launch_bounds__(...)`, where a kernel has them.
        let decl = match decl.strip_prefix("__launch_bounds__(") {
            Some(rest) => rest.split_once(") ").map_or(rest, |(_, name)| name),
            None => decl,
        };
        let name: String =
            decl.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '#').collect();
        let known = match name.strip_suffix("_##SUF") {
            Some(base) => names.iter().any(|n| {
                n.strip_prefix(base).is_some_and(|rest| ["_f32", "_f64", "_bf16", "_f16"].contains(&rest))
            }),
            // A head-size family: `<pre>##D##<post>` for some number D.
            None if name.contains("##D##") => {
                let (pre, post) = name.split_once("##D##").unwrap();
                names.iter().any(|n| {
                    let d = n.strip_prefix(pre).and_then(|r| r.strip_suffix(post));
                    d.is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
                })
            }
            None => names.contains(&name),
        };
        assert!(known, "kernel {name} is not in tests/cuda_emulated.rs's registry");
        found += 1;
    }
    assert_eq!(found, 34, "kernel declarations in dpo_ops.cu");
}

/// The emulator, compiled once per test binary.
fn emulator() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda-emu");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu");
        std::fs::create_dir_all(&dir).unwrap();
        let registry: String = kernels().iter().map(|k| format!("K({k})\n")).collect();
        std::fs::write(dir.join("registry.inc"), registry).unwrap();
        let exe = dir.join("cuda-emu");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let sanitize: Vec<String> = match std::env::var("CUDA_EMU_SANITIZE") {
            Ok(s) if !s.is_empty() => vec![format!("-fsanitize={s}"), "-g".into()],
            _ => vec![],
        };
        let out = Command::new(&cxx)
            .args(sanitize)
            .args(ALIGNMENT_CHECK)
            .args(contract_like_nvcc())
            .args(["-std=c++20", "-pthread", "-I"])
            .arg(src.join("include"))
            .arg("-I")
            .arg(&dir)
            .arg(src.join("main.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("running the C++ compiler `{cxx}` (set CXX): {e}"));
        assert!(
            out.status.success(),
            "compiling the CUDA emulator:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

/// A load or store through a misaligned pointer (a 16-byte vector, `uint4`, at an address that
/// is not a multiple of 16) faults on the GPU and works on the CPU: the emulator stops there too.
const ALIGNMENT_CHECK: [&str; 2] = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"];

/// Host compiler flags that contract `a * b + c` into an FMA as nvcc does by default
/// (`--fmad=true`; GCC forms them from -O2), so that a kernel relying on a product being
/// rounded on its own fails here as on a GPU (the flash backward at head size 32 did).
fn contract_like_nvcc() -> Vec<&'static str> {
    let mut flags = vec!["-O2", "-ffp-contract=fast"];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        flags.push("-mfma");
    }
    flags
}

/// A kernel argument: a buffer (the kernel may write it) or a scalar.
#[derive(Clone)]
enum Arg {
    Buf(Vec<u8>),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

/// Runs `kernel` on `grid` x `block` threads; returns every buffer argument afterwards.
fn launch(kernel: &str, grid: (usize, usize), block: (usize, usize), args: &[Arg]) -> Vec<Vec<u8>> {
    let mut spec = Vec::new();
    let u32s =
        |spec: &mut Vec<u8>, v: &[usize]| v.iter().for_each(|&x| spec.extend((x as u32).to_le_bytes()));
    u32s(&mut spec, &[kernel.len()]);
    spec.extend(kernel.as_bytes());
    u32s(&mut spec, &[grid.0, grid.1, block.0, block.1, args.len()]);
    for a in args {
        let (kind, bytes) = match a {
            Arg::Buf(b) => (0u8, b.clone()),
            Arg::I32(v) => (1, v.to_le_bytes().to_vec()),
            Arg::I64(v) => (1, v.to_le_bytes().to_vec()),
            Arg::F32(v) => (1, v.to_le_bytes().to_vec()),
            Arg::F64(v) => (1, v.to_le_bytes().to_vec()),
        };
        spec.push(kind);
        spec.extend((bytes.len() as u64).to_le_bytes());
        spec.extend(bytes);
    }
    let mut child = Command::new(emulator())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&spec).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{kernel}: {}", String::from_utf8_lossy(&out.stderr));
    let (mut bufs, mut at) = (Vec::new(), 0);
    while at < out.stdout.len() {
        let n = u64::from_le_bytes(out.stdout[at..at + 8].try_into().unwrap()) as usize;
        bufs.push(out.stdout[at + 8..at + 8 + n].to_vec());
        at += 8 + n;
    }
    bufs
}

/// `t`'s elements (row-major) as the kernel sees them.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<bf16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<f16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U32 => t.to_vec1::<u32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        dt => panic!("no bytes for {dt:?}"),
    }
}

fn buf(t: &Tensor) -> Arg {
    Arg::Buf(bytes(t))
}

/// An output buffer of `n` elements of `dt`, filled with a NaN pattern so that unwritten
/// elements show.
fn out(dt: DType, n: usize) -> Arg {
    Arg::Buf(vec![0xff; n * dt.size_in_bytes()])
}

fn tensor(b: &[u8], dt: DType, shape: &[usize]) -> Tensor {
    let t = match dt {
        DType::F32 => {
            let v: Vec<f32> = b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            Tensor::new(v, &CPU)
        }
        DType::BF16 => {
            let v: Vec<bf16> =
                b.chunks(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect();
            Tensor::new(v, &CPU)
        }
        DType::F16 => {
            let v: Vec<f16> = b.chunks(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect();
            Tensor::new(v, &CPU)
        }
        DType::F64 => {
            let v: Vec<f64> = b.chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
            Tensor::new(v, &CPU)
        }
        dt => panic!("no tensor from {dt:?}"),
    };
    t.unwrap().reshape(shape).unwrap()
}

/// `src/ops/cuda.rs`'s launch shapes: one block per row, and grid-stride element-wise.
fn rows_cfg(rows: usize, len: usize) -> ((usize, usize), (usize, usize)) {
    ((rows, 1), (len.div_ceil(4).next_power_of_two().clamp(32, 1024), 1))
}

fn elementwise_cfg(n: usize) -> ((usize, usize), (usize, usize)) {
    ((n.div_ceil(256).clamp(1, 1 << 20), 1), (256, 1))
}

/// Deterministic N(0, std^2) values as a CPU f32 tensor.
fn randn(shape: &[usize], seed: u64, std: f32) -> Tensor {
    ops::randn_tensor(shape, seed, std).unwrap()
}

/// `max |got - want| / max |want|` within `tol` (same shape, every value finite).
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (got, want) = (got.to_dtype(DType::F64).unwrap(), want.to_dtype(DType::F64).unwrap());
    let max =
        |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let finite = got.sum_all().unwrap().to_scalar::<f64>().unwrap().is_finite();
    let rel = max(&(&got - &want).unwrap()) / max(&want).max(1e-30);
    eprintln!("{what}: relative error {rel:.2e}");
    assert!(finite && rel <= tol, "{what}: relative error {rel:e} > {tol:e} (finite: {finite})");
}

/// The same algorithm on both sides, results rounded to `dt` once: about one rounding apart
/// (`ops::verify`'s tolerances, and f16's rounding).
fn tol(dt: DType) -> f64 {
    match dt {
        DType::F64 => 1e-12,
        DType::F32 => 5e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

fn acc(dt: DType) -> DType {
    if dt == DType::F64 { DType::F64 } else { DType::F32 }
}

/// `x` with NaN where `at` (broadcast to `x`'s shape) is non-zero: what a kernel must not read.
fn nan_where(x: &Tensor, at: &Tensor) -> Result<Tensor> {
    let at = at.broadcast_as(x.shape())?;
    let nan = Tensor::full(f32::NAN, x.shape(), &CPU)?.to_dtype(x.dtype())?;
    at.where_cond(&nan, x)
}

/// Scores under a masking bias, and `dP` where `P` is 0, poisoned with NaN: the kernels do not
/// read them (`BIAS_MASKS` in `kernels/dpo_ops.cu`), so the results are those of the clean
/// inputs.
fn poisoned(s: &Tensor, bias: &Tensor, p: &Tensor, dp: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = nan_where(s, &bias.le(-5e29)?)?;
    assert!(
        s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().any(|x| x.is_nan()),
        "no masked score"
    );
    Ok((s, nan_where(dp, &p.eq(&p.zeros_like()?)?)?))
}

/// The masked softmax, forward and backward (a fully masked tail, a row length that is not a
/// multiple of the block; masked scores and the `dP` of zero probabilities poisoned).
#[test]
fn masked_softmax() -> Result<()> {
    let (r, h, q, k) = (2, 2, 5, 37);
    let bias = Tensor::from_vec(
        (0..r * q * k).map(|i| if (i % k) > (i / k) % q + 30 { -1e30f32 } else { 0.0 }).collect::<Vec<_>>(),
        (r, 1, q, k),
        &CPU,
    )?;
    let n = r * h * q * k;
    for dt in dtypes() {
        let s = candle_core::Var::from_tensor(&randn(&[r, h, q, k], 1, 4.0).to_dtype(dt)?)?;
        let p = ops::masked_softmax(&s, &bias, 0.5)?;
        let dp = randn(&[r, h, q, k], 2, 1.0).to_dtype(dt)?;
        let want_ds = (&p * &dp)?.sum_all()?.backward()?.get(&s).unwrap().clone();
        let (s_bad, dp_bad) = poisoned(&s, &bias, &p, &dp)?;
        let (grid, block) = rows_cfg(r * h * q, k);
        let args = [
            buf(&s_bad),
            buf(&bias),
            out(dt, n),
            Arg::I32(k as i32),
            Arg::I32(q as i32),
            Arg::I32((h * q) as i32),
            Arg::I32(0),
            Arg::F64(0.5),
        ];
        let got = launch(&format!("dpo_softmax_fwd_{}", dt.as_str()), grid, block, &args);
        assert_close(&tensor(&got[2], dt, &[r, h, q, k]), &p, tol(dt), &format!("softmax {dt:?}"));
        let args = [buf(&p), buf(&dp_bad), out(dt, n), Arg::I32(k as i32), Arg::F64(0.5)];
        let got = launch(&format!("dpo_softmax_bwd_{}", dt.as_str()), grid, block, &args);
        assert_close(
            &tensor(&got[2], dt, &[r, h, q, k]),
            &want_ds,
            tol(dt),
            &format!("softmax backward {dt:?}"),
        );
    }
    Ok(())
}

/// The warp-per-row softmax kernels (rows of at most 1,024 entries), as `src/ops/cuda.rs`
/// launches them (8 rows a block): row lengths below, at and past a multiple of 32, the longest,
/// a row count that leaves the last block part empty, a bias broadcast over rows and one per
/// row, fully masked rows; masked scores and the `dP` of zero probabilities poisoned.
#[test]
fn masked_softmax_warp_per_row() -> Result<()> {
    for (r, h, q, k, bcast) in
        [(1, 3, 3, 5, false), (2, 2, 5, 37, true), (1, 1, 3, 64, false), (1, 2, 2, 1024, false)]
    {
        let bias_rows = if bcast { 1 } else { r };
        // Query i of row j sees keys up to i + 30 - j; the last query of each row sees none.
        let bias = Tensor::from_vec(
            (0..bias_rows * q * k)
                .map(|e| {
                    let (row, i, key) = (e / (q * k), (e / k) % q, e % k);
                    if i == q - 1 || key + row > i + 30 { -1e30f32 } else { 0.0 }
                })
                .collect::<Vec<_>>(),
            (bias_rows, 1, q, k),
            &CPU,
        )?;
        let rows = r * h * q;
        let (grid, block) = ((rows.div_ceil(8), 1), (256, 1));
        for dt in dtypes() {
            let s = candle_core::Var::from_tensor(&randn(&[r, h, q, k], 1, 4.0).to_dtype(dt)?)?;
            let p = ops::masked_softmax(&s, &bias, 0.5)?;
            let dp = randn(&[r, h, q, k], 2, 1.0).to_dtype(dt)?;
            let want_ds = (&p * &dp)?.sum_all()?.backward()?.get(&s).unwrap().clone();
            let (s_bad, dp_bad) = poisoned(&s, &bias, &p, &dp)?;
            let what = format!("softmax {r}x{h}x{q}x{k} {dt:?}");
            let args = [
                buf(&s_bad),
                buf(&bias),
                out(dt, rows * k),
                Arg::I64(rows as i64),
                Arg::I32(k as i32),
                Arg::I32(q as i32),
                Arg::I32((h * q) as i32),
                Arg::I32(i32::from(bcast && r != 1)),
                Arg::F64(0.5),
            ];
            let got = launch(&format!("dpo_softmax_fwd_warp_{}", dt.as_str()), grid, block, &args);
            assert_close(&tensor(&got[2], dt, &[r, h, q, k]), &p, tol(dt), &what);
            let args = [
                buf(&p),
                buf(&dp_bad),
                out(dt, rows * k),
                Arg::I64(rows as i64),
                Arg::I32(k as i32),
                Arg::F64(0.5),
            ];
            let got = launch(&format!("dpo_softmax_bwd_warp_{}", dt.as_str()), grid, block, &args);
            assert_close(&tensor(&got[2], dt, &[r, h, q, k]), &want_ds, tol(dt), &format!("{what} backward"));
        }
    }
    Ok(())
}

#[test]
fn target_logprobs_forward_and_backward() -> Result<()> {
    let (n, vocab) = (7, 1029);
    let targets = Tensor::new(&[0u32, 1028, 5, 1000, 17, 512, 3], &CPU)?;
    for dt in dtypes() {
        let g = randn(&[n], 3, 1.0).to_dtype(acc(dt))?;
        let z = randn(&[n, vocab], 2, 4.0).to_dtype(dt)?;
        let (logp, lse) = ops::target_logprobs(&z, &targets)?;
        let (grid, block) = rows_cfg(n, vocab);
        let fwd = [buf(&z), buf(&targets), out(acc(dt), 2 * n), Arg::I32(vocab as i32), Arg::I32(n as i32)];
        let got = launch(&format!("dpo_target_logprobs_fwd_{}", dt.as_str()), grid, block, &fwd);
        let got = tensor(&got[2], acc(dt), &[2, n]);
        // Both computed in f32 (f64) from the same logits: close in any dtype.
        let close = if dt == DType::F64 { 1e-12 } else { 1e-5 };
        assert_close(&got.get(0)?, &logp, close, &format!("logp {dt:?}"));
        assert_close(&got.get(1)?, &lse, close, &format!("lse {dt:?}"));
        let want = ops::target_logprobs_backward(&z, &lse, &targets, &g, 0)?;
        let lse_g = Tensor::stack(&[&lse, &g], 0)?;
        let bwd = |z: &Tensor, first: usize, name: &str, to: DType| {
            let cols = z.dim(1).unwrap();
            let args = [
                buf(z),
                buf(&lse_g),
                buf(&targets),
                out(to, n * cols),
                Arg::I32(cols as i32),
                Arg::I32(n as i32),
                Arg::I64(first as i64),
            ];
            let got = launch(name, grid, block, &args);
            tensor(&got[3], to, &[n, cols])
        };
        let name = format!("dpo_target_logprobs_bwd_{}", dt.as_str());
        assert_close(&bwd(&z, 0, &name, dt), &want, tol(dt), &format!("dlogits {dt:?}"));
        // The vocabulary's columns 500.. 1,020 alone: targets 512 and 1000 inside, the rest not.
        let cols = z.narrow(1, 500, 520)?.contiguous()?;
        let what = format!("dlogits {dt:?}, columns 500..");
        assert_close(&bwd(&cols, 500, &name, dt), &want.narrow(1, 500, 520)?, tol(dt), &what);
        // From f32 logits, rounded once into the 16-bit dtypes.
        if dt == DType::F32 {
            for to in [DType::BF16, DType::F16] {
                let want = ops::target_logprobs_backward_to(&cols, &lse, &targets, &g, 500, to)?;
                assert_eq!(want.dtype(), to);
                let name = format!("dpo_target_logprobs_bwd_f32_to_{}", to.as_str());
                assert_close(&bwd(&cols, 500, &name, to), &want, tol(to), &format!("dlogits f32 -> {to:?}"));
            }
        }
    }
    Ok(())
}

/// `dpo_flash_tiles` on `bias` `[bias_rows, 1, seq, seq]`, checked against the classes computed
/// here (0: the bias masks every entry of the 64 x 64 tile inside `seq`, 1: none, 2: some; per
/// query tile, whether one of its queries is masked from every key); the two buffers, and how
/// many tiles of each class there are.
fn flash_tiles(bias: &Tensor, seq: usize) -> Result<([Arg; 2], [usize; 3])> {
    let rows = bias.dim(0)?;
    let t = seq.div_ceil(64);
    let got = launch(
        "dpo_flash_tiles",
        (t, rows),
        (256, 1),
        &[buf(bias), out(DType::U8, rows * t * t), out(DType::U8, rows * t), Arg::I32(seq as i32)],
    );
    let b = bias.flatten_all()?.to_vec1::<f32>()?;
    let (mut cls, mut full, mut counts) = (vec![0u8; rows * t * t], vec![0u8; rows * t], [0; 3]);
    for r in 0..rows {
        for i in 0..seq {
            let sees = |j: usize| b[(r * seq + i) * seq + j] > -5e29;
            full[r * t + i / 64] |= u8::from(!(0..seq).any(sees));
            for j in 0..seq {
                cls[(r * t + i / 64) * t + j / 64] |= if sees(j) { 1 } else { 2 };
            }
        }
    }
    // Seen only (1) is open, only masked (2) is skipped (0), both (3) mixed (2).
    for c in cls.iter_mut() {
        *c = [0, 1, 0, 2][*c as usize];
        counts[*c as usize] += 1;
    }
    assert_eq!(got[1], cls, "flash attention tile classes, seq {seq}");
    assert_eq!(got[2], full, "flash attention queries masked from every key, seq {seq}");
    Ok(([Arg::Buf(cls), Arg::Buf(full)], counts))
}

/// The tensor-core attention, forward and backward, against the CPU's attention on the same
/// bf16 inputs: head sizes 32 and 64, grouped-query heads, sequences that end inside a tile of
/// 64, a bias per row and one broadcast, a causal mask whose tiles above the diagonal are
/// skipped and those below not read, and queries masked from every key (their tiles of queries
/// compute every key tile: the keys' plain average, and its gradient).
#[test]
fn flash_attention_forward_and_backward() -> Result<()> {
    let mut classes = [0; 3];
    for (case, (rows, heads, kv, seq, d, per_row)) in
        [(2, 4, 2, 70, 32, true), (1, 2, 1, 130, 64, false), (2, 4, 2, 70, 64, true)].into_iter().enumerate()
    {
        let q = randn(&[rows, heads, seq, d], 1, 1.0).to_dtype(DType::BF16)?;
        let k = randn(&[rows, kv, seq, d], 2, 1.0).to_dtype(DType::BF16)?;
        let v = randn(&[rows, kv, seq, d], 3, 1.0).to_dtype(DType::BF16)?;
        let dy = randn(&[rows, heads, seq, d], 4, 1.0).to_dtype(DType::BF16)?;
        // Causal, the last row's tail padded; with per-row biases, row 0's query 5 sees nothing.
        let valid: Vec<u8> = (0..rows * seq).map(|i| u8::from(i < (rows - 1) * seq + seq - 3)).collect();
        let mask = dpo_model::AttentionMask::causal(&valid, rows, seq, None, &CPU)?;
        let mut bias = if per_row { mask.bias } else { mask.bias.narrow(0, 0, 1)? };
        if per_row {
            let mut b = bias.flatten_all()?.to_vec1::<f32>()?;
            b[5 * seq..6 * seq].fill(-1e30);
            bias = Tensor::from_vec(b, bias.dims(), &CPU)?;
        }
        let scale = 1.0 / (d as f64).sqrt();
        let what = |x: &str| format!("flash attention {x} d={d} seq={seq}");
        let want = ops::attention(&q, &k, &v, &bias, scale)?;
        let (tiles, counts) = flash_tiles(&bias, seq)?;
        (0..3).for_each(|c| classes[c] += counts[c]);
        let tail = [
            Arg::I32(seq as i32),
            Arg::I32(heads as i32),
            Arg::I32(kv as i32),
            Arg::I32(bias.dim(0)? as i32),
            Arg::F32(scale as f32),
        ];
        let grid_q = (seq.div_ceil(64), rows * heads);
        // What every attention kernel reads first: q, k, v, the bias and its tile classes.
        let inputs = [buf(&q), buf(&k), buf(&v), buf(&bias), tiles[0].clone(), tiles[1].clone()];
        // Strides (row, head, position) of [rows, heads, seq, d] as it is, and with its heads
        // merged ([rows, seq, heads * d]: the output projection's input, the gradient it gives).
        let (plain, merged) = ([heads * seq * d, seq * d, d], [seq * heads * d, d, heads * d]);
        let strides = |s: [usize; 3]| s.map(|x| Arg::I64(x as i64)).to_vec();
        let fwd = |layout: [usize; 3]| {
            let args = [
                inputs.to_vec(),
                vec![out(DType::BF16, rows * heads * seq * d), out(DType::F32, rows * heads * seq * 2)],
                strides(layout),
                tail.to_vec(),
            ]
            .concat();
            launch(&format!("dpo_flash_fwd_d{d}_bf16"), grid_q, (128, 1), &args)
        };
        let got = fwd(plain);
        let (o, stats) = (got[6].clone(), got[7].clone());
        assert_close(&tensor(&o, DType::BF16, &[rows, heads, seq, d]), &want, 1.6e-2, &what("forward"));
        // Written with its heads merged: the same bits, laid out as the output projection reads.
        let got = fwd(merged);
        let heads_merged = tensor(&got[6], DType::BF16, &[rows, seq, heads, d]).transpose(1, 2)?;
        assert_eq!(
            heads_merged.contiguous()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            tensor(&o, DType::BF16, &[rows, heads, seq, d])
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            "{}",
            what("forward, heads merged")
        );
        assert!(got[7] == stats, "{}: statistics differ", what("forward, heads merged"));
        // The statistics alone (the backward of a kept output): the same bits.
        let args = [
            vec![buf(&q), buf(&k), buf(&bias), tiles[0].clone(), tiles[1].clone()],
            vec![out(DType::F32, rows * heads * seq * 2)],
            tail.to_vec(),
        ]
        .concat();
        let alone = launch(&format!("dpo_flash_stats_d{d}_bf16"), grid_q, (128, 1), &args);
        assert!(alone[5] == stats, "{}: differ from the forward's", what("statistics alone"));
        // rowsum(dO * O), which the two kernels below read, then the backward, with O and dO as
        // the forward and the caller lay them out and with their heads merged ([rows, seq,
        // heads, d], as the manual backward keeps O and gets dO): the same values.
        let n = rows * heads * seq;
        let o_heads = tensor(&o, DType::BF16, &[rows, heads, seq, d]);
        let want_dvec = (o_heads.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?.sum(3)?.flatten_all()?;
        let (o_merged, dy_merged) =
            (o_heads.transpose(1, 2)?.contiguous()?, dy.transpose(1, 2)?.contiguous()?);
        let (wq, wk, wv) = ops::attention_backward(&q, &k, &v, &bias, scale, &dy, None)?;
        let mut grads: Vec<Vec<Vec<u8>>> = Vec::new();
        // (Each kernel reads O and dO through separate strides: the two pairs cover both layouts
        // of each. Under ThreadSanitizer, where a backward costs about 20 seconds and a race does
        // not depend on the strides, the merged pair runs for the first case only.)
        let pairs = [((&o_heads, plain), (&dy, plain)), ((&o_merged, merged), (&dy_merged, merged))];
        let layouts = if thread_sanitized() && case > 0 { 1 } else { 2 };
        for ((o, o_strides), (dy, d_strides)) in pairs.into_iter().take(layouts) {
            let args = [
                vec![
                    buf(o),
                    buf(dy),
                    out(DType::F32, n),
                    Arg::I64(n as i64),
                    Arg::I32(d as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(seq as i32),
                ],
                strides(o_strides),
                strides(d_strides),
            ]
            .concat();
            let dvec = launch("dpo_flash_bwd_dot_bf16", elementwise_cfg(n * d / 8).0, (256, 1), &args);
            assert_close(&tensor(&dvec[2], DType::F32, &[n]), &want_dvec, 1e-6, &what("rowsum(dO * O)"));
            let common =
                [inputs.to_vec(), vec![buf(dy), Arg::Buf(stats.clone()), Arg::Buf(dvec[2].clone())]].concat();
            // dK and dV per query head (f32), then summed over each KV head's group.
            let args = [
                common.to_vec(),
                vec![out(DType::F32, n * d), out(DType::F32, n * d)],
                strides(d_strides),
                tail.to_vec(),
            ]
            .concat();
            let partial = launch(&format!("dpo_flash_bwd_dkdv_d{d}_bf16"), grid_q, (128, 1), &args);
            let kvn = rows * kv * seq * d;
            let args = [
                Arg::Buf(partial[9].clone()),
                Arg::Buf(partial[10].clone()),
                out(DType::BF16, kvn),
                out(DType::BF16, kvn),
                Arg::I64(kvn as i64),
                Arg::I64((seq * d) as i64),
                Arg::I32((heads / kv) as i32),
            ];
            let dkdv = launch("dpo_flash_bwd_group_bf16", elementwise_cfg(kvn).0, (256, 1), &args);
            let args =
                [common.to_vec(), vec![out(DType::BF16, n * d)], strides(d_strides), tail.to_vec()].concat();
            let dq = launch(&format!("dpo_flash_bwd_dq_d{d}_bf16"), grid_q, (128, 1), &args);
            assert_close(&tensor(&dq[9], DType::BF16, &[rows, heads, seq, d]), &wq, 2e-2, &what("dq"));
            assert_close(&tensor(&dkdv[2], DType::BF16, &[rows, kv, seq, d]), &wk, 2e-2, &what("dk"));
            assert_close(&tensor(&dkdv[3], DType::BF16, &[rows, kv, seq, d]), &wv, 2e-2, &what("dv"));
            grads.push(vec![dq[9].clone(), dkdv[2].clone(), dkdv[3].clone()]);
        }
        // The layouts change where the kernels read, not what they compute: the same bits.
        assert!(
            grads.iter().all(|g| *g == grads[0]),
            "{}: the gradients depend on the layouts",
            what("backward")
        );
    }
    assert!(classes.iter().all(|&n| n > 0), "tiles skipped, open and mixed: {classes:?}");
    Ok(())
}

/// Rows by index and their backward: repeated ids (summed in position order), a skipped id,
/// rows never picked (zero, or untouched when the backward adds to what the output holds), a row
/// wider than a block, and an id at more positions than the kernel lists at once
/// (`SCATTER_LIST`, 256), across two ballots of 32 positions that it ends in.
#[test]
fn gather_and_scatter_rows() -> Result<()> {
    // Id 1 at 262 of 333 positions; 0, 2 (skipped) and 3 at multiples of 11, 13 and 17.
    let many: Vec<u32> = (0..333u32)
        .map(|i| [11, 13, 17].iter().position(|&m| i % m == 0).map_or(1, |k| [0, 2, 3][k]))
        .collect();
    let few = |vocab: u32| vec![3u32, 7 % vocab, 3, 0, 9 % vocab, 3, 2, 0];
    for (vocab, h, ids) in [(11, 40, few(11)), (5, 1100, few(5)), (4, 8, many)] {
        let ids = Tensor::new(ids.as_slice(), &CPU)?;
        let n = ids.dim(0)?;
        for dt in dtypes() {
            let w = candle_core::Var::from_tensor(&randn(&[vocab, h], 1, 1.0).to_dtype(dt)?)?;
            let y = ops::gather_rows(&w, &ids, Some(2))?;
            let dy = randn(&[n, h], 2, 1.0).to_dtype(dt)?;
            let want_dw = (&y * &dy)?.sum_all()?.backward()?.get(&w).unwrap().clone();
            let (grid, block) = elementwise_cfg(n * h);
            let args = [
                buf(&w),
                buf(&ids),
                out(dt, n * h),
                Arg::I64((n * h) as i64),
                Arg::I32(h as i32),
                Arg::I32(vocab as i32),
            ];
            let got = launch(&format!("dpo_gather_rows_{}", dt.as_str()), grid, block, &args);
            assert_close(&tensor(&got[2], dt, &[n, h]), &y, 0.0, &format!("gather_rows {dt:?} h={h}"));
            // Into zeros, and (the first table only: slow under ThreadSanitizer) added to what the
            // output holds (`accumulate`).
            let acc = randn(&[vocab, h], 3, 1.0).to_dtype(dt)?;
            let mut modes = vec![(0, acc.zeros_like()?, want_dw.clone())];
            if vocab == 11 {
                modes.push((1, acc.clone(), (&acc + &want_dw)?));
            }
            for (accumulate, init, want) in modes {
                let args = [
                    buf(&dy),
                    buf(&ids),
                    buf(&init),
                    Arg::I32(n as i32),
                    Arg::I32(h as i32),
                    Arg::I32(vocab as i32),
                    Arg::I64(2),
                    Arg::I32(accumulate),
                ];
                let got = launch(
                    &format!("dpo_scatter_rows_{}", dt.as_str()),
                    (n, h.div_ceil(1024)),
                    (h.next_multiple_of(32).min(1024), 1),
                    &args,
                );
                // Added in f32 and rounded once, where the reference rounds the sum first.
                let exact = accumulate == 0 || matches!(dt, DType::F32 | DType::F64);
                assert_close(
                    &tensor(&got[2], dt, &[vocab, h]),
                    &want,
                    if exact { 0.0 } else { tol(dt) },
                    &format!("gather_rows backward {dt:?} h={h} accumulate={accumulate}"),
                );
            }
        }
    }
    Ok(())
}

/// RoPE on the heads of a stacked projection's output read in place (strided, with an offset),
/// shared and per-row tables, forward (with the projection's bias added first, and without) and
/// backward (which the trainer gives contiguous). Head
/// size 8 (a thread per entry and its partner), 16 (8 of each: 16-byte vectors, and with a row
/// padded by one element, which breaks their alignment, one at a time).
#[test]
fn rope_strided_heads() -> Result<()> {
    let (r, h, s) = (2, 3, 9);
    for (d, dt, per_row, pad) in [(8, false, 0), (8, true, 0), (16, false, 0), (16, true, 0), (16, true, 1)]
        .into_iter()
        .flat_map(|(d, per_row, pad)| dtypes().into_iter().map(move |dt| (d, dt, per_row, pad)))
    {
        {
            let positions: Vec<f32> = (0..if per_row { r } else { 1 })
                .flat_map(|row| {
                    (0..s).flat_map(move |p| {
                        (0..d).map(move |j| ((row * 5 + p) * (1 + j % (d / 2))) as f32 * 0.1)
                    })
                })
                .collect();
            let shape: &[usize] = if per_row { &[r, s, d] } else { &[s, d] };
            let angles = Tensor::from_vec(positions, shape, &CPU)?;
            let (cos, sin) = (angles.cos()?.to_dtype(dt)?, angles.sin()?.to_dtype(dt)?);
            // x [r, s, (h + 2) d + pad]; the view [r, h, s, d] from head 1.
            let width = (h + 2) * d + pad;
            let x = randn(&[r, s, width], 4, 1.0).to_dtype(dt)?;
            let view =
                x.narrow(2, 0, (h + 2) * d)?.reshape((r, s, h + 2, d))?.transpose(1, 2)?.narrow(1, 1, h)?;
            let n = r * h * s * d;
            let (grid, block) = elementwise_cfg(n.div_ceil(16));
            let run_biased = |input: Vec<u8>, bias: Vec<u8>, strides: [usize; 3], bwd: bool| -> Tensor {
                let args = [
                    Arg::Buf(input),
                    Arg::Buf(bias), // empty: a null pointer, no bias
                    buf(&cos),
                    buf(&sin),
                    out(dt, n),
                    Arg::I64(n as i64),
                    Arg::I32(h as i32),
                    Arg::I32(s as i32),
                    Arg::I32(d as i32),
                    Arg::I64(strides[0] as i64),
                    Arg::I64(strides[1] as i64),
                    Arg::I64(strides[2] as i64),
                    Arg::I32(i32::from(per_row)),
                    Arg::I32(i32::from(bwd)),
                ];
                tensor(
                    &launch(&format!("dpo_rope_{}", dt.as_str()), grid, block, &args)[4],
                    dt,
                    &[r, h, s, d],
                )
            };
            let run =
                |input: Vec<u8>, strides: [usize; 3], bwd: bool| run_biased(input, Vec::new(), strides, bwd);
            // The view starts `d` elements into x (head 1 of row 0, position 0).
            let strided = bytes(&x)[d * dt.size_in_bytes()..].to_vec();
            let strides = [s * width, d, width];
            let what = format!("rope {dt:?} d={d} per_row={per_row} pad={pad}");
            assert_close(
                &run(strided.clone(), strides, false),
                &ops::rope(&view, &cos, &sin)?,
                tol(dt),
                &what,
            );
            // A projection's bias folded in (`ops::rope_with_bias`): RoPE of the view plus a
            // row per head, rounded to dt as the add's output is.
            let bias = randn(&[h * d], 5, 1.0).to_dtype(dt)?;
            let biased = view.broadcast_add(&bias.reshape((h, 1, d))?)?;
            let want = ops::rope(&biased, &cos, &sin)?;
            assert_close(&run_biased(strided.clone(), bytes(&bias), strides, false), &want, tol(dt), &what);
            assert_close(&ops::rope_with_bias(&view, &bias, &cos, &sin)?, &want, 0.0, &what);
            let want_bwd = ops::rope_backward(&view, &cos, &sin)?;
            assert_close(
                &run(strided, strides, true),
                &want_bwd,
                tol(dt),
                &format!("{what} backward, strided"),
            );
            let dense = bytes(&view.contiguous()?);
            assert_close(
                &run(dense, [h * s * d, s * d, d], true),
                &want_bwd,
                tol(dt),
                &format!("{what} backward"),
            );
        }
    }
    Ok(())
}

/// Head sizes 8 (a thread per entry and its partner) and 16 (8 of each, 16-byte vectors).
#[test]
fn rope_backward_merged_into_stacked_layout() -> Result<()> {
    let (r, hq, hk, s) = (2, 3, 2, 7);
    for (d, dt) in [8, 16].into_iter().flat_map(|d| dtypes().into_iter().map(move |dt| (d, dt))) {
        for per_row in [false, true] {
            let shape: &[usize] = if per_row { &[r, s, d] } else { &[s, d] };
            let angles = (randn(shape, 9, 1.0) * 3.0)?;
            let (cos, sin) = (angles.cos()?.to_dtype(dt)?, angles.sin()?.to_dtype(dt)?);
            let dq = randn(&[r, hq, s, d], 6, 1.0).to_dtype(dt)?;
            let dk = randn(&[r, hk, s, d], 7, 1.0).to_dtype(dt)?;
            let dv = randn(&[r, hk, s, d], 8, 1.0).to_dtype(dt)?;
            let want = ops::rope_backward_merged(&dq, &dk, &dv, &cos, &sin)?;
            let n = r * s * (hq + 2 * hk) * d;
            let (grid, block) = elementwise_cfg(n.div_ceil(16));
            let args = [
                buf(&dq),
                buf(&dk),
                buf(&dv),
                buf(&cos),
                buf(&sin),
                out(dt, n),
                Arg::I64(n as i64),
                Arg::I32(hq as i32),
                Arg::I32(hk as i32),
                Arg::I32(s as i32),
                Arg::I32(d as i32),
                Arg::I32(i32::from(per_row)),
            ];
            let got = launch(&format!("dpo_rope_bwd_merged_{}", dt.as_str()), grid, block, &args);
            let what = format!("rope_backward_merged {dt:?} d={d} per_row={per_row}");
            assert_close(&tensor(&got[5], dt, want.dims()), &want, tol(dt), &what);
        }
    }
    Ok(())
}

/// The RMSNorm backward with the residual gradient: x, w, res in f32 with dy bf16 or f16 (the
/// manual backward's), and all in one dtype; dw over several row groups, a width not a multiple
/// of 32.
#[test]
fn rms_norm_backward_add() -> Result<()> {
    let (rows, dim, eps) = (150, 40, 1e-6);
    let mixed = [(DType::F32, DType::BF16), (DType::F32, DType::F16)];
    for (xt, dyt) in mixed.into_iter().chain(dtypes().into_iter().map(|dt| (dt, dt))) {
        let x = (randn(&[rows, dim], 12, 1.0) * 3.0)?.to_dtype(xt)?;
        let w = (randn(&[dim], 13, 0.1) + 1.0)?.to_dtype(xt)?;
        let dy = randn(&[rows, dim], 14, 1.0).to_dtype(dyt)?;
        let res = randn(&[rows, dim], 15, 1.0).to_dtype(xt)?;
        let (want_dx, want_dw) = ops::rms_norm_backward_add(&x, &w, eps, &dy, &res)?;
        let name = |k: &str| match xt == dyt {
            true => format!("{k}_{}", xt.as_str()),
            false => format!("{k}_f32_from_{}", dyt.as_str()),
        };
        let n = rows * dim;
        let (grid, block) = rows_cfg(rows, dim);
        // The mixed kernels also write dx in dy's dtype (`out_lo`).
        let mut dx_args = vec![buf(&x), buf(&w), buf(&dy), buf(&res), out(xt, n + dim)];
        if xt != dyt {
            dx_args.push(out(dyt, n));
        }
        dx_args.extend([out(acc(xt), rows), Arg::I32(dim as i32), Arg::F64(eps)]);
        let got = launch(&name("dpo_rmsnorm_bwd_dx_add"), grid, block, &dx_args);
        let what = format!("rms_norm_backward_add x {xt:?} dy {dyt:?}");
        let dx = tensor(&got[4][..n * xt.size_in_bytes()], xt, &[rows, dim]);
        assert_close(&dx, &want_dx, tol(xt), &format!("{what} dx"));
        if xt != dyt {
            // Bit for bit the kernel's own dx, cast.
            assert_close(
                &tensor(&got[5], dyt, &[rows, dim]),
                &dx.to_dtype(dyt)?,
                0.0,
                &format!("{what} dx lo"),
            );
        }
        let rs = got[got.len() - 1].clone();
        let groups = rows.div_ceil(8 * 16).clamp(1, 1024);
        let part_args = [
            buf(&x),
            buf(&dy),
            Arg::Buf(rs),
            out(acc(xt), groups * dim),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
        ];
        let partial =
            launch(&name("dpo_rmsnorm_bwd_dw_partial"), (dim.div_ceil(32), groups), (32, 8), &part_args);
        let final_args = [
            Arg::Buf(partial[3].clone()),
            Arg::Buf(got[4].clone()),
            Arg::I64(n as i64),
            Arg::I32(groups as i32),
            Arg::I32(dim as i32),
        ];
        let packed =
            launch(&format!("dpo_rmsnorm_bwd_dw_final_{}", xt.as_str()), (1, 1), (256, 1), &final_args);
        let dw = tensor(&packed[1][n * xt.size_in_bytes()..], xt, &[dim]);
        assert_close(&dw, &want_dw, tol(xt), &format!("{what} dw"));
    }
    Ok(())
}

/// The norm's forward, and its backward without a residual gradient (the autograd path's; the
/// same device function as with one, given a null residual).
#[test]
fn rms_norm_forward_and_backward_dx() -> Result<()> {
    let (rows, dim, eps) = (9, 40, 1e-6);
    for dt in dtypes() {
        let x = (randn(&[rows, dim], 12, 1.0) * 3.0)?.to_dtype(dt)?;
        let w = (randn(&[dim], 13, 0.1) + 1.0)?.to_dtype(dt)?;
        let dy = randn(&[rows, dim], 14, 1.0).to_dtype(dt)?;
        let (grid, block) = rows_cfg(rows, dim);
        let args = [buf(&x), buf(&w), out(dt, rows * dim), Arg::I32(dim as i32), Arg::F64(eps)];
        let got = launch(&format!("dpo_rmsnorm_fwd_{}", dt.as_str()), grid, block, &args);
        let want = ops::rms_norm(&x, &w, eps)?;
        assert_close(&tensor(&got[2], dt, &[rows, dim]), &want, tol(dt), &format!("rms_norm {dt:?}"));
        let (want, _) = ops::rms_norm_backward(&x, &w, eps, &dy)?;
        let args = [
            buf(&x),
            buf(&w),
            buf(&dy),
            out(dt, rows * dim + dim),
            out(acc(dt), rows),
            Arg::I32(dim as i32),
            Arg::F64(eps),
        ];
        let got = launch(&format!("dpo_rmsnorm_bwd_dx_{}", dt.as_str()), grid, block, &args);
        let dx = tensor(&got[3][..rows * dim * dt.size_in_bytes()], dt, &[rows, dim]);
        assert_close(&dx, &want, tol(dt), &format!("rms_norm_backward dx {dt:?}"));
    }
    Ok(())
}

/// The mixed-precision forward pair: the norm from f32 into bf16 or f16, the residual add back
/// (8 elements a thread, as `src/ops/cuda.rs` launches it; 3,552 of them, and 165, which leave
/// a tail of 5); and the add with the norm of its sum in one pass.
#[test]
fn rms_norm_to_and_add_cast() -> Result<()> {
    for ((rows, dim), dt) in [(37, 96), (5, 33)].into_iter().flat_map(|s| [(s, DType::BF16), (s, DType::F16)])
    {
        let eps = 1e-6;
        let x = (randn(&[rows, dim], 2, 1.0) * 5.0)?;
        let w = (randn(&[dim], 3, 0.1) + 1.0)?;
        let n = rows * dim;
        let (grid, block) = rows_cfg(rows, dim);
        let args = [buf(&x), buf(&w), out(dt, n), Arg::I32(dim as i32), Arg::F64(eps)];
        let got = launch(&format!("dpo_rmsnorm_fwd_f32_to_{}", dt.as_str()), grid, block, &args);
        let want = ops::rms_norm_to(&x, &w, eps, dt)?;
        assert_close(&tensor(&got[2], dt, &[rows, dim]), &want, tol(dt), &format!("rms_norm_to {dt:?}"));
        let y = randn(&[rows, dim], 4, 1.0).to_dtype(dt)?;
        let (grid, block) = elementwise_cfg(n.div_ceil(8));
        let args = [buf(&x), buf(&y), out(DType::F32, n), Arg::I64(n as i64)];
        let got = launch(&format!("dpo_add_cast_{}", dt.as_str()), grid, block, &args);
        let want = ops::add_cast(&x, &y)?;
        let sum = tensor(&got[2], DType::F32, &[rows, dim]);
        assert_close(&sum, &want, 0.0, &format!("add_cast {dt:?}"));
        // Both in one pass: the sum, and the norm of it, bit for bit the two kernels'.
        let (grid, block) = rows_cfg(rows, dim);
        let args = [buf(&sum), buf(&w), out(dt, n), Arg::I32(dim as i32), Arg::F64(eps)];
        let normed = launch(&format!("dpo_rmsnorm_fwd_f32_to_{}", dt.as_str()), grid, block, &args);
        let args =
            [buf(&x), buf(&y), buf(&w), out(DType::F32, n), out(dt, n), Arg::I32(dim as i32), Arg::F64(eps)];
        let got = launch(&format!("dpo_add_rmsnorm_fwd_f32_to_{}", dt.as_str()), grid, block, &args);
        let what = format!("add + rms_norm_to {dt:?} [{rows}, {dim}]");
        assert_close(&tensor(&got[3], DType::F32, &[rows, dim]), &sum, 0.0, &format!("{what}: the sum"));
        assert_close(&tensor(&got[4], dt, &[rows, dim]), &tensor(&normed[2], dt, &[rows, dim]), 0.0, &what);
    }
    Ok(())
}

/// f32 tensors cast into one bf16 or f16 buffer, a part per `blockIdx.y` (`ops::cast_cat`'s
/// kernel): 100 elements from the start (12 vectors and a tail of 4), 37 from element 100 (not
/// 16-byte aligned: element by element), 64 from 144 (whole vectors); the 7 elements between the
/// second and third left as they were, and the 13 unused part slots null.
#[test]
fn cast_parts() -> Result<()> {
    for dt in [DType::BF16, DType::F16] {
        let parts = [(100, 0), (37, 100), (64, 144)];
        let src: Vec<Tensor> = parts.iter().map(|&(n, off)| randn(&[n], 20 + off as u64, 3.0)).collect();
        let len = 144 + 64;
        let mut args = vec![out(dt, len)];
        args.extend(src.iter().map(buf));
        args.extend((parts.len()..16).map(|_| Arg::Buf(Vec::new())));
        args.extend((0..16).map(|i| Arg::I64(parts.get(i).map_or(0, |p| p.1 as i64))));
        args.extend((0..16).map(|i| Arg::I64(parts.get(i).map_or(0, |p| p.0 as i64))));
        let ((gx, _), block) = elementwise_cfg(100usize.div_ceil(8));
        let got = launch(&format!("dpo_cast_parts_f32_to_{}", dt.as_str()), (gx, parts.len()), block, &args);
        let size = dt.size_in_bytes();
        for (&(n, off), x) in parts.iter().zip(&src) {
            let part = tensor(&got[0][off * size..(off + n) * size], dt, &[n]);
            assert_close(&part, &x.to_dtype(dt)?, 0.0, &format!("cast_parts {dt:?} at {off}"));
        }
        assert!(
            got[0][137 * size..144 * size].iter().all(|&b| b == 0xff),
            "cast_parts {dt:?}: the gap written"
        );
    }
    Ok(())
}

/// The SiLU gate, forward and backward (`[d gate; d up]` in one buffer, and with `with_y` the
/// forward's value after them), with fewer threads than
/// 8-element vectors: 1,500 elements (a tail of 4; the backward's second half 16-byte aligned in
/// f32 and f64 only, so read element by element in bf16 and f16) and 10,240.
#[test]
fn silu_mul() -> Result<()> {
    for ((r, c), dt) in
        [(5, 300), (16, 640)].into_iter().flat_map(|s| dtypes().into_iter().map(move |dt| (s, dt)))
    {
        let n = r * c;
        let g = randn(&[r, c], 5, 3.0).to_dtype(dt)?;
        let u = randn(&[r, c], 6, 1.0).to_dtype(dt)?;
        let dy = randn(&[r, c], 7, 1.0).to_dtype(dt)?;
        let ((_, gy), block) = elementwise_cfg(n.div_ceil(8));
        let grid = (2, gy); // fewer threads than vectors (at 10,240): the grid-stride loops go round
        let args = [buf(&g), buf(&u), out(dt, n), Arg::I64(n as i64)];
        let got = launch(&format!("dpo_silu_mul_fwd_{}", dt.as_str()), grid, block, &args);
        let y_kernel = tensor(&got[2], dt, &[r, c]);
        let want = ops::silu_mul(&g, &u)?;
        assert_close(&y_kernel, &want, tol(dt), &format!("silu_mul {dt:?} [{r}, {c}]"));
        let (dg, du, y) = ops::silu_mul_backward_and_value(&g, &u, &dy)?;
        let want_grads = Tensor::cat(&[&dg, &du], 0)?;
        for with_y in [0, 1] {
            let parts = 2 + with_y as usize;
            let args = [buf(&g), buf(&u), buf(&dy), out(dt, parts * n), Arg::I64(n as i64), Arg::I32(with_y)];
            let got = launch(&format!("dpo_silu_mul_bwd_{}", dt.as_str()), grid, block, &args);
            let got = tensor(&got[3], dt, &[parts * r, c]);
            let what = format!("silu_mul backward {dt:?} [{r}, {c}], with_y {with_y}");
            assert_close(&got.narrow(0, 0, 2 * r)?, &want_grads, tol(dt), &what);
            if with_y == 1 {
                // The forward kernel's value, bit for bit; and the CPU's (the forward's, bit for bit).
                assert_close(&got.narrow(0, 2 * r, r)?, &y_kernel, 0.0, &what);
                assert_close(&y, &want, 0.0, &format!("{what}: the CPU's y"));
            }
        }
    }
    Ok(())
}

/// The optimizer's kernels. The sum of squares of three parts (a partial per block and part;
/// its second warp reduction runs in one warp of the block only); the clipping factor from the
/// partials, added by a block smaller than their count; AdamW in place on two parts, each
/// gradient scaled by that factor, against its formula in tensor ops (as
/// `crates/dpo-trainer/src/optim.rs` writes it); and nothing written when the factor is NaN.
#[test]
fn clip_and_adamw() -> Result<()> {
    // 2,999 elements: 374 vectors of 8 and a tail of 7; two blocks of 256 threads take 512
    // vectors a round, one block 256 (its loop goes round). 10: a tail only. 0: an empty part.
    let sizes = [2999, 10, 0];
    let xs: Vec<Tensor> = sizes.iter().enumerate().map(|(i, &n)| randn(&[n], 30 + i as u64, 1.0)).collect();
    let want_sq: f64 = xs
        .iter()
        .map(|x| x.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>())
        .sum::<Result<f64>>()?;
    // A launch's 16 part slots: the parts' buffers, then null ones; the counts, then zeros.
    let slots = |bufs: Vec<Arg>| -> Vec<Arg> {
        let used = bufs.len();
        bufs.into_iter().chain((used..16).map(|_| Arg::Buf(Vec::new()))).collect()
    };
    let counts = |ns: &[usize]| -> Vec<Arg> {
        (0..16).map(|i| Arg::I64(ns.get(i).map_or(0, |&n| n as i64))).collect()
    };
    let mut partials = Vec::new();
    for blocks in [1, 2] {
        let mut args = vec![out(DType::F64, blocks * sizes.len())];
        args.extend(slots(xs.iter().map(buf).collect()));
        args.extend(counts(&sizes));
        let got = launch("dpo_sumsq_parts_f32", (blocks, sizes.len()), (256, 1), &args);
        let partial = tensor(&got[0], DType::F64, &[blocks * sizes.len()]);
        let what = format!("sum of squares, {blocks} blocks a part");
        assert_close(&partial.sum_all()?, &Tensor::new(want_sq, &CPU)?, 1e-12, &what);
        partials = partial.to_vec1::<f64>()?;
    }
    // The factor: 96 partials (the 6 above and 90 zeros) added by 64 threads.
    partials.resize(96, 0.0);
    let clip = |partials: &[f64], max_norm: f64| -> Result<Vec<f64>> {
        let args = [
            buf(&Tensor::new(partials, &CPU)?),
            Arg::I64(partials.len() as i64),
            Arg::F64(max_norm),
            out(DType::F64, 2),
        ];
        tensor(&launch("dpo_clip_f64", (1, 1), (64, 1), &args)[1], DType::F64, &[2]).to_vec1::<f64>()
    };
    let norm = want_sq.sqrt();
    let got = clip(&partials, 0.5 * norm)?;
    assert!((got[0] - norm).abs() <= 1e-12 * norm, "norm {} vs {norm}", got[0]);
    assert_eq!(got[1], 0.5 * norm / (got[0] + 1e-6), "the clipping factor");
    assert_eq!(clip(&partials, 0.0)?[1], 1.0, "no clipping: factor 1");
    assert_eq!(clip(&partials, 2.0 * norm)?[1], 1.0, "a norm under max_norm: factor 1");
    partials[70] = f64::INFINITY;
    let bad = clip(&partials, 0.5 * norm)?;
    assert!(bad[0].is_infinite() && bad[1].is_nan(), "a non-finite norm: {bad:?}");

    // AdamW: 3,000 and 13 elements (a tail of 5), decaying and not.
    let (b1, b2, eps, step, bc2) = (0.9f32, 0.999f32, 1e-8f32, 1e-3f32, 0.0447f32);
    let sizes = [3000, 13];
    let decay = [0.999f32, 1.0];
    let state = |i: usize| -> Result<[Tensor; 4]> {
        let (n, s) = (sizes[i], 8 + 4 * i as u64);
        Ok([
            randn(&[n], s, 1.0),
            (randn(&[n], s + 1, 1.0) * 0.01)?,
            (randn(&[n], s + 2, 1.0).sqr()? * 1e-4)?,
            randn(&[n], s + 3, 1.0),
        ])
    };
    let states = [state(0)?, state(1)?];
    let run = |factor: f64| -> Vec<Vec<u8>> {
        let mut args = vec![buf(&Tensor::new(&[1.0f64, factor], &CPU).unwrap())];
        args.extend([b1, 1.0 - b1, b2, 1.0 - b2, eps, step, bc2].map(Arg::F32));
        for k in 0..4 {
            args.extend(slots(states.iter().map(|s| buf(&s[k])).collect()));
        }
        args.extend(counts(&sizes));
        args.extend((0..16).map(|i| Arg::F32(decay.get(i).copied().unwrap_or(1.0))));
        let (grid, block) = elementwise_cfg(3000usize.div_ceil(8));
        launch("dpo_adamw_parts_f32", (grid.0, 2), block, &args)
    };
    let factor = 0.75f32;
    let got = run(factor as f64);
    for (i, [p, m, v, g]) in states.iter().enumerate() {
        let gs = (g * factor as f64)?;
        let m2 = ((m * b1 as f64)? + (&gs * (1.0 - b1 as f64))?)?;
        let v2 = ((v * b2 as f64)? + (gs.sqr()? * (1.0 - b2 as f64))?)?;
        let p2 =
            ((p * decay[i] as f64)? - ((&m2 / ((v2.sqrt()? / bc2 as f64)? + eps as f64)?)? * step as f64)?)?;
        // Buffers come back in argument order: the factor, then p, m, v, g of 16 slots each.
        for (k, (want, what)) in [(&p2, "p"), (&m2, "m"), (&v2, "v")].into_iter().enumerate() {
            let got = tensor(&got[1 + 16 * k + i], DType::F32, &[sizes[i]]);
            assert_close(&got, want, 1e-6, &format!("adamw {what} of part {i}"));
        }
    }
    let untouched = run(f64::NAN);
    for (i, s) in states.iter().enumerate() {
        for (k, t) in s.iter().take(3).enumerate() {
            assert!(untouched[1 + 16 * k + i] == bytes(t), "a NaN factor wrote to part {i}");
        }
    }
    Ok(())
}
