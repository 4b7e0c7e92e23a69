"""Lineage manifests and hashes: what each built model was made from, how it scored, and who approved it. Pure.

`to_toml` writes the small TOML subset the manifests need (strings, numbers, booleans, arrays of those, nested
tables), read back with the standard `tomllib`. The field names of an adapter's `lineage.toml` are the ones the
gateway's catalog reads (`gateway/adapters.py`): name, version, base_model, base_sha256, dataset_sha256,
dataset_rows, adapter_sha256, created, approvers, [training], [evaluation] (golden_set, n, invalid_call_rate,
task_success); the rest is extra detail for people.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

Scalar = str | int | float | bool

ADAPTER_KEYS = (
    "name",
    "version",
    "base_model",
    "base_sha256",
    "dataset_sha256",
    "dataset_rows",
    "adapter_sha256",
    "created",
    "approvers",
    "training",
    "evaluation",
)
EVALUATION_KEYS = ("golden_set", "golden_sha256", "n", "invalid_call_rate", "task_success")
TRAINING_KEYS = ("steps", "lr", "batch", "r", "alpha", "seed")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML has no place for {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Scalars first, then each sub-table under its dotted header."""
    lines = [f"{key} = {_scalar(value)}" for key, value in data.items() if not isinstance(value, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{prefix}{key}"
            out += f"\n[{name}]\n" + to_toml(value, f"{name}.")
    return out


def missing_keys(lineage: Mapping[str, Any]) -> list[str]:
    """The adapter lineage fields the gateway and the tests require that `lineage` lacks."""
    missing = [k for k in ADAPTER_KEYS if k not in lineage]
    missing += [f"evaluation.{k}" for k in EVALUATION_KEYS if k not in lineage.get("evaluation", {})]
    missing += [f"training.{k}" for k in TRAINING_KEYS if k not in lineage.get("training", {})]
    return missing
