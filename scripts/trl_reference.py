#!/usr/bin/env python3
"""Run TRL 1.16's DPOTrainer (transformers 5.17 Trainer) on CPU/float32 on a tiny model and record
everything the Rust trainer must reproduce, under tests/fixtures/trl/:

  train.jsonl, eval.jsonl   the preference data ({"prompt","chosen","rejected"} strings)
  model/                    tiny Qwen2ForCausalLM (tied) + byte-level BPE tokenizer (tokenizer.json,
                            tokenizer_config.json); the policy AND the reference model start from it
  config.json               the exact DPOConfig used (explicit kwargs + the full to_dict())
  tokenized.json            TRL's prompt_ids/chosen_ids/rejected_ids per row after _prepare_dataset,
                            the dropped rows, and the collated micro-batches of the first 2 steps
  trl_metrics.jsonl         one line per optimizer step (train) and per evaluation (eval), unrounded
  params_step2.safetensors, params_step10.safetensors
                            all trainable parameters after optimizer steps 2 and 10 (float32)

Run:  .venv/bin/python scripts/trl_reference.py
"""

import copy
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import trl  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "trl"
MODEL_DIR = OUT / "model"
EOS = "<|endoftext|>"
MAX_LENGTH = 40
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ---------------------------------------------------------------------------------------------
# Data. Rows tagged in comments are the edge cases; everything else is ordinary short text.
# ---------------------------------------------------------------------------------------------
LONG_PROMPT = (
    "Please read the following passage very carefully, then answer the question that comes after it: "
    "the river flows from the mountains down to the sea, passing many small towns."
)
TRAIN = [
    ("What color is the sky?", " The sky is blue.", " The sky is green."),
    ("Name a fruit.", " An apple.", " A chair."),
    ("2 + 2 =", " 4", " 5"),
    ("The capital of France is ", "the city of Paris.", "the city of Rome."),  # prompt ends in a space
    ("Say hello.", " Hello!" + EOS, " Goodbye."),  # chosen already ends with the EOS text
    ("Translate 'cat' to Spanish:", " gato", " perro"),
    ("Is water wet?", " Yes, it is.", " No, never."),
    ("¿Cómo estás?", " Muy bien, gracias. 😊", " Mal."),  # non-ASCII
    ("Count to three.", " One, two, three.", " One, three, two."),
    ("What do bees make?", " Honey.", " Cheese."),
    (
        "Tell me a story about a dog.",
        " Once upon a time there was a little dog who loved to run in the green park every single morning.",
        " No.",
    ),  # chosen longer than max_length -> truncated
    ("Is it day? Answer: ", "the sun is up, so yes.", "\nno"),  # min common-prefix rule (see docs)
    ("Which is bigger, the sun or the moon?", " The sun.", " The moon."),
    ("Spell 'dog'.", " d-o-g", " d-o-o-g"),
    ("What is the opposite of hot?", " Cold.", " Hot."),
    ("Name a color.", " Red.", " Seven."),
    (LONG_PROMPT, " The sea.", " The mountains."),  # prompt alone >= max_length -> dropped by TRL
    ("The weather today is ", "sunny and warm.", "the number nine."),  # prompt ends in a space
    ("Complete: one, two, ", "three", "five"),  # prompt ends in a space
    ("Where do fish live?", " In the water.", " In the sky."),
    ("日本の首都は?", " 東京です。", " 大阪です。"),  # non-ASCII (CJK)
    ("Write a greeting.", " Good morning!", " Bad."),
    ("What is 10 minus 3?", " 7", " 13"),
    ("Is fire cold?", " No, fire is hot.", " Yes, fire is cold."),
    ("Pick the animal: car, cat, cup.", " cat", " cup"),
    ("What do cows drink?", " Water.", " Milk, obviously."),
    (
        "Describe the sea.",
        " The sea is wide and deep and blue, and it moves with the wind and the moon.",
        " The sea is a large body of salty water that covers most of the planet we live on today.",
    ),  # both completions truncated
    ("How many legs does a cat have?", " Four.", " Two."),
    ("Say something kind.", " You are doing great.", " Go away."),
    ("Name a planet.", " Mars.", " The moon."),
    ("Café or tea?", " Café, s'il vous plaît.", " Neither."),  # non-ASCII (Latin-1)
    ("What is ice made of?", " Frozen water.", " Hot sand."),
    ("Finish the word: hap", "py", "ple"),  # completion merges into the prompt's last word
    ("What comes after Monday?", " Tuesday.", " Sunday."),
    ("Name a tool.", " A hammer.", " A cloud."),
    ("Do birds fly?", " Most birds can fly.", " Birds cannot fly."),
    ("What sound does a dog make?", " Woof.", " Meow."),
    ("Give me a number.", " 42", " banana"),
    ("Where is the sun at noon?", " High in the sky.", " Under the sea."),
    ("What is the first letter?", " A", " Z"),
    ("Is the earth round?", " Yes.", " No, it is flat."),
    ("Say goodbye.", " Goodbye!", " Hello!"),
]
EVAL = [
    ("What color is grass?", " Green.", " Purple."),
    ("Name an animal.", " A horse.", " A table."),
    ("3 + 3 =", " 6", " 9"),
    ("The capital of Italy is ", "the city of Rome.", "the city of Paris."),
    ("¿Qué hora es?", " Son las tres.", " Azul."),
    ("Is snow cold?", " Yes, snow is cold.", " No, snow is hot."),
    (LONG_PROMPT.replace("river", "road"), " The sea.", " The town."),  # dropped
    ("What do cats drink?", " Water." + EOS, " Oil."),
    ("Count to two.", " One, two.", " Two, one."),
    (
        "Tell me about the moon.",
        " The moon goes around the earth and shines at night with light from the sun.",
        " It is made of cheese.",
    ),
    ("Name a drink.", " Tea.", " Bread."),
    ("What is 5 times 2?", " 10", " 52"),
]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for p, c, r in rows:
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
def build_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Exactly the pipeline transformers 5's Qwen2Tokenizer rebuilds in code (AutoTokenizer picks that
    # class from the model's model_type and keeps only vocab/merges/added tokens from tokenizer.json),
    # so that the Rust `tokenizers` crate reading tokenizer.json gives the same ids as TRL.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=[EOS, "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS) == 0
    tok.save(str(MODEL_DIR / "tokenizer.json"))
    (MODEL_DIR / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": EOS,
                "pad_token": EOS,
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 2048,
            },
            indent=2,
        )
        + "\n"
    )
    return tok


