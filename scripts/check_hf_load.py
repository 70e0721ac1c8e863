#!/usr/bin/env python3
"""transformers loads dpo-train's `output_dir/final/` as is, and it gives the trainer's numbers.

Loads `RUN_DIR/final/` with `AutoModelForCausalLM.from_pretrained` (no conversion), runs TRL's
`DPOTrainer.evaluate()` on the run's eval file with that model as the policy and the run's
`model` as the reference, and compares every eval metric with dpo-train's last eval record in
`RUN_DIR/metrics.jsonl`. Also checks that final/ holds exactly the base checkpoint's tensor names.

Usage: .venv/bin/python scripts/check_hf_load.py runs/default
"""
import json, os, sys, tempfile
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from datasets import load_dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

run = sys.argv[1]
summary = json.load(open(os.path.join(run, "run_summary.json")))
cfg = summary["config"]
final = os.path.join(run, "final")
ours = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if "eval_loss" in l][-1]

names = lambda d: set(safe_open(os.path.join(d, "model.safetensors"), "pt").keys())
assert names(final) == names(cfg["model"]), "final/ and the base checkpoint hold different tensors"

torch.manual_seed(0)
policy = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
reference = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(final)
ds = load_dataset("json", data_files=cfg["eval_file"], split="train")
args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=cfg["beta"], max_length=cfg["max_length"],
                 per_device_eval_batch_size=cfg.get("eval_batch_size") or cfg["batch_size"],
                 use_cpu=True, bf16=False, report_to="none", disable_tqdm=True)
trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, eval_dataset=ds,
                     processing_class=tok)
theirs = trainer.evaluate()
worst = 0.0
for k in ["eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
          "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"]:
    a, b = ours[k], theirs[k]
    tol = 1e-4 * max(1.0, abs(b))
    status = "ok" if abs(a - b) <= tol else "MISMATCH"
    worst = max(worst, abs(a - b) / max(1.0, abs(b)))
    print(f"{k:26s} dpo-train {a:+.6f}  transformers+TRL {b:+.6f}  {status}")
print(f"final/ loads in transformers; largest relative difference {worst:.2e}")
sys.exit(0 if worst <= 1e-4 else 1)
