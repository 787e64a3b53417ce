"""The replication pipeline end to end at the `smoke` scale: Snakemake DAG, rerun no-op, bad params,
and DVC (repro, no-op, a changed run parameter reruns only its stages, params/metrics/plots commands).

Slow (minutes): it runs the whole smoke DAG once (module fixture) and reuses its results.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENTS = yaml.safe_load(open(ROOT / "params.yaml"))["experiments"]
DVC_EXPERIMENTS = ("fig2", "fig5")


def sh(*args, cwd=ROOT, check=True, timeout=1800):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", WANDB_MODE="offline")
    p = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def smoke_dag():
    sh(str(BIN / "snakemake"), "--cores", "2", "--config", "scale=smoke")
    return ROOT / "figures" / "smoke"


def test_smoke_dag_produces_every_figure_and_table(smoke_dag):
    from trainability.config import experiment_names
    smoke_experiments = experiment_names(yaml.safe_load(open(ROOT / "params.yaml")), "smoke")
    assert "fig5" in smoke_experiments and "ablation-stream" not in smoke_experiments
    for exp in smoke_experiments:
        for ext in ("png", "pdf"):
            f = smoke_dag / f"{exp}.{ext}"
            assert f.exists() and f.stat().st_size > 1000, f
    for t in ("table1.md", "results.md", "results.csv", "paper_vs_ours.md"):
        f = smoke_dag / "tables" / t
        assert f.exists() and f.stat().st_size > 100, f
    verdicts = (smoke_dag / "tables" / "paper_vs_ours.md").read_text()
    for claim in ("Fig. 1", "Fig. 4", "Fig. 5", "Fig. 6", "Fig. 7"):
        assert claim in verdicts
    assert any(v in verdicts for v in ("reproduced", "partly", "not reproduced"))


def test_smoke_records_are_complete(smoke_dag):
    rec = json.loads((ROOT / "results/smoke/runs/l2-scheduled/seed1/record.json").read_text())
    assert rec["status"] == "completed" and rec["seed"] == 1
    assert rec["provenance"]["git_commit"]
    assert len(rec["decisions"]["layers"]["1"]["lr"]) == len(rec["decisions"]["step"]) > 0
    assert list((ROOT / "wandb").glob("offline-run-*")), "every run logs to W&B (offline)"


def test_the_scheduler_changes_learning_rates_in_every_scheduled_smoke_run(smoke_dag):
    """The smoke scale smoke-tests the controller: every scheduled run's learning rates move."""
    from trainability.config import resolve_run, run_names
    params = yaml.safe_load(open(ROOT / "params.yaml"))
    scheduled = [r for r in run_names(params, "smoke") if resolve_run(params, "smoke", r, 0)["arm"] == "scheduled"]
    assert len(scheduled) >= 20
    for run in scheduled:
        for seed in params["scales"]["smoke"]["seeds"]:
            rec = json.loads((ROOT / f"results/smoke/runs/{run}/seed{seed}/record.json").read_text())
            lr0 = rec["config"]["optim"]["lr"]
            lrs = [lr for series in rec["decisions"]["layers"].values() for lr in series.get("lr", [])]
            assert any(abs(lr - lr0) > 1e-12 * lr0 for lr in lrs), f"{run} seed {seed}: no learning rate changed"


