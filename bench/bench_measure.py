"""Cost and accuracy of one decision-step measurement (docs/METHOD.md §5, §8): ours vs the authors' method.

    .venv/bin/python bench/bench_measure.py            # paper MLP 784-256-256-10, batch 256, 2 threads
    .venv/bin/python bench/bench_measure.py --help

Trains the paper's MLP with Adam on random-label MNIST (random Gaussian inputs if MNIST is not
available), measuring every K steps as the engine does; after `--warmup` steps (so the warm starts are
in steady state) each of `--decisions` decisions is measured twice, on the same batch and parameters:
  ours     DecisionProbe.measure: per-example variance from the step's own activations and output
           gradients, layer-block top eigenvalues by Lanczos warm-started at the previous decision's
           eigenvectors (tolerance `--tol`), one shared create_graph gradient;
  authors  a faithful reimplementation of the authors' code [code]: per layer, a create_graph gradient and
           100 cold power iterations plus one product for the Rayleigh quotient; per-example gradients
           by B separate autograd.grad calls through the batch graph (docs/METHOD.md §8 counts 2 x B per decision:
           one pass of B here, so the authors' time is a lower bound).
Reports medians over decisions: time per decision, the ratio authors / ours, the implied overhead at K
(measure time / (K x plain step time)), and the relative error of our eigenvalue against the authors'
100-iteration cold estimate (median and max over decisions, per layer).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from trainability.measure import DecisionProbe
from trainability.models import build_model, param_groups


def load_data(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Random-label MNIST (docs/METHOD.md §1) when the project's data module can provide it, else Gaussian inputs."""
    try:
        from trainability.data import load_mnist
        from trainability.streams import make_stream
        x_all, y_all = load_mnist(args.data)
        stream = make_stream({"kind": "random_label", "n_images": args.images, "label_fraction": 1.0},
                             x_all, y_all, 0, torch.device("cpu"))
        x, y = stream.task(0)
        return x, y, "random-label MNIST"
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to synthetic data
        g = torch.Generator().manual_seed(0)
        return (torch.randn(args.images, 784, generator=g), torch.randint(0, 10, (args.images,), generator=g),
                f"Gaussian inputs, random labels (MNIST unavailable: {type(e).__name__})")


def authors_measure(model, x, y) -> dict[int, float]:
    """The authors' per-decision measurement [code]; returns {layer: lambda_max (100 cold iterations)}."""
    eig = {}
    for l in range(1, model.n_layers + 1):
        params = model.layer_params(l)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])

        def hvp(v):
            hv = torch.autograd.grad((flat_grad * v).sum(), params, retain_graph=True)
            return torch.cat([h.reshape(-1) for h in hv]).detach()
        v = torch.randn(flat_grad.numel())
        v = v / (v.norm() + 1e-12)
        for _ in range(100):
            w = hvp(v)
            v = w / (w.norm() + 1e-12)
        eig[l] = torch.dot(v, hvp(v)).item()
    # per-example gradients: one forward, B backward calls through the batch graph
    per_ex = F.cross_entropy(model(x), y, reduction="none")
    params = list(model.parameters())
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(per_ex[i], params, retain_graph=True)])
                     for i in range(len(x))])
    _ = (G - G.mean(0)).pow(2).sum(1).mean()
    return eig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="data", help="MNIST root (trainability.data)")
    p.add_argument("--images", type=int, default=21000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--activation", default="relu")
    p.add_argument("--K", type=int, default=40, help="decision interval (Adam steps)")
    p.add_argument("--warmup", type=int, default=400, help="Adam steps (with decisions every K) before timing")
    p.add_argument("--decisions", type=int, default=8, help="timed decisions")
    p.add_argument("--tol", type=float, default=1e-4, help="eigen-solver tolerance (params.yaml measure.eig_tol)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x, y, data_name = load_data(args)
    model = build_model({"activation": args.activation})
    opt = torch.optim.Adam(param_groups(model, args.lr), lr=args.lr)
    probe = DecisionProbe(model, opt, args.batch, eig_tol=args.tol, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    L = model.n_layers
    step_times, ours_t, auth_t = [], [], []
    errs, iters = {l: [] for l in range(1, L + 1)}, {l: [] for l in range(1, L + 1)}

    n_steps = args.warmup + args.decisions * args.K
    for step in range(1, n_steps + 1):
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        closure = lambda: F.cross_entropy(model(xb), yb)  # noqa: E731
        opt.zero_grad(set_to_none=True)
        if step % args.K:
            t0 = time.perf_counter()
            closure().backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            continue
        with probe.capture():
            closure().backward()
        t0 = time.perf_counter()
        m = probe.measure(closure)
        dt = time.perf_counter() - t0
        if step > args.warmup:   # timed decision: the authors' measurement at the same point
            t0 = time.perf_counter()
            ref = authors_measure(model, xb, yb)
            auth_t.append(time.perf_counter() - t0)
            ours_t.append(dt)
            for l in ref:
                errs[l].append(abs(m[l]["lam_max"] - ref[l]) / abs(ref[l]))
                iters[l].append(m[l]["eig_iters"])
        opt.step()

    med = statistics.median
    step_ms, ours_ms, auth_ms = med(step_times) * 1e3, med(ours_t) * 1e3, med(auth_t) * 1e3
    print(f"MLP 784-256-256-10 ({args.activation}), batch {args.batch}, {data_name}, {args.threads} threads, "
          f"{args.decisions} decisions after {args.warmup} warm-up steps, K = {args.K}, tol = {args.tol}")
    print(f"{'':34s}{'median ms':>12s}{'overhead at K':>16s}")
    print(f"{'plain Adam step':34s}{step_ms:12.2f}{'':>16s}")
    print(f"{'ours (DecisionProbe.measure)':34s}{ours_ms:12.2f}{ours_ms / (args.K * step_ms):15.1%}")
    print(f"{'authors (100 power its + B bwd)':34s}{auth_ms:12.2f}{auth_ms / (args.K * step_ms):15.1%}")
    print(f"authors / ours = {auth_ms / ours_ms:.1f}x")
    print(f"{'layer':>6s}{'median err':>12s}{'max err':>10s}{'median its':>12s}")
    for l in errs:
        print(f"{l:6d}{med(errs[l]):12.2e}{max(errs[l]):10.2e}{med(iters[l]):12.1f}")


if __name__ == "__main__":
    main()
