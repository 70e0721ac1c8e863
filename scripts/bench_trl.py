#!/usr/bin/env python3
"""TRL 1.16 DPOTrainer timing on the assets of bench_assets.py, for side-by-side benchmarks.

Prints `RESULT {json}`: median step time after warm-up, tokens/s (tokens = attention-mask tokens
of the policy batch, as dpo-train counts them), peak memory (RSS on CPU, CUDA allocator on GPU).
Usage: bench_trl.py ASSETS_DIR --batch 4 --steps 8 --warmup 3 [--cuda --bf16] [--gradient-checkpointing]
       [--precompute]
"""
import argparse, json, os, resource, statistics, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("assets")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--precompute", action="store_true")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times, tokens = [], []
    sync = torch.cuda.synchronize if a.cuda else (lambda: None)
    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(); self.t = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            sync(); times.append(time.perf_counter() - self.t)
    model_dir = os.path.join(a.assets, "model")
    # Pre-tokenized rows, exactly as dpo-train tokenizes them ("w123" is token 123, EOS 0 ends
    # each completion): transformers 5 would load this word-level tokenizer.json through the
    # Qwen2 tokenizer class of the model's config and tokenize differently.
    from datasets import Dataset
    ids = lambda text: [int(w[1:]) for w in text.split()]
    rows = [json.loads(l) for l in open(os.path.join(a.assets, "train.jsonl"))]
    ds = Dataset.from_list([{"prompt_ids": ids(r["prompt"]), "chosen_ids": ids(r["chosen"]) + [0],
                             "rejected_ids": ids(r["rejected"]) + [0]} for r in rows])
    class Pre(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset
    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, learning_rate=1e-6, lr_scheduler_type="constant",
                     per_device_train_batch_size=a.batch, max_steps=a.steps, max_length=a.max_length,
                     train_sampling_strategy="sequential", seed=42, logging_steps=1, report_to="none",
                     use_cpu=not a.cuda, bf16=a.bf16, fp16=False, gradient_checkpointing=a.gradient_checkpointing,
                     precompute_ref_log_probs=a.precompute, save_strategy="no", disable_tqdm=True,
                     dataloader_num_workers=0, optim="adamw_torch")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tr = Pre(model=model_dir, args=args, train_dataset=ds, processing_class=tok)
    tr.add_callback(Timer())
    if a.cuda:
        torch.cuda.reset_peak_memory_stats()
    tr.train()
    row = ds[0]
    meas = times[a.warmup:]
    med = statistics.median(meas)
    # tokens per step: every row of the batch is prompt + completion (+ EOS), all equal here
    step_tokens = 2 * a.batch * min(len(row["prompt_ids"]) + len(row["chosen_ids"]), a.max_length)
    out = {"trainer": "trl", "trl": __import__("trl").__version__, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if a.cuda else "cpu", "threads": a.threads,
           "step_s_median": med, "step_s_min": min(meas), "n_measured": len(meas), "tokens_per_step": step_tokens,
           "tokens_per_s": step_tokens / med,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if a.cuda else None,
           "gradient_checkpointing": a.gradient_checkpointing, "precompute": a.precompute, "bf16": a.bf16}
    print("RESULT " + json.dumps(out), flush=True)

if __name__ == "__main__":
    main()
