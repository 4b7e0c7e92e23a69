#!/usr/bin/env python3
"""The recipe's entry point: build the demo base model and its LoRA adapters into DIR, or skip when DIR holds them.

    python adapters/recipe/build.py [--out DIR] [--force]      # DIR defaults to var/models

Writes `loadtests/golden/crm.jsonl` and its manifest (always; cheap, identical bytes every time), then, unless DIR's
`build.json` records this recipe's hash, builds in `DIR/.staging` and publishes: `DIR/base/<base>/`,
`DIR/adapters/<name>/<version>/` and `DIR/data/`. Published model directories are immutable (vLLM caches an adapter
by name and path): a rebuild whose weights equal what DIR holds only refreshes `lineage.toml`; one whose weights
differ stops and asks for `--force`. Run it with the engine venv's python (torch, transformers, tokenizers, peft,
jsonschema).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: make `adapters.recipe` importable
    sys.path.insert(0, str(REPO))

from adapters.recipe import lineage, params, synth  # noqa: E402

GOLDEN = REPO / "loadtests" / "golden" / "crm.jsonl"
GOLDEN_MANIFEST = GOLDEN.with_name("crm.manifest.json")
BUILD_FILE = "build.json"
MUTABLE = frozenset({"lineage.toml"})  # metadata; everything else in a model directory is its identity


class Refused(Exception):
    """Publishing would change an immutable model directory."""


def log(message: str) -> None:
    print(f"[recipe] {message}", flush=True)


def write_if_changed(path: Path, data: bytes) -> None:
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def write_golden(rows: list[dict[str, Any]], recipe: params.Recipe) -> str:
    data = synth.jsonl(rows)
    digest = lineage.sha256_bytes(data)
    manifest = {
        "file": GOLDEN.name,
        "sha256": digest,
        "rows": len(rows),
        "seed": recipe.data.seed,
        "generator": "adapters/recipe/synth.py (draw_golden)",
        "disjoint_from": ["base", "clean-v1", "clean-v2", "noisy"],
    }
    write_if_changed(GOLDEN, data)
    write_if_changed(GOLDEN_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return digest


def model_dirs(root: Path, recipe: params.Recipe) -> list[Path]:
    """The published model directories a build makes, relative to DIR."""
    adapters = [Path("adapters") / recipe.adapter_name / spec.version for spec in recipe.adapters]
    return [Path("base") / recipe.base_name, *adapters]


def cached(out: Path, recipe: params.Recipe, digest: str) -> bool:
    try:
        record = json.loads((out / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False
    complete = all((out / d / "lineage.toml").is_file() for d in model_dirs(out, recipe))
    return record.get("recipe_hash") == digest and complete


def identity(path: Path) -> dict[str, str]:
    """{relative file: sha256} of a model directory, metadata files excluded."""
    return {
        str(f.relative_to(path)): lineage.sha256_file(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name not in MUTABLE
    }


def check_immutable(staging: Path, out: Path, recipe: params.Recipe, force: bool) -> None:
    changed = [
        str(d)
        for d in model_dirs(out, recipe)
        if (out / d).exists() and identity(out / d) != identity(staging / d)
    ]
    if changed and not force:
        raise Refused(
            f"{out} already holds {', '.join(changed)} with different weights or files; model directories are "
            f"immutable (vLLM caches adapters by name and path). Pass --force to replace them, or use another --out."
        )


def publish(staging: Path, out: Path, recipe: params.Recipe) -> None:
    """Move each staged directory into place; an unchanged model directory only gets its new lineage.toml."""
    for d in model_dirs(out, recipe):
        target = out / d
        if target.exists() and identity(target) == identity(staging / d):
            shutil.copyfile(staging / d / "lineage.toml", target / "lineage.toml")
            continue
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / d).rename(target)
    shutil.rmtree(out / "data", ignore_errors=True)
    (staging / "data").rename(out / "data")


def build(
    out: Path, recipe: params.Recipe, digest: str, splits: dict[str, list[dict[str, Any]]], force: bool
) -> None:
    from adapters.recipe.pipeline import Build  # torch & co. load only when a build runs

    started = time.perf_counter()
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    job = Build(recipe, digest, splits, staging, log)
    job.run()
    check_immutable(staging, out, recipe, force)
    publish(staging, out, recipe)
    shutil.rmtree(staging, ignore_errors=True)
    seconds = round(time.perf_counter() - started, 1)
    record = {
        "recipe_hash": digest,
        "golden_sha256": job.golden_sha,
        "results": job.results,
        "timings_s": {**job.timings, "total": seconds},
        "versions": versions(),
        "note": "timings and versions describe this run; they are not part of any model's identity",
    }
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"built {out} in {seconds} s")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        p: version(p) for p in ("torch", "transformers", "tokenizers", "peft", "safetensors", "jsonschema")
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "var" / "models", help="build directory (var/models)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even when DIR holds this recipe's build"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe, digest = params.RECIPE, params.recipe_hash()
    out = args.out.resolve()
    golden = synth.draw_golden(recipe.data)
    log(
        f"golden set: {GOLDEN.relative_to(REPO)} ({len(golden)} rows, sha256 {write_golden(golden, recipe)[:12]}…)"
    )
    if not args.force and cached(out, recipe, digest):
        log(f"{out} holds this recipe's build (recipe hash {digest[:12]}…): nothing to do (--force rebuilds)")
        return 0
    try:
        build(out, recipe, digest, synth.build_splits(recipe.data), args.force)
    except Refused as exc:
        log(f"refused: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
