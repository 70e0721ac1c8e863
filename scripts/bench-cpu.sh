#!/usr/bin/env bash
# CPU benchmark: dpo-train vs TRL 1.16 on the same machine, in the same run.
# ~42M-parameter Qwen2-shaped model (random init), batch 4 pairs x 256 tokens (prompt 128 +
# completion 128), f32, 2 threads each; median step time after 3 warm-up steps, tokens/s and
# peak RSS. Appends the result to BENCHMARKS.md.
#
#   scripts/setup_python.sh && scripts/bench-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-10}; WARMUP=3; THREADS=${THREADS:-2}
W=${BENCH_DIR:-/tmp/dpo-bench-cpu}
mkdir -p "$W"
cargo build --release -p dpo-train
[ -f "$W/assets/train.jsonl" ] || .venv/bin/python scripts/bench_assets.py "$W/assets" --preset cpu40m --pairs 64
cat > "$W/run.toml" <<TOML
model = "$W/assets/model"
train_file = "$W/assets/train.jsonl"
output_dir = "$W/out"
overwrite_output_dir = true
batch_size = 4
max_length = 1024
max_steps = $STEPS
logging_steps = 1
shuffle = false
learning_rate = 1e-6
lr_scheduler_type = "constant"
progress_bar = false
TOML
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
/usr/bin/time -v "${CARGO_TARGET_DIR:-target}/release/dpo-train" --config "$W/run.toml" 2> "$W/ours.err" >/dev/null
ours_rss=$(awk -F': ' '/Maximum resident/ {printf "%.2f", $2/1048576}' "$W/ours.err")
ours=$(python3 - "$W/out/metrics.jsonl" "$WARMUP" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
tps = [r["tokens_per_second"] for r in recs][int(sys.argv[2]):]
tok = recs[1]["num_tokens"] - recs[0]["num_tokens"]
med = statistics.median(tok / t for t in tps)
print(json.dumps({"step_s_median": med, "tokens_per_step": tok, "tokens_per_s": tok / med}))
PY
)
trl=$(/usr/bin/time -v .venv/bin/python scripts/bench_trl.py "$W/assets" --batch 4 --steps "$STEPS" --warmup $WARMUP \
      --threads "$THREADS" 2> "$W/trl.err" | sed -n 's/^RESULT //p')
trl_rss=$(awk -F': ' '/Maximum resident/ {printf "%.2f", $2/1048576}' "$W/trl.err")
python3 - "$ours" "$trl" "$ours_rss" "$trl_rss" "$THREADS" <<'PY'
import datetime, json, platform, subprocess, sys
ours, trl = json.loads(sys.argv[1]), json.loads(sys.argv[2])
o_rss, t_rss, threads = float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
lines = [
    f"### CPU, {datetime.date.today()} ({cpu}, {threads} threads each)",
    "",
    "`scripts/bench-cpu.sh`: ~42M-parameter Qwen2 (random init), batch 4 pairs x 256 tokens, f32,",
    "median over steps after 3 warm-up steps; peak RSS of the whole process.",
    "",
    "| trainer | step (s) | tokens/s | peak RSS (GiB) |",
    "|---|---|---|---|",
    f"| dpo-train | {ours['step_s_median']:.2f} | {ours['tokens_per_s']:.0f} | {o_rss:.2f} |",
    f"| TRL {trl['trl']} (torch {trl['torch']}) | {trl['step_s_median']:.2f} | {trl['tokens_per_s']:.0f} | {t_rss:.2f} |",
    "",
    f"dpo-train / TRL tokens/s: **{ratio:.2f}x**; tokens per step {ours['tokens_per_step']} (TRL {trl['tokens_per_step']}).",
    "",
]
print("\n".join(lines))
with open("BENCHMARKS.md", "a") as f:
    f.write("\n".join(lines) + "\n")
PY
