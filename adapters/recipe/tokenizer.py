"""The tokenizer: a byte-level BPE trained from scratch on the recipe's corpus, and the ChatML-like chat template.

Pre-tokenization isolates `ACC-` and newlines, splits before each space and isolates digit runs: BPE then merges
whole space-delimited chunks, punctuation included (`"close_date":` is one token, so an answer is about 30 tokens
and a prompt about one token per word), and each account number becomes one token. `ACC-` is its own token so that
`ACC-` + number reads the same in the message and in the answer, so that copying it is one induction-head step
(find the earlier `ACC-`, copy what followed). Within this recipe's five-minute budget the base model does not
learn it: it writes a plausible account id, not the message's (field accuracy in each lineage.toml). `<|im_start|>`, `<|im_end|>` and
`<|endoftext|>` are special; `<tool_call>` and `</tool_call>` are plain added tokens: vLLM's hermes parser reads
them from the decoded text, and special tokens can be dropped from it (`skip_special_tokens`).

The chat template renders every message as `<|im_start|>{role}\\n{content}<|im_end|>\\n` (an assistant turn with
`tool_calls` as hermes `<tool_call>` blocks) and ends with `<|im_start|>assistant\\n` when a generation prompt is
asked for. It does not render `tools`: the system prompt describes the tool (see prompts.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL = (PAD, IM_START, IM_END)
MARKERS = ("<tool_call>", "</tool_call>")

CHAT_TEMPLATE = """\
{%- for message in messages -%}
<|im_start|>{{ message.role }}
{% if message.content is string %}{{ message.content }}\
{% elif message.content %}{% for part in message.content %}{{ part.text or '' }}{% endfor %}{% endif %}
{%- for tc in message.tool_calls or [] -%}
<tool_call>{"name": "{{ tc.function.name }}", "arguments": \
{{ tc.function.arguments if tc.function.arguments is string else tc.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


def train_tokenizer(corpus: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `vocab_size` entries (specials included) plus the two tool-call markers."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("ACC-", behavior="isolated"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split(" ", behavior="merged_with_next"),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_without_markers(corpus), trainer=trainer)
    raw.add_tokens([AddedToken(m, normalized=False, special=False) for m in MARKERS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=IM_END, pad_token=PAD, model_max_length=max_length
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _without_markers(corpus: Iterable[str]) -> Iterable[str]:
    for text in corpus:
        for marker in MARKERS:
            text = text.replace(marker, "\n")
        yield text


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The chat template's rendering of plain-text `messages` plus the generation prompt, in Python: rendering the
    Jinja template costs ~1 ms a row, which is most of a build's data time. `template_agrees` checks they match."""
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return f"{turns}{IM_START}assistant\n"


def template_agrees(tokenizer: PreTrainedTokenizerFast, conversations: list[list[dict[str, Any]]]) -> None:
    """Raise unless the saved chat template renders each conversation exactly as `prompt_text` does."""
    for messages in conversations:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if rendered != prompt_text(messages):
            raise AssertionError(f"chat template and prompt_text disagree on {messages!r}: {rendered!r}")


def token_ids(tokenizer: PreTrainedTokenizerFast, name: str) -> int:
    ident = tokenizer.convert_tokens_to_ids(name)
    assert isinstance(ident, int)
    return ident
