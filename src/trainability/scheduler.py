"""The per-layer learning-rate scheduler (SPEC 6; paper Algorithm 1, Table 1).

Like `torch.optim.lr_scheduler`, it holds the optimiser and changes `group["lr"]`; unlike them it is
driven by a measurement (measure.DecisionProbe) every K steps:

    rows = scheduler.step(probe.measure(closure), task_frac)   # task_frac = progress through the task

For each layer l: lambda_bar = alpha_agg * lambda_max enters the layer's volatility window; the bound
(combined alpha_tilde*, noise-only alpha*_g or curvature-only tau) is computed, then
  cool  if alpha > floor and alpha > gamma * bound:                       eta_l <- cool * eta_l
  warm  elif task_frac < warm_frac and alpha < warm_factor * gamma * bound: eta_l <- warm * eta_l.
With act=False (vanilla and reset arms) everything is computed and the would-be rule is reported, but
no learning rate changes: that is how the figures of the uncontrolled runs are drawn.
"""
from __future__ import annotations

import math

from . import bounds as Bd

ROW_FIELDS = ("lr", "alpha", "alpha_g", "alpha_vol", "tau", "alpha_tilde", "bound", "lam_max", "lam_bar",
              "vol", "mu", "sigma2_win", "sigma2_ps", "grad_sq", "eig_iters", "rule")


class NoiseCurvatureScheduler:
    def __init__(self, optimizer, batch_size: int, *, variant: str = "per_layer", bound: str = "combined",
                 safety: float = 0.8, cool: float = 0.99, warm: float = 1.01, floor: float = 0.12,
                 warm_frac: float = 0.1, warm_factor: float = 0.3, window: int = 30, kappa: float = 1.0,
                 beta: float = 1.0, statistic: str = "vol", act: bool = True, beta_ramp: bool = False,
                 code_alpha_agg: bool = False):
        if variant not in ("per_layer", "global"):
            raise ValueError(f"scheduler.variant: unknown {variant!r}")
        if bound not in ("combined", "noise", "curvature"):
            raise ValueError(f"scheduler.bound: unknown {bound!r}")
        self.optimizer, self.B = optimizer, batch_size
        self.variant, self.bound = variant, bound
        self.safety, self.cool, self.warm, self.floor = safety, cool, warm, floor
        self.warm_frac, self.warm_factor = warm_frac, warm_factor
        self.kappa, self.beta, self.statistic = kappa, beta, statistic
        self.act, self.beta_ramp = act, beta_ramp
        self.code_alpha_agg = code_alpha_agg   # consumed by the probe; kept here for the record
        keys = [g["layer"] for g in optimizer.param_groups] + ["global"]
        self.windows = {k: Bd.VolatilityWindow(window) for k in keys}
        self.rule_counts = {k: {"cool": 0, "warm": 0, "none": 0} for k in keys}
        self.base_betas = [tuple(g["betas"]) for g in optimizer.param_groups]

    # -- the decision for one layer (or the whole network)
    def _decide(self, key, m: dict, task_frac: float) -> dict:
        lam_bar = m["alpha_agg"] * m["lam_max"]
        stats = self.windows[key].push(lam_bar) if lam_bar == lam_bar else \
            {"mu": math.nan, "sigma2": math.nan, "vol": math.nan, "sq_dev": math.nan}
        a_g = Bd.alpha_g(m["grad_sq"], m["sigma2_ps"], self.B)
        a_vol = Bd.alpha_vol(stats["vol"], self.kappa)
        t = Bd.tau(stats["mu"], stats["sigma2"])
        S = Bd.curvature_statistic(self.statistic, lam_bar, stats)
        a_tilde = Bd.alpha_tilde(m["grad_sq"], m["sigma2_ps"], self.B, S, self.beta)
        bound = {"combined": a_tilde, "noise": a_g, "curvature": t}[self.bound]
        alpha = m["alpha"]
        rule = "none"
        if alpha == alpha and bound == bound:   # NaN (no Adam state yet, empty window) -> no decision
            if alpha > self.floor and alpha > self.safety * bound:
                rule = "cool"
            elif task_frac < self.warm_frac and alpha < self.warm_factor * self.safety * bound:
                rule = "warm"
        self.rule_counts[key][rule] += 1
        return {"alpha": alpha, "alpha_g": a_g, "alpha_vol": a_vol, "tau": t, "alpha_tilde": a_tilde,
                "bound": bound, "lam_max": m["lam_max"], "lam_bar": lam_bar, "vol": stats["vol"],
                "mu": stats["mu"], "sigma2_win": stats["sigma2"], "sigma2_ps": m["sigma2_ps"],
                "grad_sq": m["grad_sq"], "eig_iters": m.get("eig_iters", 0), "rule": rule}

    def _apply(self, groups, rule: str) -> None:
        if not self.act or rule == "none":
            return
        factor = self.cool if rule == "cool" else self.warm
        for g in groups:
            g["lr"] *= factor

    def step(self, measurement: dict, task_frac: float) -> dict:
        """Decide (and, if act, apply) for every layer; returns {layer: row} for the run record."""
        groups = self.optimizer.param_groups
        rows = {}
        if self.variant == "per_layer":
            for g in groups:
                row = self._decide(g["layer"], measurement[g["layer"]], task_frac)
                self._apply([g], row["rule"])
                rows[g["layer"]] = dict(row, lr=g["lr"])
        else:
            row = self._decide("global", measurement["global"], task_frac)
            self._apply(groups, row["rule"])
            rows["global"] = dict(row, lr=groups[0]["lr"])
            for g in groups:  # per-layer bounds are still logged (Figs. 3-4); the decision is shared
                layer_row = self._decide(g["layer"], measurement[g["layer"]], task_frac)
                rows[g["layer"]] = dict(layer_row, lr=g["lr"], rule=row["rule"])
        return rows

    def on_step(self, task_frac: float) -> None:
        """Authors' quirk [code], off by default: after every step, overwrite the first layer's Adam betas
        with a within-task ramp, beta1 0.9 -> 0.945 and beta2 0.999 -> 0.875, linear in task progress."""
        if not self.beta_ramp:
            return
        g = self.optimizer.param_groups[0]
        g["betas"] = (0.9 + (0.945 - 0.9) * task_frac, 0.999 + (0.875 - 0.999) * task_frac)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
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
