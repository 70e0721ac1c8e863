#!/usr/bin/env python3
"""Checks that the bundled default (data/) is learnable by DPO, on CPU, in plain PyTorch.

Follows the TRL DPOTrainer conventions that dpo-train implements:
  * tokenize prompt and prompt+completion (no special tokens added); the completion is the
    tokens after their common prefix; EOS is appended to chosen and rejected;
  * truncate to max_length (keep the start), right padding with pad_token_id;
  * one forward over [chosen..., rejected...]; per-sequence log-prob = sum over completion tokens;
  * loss = mean -logsigmoid(beta * ((pc - rc) - (pr - rr))), reference = frozen copy of the start;
  * AdamW, linear (or constant / cosine) schedule with linear warmup, grad-norm clipping.

Prints, before training and every --eval-steps steps, on data/eval.jsonl:
  reward_acc  fraction of pairs with chosen reward > rejected reward, reward = beta*(logp - logp_ref)
  raw_pref    fraction of pairs where the policy's own logp(chosen) > logp(rejected)
  margin      mean reward margin, and the eval DPO loss

Defaults are the hyperparameters proposed in configs/default.toml.
Run from the repository root:  .venv/bin/python scripts/check_default_learns.py
"""

import argparse
import copy
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "data/tiny-model"))
    ap.add_argument("--train-file", default=os.path.join(ROOT, "data/train.jsonl"))
    ap.add_argument("--eval-file", default=os.path.join(ROOT, "data/eval.jsonl"))
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scheduler", default="linear", choices=["linear", "constant", "cosine"])
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tok, row, max_length):
    p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    out = []
    for key in ("chosen", "rejected"):
        full = tok(row["prompt"] + row[key], add_special_tokens=False)["input_ids"]
        k = common_prefix(p, full)
        assert k == len(p), f"prompt is not a token prefix of prompt+{key}: {row}"
        ids = full + [tok.eos_token_id]
        mask = [0] * k + [1] * (len(ids) - k)
        out.append((ids[:max_length], mask[:max_length]))
    return out  # [(chosen_ids, chosen_mask), (rejected_ids, rejected_mask)]


def collate(items, pad_id):
    seqs = [it[0] for it in items] + [it[1] for it in items]  # [chosen..., rejected...]
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    comp = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, (s, m) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        comp[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, att, comp


def seq_logps(model, ids, att, comp):
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    labels = ids[:, 1:]
    lp = torch.gather(F.log_softmax(logits, -1), 2, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * comp[:, 1:]).sum(-1)


def split(x):
    h = x.shape[0] // 2
    return x[:h], x[h:]


@torch.no_grad()
def evaluate(policy, ref, data, pad_id, beta, bs=32):
    acc = raw = margin = loss = 0.0
    for i in range(0, len(data), bs):
        batch = collate(data[i : i + bs], pad_id)
        pc, pr = split(seq_logps(policy, *batch))
        rc, rr = split(seq_logps(ref, *batch))
        r_c, r_r = beta * (pc - rc), beta * (pr - rr)
        acc += (r_c > r_r).float().sum().item()
        raw += (pc > pr).float().sum().item()
        margin += (r_c - r_r).sum().item()
        loss += (-F.logsigmoid(r_c - r_r)).sum().item()
    n = len(data)
    return dict(reward_acc=acc / n, raw_pref=raw / n, margin=margin / n, loss=loss / n)


def lr_lambda(args):
    def f(step):
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1) if args.warmup_steps else 1.0
        if args.scheduler == "constant":
            return 1.0
        prog = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        if args.scheduler == "linear":
            return max(0.0, 1.0 - prog)
        return 0.5 * (1.0 + math.cos(math.pi * prog))

    return f


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    policy.train()  # no dropout in Qwen2 (attention_dropout 0), so train == eval numerically

    train = [tokenize_pair(tok, r, args.max_length) for r in load_jsonl(args.train_file)]
    evals = [tokenize_pair(tok, r, args.max_length) for r in load_jsonl(args.eval_file)]
    lens = [len(c[0]) for c, _ in train] + [len(r[0]) for _, r in train]
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"model {n_params} params | {len(train)} train / {len(evals)} eval pairs | "
          f"seq len {min(lens)}-{max(lens)} tokens")
    print(f"beta={args.beta} lr={args.lr} sched={args.scheduler} warmup={args.warmup_steps} "
          f"wd={args.weight_decay} clip={args.max_grad_norm} bs={args.batch_size} steps={args.max_steps}")

    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    rng = random.Random(args.seed)

    def log_eval(step, t_train, hist=()):
        m = evaluate(policy, ref, evals, tok.pad_token_id, args.beta)
        tr = f"train reward_acc {sum(hist[-args.eval_steps:]) / len(hist[-args.eval_steps:]):.3f} | " if hist else ""
        print(f"step {step:4d} | {tr}eval reward_acc {m['reward_acc']:.3f} raw_pref {m['raw_pref']:.3f} "
              f"margin {m['margin']:+.3f} loss {m['loss']:.4f} | train time {t_train:.1f}s", flush=True)
        return m

    t_start, cpu_start = time.time(), time.process_time()
    log_eval(0, 0.0)
    t_train, step, order, hist = 0.0, 0, [], []
    while step < args.max_steps:
        if len(order) < args.batch_size:  # new epoch (drop the incomplete tail like a drop_last sampler)
            order = list(range(len(train)))
            rng.shuffle(order)
        idx, order = order[: args.batch_size], order[args.batch_size :]
        t0 = time.time()
        batch = collate([train[i] for i in idx], tok.pad_token_id)
        with torch.no_grad():
            rc, rr = split(seq_logps(ref, *batch))
        pc, pr = split(seq_logps(policy, *batch))
        logits = args.beta * ((pc - rc) - (pr - rr))
        loss = -F.logsigmoid(logits).mean()
        hist.append((logits > 0).float().mean().item())
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        t_train += time.time() - t0
        if step % args.eval_steps == 0 or step == args.max_steps:
            m = log_eval(step, t_train, hist)
    wall = time.time() - t_start
    print(f"done: {step} steps, {t_train / step * 1000:.1f} ms/step, train {t_train:.1f}s, "
          f"wall {wall:.1f}s (incl. evals), cpu {time.process_time() - cpu_start:.1f}s | final eval reward_acc {m['reward_acc']:.3f} "
          f"raw_pref {m['raw_pref']:.3f}")


if __name__ == "__main__":
    main()
