#!/usr/bin/env bash
# Loader benchmark (not a test): peak RSS streaming a 200 MB and a 2 GB JSONL file through
# reading, parsing, chat-template rendering, tokenization (32k-token BPE) and collation, and
# pairs/s with the tokenization pool; then the 200 MB file zstd-compressed (streamed through the
# 10k-row shuffle buffer) and with a single tokenization thread. Writes its inputs to
# ${BENCH_DIR:-/tmp/dpo-bench}.
#   scripts/bench-loader.sh            # default threads (one per core)
#   THREADS=2 scripts/bench-loader.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${BENCH_DIR:-/tmp/dpo-bench}
PY=${PYTHON:-.venv/bin/python}
[ -f "$DIR/data-2g.jsonl" ] || "$PY" scripts/bench_loader_data.py "$DIR"
cargo build --release -p dpo-loader --example bench_loader
BIN=target/release/examples/bench_loader
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
[ -f "$DIR/data-200m.jsonl.zst" ] || zstd -q -3 "$DIR/data-200m.jsonl" -o "$DIR/data-200m.jsonl.zst"
run() {
  echo "== $*"
  /usr/bin/time -f "wall %es, max RSS %M KiB (time -v)" "$BIN" "$DIR/$1" "$DIR/model" --shuffle "${@:2}"
}
run data-200m.jsonl --threads "${THREADS:-0}"
run data-2g.jsonl --threads "${THREADS:-0}"
run data-200m.jsonl.zst --threads "${THREADS:-0}"
run data-200m.jsonl --threads 1
