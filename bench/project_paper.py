"""Projected wall time of a whole scale (default: the paper's) on this device, from each job's measured cost.

    python bench/project_paper.py --device cuda --out bench/out/gpu/projection.json
    python bench/project_paper.py --device cpu --jobs 2 --seeds 0 --set stream.n_images=600   # a CPU try-out

For every training job that `snakemake --config scale=<scale>` would start (pipeline.run_jobs: one batched
job per batch group, all seeds; or one job per (run, seed)), the real engine trains the job's own configs
for one task of E and of 2E epochs (epochs_factor 1) without the Fig. 1 indicators, and, if the scale
computes them, one of E epochs with them, after an untimed warm-up task with the same step shapes on a
stream of a few minibatches (torch.compile and the CUDA graph capture their one-off costs there). The
first two task walls give seconds per step (their difference over the step difference) and the
end-of-task evaluation's cost; the third the indicators' cost per task. A job whose runs
have several task lengths is timed phase by phase, its stack shrinking as the shorter lengths end
(`planning.stack_phases`). The job's projection is

    setup + sum over phases (epochs x steps_per_epoch x seconds_per_step + task ends x fixed)

with the scale's own n_tasks and task lengths. Prints each job's models, seconds per step, model-steps
per second and its fraction of a bandwidth floor (MB_PER_MODEL_STEP counted in bench_batched.py, at
--peak-gbs), then the whole scale one job at a time and on --slots concurrent slots (longest job first,
each slot at --slot-speed of solo speed: 0.60 measured for two paper-scale jobs on one H200 by bench/slots.py,
docs/gpu). Tasks of 3 and 6 epochs by default: with 1 and 2 the difference of two short walls swung a
job's seconds per step by up to 40% between two runs on one machine (docs/gpu).
After every job the running projection is printed and --out rewritten ("complete": false until the
last), so a run cut short still leaves the jobs it measured. It is a projection from measured per-step
costs, not a measured end-to-end run.
"""
from __future__ import annotations

import argparse
import heapq
import json
import tempfile
import time
from pathlib import Path

import torch

from trainability import config
from trainability.stacked.engine import run_batched
from trainability.loop import steps_per_task
from trainability.pipeline import run_jobs
from trainability.planning import stack_phases
from trainability.train import run as train_run

MB_PER_MODEL_STEP = 39.0   # bench_batched.py's counted traffic of one model-step (not measured)


def warm_up_stream(cfg: dict) -> dict:
    """A stream of two full minibatches plus the real stream's partial last one: every step shape of the
    real stream (full, partial) in a few steps."""
    n, B = cfg["stream"]["n_images"], cfg["batch_size"]
    return {"stream": {"n_images": min(n, 2 * B + (0 if cfg["stream"]["drop_last"] else n % B))}}


def timed_task(cfgs: list[dict], out: Path, epochs: int, batched: bool, indicators: bool,
               warm_up: bool = False) -> tuple[float, float, int]:
    """(seconds for the whole call, seconds of the one task, its steps) for `cfgs` trained one task of
    `epochs` epochs (whatever the job's epochs_factor: a step costs the same in a short or a long task),
    with or without the task-start indicators (with warm_up, on warm_up_stream)."""
    cfgs = [config.validate_run(config.deep_merge(c, {"n_tasks": 1, "epochs_per_task": epochs, "epochs_factor": 1.0,
                                                      "indicators": {"enabled": indicators},
                                                      **(warm_up_stream(c) if warm_up else {})})) for c in cfgs]
    dirs = [out / f"m{i}" for i in range(len(cfgs))]
    t0 = time.perf_counter()
    if batched:
        recs = run_batched(cfgs, dirs, resume=False, progress=False)
    else:
        recs = [train_run(cfgs[0], dirs[0], resume=False, progress=False)]
    total = time.perf_counter() - t0
    return total, max(r["tasks"][0]["wall_s"] for r in recs), steps_per_task(cfgs[0])[2]


def project_job(name: str, cfgs: list[dict], reals: list[dict], batched: bool, epochs: int, tmp: Path) -> dict:
    """One job's measured costs and projected hours; `reals` are its configs as the scale runs them.
    For each phase of the job (its models shrinking as the shorter task lengths end,
    `planning.stack_phases`): seconds per step from two tasks without indicators (E and 2E epochs),
    after an untimed warm-up task on warm_up_stream (torch.compile's and the graph capture's one-off
    costs); the indicators' cost per task from a third (E epochs, with them) when the scale computes
    them."""
    real, per_epoch = reals[0], steps_per_task(reals[0])[1]
    seconds, setup, rows = 0.0, 0.0, []
    for k, (models, n_epochs, task_ends) in enumerate(stack_phases(reals)):
        sub, where = [cfgs[m] for m in models], tmp / name / f"phase{k}"
        timed_task(sub, where / "w", 1, batched, False, warm_up=True)   # compile, graph capture
        total1, task1, steps1 = timed_task(sub, where / "a", epochs, batched, False)
        _, task2, steps2 = timed_task(sub, where / "b", 2 * epochs, batched, False)
        s_step = (task2 - task1) / (steps2 - steps1) if steps2 > steps1 else 0.0
        if s_step <= 0:
            raise SystemExit(f"{name}: tasks of {epochs} and {2 * epochs} epochs gave no usable difference "
                             f"({task1:.2f} s, {task2:.2f} s); raise --epochs")
        fixed = max(0.0, task1 - steps1 * s_step)   # the end-of-task evaluation
        if real["indicators"]["enabled"]:
            fixed += max(0.0, timed_task(sub, where / "c", epochs, batched, True)[1] - task1)
        setup += max(0.0, total1 - task1)   # the job's start, and each shrink's rebuild
        seconds += n_epochs * per_epoch * s_step + task_ends * fixed
        rows.append({"models": len(models), "epochs": n_epochs, "task_ends": task_ends, "s_per_step": s_step,
                     "fixed_s_per_task": fixed, "model_steps_per_s": len(models) / s_step})
    model_steps = sum(r["models"] * r["epochs"] * per_epoch for r in rows)
    return {"job": name, "models": len(cfgs), "n_tasks": real["n_tasks"], "phases": rows,
            "model_steps": model_steps, "s_per_step": seconds / sum(r["epochs"] * per_epoch for r in rows),
            "fixed_s_per_task": rows[0]["fixed_s_per_task"], "setup_s": setup,
            "model_steps_per_s": model_steps / seconds, "hours": (setup + seconds) / 3600}


