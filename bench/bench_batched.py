"""Steps per second per model: M models batched in one process (trainability.batched) against one model
at a time (the engine's loop: nn.Module MLP + torch.optim.Adam), side by side in one run.

    .venv/bin/python bench/bench_batched.py                       # CPU, M = 1 3 9 27, L2 (coupled) MLP
    .venv/bin/python bench/bench_batched.py --device cuda --steps 400 --measure

Plain training steps (forward, backward, Adam) of the paper's model (784-256-256-10, ReLU, B = 256) on
random data; with --measure, one decision step (the full StackedProbe: variance, effective step,
batched Lanczos to eig_tol) every K steps, as a scheduled run. Each configuration is timed `--rounds`
times, interleaved, and the median is reported. Also prints the achieved arithmetic rate of the
largest batch (6 x parameters x B FLOP per model-step for forward + backward; Adam and the measurement
not counted), to compare with the device's peak.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from trainability.stacked.adam import StackedAdam
from trainability.stacked.graphs import CudaGraphStep
from trainability.stacked.model import StackedMLP
from trainability.stacked.probe import StackedProbe
from trainability.stacked.scheduler import StackedScheduler
from trainability.measure import DecisionProbe
from trainability.models import MLP, param_groups

SCHED = {"safety": 0.8, "cool": 0.99, "warm": 1.01, "floor": 0.12, "warm_frac": 0.1, "warm_factor": 0.3,
         "window": 30, "kappa": 1.0, "beta": 1.0, "statistic": "vol", "bound": "combined", "variant": "per_layer"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, steps, device, warmup=5) -> float:
    """Seconds for `steps` calls of step(i) after `warmup` untimed ones (device synchronised)."""
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return time.perf_counter() - t0


def stacked_step(M, device, B, measure, graph=False, fused=False, seed=0):
    """step(decide) for M stacked paper MLPs on random data: forward, backward, (with decide: the probe
    and Algorithm 1,) Adam; with graph, the plain step replayed as a CUDA graph (stacked.graphs.CudaGraphStep)."""
    models = []
    for m in range(M):
        torch.manual_seed(m)
        models.append(MLP())
    net = StackedMLP(models, device)
    lr = torch.full((M, net.n_layers), 1e-3, dtype=torch.float64, device=device)
    adam = StackedAdam(net, lr, torch.full((M,), 1e-3, device=device), (0.9, 0.999), 1e-8, fused=fused)
    probe = StackedProbe(net, adam, B, list(range(M)), 1e-4, 100, [False] * M, [False] * M, False, None,
                         adam.wd) if measure else None
    sched = StackedScheduler(adam, B, [SCHED] * M, [True] * M, net.n_layers) if measure else None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, B, 784, generator=g).to(device)
    y = torch.randint(0, 10, (M, B), generator=g).to(device)
    idx = torch.arange(B, device=device)

    def loss(keep=False, idx=idx):   # the engine's on-device gather of each minibatch
        logits, a, z = net.forward(x[:, idx], keep)
        ce = F.cross_entropy(logits.flatten(0, 1), y[:, idx].flatten(), reduction="none")
        return ce.view(M, B).mean(1).sum(), a, z

    def plain(idx):
        loss(idx=idx)[0].backward()
        adam.step()
    captured = CudaGraphStep(plain, net.params()) if graph else None

    def step(decide):
        if captured is not None and not decide:
            captured(idx)
            return
        for p in net.params():
            p.grad = None
        total, a, z = loss(decide)
        total.backward()
        if decide:
            sched.step(probe.measure(a, [x.grad for x in z], y[:, idx], lambda: loss()[0]), 0.5)
        adam.step()
    return step


def time_batched(M, steps, device, B, K, measure, warmup=5, graph=False, fused=False):
    step = stacked_step(M, device, B, measure, graph, fused)
    return _timed(lambda i: step(measure and (i + 1) % K == 0), steps, device, warmup)


def time_single(M, steps, device, B, K, measure, warmup=5):
    """M models one after another, each with the engine's loop (what M processes on one device share)."""
    total = 0.0
    for m in range(M):
        torch.manual_seed(m)
        model = MLP().to(device)
        opt = torch.optim.Adam(param_groups(model, 1e-3, 1e-3), lr=1e-3)
        probe = DecisionProbe(model, opt, B, eig_tol=1e-4) if measure else None
        x = torch.randn(B, 784, device=device)
        y = torch.randint(0, 10, (B,), device=device)

        def step(i):
            decide = probe is not None and (i + 1) % K == 0
            opt.zero_grad(set_to_none=True)
            if decide:
                with probe.capture():
                    F.cross_entropy(model(x), y).backward()
                probe.measure(lambda: F.cross_entropy(model(x), y))
            else:
                F.cross_entropy(model(x), y).backward()
            opt.step()
        total += _timed(step, steps, device, warmup)
        if M > 3:   # the per-model rate is the same for every model: time 3, scale to M
            return total / (m + 1) * M
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, nargs="+", default=[1, 3, 9, 27])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--every", type=int, default=40, help="K, steps between decisions (--measure)")
    p.add_argument("--measure", action="store_true", help="include a decision step every K steps")
    p.add_argument("--graph", action="store_true", help="also time the batched step replayed as a CUDA graph")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls (CUDA) for every timing")
    p.add_argument("--fused", action="store_true",
                   help="also time the batched step with Adam's update compiled (fused_adam), and with --graph "
                        "the graph of that step")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.graph and device.type != "cuda":
        p.error("--graph needs --device cuda")
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, steps {a.steps}, rounds {a.rounds}, "
          f"measure {a.measure} (K={a.every})")
    kinds = ["single", "batched"] + ["graph"] * a.graph + ["fused"] * a.fused + ["graph+fused"] * (a.graph and a.fused)
    times = {(kind, M): [] for M in a.models for kind in kinds}
    for _ in range(a.rounds):
        for M in a.models:
            times[("single", M)].append(time_single(M, a.steps, device, a.batch_size, a.every, a.measure))
            for kind in kinds[1:]:
                times[(kind, M)].append(time_batched(M, a.steps, device, a.batch_size, a.every, a.measure,
                                                     graph="graph" in kind, fused="fused" in kind))
    rates = {k: k[1] * a.steps / statistics.median(v) for k, v in times.items()}
    print(f"{'models':>6} {'one-at-a-time':>15} {'batched':>12} {'speed-up':>9}"
          + "".join(f" {k:>12} {k + '/batched':>20}" for k in kinds[2:]) + "   (model-steps per second, median)")
    n_params = sum(p.numel() for p in MLP().parameters())
    for M in a.models:
        s, b = rates[("single", M)], rates[("batched", M)]
        print(f"{M:>6} {s:>15.1f} {b:>12.1f} {b / s:>8.2f}x"
              + "".join(f" {rates[(k, M)]:>12.1f} {rates[(k, M)] / b:>19.2f}x" for k in kinds[2:]))
    M = max(a.models)
    rate = max(rates[(k, M)] for k in kinds if k != "single")
    print(f"largest batch: {rate * 6 * n_params * a.batch_size / 1e9:.1f} GFLOP/s in forward+backward matmuls "
          f"({n_params} parameters per model, 6 x P x B FLOP per model-step)")
    # Bytes by counting, not by hardware counters: StackedAdam's unfused arithmetic makes ~27 fp32 passes
    # over the parameters (coupled L2 included), forward + backward read W twice and write the gradient
    # (3 more); activations: the gathered input (read + write + read) and each hidden layer's output,
    # ReLU and their gradients (~8 passes of B x width).
    widths = [256, 256, 10]
    act_bytes = 4 * a.batch_size * (3 * 784 + 8 * sum(widths))
    print(f"largest batch: ~{rate * (4 * 30 * n_params + act_bytes) / 1e9:.0f} GB/s of memory traffic "
          f"(estimate: {(4 * 30 * n_params + act_bytes) / 1e6:.0f} MB per model-step, counted, not measured)")


if __name__ == "__main__":
    main()
