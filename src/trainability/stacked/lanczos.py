"""eigen._lanczos for many independent problems in lockstep (the stacked probe's layer blocks and whole
networks): the device side (`Krylov`), the host's stopping rule over every row (`RowRule`, eigen.ritz_step),
and rounds run without the host (`lanczos_ahead`, `lanczos_rounds`: what the decision graph replays)."""
from __future__ import annotations

import copy
import math

import torch

from ..eigen import ritz_step


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x with NaN and +-inf replaced by 0: one kernel (isfinite and where took five)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


class Krylov:
    """The device side of one problem of batched_lanczos: M rows, an operator hvp (M, n) -> (M, n), and
    the rows' Lanczos vectors (M, k, n) in one buffer grown by doubling (each product reads views of it,
    where stacking a list copied all k vectors again every product)."""

    def __init__(self, hvp, v: torch.Tensor, max_iter: int, capacity: int = 8):
        self.hvp, self.v = hvp, v
        # max_iter products, one more extend
        self.basis = v.new_empty(v.shape[0], min(max_iter + 1, capacity), v.shape[1])
        self.basis[:, 0] = v
        self.k, self.b_prev, self.max_iter = 1, None, max_iter
        self.zero = v.new_zeros(())   # where's value for stopped rows, a tensor: where(..., out=) takes no scalar

    def product(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha (M,), beta (M,)) of the next product; keeps the residual w for `extend`."""
        basis, k = self.basis, self.k
        q = basis[:, k - 1]
        w = self.hvp(q)
        a_raw = (w * q).sum(1)
        a = _finite_or_zero(a_raw)   # a failed model must not poison w ...
        w = w - a.unsqueeze(1) * q - (self.b_prev.unsqueeze(1) * basis[:, k - 2] if k > 1 else 0.0)
        Qm = basis[:, :k]                                          # (M, k, n): full reorthogonalisation
        w = w - torch.einsum("mkn,mk->mn", Qm, torch.einsum("mkn,mn->mk", Qm, w))
        self.w, self.b = w, _finite_or_zero(w.norm(dim=1))       # ... nor eigh
        return a_raw, self.b

    def extend(self, active: torch.Tensor | None = None) -> None:
        """Append w / b to the basis for the rows still active (host bools), zeros for the others; without
        `active` (rounds run ahead of the host's stopping rule) for every row with b != 0."""
        keep = self.b != 0 if active is None else active.to(self.v.device, non_blocking=True)
        safe_b = torch.where(keep, self.b, 1.0)
        k = self.k
        if k == self.basis.shape[1]:
            grown = self.v.new_empty(self.basis.shape[0], min(2 * k, self.max_iter + 1), self.basis.shape[2])
            grown[:, :k] = self.basis
            self.basis = grown
        torch.where(keep.unsqueeze(1), self.w / safe_b.unsqueeze(1), self.zero, out=self.basis[:, k])   # no copy
        self.k, self.b_prev = k + 1, self.b

    def ritz_vectors(self, y: torch.Tensor, start_back: torch.Tensor, k: int) -> torch.Tensor:
        """The rows' unit Ritz vectors from their coefficients y (M, >= k) (host float64) over the first k
        Lanczos vectors; the rows of `start_back` (failed or skipped) get their start vector back."""
        Qm = self.basis[:, :k]
        ritz = torch.einsum("mkn,mk->mn", Qm, y[:, :k].to(Qm))
        ritz = ritz / (ritz.norm(dim=1, keepdim=True) + 1e-30)
        return torch.where(start_back.to(self.v.device).unsqueeze(1), self.v, ritz)


def lanczos_rounds(kry: list[Krylov], rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rounds` more rounds of products for every row of every problem's Krylov state `kry`, without the
    host: no transfer, no stopping (a row that the rule would have stopped computes on, and
    batched_lanczos reads only what the rule reads). A fixed computation, so a CUDA graph can replay it
    (`DecisionGraph`). Returns every row's alphas and betas (rows, rounds)."""
    alphas, betas = [], []
    for _ in range(rounds):
        ab = [k.product() for k in kry]
        for k in kry:
            k.extend()
        alphas.append(torch.cat([a for a, _ in ab]))
        betas.append(torch.cat([b for _, b in ab]))
    return torch.stack(alphas, 1), torch.stack(betas, 1)


def lanczos_more(kry: list[Krylov], rounds: int) -> tuple[list[Krylov], torch.Tensor, torch.Tensor]:
    """(copies of the Krylov states `kry` moved on by `rounds` rounds (lanczos_rounds), every row's alphas
    and betas): batched_lanczos' `more` (DecisionGraph's graphs past ROUNDS). Copies, since extend moves a
    state on: the originals stay as they were, for a graph's warm-up and its capture alike."""
    states = [copy.copy(k) for k in kry]
    return (states, *lanczos_rounds(states, rounds))


def lanczos_ahead(problems: list[tuple], rounds: int, max_iter: int,
                  capacity: int | None = None) -> tuple[list[Krylov], torch.Tensor, torch.Tensor]:
    """The first `rounds` rounds of batched_lanczos' products for every row of every problem
    (lanczos_rounds from the start vectors), the basis made for `capacity` vectors (default rounds + 1:
    more, where further rounds are to run without growing it). Returns the problems' Krylov states and
    every row's alphas and betas (rows, rounds)."""
    kry = [Krylov(hvp, v, max_iter, capacity=capacity or rounds + 1) for hvp, v in problems]
    return (kry, *lanczos_rounds(kry, rounds))


class RowRule:
    """The host side of batched_lanczos, every row of every problem together (R rows, float64 CPU tensors):
    the alphas (a non-finite one stored as 0: eigh never sees NaN) and betas so far, and each row's Ritz
    value, previous Ritz value, Ritz vector coefficients, products, failed and active flags. `rounds` runs
    the stopping rule (eigen.ritz_step) over a span of rounds: one round after each eager round of
    products, all the rounds run ahead (DecisionGraph) at once. `ritz`: the rule's one host step, a class
    attribute so that a profiler can wrap it (bench/count_ops.py counts its ops apart)."""
    ritz = staticmethod(ritz_step)

    def __init__(self, n: torch.Tensor, active: torch.Tensor, tol: float, min_iter: int, max_iter: int):
        R = len(n)
        self.n, self.active, self.tol, self.min_iter, self.max_iter = n, active, tol, min_iter, max_iter
        self.alphas = torch.zeros(R, max_iter, dtype=torch.float64)
        self.betas = torch.zeros(R, max_iter, dtype=torch.float64)
        self.theta = torch.full((R,), math.nan, dtype=torch.float64)
        self.theta_prev = self.theta.clone()
        self.y = torch.zeros(R, max_iter, dtype=torch.float64)
        self.iters = torch.zeros(R, dtype=torch.long)
        self.failed = torch.zeros(R, dtype=torch.bool)

    def rounds(self, rows: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, k0: int) -> None:
        """Rounds k0 .. k0 + K - 1 of the rows `rows` (their alphas and betas (len(rows), K) as the products
        gave them), then the rule over them for the active rows, as if round by round: a row stops at its
        first round with a non-finite alpha (failed: its products that round, theta and y those of the
        round before) or converged | exhausted (theta and y of that round); the others go on with the last
        round's. A few host ops a round (on the GPU machine's host ~1 ms a round, where each round indexed
        every row's state): the going rows' data is gathered once and compacted only in a round where
        some row stops; the host eigh solves each small matrix on its own whatever the batch, so the
        bits do not depend on how the rounds are grouped."""
        K, k1 = alphas.shape[1], k0 + alphas.shape[1] - 1
        finite = torch.isfinite(alphas)
        self.alphas[rows, k0 - 1:k1] = torch.where(finite, alphas, 0.0)
        self.betas[rows, k0 - 1:k1] = betas
        bad = torch.zeros(len(self.n), K, dtype=torch.bool)
        bad[rows] = ~finite
        on = self.active.nonzero().squeeze(1)   # the rows going, and their data
        a, b, n_on = self.alphas[on, :k1], self.betas[on, :k1], self.n[on]
        bad, theta_prev = bad[on], self.theta_prev[on]
        for k in range(k0, k1 + 1):
            if not len(on):
                break
            th, y, converged, exhausted = RowRule.ritz(a[:, :k], b[:, :k - 1], b[:, k - 1], theta_prev, k, self.tol,
                                                    self.min_iter, n_on, self.max_iter)
            ok = ~bad[:, k - k0]
            if not ok.all():   # failed rows: stopped, their round-k results dropped
                out = on[~ok]
                self.failed[out], self.iters[out], self.active[out] = True, k, False
                on, a, b, n_on, bad, th, y, converged, exhausted = (
                    x[ok] for x in (on, a, b, n_on, bad, th, y, converged, exhausted))
            self.theta[on], self.y[on, :k] = th, y
            stop = converged | exhausted
            if stop.any():
                out = on[stop]
                self.iters[out], self.active[out] = k, False
                on, a, b, n_on, bad, th = (x[~stop] for x in (on, a, b, n_on, bad, th))
            theta_prev = th
        self.iters[on], self.theta_prev[on] = k1, theta_prev


def batched_lanczos(problems: list[tuple], tol: float, max_iter: int, min_iter: int = 2,
                    skip: torch.Tensor | None = None, ahead: tuple | None = None) -> list[tuple]:
    """eigen._lanczos for many independent problems in lockstep: `problems` is a list of (hvp, v), v (M_p,
    n_p) unit rows (the sizes may differ between problems: a model's layer blocks), hvp (M_p, n_p) ->
    (M_p, n_p). Each row stops by the same rule as the one-model solver (`eigen.ritz_step`) and its result
    is frozen there; a problem stops when all its rows have (its products stop too), the call when every
    problem has. The vectors stay on the device; each round of products sends all rows' alphas and betas
    to the host in one transfer, where the tiny tridiagonal problems are solved (one sync per round: the
    layers of a decision share their rounds, where one call per layer synced once per product of each).
    `skip` (host bools, one per row of all problems in order) marks rows nobody reads: they are never
    active (theta NaN, 0 products, their start back as vector), so a model that does not measure cannot
    keep a batch's Lanczos going. `ahead`, lanczos_ahead's output for these problems: its rounds come to
    the host in one transfer and the rule runs over them as if they came one by one (`RowRule.rounds`);
    rows still going after them take more products here. The same bits either way (each row's arithmetic
    is its own). `ahead` may carry a fourth item, `more`: Krylov states -> (states, alphas, betas) of
    further rounds of every row (DecisionGraph's graphs of one round each), or None when it has no more;
    it is called again as long as rows are still going, and the rule runs over its rounds in the same
    way. Returns, per problem, (theta (M_p,) float64 and products (M_p,) on the host, where
    the rule made them, and the Ritz vectors (M_p, n_p) on v's device)."""
    sizes = [v.shape[0] for _, v in problems]
    spans = [slice(sum(sizes[:p]), sum(sizes[:p + 1])) for p in range(len(sizes))]   # each problem's rows
    R = sum(sizes)
    all_rows = torch.arange(R)
    n = torch.tensor([v.shape[1] for _, v in problems for _ in range(v.shape[0])])   # each row's dimension
    rule = RowRule(n, torch.ones(R, dtype=torch.bool) if skip is None else ~skip, tol, min_iter, max_iter)
    rounds = [0] * len(problems)   # each problem's rounds of products: its Krylov space is that many vectors

    def going(p: int) -> bool:   # a problem takes products while it has an active row (tol = 0: to max_iter)
        return tol <= 0 or bool(rule.active[spans[p]].any())
    live = [p for p in range(len(problems)) if going(p)]
    done, more = 0, None
    if ahead is None:
        kry = [Krylov(hvp, v, max_iter) for hvp, v in problems]
    else:
        kry, alphas, betas, *rest = ahead
        more = rest[0] if rest else None
    while ahead is not None and live:   # rounds run ahead, in one transfer, then on as if round by round
        k = min(alphas.shape[1], max_iter - done)
        if k <= 0:
            break
        alphas, betas = torch.stack([alphas[:, :k], betas[:, :k]]).double().cpu()   # the one sync
        rule.rounds(all_rows, alphas, betas, done + 1)
        done += k
        # a problem's rounds: through its last row's stop (tol = 0: all); those with a row left go on
        for p in live:
            rounds[p] = done if tol <= 0 else int(rule.iters[spans[p]].max())
        live = [p for p in live if done < max_iter and going(p)]
        got = more(kry) if live and more is not None else None
        if got is None:
            break
        kry, alphas, betas = got
    for it in range(done + 1, max_iter + 1):   # eager rounds: one round of products, one sync each
        if not live:
            break
        rows = torch.cat([all_rows[spans[p]] for p in live])
        ab = [kry[p].product() for p in live]
        a_h, b_h = torch.stack([torch.cat([a for a, _ in ab]),
                                torch.cat([b for _, b in ab])]).double().cpu()   # the round's one sync
        rule.rounds(rows, a_h.unsqueeze(1), b_h.unsqueeze(1), it)
        for p in live:
            rounds[p] = it
        live = [p for p in live if it < max_iter and going(p)]
        for p in live:
            kry[p].extend(rule.active[spans[p]])
    theta = torch.where(rule.failed, math.nan, rule.theta)   # (a skipped row's is NaN already)
    start_back = rule.failed if skip is None else rule.failed | skip
    out = []
    for p, (_, v) in enumerate(problems):
        sl = spans[p]
        out.append((theta[sl], kry[p].ritz_vectors(rule.y[sl], start_back[sl], max(rounds[p], 1)), rule.iters[sl]))
    return out
