"""Recovery as users meet it (issue 38): each fault injected, the outcome asserted. Damaged files get one
line naming the file and the remedy; bad values are refused before any compute; a rerun repairs what it
can. The Snakemake probes run `snakemake -n` on a scratch copy of the workflow (seconds each)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(*args, cwd=ROOT, check=True, timeout=600, env=None):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", **(env or {}))
    p = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def workflow_copy(tmp_path):
    """The workflow's files (Snakefile, workflow/, params.yaml, profiles/) in a scratch folder."""
    for f in ("Snakefile", "params.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    for d in ("workflow", "profiles"):
        shutil.copytree(ROOT / d, tmp_path / d)
    return tmp_path


def test_snakemake_names_line_and_column_of_a_yaml_error(workflow_copy):
    p = workflow_copy / "params.yaml"
    lines = p.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("  optim: {lr: 1.0e-3"))
    lines[n] = lines[n].replace("betas: [", "betas: [[")
    p.write_text("\n".join(lines) + "\n")
    out = sh(BIN / "snakemake", "-n", cwd=workflow_copy, check=False)
    assert out.returncode != 0
    assert "params.yaml is not valid YAML at line " in out.stdout + out.stderr, out.stdout[-2000:]
    assert ", column " in out.stdout + out.stderr


def test_schema_hint_about_config_strings_only_with_a_config(workflow_copy):
    p = workflow_copy / "params.yaml"
    p.write_text(p.read_text().replace("optim: {lr: 1.0e-3,", "optim: {lr: .nan,"))
    plain = sh(BIN / "snakemake", "-n", cwd=workflow_copy, check=False)
    assert plain.returncode != 0 and "run_defaults.optim.lr: nan is not a finite number" in plain.stdout + plain.stderr
    assert "--config passes nested values" not in plain.stdout + plain.stderr
    given = sh(BIN / "snakemake", "-n", "--config", "scale=smoke", cwd=workflow_copy, check=False)
    assert given.returncode != 0 and "--config passes nested values" in given.stdout + given.stderr
