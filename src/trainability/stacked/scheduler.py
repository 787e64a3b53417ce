"""scheduler.NoiseCurvatureScheduler (Algorithm 1) for every model of the stack at once, on host tensors,
and its decision rows as the one-model scheduler's dicts."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .. import bounds
from ..scheduler import BOUNDS, ROW_FIELDS, RULE_CONSTANTS, algorithm1_rule, chosen_bound, layer_bounds, lr_after
from .adam import StackedAdam

RULES = ("none", "cool", "warm")
NUM_FIELDS = tuple(f for f in ROW_FIELDS if f != "rule")


class StackedScheduler:
    """scheduler.NoiseCurvatureScheduler (Algorithm 1) for every model at once: the windows are
    (M, C, W) shift registers, the rules tensors, and only models with act=True change LRs. Each model has
    its own bound, Eq. 2 statistic S, beta and variant; the other constants are shared. Columns are the
    L layers, plus the whole network (column L) when the probe measures it: a global-variant model
    decides there and applies that rule to every layer (its layer rows log their own bounds).
    It runs on the host, on the probe's host measurement (StackedProbe.measure): a decision's ~100 ops on
    (M, C) tensors each cost a kernel launch and Python's dispatch on a GPU (2.4-3.4 ms a decision on an
    H200, docs/gpu), a few microseconds each here; its windows' sums then round as train.run's floats do,
    and the new learning rates go to the device in one copy."""

    def __init__(self, adam: StackedAdam, B: int, cfgs: list[dict], act: list[bool], columns: int):
        s = cfgs[0]
        self.adam, self.B = adam, B
        for k in RULE_CONSTANTS:   # shared by the batch (planning.PER_MODEL_KEYS)
            setattr(self, k, s[k])
        self.W = s["window"]
        dev = torch.device("cpu")
        M, L = adam.lr.shape
        betas = [c["beta"] for c in cfgs]
        self.beta = betas[0] if len(set(betas)) == 1 else \
            torch.tensor(betas, dtype=torch.float64, device=dev).unsqueeze(1)
        # models per statistic: layer_bounds runs once per statistic in use
        stats = [c["statistic"] for c in cfgs]
        self.statistics = {k: torch.tensor([x == k for x in stats], device=dev).unsqueeze(1)
                           for k in dict.fromkeys(stats)}
        self.bound_idx = torch.tensor([BOUNDS.index(c["bound"]) for c in cfgs], device=dev)
        self.act = torch.tensor(act, device=dev)
        self.glob = torch.tensor([c["variant"] == "global" for c in cfgs], device=dev).unsqueeze(1)
        self.values = torch.zeros(M, columns, self.W, dtype=torch.float64, device=dev)
        self.count = torch.zeros(M, columns, dtype=torch.long, device=dev)

    def _bounds(self, m: dict, lam_bar, st: dict, B: int) -> dict:
        """scheduler.layer_bounds for every model, each with its own statistic."""
        out = None
        for statistic, rows in self.statistics.items():
            settings = SimpleNamespace(statistic=statistic, kappa=self.kappa, beta=self.beta)
            bd = layer_bounds(m, lam_bar, st, B, settings)
            out = bd if out is None else {k: torch.where(rows, bd[k], out[k]) for k in bd}
        return out

    def reset(self, m: int) -> None:
        self.values[m] = 0
        self.count[m] = 0

    def _push(self, x: torch.Tensor):
        """VolatilityWindow.push for every (model, column) whose x is not NaN; NaN stats elsewhere. The
        windows are shift registers, oldest first, newest last, the empty slots (zeros) in front, so that
        bounds.window_stats sums them in VolatilityWindow's order."""
        ok = ~torch.isnan(x)
        shifted = torch.cat([self.values[..., 1:], x.unsqueeze(2)], 2)
        self.values = torch.where(ok.unsqueeze(2), shifted, self.values)
        self.count = torch.where(ok, (self.count + 1).clamp_max(self.W), self.count)
        first = self.W - self.count   # the oldest value's slot
        st = bounds.window_stats(self.values, x, self.count.clamp_min(1).double(),
                                 valid=torch.arange(self.W, device=x.device) >= first.unsqueeze(2))
        nan = torch.full_like(x, math.nan)
        return {k: torch.where(ok, v, nan) for k, v in st.items()}

    @torch.no_grad()
    def step(self, m: dict, task_frac: float | torch.Tensor) -> torch.Tensor:
        """One decision for every (model, column) from the probe's host measurement m; returns the rows as
        (len(NUM_FIELDS) + 1, M, C) float64 host tensors (the last plane is the rule code: RULES index), lr
        after the decision, and sets the device's learning rates."""
        L = m["lr"].shape[1]
        lam_bar = m["alpha_agg"] * m["lam_max"]
        if lam_bar.shape[1] > L:   # only a global-variant model pushes its whole-network window
            lam_bar = torch.cat([lam_bar[:, :L], torch.where(self.glob, lam_bar[:, L:], math.nan)], 1)
        st = self._push(lam_bar)
        g, s2, B = m["grad_sq"], m["sigma2_ps"], m.get("batch_size", self.B)
        bd = self._bounds(m, lam_bar, st, B)
        bound = chosen_bound(bd, self.bound_idx)
        alpha = m["alpha"]
        cool, warm = algorithm1_rule(alpha, bound, task_frac, self)
        if cool.shape[1] > L:   # a global-variant model's layers follow its whole-network rule
            cool, warm = (torch.cat([torch.where(self.glob, r[:, L:], r[:, :L]), r[:, L:]], 1) for r in (cool, warm))
        act = self.act.unsqueeze(1)
        lr = m["lr"]
        lr_row = lr_after(lr, cool[:, :L], warm[:, :L], act, self)
        self.adam.lr.copy_(lr_row)
        rule = torch.where(cool, 1.0, torch.where(warm, 2.0, 0.0)).double()
        if cool.shape[1] > L:
            lr_row = torch.cat([lr_row, lr_row[:, :1]], 1)   # the global row logs the first group's LR
        row = {"lr": lr_row, "alpha": alpha, **bd, "bound": bound, "lam_max": m["lam_max"],
               "lam_bar": lam_bar, "vol": st["vol"], "mu": st["mu"], "sigma2_win": st["sigma2"], "sigma2_ps": s2,
               "grad_sq": g, "eig_iters": m["eig_iters"]}
        return torch.stack([row[f] for f in NUM_FIELDS] + [rule])

    def state_dict(self) -> dict:
        return {"values": self.values, "count": self.count}

    def load_state_dict(self, s: dict) -> None:   # host tensors, whatever map_location did
        self.values, self.count = s["values"].cpu().clone(), s["count"].cpu().clone()


def rows_to_dicts(rows: torch.Tensor, m: int, keys: list) -> dict:
    """One model's decision rows (F+1, C) as the scheduler's {key: {field: value}} dict: keys name the
    columns to keep (layers 1..L, then "global" for a global-variant model)."""
    vals = rows[:, m, :].tolist()
    out = {}
    for c, key in enumerate(keys):
        r = {f: vals[i][c] for i, f in enumerate(NUM_FIELDS)}
        r["eig_iters"] = int(r["eig_iters"])
        r["rule"] = RULES[int(vals[-1][c])]
        out[key] = r
    return out


def no_rules(L: int) -> dict:
    """Rule counters {layer 1..L, "global": {rule: 0}} (scheduler.NoiseCurvatureScheduler.rule_counts)."""
    return {k: {r: 0 for r in RULES} for k in [*range(1, L + 1), "global"]}
