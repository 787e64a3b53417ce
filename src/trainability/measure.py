"""The decision-step probe: every per-layer quantity the scheduler needs at a decision step (paper
Sec. 4 and App. C.1; docs/METHOD.md §5): ||g||^2, the per-example gradient variance sigma2_ps, the
layer-block top eigenvalue lambda_max (solved by trainability.eigen), Adam's effective step alpha and
the alpha_agg of the normalised sharpness.

Usable in any training loop:

    probe = DecisionProbe(model, optimizer, batch_size)
    with probe.capture():                 # around the forward AND backward of a training step
        loss = loss_fn(model(x), y) + reg
        loss.backward()
    m = probe.measure(lambda: loss_fn(model(x), y) + reg)   # before optimizer.step()
    # m[l] = {grad_sq, sigma2_ps, lam_max, alpha, alpha_agg, eig_iters}, l = 1..L, and m["global"]

Cost (docs/METHOD.md §8): the per-example gradient variance comes from the activations and output
gradients that the step's own backward already computes (no per-example backward passes); the
layer-block top eigenvalue comes from a few Lanczos steps warm-started at the previous decision's
eigenvector, all sharing one create_graph gradient. bench/bench_measure.py compares this with the
authors' measurement.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .eigen import block_top_eigenvalues


# ----------------------------------------------------------------------------- per-example variance
def linear_gradient_stats(a: torch.Tensor, d: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma2_ps, ||gbar||^2) of one Linear layer (weight and bias) from its input a [..., B, d_in] and
    the gradient d [..., B, d_out] of the mean loss w.r.t. its output, float64; leading dims (stacked
    models, trainability.batched) are kept. The derivation is in LayerProbe.per_example_stats."""
    a, d = a.double(), d.double()
    mean_sq = B * (d.pow(2).sum(-1) * (a.pow(2).sum(-1) + 1.0)).sum(-1)
    gbar_sq = (d.transpose(-2, -1) @ a).pow(2).sum((-2, -1)) + d.sum(-2).pow(2).sum(-1)
    return (mean_sq - gbar_sq).clamp_min(0.0), gbar_sq


