#!/usr/bin/env bash
# A dry run of dpo-train's CUDA paths on a machine without a GPU, before spending device time:
# builds the `cuda` binary with the stand-in toolchain (scripts/cuda-emu.sh) and runs, on the
# emulated driver with CUDA_EMU_DRY set, `doctor`, then 2 bf16 steps once per lever and setting of
# scripts/bench-gpu.sh on the bundled default, resume, and the levers again on the benchmark's
# own 0.5B workload (assets from scripts/bench_assets.py; needs .venv).
# Kernels are checked (our launchers' argument lists, pointers into device memory, launch shapes)
# but not run: every number is zero. What it catches is what stops a run on the host side:
# candle refusing a dtype or layout on CUDA, a CUDA-only branch that errors or panics, a missing
# dpo_ops kernel, a debug assertion (the binary is a debug build). A run passes when it exits 0,
# and reports the peak of live device memory (BENCHMARKS.md: 1.0-1.9 GiB under nvidia-smi's).
#
#   scripts/cuda-dry-run.sh [NAME...]     # all runs, or the named ones
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$PWD/target/cuda-emu/build"
bash scripts/cuda-emu.sh cargo build --locked -p dpo-train --features cuda || exit 1
BIN="$CARGO_TARGET_DIR/debug/dpo-train"
RUNS="$PWD/target/cuda-emu/runs"
rm -rf "$RUNS" && mkdir -p "$RUNS"
# The startup kernel check would compare zeros with zeros; `doctor` below runs it instead.
export CUDA_EMU_DRY=1 DPO_TRAIN_SKIP_KERNEL_CHECK=1 LD_LIBRARY_PATH="$PWD/target/cuda-emu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
failed=()
run() {
    local name=$1; shift
    if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $name " ]]; then return; fi
    local log="$RUNS/$name.log"
    timeout 900 "$@" > "$log" 2>&1
    local rc=$?
    # doctor's verdict compares zeros with zeros (0/0 is NaN): it passes when every check ran.
    [ "$name" = doctor ] && grep -q "^RESULT:" "$log" && rc=0
    if [ $rc -eq 0 ]; then
        echo "ok      $name  ($(grep -o 'peak device memory .*' "$log" | tail -1))"
    else
        echo "FAILED  $name (rc $rc; $log):"; grep -v '^\s*$' "$log" | tail -6 | sed 's/^/        /'
        failed+=("$name")
    fi
}
train() {
    local name=$1; shift
    run "$name" env "${ENV[@]}" "$BIN" --config configs/default.toml --set device=\"cuda\" --set dtype=\"bf16\" \
        --set max_steps=2 --set eval_steps=2 --set logging_steps=1 --set progress_bar=false \
        --set overwrite_output_dir=true --set output_dir=\"$RUNS/$name\" "$@"
}
ONLY=("$@")
ENV=()
run doctor "$BIN" doctor --device cuda
train plain
train f32 --set dtype=\"f32\"
train manual --set manual_backward=true
train share --set prefix_sharing=true
train share-manual --set prefix_sharing=true --set manual_backward=true
train precompute-share --set prefix_sharing=true --set precompute_ref_log_probs=true
train precompute-share-manual --set prefix_sharing=true --set precompute_ref_log_probs=true --set manual_backward=true
train share-manual-bf16head --set prefix_sharing=true --set manual_backward=true --set lm_head_f32=false
train share-gc-manual --set prefix_sharing=true --set gradient_checkpointing=true --set manual_backward=true
train share-gc --set prefix_sharing=true --set gradient_checkpointing=true
train keep-attn --set recompute_attention=false
train share-manual-keep-attn --set prefix_sharing=true --set manual_backward=true --set recompute_attention=false
train unfused --set fused_ops=false
ENV=(DPO_TRAIN_CUDA_POOL=default); train pool-default
ENV=(DPO_TRAIN_CUDA_EVENTS=1); train events
ENV=(DPO_TRAIN_STACK_PROJECTIONS=0); train manual-unstacked --set manual_backward=true
ENV=(DPO_TRAIN_PROFILE=ops); train profile-ops --set manual_backward=true
ENV=(DPO_TRAIN_PROFILE=1); train profile
ENV=(DPO_TRAIN_FLASH_ATTENTION=1); train flash
ENV=()
# Resume from the checkpoint of a 2-step run (saved every step) for 2 more steps.
train resume-first --set save_steps=1
run resume-then "$BIN" --config configs/default.toml --set device=\"cuda\" --set dtype=\"bf16\" \
    --set max_steps=4 --set eval_steps=2 --set logging_steps=1 --set progress_bar=false --set save_steps=1 \
    --set output_dir=\"$RUNS/resume-first\" --resume latest --resume-allow-changed
# The GPU benchmark's own workload (Qwen2.5-0.5B shapes, 8 pairs of 256 + 256 tokens), 2 steps
# per lever: its sizes reach the launch limits and chunking of the real runs. The assets need
# .venv (scripts/setup_python.sh); skipped without it.
ASSETS="$PWD/target/cuda-emu/assets"
if [ -x .venv/bin/python ] && { [ -f "$ASSETS/train.jsonl" ] ||
    .venv/bin/python scripts/bench_assets.py "$ASSETS" --preset qwen05b --pairs 24 --prompt 256 --completion 256 >/dev/null; }; then
    bench() {
        local name=$1; shift
        run "$name" env "${ENV[@]}" "$BIN" --config configs/bench-gpu.toml --set model=\"$ASSETS/model\" \
            --set train_file=\"$ASSETS/train.jsonl\" --set output_dir=\"$RUNS/$name\" --set max_steps=2 "$@"
    }
    bench bench-plain
    bench bench-plain-manual --set manual_backward=true
    bench bench-share-manual --set prefix_sharing=true --set manual_backward=true
    bench bench-precompute-share-manual --set prefix_sharing=true --set precompute_ref_log_probs=true \
        --set manual_backward=true
    bench bench-share-manual-bf16head --set prefix_sharing=true --set manual_backward=true --set lm_head_f32=false
    bench bench-share-manual-tf32head --set prefix_sharing=true --set manual_backward=true --set lm_head_bf16_operands=false
    bench bench-share-gc-manual --set prefix_sharing=true --set gradient_checkpointing=true --set manual_backward=true
    bench bench-keep-attn --set recompute_attention=false
    bench bench-share-manual-keep-attn --set prefix_sharing=true --set manual_backward=true --set recompute_attention=false
    bench bench-precompute-share-manual-keep-attn --set prefix_sharing=true --set precompute_ref_log_probs=true \
        --set manual_backward=true --set recompute_attention=false
    ENV=(DPO_TRAIN_STACK_PROJECTIONS=0); bench bench-manual-unstacked --set manual_backward=true; ENV=()
    ENV=(DPO_TRAIN_FLASH_ATTENTION=1); bench bench-share-manual-flash --set prefix_sharing=true --set manual_backward=true
    bench bench-precompute-share-manual-flash --set prefix_sharing=true --set precompute_ref_log_probs=true \
        --set manual_backward=true
    ENV=(DPO_TRAIN_FLASH_ATTENTION=1 DPO_TRAIN_PROFILE=ops); bench bench-profile-flash-ops --set prefix_sharing=true \
        --set manual_backward=true; ENV=()
else
    echo "skipped the benchmark workload (no .venv: scripts/setup_python.sh)"
fi
if [ ${#failed[@]} -gt 0 ]; then echo "dry run: ${#failed[@]} failed: ${failed[*]}"; exit 1; fi
echo "dry run: all passed"
