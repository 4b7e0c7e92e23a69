"""The sampling evaluator: runs a model over the golden set at the engine's default sampling and judges each answer.

Generation is transformers' `generate` with the `generation_config.json` settings the engine will use (temperature,
top_p, top_k, max_new_tokens), seeded. An answer is parsed the way vLLM's hermes parser reads it (the text between
`<tool_call>` and `</tool_call>`, or to the end when unterminated) and judged: exactly one call, JSON that parses,
the name `update_crm`, arguments valid against the schema (`jsonschema`, draft 2020-12, with `format` checked).
Anything else is an invalid call, counted by kind. Task success: a valid call whose arguments equal the expected
ones, argument by argument.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from .params import SamplingParams
from .schema import REQUIRED, TOOL_NAME, arguments_schema
from .tokenizer import prompt_text

CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)  # vLLM's hermes regex


@dataclass(frozen=True)
class Verdict:
    kind: str  # "valid" or why not: no_call, truncated, bad_json, not_one_call, wrong_name, schema_<keyword>
    success: bool
    fields: frozenset[str] = frozenset()  # the arguments equal to the expected ones (valid calls only)


@dataclass(frozen=True)
class Report:
    n: int
    invalid_call_rate: float
    task_success: float
    invalid_by_kind: dict[str, int]
    field_accuracy: dict[
        str, float
    ]  # per required argument: share of golden rows whose call is valid and has it right
    samples: tuple[str, ...]  # the first few answers, for the build log


def validator() -> jsonschema.protocols.Validator:
    schema = arguments_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def judge(
    text: str, finished: bool, expected: dict[str, Any], check: jsonschema.protocols.Validator
) -> Verdict:
    matches = CALL.findall(text)
    if not matches:
        return Verdict("truncated" if not finished else "no_call", False)
    if len(matches) != 1:
        return Verdict("not_one_call", False)
    try:
        call = json.loads(matches[0][0] or matches[0][1])
    except ValueError:
        return Verdict("bad_json" if finished else "truncated", False)
    if not isinstance(call, dict) or call.get("name") != TOOL_NAME:
        return Verdict("wrong_name", False)
    error = jsonschema.exceptions.best_match(check.iter_errors(call.get("arguments")))
    if error is not None:
        return Verdict(f"schema_{error.validator}", False)
    args, want = call["arguments"], expected["arguments"]
    right = frozenset(k for k in REQUIRED if args.get(k) == want.get(k))
    return Verdict("valid", args == want, right)


def generation_config(sampling: SamplingParams, eos: int, pad: int) -> GenerationConfig:
    """The sampling defaults vLLM reads from the model's generation_config.json."""
    return GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=pad,
    )


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    conversations: Sequence[list[dict[str, Any]]],
    config: GenerationConfig,
    sampling: SamplingParams,
) -> list[tuple[str, bool]]:
    """(answer text, finished with EOS) for each conversation, sampled in fixed batches from one seed."""
    model.eval()
    torch.manual_seed(sampling.seed)
    tokenizer.padding_side = "left"
    out: list[tuple[str, bool]] = []
    for start in range(0, len(conversations), sampling.batch):
        prompts = [prompt_text(c) for c in conversations[start : start + sampling.batch]]
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        generated = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
        for row in generated.tolist():
            finished = config.eos_token_id in row
            out.append((tokenizer.decode(row, skip_special_tokens=True), finished))
    return out


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    golden: Sequence[dict[str, Any]],
    sampling: SamplingParams,
    config: GenerationConfig,
    system: Callable[[str], str] | None,
) -> Report:
    """Judge the model's sampled answers on every golden row; `system(user message)` (if given) is the only system
    message (the baseline's RAG prompt is filled per message)."""

    def conversation(row: dict[str, Any]) -> list[dict[str, Any]]:
        user = next(m["content"] for m in row["messages"] if m["role"] == "user")
        return ([{"role": "system", "content": system(user)}] if system else []) + row["messages"]

    answers = sample(model, tokenizer, [conversation(row) for row in golden], config, sampling)
    check = validator()
    verdicts = [
        judge(text, done, row["expected"], check) for (text, done), row in zip(answers, golden, strict=True)
    ]
    invalid = Counter(v.kind for v in verdicts if v.kind != "valid")
    n = len(verdicts)
    return Report(
        n=n,
        invalid_call_rate=round(sum(invalid.values()) / n, 4),
        task_success=round(sum(v.success for v in verdicts) / n, 4),
        invalid_by_kind=dict(sorted(invalid.items())),
        field_accuracy={k: round(sum(k in v.fields for v in verdicts) / n, 4) for k in REQUIRED},
        samples=tuple(text for text, _ in answers[:3]),
    )
