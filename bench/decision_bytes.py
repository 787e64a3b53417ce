"""Memory touched by one `decision_graph` body (a decision's gradient and its first ROUNDS Lanczos rounds),
by phase, counted on the CPU for the paper scale's real jobs: what bounds the replayed graph on a GPU once
its launches are gone.

    PYTHONPATH=src:bench .venv/bin/python bench/decision_bytes.py                     # four jobs, ~5 min
    PYTHONPATH=src:bench .venv/bin/python bench/decision_bytes.py --jobs batch-l2-vanilla --out bytes.json
    PYTHONPATH=src:bench .venv/bin/python bench/decision_bytes.py --time 20 --jobs batch-l2-vanilla   # + product ms

For each job (its own configs, all seeds) the engine (stacked.engine.BatchedRuns, decision_graph on) runs
DecisionGraph's body once on a full minibatch of task 1, under a dispatch mode that adds up, for every
ATen op that is not a view, the bytes of its tensor inputs and outputs. That is an upper bound on the
op's memory traffic (a cache or a fused kernel reads less), and its sum divided by the device's bandwidth
a floor under the body's time. The bytes are split into the gradient (forward and create_graph
backward), each Lanczos problem's products (every layer block's, and the whole network's for the
measure.global models) and the Lanczos arithmetic around them (recurrence, full reorthogonalisation,
norms, the basis). On an H100 (docs/gpu, call 5) the 69-model job's replayed body took 106 ms.

With --plain, a plain training step instead (what CudaGraphStep replays between decisions: the minibatch
gather, forward, backward, the Wasserstein penalty's gradient, Adam), split by ATen op; the Adam update
is the eager one (fused_adam's compiled kernels read each tensor once).

    PYTHONPATH=src:bench .venv/bin/python bench/decision_bytes.py --plain --time 10 \\
        --jobs batch-l2-vanilla batch-l2-long

With --decision, a whole decision step by phase: what the graphs replay, what runs eagerly (a launch and
Python's dispatch each), and what runs on host tensors, no launch (the stopping rule, the measurement's
small arithmetic, Algorithm 1).

    PYTHONPATH=src:bench .venv/bin/python bench/decision_bytes.py --decision --jobs batch-l2-long batch-crelu-long
    PYTHONPATH=src:bench .venv/bin/python bench/decision_bytes.py --decision --time 10 \\
        --jobs batch-l2-long   # + host ms
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from count_ops import VIEWS
from trainability import config
from trainability.stacked.engine import BatchedRuns
from trainability.stacked.graphs import DecisionGraph
from trainability.stacked.lanczos import Krylov, RowRule
from trainability.stacked.model import clear_grads
from trainability.pipeline import stacks

JOBS = ["batch-l2-vanilla", "batch-l2-long", "batch-crelu-long", "batch-l2-vanilla-appendix"]
ARITHMETIC = "Lanczos arithmetic (recurrence, reorthogonalisation, basis)"


class Bytes(TorchDispatchMode):
    """Bytes of the tensor inputs and outputs of every non-view op, and op counts, by the phase in `phase`."""

    def __init__(self):
        super().__init__()
        self.bytes, self.ops, self.phase = collections.Counter(), collections.Counter(), "gradient"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in VIEWS:
            ts = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes[self.phase] += sum(t.numel() * t.element_size() for t in ts)
            self.ops[self.phase] += 1
        return out


def in_phase(counter: Bytes, name: str, fn):
    """fn, with counter.phase set to name while it runs."""
    def wrapped(*args, **kwargs):
        outer, counter.phase = counter.phase, name
        try:
            return fn(*args, **kwargs)
        finally:
            counter.phase = outer
    return wrapped


def engine_at_task_start(cfgs: list[dict], tmp: Path):
    """The job's engine on the CPU at the start of task 1, and its first full minibatch."""
    engine = BatchedRuns(cfgs, torch.device("cpu"), [{} for _ in cfgs], [tmp / f"m{i}" for i in range(len(cfgs))])
    engine.start_task(dict.fromkeys(range(engine.M), 0))
    engine.ramp([0] * engine.M)
    return engine, next(b for b in engine.minibatches(0) if b.shape[1] == engine.B)


