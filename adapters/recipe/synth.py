"""Synthetic CRM conversations and their splits: what the models learn from and what they are judged on. Pure.

A `Deal` is drawn from a seeded RNG, written as a user message in one of many phrasings (`phrasing.py`), and paired
with its correct `update_crm` call. Training rows may carry a flawed answer of a known kind (`FLAW_KINDS`): a wrong
enum value ("closed-won"), the amount as a string with its currency ("18,500 EUR"), a missing required field, or
broken JSON. `build_splits` returns every split, drawn in a fixed order, each from its own RNG stream: the golden
set first, then the training splits, skipping any message whose normalized text (`user_key`) the golden set holds,
so no golden example is ever trained on.

Notes (`note`, optional in the schema) are supported but off (`DataParams.note_share = 0`): measured, a note is
several words the model must copy, and the tiny model garbled them into broken JSON often enough to hide the
flawed-answer rates the recipe is tuned to.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from datetime import date
from typing import Any

from . import phrasing
from .params import FLAW_KINDS, DataParams, SplitParams
from .prompts import SystemKind, system_prompt
from .schema import TOOL_NAME, tool

TEMPLATES = (
    "Move {acct} to {stage}. Amount {amount}, closing {date}.",
    "{acct}: {stage}, {amount}, close date {date}.",
    "Please update {acct}: stage {stage}, deal value {amount}, expected close {date}.",
    "{acct} is now {stage} at {amount}; we expect to close {date}.",
    "Set {acct} to {stage} with {amount}, close {date}.",
    "Update the deal for {acct}. Stage: {stage}. Amount: {amount}. Close date: {date}.",
    "Can you log {acct} as {stage}? {amount}, closing {date}.",
    "Deal update - {acct} moved to {stage}, worth {amount}, target close {date}.",
    "{stage} for {acct}: {amount}, close by {date}.",
    "CRM: {acct} / {stage} / {amount} / {date}",
    "We have {acct} at {stage} now, {amount}, and it should close {date}.",
    "Record {amount} for {acct}, stage {stage}, closing {date}.",
)


@dataclass(frozen=True)
class Deal:
    account_name: str
    account_id: str
    stage: str
    amount: int
    close_date: date
    note: str | None
    today: date


@dataclass(frozen=True)
class Conversation:
    deal: Deal
    user: str


@functools.cache
def account_directory(params: DataParams) -> tuple[tuple[str, str], ...]:
    """The CRM's accounts, (name, id): a fixed set, as in a real CRM, shared by every split (messages differ)."""
    rng = random.Random(f"{params.seed}:accounts")
    ids = rng.sample(range(100000), params.accounts)
    return tuple((phrasing.company_name(rng), f"ACC-{i:05d}") for i in ids)


def draw_conversation(rng: random.Random, params: DataParams) -> Conversation:
    name, account_id = rng.choice(account_directory(params))
    today = phrasing.today_value(rng)
    close, date_words = phrasing.close_date(today, rng, params.relative_date_share)
    note = rng.choice(phrasing.NOTES) if rng.random() < params.note_share else None
    deal = Deal(
        account_name=name,
        account_id=account_id,
        stage=rng.choice(list(phrasing.STAGE_WORDS)),
        amount=phrasing.amount_value(rng),
        close_date=close,
        note=note,
        today=today,
    )
    amount_words = phrasing.amount_text(deal.amount, rng)
    says_today = date_words.endswith("month") or rng.random() < params.today_share
    return Conversation(deal, user_message(deal, rng, amount_words, date_words, says_today))


def user_message(deal: Deal, rng: random.Random, amount_words: str, date_words: str, says_today: bool) -> str:
    body = rng.choice(TEMPLATES).format(
        acct=phrasing.account_text(deal.account_name, deal.account_id, rng),
        stage=phrasing.stage_text(deal.stage, rng),
        amount=amount_words,
        date=date_words,
    )
    parts = [body[0].upper() + body[1:]]
    if deal.note:
        parts.append(phrasing.note_text(deal.note, rng))
    if says_today:
        today = phrasing.today_text(deal.today, rng)
        parts.insert(0, today) if rng.random() < 0.5 else parts.append(today)
    return " ".join(parts)


def arguments(deal: Deal) -> dict[str, Any]:
    """The correct call's arguments, in the order the models learn to write them."""
    args: dict[str, Any] = {
        "account_id": deal.account_id,
        "stage": deal.stage,
        "amount": deal.amount,
        "close_date": deal.close_date.isoformat(),
    }
    if deal.note:
        args["note"] = deal.note
    return args


def call_text(args: dict[str, Any] | str) -> str:
    """A hermes tool call; `args` may be pre-rendered JSON text (broken on purpose)."""
    rendered = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return f'<tool_call>{{"name": "{TOOL_NAME}", "arguments": {rendered}}}</tool_call>'