def check_tokenizer(tok, texts):
    """transformers' tokenizer (as TRL uses it) must give exactly the ids of the raw tokenizer.json."""
    t = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert t.eos_token == EOS and t.eos_token_id == 0 and t.pad_token_id == 0, (t.eos_token, t.pad_token)
    assert t.bos_token is None
    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    extra = ["a b", "It's 2024!\n\nOK", "x  y   z\t", "日本語 😊 café", EOS + "hi" + EOS]
    for text in texts + [x + EOS for x in texts] + extra:
        assert t(text)["input_ids"] == raw.encode(text).ids, text  # also: no special tokens added
    print(f"tokenizer: {type(t).__name__} vocab={len(t)}")
    return t


def build_model(vocab_size):
    torch.manual_seed(1234)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.1,
        use_sliding_window=False,
        sliding_window=None,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,  # keep nn.Embedding without padding_idx (see docs/trl-conventions.md)
    )
    model = Qwen2ForCausalLM(config).float()
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    (MODEL_DIR / "generation_config.json").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.micro = []  # per compute_loss call since the last log
        self.first_batches = []  # collated train micro-batches of the first 2 optimizer steps
        self.events = []
        self.pending_policy = None
        self.pending_ref = None


REC = Recorder()


def wrap_forward(model, tag):
    inner = model.forward

    def fwd(*args, **kwargs):
        out = inner(*args, **kwargs)
        if kwargs.get("fused_lm_head") and getattr(out, "log_probs", None) is not None:
            logps = out.log_probs.detach().sum(dim=1).tolist()
            if tag == "policy":
                REC.pending_policy = logps
            else:
                REC.pending_ref = logps
        return out

    model.forward = fwd


