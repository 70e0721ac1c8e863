#!/usr/bin/env python3
"""Build the model-parity fixtures under tests/fixtures/parity/<name>/.

For each tiny random-init causal LM this writes
  config.json           transformers-5 layout, exactly as save_pretrained writes it
  model.safetensors     float32 weights, exactly as save_pretrained writes them
  config.v4.json        (qwen2-untied, llama-untied only) same config in the transformers-4 layout
  batch.json            a padded DPO batch in TRL's layout (chosen rows, then rejected rows)
  expected.safetensors  float64 reference numbers (logps, ntokens, hidden, per_token_logps,
                        objective_coeffs, rope_inv_freq, grad.<param> for every saved tensor)

The references are computed in TRUE float64: the float32 weights are loaded, the model is cast with
.double(), and the three places where transformers 5.17 silently computes in float32 even for a
float64 model (RMSNorm upcast, RoPE cos/sin, eager-softmax) are avoided: RMSNorm and the rotary
embedding are patched to compute in the input dtype, and attention uses "sdpa" (no cast).
The script checks the patched float64 result against the unpatched float32 transformers model.

Run:  .venv/bin/python scripts/make_fixtures.py
"""

import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "parity"

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    max_position_embeddings=2048,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,  # no padding_idx on the embedding (it would zero that row's gradient)
)

# Llama-3 rope scaling. With head_dim 8 and theta 5e5 the rotary wavelengths are
# 2*pi/inv_freq = [6.28, 167, 4443, 1.18e5]. original_max_position_embeddings=256 gives
# high_freq_wavelen = 64 and low_freq_wavelen = 256, so frequency 0 is kept, frequency 1 is in the
# smoothed band and frequencies 2 and 3 are divided by `factor`: all three branches are exercised.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}

