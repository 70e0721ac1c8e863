//! With the `cuda` feature, compiles `kernels/dpo_ops.cu` to PTX in `$OUT_DIR/dpo_ops.ptx`
//! (embedded by `src/ops/cuda.rs`). nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on
//! PATH; the virtual architecture is `compute_$CUDA_COMPUTE_CAP` (default 90). The CPU build
//! needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/dpo_ops.cu");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "CARGO_FEATURE_CUDA"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin").join("nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("dpo_ops.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("kernels/dpo_ops.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {} (set NVCC or CUDA_HOME): {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed to compile kernels/dpo_ops.cu ({status})");
}
