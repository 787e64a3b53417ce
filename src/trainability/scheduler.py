"""The per-layer learning-rate scheduler (paper Algorithm 1, Table 1; docs/METHOD.md §6).

Like `torch.optim.lr_scheduler`, it holds the optimiser and changes `group["lr"]`; unlike them it is
driven by a measurement (measure.DecisionProbe) every K steps:

    rows = scheduler.step(probe.measure(closure), task_frac)   # task_frac = progress through the task

For each layer l: lambda_bar = alpha_agg * lambda_max enters the layer's volatility window; the bound
(combined alpha_tilde*, noise-only alpha*_g or curvature-only tau) is computed, then
  cool  if alpha > floor and alpha > gamma * bound:                       eta_l <- cool * eta_l
  warm  elif task_frac < warm_frac and alpha < warm_factor * gamma * bound: eta_l <- warm * eta_l.
With act=False (vanilla and reset arms) everything is computed and the *would-be* rule ("cool", "warm"
or "none") is reported in the row's `rule` field and counted in `rule_counts`, but no learning rate
changes: that is how Figs. 3-4 of the uncontrolled runs are drawn, and the would-be rule says when the
controller would have intervened (the arm, in the run config, tells which reading applies).
NaN inputs (no Adam state yet, a diverged run, an empty window) give rule "none" and no change.
"""
from __future__ import annotations

import math

from . import bounds

# Algorithm 1's constants (Table 1; params.yaml's `scheduler` block): both engines' schedulers hold these
RULE_CONSTANTS = ("safety", "cool", "warm", "floor", "warm_frac", "warm_factor", "kappa")
# the bound Algorithm 1 compares the effective step with (scheduler.bound) -> its field of layer_bounds
BOUND_FIELDS = {"combined": "alpha_tilde", "noise": "alpha_g", "curvature": "tau"}
BOUNDS = tuple(BOUND_FIELDS)
ROW_FIELDS = ("lr", "alpha", "alpha_g", "alpha_vol", "tau", "alpha_tilde", "bound", "lam_max", "lam_bar",
              "vol", "mu", "sigma2_win", "sigma2_ps", "grad_sq", "eig_iters", "rule")


# Algorithm 1's arithmetic is written once, below, for a float (train.run, one layer at a time) and for a
# tensor of every (model, layer) at once (stacked.scheduler.StackedScheduler): the same operations in the same order,
# so a float run and a batched run differ by rounding only.
def _isnan(x):
    return x != x


def _where(cond, a, b):
    """a where cond, else b: for a Python bool (floats) or a bool tensor."""
    if isinstance(cond, bool):
        return a if cond else b
    import torch
    return torch.where(cond, a, b)


def _not(x):
    return (not x) if isinstance(x, bool) else ~x


def layer_bounds(m: dict, lam_bar, stats: dict, B: int, settings) -> dict:
    """The bounds of one decision (Eqs. 1-3, A.3; docs/METHOD.md §5): alpha*_g, alpha*_vol, tau and
    alpha_tilde* from the measurement m (grad_sq, sigma2_ps), lambda_bar and its window statistics.
    `settings` has the scheduler's kappa, beta and statistic. NaN policy: bounds.py maps a zero (or NaN)
    denominator to +inf, "no constraint"; a NaN *input* (a diverged run, a failed eigen-solve) gives a NaN
    bound instead, i.e. no decision rather than a warm."""
    g, s2 = m["grad_sq"], m["sigma2_ps"]
    noise_nan = _isnan(g) | _isnan(s2)
    curv_nan = _isnan(lam_bar)
    S = bounds.curvature_statistic(settings.statistic, lam_bar, stats)
    return {"alpha_g": _where(noise_nan, math.nan, bounds.alpha_g(g, s2, B)),
            "alpha_vol": _where(curv_nan, math.nan, bounds.alpha_vol(stats["vol"], settings.kappa)),
            "tau": _where(curv_nan, math.nan, bounds.tau(stats["mu"], stats["sigma2"])),
            "alpha_tilde": _where(noise_nan | curv_nan, math.nan,
                                  bounds.alpha_tilde(g, s2, B, S, settings.beta))}


