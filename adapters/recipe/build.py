#!/usr/bin/env python3
"""The recipe's entry point: build the demo base model and its LoRA adapters, or skip when they are built.

    python adapters/recipe/build.py [--out DIR] [--adapters DIR] [--force] [--check | --record]

Writes `loadtests/golden/crm.jsonl` and its manifest (always; cheap, identical bytes every time), then, unless the
models directory's `build.json` records this recipe's hash, builds in `<out>/.staging` and publishes the base model
to `<out>/base/<base>/`, the training snapshots to `<out>/data/`, and each adapter version to its own directory
`<adapters>/<name>/<version>/` (the gateway's catalog, `GATEWAY_ADAPTERS_DIR`). Published model directories are
immutable (vLLM caches an adapter by name and path): a rebuild whose weights equal what is published only
refreshes `lineage.toml`; one whose weights differ stops and asks for `--force`. Run it with the engine venv's
python (torch, transformers, tokenizers, peft, jsonschema).

Its arithmetic is pinned (`cpu.py`: AVX2 kernels, fixed threads), so every x86-64 machine with AVX2 builds the
same bytes, and `weights.json` beside this file records the SHA-256 of every file of every model directory. Each
run compares the build with that record and names any file that differs; `--check` makes a difference an error
(exit 2; `make test` runs it so), `--record` rewrites the record from the build after a deliberate recipe change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: make `adapters.recipe` importable
    sys.path.insert(0, str(REPO))

from adapters.recipe import cpu, params, synth  # noqa: E402
from gateway.digests import sha256_bytes, sha256_file  # noqa: E402

DEFAULT_MODELS = REPO / "var" / "models"
DEFAULT_ADAPTERS = REPO / "adapters"

GOLDEN = REPO / "loadtests" / "golden" / "crm.jsonl"
GOLDEN_MANIFEST = GOLDEN.with_name("crm.manifest.json")
BUILD_FILE = "build.json"
RECORDED = Path(__file__).resolve().with_name("weights.json")
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
    digest = sha256_bytes(data)
    manifest = {
        "file": GOLDEN.name,
        "sha256": digest,
        "rows": len(rows),
        "seed": recipe.data.seed,
        "generator": "adapters/recipe/synth.py (draw_golden)",
        "disjoint_from": ["base", "clean-v1", "clean-v2", "noisy", "vendor"],
    }
    write_if_changed(GOLDEN, data)
    write_if_changed(GOLDEN_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return digest


@dataclass(frozen=True)
class Layout:
    """Where a build goes: `models` holds the base model, data snapshots, `build.json` and the staging area;
    `adapters` holds one directory per adapter version. Staging mirrors the published names (`base/<base>`,
    `adapters/<name>/<version>`)."""

    models: Path
    adapters: Path

    def staged(self, recipe: params.Recipe) -> list[Path]:
        """The model directories a build makes, relative to the staging directory."""
        adapters = [Path("adapters") / recipe.adapter_name / spec.version for spec in recipe.adapters]
        return [Path("base") / recipe.base_name, *adapters]

    def published(self, staged: Path) -> Path:
        if staged.parts[0] == "adapters":
            return self.adapters.joinpath(*staged.parts[1:])
        return self.models / staged

    @property
    def staging(self) -> Path:
        return self.models / ".staging"


def cached(layout: Layout, recipe: params.Recipe, digest: str) -> bool:
    try:
        record = json.loads((layout.models / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False
    complete = all((layout.published(d) / "lineage.toml").is_file() for d in layout.staged(recipe))
    return record.get("recipe_hash") == digest and complete


def identity(path: Path) -> dict[str, str]:
    """{relative file: sha256} of a model directory, metadata files excluded."""
    return {
        str(f.relative_to(path)): sha256_file(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name not in MUTABLE
    }


def check_immutable(layout: Layout, recipe: params.Recipe, force: bool) -> None:
    changed = [
        str(layout.published(d))
        for d in layout.staged(recipe)
        if layout.published(d).exists() and identity(layout.published(d)) != identity(layout.staging / d)
    ]
    if changed and not force:
        raise Refused(
            f"{', '.join(changed)} already hold other weights or files; model directories are immutable (vLLM "
            f"caches adapters by name and path). Pass --force to replace them, or build elsewhere with --out and "
            f"--adapters (this build is left in {layout.staging} for inspection)."
        )


def publish(layout: Layout, recipe: params.Recipe) -> None:
    """Move each staged directory into place; an unchanged model directory only gets its new lineage.toml."""
    targets = []
    for d in layout.staged(recipe):
        target = layout.published(d)
        targets.append(target)
        if target.exists() and identity(target) == identity(layout.staging / d):
            shutil.copyfile(layout.staging / d / "lineage.toml", target / "lineage.toml")
            continue
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        (layout.staging / d).rename(target)
    shutil.rmtree(layout.models / "data", ignore_errors=True)
    (layout.staging / "data").rename(layout.models / "data")
    for path in (p for t in [*targets, layout.models / "data"] for p in t.rglob("*")):
        if path.is_file():  # safetensors writes 0600; an engine running as another user must read it
            path.chmod(0o644)


def build(
    layout: Layout, recipe: params.Recipe, digest: str, splits: dict[str, list[dict[str, Any]]], force: bool
) -> None:
    cpu.pin(os.environ, recipe.threads)  # before torch loads: its libraries read the pins once, as they load
    import torch

    from adapters.recipe.pipeline import Build  # torch & co. load only when a build runs

    if (problem := cpu.check(torch)) is not None:
        log(f"WARNING: {problem}")
    started = time.perf_counter()
    shutil.rmtree(layout.staging, ignore_errors=True)
    job = Build(recipe, digest, splits, layout.staging, log)
    job.run()
    check_immutable(layout, recipe, force)
    publish(layout, recipe)
    shutil.rmtree(layout.staging, ignore_errors=True)
    seconds = round(time.perf_counter() - started, 1)
    record = {
        "recipe_hash": digest,
        "golden_sha256": job.golden_sha,
        "adapters_dir": str(layout.adapters),
        "results": job.results,
        "timings_s": {**job.timings, "total": seconds},
        "versions": versions(),
        "cpu_capability": cpu.capability(torch),
        "note": "timings and versions describe this run; they are not part of any model's identity",
    }
    (layout.models / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"built {layout.models} and {layout.adapters} in {seconds} s")


def build_files(layout: Layout, recipe: params.Recipe) -> dict[str, str]:
    """{model directory/file: sha256} over every published model directory, metadata (lineage.toml) excluded."""
    return {
        f"{d.as_posix()}/{name}": digest
        for d in layout.staged(recipe)
        for name, digest in identity(layout.published(d)).items()
    }


def differences(recorded: dict[str, Any], found: dict[str, str], digest: str) -> list[str]:
    """What differs between the recorded build and this one, one line a file (empty: the same bytes)."""
    if not recorded:
        return [f"there is no {RECORDED.name} to compare with (`build.py --record` writes it)"]
    if recorded.get("recipe_hash") != digest:
        return [
            f"{RECORDED.name} records the build of another recipe (hash {str(recorded.get('recipe_hash'))[:12]}…, "
            f"this one {digest[:12]}…): after a deliberate recipe change, check the golden-set rates and record "
            f"this build with `build.py --record`"
        ]
    files: dict[str, str] = recorded["files"]
    lines = [
        f"{name}: sha256 {found[name][:12] if name in found else '(missing)'}…, recorded {want[:12]}…"
        for name, want in sorted(files.items())
        if found.get(name) != want
    ]
    return lines + [f"{name}: not in the record" for name in sorted(found.keys() - files.keys())]


def verify(layout: Layout, recipe: params.Recipe, digest: str) -> list[str]:
    """Compare the published build with `weights.json`: what differs, one line a file, and a last line saying
    what to look at (empty: the same bytes). Logged as well."""
    record = json.loads(RECORDED.read_text()) if RECORDED.is_file() else {}
    lines = differences(record, build_files(layout, recipe), digest)
    if not lines:
        log(f"every model file matches {RECORDED.name} ({len(record['files'])} files)")
        return []
    lines.append(hint(layout, record))
    for line in lines:
        log(f"DIFFERS {line}")
    return lines


def hint(layout: Layout, record: dict[str, Any]) -> str:
    built = json.loads((layout.models / BUILD_FILE).read_text())
    return (
        f"what to look at: this build ran {built.get('cpu_capability', '?')} kernels (the record: "
        f"{record.get('cpu_capability', '?')}; {RECORDED.parent.name}/cpu.py pins them before torch loads), "
        f"torch {built.get('versions', {}).get('torch', '?')} (the record: {record.get('torch', '?')}), and "
        f"whether the recipe changed on purpose (then `build.py --record`)"
    )


def record_build(layout: Layout, recipe: params.Recipe, digest: str) -> None:
    built = json.loads((layout.models / BUILD_FILE).read_text())
    record = {
        "recipe_hash": digest,
        "cpu_capability": built["cpu_capability"],
        "torch": built["versions"]["torch"],
        "files": build_files(layout, recipe),
    }
    RECORDED.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log(f"recorded {len(record['files'])} files in {RECORDED.relative_to(REPO)}")


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
        "--out", type=Path, default=DEFAULT_MODELS, help="base model, data and build record (var/models)"
    )
    parser.add_argument(
        "--adapters",
        type=Path,
        default=DEFAULT_ADAPTERS,
        help="adapter versions, <name>/<version>/ (adapters)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even when DIR holds this recipe's build"
    )
    after = parser.add_mutually_exclusive_group()
    after.add_argument(
        "--check", action="store_true", help=f"exit 2 when the build differs from {RECORDED.name}"
    )
    after.add_argument("--record", action="store_true", help=f"write {RECORDED.name} from this build")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe, digest = params.RECIPE, params.recipe_hash()
    layout = Layout(args.out.resolve(), args.adapters.resolve())
    splits = synth.build_splits(recipe.data)
    golden = splits["golden"]
    log(
        f"golden set: {GOLDEN.relative_to(REPO)} ({len(golden)} rows, sha256 {write_golden(golden, recipe)[:12]}…)"
    )
    if not args.force and cached(layout, recipe, digest):
        log(
            f"{layout.models} holds this recipe's build (recipe hash {digest[:12]}…): nothing to do (--force rebuilds)"
        )
    else:
        try:
            build(layout, recipe, digest, splits, args.force)
        except Refused as exc:
            log(f"refused: {exc}")
            return 1
    if args.record:
        record_build(layout, recipe, digest)
        return 0
    return 2 if verify(layout, recipe, digest) and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
