#!/usr/bin/env python3
"""Builds the bundled default for `dpo-train --config configs/default.toml`.

Writes, deterministically (fixed seeds, CPU, float32):

  data/tiny-model/   a tiny Qwen2ForCausalLM + byte-level BPE tokenizer, pretrained with
                     plain next-token SFT on *neutral* text of a little world
  data/train.jsonl   DPO preference pairs {"prompt", "chosen", "rejected"}
  data/eval.jsonl    held-out pairs: same facts, new prompt phrasings

The little world: every household object has one colour (drawn once with a fixed seed,
four objects per colour). Chosen answers state the object's true colour, rejected answers
a wrong colour in exactly the same template. The SFT text shows every template with every
colour equally often for every object, so the pretrained model speaks the format but has no
idea which colour is true: its log-prob preference for chosen over rejected is a coin flip.
DPO on train.jsonl has to learn the object -> colour facts; eval.jsonl asks about the same
objects with prompt phrasings that never occur in train.jsonl (the answer forms are shared).

Run from the repository root:  .venv/bin/python scripts/make_default.py
"""

import json
import os
import random
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DPO_DEFAULT_OUT only redirects the output (for experiments); the bundled default is data/.
DATA = os.environ.get("DPO_DEFAULT_OUT", os.path.join(ROOT, "data"))
MODEL_DIR = os.path.join(DATA, "tiny-model")

SEED = 1234
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
OBJECTS = [
    "cup", "hat", "car", "door", "kite", "ball", "box", "chair",
    "lamp", "bike", "boat", "coat", "sock", "shoe", "bag", "book",
    "pen", "mug", "bowl", "vase", "rug", "bed", "desk", "fan",
    "clock", "drum", "bell", "flag", "tent", "key", "ring", "cap",
]

# (prompt, completion) templates. Prompts end without a trailing space and completions
# start with one, so the tokenized prompt is always a prefix of prompt + completion.
# Eval prompts are phrasings that never occur in train.jsonl (answer forms are shared).
TRAIN_TEMPLATES = [
    ("What color is the {o}?", " The {o} is {c}."),
    ("Q: What is the color of the {o}?\nA:", " {c}"),
    ("Tell me the color of the {o}.", " It is {c}."),
    ("Which color does the {o} have?", " The {o} is {c}."),
    ("Name the color of the {o}:", " {c}"),
    ("I am looking at the {o}. What color is it?", " It is {c}."),
    ("the {o} -> color?", " {c}"),
    ("Please say what color the {o} is.", " The {o} is {c}."),
    ("What is the {o}'s color?", " It is {c}."),
    ("Guess the color of the {o}.", " {c}"),
]
EVAL_TEMPLATES = [
    ("Do you know the color of the {o}?", " It is {c}."),
    ("Color of the {o}?", " {c}"),
    ("Which color is the {o}?", " The {o} is {c}."),
]
REJECTED_PER_TRAIN_PROMPT = 2  # 32 objects x 10 templates x 2 = 640 train pairs; eval 32 x 3 = 96

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_CFG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
SFT = dict(epochs=3, batch_size=32, lr=3e-3, warmup=20, weight_decay=0.0)


def world():
    rng = random.Random(SEED)
    colors = [COLORS[i % len(COLORS)] for i in range(len(OBJECTS))]
    rng.shuffle(colors)
    return dict(zip(OBJECTS, colors))


def fill(t, o, c):
    p, a = t
    return p.format(o=o), a.format(o=o, c=c)


def chat(prompt, answer):
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n{answer.strip()}{IM_END}\n"


def sft_texts():
    """Neutral text: every template x object x colour once (so no colour is favoured)."""
    rng = random.Random(SEED + 1)
    texts = []
    for t in TRAIN_TEMPLATES + EVAL_TEMPLATES:
        for o in OBJECTS:
            for c in COLORS:
                p, a = fill(t, o, c)
                texts.append(p + a + EOS)
            # plus one ChatML rendering with a random colour, so the chat tokens are trained
            p, a = fill(t, o, rng.choice(COLORS))
            texts.append(chat(p, a) + EOS)
    rng.shuffle(texts)
    return texts


def pairs(facts):
    rng = random.Random(SEED + 2)
    train, evals = [], []
    for t in TRAIN_TEMPLATES:
        for o in OBJECTS:
            wrong = [c for c in COLORS if c != facts[o]]
            for c in rng.sample(wrong, REJECTED_PER_TRAIN_PROMPT):
                p, good = fill(t, o, facts[o])
                _, bad = fill(t, o, c)
                train.append({"prompt": p, "chosen": good, "rejected": bad})
    for t in EVAL_TEMPLATES:
        for o in OBJECTS:
            p, good = fill(t, o, facts[o])
            _, bad = fill(t, o, rng.choice([c for c in COLORS if c != facts[o]]))
            evals.append({"prompt": p, "chosen": good, "rejected": bad})
    rng.shuffle(train)
    rng.shuffle(evals)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    return train, evals