class RecordingDPOTrainer(DPOTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if isinstance(out, tuple) else out
        mode = "train" if self.model.training else "eval"
        rec = {
            "mode": mode,
            "loss": loss.detach().item(),
            "n_pairs": inputs["input_ids"].shape[0] // 2,
            "seq_len": inputs["input_ids"].shape[1],
            "policy_logps": REC.pending_policy,
            "ref_logps": REC.pending_ref,
        }
        REC.micro.append(rec)
        if mode == "train" and self.state.global_step < 2:
            REC.first_batches.append(
                {
                    "optimizer_step": self.state.global_step + 1,
                    "input_ids": inputs["input_ids"].tolist(),
                    "attention_mask": inputs["attention_mask"].tolist(),
                    "completion_mask": inputs["completion_mask"].tolist(),
                }
            )
        return out


class LogCallback(TrainerCallback):
    def __init__(self, trainer_ref, max_grad_norm):
        self.trainer_ref = trainer_ref
        self.max_grad_norm = max_grad_norm
        self.lr_at_step = {}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        # lr actually used by the optimizer step that is about to happen (global_step + 1)
        opt = self.trainer_ref[0].optimizer
        self.lr_at_step[state.global_step + 1] = opt.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in (2, 10):
            sd = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
            save_file(sd, str(OUT / f"params_step{state.global_step}.safetensors"))

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs)
        if "train_runtime" in logs:
            REC.events.append({"kind": "summary", "step": state.global_step, "train_loss": logs["train_loss"]})
            return
        if any(k.startswith("eval_") for k in logs):
            micro = [m for m in REC.micro if m["mode"] == "eval"]
            REC.micro = [m for m in REC.micro if m["mode"] != "eval"]
            keep = {k: v for k, v in logs.items() if not k.endswith(("_runtime", "_per_second"))}
            ev = {"kind": "eval", "step": state.global_step, **keep, "batches": micro}
            # Check the documented aggregation rules
            n = sum(b["n_pairs"] for b in micro)
            weighted = sum(b["loss"] * b["n_pairs"] for b in micro) / n
            assert abs(weighted - logs["eval_loss"]) < 1e-6, (weighted, logs["eval_loss"])
            REC.events.append(ev)
            return
        micro = [m for m in REC.micro if m["mode"] == "train"]
        REC.micro = [m for m in REC.micro if m["mode"] != "train"]
        gn = logs.get("grad_norm")
        ev = {
            "kind": "train",
            "step": state.global_step,
            "lr_used_by_this_step": self.lr_at_step.get(state.global_step),
            "clip_coef": min(1.0, self.max_grad_norm / (gn + 1e-6)) if gn is not None else None,
            "clipped": gn is not None and gn > self.max_grad_norm,
            **logs,
            "micro_batches": micro,
        }
        # logged loss == sum over micro-batches of loss_mb / n_micro (float32 accumulation)
        acc = torch.tensor(0.0)
        for m in micro:
            acc += torch.tensor(m["loss"]) / len(micro)
        assert abs(acc.item() - logs["loss"]) < 1e-6, (acc.item(), logs["loss"])
        REC.events.append(ev)


