#!/usr/bin/env python3
"""Benchmark assets: a random-init Qwen2-shaped model, a word-level tokenizer whose words are
single tokens ("w123"), and preference rows of exact token lengths, so dpo-train and TRL see
identical batches of known size.

Usage: bench_assets.py OUT_DIR --preset cpu40m|qwen05b [--pairs N] [--prompt P] [--completion C]
"""
import argparse, json, os, random

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", default="cpu40m", choices=["cpu40m", "qwen05b"])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=128)
    a = ap.parse_args()
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = 32000 if a.preset == "cpu40m" else 151936
    model_dir = os.path.join(a.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    words = {"<|endoftext|>": 0}
    for i in range(1, vocab):
        words[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(model_dir)
    if a.preset == "cpu40m":  # ~42M parameters (16.4M of them the tied embedding)
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
                          max_position_embeddings=4096, eos_token_id=0, pad_token_id=None, bos_token_id=None)
    else:  # Qwen2.5-0.5B shapes, as in ../shared/perf/bench_trl_gpu.py
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                          rms_norm_eps=1e-6, eos_token_id=0, pad_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    if a.preset == "qwen05b":
        model = model.to(torch.bfloat16)
    model.save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    text = lambda k: " ".join(f"w{rng.randrange(1, vocab)}" for _ in range(k))
    with open(os.path.join(a.out, "train.jsonl"), "w") as f:
        for _ in range(a.pairs):
            # completion: C-1 words + the EOS the trainer appends = C tokens
            f.write(json.dumps({"prompt": text(a.prompt) + " ", "chosen": text(a.completion - 1),
                                "rejected": text(a.completion - 1)}) + "\n")
    print(json.dumps({"model": model_dir, "parameters": n, "vocab": vocab}))

if __name__ == "__main__":
    main()
