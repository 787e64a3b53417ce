"""W&B: real offline runs, and a W&B failure never fails a run."""
import glob

import yaml

from trainability import config
from trainability.train import run

PARAMS = yaml.safe_load(open("params.yaml"))


def _cfg(tmp_path, mnist_root, mode):
    cfg = config.resolve_run(PARAMS, "smoke", "l2-scheduled", seed=0)
    return config.deep_merge(cfg, {"n_tasks": 2, "epochs_per_task": 1, "stream": {"n_images": 512},
                              "measure": {"every": 1}, "indicators": {"enabled": False},
                              "data": {"root": mnist_root},
                              "wandb": {"mode": mode, "dir": str(tmp_path / "wb")}})


def test_offline_run_is_written(tmp_path, mnist_root):
    rec = run(_cfg(tmp_path, mnist_root, "offline"), tmp_path / "run", progress=False,
              meta={"run": "l2-scheduled", "scale": "test"})
    assert rec["status"] == "completed"
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1, "expected one offline W&B run file"


def test_wandb_failure_does_not_fail_the_run(tmp_path, mnist_root, monkeypatch):
    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("simulated W&B outage")
    monkeypatch.setattr(wandb, "init", broken_init)
    rec = run(_cfg(tmp_path, mnist_root, "offline"), tmp_path / "run", progress=False)
    assert rec["status"] == "completed" and len(rec["tasks"]) == 2


def test_online_without_network_falls_back_to_offline(tmp_path, mnist_root, monkeypatch):
    """An online run that cannot reach W&B (e.g. a key set, no network) logs offline instead."""
    import wandb
    real_init = wandb.init

    def init(*a, mode=None, **k):
        if mode == "online":
            raise TimeoutError("simulated: no network")
        return real_init(*a, mode=mode, **k)
    monkeypatch.setattr(wandb, "init", init)
    rec = run(_cfg(tmp_path, mnist_root, "online"), tmp_path / "run", progress=False)
    assert rec["status"] == "completed"
    assert glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "*.wandb"))
