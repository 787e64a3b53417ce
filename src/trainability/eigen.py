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


def _lanczos(hvp, v, tol: float, max_iter: int, min_iter: int = 2):
    """Lanczos with full reorthogonalisation: (largest-magnitude Ritz value, its Ritz vector, products).

    Far fewer products than power iteration when the top eigenvalues are close (small spectral gap);
    stops once the Ritz value changes by <= tol and its residual is <= sqrt(tol) (both relative), or the
    Krylov space is invariant."""
    Q, alphas, betas = [v], [], []
    theta_prev, theta, y, it = None, math.nan, None, 0
    for it in range(1, max_iter + 1):
        w = hvp(Q[-1])
        a = torch.dot(w, Q[-1])
        if not torch.isfinite(a):  # a diverged run: report NaN, let the engine record the divergence
            return math.nan, v, it
        alphas.append(a)
        w = w - a * Q[-1] - (betas[-1] * Q[-2] if betas else 0.0)
        Qm = torch.stack(Q)
        w = w - Qm.t() @ (Qm @ w)  # full reorthogonalisation: only a few vectors, cheap
        b = w.norm()
        T = torch.diag(torch.stack(alphas).double())
        if betas:
            off = torch.stack(betas).double()
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        k = int(evals.abs().argmax())
        theta, y = evals[k].item(), evecs[:, k]
        # Stop on a small Ritz residual ||H u - theta u|| = b |y_last| (relative), not on a small change
        # of theta alone: theta can plateau near a lower eigenvalue for a few steps before jumping.
        residual = b.item() * abs(y[-1].item())
        if tol > 0 and it >= min_iter and theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta) \
                and residual <= math.sqrt(tol) * abs(theta):
            break
        if b.item() <= 1e-12 * max(1.0, abs(theta)) or it == v.numel():
            break
        theta_prev = theta
        betas.append(b)
        Q.append(w / b)
    ritz = torch.stack(Q[:len(y)]).t() @ y.to(Q[0].dtype)
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
    """mixed_start with a seeded Gaussian of length n (the generator lives on the CPU)."""
    r = torch.randn(n, generator=generator, dtype=like.dtype).to(like.device)
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
