"""The gateway is a service of its own: it reads Redis and never needs Celery or ``tasks``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gateway_imports_neither_celery_nor_tasks() -> None:
    probe = (
        "import sys, gateway.server, gateway.app;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu', 'tasks'));"
        "print(','.join(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""
