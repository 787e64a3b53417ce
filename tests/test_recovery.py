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
    p = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                       check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
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


def _fake_smoke_outputs(copy: Path, copy_data: bool = False) -> dict:
    """Every output of the smoke DAG in `copy`, as files of the right shape written oldest-first (data,
    records, then what reads them), so `snakemake -n` there has nothing to do. MNIST is the real one
    (links to the repository's files, or copies of them)."""
    from trainability import config, data, pipeline
    raw = data.prepare_mnist(ROOT / "data")
    (copy / "data/MNIST/raw").mkdir(parents=True)
    for name in data.SHA256:
        if copy_data:
            shutil.copy(raw / name, copy / "data/MNIST/raw" / name)
        else:
            (copy / "data/MNIST/raw" / name).symlink_to(raw / name)
    stamp = copy / "data/MNIST/raw/.snakemake_timestamp"   # what Snakemake reads as the folder's mtime
    stamp.touch()
    os.utime(stamp, (1_600_000_000, 1_600_000_000))
    params = config.load_params(copy / "params.yaml")
    exps = config.experiment_names(params, "smoke")
    records = list(dict.fromkeys(r for e in exps for r in pipeline.experiment_records(params, "smoke", e)))
    later = [f for e in exps for f in [pipeline.summary_path(params, "smoke", e),
                                      pipeline.metrics_path(params, "smoke", e),
                                      pipeline.curves_path(params, "smoke", e), *pipeline.figure_paths("smoke", e)]]
    later += pipeline.table_paths("smoke")
    for i, f in enumerate(records + later):
        p = copy / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('{"config": {}, "status": "completed", "provenance": {}, "tasks": []}')
        t = 1_700_000_000 + (i if i < len(records) else len(records) + 100)   # data < records < summaries
        os.utime(p, (t, t))
    return {"records": records, "params": params}


def _planned(out) -> list[str]:
    """The rules of the jobs a `snakemake -n` plans, one entry per job."""
    return [line.split()[1].rstrip(":") for line in out.stdout.splitlines() if line.startswith("rule ")]


def test_a_rerun_redoes_a_deleted_or_damaged_record(workflow_copy):
    """A deleted record (what reads it up to date) was 'Nothing to be done': now its run is redone, and
    the experiments that read it after it. A truncated or emptied one is named, moved aside and redone."""
    fake = _fake_smoke_outputs(workflow_copy)
    args = [BIN / "snakemake", "-n", "--config", "scale=smoke"]
    assert "Nothing to be done" in sh(*args, cwd=workflow_copy).stdout
    gone, cut = "results/smoke/runs/l2-vanilla/seed0/record.json", "results/smoke/runs/crelu-reset/seed1/record.json"
    (workflow_copy / gone).unlink()
    planned = _planned(sh(*args, cwd=workflow_copy))
    users = [e for e, x in fake["params"]["experiments"].items() if "l2-vanilla" in x["runs"]
             and e in fake["params"]["scales"]["smoke"]["experiments"]]
    assert planned.count("run") == 1 and planned.count("experiment") == len(users), planned
    (workflow_copy / cut).write_text('{"config": {"n_tasks": 3}, "status": "comp')
    out = sh(*args, cwd=workflow_copy)
    assert f"warning: {cut} is damaged (truncated): moved to {cut}.damaged, its run is redone" in out.stderr
    assert _planned(out).count("run") == 2 and (workflow_copy / f"{cut}.damaged").exists()
    (workflow_copy / cut).write_text("{}")
    assert f"{cut} is damaged (not a run record)" in sh(*args, cwd=workflow_copy).stderr


@pytest.mark.parametrize("content, reason", [('{"config": {"n_tasks": 3}, "sta', "not valid JSON"),
                                             ("{}", "no config, status, provenance, tasks"),
                                             ("[1]", "no config"), ("\xff", "not valid JSON")])