def algorithm1_rule(alpha, bound, task_frac: float, settings):
    """Algorithm 1's decision (docs/METHOD.md §6) -> (cool, warm): cool if alpha > floor and alpha >
    gamma * bound; else warm within the first warm_frac of the task if alpha < warm_factor * gamma * bound.
    A NaN alpha (no Adam state yet) or bound: neither. `settings` has floor, safety (gamma), warm_frac and
    warm_factor."""
    known = _not(_isnan(alpha) | _isnan(bound))
    cool = known & (alpha > settings.floor) & (alpha > settings.safety * bound)
    warm = known & _not(cool) & (task_frac < settings.warm_frac) & \
        (alpha < settings.warm_factor * settings.safety * bound)
    return cool, warm


def chosen_bound(bd: dict, bound):
    """The bound of layer_bounds' `bd` that Algorithm 1 compares alpha with: `bound` one of BOUNDS, or
    (tensors (M, C)) each model's index into BOUNDS, (M,)."""
    if isinstance(bound, str):
        return bd[BOUND_FIELDS[bound]]
    import torch
    every = torch.stack([bd[f] for f in BOUND_FIELDS.values()])
    return every.gather(0, bound.view(1, -1, 1).expand(1, *every.shape[1:])).squeeze(0)


def lr_after(lr, cool, warm, act, settings):
    """Algorithm 1's learning-rate update: eta <- cool * eta on a cool, warm * eta on a warm, where the
    scheduler acts (act: the scheduled arm, loop.acts); floats and Python bools, or tensors. `settings`
    has cool and warm (the factors)."""
    return _where(act & cool, lr * settings.cool, _where(act & warm, lr * settings.warm, lr))


