"""The checks in front of the engine: a broken adapter never reaches it, and the error names the check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.control.adapters import AdapterRejected, EngineFacts, scan, verify
from tests.adapter_factory import BASE_SHA, make_adapter

ENGINE = EngineFacts(base_model="crm-base", max_lora_rank=16, base_sha256=BASE_SHA)


def rejected(root: Path, ref: str, engine: EngineFacts = ENGINE) -> str:
    version = scan(root).get(ref)
    assert version is not None
    with pytest.raises(AdapterRejected) as err:
        verify(version, engine)
    assert ref in err.value.message
    return err.value.check


def test_a_good_adapter_passes_and_is_listed_with_its_lineage(tmp_path: Path) -> None:
    make_adapter(tmp_path, version="1")
    make_adapter(tmp_path, version="2", seed=1)
    catalog = scan(tmp_path)
    assert [v.ref for v in catalog] == ["crm-formatter@1", "crm-formatter@2"]
    version = catalog.get("crm-formatter@2")
    assert version is not None and version.problem is None and version.lineage is not None
    assert version.lineage.evaluation.n == 300 and version.lineage.approvers == ["maria.keller@example.com"]
    verify(version, ENGINE)


def test_wrong_base_model(tmp_path: Path) -> None:
    make_adapter(tmp_path, base="other-base")
    assert rejected(tmp_path, "crm-formatter@1") == "base_model"
    make_adapter(tmp_path, version="2")
    assert (
        rejected(tmp_path, "crm-formatter@2", EngineFacts("crm-base", base_sha256="c" * 64)) == "base_model"
    )


def test_rank_too_large(tmp_path: Path) -> None:
    make_adapter(tmp_path, rank=32)
    assert rejected(tmp_path, "crm-formatter@1") == "rank"


def test_tampered_weights(tmp_path: Path) -> None:
    path = make_adapter(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert rejected(tmp_path, "crm-formatter@1") == "weights_sha256"


def test_nan_tensors(tmp_path: Path) -> None:
    make_adapter(tmp_path, nan=True)
    assert rejected(tmp_path, "crm-formatter@1") == "tensors_finite"


def test_missing_lineage(tmp_path: Path) -> None:
    path = make_adapter(tmp_path)
    (path / "lineage.toml").unlink()
    version = scan(tmp_path).get("crm-formatter@1")
    assert version is not None and version.problem == "lineage.toml is missing"
    assert rejected(tmp_path, "crm-formatter@1") == "lineage"


def test_malformed_lineage_and_config(tmp_path: Path) -> None:
    path = make_adapter(tmp_path)
    (path / "lineage.toml").write_text('name = "crm-formatter"\n')
    assert rejected(tmp_path, "crm-formatter@1") == "lineage"
    path = make_adapter(tmp_path, version="2")
    (path / "adapter_config.json").write_text("{not json")
    assert rejected(tmp_path, "crm-formatter@2") == "files"


def test_config_checks(tmp_path: Path) -> None:
    for version, change, check in (
        ("1", {"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ("2", {"bias": "all"}, "bias"),
        ("3", {"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
    ):
        path = make_adapter(tmp_path, version=version)
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert rejected(tmp_path, f"crm-formatter@{version}") == check


def test_missing_weights_and_a_truncated_file(tmp_path: Path) -> None:
    path = make_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    assert rejected(tmp_path, "crm-formatter@1") == "files"
