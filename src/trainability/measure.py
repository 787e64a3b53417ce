"""Measurements: the per-layer quantities of a decision step (SPEC 5) and the indicators (SPEC 4).

Usable in any training loop:

    probe = DecisionProbe(model, optimizer, batch_size)
    with probe.capture():                 # around the forward AND backward of a training step
        loss = loss_fn(model(x), y) + reg
        loss.backward()
    m = probe.measure(lambda: loss_fn(model(x), y) + reg)   # before optimizer.step()
    # m[l] = {grad_sq, sigma2_ps, lam_max, alpha, alpha_agg, eig_iters}, l = 1..L, and m["global"]

Cost: the per-example gradient variance comes from the activations and output gradients already
computed by the step's own backward (no per-example backward passes); the layer-block top eigenvalue
comes from a power iteration warm-started at the previous decision's eigenvector.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


# ----------------------------------------------------------------------------- per-example variance
class LayerProbe:
    """Captures, for every nn.Linear of `model.linears`, its input a [B, d_in] and the gradient of the
    loss w.r.t. its output z [B, d_out] while `capture()` is active; hooks are removed afterwards."""

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

    def per_example_variance(self, B: int) -> dict[int, tuple[float, float]]:
        """{l: (sigma2_ps, ||gbar||^2)} for the CE loss (a batch mean), weights and bias together.

        Example i's gradient is g_i = B delta_i a_i^T (and B delta_i for the bias), delta = the captured
        gradient of the mean loss. Since ||delta_i a_i^T||^2 = ||delta_i||^2 ||a_i||^2,
        sigma2_ps = (1/B) sum_i ||g_i - gbar||^2 = B sum_i ||delta_i||^2 (||a_i||^2 + 1) - ||gbar||^2.
        The regulariser does not pass through z, so it is excluded, as SPEC 5 asks. float64 against
        cancellation.
        """
        out = {}
        for i, (a, d) in enumerate(zip(self.inputs, self.out_grads)):
            if a is None or d is None:
                raise RuntimeError("LayerProbe: run the forward and backward inside probe.capture()")
            a, d = a.double(), d.double()
            sum_sq = (d.pow(2).sum(1) * (a.pow(2).sum(1) + 1.0)).sum() * B
            gbar_sq = (d.t() @ a).pow(2).sum() + d.sum(0).pow(2).sum()
            out[i + 1] = ((sum_sq - gbar_sq).clamp_min(0.0).item(), gbar_sq.item())
        return out


# ----------------------------------------------------------------------------- top eigenvalues
def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _power(hvp, v, tol, max_iter):
    rq_prev, rq, it = None, float("nan"), 0
    for it in range(1, max_iter + 1):
        hv = hvp(v)
        rq = torch.dot(v, hv).item()
        v = hv / (hv.norm() + 1e-30)
        if tol > 0 and rq_prev is not None and abs(rq - rq_prev) <= tol * abs(rq):
            break
        rq_prev = rq
    return rq, v, it


def _lanczos(hvp, v, tol, max_iter):
    """Lanczos with full reorthogonalisation; the largest-magnitude Ritz value and its Ritz vector.
    Converges far faster than power iteration when the top eigenvalues are close (small spectral gap)."""
    Q = [v]
    alphas, betas = [], []
    theta_prev, theta, y = None, float("nan"), None
    it = 0
    for it in range(1, max_iter + 1):
        w = hvp(Q[-1])
        a = torch.dot(w, Q[-1])
        if not torch.isfinite(a):  # a diverged run: report NaN, let the engine record the divergence
            return float("nan"), v, it
        alphas.append(a)
        w = w - a * Q[-1] - (betas[-1] * Q[-2] if betas else 0.0)
        Qm = torch.stack(Q)
        w = w - Qm.t() @ (Qm @ w)  # full reorthogonalisation: a few vectors only, cheap
        b = w.norm()
        T = torch.diag(torch.stack(alphas).double())
        if betas:
            off = torch.stack(betas).double()
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        k = int(evals.abs().argmax())
        theta, y = evals[k].item(), evecs[:, k]
        if tol > 0 and theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta):
            break
        if b.item() <= 1e-12 * max(1.0, abs(theta)) or it == v.numel():
            break
        theta_prev = theta
        betas.append(b)
        Q.append(w / b)
    ritz = (torch.stack(Q[:len(y)]).t() @ y.to(Q[0].dtype))
    return theta, ritz / (ritz.norm() + 1e-30), it


def block_top_eigenvalues(grads: list[list[torch.Tensor]], params: list[list[torch.Tensor]],
                          v0: list | None = None, tol: float = 1e-3, max_iter: int = 100,
                          generator: torch.Generator | None = None, method: str = "lanczos"):
    """Top (largest-magnitude) eigenvalue of each diagonal Hessian block H_bb (block b = params[b],
    grads[b] its gradient computed with create_graph=True). Returns (eigenvalues, eigenvectors,
    Hessian-vector products used) per block.

    Starts from v0[b] (warm start: the previous decision's eigenvector) when given, else a seeded
    Gaussian vector; stops when the estimate changes by less than `tol` (relative) or after `max_iter`
    products. method="power" with tol=0 and max_iter=100 is the authors' cold estimate [code];
    method="lanczos" (default) [choice] reaches the same value in a few products.
    """
    solve = {"lanczos": _lanczos, "power": _power}[method]
    eigs, vecs, iters = [], [], []
    for b, (g, p) in enumerate(zip(grads, params)):
        if v0 is not None and v0[b] is not None:
            v = v0[b].to(p[0].dtype)
        else:
            v = torch.randn(sum(q.numel() for q in p), generator=generator, dtype=p[0].dtype).to(p[0].device)
        v = v / (v.norm() + 1e-30)

        def hvp(vec, g=g, p=p):
            hv = torch.autograd.grad(g, p, grad_outputs=_unflat(vec, p), retain_graph=True)
            return _flat([h.detach() for h in hv])
        e, vec, it = solve(hvp, v, tol, max_iter)
        eigs.append(e)
        vecs.append(vec.detach())
        iters.append(it)
    return eigs, vecs, iters


def top_eigenvalue(loss_closure, params: list[torch.Tensor], v0=None, tol: float = 1e-3,
                   max_iter: int = 100, generator=None, method: str = "lanczos"):
    """Top eigenvalue of the full Hessian of loss_closure() w.r.t. params (sharpness)."""
    loss = loss_closure()
    g = torch.autograd.grad(loss, params, create_graph=True)
    e, v, it = block_top_eigenvalues([list(g)], [params], None if v0 is None else [v0], tol, max_iter,
                                     generator, method)
    return e[0], v[0], it[0]


# ----------------------------------------------------------------------------- Adam effective step
def _weights_v_hat(optimizer: torch.optim.Optimizer, group: dict):
    """(sum of bias-corrected second moments over the group's weight tensors, element count, step k)."""
    beta2 = group["betas"][1]
    total, count, k = 0.0, 0, 0
    for p in group["params"]:
        if p.dim() < 2 or p not in optimizer.state or "exp_avg_sq" not in optimizer.state[p]:
            continue
        st = optimizer.state[p]
        k = int(st["step"])
        total += (st["exp_avg_sq"].double().sum() / (1 - beta2 ** k)).item()
        count += p.numel()
    return total, count, k


def adam_effective_step(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """alpha = eta_l / ((1 - beta1^k) (sqrt(mean v_hat) + eps)) over the layer's weights (biases skipped),
    v_hat bias-corrected, k = Adam's step count (SPEC 5, paper App. C.1). NaN before the first step."""
    total, count, k = _weights_v_hat(optimizer, group)
    if count == 0 or k == 0:
        return math.nan
    return group["lr"] / ((1 - group["betas"][0] ** k) * (math.sqrt(total / count) + group["eps"]))


def adam_alpha_agg(optimizer: torch.optim.Optimizer, group: dict, code_form: bool = False) -> float:
    """alpha_agg = eta / (RMS(sqrt(v_hat)) + eps): per layer [choice]; code_form: global RMS over every
    group's weights and the first group's LR for every layer [code quirk]."""
    groups = optimizer.param_groups if code_form else [group]
    stats = [_weights_v_hat(optimizer, g) for g in groups]
    total, count = sum(s[0] for s in stats), sum(s[1] for s in stats)
    if count == 0 or max(s[2] for s in stats) == 0:
        return math.nan
    lr = optimizer.param_groups[0]["lr"] if code_form else group["lr"]
    return lr / (math.sqrt(total / count) + group["eps"])


def _global_effective_step(optimizer) -> tuple[float, float]:
    stats = [_weights_v_hat(optimizer, g) for g in optimizer.param_groups]
    total, count, k = sum(s[0] for s in stats), sum(s[1] for s in stats), max(s[2] for s in stats)
    g0 = optimizer.param_groups[0]
    if count == 0 or k == 0:
        return math.nan, math.nan
    agg = g0["lr"] / (math.sqrt(total / count) + g0["eps"])
    return agg / (1 - g0["betas"][0] ** k), agg


# ----------------------------------------------------------------------------- the decision probe
class DecisionProbe:
    """Everything the scheduler needs at a decision step, per layer and for the whole network."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                 eig_tol: float = 1e-3, eig_max_iter: int = 100, global_too: bool = False,
                 code_alpha_agg: bool = False, seed: int = 0):
        self.model, self.optimizer, self.B = model, optimizer, batch_size
        self.eig_tol, self.eig_max_iter, self.global_too = eig_tol, eig_max_iter, global_too
        self.code_alpha_agg = code_alpha_agg
        self.layer_probe = LayerProbe(model)
        self.generator = torch.Generator().manual_seed(seed)
        self.vecs: list | None = None         # warm starts, one per layer
        self.global_vec: list | None = None

    def capture(self):
        return self.layer_probe.capture()

    def _layer_grad_sq(self, group: dict) -> float:
        """||g_l||^2 of the training objective: p.grad (CE + explicit regulariser) plus Adam's coupled
        L2 term weight_decay * theta, which is part of the objective's gradient too."""
        wd = group.get("weight_decay", 0.0)
        total = 0.0
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad + wd * p.detach() if wd else p.grad
            total += g.double().pow(2).sum().item()
        return total

    def measure(self, loss_closure) -> dict:
        groups = self.optimizer.param_groups
        var = self.layer_probe.per_example_variance(self.B)
        out = {}
        for g in groups:
            l = g["layer"]
            out[l] = {"grad_sq": self._layer_grad_sq(g), "sigma2_ps": var[l][0],
                      "alpha": adam_effective_step(self.optimizer, g),
                      "alpha_agg": adam_alpha_agg(self.optimizer, g, self.code_alpha_agg)}
        params = [list(g["params"]) for g in groups]
        loss = loss_closure()
        flat = [p for ps in params for p in ps]
        gr = torch.autograd.grad(loss, flat, create_graph=True)
        grads, i = [], 0
        for ps in params:
            grads.append(list(gr[i:i + len(ps)]))
            i += len(ps)
        eigs, self.vecs, iters = block_top_eigenvalues(grads, params, self.vecs, self.eig_tol,
                                                       self.eig_max_iter, self.generator)
        for g, e, it in zip(groups, eigs, iters):
            out[g["layer"]].update(lam_max=e, eig_iters=it)
        alpha, agg = _global_effective_step(self.optimizer)
        glob = {"grad_sq": sum(out[g["layer"]]["grad_sq"] for g in groups),
                "sigma2_ps": sum(out[g["layer"]]["sigma2_ps"] for g in groups),
                "alpha": alpha, "alpha_agg": agg, "lam_max": math.nan, "eig_iters": 0}
        if self.global_too:
            e, v, it = block_top_eigenvalues([list(gr)], [flat], None if self.global_vec is None
                                             else [self.global_vec], self.eig_tol, self.eig_max_iter,
                                             self.generator)
            self.global_vec = v[0]
            glob.update(lam_max=e[0], eig_iters=it[0])
        out["global"] = glob
        return out

    def state_dict(self) -> dict:
        return {"vecs": self.vecs, "global_vec": self.global_vec, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.vecs, self.global_vec = state["vecs"], state["global_vec"]
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- indicators (SPEC 4)
def hessian_rank(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mass: float = 0.99) -> float:
    """Empirical-Fisher rank proxy: per-example gradients G (n x P) of n fixed examples; the smallest j
    whose leading singular values of G G^T reach `mass` of their sum, reported as j / n [code]."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    was_training = model.training
    model.eval()  # BatchNorm on one example needs running statistics

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))
    try:
        per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    finally:
        model.train(was_training)
    G = torch.cat([g.reshape(len(x), -1) for g in per_ex.values()], dim=1).double()
    s = torch.linalg.eigvalsh(G @ G.t()).flip(0).clamp_min(0)
    if s.sum() <= 0:
        return 0.0
    cum = torch.cumsum(s, 0) / s.sum()
    j = int((cum < mass).sum().item()) + 1
    return j / len(x)


def unit_sign_entropy(pre: torch.Tensor) -> float:
    """Mean over units of the binary entropy (nats) of the fraction of examples with z_j > 0."""
    p = (pre > 0).double().mean(0)
    h = -(p * torch.log(p.clamp_min(1e-300)) + (1 - p) * torch.log((1 - p).clamp_min(1e-300)))
    return h.mean().item()


def effective_rank(features: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of the features."""
    s = torch.linalg.svdvals(features.double())
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def dead_fraction(post: torch.Tensor) -> float:
    """Fraction of hidden units whose activation is zero for every example of the batch."""
    return (post == 0).all(0).double().mean().item()


def compute_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_fixed: torch.Tensor,
                       y_fixed: torch.Tensor, regularizer=None, weight_decay: float = 0.0,
                       eig_tol: float = 1e-3, eig_max_iter: int = 100) -> dict[str, float]:
    """All indicators of SPEC 4 (and two beyond it) at the current parameters, on a batch (x, y) and the
    n fixed examples (x_fixed, y_fixed). Leaves the model's .grad and BatchNorm statistics untouched."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = [p for p in model.parameters()]

    def loss_fn():
        out = model(x)
        loss = F.cross_entropy(out, y)
        return loss + regularizer(model) if regularizer is not None else loss
    try:
        logits, pre, post = model.forward_with_hidden(x)
        loss = F.cross_entropy(logits, y) + (regularizer(model) if regularizer is not None else 0.0)
        grads = torch.autograd.grad(loss, params)
        if weight_decay:
            grads = [g + weight_decay * p.detach() for g, p in zip(grads, params)]
        sharp, _, _ = top_eigenvalue(loss_fn, params, tol=eig_tol, max_iter=eig_max_iter,
                                     generator=torch.Generator().manual_seed(0))
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    n_params = sum(p.numel() for p in params)
    w_norm = sum(p.detach().abs().sum().item() for p in params) / n_params
    g_norm = sum(g.abs().sum().item() for g in grads) / n_params
    return {
        "hessian_rank": hessian_rank(model, x_fixed, y_fixed),
        "unit_sign_entropy": unit_sign_entropy(pre[0].detach()),
        "sharpness": sharp,
        "weight_norm": w_norm,
        "grad_norm": g_norm,
        "grad_param_ratio": g_norm / w_norm if w_norm > 0 else math.inf,
        "effective_rank": effective_rank(post[-1].detach()),
        "dead_fraction": dead_fraction(post[-1].detach()),
        "loss": loss.item(),
    }