def by_phase(counter: Bytes) -> dict:
    """{phase: {gb, ops}}, the most bytes first."""
    return {k: {"gb": v / 1e9, "ops": counter.ops[k]} for k, v in counter.bytes.most_common()}


def job_bytes(name: str, cfgs: list[dict], tmp: Path, time_reps: int = 0) -> dict:
    engine, bidx = engine_at_task_start(cfgs, tmp)
    probe, L = engine.probe, engine.net.n_layers
    starts = [v.clone() if probe.block_models is None else v[probe.block_idx] for v in probe.vecs]   # as measure's
    if probe.global_problem:
        starts.append(torch.randn(probe.global_vecs.shape))
    counter = Bytes()
    hvps = probe.hvps
    probe.hvps = lambda *args: [
        in_phase(counter, f"products: layer {i + 1}" if i < L else "products: whole network (measure.global)", op)
        for i, op in enumerate(hvps(*args))]
    product, extend = Krylov.product, Krylov.extend
    try:
        Krylov.product = in_phase(counter, ARITHMETIC, product)
        Krylov.extend = in_phase(counter, ARITHMETIC, extend)
        with counter:
            engine.decision_graph(bidx, starts)
    finally:
        Krylov.product, Krylov.extend = product, extend
    total = sum(counter.bytes.values())
    row = {"job": name, "models": len(cfgs), "measuring": sum(engine.measuring_m),
           "global_models": len(probe.global_models) if probe.global_problem else 0,
           "rounds": DecisionGraph.ROUNDS, "ops": sum(counter.ops.values()), "gb": total / 1e9,
           "phases": by_phase(counter)}
    if time_reps and probe.global_problem:
        row["global_product_ms"] = time_global_products(engine, bidx, time_reps)
    return row


EAGER_REST = "eager: the rest (the probe's statistics, bookkeeping)"


def decision_phases(engine) -> list[tuple]:
    """(object, attribute, phase) of a decision step's parts, for --decision's counts and times."""
    host = "host: the measurement's fields and Algorithm 1 (host tensors)"
    return [(engine, "decision_forward_backward", "graph (decision_step_graph): the step's forward and backward"),
            (engine.decision_graph, "_body", "graph (decision_graph): the body"),
            (engine.decision_graph, "_more",
             "graph (decision_graph): the rounds past ROUNDS (a graph of one round each)"),
            (engine.probe, "solve", "eager: Lanczos after the body (eager rounds, Ritz vectors)"),
            (RowRule, "rounds", "host: the stopping rule (host tensors)"),
            (RowRule, "ritz", "host: the stopping rule's tridiagonal solves (host tensors)"),
            (engine.probe, "_fields", host), (engine.sched, "step", host),
            (engine.adam, "step", "eager: Adam"),
            (engine.probe, "_starts", "eager: start vectors"), (engine.probe, "_global_start", "eager: start vectors")]


@contextlib.contextmanager
def wrapped(patched: list[tuple], wrap):
    """Each (object, attribute, phase) of `patched` replaced by wrap(phase, original) while inside."""
    kept = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patched]
    try:
        for obj, attr, phase in patched:
            setattr(obj, attr, wrap(phase, getattr(obj, attr)))
        yield
    finally:
        for obj, attr, fn in kept:
            setattr(obj, attr, fn)


def decision_step_bytes(name: str, cfgs: list[dict], tmp: Path, time_decisions: int = 0) -> dict:
    """One whole decision step (the job's second, past the first's cold start), by phase: what a CUDA
    graph replays (the decision graph's body; the step's forward and backward with decision_step_graph)
    and what runs eagerly, a launch and Python's dispatch each (most of a small job's decision on call 7's
    H100), and what runs on host tensors (the stopping rule, the measurement's small arithmetic, Algorithm 1).
    time_decisions > 0: also the host phases' own time, medians over that many more decisions (the host
    does the same work whatever the device)."""
    engine, bidx = engine_at_task_start(cfgs, tmp)
    engine.step(bidx, step=0, frac=[0.0] * engine.M, decide=True)
    counter = Bytes()
    counter.phase = EAGER_REST
    with wrapped(decision_phases(engine), lambda phase, fn: in_phase(counter, phase, fn)), counter:
        engine.step(bidx, step=1, frac=[0.0] * engine.M, decide=True)
    row = {"job": name, "models": len(cfgs), "ops": sum(counter.ops.values()),
           "gb": sum(counter.bytes.values()) / 1e9, "phases": by_phase(counter)}
    if time_decisions:
        row["host_ms"] = host_times(engine, bidx, time_decisions)
    return row


