"""The run record: the one machine-readable output of a run, and the source of every figure.

Layout in docs/DESIGN.md. Written atomically, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .config import config_hash

RECORD_NAME = "record.json"
CHECKPOINT_NAME = "checkpoint.pt"
RECORD_KEYS = ("config", "status", "provenance", "tasks")   # what every reader of a record relies on
REDO = "delete it and run again: that run is redone (snakemake, dvc repro or trainability-run)"


class DamagedFileError(RuntimeError):
    """A record or checkpoint that cannot be read; the message (one line) names the file and the remedy."""

    def __init__(self, path, reason: str, remedy: str = REDO):
        self.path, self.reason, self.remedy = Path(path), reason, remedy
        super().__init__(f"{path} is damaged ({reason}): {remedy}")


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(cfg: dict, device: torch.device) -> dict:
    import numpy

    from . import __version__
    return {
        "package": __version__,
        "git_commit": _git_commit(),
        "config_hash": config_hash(cfg),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def new_record(cfg: dict, device: torch.device, n_layers: int) -> dict:
    """A run's record before training: its decision series per layer "1".."L", and "global" when the run
    measures the whole network (measure.global)."""
    layers = [str(l) for l in range(1, n_layers + 1)] + (["global"] if cfg["measure"]["global"] else [])
    return {
        "config": cfg,
        "seed": cfg["seed"],
        "status": "running",
        "diverged_at_task": None,
        "provenance": provenance(cfg, device),
        "tasks": [],
        "decisions": {"step": [], "task": [], "task_frac": [],
                      "layers": {name: {} for name in layers}},
    }


def append_decision(record: dict, step: int, task: int, task_frac: float, rows: dict) -> None:
    """Append one decision step (rows = scheduler.step output: {layer: {field: value}})."""
    d = record["decisions"]
    d["step"].append(step)
    d["task"].append(task)
    d["task_frac"].append(round(task_frac, 6))
    for layer, row in rows.items():
        series = d["layers"].setdefault(str(layer), {})
        for field, value in row.items():
            series.setdefault(field, []).append(_jsonable(value))


def _jsonable(v):
    # NaN/inf stay as Python's json tokens (NaN, Infinity): records are read back by our code only;
    # the DVC metrics files written by the aggregation step are strict JSON.
    return v.item() if isinstance(v, torch.Tensor) else v


def write_json_atomic(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_record(path: str | Path) -> dict:
    """A run record; a truncated, unparsable or incomplete file raises DamagedFileError naming it."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, f"not valid JSON: {e.msg} at character {e.pos}") from None
    except UnicodeDecodeError:
        raise DamagedFileError(path, "not UTF-8 text") from None
    missing = [k for k in RECORD_KEYS if k not in rec] if isinstance(rec, dict) else list(RECORD_KEYS)
    if missing:
        raise DamagedFileError(path, f"no {', '.join(missing)}")
    return rec


def damaged(path: str | Path) -> str | None:
    """Why the record at `path` is damaged, from its first and last bytes (free, whatever its size, so
    the pipeline checks every record before planning), or None. A record is written by
    write_json_atomic from new_record's dict: it starts with '{"config":' and ends with '}'. This finds
    a truncated or emptied file, not a byte changed inside (load_record names that file when read)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(10)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        tail = f.read(1)
    if head != b'{"config":':
        return "empty" if size == 0 else "not a run record"
    if tail != b"}":
        return "truncated"
    return None


# -- a run's life, shared by both engines (train.run and stacked.engine.run_batched write the same records)

def finished_record(path: Path, chash: str) -> dict | None:
    """The record at `path` if its run ended (completed or diverged) under the config hash `chash`, else
    None: the run is (re)done. A truncated or corrupted file is redone too; nothing is lost."""
    if not path.exists():
        return None
    try:
        rec = load_record(path)
    except DamagedFileError as e:
        print(f"warning: {e.path} is damaged ({e.reason}); running that run again", file=sys.stderr)
        return None
    done = rec["status"] in ("completed", "diverged") and rec["provenance"]["config_hash"] == chash
    return rec if done else None


def end_task(record: dict, t: int, *, online_acc: float, end_loss: float, end_acc: float, steps: int,
             wall_s: float, lr: list, rows: list[dict], indicators, diverged: bool) -> bool:
    """Append task t's entry (rows: the task's decision rows, for Fig. 4's crossings) and apply the NaN
    policy: a run whose loss went non-finite during the task (checked once per epoch) or whose end-of-task
    loss is not finite is recorded as diverged at t, and stops. Returns whether it diverged."""
    from .scheduler import crossings   # here, not at the top: the stages that only read records need no engine
    record["tasks"].append({"task": t, "online_acc": online_acc, "end_loss": end_loss, "end_acc": end_acc,
                            "steps": steps, "wall_s": wall_s, "lr": lr,
                            "crossings": crossings(rows) if rows else None, "indicators": indicators})
    if diverged or not math.isfinite(end_loss):
        record.update(status="diverged", diverged_at_task=t)
        return True
    return False


def finish_record(record: dict, path: Path, rule_counts: dict | None) -> None:
    """A run that ran to its end (or diverged): rule counts, status, finishing time; written atomically."""
    record["rule_counts"] = rule_counts
    if record["status"] == "running":
        record["status"] = "completed"
    record["provenance"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(record, path)


def task_online_acc(correct_full: float, correct_partial: float, steps: int, n: int, B: int,
                    drop_last: bool) -> float:
    """"Task accuracy" (docs/METHOD.md §1): the mean over the task's minibatches of each one's pre-update accuracy,
    a partial minibatch weighing as much as a full one (the authors' mean of per-batch means [code])."""
    last = n % B
    if drop_last or last == 0:
        return (correct_full + correct_partial) / (steps * B)
    return (correct_full + correct_partial * B / last) / (steps * B)


class RunFolderError(RuntimeError):
    """The output folder cannot be written, or another process is writing it."""


@contextlib.contextmanager
def run_folder_lock(out: Path):
    """Check that `out` is writable (before any training) and hold `out/.lock` while the run writes
    there: a second process on the same folder is refused instead of racing on the same files. A lock
    left by a process that no longer runs is taken over."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = out / ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                pid = lock.read_text().strip()
                if pid.isdigit() and _alive(int(pid)):
                    raise RunFolderError(f"{out} is in use by process {pid} (another run with the same "
                                         "--out); wait for it or choose another --out") from None
                lock.unlink(missing_ok=True)   # stale: its process is gone
        else:
            raise RunFolderError(f"could not lock {out}")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:   # read-only, not a folder, no space...
        raise RunFolderError(f"cannot write to {out} ({e.strerror}): choose a writable --out") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