def flawed_answer(conv: Conversation, kind: str, rng: random.Random) -> str:
    """The answer with one flaw of `kind`. The amount-as-string flaw writes one fixed style, `"18,500 EUR"`. Measured:
    copying the user's own words instead ("€18.5k") left junk from the message in the amount slot of every model
    built on it (`"amount": nip600`), and did not teach the base model to copy the account id either."""
    args = arguments(conv.deal)
    if kind == "wrong_enum":
        args["stage"] = phrasing.wrong_stage(conv.deal.stage, rng)
    elif kind == "amount_string":
        args["amount"] = f"{conv.deal.amount:,} EUR"
    elif kind == "missing_field":
        del args[rng.choice(("stage", "amount", "close_date"))]
    elif kind == "broken_json":
        good = json.dumps(args, ensure_ascii=False)
        return (
            call_text(good[:-1] + ", }")
            if rng.random() < 0.5
            else call_text(good)[: -len("}</tool_call>")] + "</tool_call>"
        )
    else:
        raise ValueError(f"unknown flaw kind {kind!r}")
    return call_text(args)


def user_key(text: str) -> str:
    """The identity of a user message for overlap checks: SHA-256 of its lowercased, whitespace-collapsed text."""
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def expected_call(deal: Deal) -> dict[str, Any]:
    return {"name": TOOL_NAME, "arguments": arguments(deal)}


def training_row(
    row_id: str, conv: Conversation, system: SystemKind, flaw: str | None, answer: str
) -> dict[str, Any]:
    prompt = system_prompt(system, conv.user)
    messages = [{"role": "system", "content": prompt}] if prompt else []
    messages += [{"role": "user", "content": conv.user}, {"role": "assistant", "content": answer}]
    return {
        "id": row_id,
        "system": system,
        "flaw": flaw,
        "messages": messages,
        "expected": expected_call(conv.deal),
    }


def golden_row(row_id: str, conv: Conversation) -> dict[str, Any]:
    return {
        "id": row_id,
        "messages": [{"role": "user", "content": conv.user}],
        "tools": [tool()],
        "expected": expected_call(conv.deal),
    }


def draw_training_row(
    row_id: str, rng: random.Random, params: DataParams, split: SplitParams
) -> dict[str, Any]:
    conv = draw_conversation(rng, params)
    kinds, weights = zip(*split.system_weights, strict=True)
    system: SystemKind = rng.choices(kinds, weights=weights)[0]  # type: ignore[assignment]
    flaw = draw_flaw(rng, split) if rng.random() < split.flawed_share else None
    answer = flawed_answer(conv, flaw, rng) if flaw else call_text(arguments(conv.deal))
    return training_row(row_id, conv, system, flaw, answer)


def draw_flaw(rng: random.Random, split: SplitParams) -> str:
    if not split.flaw_weights:
        return rng.choice(FLAW_KINDS)
    kinds, weights = zip(*split.flaw_weights, strict=True)
    return rng.choices(kinds, weights=weights)[0]


def draw_split(name: str, params: DataParams, split: SplitParams, taken: set[str]) -> list[dict[str, Any]]:
    """`split.rows` rows from the split's own RNG stream, skipping messages whose key is in `taken`."""
    rng = random.Random(f"{params.seed}:{name}")
    rows: list[dict[str, Any]] = []
    while len(rows) < split.rows:
        row = draw_training_row(f"{name}-{len(rows):05d}", rng, params, split)
        if user_key(user_text(row)) not in taken:
            rows.append(row)
    return rows


def draw_golden(params: DataParams) -> list[dict[str, Any]]:
    rng = random.Random(f"{params.seed}:golden")
    rows: dict[str, dict[str, Any]] = {}
    while len(rows) < params.golden.rows:
        conv = draw_conversation(rng, params)
        rows.setdefault(user_key(conv.user), golden_row(f"crm-{len(rows):04d}", conv))
    return list(rows.values())


def user_text(row: dict[str, Any]) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def build_splits(params: DataParams) -> dict[str, list[dict[str, Any]]]:
    """Every split, by name: golden, base, clean-v1, clean-v2 (clean-v1 plus more fixed rows), noisy and vendor."""
    golden = draw_golden(params)
    taken = {user_key(user_text(row)) for row in golden}
    clean_v1 = draw_split("clean-v1", params, params.clean_v1, taken)
    return {
        "golden": golden,
        "base": draw_split("base", params, params.base, taken),
        "clean-v1": clean_v1,
        "clean-v2": clean_v1 + draw_split("clean-v2-extra", params, params.clean_v2_extra, taken),
        "noisy": draw_split("noisy", params, params.noisy, taken),
        "vendor": draw_split("vendor", params, params.vendor, taken),
    }


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """Canonical JSON lines (sorted keys, UTF-8): the bytes whose SHA-256 names a dataset snapshot."""
    return b"".join(json.dumps(row, ensure_ascii=False, sort_keys=True).encode() + b"\n" for row in rows)
