"""Every key of params.yaml reaches the code it governs: each leaf key of `run_defaults`, each key a
scale, an experiment or the file itself may have, is read somewhere in src/trainability (a key nobody
reads is a setting that silently does nothing)."""
import inspect
import re
from pathlib import Path

import yaml

from trainability.scheduler import NoiseCurvatureScheduler

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "src" / "trainability").rglob("*.py")))
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())

# Blocks handed over whole, whose keys are consumed structurally rather than by name:
#   scheduler.* -> scheduler.build_scheduler passes the block as keyword arguments of
#                  NoiseCurvatureScheduler, so each key must be one of its parameters.
STRUCTURAL = {"scheduler": set(inspect.signature(NoiseCurvatureScheduler.__init__).parameters)}


def leaf_keys(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out += leaf_keys(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
    return out


def is_read(path: tuple, source: str = SOURCE) -> bool:
    """`key` of `path` is read: cfg[...]["key"], .get("key"...), or a parameter of the structural
    consumer of its block."""
    *block, key = path
    if block and block[0] in STRUCTURAL:
        return key in STRUCTURAL[block[0]]
    q = re.escape(key)
    return re.search(rf"""\[\s*["']{q}["']\s*\]|\.get\(\s*["']{q}["']""", source) is not None


def all_keys() -> list[tuple]:
    keys = [(k,) for k in PARAMS]                                       # scale, results_dir, scales, ...
    keys += leaf_keys(PARAMS["run_defaults"])
    keys += sorted({(k,) for s in PARAMS["scales"].values() for k in s})       # seeds, run, batched, ...
    keys += sorted({(k,) for e in PARAMS["experiments"].values() for k in e})  # title, runs
    return keys


def test_every_params_key_is_read_in_src():
    unused = [".".join(k) for k in all_keys() if not is_read(k)]
    assert not unused, f"params.yaml keys that no code in src/trainability reads: {unused}"


def test_an_unread_key_is_reported():
    assert not is_read(("measure", "made_up_key_nobody_reads"))
    assert not is_read(("scheduler", "made_up_key_nobody_reads"))
    assert not is_read(("eig_tol",), source='print("eig_tol")')       # a mention is not a read
    assert is_read(("eig_tol",), source='cfg["measure"]["eig_tol"]')


def test_the_measurement_settings_reach_the_sharpness_indicator():
    """measure.eig_tol / measure.eig_max_iter govern every eigen-solve, the sharpness indicator's too: both
    engines measure the indicators through indicators.task_start_indicators, which passes them on."""
    src = ROOT / "src" / "trainability"
    text = (src / "indicators.py").read_text()
    call = text[text.index("def task_start_indicators("):]
    call = call[:call.index("\n\n")]
    assert 'eig_tol=m["eig_tol"]' in call and 'eig_max_iter=m["eig_max_iter"]' in call
    for engine in ("train.py", "stacked/engine.py"):
        text = (src / engine).read_text()
        assert "task_start_indicators(" in text and "compute_indicators(" not in text, engine