MODELS = {
    "llama-untied": (
        LlamaForCausalLM,
        lambda: LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            rope_parameters=dict(LLAMA3_ROPE),
        ),
        1001,
    ),
    "llama-tied-bias": (
        LlamaForCausalLM,
        lambda: LlamaConfig(
            **COMMON,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        1002,
    ),
    "qwen2-tied": (
        Qwen2ForCausalLM,
        lambda: Qwen2Config(
            **COMMON,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            sliding_window=None,
        ),
        1003,
    ),
    "qwen2-untied": (
        Qwen2ForCausalLM,
        lambda: Qwen2Config(
            **COMMON,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            sliding_window=None,
        ),
        1004,
    ),
    "mistral": (
        MistralForCausalLM,
        lambda: MistralConfig(
            **COMMON,
            head_dim=16,  # != hidden_size / num_attention_heads = 8
            tie_word_embeddings=False,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        1005,
    ),
}

# Batch structure shared by all models: 3 pairs, prompt length per pair, total lengths per row.
PROMPT_LENS = [4, 6, 3]
CHOSEN_LENS = [17, 12, 6]  # total (prompt + completion) lengths; row 2 is much shorter
REJECTED_LENS = [14, 18, 9]


# --------------------------------------------------------------------------------------------
# True-float64 patches
# --------------------------------------------------------------------------------------------
def _rmsnorm_forward_native(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states


def _rotary_forward_native(self, x, position_ids):
    # Same math as transformers (freqs = pos * inv_freq; emb = cat(freqs, freqs)), in float64.
    inv_freq = self.inv_freq64.to(x.device)
    freqs = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(x.dtype), sin.to(x.dtype)


def inv_freq_float64(config):
    """Float64 re-implementation of transformers' default / llama3 inverse frequencies."""
    rp = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(rp["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rp.get("rope_type", "default") == "llama3":
        factor = rp["factor"]
        lo, hi = rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        is_medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = torch.where(is_medium, smoothed, out)
    elif rp.get("rope_type", "default") != "default":
        raise ValueError(rp)
    return inv


class native_float64:
    """Context manager: RMSNorm / rotary embedding compute in the input dtype."""

    CLASSES = [
        modeling_llama.LlamaRMSNorm,
        modeling_qwen2.Qwen2RMSNorm,
        modeling_mistral.MistralRMSNorm,
    ]
    ROTARY = [
        modeling_llama.LlamaRotaryEmbedding,
        modeling_qwen2.Qwen2RotaryEmbedding,
        modeling_mistral.MistralRotaryEmbedding,
    ]

    def __enter__(self):
        self.saved = [(c, c.forward) for c in self.CLASSES + self.ROTARY]
        for c in self.CLASSES:
            c.forward = _rmsnorm_forward_native
        for c in self.ROTARY:
            c.forward = _rotary_forward_native
        return self

    def __exit__(self, *exc):
        for c, f in self.saved:
            c.forward = f


# --------------------------------------------------------------------------------------------
def perturb(model, gen):
    """Make norm weights != 1 and biases != 0 so every gradient is non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def make_batch(gen):
    rows, pmask_rows = [], []
    for lens in (CHOSEN_LENS, REJECTED_LENS):
        for i, total in enumerate(lens):
            rows.append((i, total))
    # same prompt tokens for chosen_i and rejected_i
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    T = max(CHOSEN_LENS + REJECTED_LENS)
    input_ids, attn, comp = [], [], []
    for i, total in rows:
        p = prompts[i]
        c = torch.randint(1, VOCAB, (total - len(p),), generator=gen).tolist()
        ids = p + c
        pad = T - total
        input_ids.append(ids + [0] * pad)
        attn.append([1] * total + [0] * pad)
        comp.append([0] * len(p) + [1] * len(c) + [0] * pad)
    return {"input_ids": input_ids, "attention_mask": attn, "completion_mask": comp, "n_pairs": 3}


def completion_logps(model, input_ids, attention_mask, completion_mask):
    """TRL's per-sequence log-prob: shift, log_softmax, gather, mask, sum."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    logits = out.logits[:, :-1]
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    return per_token.sum(-1), per_token, out.hidden_states[-1]


def v4_config(cfg: dict) -> dict:
    """transformers-4 layout: top-level rope_theta (+ rope_scaling), torch_dtype, no rope_parameters."""
    c = dict(cfg)
    rp = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rp.pop("rope_theta")
    if rp.get("rope_type", "default") == "default":
        c["rope_scaling"] = None
    else:
        c["rope_scaling"] = rp
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    c["transformers_version"] = "4.57.1"
    return dict(sorted(c.items()))


def build(name, cls, make_config, seed):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    torch.manual_seed(seed)
    config = make_config()
    model = cls(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    perturb(model, gen)
    model.save_pretrained(d, safe_serialization=True)
    # save_pretrained also writes generation_config.json; drop it, it is not part of the fixture
    (d / "generation_config.json").unlink(missing_ok=True)

    cfg = json.loads((d / "config.json").read_text())
    if name in ("qwen2-untied", "llama-untied"):
        (d / "config.v4.json").write_text(json.dumps(v4_config(cfg), indent=2, sort_keys=True) + "\n")
        # check both layouts parse to the same transformers config
        a = type(config).from_json_file(str(d / "config.json"))
        b = type(config).from_json_file(str(d / "config.v4.json"))
        assert a.rope_parameters == b.rope_parameters, (a.rope_parameters, b.rope_parameters)

    batch = make_batch(gen)
    (d / "batch.json").write_text(json.dumps(batch) + "\n")

    saved = load_file(str(d / "model.safetensors"))
    input_ids = torch.tensor(batch["input_ids"])
    attention_mask = torch.tensor(batch["attention_mask"])
    completion_mask = torch.tensor(batch["completion_mask"])

    # ---- float32 transformers model, unpatched (sanity reference) ----
    m32 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logps32, _, _ = completion_logps(m32, input_ids, attention_mask, completion_mask)

    # ---- float64 reference ----
    m64 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").double().eval()
    rot = m64.model.rotary_emb
    inv64 = inv_freq_float64(m64.config)
    assert torch.allclose(inv64.float(), rot.inv_freq.float(), rtol=1e-6, atol=0), (inv64, rot.inv_freq)
    rot.inv_freq64 = inv64
    # loaded parameters must be exactly the saved float32 values
    names = dict(m64.named_parameters())
    assert set(names) == set(saved), (sorted(set(names) ^ set(saved)))
    for k, v in saved.items():
        assert torch.equal(names[k].detach().float(), v), k

    coeffs = torch.randn(6, generator=gen, dtype=torch.float64)
    with native_float64():
        logps, per_token, hidden = completion_logps(m64, input_ids, attention_mask, completion_mask)
        objective = (coeffs * logps).sum()
        m64.zero_grad()
        objective.backward()

    # float64 gradient check of the objective against central finite differences on a few entries
    with native_float64(), torch.no_grad():
        for pname in [sorted(names)[0], sorted(names)[-1]]:
            p = names[pname]
            flat = p.view(-1)
            idx = int(torch.argmax(p.grad.abs().view(-1)))
            eps = 1e-5
            old = flat[idx].item()
            flat[idx] = old + eps
            jp = (coeffs * completion_logps(m64, input_ids, attention_mask, completion_mask)[0]).sum().item()
            flat[idx] = old - eps
            jm = (coeffs * completion_logps(m64, input_ids, attention_mask, completion_mask)[0]).sum().item()
            flat[idx] = old
            fd = (jp - jm) / (2 * eps)
            an = p.grad.view(-1)[idx].item()
            assert abs(fd - an) <= 1e-5 * max(1.0, abs(an)), (pname, fd, an)

    diff32 = (logps.detach() - logps32.double()).abs().max().item()
    assert diff32 < 1e-4, diff32

    expected = {
        "logps": logps.detach().contiguous(),
        "per_token_logps": per_token.detach().contiguous(),
        "ntokens": completion_mask[:, 1:].sum(-1).to(torch.float64),
        "hidden": hidden.detach().contiguous(),
        "objective_coeffs": coeffs,
        "objective": objective.detach().reshape(1),
        "rope_inv_freq": inv64,
    }
    for k, p in names.items():
        assert p.grad is not None and p.grad.abs().max() > 0, k
        expected[f"grad.{k}"] = p.grad.detach().contiguous()
    save_file(expected, str(d / "expected.safetensors"))

    size = sum(f.stat().st_size for f in d.iterdir())
    print(
        f"{name:16s} params={sum(p.numel() for p in m64.parameters()):6d} tensors={len(saved):2d} "
        f"tied={config.tie_word_embeddings} |logps64-logps32|max={diff32:.2e} "
        f"logps={[round(x, 4) for x in logps.tolist()]} size={size / 1024:.0f}KiB"
    )
    return size


def main():
    torch.set_num_threads(1)
    total = 0
    for name, (cls, make_config, seed) in MODELS.items():
        total += build(name, cls, make_config, seed)
    print(f"total {total / 1024:.0f} KiB")
    if total > 2 * 1024 * 1024:
        sys.exit("fixtures too large")


if __name__ == "__main__":
    main()