class LayerProbe:
    """Captures, for every nn.Linear of `model.linears` (layer l = index + 1), its input a [B, d_in] and
    the gradient of the loss w.r.t. its output z [B, d_out], while `capture()` is active.

    Hooks exist only inside `capture()` (zero cost otherwise). The forward of the step must run inside
    it too: the output-gradient hook is attached to the output tensor during the forward.
    """

    def __init__(self, model: nn.Module):
        self.linears = list(model.linears)
        self.inputs: list = [None] * len(self.linears)
        self.out_grads: list = [None] * len(self.linears)

    @contextlib.contextmanager
    def capture(self):
        def fwd_hook(i):
            def hook(module, inp, out):
                self.inputs[i] = inp[0].detach()
                if out.requires_grad:
                    out.register_hook(lambda g: self.out_grads.__setitem__(i, g.detach()))
            return hook
        handles = [lin.register_forward_hook(fwd_hook(i)) for i, lin in enumerate(self.linears)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def per_example_stats(self, B: int) -> dict[int, tuple[float, float]]:
        """{l: (sigma2_ps, ||gbar||^2)} of the CE loss (a batch mean), weight and bias together (paper Sec. 4).

        delta = captured gradient of the *mean* loss, so example i's own gradient is B delta_i a_i^T
        (bias: B delta_i). With ||delta_i a_i^T||^2 = ||delta_i||^2 ||a_i||^2:
            (1/B) sum_i ||g_i||^2 = B sum_i ||delta_i||^2 (||a_i||^2 + 1),   gbar = delta^T a (bias: sum_i delta_i),
            sigma2_ps = (1/B) sum_i ||g_i - gbar||^2 = (1/B) sum_i ||g_i||^2 - ||gbar||^2.
        The regulariser does not pass through z, so it is excluded, as the authors' definition asks [code].
        float64: the last line subtracts two nearly equal numbers when the examples agree. Exact for losses that are a
        mean of per-example terms; with BatchNorm in training mode the examples are coupled, and this is
        example i's contribution to the batch gradient (Linear weight and bias only, BN's affine
        parameters are not included).
        """
        out = {}
        for i, (a, d) in enumerate(zip(self.inputs, self.out_grads)):
            if a is None or d is None:
                raise RuntimeError("LayerProbe: run the forward and backward inside probe.capture()")
            sigma2, gbar_sq = linear_gradient_stats(a, d, B)
            out[i + 1] = (sigma2.item(), gbar_sq.item())
        return out

    def per_example_variance(self, B: int) -> dict[int, float]:
        """{l: sigma2_ps}: see per_example_stats."""
        return {l: s for l, (s, _) in self.per_example_stats(B).items()}


# ----------------------------------------------------------------------------- Adam effective step
def _sqrt(x):
    return math.sqrt(x) if isinstance(x, float) else x.sqrt()


def effective_step(lr, beta1, k, v_hat_mean, eps):
    """alpha = eta / ((1 - beta1^k) (sqrt(mean v_hat) + eps)) (paper App. C.1), for floats (one model) or
    stacked tensors (trainability.batched); the operations in one order, so both engines agree bit for bit."""
    return lr / ((1 - beta1 ** k) * (_sqrt(v_hat_mean) + eps))


def rms_step(lr, v_mean, eps):
    """alpha_agg = eta / (sqrt(mean v) + eps) (paper Sec. 4), for floats or stacked tensors."""
    return lr / (_sqrt(v_mean) + eps)


def _weights_v_hat(optimizer: torch.optim.Optimizer, group: dict):
    """(sum of bias-corrected second moments over the group's weight tensors, element count, step k)."""
    beta2 = group["betas"][1]
    total, count, k = 0.0, 0, 0
    for p in group["params"]:
        st = optimizer.state.get(p, {})
        if p.dim() < 2 or "exp_avg_sq" not in st:   # biases (and BN's affine vectors) are skipped
            continue
        k = int(st["step"])
        total += (st["exp_avg_sq"].double().sum() / (1 - beta2 ** k)).item()
        count += p.numel()
    return total, count, k


def adam_effective_step(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """alpha = eta_l / ((1 - beta1^k) (sqrt(mean v_hat) + eps)) over the layer's weights (biases skipped),
    v_hat bias-corrected, k = Adam's step count (paper App. C.1). NaN before the first step."""
    total, count, k = _weights_v_hat(optimizer, group)
    if count == 0 or k == 0:
        return math.nan
    return effective_step(group["lr"], group["betas"][0], k, total / count, group["eps"])


def _rms_alpha_agg(optimizer: torch.optim.Optimizer, groups: list, lr: float, eps: float) -> float:
    """lr / (RMS over the groups' weight tensors of sqrt(v_hat) + eps); NaN before the first step."""
    stats = [_weights_v_hat(optimizer, g) for g in groups]
    total, count = sum(s[0] for s in stats), sum(s[1] for s in stats)
    if count == 0 or max(s[2] for s in stats) == 0:
        return math.nan
    return rms_step(lr, total / count, eps)


def adam_alpha_agg(optimizer: torch.optim.Optimizer, group: dict, code_form: bool = False) -> float:
    """alpha_agg = eta / (RMS(sqrt(v_hat)) + eps) (paper Sec. 4): the layer's LR and the RMS over its weights,
    v_hat bias-corrected [choice]. code_form is the authors' normalised sharpness [code]: Adam's raw
    second moment v (no bias correction) over every parameter of the network, biases included, and the
    first group's LR for every layer. NaN before the first step."""
    if not code_form:
        return _rms_alpha_agg(optimizer, [group], group["lr"], group["eps"])
    total, count, stepped = 0.0, 0, False
    for g in optimizer.param_groups:
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" in st:
                total += st["exp_avg_sq"].double().sum().item()
                count += p.numel()
                stepped = stepped or int(st["step"]) > 0
    if not stepped:
        return math.nan
    return rms_step(optimizer.param_groups[0]["lr"], total / count, group["eps"])


def _global_effective_step(optimizer) -> tuple[float, float]:
    """(alpha, alpha_agg) of the whole network (global variant of Algorithm 1): RMS over every weight tensor
    (v_hat bias-corrected), the first group's LR."""
    g0 = optimizer.param_groups[0]
    agg = _rms_alpha_agg(optimizer, optimizer.param_groups, g0["lr"], g0["eps"])
    k = max(_weights_v_hat(optimizer, g)[2] for g in optimizer.param_groups)
    if k == 0:
        return math.nan, math.nan
    return agg / (1 - g0["betas"][0] ** k), agg


# ----------------------------------------------------------------------------- the decision probe
@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """Restores the model's buffers (BatchNorm running statistics) on exit, so a measurement's extra
    forward passes leave no trace. Exit only after the last backward through those passes: BatchNorm's
    graph holds the buffers, and an in-place restore before would invalidate it."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class DecisionProbe:
    """Everything the scheduler needs at a decision step (paper Sec. 4, Algorithm 1), per layer and for the network.

    Call `capture()` around the step's forward+backward, then `measure(closure)` BEFORE optimizer.step(),
    so every quantity refers to the parameters the gradient was taken at. Keeps the eigenvectors for
    the next decision's warm start; state_dict/load_state_dict make a resume exact.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                 eig_tol: float = 1e-4, eig_max_iter: int = 100, global_too: bool = False,
                 code_alpha_agg: bool = False, seed: int = 0, method: str = "lanczos"):
        self.model, self.optimizer, self.B = model, optimizer, batch_size
        self.eig_tol, self.eig_max_iter, self.global_too = eig_tol, eig_max_iter, global_too
        self.code_alpha_agg, self.method = code_alpha_agg, method
        self.layer_probe = LayerProbe(model)
        # the start vectors' noise, drawn on the model's device (the same draws as before on the CPU)
        self.generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
        self.vecs: dict | None = None          # warm starts {layer: eigenvector}
        self.global_vec: torch.Tensor | None = None

    def capture(self):
        return self.layer_probe.capture()

    @staticmethod
    def _layer_grad_sq(group: dict) -> float:
        """||g_l||^2 of the training objective: p.grad (CE + explicit regulariser) plus Adam's coupled
        L2 term weight_decay * theta, which is part of the objective's gradient too."""
        wd = group.get("weight_decay", 0.0)
        total = 0.0
        for p in group["params"]:
            if p.grad is not None:
                g = p.grad + wd * p.detach() if wd else p.grad
                total += g.double().pow(2).sum().item()
        return total

    def measure(self, loss_closure) -> dict:
        """{l: {grad_sq, sigma2_ps, lam_max, alpha, alpha_agg, eig_iters, batch_size}, ..., "global": {...}}.

        lam_max is the top eigenvalue of the Hessian block of the training objective (closure plus Adam's
        coupled L2, [choice]: the same objective as grad_sq). "global" sums grad_sq and sigma2_ps over
        layers (the variance of a concatenation is the sum of the blocks' variances); its lam_max is the
        full Hessian's when global_too, else NaN.
        """
        groups = self.optimizer.param_groups
        b = self.layer_probe.inputs[0].shape[0]   # this minibatch's size: B, or an epoch's partial last one
        var = self.layer_probe.per_example_variance(b)
        out = {}
        for g in groups:
            out[g["layer"]] = {"grad_sq": self._layer_grad_sq(g), "sigma2_ps": var[g["layer"]],
                               "alpha": adam_effective_step(self.optimizer, g),
                               "alpha_agg": adam_alpha_agg(self.optimizer, g, self.code_alpha_agg),
                               "batch_size": b}
        alpha, agg = _global_effective_step(self.optimizer)
        out["global"] = {"grad_sq": sum(out[g["layer"]]["grad_sq"] for g in groups),
                         "sigma2_ps": sum(out[g["layer"]]["sigma2_ps"] for g in groups),
                         "alpha": alpha, "alpha_agg": agg, "lam_max": math.nan, "eig_iters": 0,
                         "batch_size": b}
        self._eigenvalues(loss_closure, out)
        return out

    def _eigenvalues(self, loss_closure, out: dict) -> None:
        """lam_max and eig_iters into `out`: every layer block (and the full Hessian if global_too) from
        one create_graph gradient, each warm-started at its previous eigenvector."""
        groups = self.optimizer.param_groups
        params = {g["layer"]: list(g["params"]) for g in groups}
        wd = {g["layer"]: g.get("weight_decay", 0.0) for g in groups}
        flat = [p for ps in params.values() for p in ps]
        with buffers_kept(self.model):   # BN statistics: a decision step updates them once, like any step
            gr = torch.autograd.grad(loss_closure(), flat, create_graph=True)
            it = iter(gr)
            grads = {l: [next(it) for _ in ps] for l, ps in params.items()}
            eigs, self.vecs, iters = block_top_eigenvalues(grads, params, self.vecs, self.eig_tol,
                                                           self.eig_max_iter, 2, self.generator, self.method, wd)
            if self.global_too:
                e, v, n = block_top_eigenvalues({0: list(gr)}, {0: flat}, {0: self.global_vec}, self.eig_tol,
                                                self.eig_max_iter, 2, self.generator, self.method,
                                                wd[groups[0]["layer"]])
                self.global_vec = v[0]
                out["global"].update(lam_max=e[0], eig_iters=n[0])
        for l in params:
            out[l].update(lam_max=eigs[l], eig_iters=iters[l])

    def state_dict(self) -> dict:
        return {"vecs": self.vecs, "global_vec": self.global_vec, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        vecs = state["vecs"]
        if isinstance(vecs, list):   # checkpoints written before vecs became {layer: vector}
            vecs = {g["layer"]: v for g, v in zip(self.optimizer.param_groups, vecs)}
        self.vecs, self.global_vec = vecs, state["global_vec"]
        self.generator.set_state(state["generator"].cpu())   # map_location may have moved it to the GPU