def test_second_snakemake_is_a_noop(smoke_dag):
    out = sh(str(BIN / "snakemake"), "-n", "--config", "scale=smoke")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_fresh_clone_runs_the_default_replication(tmp_path):
    """figures/default/ is committed, results/ is not: in a fresh clone the README's main command must
    still plan every run of the default scale (the `all` rule asks for the summaries under results/)."""
    from trainability.config import run_names
    params = yaml.safe_load(open(ROOT / "params.yaml"))
    for f in ("Snakefile", "params.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    shutil.copytree(ROOT / "workflow", tmp_path / "workflow")
    shutil.copytree(ROOT / "figures/default", tmp_path / "figures/default")   # the committed outputs only
    out = sh(str(BIN / "snakemake"), "-n", cwd=tmp_path)
    n_runs = len(run_names(params, "default")) * len(params["scales"]["default"]["seeds"])
    assert f" run {n_runs} " in " ".join(out.stdout.split()), out.stdout[-2000:]   # Snakemake's job stats


def test_invalid_params_rejected_before_any_job(tmp_path):
    bad = yaml.safe_load(open(ROOT / "params.yaml"))
    bad["run_defaults"]["optim"]["lr"] = -0.5
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    out = sh(str(BIN / "snakemake"), "-n", "--configfile", str(cfg), check=False)
    assert out.returncode != 0
    assert "lr" in out.stdout + out.stderr


@pytest.fixture(scope="module")
def dvc_repo(smoke_dag, tmp_path_factory):
    """A git+DVC copy of the project set to the smoke scale, reusing the smoke results."""
    d = tmp_path_factory.mktemp("dvc") / "repo"
    skip = shutil.ignore_patterns(".venv", ".git", "wandb", ".snakemake", "*.egg-info", "__pycache__",
                                  ".pytest_cache", "checkpoint.pt")

    def ignore(folder, names):  # only the smoke results are reused; other scales' results are large
        extra = [n for n in names if Path(folder) in (ROOT / "results", ROOT / "figures") and n != "smoke"
                 and (Path(folder) / n).is_dir() and n != "tables"]
        return set(skip(folder, names)) | set(extra)
    shutil.copytree(ROOT, d, ignore=ignore)
    params = yaml.safe_load(open(d / "params.yaml"))
    params["scale"] = "smoke"
    params["run_defaults"]["wandb"]["mode"] = "disabled"
    # two experiments keep DVC's serial repro short; both use l2-vanilla, fig5 also uses other runs
    params["experiments"] = {e: params["experiments"][e] for e in DVC_EXPERIMENTS}
    for scale in params["scales"].values():
        scale["experiments"] = [e for e in scale.get("experiments", DVC_EXPERIMENTS) if e in DVC_EXPERIMENTS] \
            or list(DVC_EXPERIMENTS)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(sys.executable, "-m", "trainability.pipeline", "dvc-yaml", cwd=d)
    sh("git", "init", "-q", cwd=d)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A", cwd=d)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", cwd=d)
    sh(str(BIN / "dvc"), "repro", cwd=d)
    return d


def test_dvc_repro_then_noop(dvc_repo):
    out = sh(str(BIN / "dvc"), "repro", cwd=dvc_repo)
    assert "didn't change" in out.stdout or "up to date" in out.stdout.lower()
    status = sh(str(BIN / "dvc"), "status", cwd=dvc_repo)
    assert "up to date" in status.stdout.lower()


def test_dvc_reruns_only_the_changed_run(dvc_repo):
    sh(str(BIN / "dvc"), "metrics", "show", cwd=dvc_repo)
    sh(str(BIN / "dvc"), "plots", "show", "--out", str(dvc_repo / "dvc_plots"), cwd=dvc_repo)
    params = yaml.safe_load(open(dvc_repo / "params.yaml"))
    params["runs"]["l2-vanilla"]["optim"] = {"lr": 3.0e-4}
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    diff = sh(str(BIN / "dvc"), "params", "diff", cwd=dvc_repo)
    assert "runs.l2-vanilla.optim" in diff.stdout
    stale = sh(str(BIN / "dvc"), "status", "--json", cwd=dvc_repo).stdout
    stale = set(json.loads(stale))
    run_stages = {s for s in stale if s.startswith("run_")}
    assert run_stages == {"run_l2-vanilla_seed0", "run_l2-vanilla_seed1"}, stale
    # downstream, DVC reruns the experiments whose deps include that run's records (the record changes
    # once the run reruns); those are exactly the experiments that use the run:
    stages = yaml.safe_load(open(dvc_repo / "dvc.yaml"))["stages"]
    record = "results/smoke/runs/l2-vanilla/seed0/record.json"
    depending = {k for k, v in stages.items() if k.startswith("experiment_") and record in v["deps"]}
    assert depending == {f"experiment_{e}" for e in DVC_EXPERIMENTS if "l2-vanilla" in EXPERIMENTS[e]["runs"]}