def makespan(hours: list[float], slots: int, speed: float) -> float:
    """Longest-processing-time-first on `slots` slots, each running at `speed` of solo speed."""
    if slots <= 1:
        return sum(hours)
    ends = [0.0] * slots
    for h in sorted(hours, reverse=True):
        heapq.heapreplace(ends, ends[0] + h / speed)   # ends is a heap: [0] is the earliest free slot
    return max(ends)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--scale", default="paper")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the scale's seeds")
    p.add_argument("--jobs", type=int, default=0, help="only the first N jobs (0: all)")
    p.add_argument("--epochs", type=int, default=3, help="E: the timed tasks have E and 2E epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the timed configs only (e.g. a smaller stream for a CPU try-out)")
    p.add_argument("--slots", type=int, default=2, help="jobs at once on the device")
    p.add_argument("--slot-speed", type=float, default=0.60, help="each slot's speed relative to solo (bench/slots.py)")
    p.add_argument("--peak-gbs", type=float, default=3350.0, help="device memory bandwidth (H100 SXM: 3350)")
    p.add_argument("--out", default=None, help="write the projection here as JSON")
    a = p.parse_args()
    params = config.load_params(a.params)
    seeds = a.seeds or params["scales"][a.scale]["seeds"]
    groups, singles = run_jobs(params, a.scale)
    jobs = [(g, runs, True) for g, runs in groups.items()] + \
        [(f"{r}-seed{s}", [r], False) for r in singles for s in seeds]
    jobs = jobs[:a.jobs] if a.jobs else jobs
    sets = ["wandb.mode=disabled", f"device={a.device}", *a.set]
    print(f"scale {a.scale}: {len(groups)} batched jobs, {len(singles) * len(seeds)} single jobs; timing "
          f"{len(jobs)} on {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, runs, batched in jobs:
            job_seeds = seeds if batched else [int(name.rsplit("seed", 1)[1])]
            cfgs = [config.resolve_with_sets(params, a.scale, r, s, sets) for r in runs for s in job_seeds]
            reals = [config.resolve_run(params, a.scale, r, s) for r in runs for s in job_seeds]   # task lengths
            row = project_job(name, cfgs, reals, batched, a.epochs, Path(tmp))
            row["floor_fraction"] = row["model_steps_per_s"] * MB_PER_MODEL_STEP / (a.peak_gbs * 1e3)
            rows.append(row)
            for ph in row["phases"][1:] if len(row["phases"]) > 1 else []:
                print(f"{'':>32} then {ph['models']:>3} models for {ph['epochs']} epochs: "
                      f"{ph['s_per_step'] * 1e3:7.2f} ms/step", flush=True)
            print(f"{name:>32} {row['models']:>3} models  {row['s_per_step'] * 1e3:7.2f} ms/step  "
                  f"{row['model_steps_per_s']:9.0f} model-steps/s ({100 * row['floor_fraction']:4.1f}% of the "
                  f"bandwidth floor)  fixed {row['fixed_s_per_task']:6.1f} s/task  -> {row['hours']:6.2f} h",
                  flush=True)
            summarise(a, rows, complete=len(rows) == len(jobs))
    return 0


def summarise(a, rows: list[dict], complete: bool) -> None:
    """Print the projection of the jobs measured so far and write it to --out."""
    hours = [r["hours"] for r in rows]
    model_steps = sum(r["model_steps"] for r in rows)
    summary = {"scale": a.scale, "device": a.device, "complete": complete, "jobs": rows,
               "sequential_hours": sum(hours), "slots": a.slots, "slot_speed": a.slot_speed,
               "makespan_hours": makespan(hours, a.slots, a.slot_speed),
               "model_steps": model_steps, "mix_model_steps_per_s": model_steps / (sum(hours) * 3600)}
    print(f"[projection{'' if complete else ', so far'}] {a.scale}: {len(rows)} jobs, "
          f"{summary['sequential_hours']:.2f} h one at a time, "
          f"{summary['makespan_hours']:.2f} h on {a.slots} slots at {a.slot_speed:.2f}x "
          f"(longest job {max(hours):.2f} h); the job mix: {model_steps / 1e6:.0f}M model-steps at "
          f"{summary['mix_model_steps_per_s']:.0f} model-steps/s one job at a time", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
