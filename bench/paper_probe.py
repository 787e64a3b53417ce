"""The first tasks of the paper-scale stream (the authors': 60,000 images x 250 epochs, 58,750 steps per task,
beta ramp) on a GPU, within a wall-clock budget: does the per-layer scheduler beat vanilla in the paper's own regime?

    python bench/paper_probe.py --runs l2-vanilla l2-scheduled --seeds 0 --budget-s 240 --out bench/out/probe

Runs the given `runs` x `seeds` as one batched model (trainability.batched) at the `paper` scale, one task
at a time (each task ends in the batched engine's checkpoint), and stops before a task that would not
finish inside --budget-s. After every task it rewrites OUT/summary.json: per run and seed, the per-task
online accuracy, learned LR per layer and how often each rule fired. Full records of finished runs go
where trainability.batched writes them (under OUT/runs/).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainability import config
from trainability.stacked.engine import run_batched


def summarise(jobs, recs) -> dict:
    out = {}
    for (run, seed), rec in zip(jobs, recs):
        rules = {}
        for l, series in rec["decisions"]["layers"].items():
            for r in series["rule"]:
                rules.setdefault(l, {}).setdefault(r, 0)
                rules[l][r] += 1
        out[f"{run}/seed{seed}"] = {
            "status": rec["status"],
            "online_acc": [t["online_acc"] for t in rec["tasks"]],
            "end_acc": [t["end_acc"] for t in rec["tasks"]],
            "lr": [t["lr"] for t in rec["tasks"]],
            "wall_s": [t["wall_s"] for t in rec["tasks"]],
            "rules": rules}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tasks", type=int, default=40, help="at most this many tasks")
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="bench/out/probe")
    a = p.parse_args()
    t_start = time.perf_counter()
    params = config.load_params(a.params)
    sets = [f"n_tasks={a.tasks}", "wandb.mode=disabled", *a.set]
    jobs = [(r, s) for r in a.runs for s in a.seeds]
    cfgs = [config.resolve_with_sets(params, "paper", r, s, sets) for r, s in jobs]
    out = Path(a.out)
    dirs = [out / "runs" / r / f"seed{s}" for r, s in jobs]
    metas = [{"run": r, "scale": "paper"} for r, _ in jobs]
    for t in range(a.tasks):
        recs = run_batched(cfgs, dirs, metas=metas, resume=True, progress=False,
                           stop_after_task=t if t + 1 < a.tasks else None)
        elapsed = time.perf_counter() - t_start
        summary = {"device": recs[0]["provenance"].get("device"), "tasks_done": t + 1,
                   "elapsed_s": round(elapsed, 1), "runs": summarise(jobs, recs)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[probe] task {t} done at {elapsed:.0f}s: " + "  ".join(
            f"{k} {v['online_acc'][-1]:.3f}" for k, v in summary["runs"].items()), flush=True)
        if elapsed / (t + 1) * (t + 2) > a.budget_s:
            print(f"[probe] stopping: another task would pass the {a.budget_s:.0f}s budget", flush=True)
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
