"""The noise bound, the volatility bound and their combination (paper Sec. 4, Eqs. 1-3, A.3, A.5; docs/METHOD.md §5).

Pure functions of floats (they also work elementwise on tensors). A zero, negative or NaN denominator
gives +inf, "no constraint", and nothing raises: a bound must never stop a run.
"""
from __future__ import annotations

import math
from collections import deque

EPS = 1e-12


def _div(num, den):
    if isinstance(den, (int, float)):
        return num / den if den > 0 else math.inf
    import torch
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(den, math.inf))


def alpha_g(grad_sq, sigma2_ps, B: int):
    """Noise bound alpha*_g = B ||g||^2 / sigma2_ps: the step below which a step descends in expectation
    under gradient noise of per-example variance sigma2_ps at batch size B (up to the 2/L factor)."""
    return _div(B * grad_sq, sigma2_ps)


def alpha_vol(vol, kappa: float = 1.0):
    """Volatility bound alpha*_vol = 1 / (kappa Vol) (practical form of Eq. A.3 when sigma2 >> mu^2)."""
    return _div(1.0, kappa * vol)


def tau(mu, sigma2):
    """Curvature-only bound tau = 2 mu / (mu^2 + sigma2) (Eq. A.3 with c = 1)."""
    return _div(2.0 * mu, mu * mu + sigma2)


def cantelli_cap(mu, sigma2, delta: float):
    """Eq. A.5: alpha <= 2 / (mu + sigma sqrt((1 - delta) / delta)), delta in (0, 1] the tolerated
    probability that the sharpness exceeds the level the step is safe for."""
    sigma = sigma2.clamp_min(0).sqrt() if hasattr(sigma2, "clamp_min") else math.sqrt(max(sigma2, 0.0))
    return _div(2.0, mu + sigma * math.sqrt((1 - delta) / delta))


STATISTICS = ("vol", "sq_dev", "sq_dev_over_mu", "lam_bar", "x2_over_mu_sq")


def curvature_statistic(kind: str, x, stats: dict):
    """S in Eq. 2 from the window statistics of VolatilityWindow.push: 'vol' (the paper), or the authors'
    per-method forms [code]: 'sq_dev' = (x - mu)^2, 'sq_dev_over_mu' = (x - mu)^2 / mu (the instantaneous
    stand-in for Vol), 'lam_bar' = x itself, 'x2_over_mu_sq' = (x^2 / mu)^2 (the last two 0 when mu <= 0,
    as the authors' `... / mu if mu > 0 else 0`)."""
    if kind == "vol":
        return stats["vol"]
    if kind == "sq_dev":
        return stats["sq_dev"]
    if kind == "sq_dev_over_mu":
        return _where_mu_positive(stats["mu"], lambda mu: stats["sq_dev"] / mu)
    if kind == "lam_bar":
        return x
    if kind == "x2_over_mu_sq":
        return _where_mu_positive(stats["mu"], lambda mu: (x * x / mu) ** 2)
    raise ValueError(f"scheduler.statistic: unknown {kind!r}")


def _where_mu_positive(mu, value):
    """value(mu) where mu > 0, else 0 (the authors' `... if mu > 0 else 0`), for a float or a tensor."""
    if hasattr(mu, "clamp_min"):   # tensors (batched.StackedScheduler)
        import torch
        return torch.where(mu > 0, value(mu), 0.0)
    return value(mu) if mu > 0 else 0.0


def alpha_tilde(grad_sq, sigma2_ps, B: int, S, beta: float):
    """Combined bound (Eqs. 2-3): alpha_tilde* = B ||g||^2 / (sigma2_ps + beta ||g||^2 S)."""
    return _div(B * grad_sq, sigma2_ps + beta * grad_sq * S)


def window_stats(values, x, n, valid=None) -> dict:
    """Eq. 1's statistics of a window of normalised sharpness values, newest x included: mu (mean), sigma2
    (population variance), vol = sigma2 / (mu + eps) [paper] and sq_dev = (x - mu)^2, the authors'
    instantaneous stand-in for the variance [code].

    values: the window oldest first, as floats (VolatilityWindow, n = len(values)), or as an (M, C, W)
    tensor of every (model, column) at once (batched.StackedScheduler: n (M, C) counts, valid (M, C, W)
    whether a slot holds a value; an empty slot holds 0). Both sum oldest first, and an empty slot adds an
    exact 0, so on the CPU a float window and a stacked one give the same bits."""
    mu = _sum_oldest_first(values) / n
    if valid is None:
        dev = [(v - mu) ** 2 for v in values]
    else:
        import torch
        dev = torch.where(valid, (values - mu.unsqueeze(-1)) ** 2, 0.0)
    sigma2 = _sum_oldest_first(dev) / n
    return {"mu": mu, "sigma2": sigma2, "vol": _ratio_or_inf(sigma2, mu + EPS), "sq_dev": (x - mu) ** 2}


def _sum_oldest_first(values):
    """Left-to-right sum over a window: Python's sum over floats; for a (..., W) tensor its cumsum's last
    entry, one kernel (the CPU's cumsum adds left to right, as sum does; a GPU's scan rounds otherwise)."""
    if hasattr(values, "cumsum"):
        return values.cumsum(-1)[..., -1]
    return sum(values)


def _ratio_or_inf(num, den):
    """num / den, +inf where den == 0: Vol's only guard (a negative mean gives a negative Vol, Eq. 1 as written)."""
    if isinstance(den, (int, float)):
        return num / den if den != 0 else math.inf
    import torch
    return torch.where(den != 0, num / den, math.inf)


class VolatilityWindow:
    """Window of the last W normalised sharpness values lambda_bar (Eq. 1); push(x) returns window_stats."""

    def __init__(self, W: int = 30):
        self.W = W
        self.values: deque = deque(maxlen=W)

    def push(self, x: float) -> dict:
        self.values.append(float(x))
        return window_stats(self.values, float(x), len(self.values))

    def state_dict(self) -> dict:
        return {"W": self.W, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.W = state["W"]
        self.values = deque(state["values"], maxlen=self.W)