def test_a_damaged_record_is_one_line_naming_it_and_the_remedy(tmp_path, content, reason):
    from trainability.record import DamagedFileError, damaged, load_record
    p = tmp_path / "record.json"
    p.write_text(content)
    with pytest.raises(DamagedFileError) as e:
        load_record(p)
    assert str(e.value).startswith(f"{p} is damaged ({reason}") and "delete it and run again" in str(e.value)
    assert "\n" not in str(e.value) and damaged(p) is not None


def test_the_experiment_job_on_a_damaged_record_fails_in_one_line(tmp_path):
    """What the experiment job runs (workflow/scripts/aggregate.py) on a truncated record: exit 1, one
    line naming the file, no traceback."""
    import yaml
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["results_dir"] = str(tmp_path / "results")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rec = tmp_path / "results/smoke/runs/l2-vanilla/seed0/record.json"
    rec.parent.mkdir(parents=True)
    rec.write_text('{"config": {"n_tasks": 3}, "status": "comp')
    out = sh(sys.executable, "workflow/scripts/aggregate.py", "--params", tmp_path / "params.yaml", "--scale", "smoke",
             "--experiment", "fig2", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {rec} is damaged (not valid JSON")


def test_trainability_run_redoes_an_empty_record_and_names_a_damaged_checkpoint(tmp_path, mnist_root, capsys):
    from trainability.train import main
    base = ["--scale", "smoke", "--run", "l2-vanilla", "--set", f"data.root={mnist_root}", "--set", "n_tasks=1",
            "--set", "wandb.mode=disabled", "--set", "indicators.enabled=false", "--no-progress",
            "--out", str(tmp_path)]
    (tmp_path / "record.json").write_text("{}")
    assert main(base) == 0
    assert f"warning: {tmp_path / 'record.json'} is damaged (no config, status, provenance, tasks); running that run " \
        "again" in capsys.readouterr().err
    (tmp_path / "record.json").unlink()
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'checkpoint.pt'} is damaged (")
    assert err.endswith("rerun with --fresh, or delete it, to start that run over")
    assert "\n" not in err and main(base + ["--fresh"]) == 0


def test_a_rerun_repairs_a_flipped_mnist_byte_without_redoing_the_runs(workflow_copy):
    """A flipped byte in an MNIST file was 'Nothing to be done': now the rerun finds it by SHA-256 and
    rewrites the file from the offline copy; the runs (which verified the files they read) stand."""
    from trainability.data import SHA256, _sha256
    _fake_smoke_outputs(workflow_copy, copy_data=True)
    f = workflow_copy / "data/MNIST/raw/train-labels-idx1-ubyte"
    with open(f, "r+b") as fh:
        fh.seek(1000)
        b = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([b[0] ^ 1]))
    assert _sha256(f) != SHA256[f.name]
    out = sh(BIN / "snakemake", "-n", "--config", "scale=smoke", cwd=workflow_copy)
    assert "data/MNIST/raw/train-labels-idx1-ubyte is corrupted" in out.stderr and "Rewriting it" in out.stderr
    assert _sha256(f) == SHA256[f.name] and "Nothing to be done" in out.stdout


def _smoke_copy_with_data(copy: Path) -> None:
    from trainability import data
    raw = data.prepare_mnist(ROOT / "data")
    (copy / "data/MNIST/raw").mkdir(parents=True)
    for name in data.SHA256:
        (copy / "data/MNIST/raw" / name).symlink_to(raw / name)
    (copy / "data/MNIST/raw/.snakemake_timestamp").touch()


def _start_and_wait_for_the_job(cmd, copy, log):
    """Start snakemake in its own process group (as a terminal's foreground job) and wait until its run
    job writes its log."""
    import time
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", WANDB_MODE="disabled")
    p = subprocess.Popen([str(c) for c in cmd], cwd=copy, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if (copy / log).exists() and "trainability" in _children(p.pid):
            return p
        time.sleep(0.1)
    p.kill()
    raise AssertionError(p.communicate()[0][-3000:])


def _children(pid: int) -> str:
    return subprocess.run(["ps", "-o", "args=", "--ppid", str(pid)], capture_output=True, text=True).stdout + \
        subprocess.run(["pgrep", "-a", "-g", str(os.getpgid(pid))], capture_output=True, text=True).stdout


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_the_readme_command_recovers_from_an_interruption(workflow_copy, how):
    """Ctrl-C (SIGINT to the foreground process group) mid-job: the same command again finishes, no
    extra flag (profiles/default's rerun-incomplete). SIGKILL of snakemake alone: its job goes on as an
    orphan; once it has ended, `snakemake --unlock` and the same command finish (the README says so)."""
    import signal
    import time

    import yaml
    _smoke_copy_with_data(workflow_copy)
    short = workflow_copy / "short.yaml"   # one task, no indicators: a shorter job, the same recovery
    short.write_text(yaml.safe_dump({"scales": {"smoke": {"run": {"n_tasks": 1, "indicators": {"enabled": False}}}}}))
    target = "results/smoke/runs/l2-vanilla/seed0/record.json"
    cmd = [BIN / "snakemake", "--cores", "1", "--config", "scale=smoke", "--configfile", short, "--", target]
    p = _start_and_wait_for_the_job(cmd, workflow_copy, "results/smoke/logs/l2-vanilla-seed0.log")
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
        p.communicate(timeout=120)
        assert list((workflow_copy / ".snakemake/incomplete").iterdir()), "the job was not interrupted"
    else:
        lock = workflow_copy / "results/smoke/runs/l2-vanilla/seed0/.lock"
        for _ in range(300):
            if lock.exists() and lock.read_text().strip().isdigit():
                break
            time.sleep(0.1)
        orphan = int(lock.read_text())
        p.kill()
        p.communicate(timeout=60)
        locked = sh(*cmd, cwd=workflow_copy, check=False)
        assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
        for _ in range(1200):   # the orphan finishes its run (or it would hold the run folder)
            try:
                os.kill(orphan, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        sh(BIN / "snakemake", "--unlock", cwd=workflow_copy)
    again = sh(*cmd, cwd=workflow_copy, env={"WANDB_MODE": "disabled"})
    assert "Nothing to be done" not in again.stdout + again.stderr or how == "kill"
    import json
    assert json.loads((workflow_copy / target).read_text())["status"] == "completed"


def test_no_job_asks_a_cluster_for_50_gb_of_disk(workflow_copy):
    """With the full default resources (what a cluster executor gets), Snakemake gives a rule without
    inputs 50 GB of disk: prepare_data declares what it needs."""
    out = sh(BIN / "snakemake", "-n", "--forceall", "--default-resources", "--config", "scale=smoke",
             cwd=workflow_copy)
    lines = out.stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.strip().startswith("rule prepare_data") or
             line.strip().startswith("localrule prepare_data"))
    res = next(line for line in lines[i:] if "resources:" in line)
    assert "disk_mb=200," in res and "disk_mb=50000" not in out.stdout, res


def test_dvc_repro_dry_in_a_fresh_clone(tmp_path):
    """A fresh clone has no data/ and no records: `dvc repro --dry` exits 255 at the first stage whose
    dependency a planned stage would create (DVC hashes every dependency), as the README says, and
    `dvc repro --dry --ignore-errors` exits 0 with the `data` stage and a warning for each other one.
    (One experiment's stages: the whole default scale's takes minutes of DVC's bookkeeping.)"""
    files = sh("git", "ls-files", "-z").stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, tmp_path / f)
    sh("git", "init", "-q", cwd=tmp_path)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A", cwd=tmp_path)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone", cwd=tmp_path)
    assert not (tmp_path / "data").exists()
    plain = sh(BIN / "dvc", "repro", "--dry", "experiment_fig2", cwd=tmp_path, check=False)
    assert plain.returncode == 255 and "data/MNIST/raw" in plain.stdout + plain.stderr
    out = sh(BIN / "dvc", "repro", "--dry", "--ignore-errors", "experiment_fig2", cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Running stage 'data'" in out.stdout and "(ignored)" in out.stdout + out.stderr
