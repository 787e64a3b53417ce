"""Several batched jobs at once on one device: each job's speed beside the others against alone, measured,
and the whole scale's makespan on that many slots from it.

    python bench/slots.py --device cuda --slots 4 --projection bench/out/gpu/projection.json \\
        --out bench/out/gpu/slots.json
    python bench/slots.py --device cpu --slots 2 --seconds 4 --jobs batch-crelu-long batch-l2-long \\
        --set stream.n_images=2560 --set measure.every=4          # a CPU try-out of the script

`--slots` K worker processes each build one job of the scale (default: the K longest in --projection, which
`snakemake --cores N` would start first on a GPU with K slots; else the first K planned) with the real
engine (stacked.engine.BatchedRuns, the job's own configs, indicators off) and warm it up (CUDA graph captures,
torch.compile, the first decisions). Then, phase by phase, the workers meet at a barrier and some of them
train for --seconds, a decision every measure.every steps as in a run: first each worker alone (its solo
rate, steps per second), then workers 1..j together for j = 2..K. A worker's speed beside j - 1 others is
its rate then over its solo rate; the slot speed at j is their mean, and j x that the throughput against
one job at a time. Every rate is measured in this one run, side by side.

With --projection (bench/project_paper.py's JSON, jobs timed alone), the scale's makespan on j slots for
j = 1..K: longest job first, each slot at the slot speed measured for j (project_paper.makespan). A
projection, like project_paper's: a real run's jobs overlap for hours, these phases for seconds.
--plot draws the speeds; --replot JSON draws them from an earlier --out without measuring:

    python bench/slots.py --replot docs/gpu/h200/slots_run8.json --plot docs/gpu/h200/slots.png
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

from bench_batched import _sync
from project_paper import makespan
from trainability import config
from trainability.pipeline import stacks
from trainability.planning import check_batchable
from trainability.stacked.engine import BatchedRuns


def _train_for(engine, clock: dict, seconds: float) -> tuple[int, float]:
    """Train `engine` (task 0, epoch after epoch, as loop.train_stream: a decision every K steps, the
    epoch's ramp after its first step, the NaN check after each epoch) until `seconds` have passed;
    (steps, seconds with the device synchronised). `clock` carries the position between calls."""
    device, K = engine.device, engine.cfgs[0]["measure"]["every"]
    _sync(device)
    t0 = time.perf_counter()
    steps = 0
    while True:
        if clock["batch"] is None or clock["j"] == len(clock["batch"]):
            if clock["batch"] is not None:
                engine.end_epoch(steps=[clock["step"]] * engine.M)
                clock["epoch"] += 1
            clock["batch"], clock["j"] = engine.minibatches(clock["epoch"]), 0
        idx = clock["batch"][clock["j"]]
        decide = engine.measuring and (clock["step"] + 1) % K == 0
        engine.step(idx, step=clock["step"], frac=[0.0] * engine.M, decide=decide)
        if clock["j"] == 0:
            engine.ramp([clock["epoch"]] * engine.M)
        clock["j"] += 1
        clock["step"] += 1
        steps += 1
        if time.perf_counter() - t0 >= seconds:
            break
    _sync(device)
    return steps, time.perf_counter() - t0


def worker(w: int, name: str, cfgs: list[dict], device: str, phases: list[list[int]], seconds: float,
           barrier, results) -> None:
    """One job: build and warm up, then at each phase's barrier train for `seconds` if w takes part."""
    dev = torch.device(device)
    check_batchable(cfgs)   # (resolve_with_sets validated each)
    with tempfile.TemporaryDirectory() as tmp:
        engine = BatchedRuns(cfgs, dev, [{} for _ in cfgs], [Path(tmp) / f"m{i}" for i in range(len(cfgs))])
        engine.start_task(dict.fromkeys(range(engine.M), 0))
        clock = {"epoch": 0, "batch": None, "j": 0, "step": 0}
        _train_for(engine, clock, 0.0)   # a first step: the engine's one-off costs start here
        while clock["step"] < 3 * engine.cfgs[0]["measure"]["every"] + 4:   # graph captures, compile, decisions
            _train_for(engine, clock, 0.0)
        for p, members in enumerate(phases):
            barrier.wait()
            if w in members:
                steps, s = _train_for(engine, clock, seconds)
                results.put({"worker": w, "job": name, "phase": p, "together": len(members), "steps": steps,
                             "seconds": s, "models": len(cfgs)})
        barrier.wait()


def measure(jobs: list[tuple[str, list[dict]]], device: str, seconds: float) -> dict:
    """Solo and together rates of `jobs` (one worker each), and the slot speed for 2..len(jobs)."""
    K = len(jobs)
    phases = [[w] for w in range(K)] + [list(range(j)) for j in range(2, K + 1)]
    ctx = mp.get_context("spawn")   # each worker its own CUDA context
    barrier, results = ctx.Barrier(K), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(w, name, cfgs, device, phases, seconds, barrier, results))
             for w, (name, cfgs) in enumerate(jobs)]
    for p in procs:
        p.start()
    expected = sum(len(m) for m in phases)
    rows = [results.get() for _ in range(expected)]
    for p in procs:
        p.join()
    solo = {r["worker"]: r["steps"] / r["seconds"] for r in rows if r["together"] == 1}
    out = {"device": device, "seconds": seconds, "jobs": [n for n, _ in jobs], "phases": rows,
           "solo_steps_per_s": {jobs[w][0]: v for w, v in solo.items()}, "slot_speed": {1: 1.0}}
    for j in range(2, K + 1):
        beside = {jobs[r["worker"]][0]: r["steps"] / r["seconds"] / solo[r["worker"]]
                  for r in rows if r["together"] == j}
        out.setdefault("speed_beside", {})[j] = beside
        out["slot_speed"][j] = sum(beside.values()) / len(beside)
    return out


