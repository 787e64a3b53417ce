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


def test_an_offline_init_does_not_import_wandb_launch(tmp_path, mnist_root):
    """W&B's job-input lookup imports W&B Launch (wandb.apis.public.artifacts, the largest part of an
    offline init's time); nothing staged inputs here, so it is skipped, and the run is still logged."""
    import subprocess
    import sys
    code = ("import sys, yaml\n"
            "from trainability import config\nfrom trainability.train import run\n"
            f"cfg = config.resolve_run(yaml.safe_load(open('params.yaml')), 'smoke', 'l2-vanilla', 0)\n"
            f"cfg = config.deep_merge(cfg, {{'n_tasks': 1, 'indicators': {{'enabled': False}}, "
            f"'data': {{'root': {mnist_root!r}}}, 'wandb': {{'mode': 'offline', 'dir': {str(tmp_path / 'wb')!r}}}}})\n"
            f"assert run(cfg, {str(tmp_path / 'run')!r}, progress=False)['status'] == 'completed'\n"
            "print('launch' if 'wandb.sdk.launch' in sys.modules else 'no launch')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("no launch")
    assert glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "*.wandb"))
