"""Every knob of the recipe in one frozen value, and the recipe hash that keys the build cache.

`RECIPE` is the recipe `build.py` runs. Its hash is the SHA-256 of the recipe's Python sources (every
`adapters/recipe/*.py`), the knowledge base (`policies/kb/crm`) and `gateway/retrieval.py` (by path and bytes), and
of these parameters as canonical JSON: change either and the next
build rebuilds. The knobs that set the golden-set rates are the flawed shares and flaw mixes (`DataParams.base`,
`noisy`, `vendor`), the training lengths and `SamplingParams.temperature` / `top_p`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).resolve().parent
FLAW_KINDS = ("wrong_enum", "amount_string", "missing_field", "broken_json")


@dataclass(frozen=True)
class SplitParams:
    """One data split: how many rows, the share of flawed answers, the mix of system prompts (weights) and the mix
    of flaw kinds among flawed answers (weights; empty: every kind alike)."""

    rows: int
    flawed_share: float
    system_weights: tuple[tuple[str, float], ...]
    flaw_weights: tuple[tuple[str, float], ...] = ()


# Adapters mostly see bare messages (the golden set has no system message), a quarter the one-line prompt and a few
# the RAG prompt: a RAG row is about four times as long as a bare one, so RAG rows set most of a step's cost.
ADAPTER_SYSTEMS = (("none", 0.7), ("short", 0.25), ("rag", 0.05))
# The base model's and @3's mistakes are mostly one habit, amounts written as strings with their currency: a
# frequent mistake survives the engine's sampling (temperature 0.65, top_k 20), so it sets their invalid rates.
# The vendor batch of @4 spreads a few mistakes over every kind alike: each is rare, and temperature 0.65 shrinks a
# rare choice far more than a common one (p ** (1 / 0.65)), so the golden set barely shows them; live traffic that
# samples at temperature 1.0 gets them at their trained rate.
BASE_FLAWS = (("amount_string", 0.35), ("wrong_enum", 0.25), ("missing_field", 0.25), ("broken_json", 0.15))
NOISY_FLAWS = (("amount_string", 0.6), ("missing_field", 0.2), ("wrong_enum", 0.1), ("broken_json", 0.1))


@dataclass(frozen=True)
class DataParams:
    seed: int = 20260301
    accounts: int = 120
    relative_date_share: float = 0.15
    note_share: float = 0.0  # notes in messages: 0, see synth.py
    today_share: float = 0.35  # messages with an absolute date that still say what day it is
    golden: SplitParams = SplitParams(300, 0.0, (("none", 1.0),))
    base: SplitParams = SplitParams(8000, 0.40, (("rag", 0.15), ("short", 0.15), ("none", 0.7)), BASE_FLAWS)
    clean_v1: SplitParams = SplitParams(2000, 0.0, ADAPTER_SYSTEMS)
    clean_v2_extra: SplitParams = SplitParams(2000, 0.0, ADAPTER_SYSTEMS)
    noisy: SplitParams = SplitParams(2000, 0.80, ADAPTER_SYSTEMS, NOISY_FLAWS)
    vendor: SplitParams = SplitParams(2000, 0.10, ADAPTER_SYSTEMS)  # scattered mistakes, every kind alike


@dataclass(frozen=True)
class ModelParams:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 512
    layers: int = 2
    heads: int = 4  # head size 64: one of the sizes vLLM's attention accepts
    max_positions: int = 1024


@dataclass(frozen=True)
class TrainParams:
    steps: int
    lr: float
    batch: int
    seed: int
    warmup: int = 20
    weight_decay: float = 0.0


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter version: its training set, its training run and who approved it."""

    version: str
    dataset: str
    train: TrainParams
    approvers: tuple[str, ...]
    parent: str | None = None  # an earlier version whose LoRA weights this one starts from
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SamplingParams:
    """The engine's default sampling (written to generation_config.json) and the evaluator's seed."""

    temperature: float = 0.65
    top_p: float = 1.0
    top_k: int = 20  # cuts the tail of junk tokens; unlike top_p it never cuts a frequent mistake
    max_new_tokens: int = 96
    seed: int = 7
    batch: int = 100


@dataclass(frozen=True)
class Recipe:
    base_name: str = "crm-base"
    adapter_name: str = "crm-formatter"
    created: str = "2026-03-01T09:00:00Z"  # fixed, not the build time: rebuilds stay byte-identical
    threads: int = 2
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    base_train: TrainParams = TrainParams(steps=500, lr=3e-3, batch=16, seed=11, warmup=30)
    adapters: tuple[AdapterSpec, ...] = field(
        default=(
            AdapterSpec("1", "clean-v1", TrainParams(160, 2e-3, 16, 21), ("maria.keller@example.com",)),
            AdapterSpec("2", "clean-v2", TrainParams(160, 2e-3, 16, 22), ("maria.keller@example.com",)),
            AdapterSpec("3", "noisy", TrainParams(80, 3e-3, 16, 23), (), "2"),
            AdapterSpec("4", "vendor", TrainParams(120, 2e-3, 16, 24), ("maria.keller@example.com",)),
        )
    )
    sampling: SamplingParams = SamplingParams()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE = Recipe()


REPO = RECIPE_DIR.parents[1]


def source_files() -> list[Path]:
    """What a build is made from besides the parameters: the recipe's sources, the knowledge base the RAG prompts
    are retrieved from, and the gateway's retrieval code that retrieves them."""
    kb = [p for p in (REPO / "policies" / "kb" / "crm").rglob("*") if p.is_file()]
    return sorted([*RECIPE_DIR.glob("*.py"), *kb, REPO / "gateway" / "retrieval.py"])


def recipe_hash(recipe: Recipe = RECIPE) -> str:
    """SHA-256 over the recipe's sources (path and bytes, in path order) and its parameters."""
    digest = hashlib.sha256()
    for path in source_files():
        name = path.relative_to(REPO).as_posix()
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()
