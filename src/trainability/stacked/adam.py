"""torch.optim.Adam on the stacked model (optim.py's one-model Adam groups, per model and layer), and the
effective steps of measure.py computed from its moments."""
from __future__ import annotations

import functools
import math

import torch

from ..measure import effective_step, rms_step
from .model import StackedMLP, model_view


def adam_update(params, grads, exp_avgs, exp_avg_sqs, factors, weight_decays, eps: float) -> None:
    """torch.optim.Adam's update, the single-tensor path's arithmetic, in place on stacked tensors.
    factors[i]: parameter i's (1 - beta1, beta2, 1 - beta2, lr / bias_correction1, sqrt(bias_correction2)),
    each broadcastable per model; weight_decays[i] its coupled L2 strengths, or None for none."""
    for p, g, m, v, (one_minus_b1, b2, one_minus_b2, step_size, bc2), wd in zip(
            params, grads, exp_avgs, exp_avg_sqs, factors, weight_decays):
        if wd is not None:   # StackedAdam.grad_with_decay, inside the function so that it fuses
            g = g + wd * p
        m.lerp_(g, one_minus_b1)
        v.mul_(b2).addcmul_(g, g * one_minus_b2)
        p.sub_(step_size * m / (v.sqrt() / bc2).add_(eps))   # addcdiv's order: (s * m) / d


@functools.cache
def _fused_adam_update():
    """adam_update compiled (torch.compile, built once per process): a few fused kernels per step
    instead of ~13 elementwise passes per tensor; the same values up to float rounding."""
    return torch.compile(adam_update, dynamic=True)


