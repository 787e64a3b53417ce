"""Top Hessian eigenvalues from Hessian-vector products: the lambda_max of the normalised sharpness
(paper Sec. 4, per layer-block; docs/METHOD.md §5) and the sharpness indicator (paper Sec. 3, Fig. 1).

Two solvers share one interface, `solve(hvp, v, tol, max_iter, min_iter) -> (value, vector, products)`:
power iteration (`_power`; tol=0, max_iter=100 is the authors' cold estimate [code]) and Lanczos with
full reorthogonalisation (`_lanczos`, [choice]: the same value in a few products). One create_graph
gradient serves every block and every iteration; start vectors mix the previous eigenvector (warm
start) with seeded noise (`mixed_start`).
"""
from __future__ import annotations

import math

import torch


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, like) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _hvp_fn(grads, params, shift: float = 0.0):
    """v -> (H + shift I) v for the block of `params`, H the Hessian whose gradient `grads` was taken
    with create_graph=True. Autograd only walks the graph back to `params`, so the output layer's block
    is much cheaper than the input layer's. `shift` adds a coupled L2 term (Adam's weight_decay)."""
    def hvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(grads, params, grad_outputs=_unflat(v, params), retain_graph=True)
        hv = _flat([h.detach() for h in hv])
        return hv + shift * v if shift else hv
    return hvp


def _power(hvp, v, tol: float, max_iter: int, min_iter: int = 2):
    """Power iteration: (Rayleigh quotient, vector, products). tol=0 runs exactly max_iter products (the
    authors' cold estimate [code]); else stops once the quotient changes by <= tol (relative)."""
    rq_prev, rq, it = None, math.nan, 0
    for it in range(1, max_iter + 1):
        hv = hvp(v)
        rq = torch.dot(v, hv).item()
        n = hv.norm()
        if not math.isfinite(rq) or n == 0:   # diverged run (NaN) or a zero block: nothing to iterate
            break
        v = hv / n
        if tol > 0 and it >= min_iter and rq_prev is not None and abs(rq - rq_prev) <= tol * abs(rq):
            break
        rq_prev = rq
    return rq, v, it


def ritz_step(alphas: torch.Tensor, betas: torch.Tensor, b: torch.Tensor, theta_prev: torch.Tensor, it: int,
              tol: float, min_iter: int, n: int, max_iter: int):
    """The host side of Lanczos iteration `it` for M problems at once (float64 CPU tensors): the
    tridiagonal T from alphas (M, it) and betas (M, it - 1), its largest-magnitude Ritz value theta (M,)
    and vector y (M, it), and the stopping rule. b (M,) is this iteration's residual norm, theta_prev (M,)
    the previous Ritz value (NaN at first). Returns (theta, y, converged, exhausted).

    Stop on a small Ritz residual ||H u - theta u|| = b |y_last| (relative), not on a small change of
    theta alone: theta can plateau near a lower eigenvalue for a few steps before jumping. A tiny T solved
    on the host: on a GPU, eigh of a 10 x 10 matrix costs a solver launch and a sync per product."""
    M = alphas.shape[0]
    T = torch.diag_embed(alphas)
    if it > 1:
        T = T + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)
    evals, evecs = torch.linalg.eigh(T)
    k = evals.abs().argmax(1)
    theta = evals.gather(1, k.unsqueeze(1)).squeeze(1)
    y = evecs.gather(2, k.view(M, 1, 1).expand(M, it, 1)).squeeze(2)
    residual = b * y[:, -1].abs()
    converged = (it >= min_iter) & (tol > 0) & ~torch.isnan(theta_prev) \
        & ((theta - theta_prev).abs() <= tol * theta.abs()) & (residual <= math.sqrt(tol) * theta.abs())
    exhausted = (b <= 1e-12 * theta.abs().clamp_min(1.0)) | (it == n) | (it == max_iter)
    return theta, y, converged, exhausted


def _lanczos(hvp, v, tol: float, max_iter: int, min_iter: int = 2):
    """Lanczos with full reorthogonalisation: (largest-magnitude Ritz value, its Ritz vector, products).

    Far fewer products than power iteration when the top eigenvalues are close (small spectral gap);
    stops once the Ritz value changes by <= tol and its residual is <= sqrt(tol) (both relative), or the
    Krylov space is invariant (`ritz_step`). One device-to-host transfer per product."""
    Q, betas = [v], []                  # on the device
    alphas_h, betas_h = [], []          # on the host, float64
    theta_prev, theta, y, it = math.nan, math.nan, None, 0
    for it in range(1, max_iter + 1):
        w = hvp(Q[-1])
        a = torch.dot(w, Q[-1])
        w = w - a * Q[-1] - (betas[-1] * Q[-2] if betas else 0.0)
        Qm = torch.stack(Q)
        w = w - Qm.t() @ (Qm @ w)  # full reorthogonalisation: only a few vectors, cheap
        b = w.norm()
        a_h, b_h = torch.stack([a, b]).double().cpu()
        if not torch.isfinite(a_h):  # a diverged run: report NaN, let the engine record the divergence
            return math.nan, v, it
        alphas_h.append(a_h)
        th, y, converged, exhausted = ritz_step(
            torch.stack(alphas_h).unsqueeze(0), torch.stack(betas_h).unsqueeze(0) if betas_h else None,
            b_h.view(1), torch.tensor([theta_prev], dtype=torch.float64), it, tol, min_iter, v.numel(), max_iter)
        theta, y = th.item(), y[0]
        if bool(converged) or bool(exhausted):
            break
        theta_prev = theta
        betas.append(b)
        betas_h.append(b_h)
        Q.append(w / b)
    ritz = torch.stack(Q[:len(y)]).t() @ y.to(Q[0])
    return theta, ritz / (ritz.norm() + 1e-30), it


