"""Regularisers of the baselines (paper Sec. 5; docs/METHOD.md §3).

- Coupled L2 [code]: lambda * theta is added to the gradient *before* Adam's moment estimates, which is
  exactly `torch.optim.Adam(weight_decay=lambda)` (not AdamW, whose decay is decoupled). Nothing is
  added to the loss: the engine passes `adam_weight_decay(cfg)` as every parameter group's
  `weight_decay` (models.param_groups). tests/test_regularizers.py checks the equivalence.
- Wasserstein-to-initialisation (Lewandowski et al., arXiv 2312.00246 / 2406.06811) [code]:
  R = lambda_W * sum over parameter tensors p (biases included) of ||sort(vec p) - sort(vec p0)||^2,
  p0 = the parameters at construction, sorted once. Its Hessian is 2 lambda_W I wherever the sort's
  permutation P is locally constant (almost everywhere): R = lambda_W ||P p - p0||^2 has Hessian
  2 lambda_W P^T P. So both penalties add a multiple of I to the loss's Hessian (`hessian_shift`).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def adam_weight_decay(cfg: dict) -> float:
    """Coupled-L2 coefficient for Adam's `weight_decay`: cfg["lam"] if cfg["kind"] == "l2", else 0."""
    return float(cfg["lam"]) if cfg["kind"] == "l2" else 0.0


def wasserstein_lam(cfg: dict) -> float:
    """The Wasserstein penalty's lambda_W: cfg["lam"] if cfg["kind"] == "wasserstein", else 0."""
    return float(cfg["lam"]) if cfg["kind"] == "wasserstein" else 0.0


class WassersteinPenalty:
    """R(model) = lam * sum_p ||sort(vec p) - sort(vec p0)||^2 over `model.parameters()` (docs/METHOD.md §3).

    For two equal-size empirical distributions, the sorted (quantile) matching is the optimal transport
    plan, so each term is n times the squared 2-Wasserstein distance between the tensor's current and
    initial value distributions. The gradient flows through the sort: the element of p at sorted rank k
    receives 2 lam (p_(k) - p0_(k)). One sort per tensor per call; p0 is sorted once (`reset`) and kept
    detached on the parameters' device. BatchNorm running statistics are buffers, not parameters, so
    they are not penalised; BatchNorm affine parameters are.
    """

    def __init__(self, model: nn.Module, lam: float):
        self.lam = float(lam)
        self.reset(model)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """(Re-)capture the sorted initial distribution of every parameter tensor (reset arm)."""
        self.sorted_init = [p.detach().flatten().sort().values.clone() for p in model.parameters()]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = list(model.parameters())
        if len(params) != len(self.sorted_init):
            raise ValueError(f"model has {len(params)} parameter tensors, penalty captured "
                             f"{len(self.sorted_init)}")
        terms = [(p.flatten().sort().values - p0).square().sum() for p, p0 in zip(params, self.sorted_init)]
        return self.lam * torch.stack(terms).sum()

    def state_dict(self) -> dict:
        """The sorted init must travel with checkpoints (a resumed run may not re-capture it)."""
        return {"lam": self.lam, "sorted_init": [t.clone() for t in self.sorted_init]}

    def load_state_dict(self, state: dict) -> None:
        new = state["sorted_init"]
        if len(new) != len(self.sorted_init) or any(a.shape != b.shape for a, b in zip(new, self.sorted_init)):
            raise ValueError("WassersteinPenalty.load_state_dict: parameter shapes do not match")
        self.lam = float(state["lam"])
        # keep the current device (a checkpoint may be loaded with another map_location)
        self.sorted_init = [t.detach().to(old.device, old.dtype).clone()
                            for t, old in zip(new, self.sorted_init)]


def hessian_shift(cfg: dict) -> float:
    """c such that the regulariser adds c I to the training objective's Hessian: coupled L2's lambda
    (Adam's weight_decay), Wasserstein's 2 lambda_W (the sort is piecewise constant, see the module's
    docstring), 0 for none. The batched engine's curvature probe adds c V to the cross-entropy's
    Hessian-vector products instead of differentiating the penalty twice (the sort's backward through
    full-size tensors in every Lanczos product); autograd's value is the same up to the order of a sum
    (tests/test_regularizers.py, tests/test_batched.py)."""
    return 2.0 * wasserstein_lam(cfg) if cfg["kind"] == "wasserstein" else adam_weight_decay(cfg)


def build_regularizer(cfg: dict, model: nn.Module) -> WassersteinPenalty | None:
    """The penalty added to the loss, or None for "none" and "l2" (L2 lives in Adam's weight_decay,
    see `adam_weight_decay`). cfg = params.yaml `regularizer` block {kind, lam}."""
    kind = cfg["kind"]
    if kind == "wasserstein":
        return WassersteinPenalty(model, cfg["lam"])
    if kind in ("none", "l2"):
        return None
    raise ValueError(f"regularizer.kind: unknown {kind!r}; one of none, l2, wasserstein")