class StackedAdam:
    """torch.optim.Adam's arithmetic (coupled weight_decay, bias correction; single-tensor path) on the
    stacked tensors, with a learning rate per (model, layer) and a step count per model (the reset arm
    restarts one model's Adam). lr is float64, as a parameter group's Python float. fused: the update
    through torch.compile (`fused_adam`)."""

    def __init__(self, net: StackedMLP, lr: torch.Tensor, weight_decay: torch.Tensor, betas, eps: float,
                 fused: bool = False):
        self.net, self.lr, self.wd = net, lr, weight_decay
        self.update = _fused_adam_update() if fused else adam_update
        self.has_wd = bool((weight_decay != 0).any())   # fixed for the run: one sync, at construction
        self.eps = eps
        M, L = lr.shape
        # per (model, layer), as each model's Adam groups: optim.beta_ramp moves layer 1's, and a reset
        # model starts its task with fresh betas while the others keep the ramp's last values
        self.betas0 = tuple(betas)
        self.beta1 = torch.full((M, L), float(betas[0]), dtype=torch.float64, device=lr.device)
        self.beta2 = torch.full((M, L), float(betas[1]), dtype=torch.float64, device=lr.device)
        self.k = torch.zeros(M, dtype=torch.float64, device=lr.device)
        self.exp_avg = [torch.zeros_like(p) for p in net.params()]
        self.exp_avg_sq = [torch.zeros_like(p) for p in net.params()]
        # adam_update's coupled-L2 strengths per parameter: views of wd, built once (not per step)
        self.wd_views = [model_view(weight_decay, p) if self.has_wd else None for p in net.params()]

    def grad_with_decay(self, p: torch.Tensor) -> torch.Tensor:
        """Adam's coupled L2: grad + weight_decay * theta (what Adam's moments see)."""
        return p.grad + model_view(self.wd, p) * p.detach() if self.has_wd else p.grad

    @torch.no_grad()
    def step(self) -> None:
        self.k += 1
        # the (model, layer) factors once per step, in float64 like Adam's Python scalars, then fp32
        bc1 = 1 - self.beta1 ** self.k.unsqueeze(1)
        bc2_sqrt = (1 - self.beta2 ** self.k.unsqueeze(1)).sqrt()
        factors = torch.stack([1 - self.beta1, self.beta2, 1 - self.beta2, self.lr / bc1, bc2_sqrt])
        factors = factors.to(self.exp_avg[0].dtype)
        ps = self.net.params()
        self.update(ps, [p.grad for p in ps], self.exp_avg, self.exp_avg_sq,
                    [tuple(model_view(f[:, self.net.param_layer[i]], p) for f in factors) for i, p in enumerate(ps)],
                    self.wd_views, self.eps)

    @torch.no_grad()
    def reset(self, m: int, lr: float) -> None:
        self.k[m] = 0
        self.lr[m] = lr
        self.beta1[m], self.beta2[m] = self.betas0
        for t in self.exp_avg + self.exp_avg_sq:
            t[m].zero_()

    def moments(self, code_form: bool) -> dict[str, torch.Tensor]:
        """What the effective steps read, on the device, float64: lr, beta1, beta2 (M, L), k (M,), each
        layer's weights' summed v ("v_sums", (M, L)) and, with code_form, every parameter's ("raw", (M,)).
        The probe fetches them with its statistics in one transfer (`_to_host`), and `effective_steps`
        computes on the host: ~40 tiny float64 ops that were each a kernel launch."""
        L = self.net.n_layers
        out = {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "k": self.k,
               "v_sums": torch.stack([self.exp_avg_sq[self.net.weight_pos[l]].double().sum((1, 2))
                                      for l in range(L)], 1)}
        if code_form:
            out["raw"] = sum(v.double().flatten(1).sum(1) for v in self.exp_avg_sq)
        return out

    def effective_steps(self, s: dict, code_alpha_agg: bool | torch.Tensor):
        """(alpha, alpha_agg), each (M, L) float64, from `moments` (the state before this step; on any
        device) as measure.py's adam_effective_step / adam_alpha_agg (weights only, biases skipped). NaN
        before the first step. code_alpha_agg: one bool for every model, or (M,) bools on s's device when
        the models' forms differ."""
        mixed = isinstance(code_alpha_agg, torch.Tensor)
        L = self.net.n_layers
        v_hat, counts = self._weights_v_hat(s)
        k = s["k"].unsqueeze(1)
        if mixed or code_alpha_agg:   # [code] raw v over every parameter (biases too), layer 1's LR
            n_all = sum(p[0].numel() for p in self.net.params())
            code = rms_step(s["lr"][:, :1], (s["raw"] / n_all).unsqueeze(1), self.eps).expand(-1, L)
        if mixed or not code_alpha_agg:
            paper = rms_step(s["lr"], v_hat / counts, self.eps)
        agg = torch.where(code_alpha_agg.unsqueeze(1), code, paper) if mixed else \
            (code if code_alpha_agg else paper)
        alpha = effective_step(s["lr"], s["beta1"], k, v_hat / counts, self.eps)
        nan = torch.full_like(alpha, math.nan)
        return torch.where(k > 0, alpha, nan), torch.where(k > 0, agg, nan)

    def _weights_v_hat(self, s: dict):
        """(sum of bias-corrected v over each layer's weights (M, L), weight counts (L,)) from `moments`:
        measure.py's _weights_v_hat for every model and layer."""
        L = self.net.n_layers
        counts = torch.tensor([self.net.W[l][0].numel() for l in range(L)], dtype=torch.float64,
                              device=s["k"].device)
        return s["v_sums"] / (1 - s["beta2"] ** s["k"].unsqueeze(1)), counts

    def global_effective_steps(self, s: dict):
        """(alpha, alpha_agg), each (M,) float64, of the whole network (measure._global_effective_step)
        from `moments`: RMS over every weight tensor, the first layer's LR and beta1. NaN before the first step."""
        v_hat, counts = self._weights_v_hat(s)
        total = sum(v_hat[:, l] for l in range(v_hat.shape[1]))   # in layer order, as the float sum
        agg = rms_step(s["lr"][:, 0], total / float(counts.sum()), self.eps)
        alpha = agg / (1 - s["beta1"][:, 0] ** s["k"])
        nan = torch.full_like(alpha, math.nan)
        return torch.where(s["k"] > 0, alpha, nan), torch.where(s["k"] > 0, agg, nan)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "k": self.k, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "beta1": self.beta1, "beta2": self.beta2}

    def load_state_dict(self, s: dict) -> None:
        with torch.no_grad():
            self.beta1.copy_(s["beta1"])
            self.beta2.copy_(s["beta2"])
            self.lr.copy_(s["lr"])
            self.k.copy_(s["k"])
            for a, b in zip(self.exp_avg + self.exp_avg_sq, s["exp_avg"] + s["exp_avg_sq"]):
                a.copy_(b)
