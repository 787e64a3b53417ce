"""The continual-training engine: determinism, resume, divergence, the record."""
import copy
import json
import os

import pytest
import torch
import yaml

from trainability import config
from trainability.train import main, run

PARAMS = yaml.safe_load(open("params.yaml"))


def tiny(run_name="crelu-scheduled", **over):
    cfg = config.resolve_run(PARAMS, "smoke", run_name, seed=0)
    cfg = config.deep_merge(cfg, {"n_tasks": 3, "epochs_per_task": 2, "stream": {"n_images": 512},
                             "measure": {"every": 2}, "indicators": {"n_fixed": 16},
                             "wandb": {"mode": "disabled"},
                             # CI is CPU-only; `TRAINABILITY_TEST_DEVICE=cuda pytest` runs these on a GPU
                             "device": os.environ.get("TRAINABILITY_TEST_DEVICE", "cpu")})
    return config.deep_merge(cfg, over)


def strip(rec):
    """The record minus wall-clock fields, for equality checks."""
    rec = copy.deepcopy(rec)
    rec.pop("provenance")
    for t in rec["tasks"]:
        t.pop("wall_s")
    return json.loads(json.dumps(rec))


def test_record_contents(tmp_path, mnist_root):
    cfg = tiny(data={"root": mnist_root})
    rec = run(cfg, tmp_path, progress=False)
    assert rec["status"] == "completed" and len(rec["tasks"]) == 3
    t0 = rec["tasks"][0]
    assert 0.0 <= t0["online_acc"] <= 1.0 and t0["steps"] == 2 * (512 // 256)
    assert set(t0["crossings"]) == {"combined", "noise", "vol"}
    assert t0["indicators"] and "hessian_rank" in t0["indicators"]
    d = rec["decisions"]
    assert len(d["step"]) == 3 * 4 // 2 and set(d["layers"]) >= {"1", "2", "3"}
    assert len(d["layers"]["1"]["alpha"]) == len(d["step"])
    prov = rec["provenance"]
    assert prov["torch"] == torch.__version__ and len(prov["config_hash"]) == 16
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk["status"] == "completed"
    assert not (tmp_path / "checkpoint.pt").exists()


def test_same_seed_same_record(tmp_path, mnist_root):
    cfg = tiny(data={"root": mnist_root})
    a = run(cfg, tmp_path / "a", progress=False)
    b = run(cfg, tmp_path / "b", progress=False)
    assert strip(a) == strip(b)
    c = run(dict(cfg, seed=1), tmp_path / "c", progress=False)
    assert strip(a)["tasks"] != strip(c)["tasks"]


@pytest.mark.parametrize("run_name", ["crelu-scheduled", "wass-reset"])
def test_resume_equals_uninterrupted(tmp_path, mnist_root, run_name):
    cfg = tiny(run_name, data={"root": mnist_root})
    full = run(cfg, tmp_path / "full", progress=False)
    partial = run(cfg, tmp_path / "resumed", progress=False, stop_after_task=0)
    assert partial["status"] == "running" and (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed = run(cfg, tmp_path / "resumed", progress=False)
    assert strip(resumed) == strip(full)


def test_divergence_is_recorded(tmp_path, mnist_root):
    cfg = tiny("relu-vanilla", data={"root": mnist_root}, optim={"lr": 1e12}, n_tasks=4,
               indicators={"enabled": False})
    rec = run(cfg, tmp_path, progress=False)
    assert rec["status"] == "diverged"
    assert rec["diverged_at_task"] is not None and len(rec["tasks"]) == rec["diverged_at_task"] + 1


def test_cli_help_and_bad_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--run" in capsys.readouterr().out
    assert main(["--run", "l2-vanilla", "--set", "optim.lr=-1", "--dry-run"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cli_dry_run(capsys):
    assert main(["--run", "crelu-scheduled", "--scale", "smoke", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["arm"] == "scheduled" and cfg["model"]["activation"] == "crelu"


def test_checkpoint_of_another_config_is_ignored(tmp_path, mnist_root):
    cfg = tiny("l2-vanilla", data={"root": mnist_root})
    run(cfg, tmp_path, progress=False, stop_after_task=0)
    other = config.deep_merge(cfg, {"optim": {"lr": 3e-4}})
    rec = run(other, tmp_path, progress=False)
    fresh = run(other, tmp_path / "fresh", progress=False)
    assert strip(rec) == strip(fresh)


def test_task_accuracy_is_the_mean_of_minibatch_accuracies():
    """A partial last minibatch weighs as much as a full one (the authors' mean of per-batch means)."""
    from trainability.record import task_online_acc
    # 2 epochs of 600 images at B = 256: minibatches 256, 256, 88; hits 128 + 64 per epoch on full ones,
    # 44 on each partial one -> accuracies (0.5, 0.25, 0.5) per epoch
    assert task_online_acc(2 * 192, 2 * 44, 6, 600, 256, drop_last=False) == pytest.approx((0.5 + 0.25 + 0.5) / 3)
    assert task_online_acc(384, 0, 4, 600, 256, drop_last=True) == 384 / (4 * 256)


def test_partial_last_minibatch_is_kept_unless_drop_last(tmp_path, mnist_root):
    for drop, steps in ((False, 2 * 3), (True, 2 * 2)):
        cfg = tiny("l2-vanilla", data={"root": mnist_root}, stream={"n_images": 600, "drop_last": drop},
                   indicators={"enabled": False})
        rec = run(cfg, tmp_path / str(drop), progress=False)
        assert [t["steps"] for t in rec["tasks"]] == [steps] * 3


def test_cli_errors_are_one_line_and_come_before_training(tmp_path, mnist_root, capsys):
    """An unwritable --out, a folder another run holds, bad YAML and a malformed --set: a clear error
    naming the file or key, exit 2, before any training."""
    from trainability.record import run_folder_lock
    afile = tmp_path / "afile"
    afile.write_text("")
    base = ["--scale", "smoke", "--run", "l2-vanilla", "--set", f"data.root={mnist_root}",
            "--set", "wandb.mode=disabled", "--no-progress"]
    assert main(base + ["--out", str(afile / "x")]) == 2
    assert "cannot write to" in capsys.readouterr().err
    held = tmp_path / "held"
    with run_folder_lock(held):   # this process holds it: a second run on the same folder is refused
        assert main(base + ["--out", str(held)]) == 2
        assert "in use by process" in capsys.readouterr().err
    assert not (held / "record.json").exists()
    (held / ".lock").write_text("999999999")      # a stale lock (no such process) is taken over
    assert main(base + ["--out", str(held), "--set", "n_tasks=1"]) == 0
    assert main(base + ["--set", "optim.lr=[", "--out", str(tmp_path / "y")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("scale: [\n")
    assert main(["--params", str(bad), "--run", "l2-vanilla"]) == 2
    assert "bad.yaml is not valid YAML at line" in capsys.readouterr().err


def test_corrupt_record_is_rerun_not_a_traceback(tmp_path, mnist_root, capsys):
    cfg = tiny("l2-vanilla", data={"root": mnist_root}, indicators={"enabled": False}, n_tasks=1)
    first = run(cfg, tmp_path, progress=False)
    (tmp_path / "record.json").write_text('{"status": "compl')
    again = run(cfg, tmp_path, progress=False)
    assert "not valid JSON" in capsys.readouterr().err
    assert strip(again) == strip(first)