def plot(out: dict, path: str) -> None:
    """Each job's speed beside j - 1 others (dots) and the throughput against one at a time (bars), j = 1..K;
    `out` as read back from --out's JSON (string keys)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    js = sorted(int(j) for j in out["slot_speed"])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.bar(js, [j * out["slot_speed"][str(j)] for j in js], color="#9ecae1",
           label="throughput against one job at a time")
    for n in out["jobs"]:
        pts = [(1, 1.0)] + [(int(j), v[n]) for j, v in out.get("speed_beside", {}).items() if n in v]
        ax.plot(*zip(*sorted(pts)), "o-", ms=4, label=f"{n}: speed against alone")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(js)
    ax.set_xlabel("jobs at once on the one GPU")
    ax.set_ylabel("x")
    ax.set_title(f"batched jobs side by side ({out.get('device_name', out['device'])})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--scale", default="paper")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--slots", type=int, default=4, help="K: at most this many jobs at once")
    p.add_argument("--jobs", nargs="+", default=None, help="the jobs (default: the K longest in --projection)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the scale's seeds")
    p.add_argument("--seconds", type=float, default=10.0, help="each phase's training time per worker")
    p.add_argument("--projection", default=None, help="project_paper.py's JSON: jobs to pick, hours to schedule")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every job")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the speeds and throughputs here")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw --plot from an earlier --out")
    a = p.parse_args()
    if a.replot:
        plot(json.loads(Path(a.replot).read_text()), a.plot)
        return 0
    params = config.load_params(a.params)
    seeds = a.seeds or params["scales"][a.scale]["seeds"]
    groups = stacks(params, a.scale)   # the jobs and the stacks they shrink to
    proj = json.loads(Path(a.projection).read_text()) if a.projection else None
    names = a.jobs or ([r["job"] for r in sorted(proj["jobs"], key=lambda r: -r["hours"]) if r["job"] in groups]
                       if proj else list(groups))[:a.slots]
    sets = ["wandb.mode=disabled", f"device={a.device}", "indicators.enabled=false", *a.set]
    jobs = [(n, [config.resolve_with_sets(params, a.scale, r, s, sets) for r in groups[n] for s in seeds])
            for n in names]
    print(f"{len(jobs)} jobs at once on {a.device} "
          f"({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}), {a.seconds:g} s a phase: "
          + ", ".join(f"{n} ({len(c)} models)" for n, c in jobs), flush=True)
    out = measure(jobs, a.device, a.seconds)
    out["device_name"] = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    for n in names:
        print(f"{n:>28} alone {out['solo_steps_per_s'][n]:7.1f} steps/s" + "".join(
            f";  beside {j - 1}: {out['speed_beside'][j][n]:.2f}x" for j in out.get("speed_beside", {})
            if n in out["speed_beside"][j]), flush=True)
    for j, s in out["slot_speed"].items():
        print(f"[slots] {j} at once: each at {s:.2f}x its solo speed, {j * s:.2f}x the throughput of one at a time")
    if proj:
        hours = [r["hours"] for r in proj["jobs"]]
        out["makespan_hours"] = {j: makespan(hours, j, s) for j, s in out["slot_speed"].items()}
        out["projection_complete"] = proj["complete"]
        for j, h in out["makespan_hours"].items():
            print(f"[makespan] {proj['scale']}: {len(hours)} jobs on {j} slot{'s' * (j > 1)}: {h:.2f} h "
                  f"(longest job alone {max(hours):.2f} h)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    if a.plot:
        plot(json.loads(json.dumps(out)), a.plot)   # (as --replot reads it: the JSON's string keys)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