def test_dvc_refuses_a_scale_its_stages_were_not_generated_for(dvc_repo):
    """`dvc exp run -S scale=default` on a dvc.yaml generated for smoke must stop before training."""
    text = (dvc_repo / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["scale"] = "default"
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = sh(str(BIN / "dvc"), "repro", "run_l2-vanilla_seed0", cwd=dvc_repo, check=False)
        assert out.returncode != 0
        assert "generated for scale 'smoke'" in out.stdout + out.stderr
        assert not (dvc_repo / "results" / "default").exists()
    finally:
        (dvc_repo / "params.yaml").write_text(text)


def test_dvc_exp_run_set_changes_that_run_only(dvc_repo):
    """`dvc exp run -S` on one run's entry reruns that run's stages only: its family's settings live in
    `families`, so no other run shares the edited entry (YAML anchors used to make them share it)."""
    text = (dvc_repo / "params.yaml").read_text()
    try:
        # ++: add or override (an earlier test may have set this key already)
        out = sh(str(BIN / "dvc"), "exp", "run", "-S", "++runs.l2-vanilla.optim.lr=2e-4", cwd=dvc_repo)
        log = out.stdout + out.stderr
        running = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
        assert {s for s in running if s.startswith("run_")} == {"run_l2-vanilla_seed0", "run_l2-vanilla_seed1"}, log
        params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
        assert params["runs"]["l2-vanilla"]["optim"]["lr"] == 2e-4
        assert params["runs"]["l2-scheduled"] == {"extends": "l2", "arm": "scheduled"}
        rec = json.loads((dvc_repo / "results/smoke/runs/l2-vanilla/seed0/record.json").read_text())
        assert rec["config"]["optim"]["lr"] == 2e-4                          # the job ran that config
    finally:
        (dvc_repo / "params.yaml").write_text(text)


def test_a_batched_job_of_three_task_lengths_runs_through_snakemake(tmp_path):
    """The paper scale's kind of job, at the smoke scale: with `batched: true` (a config file over
    params.yaml) the smoke scale's CReLU runs, all seeds, are one job (run_batch_crelu_vanilla), the
    0.4x and 2x task lengths included; each record completes with its own task length (tasks of 1, 2
    and 4 epochs of 4 steps) while the stack sheds the ended runs."""
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "scales": {"smoke": {"batched": True}}}))
    sh(str(BIN / "snakemake"), "--cores", "2", "--config", "scale=smoke", "--configfile", str(over), "--",
       "run_batch_crelu_vanilla")
    recs = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
            for p in (tmp_path / "results" / "smoke" / "runs").glob("*/seed*/record.json")}
    assert len(recs) == 18 and all(r["status"] == "completed" and r["batched"]["models"] == 18 for r in recs.values())
    steps = {k: [t["steps"] for t in r["tasks"]] for k, r in recs.items()}
    assert steps["crelu-short/seed0"] == [4] * 3 and steps["crelu-vanilla/seed1"] == [8] * 3
    assert steps["crelu-long/seed1"] == [16] * 3


def test_snakemake_config_overrides_reach_the_jobs():
    """A `--config` override is the config the job runs: jobs read the effective params Snakemake
    planned with (--params .snakemake/params/<hash>.yaml), not params.yaml from disk."""
    target = "results/smoke/runs/l2-vanilla/seed0/record.json"
    out = sh(str(BIN / "snakemake"), "-n", "-p", "--forcerun", "run", "--config", "scale=smoke",
             "run_defaults={wandb: {mode: disabled, group: mine}}", "--", target)
    cmd = next(line for line in out.stdout.splitlines() if "trainability.train" in line)
    params_file = cmd.split("--params ")[1].split()[0]
    from trainability import config
    cfg = config.resolve_run(config.load_params(ROOT / params_file), "smoke", "l2-vanilla", 0)
    assert cfg["wandb"]["mode"] == "disabled" and cfg["wandb"]["group"] == "mine"
    bad = sh(str(BIN / "snakemake"), "-n", "--config", "scale=smoke",
             "runs={l2-vanilla: {extends: l2, optim: {lr: 0.0003}}}", check=False)
    assert bad.returncode != 0 and "runs.l2-vanilla.optim.lr" in bad.stdout + bad.stderr


def test_dvc_stages_depend_on_the_modules_they_run():
    """An experiment or tables stage reruns under `dvc repro` when any module its scripts import changes
    (config, pipeline and record are covered by the params and the records themselves)."""
    import re
    from trainability.pipeline import EXPERIMENT_MODULES, TABLE_MODULES
    src = ROOT / "src/trainability"

    def imported(module, seen=None):
        seen = set() if seen is None else seen
        for m in re.findall(r"^from \.(\w+) import|^from \. import (\w+)", (src / f"{module}.py").read_text(), re.M):
            name = m[0] or m[1]
            if name not in seen:
                seen.add(name)
                imported(name, seen)
        return seen | {module}

    structural = {"config", "pipeline", "record"}
    assert (imported("figures") | imported("analysis")) - structural <= set(EXPERIMENT_MODULES)
    assert imported("tables") - structural <= set(TABLE_MODULES)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "src/trainability/verdicts.py" in stages["tables"]["deps"]
