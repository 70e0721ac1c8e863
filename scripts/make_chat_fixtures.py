#!/usr/bin/env python3
"""Ground truth for conversational preference rows: transformers 5.17's `apply_chat_template` and
TRL 1.16's `DPOTrainer._prepare_dataset` on the real chat templates of Llama 3.1, Qwen2.5 and
Mistral-7B-Instruct-v0.3, with tiny tokenizers. Writes tests/fixtures/chat/<name>/:

  tokenizer.json         the byte-level BPE of tests/fixtures/trl/model plus the template's special
                         tokens (added, special); Llama and Mistral also get a BOS post-processor
                         like the real ones, so `tokenizer(text)` adds BOS and `apply_chat_template`
                         (which tokenizes with add_special_tokens=False) must not
  tokenizer_config.json  bos/eos/pad tokens and `chat_template`, the exact template string
  data.jsonl             the rows (conversational with explicit and implicit prompts, system
                         messages, multi-turn, tools, chat_template_kwargs; and standard text rows)
  expected.json          per row: the three rendered texts and TRL's prompt_ids/chosen_ids/
                         rejected_ids, or the error the template raises

Template sources (the Hub is unreachable here, so they are taken from what is on PyPI or public):
  llama3: trl/chat_templates/llama3_1.jinja of trl 1.16.0 (TRL's copy of the Llama 3.1 template,
          as shipped by meta-llama/Llama-3.1-8B-Instruct)
  qwen2:  trl/chat_templates/qwen2_5.jinja of trl 1.16.0 (Qwen2.5-*-Instruct's template)
  mistral: MISTRAL_V03 below: the `chat_template` of mistralai/Mistral-7B-Instruct-v0.3's
          tokenizer_config.json (the revision with tool calling and the system message put in the
          last user turn), reproduced from a public copy of that file; no PyPI package ships it.

Run:  .venv/bin/python scripts/make_chat_fixtures.py
"""

import json
import os
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import AddedToken, Tokenizer, processors  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.data_utils import extract_prompt, is_conversational  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "chat"
BASE_TOKENIZER = ROOT / "tests" / "fixtures" / "trl" / "model" / "tokenizer.json"
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if (message == user_messages[-1]) and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

