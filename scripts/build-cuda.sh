#!/usr/bin/env bash
# Builds the CUDA binary (target-cuda/release/dpo-train) on a machine without a GPU or a CUDA
# install, following ../shared/gpu/RECIPE.md: a CUDA 13.0 toolkit from PyPI wheels in .cuda13/
# (made on first use), nvcc 13.0, cudarc pinned to the CUDA 13.0 API (crates/dpo-cli/Cargo.toml).
#
#   scripts/build-cuda.sh            # H100/H200 (sm_90)
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # A100; 89 for L4/RTX 4090, 120 for Blackwell...
#
# A separate target dir keeps the CPU build's cache intact (features change candle-core).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .cuda13/root/bin/nvcc ] || bash scripts/setup-cuda13-pypi.sh .cuda13
export CUDA_HOME="$PWD/.cuda13/root"
export NVCC="$CUDA_HOME/bin/nvcc"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
cargo build --release --features cuda -p dpo-train "$@"
echo "built $CARGO_TARGET_DIR/release/dpo-train (sm_$CUDA_COMPUTE_CAP)"
# Local memory in our kernels, which the emulator cannot show: ptxas on the PTX the binary
# carries, for this GPU. A large stack frame is an array indexed at run time (nvcc builds it in
# every thread's local memory: a kernel with a parameter array indexed by blockIdx.y copied 704
# bytes a thread), a small one spilled registers (the flash backward's dQ kernel at head size 64
# spilled 16 bytes when its dO loads were interleaved with Q's). On sm_90, which the kernels are
# tuned for, fail at 16 bytes (the two flash backward kernels at head size 32 keep 8: 4-8 bytes
# of spills under __launch_bounds__); on another target at 64 (an indexed array, not spills).
limit=$([ "$CUDA_COMPUTE_CAP" = 90 ] && echo 16 || echo 64)
ptx=$(ls -t "$CARGO_TARGET_DIR"/release/build/dpo-model-*/out/dpo_ops.ptx | head -1)
"$CUDA_HOME/bin/ptxas" -arch="sm_$CUDA_COMPUTE_CAP" -v "$ptx" -o /dev/null 2>&1 | awk '
    /Compiling entry function/ { split($0, q, "'"'"'"); kernel = q[2] }
    /bytes stack frame/ { if ($1 + 0 >= '"$limit"') { print "local memory: " kernel ": " $0; bad = 1 } }
    END { exit bad }' || { echo "a kernel uses local memory (above)" >&2; exit 1; }
echo "no kernel of dpo_ops uses $limit bytes or more of local memory"
# WITH_TESTS=1: also dpo-model's unit tests, to run the launcher tests (ops::cuda_tests) on a GPU.
if [ -n "${WITH_TESTS:-}" ]; then
  exe=$(cargo test --release --features cuda -p dpo-model --lib --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
  cp "$exe" "$CARGO_TARGET_DIR/release/dpo-model-tests"
  echo "built $CARGO_TARGET_DIR/release/dpo-model-tests (from $exe)"
fi
