"""Throughput of the training engine against a bare PyTorch loop, measured side by side in one process.

    .venv/bin/python bench/bench_engine.py              # paper model and batch, 2 threads, 5 rounds
    .venv/bin/python bench/bench_engine.py --help

Variants (interleaved round by round so machine noise hits all alike; medians reported):
  bare       the minimal loop: index batch, forward, CE, zero_grad, backward, Adam step
  engine     trainability.train.run, vanilla arm, no measurement, no indicators (issue 2: within 10%)
  measured   engine + the per-layer measurement every K steps (vanilla arm, measure-only)
  scheduled  engine + measurement + scheduler (issue 3: at most 2x `engine`)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import yaml

from trainability import config
from trainability.data import load_mnist, prepare_mnist
from trainability.models import build_model, param_groups
from trainability.streams import batches, make_stream
from trainability.loop import steps_per_task
from trainability.train import run


def engine_cfg(args, measure: bool, arm: str = "vanilla") -> dict:
    params = yaml.safe_load(open(args.params))
    cfg = config.resolve_run(params, "paper", args.run, seed=0)
    return config.deep_merge(cfg, {"arm": arm,
        "device": "cpu", "threads": args.threads, "n_tasks": args.tasks, "epochs_per_task": args.epochs,
        "stream": {"n_images": args.images}, "measure": {"enabled": measure, "every": args.K},
        "indicators": {"enabled": False}, "wandb": {"mode": "disabled"}, "data": {"root": args.data}})


def bare_loop(cfg: dict) -> float:
    """Seconds for the same number of Adam steps as the engine, with nothing else."""
    x_all, y_all = load_mnist(cfg["data"]["root"])
    stream = make_stream(cfg["stream"], x_all, y_all, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    opt = torch.optim.Adam(param_groups(model, cfg["optim"]["lr"]), lr=cfg["optim"]["lr"])
    epochs, _, _ = steps_per_task(cfg)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for t in range(cfg["n_tasks"]):
        x, y = stream.task(t)
        for _ in range(epochs):
            for idx in batches(stream.n, cfg["batch_size"], gen, drop_last=True):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return time.perf_counter() - t0


def engine(cfg: dict) -> float:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        run(cfg, d, progress=False, resume=False)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", default="data")
    p.add_argument("--run", default="relu-vanilla", help="run config of params.yaml (model, regulariser)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=21000)
    p.add_argument("--K", type=int, default=40, help="decision interval")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="bare,engine,measured,scheduled")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prepare_mnist(args.data)
    variants = {
        "bare": lambda: bare_loop(engine_cfg(args, False)),
        "engine": lambda: engine(engine_cfg(args, False)),
        "measured": lambda: engine(engine_cfg(args, True)),
        "scheduled": lambda: engine(engine_cfg(args, True, arm="scheduled")),
    }
    chosen = args.variants.split(",")
    steps = args.tasks * steps_per_task(engine_cfg(args, False))[2]
    times = {v: [] for v in chosen}
    variants[chosen[0]]()  # warm-up (allocator, MNIST page cache)
    for r in range(args.rounds):
        for v in chosen:
            times[v].append(variants[v]())
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{v} {times[v][-1]:.2f}s" for v in chosen), flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    print(f"\n{args.run} (scheduled arm: same config, arm=scheduled), {steps} Adam steps per run, batch 256, "
          f"threads {args.threads}, "
          f"K={args.K}, {args.rounds} rounds, medians:")
    base = med.get("bare") or med[chosen[0]]
    for v in chosen:
        print(f"  {v:10s} {med[v]:7.2f} s  {steps / med[v]:7.1f} steps/s  ratio to bare {med[v] / base:5.3f}")
    if "engine" in med and "scheduled" in med:
        print(f"  scheduled / engine (vanilla) = {med['scheduled'] / med['engine']:.3f}")
    if "engine" in med and "measured" in med:
        print(f"  measured / engine (vanilla)  = {med['measured'] / med['engine']:.3f}")


if __name__ == "__main__":
    main()
