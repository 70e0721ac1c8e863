#!/usr/bin/env bash
# What one training step of the GPU benchmark launches on CUDA, counted without a GPU: every
# kernel (ours and candle's) with its launches, elements and bytes moved, every cuBLAS GEMM shape
# with its FLOPs, the floor these put under the step on an H100 (spec bandwidth and tensor-core
# peaks; nothing runs faster), and the host's waits for the device and copies across the bus.
# Two dry runs on the emulated driver (scripts/cuda-dry-run.sh; the emulated libcuda's
# CUDA_EMU_CENSUS), 2 and 3 steps of the benchmark's workload, and their difference: one step,
# start-up and the first steps' one-off work left out.
#
#   scripts/cuda-census.sh [--set key=value ...]     # levers as dpo-train --set takes them
#   DPO_TRAIN_FLASH_ATTENTION=1 scripts/cuda-census.sh --set prefix_sharing=true --set manual_backward=true
#   SHAPES=1 scripts/cuda-census.sh ...              # a line per kernel and launch size
#
# Bytes: for candle's kernels, from the kernel's name and element count (a cast reads one dtype and
# writes the other, a binary op reads two operands and writes one, ...); for ours, the allocations
# their pointer arguments point into, each from the lowest such pointer to its end (an upper bound:
# a view counts the rest of its buffer, a broadcast operand read from L2 counts once); for a GEMM,
# its operands and result once each (a lower bound). Needs .venv for the assets (scripts/setup_python.sh), like the dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$PWD/target/cuda-emu/build"
bash scripts/cuda-emu.sh cargo build --locked -q -p dpo-train --features cuda
ASSETS="$PWD/target/cuda-emu/assets"
[ -f "$ASSETS/train.jsonl" ] ||
    .venv/bin/python scripts/bench_assets.py "$ASSETS" --preset qwen05b --pairs 24 --prompt 256 --completion 256 >/dev/null
W="$PWD/target/cuda-emu/census"
rm -rf "$W" && mkdir -p "$W"
export CUDA_EMU_DRY=1 DPO_TRAIN_SKIP_KERNEL_CHECK=1 LD_LIBRARY_PATH="$PWD/target/cuda-emu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -n "${SHAPES:-}" ] && export CUDA_EMU_CENSUS_SHAPES=1
for steps in 2 3; do
    CUDA_EMU_CENSUS="$W/steps$steps.tsv" "$CARGO_TARGET_DIR/debug/dpo-train" --config configs/bench-gpu.toml \
        --set model=\"$ASSETS/model\" --set train_file=\"$ASSETS/train.jsonl\" --set output_dir=\"$W/out$steps\" \
        --set max_steps=$steps "$@" > "$W/steps$steps.log" 2>&1 || { tail -5 "$W/steps$steps.log"; exit 1; }
done
python3 - "$W/steps2.tsv" "$W/steps3.tsv" <<'PY'
import csv, re, sys
def load(path):
    return {r["name"]: {k: float(v) for k, v in r.items() if k != "name"} for r in csv.DictReader(open(path), delimiter="\t")}
before, after = load(sys.argv[1]), load(sys.argv[2])
zero = dict(launches=0, threads=0, bytes=0, flops=0)
step = {k: {f: v - before.get(k, zero)[f] for f, v in r.items()} for k, r in after.items()}
step = {k: r for k, r in step.items() if r["launches"] > 0}
host = {k: step.pop(k) for k in [k for k in step if k.startswith("(host) ")]}
size = dict(f64=8, f32=4, bf16=2, f16=2, u32=4, i64=8, u8=1)
def candle_bytes(name, n):
    """Bytes candle's kernel `name` moves for n elements (its launch's threads: one per element)."""
    base = name.split()[0]
    dt = [size[t] for t in base.split("_")[1:] if t in size]
    if not dt:
        return 0
    if base.startswith("cast_"):
        return n * sum(dt[:2])
    if base.startswith(("const_set", "fill")):
        return n * dt[-1]
    if base.startswith("b") and not base.startswith("bias"):  # binary: two operands, one result
        return 3 * n * dt[-1]
    if base.startswith("fast_"):  # reductions: read once
        return n * dt[-1]
    return 2 * n * dt[-1]  # unary, affine, copies, index_select
rows = []
for name, r in step.items():
    ours = name.startswith("dpo_")
    gemm = name.startswith("gemm")
    b = r["bytes"] if ours or gemm else candle_bytes(name, r["threads"])
    rows.append((name, r["launches"], r["threads"], b, r["flops"], "gemm" if gemm else "ours" if ours else "candle"))
rows.sort(key=lambda x: -(x[3] + x[4] / 300))  # roughly by time: ~300 FLOPs a byte on an H100
print(f"{'per step':58s} {'launches':>8s} {'elements':>10s} {'GB':>8s} {'TFLOP':>7s}")
for name, n, t, b, f, kind in rows:
    print(f"{name[:58]:58s} {n:8.0f} {t / 1e6:9.1f}M {b / 1e9:8.2f} {f / 1e12:7.3f}")
tot = lambda kind, i: sum(r[i] for r in rows if r[5] == kind)
f32_flops = sum(r[4] for r in rows if r[0].startswith("gemm f32"))
bf16_flops = tot("gemm", 4) - f32_flops
launches = sum(r[1] for r in rows)
print(f"\nlaunches {launches:.0f} ({tot('ours', 1):.0f} ours, {tot('candle', 1):.0f} candle's, {tot('gemm', 1):.0f} GEMMs)")
print(f"GEMM: {bf16_flops / 1e12:.2f} TFLOP bf16, {f32_flops / 1e12:.2f} TFLOP f32 (TF32), {tot('gemm', 3) / 1e9:.1f} GB")
print(f"other kernels: {tot('ours', 3) / 1e9:.1f} GB ours (upper bound), {tot('candle', 3) / 1e9:.1f} GB candle's")
# An H100 SXM's spec: 3.35 TB/s, 989 TFLOP/s bf16 and 495 TF32 (dense). Each GEMM at the
# slower of its FLOPs and its bytes, every other kernel at its bytes: a floor, not a forecast.
gemm_s = sum(max(r[4] / (495e12 if r[0].startswith("gemm f32") else 989e12), r[3] / 3.35e12) for r in rows if r[5] == "gemm")
other_s = (tot("ours", 3) + tot("candle", 3)) / 3.35e12
print(f"H100 floor: {1e3 * gemm_s:.1f} ms GEMMs + {1e3 * other_s:.1f} ms other kernels = {1e3 * (gemm_s + other_s):.1f} ms a step")
# The host's side: synchronizations, and copies across the bus (a copy to the host's pageable
# memory returns only once the device has reached it: a wait like a synchronization).
print("host calls a step: " + ("; ".join(f"{k[7:]} {r['launches']:.0f}" + (f" ({r['bytes'] / 1e3:.1f} kB)" if r["bytes"] else "")
                                          for k, r in sorted(host.items())) or "none"))
PY
