"""Build a tiny random-weight Llama and random LoRA adapters for it, with no network, for engine bring-up.

Run with the engine venv's python (it needs torch, transformers, tokenizers and peft):

    .venv-engine/bin/python scripts/engine/tiny_model.py model DIR [--lora LORA_DIR]   # base model + tokenizer
    .venv-engine/bin/python scripts/engine/tiny_model.py lora DIR --base MODEL_DIR [--seed N]

The model has 2 layers, hidden size 256 and 4 heads, so the attention head size is 64 (one of the sizes vLLM's
CPU attention accepts). The tokenizer is a byte-level BPE trained here on a few generated sentences (any text
encodes), with ChatML special tokens and a chat template that also renders `tools`. `<tool_call>` and
`</tool_call>` are single tokens, as in Hermes/Qwen tokenizers (vLLM 0.32's hermes parser reads the text, so
this is for fidelity, not a requirement). Its answers are random tokens: this model checks that the engine
runs, not what it says.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Not special: a special token would be dropped from the decoded text (skip_special_tokens), and the hermes
# parser reads the markers from the text.
MARKERS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHAT_TEMPLATE = """\
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none -%}
{%- if tools -%}
<|im_start|>system
{% if sys %}{{ sys }}

{% endif %}# Tools

You may call one or more functions. Function signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each call return <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|im_end|>
{% elif sys -%}
<|im_start|>system
{{ sys }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
<|im_start|>assistant
{{ m.content or '' }}
{%- for tc in m.tool_calls or [] -%}
<tool_call>{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments if tc.function.arguments is string else tc.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' -%}
<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% elif m.role != 'system' -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


def corpus() -> list[str]:
    """Generated sentences and tool-call-shaped JSON, enough for a BPE vocabulary of about a thousand."""
    names = ["Ada", "Bob", "Chen", "Dana", "Emil", "Fatima", "Gus", "Hana", "Ivo", "Jun"]
    verbs = ["updated", "created", "closed", "called", "emailed", "scheduled", "moved", "renamed"]
    things = ["the account", "a contact", "the deal", "an invoice", "the meeting", "a ticket", "the lead"]
    lines = [f"{n} {v} {t} on day {d}." for n, v, t, d in itertools.product(names, verbs, things, range(3))]
    calls = [
        json.dumps({"name": "update_crm", "arguments": {"contact": n, "stage": s, "amount": a}})
        for n, s, a in itertools.product(names, ["lead", "won", "lost", "open"], [10, 250, 3999])
    ]
    # Numbers are pre-tokenized as whole runs of digits, so a thousand of them give BPE merges to learn.
    numbers = [f"order {n} costs {n * 7 % 1000} EUR" for n in range(1000)]
    return lines + numbers + [f"<tool_call>{c}</tool_call>" for c in calls]


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_tokens(MARKERS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(out: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"model: {out} ({sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)})")


def build_lora(out: Path, base: Path, seed: int = 1, rank: int = 8) -> None:
    """A random LoRA (both A and B random, so it changes the output) on every attention and MLP projection."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    print(f"lora: {out} (r {rank} on {', '.join(LORA_TARGETS)}, base {base})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="base model and tokenizer")
    model.add_argument("out", type=Path)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--lora", type=Path, help="also build a random r 8 adapter here (saves a torch start)")
    lora = sub.add_parser("lora", help="a random LoRA adapter for a base model built by `model`")
    lora.add_argument("out", type=Path)
    lora.add_argument("--base", type=Path, required=True)
    lora.add_argument("--seed", type=int, default=1)
    lora.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    if args.what == "model":
        build_model(args.out, args.seed)
        if args.lora is not None:
            build_lora(args.lora, args.out)
    else:
        build_lora(args.out, args.base, args.seed, args.rank)


if __name__ == "__main__":
    main()