class NoiseCurvatureScheduler:
    """Algorithm 1 with Table 1's defaults; bound Eqs. 1-3 / A.3 from bounds.py (docs/METHOD.md §5-6).

    safety = gamma; kappa: alpha*_vol = 1 / (kappa Vol); beta, statistic: Eq. 2's
    sigma2_tilde = sigma2_ps + beta ||g||^2 S (paper: S = Vol; authors: e.g. statistic="lam_bar", beta=20).
    """

    def __init__(self, optimizer, batch_size: int, *, variant: str = "per_layer", bound: str = "combined",
                 safety: float = 0.8, cool: float = 0.99, warm: float = 1.01, floor: float = 0.12,
                 warm_frac: float = 0.1, warm_factor: float = 0.3, window: int = 30, kappa: float = 1.0,
                 beta: float = 1.0, statistic: str = "vol", act: bool = True,
                 code_alpha_agg: bool = False):
        if variant not in ("per_layer", "global"):
            raise ValueError(f"scheduler.variant: unknown {variant!r}")
        if bound not in BOUNDS:
            raise ValueError(f"scheduler.bound: unknown {bound!r}")
        if statistic not in bounds.STATISTICS:
            raise ValueError(f"scheduler.statistic: unknown {statistic!r}")   # fail at build, not mid-run
        self.optimizer, self.B = optimizer, batch_size
        self.variant, self.bound = variant, bound
        self.safety, self.cool, self.warm, self.floor = safety, cool, warm, floor
        self.warm_frac, self.warm_factor = warm_frac, warm_factor
        self.kappa, self.beta, self.statistic = kappa, beta, statistic
        self.act = act
        self.code_alpha_agg = code_alpha_agg   # consumed by the probe; kept here for the record
        # one window per layer and one for the whole network: per-layer bounds are logged in both variants
        keys = [g["layer"] for g in optimizer.param_groups] + ["global"]
        self.windows = {k: bounds.VolatilityWindow(window) for k in keys}
        # how often each rule fired (would have fired, if act=False) per decision key (docs/METHOD.md §6)
        self.rule_counts = {k: {"cool": 0, "warm": 0, "none": 0} for k in keys}

    # -- the decision for one layer (or the whole network); pushes the window, counts nothing
    def _decide(self, key, m: dict, task_frac: float) -> dict:
        lam_bar = m["alpha_agg"] * m["lam_max"]   # normalised sharpness (paper Sec. 4)
        # a NaN would poison the window for W decisions: skip it
        stats = self.windows[key].push(lam_bar) if not _isnan(lam_bar) else \
            {"mu": math.nan, "sigma2": math.nan, "vol": math.nan, "sq_dev": math.nan}
        B = m.get("batch_size", self.B)   # the measured minibatch's size (an epoch's last may be partial)
        bd = layer_bounds(m, lam_bar, stats, B, self)
        bound = chosen_bound(bd, self.bound)
        alpha = m["alpha"]
        cool, warm = algorithm1_rule(alpha, bound, task_frac, self)
        rule = "cool" if cool else "warm" if warm else "none"
        return {"alpha": alpha, **bd, "bound": bound, "lam_max": m["lam_max"], "lam_bar": lam_bar,
                "vol": stats["vol"], "mu": stats["mu"], "sigma2_win": stats["sigma2"], "sigma2_ps": m["sigma2_ps"],
                "grad_sq": m["grad_sq"], "eig_iters": m.get("eig_iters", 0), "rule": rule}

    def _apply(self, groups, rule: str) -> None:
        for g in groups:
            g["lr"] = lr_after(g["lr"], rule == "cool", rule == "warm", self.act, self)

    def step(self, measurement: dict, task_frac: float) -> dict:
        """One decision step (paper Algorithm 1): decide (and, if act, apply) for every layer.

        measurement: {l: {grad_sq, sigma2_ps, lam_max, alpha, alpha_agg}, ..., "global": {...}} with l the
        groups' "layer" keys; task_frac: progress through the current task in [0, 1) (the warm window).
        Returns {l: row, ...} (plus "global" for the global variant), row fields = ROW_FIELDS, "lr" after
        the decision."""
        groups = self.optimizer.param_groups
        rows = {}
        if self.variant == "per_layer":
            for g in groups:
                row = self._decide(g["layer"], measurement[g["layer"]], task_frac)
                self.rule_counts[g["layer"]][row["rule"]] += 1
                self._apply([g], row["rule"])
                rows[g["layer"]] = dict(row, lr=g["lr"])
        else:
            # one alpha, one bound, one window; the same multiplier for every group
            row = self._decide("global", measurement["global"], task_frac)
            self.rule_counts["global"][row["rule"]] += 1
            self._apply(groups, row["rule"])
            rows["global"] = dict(row, lr=groups[0]["lr"])
            for g in groups:  # per-layer bounds are still logged (Figs. 3-4); the decision is the shared one
                if g["layer"] in measurement:
                    layer_row = self._decide(g["layer"], measurement[g["layer"]], task_frac)
                    rows[g["layer"]] = dict(layer_row, lr=g["lr"], rule=row["rule"])
        return rows

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Windows and rule counters (the LRs live in the optimiser's own state_dict)."""
        return {"windows": {str(k): w.state_dict() for k, w in self.windows.items()},
                "rule_counts": {str(k): dict(v) for k, v in self.rule_counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        for k, w in self.windows.items():
            w.load_state_dict(state["windows"][str(k)])
        for k in self.rule_counts:
            self.rule_counts[k] = dict(state["rule_counts"][str(k)])


def build_scheduler(cfg: dict, optimizer, batch_size: int) -> NoiseCurvatureScheduler:
    """From params.yaml's `scheduler` block plus `act` (True only for the scheduled arm)."""
    return NoiseCurvatureScheduler(optimizer, batch_size, **cfg)


def crossings(rows: list[dict]) -> dict[str, float]:
    """Fig. 4's quantity for one task: the fraction of decision steps at which SOME layer's effective step
    exceeds its bound: combined alpha_tilde*, noise-only alpha*_g, volatility-only alpha*_vol (no safety)."""
    keys = {"combined": "alpha_tilde", "noise": "alpha_g", "vol": "alpha_vol"}
    n = len(rows)
    out = {}
    for name, field in keys.items():
        hits = 0
        for r in rows:
            layers = [v for k, v in r.items() if k != "global" and field in v]
            hits += any(v["alpha"] > v[field] for v in layers)
        out[name] = hits / n if n else math.nan
    return out
