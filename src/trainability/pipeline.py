"""Where the pipeline's files live, shared by the Snakefile and dvc.yaml so they cannot drift apart.

`python -m trainability.pipeline dvc-yaml` regenerates dvc.yaml from params.yaml (a test checks the
committed file is current). Both Snakemake rules and DVC stages run the same commands:
`trainability-run` for a run, `workflow/scripts/aggregate.py` and `workflow/scripts/figures.py` after.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from .config import experiment_names, experiment_runs, load_params, resolve_run, run_family, run_names

TABLES = ("table1.md", "results.md", "results.csv", "paper_vs_ours.md")


def results_dir(params: dict) -> str:
    return params.get("results_dir", "results")


def run_dir(params: dict, scale: str, run: str, seed: int) -> str:
    return f"{results_dir(params)}/{scale}/runs/{run}/seed{seed}"


def record_path(params: dict, scale: str, run: str, seed: int) -> str:
    return f"{run_dir(params, scale, run, seed)}/record.json"


def summary_path(params: dict, scale: str, experiment: str) -> str:
    return f"{results_dir(params)}/{scale}/experiments/{experiment}/summary.json"


def metrics_path(params: dict, scale: str, experiment: str) -> str:
    """The few numbers a person compares (`dvc metrics show`): final and mean accuracy per run."""
    return f"{results_dir(params)}/{scale}/experiments/{experiment}/metrics.json"


def curves_path(params: dict, scale: str, experiment: str) -> str:
    return f"{results_dir(params)}/{scale}/experiments/{experiment}/curves.csv"


def figure_paths(scale: str, experiment: str) -> list[str]:
    return [f"figures/{scale}/{experiment}.png", f"figures/{scale}/{experiment}.pdf"]


def table_paths(scale: str) -> list[str]:
    return [f"figures/{scale}/tables/{t}" for t in TABLES]


def experiment_records(params: dict, scale: str, experiment: str) -> list[str]:
    seeds = params["scales"][scale]["seeds"]
    return [record_path(params, scale, r, s) for r in experiment_runs(params, scale, experiment) for s in seeds]


def run_jobs(params: dict, scale: str) -> tuple[dict[str, list[str]], list[str]]:
    """How a scale's runs become jobs, for the Snakefile and dvc.yaml alike: ({batch group: [runs]},
    [runs with one job per seed]). Groups exist only at a scale with `batched: true`."""
    runs = run_names(params, scale)
    if not params["scales"][scale].get("batched"):
        return {}, runs
    from .planning import batch_groups   # here, not at the top: the aggregation stages need no engine code
    return batch_groups(params, scale, runs), []


def stacks(params: dict, scale: str) -> dict[str, list[str]]:
    """{name: runs} of every batched job of `scale` and of the smaller stacks it shrinks to (the benches
    profile those): a later phase is named after its first run (batch-l2-long: the 2x task length's
    runs, the last phase of batch-l2-vanilla), or <job>/<k> where that is a job's name. Here, not in
    planning: pipeline imports planning, never the reverse."""
    from .planning import stack_phases
    out, seed = {}, params["scales"][scale]["seeds"][0]
    for name, runs in run_jobs(params, scale)[0].items():
        out[name] = runs
        cfgs = [resolve_run(params, scale, r, seed) for r in runs]
        for k, (models, _, _) in enumerate(stack_phases(cfgs)[1:], 1):
            later = [runs[m] for m in models]
            out[f"batch-{later[0]}" if f"batch-{later[0]}" not in out else f"{name}/{k}"] = later
    return out


def seconds_per_step(models: int, gpu: bool) -> float:
    """A job's seconds per optimiser step with a decision every 40, for its runtime request. GPU (H200,
    docs/gpu/bench_batched_h200.log): 4.4 ms for 1 model, 5.8 ms for 9, 12.0 ms for 93 (a plain batched
    step is 2.6-2.7 ms whatever the number of models; the decisions are the rest). CPU: ~8-10 ms per
    model-step on one thread (batching does not help there: the CPU is compute-bound)."""
    return 0.0044 + 0.000082 * models if gpu else 0.010 * models


def job_resources(cfgs: list[dict]) -> dict:
    """Cluster requests of a job that trains `cfgs` (one run, or one batch group): a GPU exactly when a
    run's device is `cuda` or `auto` (decided from the config, never from the host that submits), and a
    runtime in minutes from the job's optimiser steps and models (fewer as the runs of shorter task
    lengths end and leave the stack), with 50% headroom."""
    from .loop import steps_per_task
    from .planning import stack_phases
    gpu = any(c["device"] in ("auto", "cuda") for c in cfgs)
    per_epoch = steps_per_task(cfgs[0])[1]
    seconds = sum(epochs * per_epoch * seconds_per_step(len(models), gpu) for models, epochs, _ in stack_phases(cfgs))
    return {"gpu": int(gpu), "runtime": int(10 + seconds * 1.5 / 60)}


def write_effective_params(params: dict, folder: str = ".snakemake/params") -> str:
    """Write the validated params (with Snakemake's --config overrides) to FOLDER/<content hash>.yaml
    once, and return the path: the Snakemake jobs' --params."""
    import hashlib
    text = yaml.safe_dump(params, sort_keys=True)
    path = Path(folder) / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


def family_params(params: dict, scale: str, run: str) -> list[str]:
    """The params.yaml keys of a run's family that a DVC stage depends on: `families.<f>` and, where the
    scale refines it, `scales.<scale>.families.<f>`."""
    f = run_family(params, run)
    if f is None:
        return []
    return [f"families.{f}"] + ([f"scales.{scale}.families.{f}"]
                                if f in params["scales"][scale].get("families", {}) else [])


def stage_name(*parts) -> str:
    """DVC stage names allow letters, digits, '_' and '-' only."""
    return "_".join(str(p) for p in parts).replace(".", "p")


# the modules whose code an experiment stage (aggregate + figure) and the tables stage run: a change in
# one of them reruns the stage under `dvc repro`
EXPERIMENT_MODULES = ("analysis", "figures", "methods", "plotting", "verdicts")
TABLE_MODULES = ("analysis", "methods", "tables", "verdicts")


def dvc_yaml(params: dict) -> dict:
    """dvc.yaml for params['scale']: one stage per (run, seed), per experiment, and for the tables."""
    scale = params["scale"]
    py = "python"
    # dvc.yaml's paths are this scale's: a run after `dvc exp run -S scale=...` must stop, not train
    # another scale into these outputs (check-scale exits 2 with the fix when params.yaml disagrees)
    guard = f"{py} -m trainability.pipeline check-scale {scale} && "
    stages: dict = {"data": {"cmd": f"{py} -m trainability.data --root data",
                             "deps": ["src/trainability/data.py"],
                             "params": ["run_defaults.data"],
                             "outs": ["data/MNIST/raw"]}}
    seeds = params["scales"][scale]["seeds"]
    groups, runs = run_jobs(params, scale)
    for group, members in groups.items():   # a batched stage depends on its whole scale entry
        stages[stage_name("run", group)] = {
            "cmd": guard + f"{py} -m trainability.batched --scale {scale} --runs {' '.join(members)} --no-progress",
            "deps": ["data/MNIST/raw", "src/trainability"],
            "params": ["scale", "run_defaults", f"scales.{scale}"] + [f"runs.{r}" for r in members]
                      + sorted({f"families.{f}" for r in members if (f := run_family(params, r))}),
            "outs": [{record_path(params, scale, r, s): {"cache": True}} for r in members for s in seeds]}
    for run in runs:
        for seed in seeds:
            out = run_dir(params, scale, run, seed)
            stages[stage_name("run", run, f"seed{seed}")] = {
                "cmd": guard + f"{py} -m trainability.train --scale {scale} --run {run} --seed {seed} --out {out}"
                               " --no-progress",
                "deps": ["data/MNIST/raw", "src/trainability"],
                "params": ["scale", "run_defaults", f"scales.{scale}.run", f"runs.{run}"]
                          + family_params(params, scale, run),
                "outs": [{f"{out}/record.json": {"cache": True}}]}
    for exp in experiment_names(params, scale):
        recs = experiment_records(params, scale, exp)
        stages[stage_name("experiment", exp)] = {
            "cmd": guard + f"{py} workflow/scripts/aggregate.py --scale {scale} --experiment {exp} && "
                   f"{py} workflow/scripts/figures.py --scale {scale} --experiment {exp}",
            "deps": sorted(set(recs)) + ["workflow/scripts/aggregate.py", "workflow/scripts/figures.py"]
                    + [f"src/trainability/{m}.py" for m in EXPERIMENT_MODULES],
            "params": [f"experiments.{exp}"],
            "metrics": [{metrics_path(params, scale, exp): {"cache": False}}],
            "plots": [{curves_path(params, scale, exp): {"x": "task", "y": "online_acc", "cache": False}}],
            "outs": [{p: {"cache": False}} for p in [summary_path(params, scale, exp)] + figure_paths(scale, exp)]}
    stages["tables"] = {
        "cmd": guard + f"{py} workflow/scripts/tables.py --scale {scale}",
        "deps": [summary_path(params, scale, e) for e in experiment_names(params, scale)]
                + ["workflow/scripts/tables.py"] + [f"src/trainability/{m}.py" for m in TABLE_MODULES],
        "params": ["run_defaults", f"scales.{scale}"],
        "outs": [{p: {"cache": False}} for p in table_paths(scale)]}
    return {"stages": stages}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainability.pipeline",
                                description="Pipeline helpers shared by the Snakefile and dvc.yaml.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("dvc-yaml", help="write dvc.yaml generated from params.yaml")
    g.add_argument("--params", default="params.yaml")
    g.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is not current")
    c = sub.add_parser("check-scale", help="exit 2 unless params.yaml's `scale` is SCALE (dvc.yaml's guard)")
    c.add_argument("scale")
    c.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    params = load_params(args.params)
    if args.cmd == "check-scale":
        if params["scale"] != args.scale:
            print(f"error: dvc.yaml was generated for scale {args.scale!r} but params.yaml has scale "
                  f"{params['scale']!r}; regenerate it first: python -m trainability.pipeline dvc-yaml "
                  "(or run that scale with snakemake --config scale=...)", file=sys.stderr)
            return 2
        return 0
    text = ("# GENERATED from params.yaml by `python -m trainability.pipeline dvc-yaml`; do not edit.\n"
            "# Regenerate after changing the scale, the runs or the experiments.\n"
            + yaml.safe_dump(dvc_yaml(params), sort_keys=False, width=120))
    if args.check:
        current = Path("dvc.yaml").read_text() if Path("dvc.yaml").exists() else ""
        if current != text:
            print("dvc.yaml is out of date: run `python -m trainability.pipeline dvc-yaml`", file=sys.stderr)
            return 1
        return 0
    Path("dvc.yaml").write_text(text)
    print(f"wrote dvc.yaml ({len(text.splitlines())} lines, scale {params['scale']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
