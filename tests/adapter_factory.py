"""Builds adapter version directories the way the recipe does (peft files + lineage.toml), for tests that must
not train anything: small float32 LoRA matrices in a hand-written safetensors file."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

BASE_SHA = "b" * 64
DATASET_SHA = "d" * 64


def adapter_policy(version: str, *, weight: float = 10) -> str:
    """A route whose `formatter` variant serves crm-formatter@<version>, behind a release gate."""
    return f"""
route = "crm-assistant"
fallback = ["baseline"]

[release]
max_invalid_call_rate = 0.03
min_eval_n = 200
require_approvers = true

[variants.baseline]
model = "crm-base"
weight = {100 - weight:g}

[variants.formatter]
adapter = "crm-formatter@{version}"
weight = {weight:g}
"""


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def make_adapter(
    root: Path,
    name: str = "crm-formatter",
    version: str = "1",
    *,
    rank: int = 8,
    base: str = "crm-base",
    invalid_rate: float = 0.01,
    n: int = 300,
    approvers: tuple[str, ...] = ("maria.keller@example.com",),
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    nan: bool = False,
    seed: int = 0,
) -> Path:
    path = root / name / version
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {
        f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight": rng.normal(
            size=(rank, 16) if ab == "A" else (16, rank)
        ).astype("f4")
        for m in modules
        for ab in "AB"
    }
    if nan:
        first = next(iter(tensors))
        tensors[first][0, 0] = np.nan
    weights = safetensors_bytes(tensors)
    (path / "adapter_model.safetensors").write_bytes(weights)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": f"var/models/base/{base}",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    approver_list = ", ".join(f'"{a}"' for a in approvers)
    (path / "lineage.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nbase_model = "{base}"\nbase_sha256 = "{BASE_SHA}"\n'
        f'dataset_sha256 = "{DATASET_SHA}"\ndataset_rows = 4000\n'
        f'adapter_sha256 = "{hashlib.sha256(weights).hexdigest()}"\ncreated = "2026-03-01T12:00:00Z"\n'
        f"approvers = [{approver_list}]\n\n[training]\nsteps = 200\nlr = 0.001\nr = {rank}\nseed = {seed}\n\n"
        f'[evaluation]\ngolden_set = "loadtests/golden/crm.jsonl"\nn = {n}\ninvalid_call_rate = {invalid_rate}\n'
        "task_success = 0.95\n"
    )
    return path
