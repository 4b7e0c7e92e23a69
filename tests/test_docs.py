"""The documents the code and the README send a reader to are in the repository: a comment that cites a file the
reader does not have explains nothing, and a README link to a missing file or heading is a dead end."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where citations live; adapters/ is left out: the recipe names files it writes, not documents to read.
SOURCES = ("gateway", "loadtests", "scripts", "tests")
SUFFIXES = (".py", ".toml")
# `docs/<name>.md`, or a top-level document spelt in capitals (the README): knowledge-base file names in tests and
# data (`deal-stages.md`) are lower case and not citations.
CITATION = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md|[A-Z][A-Z_-]*\.md)\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _source_files() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / "Dockerfile"]
    for top in SOURCES:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return [p for p in files if p.exists()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in markdown.read_text().splitlines() if line.startswith("#")}


def test_every_document_the_code_cites_is_in_the_repository() -> None:
    missing = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in _source_files()
        for name in set(CITATION.findall(path.read_text(errors="replace")))
        if not (ROOT / name).is_file()
    )
    assert missing == []


def test_the_cited_documents_exist_and_the_readme_names_them() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("docs/vllm.md", "docs/canary-statistics.md"):
        assert (ROOT / name).is_file()
        assert f"]({name})" in readme


def test_links_in_the_readme_and_docs_lead_somewhere() -> None:
    broken = []
    for markdown in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(markdown.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (markdown.parent / file_part).resolve() if file_part else markdown
            if not linked.is_file():
                broken.append(f"{markdown.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{markdown.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def _module_map() -> dict[str, str]:
    """The README's module map: each bullet's text by the package it covers ('' for the top level)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Module map", 1)[1].split("\n## ", 1)[0]
    bullets: dict[str, str] = {}
    for bullet in re.split(r"\n- ", section)[1:]:
        package = re.match(r"\*\*`(\w+)/`\*\*", bullet)
        bullets[package.group(1) if package else ""] = bullet
    return bullets


def test_the_readme_module_map_names_every_module_in_its_package() -> None:
    bullets = _module_map()
    missing = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        package = "" if path.parent.name == "gateway" else path.parent.name
        if f"`{path.stem}`" not in bullets.get(package, ""):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules the README's module map does not name: {missing}"
