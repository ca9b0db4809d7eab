"""The project as it is deployed: its wheel, built from the tracked sources alone, installed with
the pinned constraints in a fresh virtualenv, outside the source tree (``test_wheel.py``).

The suite's own venv has the project installed editable, which reads every file from the work
tree, so it cannot see what a build leaves out; and a work tree that had an editable install
carries an ``*.egg-info`` whose file list makes setuptools include files that the package data
does not declare. Building from a copy of the tracked files sees what a clean clone builds.
Building and installing take about a minute, mostly pip; it runs in the background
(``conftest.installed_wheel``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Never part of a clean clone's build: local state, caches, earlier builds.
_NOT_SOURCES = (".git", ".venv", "*.egg-info", "build", "dist", ".refgen", "*_cache", "__pycache__")


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path

    @property
    def refgen(self) -> list[str]:
        return [str(self.venv / "bin" / "refgen")]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def tracked_sources(into: Path) -> Path:
    """A copy of what a clean clone holds: ``git ls-files`` where there is a repository,
    otherwise the tree without local state."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file():
                (into / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, into / name)
    else:
        shutil.copytree(
            ROOT, into, ignore=shutil.ignore_patterns(*_NOT_SOURCES), dirs_exist_ok=True
        )
    return into


def build_and_install(tmp: Path) -> Installed:
    """Raises ``subprocess.CalledProcessError`` (with pip's output) when a step fails."""
    sources = tracked_sources(tmp / "src")
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(sources)], tmp)
    [wheel] = dist.glob("refgen-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp)
    _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "constraints.txt"),
            str(wheel),
        ],
        tmp,
    )
    return Installed(venv=venv, wheel=wheel)


def _run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
