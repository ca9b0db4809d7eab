"""The contract lives in the repository: the README's links and the paths it names resolve
inside it, nothing points outside the checkout, and docs/contract.md's examples are what the
models accept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from worker.models import ReferenceImages
from worker.planning import parse_plan

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "contract.md"]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*```")
# A path in backticks that names a file of this repository: a folder and a file name with one
# of the project's extensions (`worker/lua/commit_result.lua`, `tests/fakes/`).
_PATH = re.compile(
    r"`((?:[A-Za-z0-9_.-]+/)+(?:[A-Za-z0-9_.-]+\.(?:py|lua|md|json|yml|yaml|html|txt|toml))?)`"
)


def prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside its code blocks."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens; a
    repeated heading gets -1, -2, ..."""
    found: set[str] = set()
    for line in prose(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def links(path: Path) -> list[str]:
    return [target for line in prose(path) for target in _LINK.findall(line)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(doc: Path) -> None:
    targets = links(doc)
    assert targets, f"{doc.name} has no links: the pattern no longer finds them"
    broken = []
    for target in targets:
        file_part, _, anchor = target.partition("#")
        if re.match(r"^[a-z][a-z0-9+.-]*:", file_part):
            broken.append(f"{target}: points outside the repository")
            continue
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_named_exists(doc: Path) -> None:
    named = {
        p for line in doc.read_text(encoding="utf-8").splitlines() for p in _PATH.findall(line)
    }
    assert named, f"{doc.name} names no paths: the pattern no longer finds them"
    relative_to = ROOT if doc.parent == ROOT else doc.parent
    missing = sorted(
        p for p in named if not (ROOT / p).exists() and not (relative_to / p).resolve().exists()
    )
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


_NOT_OURS = ("__pycache__", "artifacts", "build", "dist")


def project_files() -> list[Path]:
    """The checkout's own files: hidden folders (.git, .venv, caches) and what is built or
    generated from it (.gitignore's) left out."""
    found = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in _NOT_OURS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and path.suffix not in (".png", ".pyc"):
            found.append(path)
    return found


def test_nothing_in_the_repository_points_outside_the_checkout() -> None:
    outside = ".." + "/shared"  # spelt in two parts so that this file does not match itself
    files = project_files()
    offenders = [
        str(path.relative_to(ROOT))
        for path in files
        if outside in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert len(files) > 50 and not offenders, f"these files refer to {outside}: {offenders}"


def json_examples(path: Path) -> list[object]:
    blocks, current, inside = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == "```json":
            inside, current = True, []
        elif inside and _FENCE.match(line):
            inside = False
            blocks.append(json.loads("\n".join(current)))
        elif inside:
            current.append(line)
    return blocks


def test_the_contracts_examples_are_what_the_models_accept() -> None:
    examples = json_examples(ROOT / "docs" / "contract.md")
    plans = [e for e in examples if isinstance(e, dict) and "scenes" in e]
    results = [e for e in examples if isinstance(e, dict) and "scene_references" in e]
    assert plans and results
    for plan in plans:
        parsed = parse_plan(plan)
        assert parsed.unique_scenes() and parsed.unique_characters()
    for result in results:
        assert ReferenceImages.model_validate(result).model_dump(mode="json") == result
