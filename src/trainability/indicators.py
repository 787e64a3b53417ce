"""The indicators the paper shows to be unreliable predictors of loss of trainability (paper Sec. 3,
Fig. 1 and Fig. 9; docs/METHOD.md §4): Hessian rank (an empirical-Fisher rank proxy), unit-sign
entropy, sharpness, weight norm, gradient norm and the gradient/parameter ratio, plus two beyond the
paper (effective rank, dead-unit fraction). `compute_indicators` measures them all at a task start.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .eigen import full_top_eigenvalue
from .measure import buffers_kept


def hessian_rank(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mass: float = 0.99) -> float:
    """Empirical-Fisher rank proxy (paper Fig. 1a): per-example gradients G (n x P) of n fixed examples; the
    smallest j whose leading eigenvalues of G G^T reach `mass` of their sum, reported as j / n [code].
    Per-example gradients via torch.func (vmap of grad); the model runs in eval mode (BatchNorm on one
    example needs running statistics)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    was_training = model.training
    model.eval()

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))
    try:
        per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    finally:
        model.train(was_training)
    G = torch.cat([g.reshape(len(x), -1) for g in per_ex.values()], dim=1).double()
    s = torch.linalg.eigvalsh(G @ G.t()).flip(0).clamp_min(0)   # = singular values of the PSD G G^T
    if not torch.isfinite(s).all():
        return math.nan
    if s.sum() <= 0:
        return 0.0
    cum = torch.cumsum(s, 0) / s.sum()
    j = min(int((cum < mass).sum().item()) + 1, len(x))
    return j / len(x)


def unit_sign_entropy(pre: torch.Tensor) -> float:
    """Mean over units of the binary entropy (nats) of p_j = fraction of examples with h_j > 0 (paper Fig. 1b);
    `pre` = layer-1 pre-activations [B, units]."""
    p = (pre > 0).double().mean(0)
    h = -(p * torch.log(p.clamp_min(1e-300)) + (1 - p) * torch.log((1 - p).clamp_min(1e-300)))
    return h.mean().item()


def effective_rank(features: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of `features`
    [B, units] (beyond the paper; the last hidden layer's features)."""
    s = torch.linalg.svdvals(features.double())
    if not torch.isfinite(s).all():
        return math.nan
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def dead_fraction(post: torch.Tensor) -> float:
    """Fraction of units whose activation is zero for every example of the batch (beyond the paper)."""
    return (post == 0).all(0).double().mean().item()


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, regularizer=None,
              weight_decay: float = 0.0) -> torch.Tensor:
    """Minibatch training objective: CE + regulariser + Adam's coupled L2 as (wd / 2) ||theta||^2."""
    loss = F.cross_entropy(model(x), y)
    if regularizer is not None:
        loss = loss + regularizer(model)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in model.parameters())
    return loss


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, regularizer=None,
              weight_decay: float = 0.0, tol: float = 1e-4, max_iter: int = 100, seed: int = 0) -> float:
    """Top eigenvalue of the minibatch objective's Hessian, regulariser included (paper Fig. 1c). BatchNorm
    running statistics are left as they were."""
    with buffers_kept(model):
        loss = objective(model, x, y, regularizer, weight_decay)
        e, _, _ = full_top_eigenvalue(loss, list(model.parameters()), tol=tol, max_iter=max_iter,
                                      generator=torch.Generator().manual_seed(seed))
    return e


def weight_norm(model: nn.Module) -> float:
    """Mean absolute parameter value (paper Fig. 1d)."""
    ps = list(model.parameters())
    return sum(p.detach().abs().sum().item() for p in ps) / sum(p.numel() for p in ps)


def grad_norm(model: nn.Module, grads: list | None = None) -> float:
    """Mean absolute gradient (paper Fig. 1e): of `grads` (aligned with model.parameters()) or else p.grad."""
    ps = list(model.parameters())
    grads = grads if grads is not None else [p.grad for p in ps]
    total = sum(g.detach().abs().sum().item() for g in grads if g is not None)
    return total / sum(p.numel() for p in ps)


def grad_param_ratio(model: nn.Module, grads: list | None = None) -> float:
    """Gradient norm / weight norm (paper Fig. 1f); inf for an all-zero model."""
    w = weight_norm(model)
    return grad_norm(model, grads) / w if w > 0 else math.inf


def task_start_indicators(cfg: dict, model: nn.Module, x: torch.Tensor, y: torch.Tensor, regularizer,
                          weight_decay: float) -> dict[str, float]:
    """compute_indicators as a run measures them at each task start (both engines): on the task's first
    batch_size images, the Hessian rank on its first indicators.n_fixed, the measurement's eigen-solver
    settings."""
    B, nf, m = cfg["batch_size"], cfg["indicators"]["n_fixed"], cfg["measure"]
    return compute_indicators(model, x[:B], y[:B], x[:nf], y[:nf], regularizer, weight_decay,
                              eig_tol=m["eig_tol"], eig_max_iter=m["eig_max_iter"])


def compute_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_fixed: torch.Tensor,
                       y_fixed: torch.Tensor, regularizer=None, weight_decay: float = 0.0,
                       eig_tol: float = 1e-4, eig_max_iter: int = 100) -> dict[str, float]:
    """All indicators of the paper's Sec. 3 / Fig. 1 (and two beyond it) at the current parameters, on a
    batch (x, y) and the n fixed examples (x_fixed, y_fixed) of the Hessian rank. Leaves the model's .grad and BatchNorm
    statistics untouched (gradients via autograd.grad)."""
    params = list(model.parameters())
    with buffers_kept(model):
        logits, pre, post = model.forward_with_hidden(x)
        loss = F.cross_entropy(logits, y) + (regularizer(model) if regularizer is not None else 0.0)
        grads = torch.autograd.grad(loss, params)
    if weight_decay:
        grads = [g + weight_decay * p.detach() for g, p in zip(grads, params)]
    return {
        "hessian_rank": hessian_rank(model, x_fixed, y_fixed),
        "unit_sign_entropy": unit_sign_entropy(pre[0].detach()),
        "sharpness": sharpness(model, x, y, regularizer, weight_decay, eig_tol, eig_max_iter),
        "weight_norm": weight_norm(model),
        "grad_norm": grad_norm(model, grads),
        "grad_param_ratio": grad_param_ratio(model, grads),
        "effective_rank": effective_rank(post[-1].detach()),
        "dead_fraction": dead_fraction(post[-1].detach()),
        "loss": loss.item(),
    }
