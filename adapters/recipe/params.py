"""Every knob of the recipe in one frozen value, and the recipe hash that keys the build cache.

`RECIPE` is the recipe `build.py` runs. Its hash is the SHA-256 of the recipe's Python sources (every
`adapters/recipe/*.py`), the knowledge base (`policies/kb/crm`) and `gateway/retrieval.py` (by path and bytes), and
of these parameters as canonical JSON: change either and the next
build rebuilds. The knobs that set the golden-set rates are the flawed shares (`DataParams.base` and
`DataParams.noisy`), the training lengths and `SamplingParams.temperature` / `top_p`.
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
    """One data split: how many rows, the share of flawed answers, and the mix of system prompts (weights)."""

    rows: int
    flawed_share: float
    system_weights: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class DataParams:
    seed: int = 20260301
    accounts: int = 120
    relative_date_share: float = 0.15
    note_share: float = 0.0  # notes in messages: 0, see synth.py
    today_share: float = 0.35  # messages with an absolute date that still say what day it is
    golden: SplitParams = SplitParams(300, 0.0, (("none", 1.0),))
    base: SplitParams = SplitParams(8000, 0.50, (("rag", 0.25), ("short", 0.15), ("none", 0.6)))
    clean_v1: SplitParams = SplitParams(2000, 0.0, (("none", 0.5), ("short", 0.25), ("rag", 0.25)))
    clean_v2_extra: SplitParams = SplitParams(2000, 0.0, (("none", 0.5), ("short", 0.25), ("rag", 0.25)))
    noisy: SplitParams = SplitParams(2000, 0.80, (("none", 0.5), ("short", 0.25), ("rag", 0.25)))


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
    top_k: int = 0  # 0 disables top-k in both transformers and vLLM
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
    base_train: TrainParams = TrainParams(steps=550, lr=3e-3, batch=16, seed=11, warmup=30)
    adapters: tuple[AdapterSpec, ...] = field(
        default=(
            AdapterSpec("1", "clean-v1", TrainParams(250, 2e-3, 16, 21), ("maria.keller@example.com",)),
            AdapterSpec("2", "clean-v2", TrainParams(150, 1e-3, 16, 22), ("maria.keller@example.com",), "1"),
            AdapterSpec("3", "noisy", TrainParams(200, 3e-3, 16, 23), (), "2"),
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
