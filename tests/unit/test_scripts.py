"""The Lua scripts a worker loads at start are exactly those in ``worker/lua/``: a script added
without being listed would be read only when first run, after the start-up check."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import pages
from worker import scripts

ROOT = Path(__file__).resolve().parents[2]


def test_every_script_in_the_folder_is_listed_and_loads() -> None:
    on_disk = {path.stem for path in (ROOT / "worker" / "lua").glob("*.lua")} - {"prelude"}
    assert set(scripts.NAMES) == on_disk
    scripts.load_all()
    assert all(scripts.source(name).startswith("-- ") for name in scripts.NAMES)


def test_an_unlisted_script_is_refused() -> None:
    with pytest.raises(ValueError, match=r"add it to worker\.scripts\.NAMES"):
        scripts.source("not_a_script")


def test_every_page_template_in_the_package_is_listed() -> None:
    on_disk = {path.name for path in (ROOT / "gateway").glob("*.html")}
    assert set(pages.TEMPLATES) == on_disk
    pages.load_templates()