SOLVERS = {"lanczos": _lanczos, "power": _power}


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm(dim=-1, keepdim=True) + 1e-30)


def mixed_start(noise: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Unit start vector(s) along the last dim: the Gaussian `noise` (cold start), plus the previous
    eigenvector when given (warm start). The random part is kept: a start equal to a stale eigenvector
    can sit near a lower eigenvalue long enough for the tolerance test to stop there; mixed with noise,
    the Krylov space holds every direction and Lanczos finds the top of the spectrum in a few products."""
    r = _unit(noise)
    return _unit(r if previous is None else _unit(previous) + 0.5 * r)


def _start(n: int, like: torch.Tensor, v0, generator) -> torch.Tensor:
    """mixed_start with a seeded Gaussian of length n, drawn on the generator's device (DecisionProbe's
    lives on the model's: on a GPU, drawing on the host would cost more than the products)."""
    dev = generator.device if generator is not None else None
    r = torch.randn(n, generator=generator, dtype=like.dtype, device=dev).to(like.device)
    return mixed_start(r, None if v0 is None else v0.to(device=like.device, dtype=like.dtype))


def block_top_eigenvalues(grads: dict, params: dict, v0: dict | None, tol: float, max_iter: int, min_iter: int,
              generator, method: str, shift: dict | float = 0.0):
    """Top eigenvalue of each block b: (H_bb + shift_b I) with grads[b] = dloss/dparams[b] (create_graph)."""
    solve = SOLVERS[method]
    eigs, vecs, iters = {}, {}, {}
    for b, ps in params.items():
        n = sum(p.numel() for p in ps)
        v = _start(n, ps[0], (v0 or {}).get(b), generator)
        s = shift.get(b, 0.0) if isinstance(shift, dict) else shift
        eigs[b], vec, iters[b] = solve(_hvp_fn(grads[b], ps, s), v, tol, max_iter, min_iter)
        vecs[b] = vec.detach()
    return eigs, vecs, iters


def layer_top_eigenvalues(loss: torch.Tensor, params_by_layer: dict[int, list[torch.Tensor]],
                          v0: dict | None = None, tol: float = 1e-3, max_iter: int = 100,
                          min_iter: int = 2, generator: torch.Generator | None = None,
                          method: str = "lanczos", weight_decay: float = 0.0):
    """Top (largest-magnitude, signed) eigenvalue lambda_max of each diagonal Hessian block H_ll of
    `loss` (paper Sec. 4): returns (eig {l: float}, vecs {l: Tensor}, iters {l: Hessian-vector products}).

    One create_graph gradient serves every block and every iteration. Starts from v0[l] (warm start:
    the previous decision's eigenvector) when given, else a Gaussian from `generator`; stops when the
    estimate changes by <= tol (relative) after >= min_iter products, or at max_iter.
    method="power", tol=0, max_iter=100 is the authors' cold estimate [code]; "lanczos" [choice] gets
    the same value in a few products. weight_decay adds Adam's coupled L2 Hessian (wd I) to each block.
    """
    flat = [p for ps in params_by_layer.values() for p in ps]
    g = iter(torch.autograd.grad(loss, flat, create_graph=True))
    grads = {l: [next(g) for _ in ps] for l, ps in params_by_layer.items()}
    return block_top_eigenvalues(grads, params_by_layer, v0, tol, max_iter, min_iter, generator, method, weight_decay)


def full_top_eigenvalue(loss: torch.Tensor, params: list[torch.Tensor], v0: torch.Tensor | None = None,
                        tol: float = 1e-3, max_iter: int = 100, min_iter: int = 2,
                        generator: torch.Generator | None = None, method: str = "lanczos",
                        weight_decay: float = 0.0):
    """Top eigenvalue of the whole Hessian of `loss` w.r.t. `params` (sharpness, paper Fig. 1c; the global
    variant of Algorithm 1): (eig, vec, iters)."""
    e, v, it = layer_top_eigenvalues(loss, {0: list(params)}, None if v0 is None else {0: v0}, tol,
                                     max_iter, min_iter, generator, method, weight_decay)
    return e[0], v[0], it[0]
