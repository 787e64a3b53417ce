"""Measurements: the per-layer quantities of a decision step (SPEC 5) and the indicators (SPEC 4).

Usable in any training loop:

    probe = DecisionProbe(model, optimizer, batch_size)
    with probe.capture():                 # around the forward AND backward of a training step
        loss = loss_fn(model(x), y) + reg
        loss.backward()
    m = probe.measure(lambda: loss_fn(model(x), y) + reg)   # before optimizer.step()
    # m[l] = {grad_sq, sigma2_ps, lam_max, alpha, alpha_agg, eig_iters}, l = 1..L, and m["global"]

Cost (SPEC 8): the per-example gradient variance comes from the activations and output gradients that
the step's own backward already computes (no per-example backward passes); the layer-block top
eigenvalue comes from a few Lanczos steps warm-started at the previous decision's eigenvector, all
sharing one create_graph gradient. bench/bench_measure.py compares this with the authors' measurement.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


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
        """{l: (sigma2_ps, ||gbar||^2)} of the CE loss (a batch mean), weight and bias together (SPEC 5).

        delta = captured gradient of the *mean* loss, so example i's own gradient is B delta_i a_i^T
        (bias: B delta_i). With ||delta_i a_i^T||^2 = ||delta_i||^2 ||a_i||^2:
            (1/B) sum_i ||g_i||^2 = B sum_i ||delta_i||^2 (||a_i||^2 + 1),   gbar = delta^T a (bias: sum_i delta_i),
            sigma2_ps = (1/B) sum_i ||g_i - gbar||^2 = (1/B) sum_i ||g_i||^2 - ||gbar||^2.
        The regulariser does not pass through z, so it is excluded, as SPEC 5 asks. float64: the last
        line subtracts two nearly equal numbers when the examples agree. Exact for losses that are a
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


# ----------------------------------------------------------------------------- top eigenvalues
def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, like) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _hvp_fn(grads, params, shift: float = 0.0):
    """v -> (H + shift I) v for the block of `params`, H the Hessian whose gradient `grads` was taken
    with create_graph=True. Autograd only walks the graph back to `params`, so the output layer's block
    is much cheaper than the input layer's. `shift` adds a coupled L2 term (Adam's weight_decay)."""
    def hvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(grads, params, grad_outputs=_unflat(v, params), retain_graph=True)
        hv = _flat([h.detach() for h in hv])
        return hv + shift * v if shift else hv
    return hvp


def _power(hvp, v, tol: float, max_iter: int, min_iter: int = 2):
    """Power iteration: (Rayleigh quotient, vector, products). tol=0 runs exactly max_iter products (the
    authors' cold estimate [code]); else stops once the quotient changes by <= tol (relative)."""
    rq_prev, rq, it = None, math.nan, 0
    for it in range(1, max_iter + 1):
        hv = hvp(v)
        rq = torch.dot(v, hv).item()
        n = hv.norm()
        if not math.isfinite(rq) or n == 0:   # diverged run (NaN) or a zero block: nothing to iterate
            break
        v = hv / n
        if tol > 0 and it >= min_iter and rq_prev is not None and abs(rq - rq_prev) <= tol * abs(rq):
            break
        rq_prev = rq
    return rq, v, it


def _lanczos(hvp, v, tol: float, max_iter: int, min_iter: int = 2):
    """Lanczos with full reorthogonalisation: (largest-magnitude Ritz value, its Ritz vector, products).

    Far fewer products than power iteration when the top eigenvalues are close (small spectral gap);
    stops once the Ritz value changes by <= tol and its residual is <= sqrt(tol) (both relative), or the
    Krylov space is invariant."""
    Q, alphas, betas = [v], [], []
    theta_prev, theta, y, it = None, math.nan, None, 0
    for it in range(1, max_iter + 1):
        w = hvp(Q[-1])
        a = torch.dot(w, Q[-1])
        if not torch.isfinite(a):  # a diverged run: report NaN, let the engine record the divergence
            return math.nan, v, it
        alphas.append(a)
        w = w - a * Q[-1] - (betas[-1] * Q[-2] if betas else 0.0)
        Qm = torch.stack(Q)
        w = w - Qm.t() @ (Qm @ w)  # full reorthogonalisation: only a few vectors, cheap
        b = w.norm()
        T = torch.diag(torch.stack(alphas).double())
        if betas:
            off = torch.stack(betas).double()
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        k = int(evals.abs().argmax())
        theta, y = evals[k].item(), evecs[:, k]
        # Stop on a small Ritz residual ||H u - theta u|| = b |y_last| (relative), not on a small change
        # of theta alone: theta can plateau near a lower eigenvalue for a few steps before jumping.
        residual = b.item() * abs(y[-1].item())
        if tol > 0 and it >= min_iter and theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta) \
                and residual <= math.sqrt(tol) * abs(theta):
            break
        if b.item() <= 1e-12 * max(1.0, abs(theta)) or it == v.numel():
            break
        theta_prev = theta
        betas.append(b)
        Q.append(w / b)
    ritz = torch.stack(Q[:len(y)]).t() @ y.to(Q[0].dtype)
    return theta, ritz / (ritz.norm() + 1e-30), it


