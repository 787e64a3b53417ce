"""The code follows the linter configured in pyproject.toml ([tool.ruff]: line length 120, pycodestyle,
pyflakes): `ruff check src tests workflow bench` passes."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff is not installed: it is in the `test` extra (./install.sh installs it)")


def test_ruff_check_passes():
    out = subprocess.run(_ruff() + ["check", "src", "tests", "workflow", "bench"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
