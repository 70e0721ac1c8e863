#!/usr/bin/env python3
"""Parquet shards for the loader's `parquet` feature test, written to tests/fixtures/parquet/:
the explicit-prompt conversational rows and the standard text rows of tests/fixtures/chat/qwen2/
data.jsonl, as the Hub stores preference data (pyarrow, snappy compression, two row groups), plus
the same rows as JSONL (`*.jsonl`) for comparison.

Run:  .venv/bin/python scripts/make_parquet_fixtures.py
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests/fixtures/chat/qwen2/data.jsonl"
OUT = ROOT / "tests/fixtures/parquet"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in SRC.read_text().splitlines()]
    conv = [r for r in rows if isinstance(r.get("prompt"), list) and set(r) == {"prompt", "chosen", "rejected"}]
    text = [r for r in rows if isinstance(r.get("prompt"), str)] + [
        {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
        {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
    ]
    for name, items in [("conversations", conv), ("text", text)]:
        table = pa.Table.from_pylist(items)
        pq.write_table(table, OUT / f"{name}.parquet", compression="snappy", row_group_size=2)
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
        print(f"{name}: {len(items)} rows")


if __name__ == "__main__":
    main()