SOLVERS = {"lanczos": _lanczos, "power": _power}


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm(dim=-1, keepdim=True) + 1e-30)


def mixed_start(noise: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Unit start vector(s) along the last dim: the Gaussian `noise` (cold start), plus the previous
    eigenvector when given (warm start). The random part is kept: a start equal to a stale eigenvector
    can sit near a lower eigenvalue long enough for the tolerance test to stop there; mixed with noise,
    the Krylov space holds every direction and Lanczos finds the top of the spectrum in a few products."""
    r = _unit(noise)
    return _unit(r if previous is None else _unit(previous) + 0.5 * r)


def _start(n: int, like: torch.Tensor, v0, generator) -> torch.Tensor:
    """mixed_start with a seeded Gaussian of length n (the generator lives on the CPU)."""
    r = torch.randn(n, generator=generator, dtype=like.dtype).to(like.device)
    return mixed_start(r, None if v0 is None else v0.to(device=like.device, dtype=like.dtype))


def _top_eigs(grads: dict, params: dict, v0: dict | None, tol: float, max_iter: int, min_iter: int,
              generator, method: str, shift: dict | float = 0.0):
    """Top eigenvalue of each block b: (H_bb + shift_b I) with grads[b] = dloss/dparams[b] (create_graph)."""
    solve = SOLVERS[method]
    eigs, vecs, iters = {}, {}, {}
    for b, ps in params.items():
        n = sum(p.numel() for p in ps)
        v = _start(n, ps[0], (v0 or {}).get(b), generator)
        s = shift.get(b, 0.0) if isinstance(shift, dict) else shift
        eigs[b], vec, iters[b] = solve(_hvp_fn(grads[b], ps, s), v, tol, max_iter, min_iter)
        vecs[b] = vec.detach()
    return eigs, vecs, iters


def layer_top_eigenvalues(loss: torch.Tensor, params_by_layer: dict[int, list[torch.Tensor]],
                          v0: dict | None = None, tol: float = 1e-3, max_iter: int = 100,
                          min_iter: int = 2, generator: torch.Generator | None = None,
                          method: str = "lanczos", weight_decay: float = 0.0):
    """Top (largest-magnitude, signed) eigenvalue lambda_max of each diagonal Hessian block H_ll of
    `loss` (SPEC 5): returns (eig {l: float}, vecs {l: Tensor}, iters {l: Hessian-vector products}).

    One create_graph gradient serves every block and every iteration. Starts from v0[l] (warm start:
    the previous decision's eigenvector) when given, else a Gaussian from `generator`; stops when the
    estimate changes by <= tol (relative) after >= min_iter products, or at max_iter.
    method="power", tol=0, max_iter=100 is the authors' cold estimate [code]; "lanczos" [choice] gets
    the same value in a few products. weight_decay adds Adam's coupled L2 Hessian (wd I) to each block.
    """
    flat = [p for ps in params_by_layer.values() for p in ps]
    g = iter(torch.autograd.grad(loss, flat, create_graph=True))
    grads = {l: [next(g) for _ in ps] for l, ps in params_by_layer.items()}
    return _top_eigs(grads, params_by_layer, v0, tol, max_iter, min_iter, generator, method, weight_decay)


def full_top_eigenvalue(loss: torch.Tensor, params: list[torch.Tensor], v0: torch.Tensor | None = None,
                        tol: float = 1e-3, max_iter: int = 100, min_iter: int = 2,
                        generator: torch.Generator | None = None, method: str = "lanczos",
                        weight_decay: float = 0.0):
    """Top eigenvalue of the whole Hessian of `loss` w.r.t. `params` (sharpness, SPEC 4; the global
    scheduler variant, SPEC 6): (eig, vec, iters)."""
    e, v, it = layer_top_eigenvalues(loss, {0: list(params)}, None if v0 is None else {0: v0}, tol,
                                     max_iter, min_iter, generator, method, weight_decay)
    return e[0], v[0], it[0]


# ----------------------------------------------------------------------------- Adam effective step
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
    v_hat bias-corrected, k = Adam's step count (SPEC 5, paper App. C.1). NaN before the first step."""
    total, count, k = _weights_v_hat(optimizer, group)
    if count == 0 or k == 0:
        return math.nan
    return group["lr"] / ((1 - group["betas"][0] ** k) * (math.sqrt(total / count) + group["eps"]))


def _rms_alpha_agg(optimizer: torch.optim.Optimizer, groups: list, lr: float, eps: float) -> float:
    """lr / (RMS over the groups' weight tensors of sqrt(v_hat) + eps); NaN before the first step."""
    stats = [_weights_v_hat(optimizer, g) for g in groups]
    total, count = sum(s[0] for s in stats), sum(s[1] for s in stats)
    if count == 0 or max(s[2] for s in stats) == 0:
        return math.nan
    return lr / (math.sqrt(total / count) + eps)


def adam_alpha_agg(optimizer: torch.optim.Optimizer, group: dict, code_form: bool = False) -> float:
    """alpha_agg = eta / (RMS(sqrt(v_hat)) + eps) (SPEC 5): the layer's LR and the RMS over its weights,
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
    return optimizer.param_groups[0]["lr"] / (math.sqrt(total / count) + group["eps"])


def _global_effective_step(optimizer) -> tuple[float, float]:
    """(alpha, alpha_agg) of the whole network (global variant, SPEC 6): RMS over every weight tensor
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
    """Everything the scheduler needs at a decision step (SPEC 5, 6), per layer and for the network.

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
        self.generator = torch.Generator().manual_seed(seed)
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
            eigs, self.vecs, iters = _top_eigs(grads, params, self.vecs, self.eig_tol, self.eig_max_iter, 2,
                                               self.generator, self.method, wd)
            if self.global_too:
                e, v, n = _top_eigs({0: list(gr)}, {0: flat}, {0: self.global_vec}, self.eig_tol,
                                    self.eig_max_iter, 2, self.generator, self.method, wd[groups[0]["layer"]])
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


# ----------------------------------------------------------------------------- indicators (SPEC 4)
def hessian_rank(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mass: float = 0.99) -> float:
    """Empirical-Fisher rank proxy (SPEC 4): per-example gradients G (n x P) of n fixed examples; the
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
    """Mean over units of the binary entropy (nats) of p_j = fraction of examples with h_j > 0 (SPEC 4);
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
    """Top eigenvalue of the minibatch objective's Hessian, regulariser included (SPEC 4). BatchNorm
    running statistics are left as they were."""
    with buffers_kept(model):
        loss = objective(model, x, y, regularizer, weight_decay)
        e, _, _ = full_top_eigenvalue(loss, list(model.parameters()), tol=tol, max_iter=max_iter,
                                      generator=torch.Generator().manual_seed(seed))
    return e


def weight_norm(model: nn.Module) -> float:
    """Mean absolute parameter value (SPEC 4)."""
    ps = list(model.parameters())
    return sum(p.detach().abs().sum().item() for p in ps) / sum(p.numel() for p in ps)


def grad_norm(model: nn.Module, grads: list | None = None) -> float:
    """Mean absolute gradient (SPEC 4): of `grads` (aligned with model.parameters()) or else p.grad."""
    ps = list(model.parameters())
    grads = grads if grads is not None else [p.grad for p in ps]
    total = sum(g.detach().abs().sum().item() for g in grads if g is not None)
    return total / sum(p.numel() for p in ps)


def grad_param_ratio(model: nn.Module, grads: list | None = None) -> float:
    """Gradient norm / weight norm (SPEC 4); inf for an all-zero model."""
    w = weight_norm(model)
    return grad_norm(model, grads) / w if w > 0 else math.inf


def compute_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_fixed: torch.Tensor,
                       y_fixed: torch.Tensor, regularizer=None, weight_decay: float = 0.0,
                       eig_tol: float = 1e-4, eig_max_iter: int = 100) -> dict[str, float]:
    """All indicators of SPEC 4 (and two beyond it) at the current parameters, on a batch (x, y) and the
    n fixed examples (x_fixed, y_fixed) of the Hessian rank. Leaves the model's .grad and BatchNorm
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
