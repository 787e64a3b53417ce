"""Where a batched job's time goes on this device: its plain step, and its decision step split into phases.

    python bench/decision_profile.py --device cuda --out bench/out/gpu/decision_profile.json
    python bench/decision_profile.py --device cpu --jobs batch-crelu-long --set stream.n_images=2560  # try-out

For each job the paper scale plans (pipeline.run_jobs; default: four of them), the real engine
(stacked.engine.BatchedRuns, the job's own configs, cuda_graph on) trains the first steps of task 1 on the
paper stream, then, each timed with the device synchronised before and after:

- a plain step (the CUDA graph's replay on CUDA) and an eager one, each the median of 40;
- decision steps (`--decisions` of them, a step every K apart as in a run), split into the batched
  Lanczos (its rounds: the slowest row's products; with `--set decision_graph=true` it includes the
  DecisionGraph call, whose forward pass and rounds run ahead it also reports alone), Algorithm 1
  (`StackedScheduler.step`) and the rest (the step's forward and backward, the probe's statistics and,
  without decision_graph, the products' setup; Adam);
- the Wasserstein penalty's forward and backward alone (jobs with Wasserstein models);
- one round of the Lanczos' products (every layer block's Hessian-vector product) eager, and the same
  products captured once as a CUDA graph and replayed on the same autograd graph (CUDA only): what
  capturing the rounds would save (the results are compared bit for bit);
- on CUDA, torch.profiler over one decision step and over ten plain steps: kernels launched and the GPU's
  busy time, against the wall time (a launch-bound step keeps the GPU idle most of the time), and the
  kernels that take the most of it.

It measures; it changes nothing in the engine. The decision cost per step is (decision - plain) / K.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_batched import _sync
from trainability import config
from trainability.stacked.engine import BatchedRuns
from trainability.stacked.graphs import DecisionGraph
from trainability.pipeline import stacks
from trainability.measure import buffers_kept

JOBS = ["batch-l2-vanilla-appendix", "batch-l2-long", "batch-crelu-long", "batch-l2-vanilla"]


def timed(fn, device: torch.device):
    """(seconds, fn's result), the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


class Phases:
    """Synchronised timers around batched_lanczos and the scheduler's step, for the decision in flight."""

    def __init__(self, engine, device):
        self.device, self.lanczos_s, self.ahead_s, self.sched_s, self.rounds = device, 0.0, 0.0, 0.0, 0
        orig_lanczos, orig_sched, orig_ahead = engine.probe.solve, engine.sched.step, engine.decision_graph

        def lanczos(*args, **kwargs):
            s, out = timed(lambda: orig_lanczos(*args, **kwargs), device)
            self.lanczos_s += s
            self.rounds = max(self.rounds, max(int(it.max()) for _, _, it in out))
            return out

        def sched(*args, **kwargs):
            s, out = timed(lambda: orig_sched(*args, **kwargs), device)
            self.sched_s += s
            return out
        def ahead(*args, **kwargs):   # decision_graph: the gradient and the rounds run ahead, part of Lanczos
            s, out = timed(lambda: orig_ahead(*args, **kwargs), device)
            self.ahead_s += s
            return out
        engine.probe.solve, engine.sched.step = lanczos, sched   # the probe's and the scheduler's public hooks
        if orig_ahead is not None:
            engine.decision_graph = ahead
        self._undo = lambda: (setattr(engine.probe, "solve", orig_lanczos), setattr(engine.sched, "step", orig_sched),
                              setattr(engine, "decision_graph", orig_ahead))

    def clear(self) -> None:
        self.lanczos_s, self.ahead_s, self.sched_s, self.rounds = 0.0, 0.0, 0.0, 0

    def close(self) -> None:
        self._undo()


def hvp_round(engine, batch, device, reps: int) -> dict:
    """One round of Lanczos products (every layer block's HVP) eager, and captured as a CUDA graph."""
    net, probe = engine.net, engine.probe
    xb, yb = engine.minibatch(batch)
    out = {}
    with buffers_kept(net):
        with torch.no_grad():
            inputs = net.forward(xb, keep=True)[1]
        hvps = probe.hvps(inputs, yb, lambda sub=None: engine.objective(xb, yb, sub=sub)[2])[:net.n_layers]
        rows = len(probe.block_models) if probe.block_models is not None else engine.M
        q = [torch.randn(rows, v.shape[1], device=device) for v in probe.vecs]

        def round_():
            return [h(v) for h, v in zip(hvps, q)]
        round_()
        s = [timed(round_, device)[0] for _ in range(reps)]
        out["eager_ms"] = 1e3 * statistics.median(s)
        want = round_()
        if device.type == "cuda":
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        round_()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    got = round_()
                s = [timed(graph.replay, device)[0] for _ in range(reps)]
                out["graph_ms"] = 1e3 * statistics.median(s)
                out["graph_equal"] = all(torch.equal(a, b) for a, b in zip(want, got))
            except Exception as e:   # what the next session needs to know if capture fails
                out["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def kernel_profile(fn, device, top: int = 8) -> dict:
    """torch.profiler over fn(): CUDA kernels launched, their summed time, the wall time, and the `top`
    kernels by summed time (name, count, ms): what a step's GPU time is made of, where the byte counts
    (bench/decision_bytes.py) only bound it."""
    from torch.profiler import ProfilerActivity, profile
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = timed(fn, device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3   # microseconds -> ms
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time / 1e3
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels": len(kernels), "gpu_busy_ms": busy, "wall_ms": wall * 1e3,
            "busy_fraction": busy / (wall * 1e3),
            "top": [{"kernel": name[:90], "count": n, "ms": ms} for name, (n, ms) in ranked]}


def profile_job(name: str, cfgs: list[dict], device: torch.device, decisions: int, reps: int, tmp: Path) -> dict:
    engine = BatchedRuns(cfgs, device, [{} for _ in cfgs], [tmp / f"m{i}" for i in range(len(cfgs))])
    K = cfgs[0]["measure"]["every"]
    engine.start_task(dict.fromkeys(range(engine.M), 0))
    engine.ramp([0] * engine.M)
    batches = [b for b in engine.minibatches(0) if b.shape[1] == engine.B]
    i = 0

    def steps(n, decide_at=None):
        nonlocal i
        for _ in range(n):
            engine.step(batches[i % len(batches)], step=i, frac=[0.0] * engine.M, decide=decide_at == i)
            i += 1
    steps(K)   # warm-up: graph capture, a first decision (its warm starts), decision_step_graph's eager calls
    step_graph = engine.decision_step_graph
    for _ in range(1 + (step_graph.warmup if step_graph is not None else 0)):
        engine.step(batches[0], step=i, frac=[0.0] * engine.M, decide=True)
        i += 1
    row = {"job": name, "models": len(cfgs), "K": K,
           "measuring": sum(engine.measuring_m), "wasserstein": sum(x > 0 for x in engine.lam_w)}
    plain = [timed(lambda: steps(1), device)[0] for _ in range(40)]
    row["plain_ms"] = 1e3 * statistics.median(plain)
    graph, engine.graph = engine.graph, None
    eager = [timed(lambda: steps(1), device)[0] for _ in range(40)]
    engine.graph = graph
    row["eager_ms"] = 1e3 * statistics.median(eager)
    ph = Phases(engine, device)
    dec = []
    try:
        for _ in range(decisions):
            steps(K - 1)
            ph.clear()
            s, _ = timed(lambda: engine.step(batches[i % len(batches)], step=i, frac=[0.0] * engine.M, decide=True),
                         device)
            i += 1
            dec.append((s, ph.lanczos_s + ph.ahead_s, ph.rounds, ph.sched_s, ph.ahead_s))
    finally:
        ph.close()
    row["decision_ms"] = 1e3 * statistics.median(d[0] for d in dec)
    row["lanczos_ms"] = 1e3 * statistics.median(d[1] for d in dec)
    row["rounds"] = [d[2] for d in dec]
    row["ms_per_round"] = 1e3 * statistics.median(d[1] / max(d[2], 1) for d in dec)
    row["scheduler_ms"] = 1e3 * statistics.median(d[3] for d in dec)
    row["ahead_ms"] = 1e3 * statistics.median(d[4] for d in dec)
    row["rest_ms"] = row["decision_ms"] - row["lanczos_ms"] - row["scheduler_ms"]
    row["decision_share"] = (row["decision_ms"] - row["plain_ms"]) / (row["decision_ms"] + (K - 1) * row["plain_ms"])
    if engine.wass is not None:
        def wass():
            engine.wass().sum().backward()
        wass()
        row["wasserstein_fwd_bwd_ms"] = 1e3 * statistics.median(timed(wass, device)[0] for _ in range(reps))
        for p in engine.net.params():
            p.grad = None
    if engine.probe is not None:
        row["hvp_round"] = hvp_round(engine, batches[0], device, reps)
    if device.type == "cuda":
        batch = batches[i % len(batches)]
        row["profile"] = kernel_profile(
            lambda: engine.step(batch, step=i, frac=[0.0] * engine.M, decide=True), device)
        i += 1
        row["plain_profile"] = kernel_profile(lambda: steps(10), device)   # ten plain steps (the graph's replays)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--scale", default="paper")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jobs", nargs="+", default=JOBS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the scale's seeds")
    p.add_argument("--decisions", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", nargs="+", type=int, default=[DecisionGraph.ROUNDS],
                   help="with decision_graph: the rounds its body runs ahead (DecisionGraph.ROUNDS), each value "
                        "profiled in turn for each job, e.g. --rounds 10 16 (the decisions profiled are task 1's "
                        "first, which may need fewer rounds than later tasks)")
    p.add_argument("--extra", type=int, default=DecisionGraph.EXTRA,
                   help="with decision_graph: the rounds past --rounds from graphs of one round each "
                        "(DecisionGraph.EXTRA)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    params = config.load_params(a.params)
    seeds = a.seeds or params["scales"][a.scale]["seeds"]
    groups = stacks(params, a.scale)   # the jobs and the stacks they shrink to
    sets = ["wandb.mode=disabled", f"device={a.device}", "cuda_graph=true", "indicators.enabled=false", *a.set]
    print(f"device {a.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for name, rounds in ((n, r) for n in a.jobs for r in a.rounds):
        cfgs = [config.resolve_with_sets(params, a.scale, r, s, sets) for r in groups[name] for s in seeds]
        DecisionGraph.ROUNDS, DecisionGraph.EXTRA = rounds, a.extra   # read at capture
        with tempfile.TemporaryDirectory() as tmp:
            row = profile_job(name, cfgs, device, a.decisions, a.reps, Path(tmp))
        row["graph_rounds"], row["graph_extra"] = rounds, a.extra
        rows.append(row)
        h = row.get("hvp_round", {})
        print(f"{name:>26} {row['models']:>3} models ({row['measuring']} measuring, {row['wasserstein']} Wasserstein)"
              f"  plain {row['plain_ms']:.2f} ms, eager {row['eager_ms']:.2f} ms;  decision {row['decision_ms']:.1f} ms"
              f" = Lanczos {row['lanczos_ms']:.1f} ({row['rounds']} rounds, {row['ms_per_round']:.2f} ms each"
              + (f"; of it the graph body ({rounds} rounds run ahead) {row['ahead_ms']:.1f}"
                 if row["ahead_ms"] else "") + ")"
              f" + Algorithm 1 {row['scheduler_ms']:.1f} + rest {row['rest_ms']:.1f};"
              f"  decisions are {100 * row['decision_share']:.0f}% of the job's time", flush=True)
        if "wasserstein_fwd_bwd_ms" in row:
            print(f"{'':>26} Wasserstein penalty alone: {row['wasserstein_fwd_bwd_ms']:.2f} ms "
                  "forward+backward (eager)")
        if h:
            print(f"{'':>26} one round of HVPs: eager {h['eager_ms']:.2f} ms" +
                  (f", as a CUDA graph {h['graph_ms']:.2f} ms (bit-equal: {h['graph_equal']})"
                   if "graph_ms" in h else "") +
                  (f", capture failed: {h['graph_error']}" if "graph_error" in h else ""))
        for key, what in (("profile", "one decision"), ("plain_profile", "ten plain steps")):
            if key in row:
                pr = row[key]
                print(f"{'':>26} {what} under torch.profiler: {pr['kernels']} kernels, GPU busy "
                      f"{pr['gpu_busy_ms']:.1f} of {pr['wall_ms']:.1f} ms ({100 * pr['busy_fraction']:.0f}%); "
                      "the most time:")
                for k in pr["top"]:
                    print(f"{'':>30} {k['ms']:7.2f} ms {k['count']:5d}x  {k['kernel']}")
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