MODELS = {
    "llama3": {
        "template": (TRL_TEMPLATES / "llama3_1.jinja").read_text(),
        "special": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                    "<|python_tag|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,
    },
    "qwen2": {
        "template": (TRL_TEMPLATES / "qwen2_5.jinja").read_text(),
        "special": ["<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
    },
    "mistral": {
        "template": MISTRAL_V03,
        "special": ["<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        "bos": "<s>",
        "eos": "</s>",
        "pad": None,
    },
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


ROWS = [
    # Explicit prompt, one user turn.
    {"prompt": [u("What color is the sky?")], "chosen": [a("It is blue.")], "rejected": [a("It is green.")]},
    # System message.
    {"prompt": [s("You are terse."), u("Name a prime.")], "chosen": [a("7")], "rejected": [a("8")]},
    # Multi-turn prompt.
    {
        "prompt": [u("Hi"), a("Hello! How can I help?"), u("Sum 2 and 2.")],
        "chosen": [a("4")],
        "rejected": [a("22")],
    },
    # Implicit prompt: the shared leading messages.
    {
        "chosen": [s("Be kind."), u("Is 9 prime?"), a("No, 9 = 3 x 3.")],
        "rejected": [s("Be kind."), u("Is 9 prime?"), a("Yes.")],
    },
    # Implicit prompt, a multi-message rejected completion (TRL keeps the prompt one message short
    # of where they differ).
    {
        "chosen": [u("Capital of France?"), a("Paris.")],
        "rejected": [u("Capital of France?"), a("Lyon."), u("Sure?"), a("Yes.")],
    },
    # Same with a system message: Mistral puts it in the last user turn, so the prompt alone renders
    # differently from the prompt + rejected conversation (TRL's common-prefix rule).
    {
        "chosen": [s("Answer in French."), u("Hello?"), a("Bonjour.")],
        "rejected": [s("Answer in French."), u("Hello?"), a("Hi."), u("French!"), a("Salut.")],
    },
    # Whitespace and non-ASCII content (Llama trims every message, Mistral the assistant's).
    {"prompt": [u("  Ünïcödé?\n")], "chosen": [a(" Ja, 日本.\n\n")], "rejected": [a("Nein ")]},
    # Tools (as a JSON string, as datasets store them) and chat_template_kwargs.
    {
        "prompt": [u("Weather in Paris?")],
        "chosen": [a("Let me check.")],
        "rejected": [a("Sunny.")],
        "tools": json.dumps([WEATHER_TOOL]),
        "chat_template_kwargs": {"date_string": "01 Jan 2025"},
    },
    # Standard text rows: explicit and implicit prompt (EOS appended, BOS from the post-processor).
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"chosen": "The grass is green.", "rejected": "The grass is blue."},
]

# Rows whose rendering raises in the template, per model: (row, expected message).
ERRORS = {
    "mistral": [
        (
            {"prompt": [u("a"), u("b")], "chosen": [a("c")], "rejected": [a("d")]},
            "After the optional system message, conversation roles must alternate user/assistant/user/assistant/...",
        )
    ],
}


def build_model(name, spec, out):
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(BASE_TOKENIZER))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    if spec["bos"]:
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B", special_tokens=[(spec["bos"], bos_id)]
        )
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "pad_token": spec["pad"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": spec["template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    hf = AutoTokenizer.from_pretrained(str(out))
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ["Hi there", "<s>[INST] x[/INST]", "<|begin_of_text|>a<|eot_id|>", "Ünï  cödé\n\n"]:
        assert hf(text)["input_ids"] == raw.encode(text).ids, (name, text)
        assert hf(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    if spec["bos"]:
        assert hf("x")["input_ids"][0] == hf.convert_tokens_to_ids(spec["bos"]), name
    return hf


def trl_prepare(tokenizer, row):
    """TRL's _prepare_dataset on a one-row dataset (`self` only needs `_tokenizer`)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, max_length=None, report_to=[], dataset_num_proc=None, use_cpu=True, bf16=False)
        fake_self = types.SimpleNamespace(_tokenizer=tokenizer)
        ds = DPOTrainer._prepare_dataset(fake_self, Dataset.from_list([row]), tokenizer, args, "train")
        out = ds[0]
    return out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]


def rendered(tokenizer, row):
    """The three texts TRL tokenizes for `row`."""
    if "prompt" not in row:
        row = {**row, **extract_prompt(row)}
    if is_conversational(row):
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **row.get("chat_template_kwargs", {})}

        def render(messages, generation):
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation, **kwargs
            )

        return {
            "prompt": render(row["prompt"], True),
            "prompt_chosen": render(row["prompt"] + row["chosen"], False),
            "prompt_rejected": render(row["prompt"] + row["rejected"], False),
        }
    eos = tokenizer.eos_token

    def with_eos(c):
        return c if c.endswith(eos) else c + eos

    return {
        "prompt": row["prompt"],
        "prompt_chosen": row["prompt"] + with_eos(row["chosen"]),
        "prompt_rejected": row["prompt"] + with_eos(row["rejected"]),
    }


def main():
    for name, spec in MODELS.items():
        out = OUT / name
        tokenizer = build_model(name, spec, out)
        lines, expected = [], []
        for row in ROWS:
            lines.append(json.dumps(row, ensure_ascii=False))
            prompt_ids, chosen_ids, rejected_ids = trl_prepare(tokenizer, row)
            texts = rendered(tokenizer, row)
            # The rendered texts are what TRL tokenized.
            special = not is_conversational({**row, **({} if "prompt" in row else extract_prompt(row))})
            ids = [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts.values()]
            n = len(prompt_ids)
            assert ids[1][n:] == chosen_ids and ids[2][n:] == rejected_ids, (name, row)
            expected.append(
                {
                    "line": len(lines),
                    "rendered": texts,
                    "prompt_ids": prompt_ids,
                    "chosen_ids": chosen_ids,
                    "rejected_ids": rejected_ids,
                }
            )
        for row, message in ERRORS.get(name, []):
            lines.append(json.dumps(row, ensure_ascii=False))
            try:
                trl_prepare(tokenizer, row)
            except Exception as e:  # noqa: BLE001
                assert message in str(e), (name, str(e))
            else:
                raise AssertionError(f"{name}: expected the template to raise")
            expected.append({"line": len(lines), "error": message})
        (out / "data.jsonl").write_text("\n".join(lines) + "\n")
        doc = {
            "generated_by": "scripts/make_chat_fixtures.py",
            "transformers": __import__("transformers").__version__,
            "trl": trl.__version__,
            "rows": expected,
        }
        (out / "expected.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: {len(expected)} rows")


if __name__ == "__main__":
    main()