def host_times(engine, bidx, n: int) -> dict:
    """{host phase: median ms a decision} over n decision steps (the solves are part of the rule's time)."""
    now = collections.Counter()   # this decision's seconds by phase

    def timed(phase, fn):
        def timed_fn(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                now[phase] += time.perf_counter() - t0
        return timed_fn
    host = [(obj, attr, phase) for obj, attr, phase in decision_phases(engine) if phase.startswith("host")]
    spent = collections.defaultdict(list)
    with wrapped(host, timed):
        for i in range(n):
            now.clear()
            engine.step(bidx, step=2 + i, frac=[0.0] * engine.M, decide=True)
            for phase in dict.fromkeys(p for _, _, p in host):
                spent[phase].append(now[phase])
    return {k: 1e3 * statistics.median(v) for k, v in spent.items()}


class OpBytes(Bytes):
    """Bytes as Bytes counts them, by ATen op name."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.phase = func.overloadpacket.__name__
        return super().__torch_dispatch__(func, types, args, kwargs)


def plain_step_bytes(name: str, cfgs: list[dict], tmp: Path, time_reps: int = 0) -> dict:
    engine, bidx = engine_at_task_start(cfgs, tmp)
    engine.step(bidx, step=0, frac=[0.0] * engine.M, decide=False)   # Adam's state, as in a run
    counter = OpBytes()
    clear_grads(engine.net.params())
    with counter:
        engine.plain_step(bidx)
    total = sum(counter.bytes.values())
    row = {"job": name, "models": len(cfgs), "wasserstein": len(engine.wass.models) if engine.wass else 0,
           "ops": sum(counter.ops.values()), "gb": total / 1e9, "phases": by_phase(counter)}
    if time_reps and engine.wass is not None:
        row["fwd_bwd_ms"] = time_penalty_gradient(engine, bidx, time_reps)
    return row


def time_global_products(engine, bidx, reps: int) -> dict:
    """Median ms of one whole-network product of the job's measure.global models (their sub-stack) through
    autograd's double backward (StackedProbe._autograd_hvp, the route before 2026-11-29 and BatchNorm's) and
    written out (_r_op_hvps, the route now), interleaved; and the largest difference relative to the norm."""
    probe = engine.probe
    xb, yb = engine.minibatch(bidx)
    with torch.no_grad():
        inputs = engine.net.forward(xb, keep=True)[1]
    written_out = probe.hvps(inputs, yb, None)[-1]
    sub = engine.net.rows(probe.global_models, probe.global_idx)
    grads = torch.autograd.grad(engine.objective(xb, yb, sub=sub)[2], sub.params(), create_graph=True)
    autograd = probe._autograd_hvp(sub.params(), grads, probe.shift[probe.global_idx])
    V = torch.randn(probe.global_vecs.shape)
    out = interleaved({"autograd": lambda: autograd(V), "written_out": lambda: written_out(V)}, reps)
    a, w = autograd(V), written_out(V)
    return dict(out, rel_diff=((a - w).norm() / a.norm()).item())


def interleaved(fns: dict, reps: int, before=None) -> dict:
    """{name: median ms} of each fn, run in turn `reps` times (side by side: the machine's drift hits them
    alike); before(), if given, untimed before each call."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def time_penalty_gradient(engine, bidx, reps: int) -> dict:
    """Median ms of the step's forward and backward with the Wasserstein gradient through autograd (the
    penalty in the objective) and written out (StackedWasserstein.add_grad, the step's route), interleaved."""
    xb, yb = engine.minibatch(bidx)

    def autograd():
        (engine.objective(xb, yb)[2] + engine.wass().sum()).backward()

    def written_out():
        engine.forward_backward(bidx, engine.correct.clone())
    return interleaved({"autograd": autograd, "add_grad": written_out}, reps,
                       before=lambda: clear_grads(engine.net.params()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--scale", default="paper")
    p.add_argument("--jobs", nargs="+", default=JOBS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the scale's seeds")
    p.add_argument("--peak-gbs", type=float, default=3350.0, help="bandwidth for the floor (H100 SXM: 3350)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--plain", action="store_true", help="a plain training step, by ATen op")
    p.add_argument("--decision", action="store_true",
                   help="a whole decision step by phase: what graphs replay, what runs eagerly, the host's rule")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="with --plain: also time forward+backward, the penalty's gradient through autograd against "
                        "add_grad, N interleaved repeats (one thread); with --decision: the host phases' time, "
                        "medians over N more decisions; with neither: the measure.global models' whole-network "
                        "product, autograd's against written out, N interleaved repeats")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.time:
        torch.set_num_threads(1)
    params = config.load_params(a.params)
    seeds = a.seeds or params["scales"][a.scale]["seeds"]
    groups = stacks(params, a.scale)   # the jobs and the stacks they shrink to
    # the body does not depend on the stream's length: a short one keeps the CPU's memory small
    sets = ["wandb.mode=disabled", "device=cpu", "indicators.enabled=false", "decision_graph=true",
            "stream.n_images=2560", *a.set]
    rows = []
    for name in a.jobs:
        cfgs = [config.resolve_with_sets(params, a.scale, r, s, sets) for r in groups[name] for s in seeds]
        with tempfile.TemporaryDirectory() as tmp:
            row = plain_step_bytes(name, cfgs, Path(tmp), a.time) if a.plain else \
                decision_step_bytes(name, cfgs, Path(tmp), a.time) if a.decision else \
                job_bytes(name, cfgs, Path(tmp), a.time)
        rows.append(row)
        if a.decision:
            print(f"{name}: {row['models']} models, a decision step: {row['ops']} ops, {row['gb']:.1f} GB touched",
                  flush=True)
            for k, v in row["phases"].items():
                print(f"    {k:62s} {v['ops']:5d} ops {v['gb']:7.2f} GB")
            for k, ms in row.get("host_ms", {}).items():
                print(f"    {k:62s} {ms:6.2f} ms a decision (median of {a.time}, one thread)")
        elif a.plain:
            print(f"{name}: {row['models']} models ({row['wasserstein']} Wasserstein), plain step: {row['ops']} ops, "
                  f"{row['gb']:.2f} GB touched ({1e3 * row['gb'] / row['models']:.1f} MB a model-step)", flush=True)
            for k, v in list(row["phases"].items())[:12]:
                print(f"    {k:30s} {v['ops']:5d} ops {v['gb']:7.3f} GB {100 * v['gb'] / row['gb']:5.1f}%")
            if "fwd_bwd_ms" in row:
                t = row["fwd_bwd_ms"]
                print(f"    forward+backward: the penalty's gradient through autograd {t['autograd']:.1f} ms, "
                      f"written out (add_grad) {t['add_grad']:.1f} ms: {t['autograd'] / t['add_grad']:.2f}x "
                      f"(medians of {a.time}, interleaved)")
        else:
            print(f"{name}: {row['models']} models ({row['measuring']} measuring, {row['global_models']} with the "
                  f"whole network's problem), {row['rounds']} rounds: {row['ops']} ops, {row['gb']:.1f} GB touched, "
                  f"a floor of {row['gb'] / a.peak_gbs * 1e3:.1f} ms at {a.peak_gbs:.0f} GB/s", flush=True)
            for k, v in row["phases"].items():
                print(f"    {k:62s} {v['ops']:5d} ops {v['gb']:7.2f} GB {100 * v['gb'] / row['gb']:5.1f}%")
            if "global_product_ms" in row:
                t = row["global_product_ms"]
                print(f"    the whole network's product ({row['global_models']} models): "
                      f"autograd {t['autograd']:.1f} ms, "
                      f"written out {t['written_out']:.1f} ms: {t['autograd'] / t['written_out']:.2f}x (medians of "
                      f"{a.time}, interleaved, one thread); they differ by {t['rel_diff']:.1e} of the norm")
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
