#!/usr/bin/env bash
# The `cuda` feature on a machine without a GPU or a CUDA toolkit: runs a command with the
# stand-in toolchain of crates/dpo-model/tests/cuda-emu/fake/ (built into target/cuda-emu/): an
# nvcc that makes no code, and an emulated libcuda.so that runs kernels/dpo_ops.cu on the CPU
# (candle's own kernels and cuBLAS it does not have). Needs a C++20 compiler ($CXX, else c++).
#
#   scripts/cuda-emu.sh              # the CUDA launchers against the CPU kernels
#                                    # (crates/dpo-model/src/ops/cuda_tests.rs), the trainer's fused
#                                    # AdamW against its CPU steps (crates/dpo-trainer/src/optim.rs),
#                                    # and the binary's dry runs (crates/dpo-cli/tests/cuda_dry.rs);
#                                    # CI runs it
#   scripts/cuda-emu.sh cargo clippy --workspace --all-targets --features dpo-train/cuda
#
# On a machine with a GPU, `cargo test -p dpo-model -p dpo-trainer -p dpo-train --features
# dpo-train/cuda --lib --test cuda_dry -- ops::cuda_tests optim::cuda_tests cuda_dry` runs the same
# tests on it (the dry runs train there).
set -euo pipefail
cd "$(dirname "$0")/.."
TC="$PWD/target/cuda-emu"
bash crates/dpo-model/tests/cuda-emu/fake/build.sh "$TC" >&2
unset CUDA_HOME CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR
export NVCC="$TC/bin/nvcc" CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$TC/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$TC/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_EMU="$TC"  # tells crates/dpo-cli/tests/cuda_dry.rs the driver is the emulated one
if [ $# -eq 0 ]; then
    set -- cargo test --locked -p dpo-model -p dpo-trainer -p dpo-train --features dpo-train/cuda --lib \
        --test cuda_dry -- ops::cuda_tests optim::cuda_tests cuda_dry
fi
exec "$@"
