"""bench/ is a lab, but a kept one: every script bench/README.md lists as kept starts (its --help, or
`bash -n` for a shell script) against the package as it is, every script in bench/ is listed there, and
none imports from tests/."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def listed() -> dict[str, str]:
    """{script: status} from bench/README.md's table."""
    text = (BENCH / "README.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \|.*\| (kept|superseded)[^|]*\|$", text, re.M)}


SCRIPTS = sorted(p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh"))


def test_every_script_is_listed_and_every_kept_one_exists():
    status = listed()
    assert set(SCRIPTS) - set(status) == set(), "scripts missing from bench/README.md"
    kept = {s for s, st in status.items() if st == "kept"}
    assert kept <= set(SCRIPTS), f"listed as kept but not in bench/: {sorted(kept - set(SCRIPTS))}"
    assert not {s for s, st in status.items() if st == "superseded"} & set(SCRIPTS), "superseded scripts are deleted"


@pytest.mark.parametrize("script", SCRIPTS)
def test_nothing_imports_from_tests(script):
    text = (BENCH / script).read_text()
    assert not re.search(r"^\s*(from|import) test_|tests\"?\)?\]", text, re.M), script


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.endswith(".py")])
def test_script_help_runs(script):
    path = os.pathsep.join([str(ROOT / "src"), str(BENCH), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "usage" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.endswith(".sh")])
def test_shell_script_parses(script):
    out = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