def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t.replace(EOS, "") for t in texts], trainer)
    return tok


def save_tokenizer(tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = MODEL_CFG["max_position_embeddings"]
    hf.padding_side = "right"
    hf.save_pretrained(MODEL_DIR)
    # Keep the chat template inside tokenizer_config.json, as the released Qwen2 checkpoints
    # do, rather than in a separate chat_template.jinja; name a class every transformers knows.
    jinja = os.path.join(MODEL_DIR, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    path = os.path.join(MODEL_DIR, "tokenizer_config.json")
    with open(path) as f:
        tc = json.load(f)
    tc.pop("extra_special_tokens", None)
    tc.pop("backend", None)
    tc.update(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=None,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        added_tokens_decoder={
            str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                          single_word=False, special=True)
            for t in (EOS, IM_START, IM_END)
        },
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_CFG["max_position_embeddings"],
        padding_side="right",
        split_special_tokens=False,
    )
    with open(path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True)
        f.write("\n")
    # sanity: AutoTokenizer gives exactly the raw tokenizers encoding (what Rust will use)
    again = AutoTokenizer.from_pretrained(MODEL_DIR)
    s = "Q: What is the color of the kettle?\nA: purple" + EOS
    assert again(s)["input_ids"] == tok.encode(s).ids, "AutoTokenizer disagrees with tokenizer.json"
    assert again.eos_token == EOS and again.pad_token == EOS
    msgs = [{"role": "user", "content": "Color of the cup?"}]
    rendered = again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == f"{IM_START}user\nColor of the cup?{IM_END}\n{IM_START}assistant\n", rendered
    assert again.convert_tokens_to_ids([IM_START, IM_END]) == [tok.token_to_id(IM_START), tok.token_to_id(IM_END)]
    return again


def pad_batch(seqs, pad_id):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def pretrain(tok, texts):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **MODEL_CFG,
    )
    model = Qwen2ForCausalLM(cfg).float()
    seqs = [tok(t)["input_ids"] for t in texts]
    steps = SFT["epochs"] * ((len(seqs) + SFT["batch_size"] - 1) // SFT["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], weight_decay=SFT["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / SFT["warmup"]) * max(0.0, (steps - s) / steps)
    )
    g = torch.Generator().manual_seed(SEED)
    model.train()
    step, t0 = 0, time.time()
    for ep in range(SFT["epochs"]):
        order = torch.randperm(len(seqs), generator=g).tolist()
        tot, cnt = 0.0, 0
        for i in range(0, len(order), SFT["batch_size"]):
            ids, mask = pad_batch([seqs[j] for j in order[i : i + SFT["batch_size"]]], tok.pad_token_id)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            tot, cnt, step = tot + loss.item(), cnt + 1, step + 1
        print(f"  sft epoch {ep + 1}/{SFT['epochs']}: mean loss {tot / cnt:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model


def save_model(model):
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    os.chmod(os.path.join(MODEL_DIR, "model.safetensors"), 0o644)
    # Make config.json readable by plain Qwen2 loaders (e.g. candle-transformers' qwen2::Config):
    # a top-level rope_theta and an integer sliding_window, as in the released Qwen2 configs.
    path = os.path.join(MODEL_DIR, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = MODEL_CFG["rope_theta"]
    cfg["sliding_window"] = MODEL_CFG["max_position_embeddings"]
    cfg["max_window_layers"] = MODEL_CFG["num_hidden_layers"]
    cfg["use_sliding_window"] = False
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.manual_seed(SEED)
    random.seed(SEED)
    t0 = time.time()
    facts = world()
    texts = sft_texts()
    train, evals = pairs(facts)
    if os.path.isdir(MODEL_DIR):
        shutil.rmtree(MODEL_DIR)
    os.makedirs(MODEL_DIR)

    tok = save_tokenizer(build_tokenizer(texts))
    print(f"tokenizer: {len(tok)} tokens; {len(texts)} SFT texts; "
          f"{len(train)} train / {len(evals)} eval pairs")
    model = pretrain(tok, texts)
    save_model(model)
    write_jsonl(os.path.join(DATA, "train.jsonl"), train)
    write_jsonl(os.path.join(DATA, "eval.jsonl"), evals)

    # reload check
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    AutoTokenizer.from_pretrained(MODEL_DIR)
    n = sum(p.numel() for p in m.parameters())
    print(f"model: {type(m).__name__}, {n} parameters; done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