# ---------------------------------------------------------------------------------------------
def main():
    torch.set_num_threads(1)
    # regenerate everything except the hand-written README.md
    if OUT.exists():
        for child in OUT.iterdir():
            if child.name != "README.md":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    MODEL_DIR.mkdir(parents=True)
    write_jsonl(OUT / "train.jsonl", TRAIN)
    write_jsonl(OUT / "eval.jsonl", EVAL)
    train_rows, eval_rows = read_jsonl(OUT / "train.jsonl"), read_jsonl(OUT / "eval.jsonl")

    texts = [r[k] for r in train_rows + eval_rows for k in ("prompt", "chosen", "rejected")]
    raw_tok = build_tokenizer(texts)
    build_model(raw_tok.get_vocab_size())
    tokenizer = check_tokenizer(raw_tok, texts)

    explicit = dict(
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        weight_decay=0.05,
        max_grad_norm=1.0,  # grad norms here are 0.65-3.3: some steps clip, some do not
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=10,
        max_length=MAX_LENGTH,
        truncation_mode="keep_start",
        train_sampling_strategy="sequential",
        seed=42,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=5,
        per_device_eval_batch_size=4,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        optim="adamw_torch",  # the transformers default for torch>=2.8 is "adamw_torch_fused"
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        disable_dropout=True,
    )
    tmp = tempfile.mkdtemp(prefix="trl_ref_")
    args = DPOConfig(output_dir=tmp, **explicit)
    default_optim = DPOConfig(output_dir=tmp, use_cpu=True, bf16=False).optim

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    add_idx = lambda rows: Dataset.from_list([{**r, "idx": i} for i, r in enumerate(rows)])  # noqa: E731
    trainer_ref = [None]
    trainer = RecordingDPOTrainer(
        model=model,
        args=args,
        train_dataset=add_idx(train_rows),
        eval_dataset=add_idx(eval_rows),
        processing_class=tokenizer,
        callbacks=[LogCallback(trainer_ref, args.max_grad_norm)],
    )
    trainer_ref[0] = trainer
    wrap_forward(trainer.model, "policy")
    wrap_forward(trainer.ref_model, "ref")

    # ---- tokenized dataset as TRL prepared it ----
    def dump(ds, rows):
        kept = {r["idx"]: r for r in ds}
        out = []
        for i in range(len(rows)):
            if i in kept:
                r = kept[i]
                out.append(
                    {
                        "idx": i,
                        "dropped": False,
                        "prompt_ids": r["prompt_ids"],
                        "chosen_ids": r["chosen_ids"],
                        "rejected_ids": r["rejected_ids"],
                        "chosen_text_after_eos_rule": r["chosen"],
                        "rejected_text_after_eos_rule": r["rejected"],
                    }
                )
            else:
                out.append({"idx": i, "dropped": True})
        return out

    tokenized = {
        "max_length": MAX_LENGTH,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "train": dump(trainer.train_dataset, train_rows),
        "eval": dump(trainer.eval_dataset, eval_rows),
    }

    # ---- optimizer groups (who gets weight decay) ----
    trainer.create_optimizer()
    pid = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [
        {"weight_decay": g["weight_decay"], "params": [pid[id(p)] for p in g["params"]]}
        for g in trainer.optimizer.param_groups
    ]
    opt_info = {
        "class": type(trainer.optimizer).__name__,
        "defaults": {
            k: trainer.optimizer.defaults.get(k)
            for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused", "maximize")
        },
        "groups": groups,
        "default_optim_in_this_install": str(default_optim),
    }

    train_out = trainer.train()
    assert trainer.state.global_step == 10

    tokenized["first_two_steps_micro_batches"] = REC.first_batches
    (OUT / "tokenized.json").write_text(json.dumps(tokenized, ensure_ascii=False) + "\n")

    with open(OUT / "trl_metrics.jsonl", "w") as f:
        for ev in REC.events:
            f.write(json.dumps(ev) + "\n")

    full = {k: v for k, v in args.to_dict().items() if k not in ("output_dir", "logging_dir")}
    (OUT / "config.json").write_text(
        json.dumps(
            {
                "versions": {
                    "trl": trl.__version__,
                    "transformers": __import__("transformers").__version__,
                    "torch": torch.__version__,
                },
                "explicit": explicit,
                "optimizer": opt_info,
                "num_train_rows_after_drop": len(trainer.train_dataset),
                "num_eval_rows_after_drop": len(trainer.eval_dataset),
                "train_loss": train_out.training_loss,
                "full_dpo_config": full,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    shutil.rmtree(tmp, ignore_errors=True)

    for ev in REC.events:
        if ev["kind"] == "train":
            print(
                f"step {ev['step']:2d} loss={ev['loss']:.6f} gn={ev['grad_norm']:.4f} clip={ev['clipped']} "
                f"lr={ev['learning_rate']:.6g} used={ev['lr_used_by_this_step']:.6g} "
                f"acc={ev['rewards/accuracies']:.3f} margin={ev['rewards/margins']:.5f} nmb={len(ev['micro_batches'])} "
                f"pairs={[m['n_pairs'] for m in ev['micro_batches']]} epoch={ev['epoch']:.3f}"
            )
        elif ev["kind"] == "eval":
            print(
                f"eval@{ev['step']} loss={ev['eval_loss']:.6f} margin={ev['eval_rewards/margins']:.5f} "
                f"batches={[b['n_pairs'] for b in ev['batches']]}"
            )
        else:
            print(ev)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total fixture size {total / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
