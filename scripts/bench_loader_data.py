#!/usr/bin/env python3
"""Benchmark inputs for scripts/bench-loader.sh, written to OUT (default /tmp/dpo-bench):

  model/      a byte-level BPE tokenizer of 32k tokens trained (tokenizers lib) on the Python
              sources of the venv, Qwen2's pre-tokenizer, with Qwen2.5's chat template
              (from tests/fixtures/chat/qwen2) in tokenizer_config.json
  data-200m.jsonl   ~200 MB of preference rows, UltraFeedback-like: half conversational with an
              explicit prompt, a quarter conversational with an implicit prompt (full
              conversations), a quarter standard text rows; 1-3 KB of text per completion
  data-2g.jsonl     the 200 MB file repeated 10 times (~2 GB)

Run:  .venv/bin/python scripts/bench_loader_data.py [OUT]
"""

import json
import os
import random
import sys
import sysconfig
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dpo-bench")
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_lines(limit_bytes):
    site = Path(sysconfig.get_paths()["purelib"])
    total = 0
    for path in sorted(site.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            line = line.strip()
            if len(line) > 20:
                total += len(line)
                yield line
        if total >= limit_bytes:
            return


def build_tokenizer(lines):
    model_dir = OUT / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.save(str(model_dir / "tokenizer.json"))
    config = json.loads((ROOT / "tests/fixtures/chat/qwen2/tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"tokenizer: vocab {tok.get_vocab_size()}")


def text(rng, lines, lo, hi):
    out, n = [], rng.randint(lo, hi)
    size = 0
    while size < n:
        line = lines[rng.randrange(len(lines))]
        out.append(line)
        size += len(line) + 1
    return " ".join(out)


def row(rng, lines, k):
    prompt = text(rng, lines, 200, 800)
    chosen = text(rng, lines, 800, 2400)
    rejected = text(rng, lines, 600, 2000)
    kind = k % 4
    user = {"role": "user", "content": prompt}
    if kind in (0, 1):
        return {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    if kind == 2:
        return {
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
        }
    return {"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    lines = list(corpus_lines(80 << 20))
    print(f"corpus: {len(lines)} lines")
    if not (OUT / "model" / "tokenizer.json").exists():
        build_tokenizer(lines[: len(lines) // 2])
    rng = random.Random(0)
    small = OUT / "data-200m.jsonl"
    with open(small, "w", encoding="utf-8") as f:
        k = 0
        while f.tell() < 200 << 20:
            f.write(json.dumps(row(rng, lines, k), ensure_ascii=False) + "\n")
            k += 1
    print(f"{small}: {k} rows, {os.path.getsize(small) >> 20} MiB")
    big = OUT / "data-2g.jsonl"
    with open(big, "wb") as out, open(small, "rb") as src:
        data = src.read()
        for _ in range(10):
            out.write(data)
    print(f"{big}: {10 * k} rows, {os.path.getsize(big) >> 20} MiB")


if __name__ == "__main__":
    main()
