"""Batched training: M runs of one model shape trained together as one stacked model.

The runs of a batch share the model shape (plain, CReLU or BatchNorm MLP), batch size, stream size and
number of tasks, the measurement cadence and the scheduler's rule constants. Each keeps its own task
length (epochs_factor: its own task clock, loop.train_stream; the stack sheds the runs of the shorter
lengths when they end, `BatchedRuns.keep`), seed (images, labels, shuffles, init), arm (vanilla / reset /
scheduled), activation among relu /
leaky_relu / identity (one LeakyReLU slope per model), learning rate, beta ramp on or off, regulariser
(none / coupled L2 / Wasserstein, own strength; the sort only for the Wasserstein models), measurement
on or off, scheduler variant (per-layer / global), bound (combined / noise / curvature), Eq. 2 statistic
and beta, alpha_agg form, Adam state, per-layer learning rates, volatility windows and eigenvector warm
starts (planning.PER_MODEL_KEYS). Weights are stacked along a leading model dimension and every layer is
one batched matmul, so M models take the kernel launches of one: on a GPU the paper's tiny MLP is
launch-bound, and batching is how it gets near the hardware's limits.

`BatchedRuns` follows the loop of the one-model engine (loop.train_stream) and each model the computation
of `train.run` (same draws from the same seeds, the same Adam arithmetic, the same decision-step
measurement and Algorithm 1), so each record equals the one-model-at-a-time record up to float rounding
(tests/test_batched.py). The step loop has no host synchronisation except, as in `train.run`, one
divergence check per epoch; a decision step runs the Lanczos of every layer block (and of the whole
network, for measure.global) in lockstep, and each round of products sends all their alphas and betas to
the host in one transfer, where the tiny tridiagonal problems are solved and each model's convergence is
decided (one sync per round). The measurement's sums follow in one transfer, and Algorithm 1 runs on
the host (StackedScheduler), as train.run's on floats; the new learning rates go back in one copy. On
CUDA, `cuda_graph` replays the plain steps from one captured graph (`CudaGraphStep`); on any device,
`fused_adam` compiles Adam's update.
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from . import bounds, config
from .data import load_mnist
from .eigen import mixed_start, ritz_step
from .indicators import task_start_indicators
from .measure import buffers_kept, effective_step, linear_gradient_stats, rms_step
from .models import activation_fn, build_model, crelu, negative_slope
from .loop import measures, steps_per_task, train_stream
from .record import (CHECKPOINT_NAME, RECORD_NAME, append_decision, end_task, finish_record, finished_record,
                     new_record)
from .regularizers import WassersteinPenalty, hessian_shift
from .scheduler import ROW_FIELDS, algorithm1_rule, layer_bounds
from .streams import epoch_order, input_dim, make_stream
from .optim import ramped_betas
from .planning import check_batchable, stack_phases
from .train import _sub_seed, _wandb_logger, pick_device, setup_device, task_online_acc
from .wandb_log import run_summary, task_metrics

BOUNDS = ("combined", "noise", "curvature")
# 2: BatchNorm buffers and the whole-network column (global_vecs); 3: the scheduler's windows oldest first;
# 4: loop.train_stream's layout; 5: a task clock per model. A checkpoint of another format is ignored
CHECKPOINT_FORMAT = 5
RULES = ("none", "cool", "warm")
NUM_FIELDS = tuple(f for f in ROW_FIELDS if f != "rule")


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(M,) -> (M, 1, ..., 1) broadcastable against a stacked tensor."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _leaky_per_model(z: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """F.leaky_relu with a negative slope per model: z (M, B, n), slope (M, 1, 1); slope 0 is relu's
    value and gradient, slope 1 the identity's. Written as z times a factor that carries no gradient:
    the same values and first derivatives as where(z > 0, z, z * slope), whose backward took two wheres,
    a product and a sum, and twice that in every Hessian-vector product (bench/decision_bytes.py)."""
    return z * torch.where(z > 0, 1.0, slope)


def _crelu_stacked(z: torch.Tensor) -> torch.Tensor:
    """models.crelu as relu(cat(z, -z)): the same values and first derivatives as cat(relu(z), relu(-z)),
    with one ReLU and its backward where that took two (and twice that in every Hessian-vector product:
    the CReLU jobs' decision graph body 2,762 -> 2,566 kernels, bench/decision_bytes.py)."""
    return F.relu(torch.cat((z, -z), dim=-1))


class StackedMLP:
    """The MLPs of models.MLP, stacked: W[l] (M, out, in), b[l] (M, out), l = 0..L-1, and with BatchNorm
    each hidden layer's gamma[l], beta[l] (M, out) and running statistics (per model, as nn.BatchNorm1d
    in training mode: batch statistics over the model's own minibatch)."""

    def __init__(self, models, device):
        kinds = {(m.activation, m.rho) for m in models}
        self.models = list(range(len(models)))   # the batch's models these rows are (a sub-stack: some)
        self.idx = None   # a sub-stack's: the same on the device
        self.slope = None
        if len(kinds) == 1:
            activation, rho = kinds.pop()
            self.act = activation_fn(activation, rho)
            if self.act is crelu:
                self.act = _crelu_stacked
            else:
                self.slope = negative_slope(activation, rho)   # a float: one for all
        else:   # relu / leaky_relu / identity mixed: each model's LeakyReLU slope (models.negative_slope)
            self.slope = torch.tensor([negative_slope(m.activation, m.rho) for m in models], device=device).view(-1, 1, 1)
            self.act = functools.partial(_leaky_per_model, slope=self.slope)
        L = models[0].n_layers

        def stack(get, grad=True):
            t = torch.stack([get(m).detach() for m in models]).to(device)
            return t.requires_grad_() if grad else t.clone()
        self.W = [stack(lambda m: m.linears[l].weight) for l in range(L)]
        self.b = [stack(lambda m: m.linears[l].bias) for l in range(L)]
        n_bn = len(models[0].bns)   # one per hidden layer, or none
        self.gamma = [stack(lambda m: m.bns[l].weight) for l in range(n_bn)]
        self.beta = [stack(lambda m: m.bns[l].bias) for l in range(n_bn)]
        self.running_mean = [stack(lambda m: m.bns[l].running_mean, False) for l in range(n_bn)]
        self.running_var = [stack(lambda m: m.bns[l].running_var, False) for l in range(n_bn)]
        if n_bn:
            self.bn_eps, self.bn_momentum = models[0].bns[0].eps, models[0].bns[0].momentum
        # params() order: models.MLP.layer_params, layer by layer (the Adam groups' order)
        self.param_layer = [l for l in range(L) for _ in self.layer_params(l)]
        self.weight_pos = [self.param_layer.index(l) for l in range(L)]   # W[l]'s place in params()

    @property
    def n_layers(self) -> int:
        return len(self.W)

    def layer_params(self, l: int) -> list[torch.Tensor]:
        """Layer l's tensors, an Adam group's (models.MLP.layer_params): W, b, and BatchNorm's gamma, beta."""
        bn = [self.gamma[l], self.beta[l]] if l < len(self.gamma) else []
        return [self.W[l], self.b[l]] + bn

    def params(self) -> list[torch.Tensor]:
        """W1, b1 (, gamma1, beta1), W2, ...: models.MLP.layer_params order, layer by layer."""
        return [p for l in range(self.n_layers) for p in self.layer_params(l)]

    def buffers(self) -> list[torch.Tensor]:
        return self.running_mean + self.running_var

    def rows(self, models: list[int], idx: torch.Tensor | None = None) -> "StackedMLP":
        """The sub-stack of those models (idx: the same list on the device, made beforehand where this runs
        inside a CUDA graph capture, which cannot copy from the host): their rows of every tensor as leaves
        of its own (differentiable copies, p[idx]), its own BatchNorm statistics. A Hessian-vector product on
        it costs its rows only, where one on the whole stack costs every model's (StackedProbe's problems)."""
        if idx is None:
            idx = torch.tensor(models, dtype=torch.long, device=self.W[0].device)
        sub = copy.copy(self)
        sub.models = [self.models[m] for m in models]
        sub.idx = idx if self.idx is None else self.idx[idx]
        sub.W, sub.b, sub.gamma, sub.beta = ([p[idx].detach().requires_grad_() for p in ts]
                                             for ts in (self.W, self.b, self.gamma, self.beta))
        sub.running_mean, sub.running_var = ([b[idx] for b in bs] for bs in (self.running_mean, self.running_var))
        if isinstance(self.slope, torch.Tensor):
            sub.slope = self.slope[idx]
            sub.act = functools.partial(_leaky_per_model, slope=sub.slope)
        return sub

    def act_factor(self, a: torch.Tensor) -> torch.Tensor:
        """The activation's derivative at a hidden layer, from that layer's output a = act(z) (the next
        layer's input): where(a > 0, 1, slope) for relu / leaky_relu / identity (a > 0 exactly where
        z > 0); for CReLU, relu(cat(z, -z))'s 0/1 mask with the second half's sign folded in, (R, b, 2, h).
        What jvp_act and vjp_act multiply by."""
        if self.act is _crelu_stacked:
            mask = (a > 0).to(a.dtype)
            h = a.shape[-1] // 2
            return torch.stack((mask[..., :h], -mask[..., h:]), dim=2)
        return torch.where(a > 0, 1.0, self.slope)   # a float slope stays a scalar: no host copy in a capture

    def jvp_act(self, factor: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        """The activation's Jacobian at the factor's point times dz (R, b, h): CReLU's is (R, b, 2h),
        [dz, -dz] masked, one broadcast product."""
        if self.act is _crelu_stacked:
            return (dz.unsqueeze(2) * factor).flatten(2)
        return dz * factor

    def vjp_act(self, factor: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The Jacobian's transpose times g (R, b, h): CReLU's from (R, b, 2h) back to (R, b, h)."""
        if self.act is _crelu_stacked:
            return (g.unflatten(2, (2, -1)) * factor).sum(2)
        return g * factor

    @staticmethod
    def model_tensors(model) -> tuple[list, list]:
        """(the MLP's tensors in params() order, its BatchNorm buffers in buffers() order)."""
        ps = [p for l in range(1, model.n_layers + 1) for p in model.layer_params(l)]
        return ps, [bn.running_mean for bn in model.bns] + [bn.running_var for bn in model.bns]

    @torch.no_grad()
    def load(self, m: int, model) -> None:
        ps, bufs = self.model_tensors(model)
        for mine, theirs in zip(self.params() + self.buffers(), ps + bufs):
            mine[m].copy_(theirs)

    @torch.no_grad()
    def extract(self, m: int, cfg_model: dict):
        """Model m as a models.MLP (for the indicators, which run once per task)."""
        model = build_model(cfg_model, self.W[0].shape[2]).to(self.W[0].device)
        ps, bufs = self.model_tensors(model)
        for theirs, mine in zip(ps + bufs, self.params() + self.buffers()):
            theirs.copy_(mine[m])
        return model

    def _batchnorm(self, l: int, z: torch.Tensor, train: bool) -> torch.Tensor:
        """nn.BatchNorm1d per model: batch statistics over dim 1 (and the running update) when training,
        the running statistics otherwise."""
        if train:
            mean, var = z.mean(1), z.var(1, unbiased=False)
            with torch.no_grad():
                n, mom = z.shape[1], self.bn_momentum
                self.running_mean[l].mul_(1 - mom).add_(mom * mean)
                self.running_var[l].mul_(1 - mom).add_(mom * var * n / (n - 1))
        else:
            mean, var = self.running_mean[l], self.running_var[l]
        z_hat = (z - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.bn_eps)
        return z_hat * self.gamma[l].unsqueeze(1) + self.beta[l].unsqueeze(1)

    def forward(self, x: torch.Tensor, keep: bool = False, train: bool = True):
        """x (M, B, d) -> logits (M, B, C); with keep, also each layer's input a and output z (z keeps its
        gradient after backward: the per-example variance needs dLoss/dz). train: BatchNorm in training
        mode (the step) or on its running statistics (the end-of-task evaluation)."""
        inputs, outs = [], []
        L = self.n_layers
        for l in range(L):
            z = torch.baddbmm(self.b[l].unsqueeze(1), x, self.W[l].transpose(1, 2))
            if keep:
                inputs.append(x.detach())
                if z.requires_grad:   # not under no_grad (DecisionGraph's forward for the products)
                    z.retain_grad()
                outs.append(z)
            if l < len(self.gamma):
                z = self._batchnorm(l, z, train)
            x = self.act(z) if l < L - 1 else z
        return x, inputs, outs


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
        self.wd_views = [_view(weight_decay, p) if self.has_wd else None for p in net.params()]

    def grad_with_decay(self, p: torch.Tensor) -> torch.Tensor:
        """Adam's coupled L2: grad + weight_decay * theta (what Adam's moments see)."""
        return p.grad + _view(self.wd, p) * p.detach() if self.has_wd else p.grad

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
                    [tuple(_view(f[:, self.net.param_layer[i]], p) for f in factors) for i, p in enumerate(ps)],
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


class StackedWasserstein:
    """regularizers.WassersteinPenalty for the models that carry it (lam > 0): lam times the sum over
    tensors of ||sort(vec p_m) - sort(vec p0_m)||^2, one batched sort per tensor over those models only
    (the sort is a step's costliest op); the other models' penalty is 0."""

    def __init__(self, net: StackedMLP, lam: list[float]):
        self.net, self.M = net, len(lam)
        dev = net.W[0].device
        self.models = [m for m, x in enumerate(lam) if x > 0]
        self.idx = torch.tensor(self.models, device=dev)
        self.lam = torch.tensor([lam[m] for m in self.models], device=dev)
        self.two_lam = (2 * self.lam).unsqueeze(1)
        with torch.no_grad():
            self.sorted_init = [self._rows(p).detach().sort(dim=1).values.clone() for p in net.params()]

    def _rows(self, p: torch.Tensor) -> torch.Tensor:
        """p's carrying models, one flattened row each."""
        return p.flatten(1) if len(self.models) == self.M else p.flatten(1)[self.idx]

    @torch.no_grad()
    def reset(self, m: int) -> None:
        if m in self.models:
            i = self.models.index(m)
            for s, p in zip(self.sorted_init, self.net.params()):
                s[i] = p[m].detach().flatten().sort().values

    @torch.no_grad()
    def add_grad(self) -> None:
        """Adds the penalty's gradient to the parameters' .grad, as backward through __call__ would: lam *
        (2 * (sort(p) - p0)) put back in p's order by the sort's permutation (pow's, sort's and index's
        backward), added to the carrying rows only. The same bits as autograd (each entry is the one
        product, then grad + it), without the full-size zero tensors of index's and sort's backward, the
        full-size sum and the forward's square and sum: a plain step of the 69-model paper job has 181 ops
        (kernels, in the replayed graph) where it had 213 (bench/decision_bytes.py --plain); on the CPU, where
        the matmuls dominate, the same speed. The probe's Hessian products add the penalty's Hessian, 2 lam V,
        instead (StackedProbe's shift)."""
        for p, p0 in zip(self.net.params(), self.sorted_init):
            values, order = self._rows(p).sort(dim=1)
            g = (values - p0) * self.two_lam   # lam * (2 * (values - p0)) to the bit: a factor 2 is exact
            g = torch.empty_like(g).scatter_(1, order, g)
            grad = p.grad.flatten(1)
            if len(self.models) == self.M:
                grad.add_(g)
            else:
                grad.index_add_(0, self.idx, g)

    def __call__(self) -> torch.Tensor:
        """(M,) penalties (0 for the models that carry none): the value whose gradient add_grad writes out
        and whose Hessian is 2 lam I (regularizers.hessian_shift); the engine's objective leaves it out."""
        terms = [(self._rows(p).sort(dim=1).values - p0).square().sum(1)
                 for p, p0 in zip(self.net.params(), self.sorted_init)]
        pen = self.lam * torch.stack(terms, 1).sum(1)
        if len(self.models) == self.M:
            return pen
        return torch.zeros(self.M, dtype=pen.dtype, device=pen.device).index_add(0, self.idx, pen)

    def for_model(self, m: int, model) -> WassersteinPenalty:
        """Model m's penalty on its extracted copy `model` (sorted_init in model.parameters() order)."""
        i = self.models.index(m)
        pen = WassersteinPenalty(model, float(self.lam[i]))
        layer_order = [id(p) for p in StackedMLP.model_tensors(model)[0]]
        pen.sorted_init = [self.sorted_init[layer_order.index(id(p))][i].clone() for p in model.parameters()]
        return pen


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float64 tensors `tensors` as host copies, in one transfer (one .cpu() each waited for the
    device each time). On the CPU: copies, so the caller may change what they came from."""
    assert all(t.dtype == torch.float64 for t in tensors.values())   # cat would promote, changing the values
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).cpu()
    out, i = {}, 0
    for k, t in tensors.items():
        out[k], i = flat[i:i + t.numel()].view(t.shape), i + t.numel()
    return out


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x with NaN and +-inf replaced by 0: one kernel (isfinite and where took five)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


class _Krylov:
    """The device side of one problem of batched_lanczos: M rows, an operator hvp (M, n) -> (M, n), and
    the rows' Lanczos vectors (M, k, n) in one buffer grown by doubling (each product reads views of it,
    where stacking a list copied all k vectors again every product)."""

    def __init__(self, hvp, v: torch.Tensor, max_iter: int, capacity: int = 8):
        self.hvp, self.v = hvp, v
        self.basis = v.new_empty(v.shape[0], min(max_iter + 1, capacity), v.shape[1])   # max_iter products, one more extend
        self.basis[:, 0] = v
        self.k, self.b_prev, self.max_iter = 1, None, max_iter
        self.zero = v.new_zeros(())   # where's value for stopped rows, a tensor: where(..., out=) takes no scalar

    def product(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha (M,), beta (M,)) of the next product; keeps the residual w for `extend`."""
        basis, k = self.basis, self.k
        q = basis[:, k - 1]
        w = self.hvp(q)
        a_raw = (w * q).sum(1)
        a = _finite_or_zero(a_raw)   # a failed model must not poison w ...
        w = w - a.unsqueeze(1) * q - (self.b_prev.unsqueeze(1) * basis[:, k - 2] if k > 1 else 0.0)
        Qm = basis[:, :k]                                          # (M, k, n): full reorthogonalisation
        w = w - torch.einsum("mkn,mk->mn", Qm, torch.einsum("mkn,mn->mk", Qm, w))
        self.w, self.b = w, _finite_or_zero(w.norm(dim=1))       # ... nor eigh
        return a_raw, self.b

    def extend(self, active: torch.Tensor | None = None) -> None:
        """Append w / b to the basis for the rows still active (host bools), zeros for the others; without
        `active` (rounds run ahead of the host's stopping rule) for every row with b != 0."""
        keep = self.b != 0 if active is None else active.to(self.v.device, non_blocking=True)
        safe_b = torch.where(keep, self.b, 1.0)
        k = self.k
        if k == self.basis.shape[1]:
            grown = self.v.new_empty(self.basis.shape[0], min(2 * k, self.max_iter + 1), self.basis.shape[2])
            grown[:, :k] = self.basis
            self.basis = grown
        torch.where(keep.unsqueeze(1), self.w / safe_b.unsqueeze(1), self.zero, out=self.basis[:, k])   # no copy
        self.k, self.b_prev = k + 1, self.b

    def ritz_vectors(self, y: torch.Tensor, start_back: torch.Tensor, k: int) -> torch.Tensor:
        """The rows' unit Ritz vectors from their coefficients y (M, >= k) (host float64) over the first k
        Lanczos vectors; the rows of `start_back` (failed or skipped) get their start vector back."""
        Qm = self.basis[:, :k]
        ritz = torch.einsum("mkn,mk->mn", Qm, y[:, :k].to(Qm))
        ritz = ritz / (ritz.norm(dim=1, keepdim=True) + 1e-30)
        return torch.where(start_back.to(self.v.device).unsqueeze(1), self.v, ritz)


def lanczos_rounds(kry: list[_Krylov], rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rounds` more rounds of products for every row of every problem's Krylov state `kry`, without the
    host: no transfer, no stopping (a row that the rule would have stopped computes on, and
    batched_lanczos reads only what the rule reads). A fixed computation, so a CUDA graph can replay it
    (`DecisionGraph`). Returns every row's alphas and betas (rows, rounds)."""
    alphas, betas = [], []
    for _ in range(rounds):
        ab = [k.product() for k in kry]
        for k in kry:
            k.extend()
        alphas.append(torch.cat([a for a, _ in ab]))
        betas.append(torch.cat([b for _, b in ab]))
    return torch.stack(alphas, 1), torch.stack(betas, 1)


def lanczos_more(kry: list[_Krylov], rounds: int) -> tuple[list[_Krylov], torch.Tensor, torch.Tensor]:
    """(copies of the Krylov states `kry` moved on by `rounds` rounds (lanczos_rounds), every row's alphas
    and betas): batched_lanczos' `more` (DecisionGraph's graphs past ROUNDS). Copies, since extend moves a
    state on: the originals stay as they were, for a graph's warm-up and its capture alike."""
    states = [copy.copy(k) for k in kry]
    return (states, *lanczos_rounds(states, rounds))


def lanczos_ahead(problems: list[tuple], rounds: int, max_iter: int,
                  capacity: int | None = None) -> tuple[list[_Krylov], torch.Tensor, torch.Tensor]:
    """The first `rounds` rounds of batched_lanczos' products for every row of every problem
    (lanczos_rounds from the start vectors), the basis made for `capacity` vectors (default rounds + 1:
    more, where further rounds are to run without growing it). Returns the problems' Krylov states and
    every row's alphas and betas (rows, rounds)."""
    kry = [_Krylov(hvp, v, max_iter, capacity=capacity or rounds + 1) for hvp, v in problems]
    return (kry, *lanczos_rounds(kry, rounds))


class _RowRule:
    """The host side of batched_lanczos, every row of every problem together (R rows, float64 CPU tensors):
    the alphas (a non-finite one stored as 0: eigh never sees NaN) and betas so far, and each row's Ritz
    value, previous Ritz value, Ritz vector coefficients, products, failed and active flags. `rounds` runs
    the stopping rule (eigen.ritz_step) over a span of rounds: one round after each eager round of
    products, all the rounds run ahead (DecisionGraph) at once."""

    def __init__(self, n: torch.Tensor, active: torch.Tensor, tol: float, min_iter: int, max_iter: int):
        R = len(n)
        self.n, self.active, self.tol, self.min_iter, self.max_iter = n, active, tol, min_iter, max_iter
        self.alphas = torch.zeros(R, max_iter, dtype=torch.float64)
        self.betas = torch.zeros(R, max_iter, dtype=torch.float64)
        self.theta = torch.full((R,), math.nan, dtype=torch.float64)
        self.theta_prev = self.theta.clone()
        self.y = torch.zeros(R, max_iter, dtype=torch.float64)
        self.iters = torch.zeros(R, dtype=torch.long)
        self.failed = torch.zeros(R, dtype=torch.bool)

    def rounds(self, rows: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, k0: int) -> None:
        """Rounds k0 .. k0 + K - 1 of the rows `rows` (their alphas and betas (len(rows), K) as the products
        gave them), then the rule over them for the active rows, as if round by round: a row stops at its
        first round with a non-finite alpha (failed: its products that round, theta and y those of the
        round before) or converged | exhausted (theta and y of that round); the others go on with the last
        round's. A few host ops a round (on the GPU machine's host ~1 ms a round, where each round indexed
        every row's state): the going rows' data is gathered once and compacted only in a round where
        some row stops; the host eigh solves each small matrix on its own whatever the batch, so the
        bits do not depend on how the rounds are grouped."""
        K, k1 = alphas.shape[1], k0 + alphas.shape[1] - 1
        finite = torch.isfinite(alphas)
        self.alphas[rows, k0 - 1:k1] = torch.where(finite, alphas, 0.0)
        self.betas[rows, k0 - 1:k1] = betas
        bad = torch.zeros(len(self.n), K, dtype=torch.bool)
        bad[rows] = ~finite
        on = self.active.nonzero().squeeze(1)   # the rows going, and their data
        a, b, n_on, bad, theta_prev = self.alphas[on, :k1], self.betas[on, :k1], self.n[on], bad[on], self.theta_prev[on]
        for k in range(k0, k1 + 1):
            if not len(on):
                break
            th, y, converged, exhausted = ritz_step(a[:, :k], b[:, :k - 1], b[:, k - 1], theta_prev, k, self.tol,
                                                    self.min_iter, n_on, self.max_iter)
            ok = ~bad[:, k - k0]
            if not ok.all():   # failed rows: stopped, their round-k results dropped
                out = on[~ok]
                self.failed[out], self.iters[out], self.active[out] = True, k, False
                on, a, b, n_on, bad, th, y, converged, exhausted = (
                    x[ok] for x in (on, a, b, n_on, bad, th, y, converged, exhausted))
            self.theta[on], self.y[on, :k] = th, y
            stop = converged | exhausted
            if stop.any():
                out = on[stop]
                self.iters[out], self.active[out] = k, False
                on, a, b, n_on, bad, th = (x[~stop] for x in (on, a, b, n_on, bad, th))
            theta_prev = th
        self.iters[on], self.theta_prev[on] = k1, theta_prev


def batched_lanczos(problems: list[tuple], tol: float, max_iter: int, min_iter: int = 2,
                    skip: torch.Tensor | None = None, ahead: tuple | None = None) -> list[tuple]:
    """eigen._lanczos for many independent problems in lockstep: `problems` is a list of (hvp, v), v (M_p,
    n_p) unit rows (the sizes may differ between problems: a model's layer blocks), hvp (M_p, n_p) ->
    (M_p, n_p). Each row stops by the same rule as the one-model solver (`eigen.ritz_step`) and its result
    is frozen there; a problem stops when all its rows have (its products stop too), the call when every
    problem has. The vectors stay on the device; each round of products sends all rows' alphas and betas
    to the host in one transfer, where the tiny tridiagonal problems are solved (one sync per round: the
    layers of a decision share their rounds, where one call per layer synced once per product of each).
    `skip` (host bools, one per row of all problems in order) marks rows nobody reads: they are never
    active (theta NaN, 0 products, their start back as vector), so a model that does not measure cannot
    keep a batch's Lanczos going. `ahead`, lanczos_ahead's output for these problems: its rounds come to
    the host in one transfer and the rule runs over them as if they came one by one (`_RowRule.rounds`);
    rows still going after them take more products here. The same bits either way (each row's arithmetic
    is its own). `ahead` may carry a fourth item, `more`: Krylov states -> (states, alphas, betas) of
    further rounds of every row (DecisionGraph's graphs of one round each), or None when it has no more;
    it is called again as long as rows are still going, and the rule runs over its rounds in the same
    way. Returns, per problem, (theta (M_p,) float64 and products (M_p,) on the host, where
    the rule made them, and the Ritz vectors (M_p, n_p) on v's device)."""
    sizes = [v.shape[0] for _, v in problems]
    spans = [slice(sum(sizes[:p]), sum(sizes[:p + 1])) for p in range(len(sizes))]   # each problem's rows
    R = sum(sizes)
    all_rows = torch.arange(R)
    n = torch.tensor([v.shape[1] for _, v in problems for _ in range(v.shape[0])])   # each row's dimension
    rule = _RowRule(n, torch.ones(R, dtype=torch.bool) if skip is None else ~skip, tol, min_iter, max_iter)
    rounds = [0] * len(problems)   # each problem's rounds of products: its Krylov space is that many vectors

    def going(p: int) -> bool:   # a problem takes products while it has an active row (tol = 0: to max_iter)
        return tol <= 0 or bool(rule.active[spans[p]].any())
    live = [p for p in range(len(problems)) if going(p)]
    done, more = 0, None
    if ahead is None:
        kry = [_Krylov(hvp, v, max_iter) for hvp, v in problems]
    else:
        kry, alphas, betas, *rest = ahead
        more = rest[0] if rest else None
    while ahead is not None and live:   # rounds run ahead, in one transfer, then on as if round by round
        k = min(alphas.shape[1], max_iter - done)
        if k <= 0:
            break
        alphas, betas = torch.stack([alphas[:, :k], betas[:, :k]]).double().cpu()   # the one sync
        rule.rounds(all_rows, alphas, betas, done + 1)
        done += k
        # a problem's rounds: through its last row's stop (tol = 0: all); those with a row left go on
        for p in live:
            rounds[p] = done if tol <= 0 else int(rule.iters[spans[p]].max())
        live = [p for p in live if done < max_iter and going(p)]
        got = more(kry) if live and more is not None else None
        if got is None:
            break
        kry, alphas, betas = got
    for it in range(done + 1, max_iter + 1):   # eager rounds: one round of products, one sync each
        if not live:
            break
        rows = torch.cat([all_rows[spans[p]] for p in live])
        ab = [kry[p].product() for p in live]
        a_h, b_h = torch.stack([torch.cat([a for a, _ in ab]),
                                torch.cat([b for _, b in ab])]).double().cpu()   # the round's one sync
        rule.rounds(rows, a_h.unsqueeze(1), b_h.unsqueeze(1), it)
        for p in live:
            rounds[p] = it
        live = [p for p in live if it < max_iter and going(p)]
        for p in live:
            kry[p].extend(rule.active[spans[p]])
    theta = torch.where(rule.failed, math.nan, rule.theta)   # (a skipped row's is NaN already)
    start_back = rule.failed if skip is None else rule.failed | skip
    out = []
    for p, (_, v) in enumerate(problems):
        sl = spans[p]
        out.append((theta[sl], kry[p].ritz_vectors(rule.y[sl], start_back[sl], max(rounds[p], 1)), rule.iters[sl]))
    return out


class StackedProbe:
    """measure.DecisionProbe for the stacked model: per (model, layer) grad_sq, sigma2_ps (from the
    step's own layer inputs and output gradients), alpha, alpha_agg and the layer-block lam_max (batched
    Lanczos on the Hessian of the summed loss, which is block-diagonal across models). With
    global_column, the whole network as one more column (the probe's "global" entry): the layers' sums,
    measure._global_effective_step, and the full Hessian's lam_max for the models with measure.global
    (NaN for the others, as DecisionProbe without global_too). With `measuring`, a model that does not
    measure takes no part in the layer blocks' Lanczos, which then runs on the measuring models' sub-stack
    (its lam_max is NaN: nobody reads it), nor in the whole network's (a skipped row there). The
    products are the cross-entropy's Hessian's, written out (`_r_op_hvps`; autograd's for BatchNorm), plus
    `shift` (M,) times V: each model's regulariser adds a multiple of I to its Hessian
    (regularizers.hessian_shift), so the Wasserstein penalty's sort is not differentiated twice in every
    product."""

    def __init__(self, net: StackedMLP, adam: StackedAdam, B: int, seeds: list[int], eig_tol: float,
                 eig_max_iter: int, code_alpha_agg: list[bool], global_lam: list[bool], global_column: bool,
                 measuring: list[bool] | None, shift: torch.Tensor):
        self.net, self.adam, self.B, self.shift = net, adam, B, shift
        self.eig_tol, self.eig_max_iter = eig_tol, eig_max_iter
        dev = net.W[0].device
        self.code_alpha_agg = code_alpha_agg[0] if len(set(code_alpha_agg)) == 1 else \
            torch.tensor(code_alpha_agg)   # host: the effective steps are computed there
        self.generators = [torch.Generator(dev).manual_seed(s) for s in seeds]   # as DecisionProbe's
        M = len(seeds)
        self.vecs = [torch.zeros(M, sum(p[0].numel() for p in net.layer_params(l)), device=dev)
                     for l in range(net.n_layers)]
        self.has_vec = torch.zeros(M, dtype=torch.bool)   # host: the starts' branch is chosen there
        if any(global_lam) and not global_column:
            raise ValueError("StackedProbe: measure.global models need the whole-network column")
        self.global_column = global_column
        self.global_models = [m for m, g in enumerate(global_lam) if g]
        self.global_idx_host = torch.tensor(self.global_models, dtype=torch.long)   # indexes host results
        self.global_idx = self.global_idx_host.to(dev)   # indexes device tensors
        n_all = sum(p[0].numel() for p in net.params())
        self.global_vecs = torch.zeros(len(self.global_models), n_all, device=dev)
        self.global_problem = global_column and bool(self.global_models)   # the whole network's Lanczos
        self.skip = torch.tensor([not x for x in measuring] if measuring is not None else [False] * M)   # host
        # the layer blocks' Lanczos runs on the measuring models' sub-stack when some do not measure: their
        # products would cost every model's backward pass (on the 69-model paper job, 12 do not measure)
        self.block_models = None if not bool(self.skip.any()) else [m for m in range(M) if not self.skip[m]]
        self.block_idx_host = None if self.block_models is None else torch.tensor(self.block_models)
        self.block_idx = None if self.block_models is None else self.block_idx_host.to(dev)

    def reset(self, m: int, seed: int) -> None:
        self.generators[m] = torch.Generator(self.vecs[0].device).manual_seed(seed)
        self.has_vec[m] = False

    @staticmethod
    def _draws(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
        """A Gaussian row of like's length from each generator, drawn on its device into one (R, n) tensor."""
        r = torch.empty_like(like)
        for g, row in zip(generators, r):
            row.normal_(generator=g)   # torch.randn's own draw, in place: one kernel a row, no stack
        return r

    @staticmethod
    def _mixed_starts(r: torch.Tensor, previous: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """mixed_start of every row: warm (with its previous eigenvector) where the host bools `has` say
        so, cold elsewhere. Only the branches in use are computed (rows are independent: the same bits)."""
        if bool(has.all()):
            return mixed_start(r, previous)
        if not bool(has.any()):
            return mixed_start(r)
        return torch.where(has.to(r.device).unsqueeze(1), mixed_start(r, previous), mixed_start(r))

    def _starts(self, l: int) -> torch.Tensor:
        """eigen._start for every model: a seeded Gaussian, plus the previous eigenvector if any."""
        return self._mixed_starts(self._draws(self.generators, self.vecs[l]), self.vecs[l], self.has_vec)

    def measure(self, inputs, out_grads, labels, loss_closure, ahead=None) -> dict[str, torch.Tensor]:
        """{field: (M, L) float64 on the host} for grad_sq, sigma2_ps, alpha, alpha_agg, lam_max, eig_iters,
        from the step's layer inputs and the loss gradients at the layer outputs, and "lr" (M, L), the
        learning rates they were measured at. The device's sums come to the host in one transfer after the
        Lanczos (whose rule has synced by then); the small arithmetic after them, and Algorithm 1's
        (StackedScheduler), runs there on float64 tensors, as train.run's on floats. `ahead`
        (DecisionGraph): starts -> (problems, lanczos_ahead's rounds) in place of the eager gradient, or
        None where it cannot."""
        net, L = self.net, self.net.n_layers
        B = inputs[0].shape[1]   # this minibatch's size: B, or an epoch's partial last one
        with torch.no_grad():
            grad_sq, sigma2 = [], []
            for l in range(L):   # the layer's group: W, b (and BatchNorm's gamma, beta), as DecisionProbe's
                grad_sq.append(sum(self.adam.grad_with_decay(p).double().pow(2).flatten(1).sum(1)
                                   for p in net.layer_params(l)))
                sigma2.append(linear_gradient_stats(inputs[l], out_grads[l], B)[0])
            code_form = isinstance(self.code_alpha_agg, torch.Tensor) or self.code_alpha_agg
            on_device = {"grad_sq": torch.stack(grad_sq, 1), "sigma2_ps": torch.stack(sigma2, 1),
                         **self.adam.moments(code_form)}
        with buffers_kept(net):   # BatchNorm statistics: the probe's extra pass leaves no trace, as DecisionProbe's
            # every layer's Hessian block (W, b, BatchNorm's gamma, beta), and the whole network's for the
            # measure.global models, as one lockstep Lanczos; the starts drawn in DecisionProbe's order
            all_starts = [self._starts(l) for l in range(L)]
            starts = [v if self.block_models is None else v[self.block_idx] for v in all_starts]
            skip = [self.skip if self.block_models is None else self.skip[self.block_models]] * L
            if self.global_problem:
                starts.append(self._global_start())
                skip.append(self.skip[self.global_models])
            got = ahead(starts) if ahead is not None else None
            if got is None:
                problems, rounds = list(zip(self.hvps(inputs, labels, loss_closure), starts)), None
            else:
                problems, rounds = got
            solved = batched_lanczos(problems, self.eig_tol, self.eig_max_iter, skip=torch.cat(skip), ahead=rounds)
            solved = [self._all_models(sol, v) for sol, v in zip(solved[:L], all_starts)] + solved[L:]
            for l in range(L):
                self.vecs[l] = solved[l][1].detach()
            if self.global_problem:
                self.global_vecs = solved[L][1].detach()
            self.has_vec[:] = True
        return self._fields(_to_host(on_device), solved, B)   # the one transfer; then host tensors

    def _fields(self, host: dict, solved: list, B: int) -> dict[str, torch.Tensor]:
        """measure's fields, on the host, from host copies of the device's sums and the Lanczos results."""
        L = self.net.n_layers
        alpha, agg = self.adam.effective_steps(host, self.code_alpha_agg)
        out = {"grad_sq": host["grad_sq"], "sigma2_ps": host["sigma2_ps"], "alpha": alpha, "alpha_agg": agg,
               "lam_max": torch.stack([th for th, _, _ in solved[:L]], 1),
               "eig_iters": torch.stack([it.double() for _, _, it in solved[:L]], 1)}
        if self.global_column:
            g_alpha, g_agg = self.adam.global_effective_steps(host)
            g_lam, g_iters = self._global_lam(solved[L] if self.global_problem else None)
            whole = {k: sum(out[k][:, l] for l in range(L)) for k in ("grad_sq", "sigma2_ps")}   # in layer order,
            whole.update(alpha=g_alpha, alpha_agg=g_agg, lam_max=g_lam, eig_iters=g_iters)   # as DecisionProbe's
            out = {k: torch.cat([v, whole[k].unsqueeze(1)], 1) for k, v in out.items()}
        return dict(out, batch_size=B, lr=host["lr"])

    def hvps(self, inputs: list[torch.Tensor], labels: torch.Tensor, loss_closure) -> list:
        """The Lanczos problems' operators: every layer block's, on the measuring models (block_models), then
        the whole network's on the measure.global models' sub-stack when there are such models (the order
        of the starts in `measure`). `inputs`: the stack's layer inputs on this minibatch (StackedMLP.forward
        with keep), `labels` (M, b) its labels. Written out (`_r_op_hvps`) without BatchNorm; a BatchNorm
        stack's products differentiate loss_closure(sub) twice: the summed cross-entropy of the whole stack
        (sub None) or of a StackedMLP.rows sub-stack. The regularisers enter as `shift`."""
        wd = self.shift
        net = self.net if self.block_models is None else self.net.rows(self.block_models, self.block_idx)
        wd_b = wd if self.block_models is None else wd[self.block_idx]
        if net.gamma:   # BatchNorm is not piecewise linear in the layer's weights: autograd's second derivative
            grads = torch.autograd.grad(loss_closure(None if net is self.net else net), net.params(), create_graph=True)
            at = [net.weight_pos[l] for l in range(net.n_layers)] + [len(grads)]
            ops = [self._autograd_hvp(net.layer_params(l), grads[at[l]:at[l + 1]], wd_b) for l in range(net.n_layers)]
        else:
            rows = (lambda t: t) if net is self.net else (lambda t: t[net.idx])
            ops = self._r_op_hvps(net, [rows(a) for a in inputs], rows(labels), wd_b,
                                  [(l, l) for l in range(net.n_layers)])
        if self.global_problem:   # on the measure.global models' own sub-stack: the others' products cost nothing
            sub = self.net.rows(self.global_models, self.global_idx)
            if sub.gamma:
                ops.append(self._autograd_hvp(sub.params(), torch.autograd.grad(
                    loss_closure(sub), sub.params(), create_graph=True), wd[sub.idx]))
            else:
                ops += self._r_op_hvps(sub, [a[sub.idx] for a in inputs], labels[sub.idx], wd[sub.idx],
                                       [(0, sub.n_layers - 1)])
        return ops

    @staticmethod
    def _r_op_hvps(net: StackedMLP, inputs: list[torch.Tensor], labels: torch.Tensor, wd: torch.Tensor,
                   spans: list[tuple[int, int]]) -> list:
        """For each span (lo, hi) of layers, the (R, n) -> (R, n) product with the Hessian block of layers
        lo..hi (their W, b in params() order; plus wd I) of a stack without BatchNorm, from its layer inputs
        (R, b, .) and labels (R, b) on the minibatch: Pearlmutter's R-operator written out. The direction V
        goes up from layer lo to the logits (R z_k = R a_(k-1) W_k^T + a_(k-1) dW_k^T + db_k, R a_k = act'(z_k)
        R z_k: the activations are piecewise linear, act'' = 0), through the mean cross-entropy's Hessian in
        the logits, H_CE = (diag(p) - p p^T) / b, and back down to layer lo (R g_(k-1) = act'(z_(k-1))
        (R g_k W_k + g_k dW_k), R grad W_k = R g_k^T a_(k-1) + g_k^T R a_(k-1), R grad b_k = sum R g_k),
        g_k the loss gradient at layer k's output. For one layer (lo = hi) the g terms vanish: the product
        is the Gauss-Newton block's, J^T H_CE J (a layer block's Lanczos); the whole network (0, L - 1)
        adds the cross-layer terms (the measure.global models'). No create_graph gradient and no double
        backward: equal to autograd's second derivative up to rounding (tests/test_batched.py); the whole
        network's product in 27-29 kernels where autograd's took 46-62 (bench/decision_bytes.py)."""
        L, b = net.n_layers, inputs[0].shape[1]
        with torch.no_grad():
            Ws = [W.detach() for W in net.W]
            factors = [net.act_factor(a) for a in inputs[1:]]   # factor k: the activation after layer k
            p = torch.softmax(torch.baddbmm(net.b[-1].detach().unsqueeze(1), inputs[-1], Ws[-1].transpose(1, 2)), -1)
            p_mean = p / b   # the minibatch mean's 1 / b, folded in once
            g = [None] * L   # the loss gradients at the layer outputs k = lo + 1 .. hi of the spans of several layers
            lowest = min((lo + 1 for lo, hi in spans if hi > lo), default=L)
            if lowest < L:
                g[-1] = (p - torch.zeros_like(p).scatter_(-1, labels.unsqueeze(-1), 1.0)) / b
                for k in range(L - 1, lowest, -1):
                    g[k - 1] = net.vjp_act(factors[k - 1], torch.bmm(g[k], Ws[k]))

        def span(lo: int, hi: int):
            sizes = [n for k in range(lo, hi + 1) for n in (Ws[k][0].numel(), Ws[k].shape[1])]

            def hvp(V):
                pieces = V.split(sizes, 1)
                dW = {k: pieces[2 * (k - lo)].reshape(Ws[k].shape) for k in range(lo, hi + 1)}
                db = {k: pieces[2 * (k - lo) + 1] for k in range(lo, hi + 1)}
                ra = {}   # R a_(k-1), layer k's input's direction, for the span's layers above lo
                for k in range(lo, L):   # up: R z_k from below (none at lo) and, inside the span, dW_k and db_k
                    r_in = net.jvp_act(factors[k - 1], rz) if k > lo else None
                    if r_in is not None and k <= hi:
                        ra[k] = r_in
                    own = torch.baddbmm(db[k].unsqueeze(1), inputs[k], dW[k].transpose(1, 2)) if k <= hi else None
                    if r_in is None:
                        rz = own
                    elif own is None:
                        rz = torch.bmm(r_in, Ws[k].transpose(1, 2))
                    else:
                        rz = torch.baddbmm(own, r_in, Ws[k].transpose(1, 2))
                rg = p_mean * (rz - (p * rz).sum(-1, keepdim=True))
                out = []
                for k in range(L - 1, lo - 1, -1):   # down
                    if k <= hi:
                        hw = torch.bmm(rg.transpose(1, 2), inputs[k])
                        if k in ra:
                            hw = torch.baddbmm(hw, g[k].transpose(1, 2), ra[k])
                        out = [hw.flatten(1), rg.sum(1)] + out
                    if k > lo:
                        t = torch.bmm(rg, Ws[k])
                        if k <= hi:
                            t = torch.baddbmm(t, g[k], dW[k])
                        rg = net.vjp_act(factors[k - 1], t)
                hv = torch.cat(out, 1)
                return torch.addcmul(hv, wd.unsqueeze(1).to(hv.dtype), V)
            return hvp
        return [span(lo, hi) for lo, hi in spans]

    def _all_models(self, solved, start):
        """A layer block's (theta, Ritz vectors, products) over block_models -> over all M models, the others'
        as batched_lanczos gives a skipped row: theta NaN, its start vector back, 0 products."""
        if self.block_models is None:
            return solved
        theta, vecs, iters = solved   # theta and products on the host, the vectors on the device
        M, idx = start.shape[0], self.block_idx_host
        return (theta.new_full((M,), math.nan).index_copy(0, idx, theta), start.index_copy(0, self.block_idx, vecs),
                iters.new_zeros(M).index_copy(0, idx, iters))

    @staticmethod
    def _autograd_hvp(ps: list[torch.Tensor], grads, wd: torch.Tensor):
        """(R, n) -> (R, n): autograd's Hessian-vector product for the stacked tensors ps (a layer's group,
        or every tensor of the network), `grads` their create_graph gradient, plus the regularisers' wd I.
        For BatchNorm stacks, whose layers are not piecewise linear in their weights."""
        sizes = [p[0].numel() for p in ps]

        def hvp(V):
            pieces = [x.reshape(p.shape) for x, p in zip(V.split(sizes, 1), ps)]
            hs = torch.autograd.grad(grads, ps, grad_outputs=pieces, retain_graph=True)
            hv = torch.cat([h.detach().flatten(1) for h in hs], 1)
            return hv + wd.unsqueeze(1).to(hv.dtype) * V
        return hvp

    def _global_start(self) -> torch.Tensor:
        """eigen._start of the whole network for the measure.global models (drawn after the layers')."""
        r = self._draws([self.generators[m] for m in self.global_models], self.global_vecs)
        return self._mixed_starts(r, self.global_vecs, self.has_vec[self.global_idx_host])

    def _global_lam(self, solved):
        """(lam_max (M,), products (M,)) on the host: the whole Hessian's top eigenvalue for the measure.global
        models from their Lanczos (`solved`, None without such models); NaN and 0 for the others."""
        M = len(self.generators)
        lam = torch.full((M,), math.nan, dtype=torch.float64)
        iters = torch.zeros(M, dtype=torch.float64)
        if solved is None:
            return lam, iters
        th, _, it = solved
        return lam.index_copy(0, self.global_idx_host, th), iters.index_copy(0, self.global_idx_host, it.double())

    def state_dict(self) -> dict:
        return {"vecs": self.vecs, "global_vecs": self.global_vecs, "has_vec": self.has_vec,
                "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, s: dict) -> None:
        self.vecs = [v.clone() for v in s["vecs"]]
        self.global_vecs = s["global_vecs"].clone()
        self.has_vec.copy_(s["has_vec"])
        for g, st in zip(self.generators, s["generators"]):
            g.set_state(st.cpu())   # RNG states are CPU ByteTensors, whatever map_location did


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
        self.safety, self.cool, self.warm, self.floor = s["safety"], s["cool"], s["warm"], s["floor"]
        self.warm_frac, self.warm_factor = s["warm_frac"], s["warm_factor"]
        self.kappa, self.W = s["kappa"], s["window"]
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
        bound = torch.stack([bd["alpha_tilde"], bd["alpha_g"], bd["tau"]]).gather(   # BOUNDS' order
            0, self.bound_idx.view(1, -1, 1).expand(1, *lam_bar.shape)).squeeze(0)
        alpha = m["alpha"]
        cool, warm = algorithm1_rule(alpha, bound, task_frac, self)
        if cool.shape[1] > L:   # a global-variant model's layers follow its whole-network rule
            cool, warm = (torch.cat([torch.where(self.glob, r[:, L:], r[:, :L]), r[:, L:]], 1) for r in (cool, warm))
        act = self.act.unsqueeze(1)
        lr = m["lr"]
        lr_row = torch.where(act & cool[:, :L], lr * self.cool, torch.where(act & warm[:, :L], lr * self.warm, lr))
        self.adam.lr.copy_(lr_row)
        rule = torch.where(cool, 1.0, torch.where(warm, 2.0, 0.0)).double()
        if cool.shape[1] > L:
            lr_row = torch.cat([lr_row, lr_row[:, :1]], 1)   # the global row logs the first group's LR
        row = {"lr": lr_row, "alpha": alpha, **bd, "bound": bound, "lam_max": m["lam_max"],
               "lam_bar": lam_bar, "vol": st["vol"], "mu": st["mu"], "sigma2_win": st["sigma2"], "sigma2_ps": s2, "grad_sq": g,
               "eig_iters": m["eig_iters"]}
        return torch.stack([row[f] for f in NUM_FIELDS] + [rule])

    def state_dict(self) -> dict:
        return {"values": self.values, "count": self.count}

    def load_state_dict(self, s: dict) -> None:   # host tensors, whatever map_location did
        self.values, self.count = s["values"].cpu().clone(), s["count"].cpu().clone()


def _clear_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


class CudaGraphStep:
    """step(idx) captured once as a CUDA graph (torch.cuda.graphs' whole-network capture: forward,
    backward and optimiser step) and replayed: one launch instead of ~110 per step. The first `warmup`
    calls run eagerly on a side stream (capture's prerequisite), the next is captured and replayed, later
    ones copy idx into the captured index tensor and replay. Every call is a real training step, so a
    run's records do not depend on when the capture happens. `step` may only update tensors that outlive
    the graph, in place (parameters, Adam state, accumulators), and idx keeps its shape. A call returns
    what step returned (after the capture: the captured tensors, which each replay writes again).
    keeps_grads: the step leaves its gradients in .grad for the caller (a decision step's forward and
    backward, Adam eager after it), so each replay points .grad back at the captured ones."""

    def __init__(self, step, params: list[torch.Tensor], warmup: int = 3, keeps_grads: bool = False):
        self.step, self.params, self.warmup, self.keeps_grads = step, params, warmup, keeps_grads
        self.graph, self.idx, self.eager_calls, self.out, self.grads = None, None, 0, None, None

    @classmethod
    def for_device(cls, step, params: list[torch.Tensor], device: torch.device, **kwargs):
        """One on CUDA; None elsewhere (no CUDA graphs: the caller runs the step eagerly)."""
        return cls(step, params, **kwargs) if device.type == "cuda" else None

    def __call__(self, idx: torch.Tensor):
        if self.graph is not None:
            self.idx.copy_(idx)
            self.graph.replay()
            if self.keeps_grads:   # .grad may point elsewhere since (an eager step, another graph's capture)
                for p, g in zip(self.params, self.grads):
                    p.grad = g
            return self.out
        _clear_grads(self.params)
        if self.eager_calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(idx)
            torch.cuda.current_stream().wait_stream(side)
            # made on the side stream, read on this one: not to be reused before this stream is done with them
            for t in tree_flatten(out)[0] + [p.grad for p in self.params]:
                if isinstance(t, torch.Tensor):
                    t.record_stream(torch.cuda.current_stream())
            self.eager_calls += 1
            return out
        self.idx = idx.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):   # records the step without running it
            self.out = self.step(self.idx)
        self.grads = [p.grad for p in self.params]
        self.graph.replay()
        return self.out


class DecisionGraph:
    """A decision step's device part as one CUDA graph (`decision_graph`): the probe's forward pass on the
    step's minibatch (the layer inputs and activation factors the written-out products read, and the loss
    gradients at the layer outputs for the measure.global models') and ROUNDS rounds of every Lanczos
    problem's products (lanczos_ahead), captured at the job's first full-minibatch decision and replayed at
    every later one. The host then runs the stopping rule over those rounds' alphas and betas, fetched in
    one transfer (batched_lanczos(ahead=...)). Where rows are still going, the next round comes from a
    graph of that one round (up to EXTRA of them, each captured at the first decision that needs it), and
    the rule runs over it, round by round; rows going on past them take their next products eagerly on
    the replayed tensors. No autograd graph, so Adam's in-place steps between decisions leave them valid
    (StackedProbe._r_op_hvps; BatchNorm stacks, whose products are autograd's, do not use this graph).
    Eager, a round is hundreds of kernel launches and a sync: on an H100 one round of products took
    1.9-5.7 ms eager and 0.5-2.5 ms replayed (bench/decision_profile.py), with decisions 72-85% of a
    paper-scale job's time. The extra rounds that rows which have stopped compute are thrown away; the
    records are the eager engine's bits (tests/test_batched.py). Elsewhere than CUDA the same bodies run
    eagerly at every call (a stand-in, for the tests). Partial minibatches stay eager."""
    ROUNDS = 16       # [choice] about the rounds a paper-scale decision takes (8-20 on an H100, 2026-11-27)
    # [choice] rounds past ROUNDS from graphs of one round each: l2-long's decisions went 1-3 rounds past 16
    # (CPU, 2026-11-28), the 69-model job's 0-2 (call 7). One graph of 4 would replay 4 where 1 is needed, at
    # a few ms a round in a job that large (its rounds read a basis of 17-20 vectors): a sync a round is less
    EXTRA = 4
    fallback = True   # a failed capture: a warning, then eager rounds for the rest of the job (tests: raise)

    def __init__(self, engine: "BatchedRuns"):
        self.engine, self.graph, self.state, self.failed = engine, None, None, False
        self.more: list = []   # the graphs past ROUNDS: (graph, its output) each, None where a capture failed
        self.capture = engine.device.type == "cuda"

    def _body(self):
        e = self.engine
        xb, yb = e.minibatch(self.idx)
        with torch.no_grad():
            inputs = e.net.forward(xb, keep=True)[1]
        problems = list(zip(e.probe.hvps(inputs, yb, None), self.starts))   # no BatchNorm here: no loss_closure
        return problems, lanczos_ahead(problems, self.rounds, e.probe.eig_max_iter,
                                       capacity=self.rounds + self.extra + 1)   # no growing in the graphs past it

    @property
    def rounds(self) -> int:
        """ROUNDS, but none past eig_max_iter: the rule reads none."""
        return min(self.ROUNDS, self.engine.probe.eig_max_iter)

    @property
    def extra(self) -> int:
        """The rounds replayed past ROUNDS: EXTRA, but none past eig_max_iter."""
        return min(self.EXTRA, self.engine.probe.eig_max_iter - self.rounds)

    def _capture(self, body, what: str):
        """(graph, body's output as the graph wrote it): body run once on a side stream (capture's
        prerequisite: a warm-up), then captured, which records it without running it. None where the
        capture failed (fallback): nothing ran, and the eager path computes the same, more slowly."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                return graph, body()
        except RuntimeError as e:
            if not self.fallback:
                raise
            warnings.warn(f"decision_graph: capture failed ({what}), they stay eager for this job: {e}")
            return None

    def __call__(self, bidx: torch.Tensor, starts: list[torch.Tensor]):
        """(problems, rounds run ahead and the graphs' `more`) of this decision, for
        StackedProbe.measure; None where the capture failed."""
        if not self.capture:
            self.idx, self.starts = bidx, starts
            problems, (kry, alphas, betas) = self._body()
            return problems, (kry, alphas, betas, self._more)   # _more gives None past EXTRA (none at 0)
        if self.failed:
            return None
        if self.graph is None:
            self.idx, self.starts = bidx.clone(), [v.clone() for v in starts]
            got = self._capture(self._body, "the first rounds")
            if got is None:
                self.failed = True
                return None
            self.graph, self.state = got
        else:
            self.idx.copy_(bidx)
            for mine, v in zip(self.starts, starts):
                mine.copy_(v)
        self.graph.replay()
        problems, (kry, alphas, betas) = self.state
        # fresh handles on the replayed Krylov states: rows going on past ROUNDS extend copies of them
        return problems, ([copy.copy(k) for k in kry], alphas, betas, self._more)

    def _more(self, kry: list[_Krylov]):
        """(Krylov states, alphas, betas) of the next round of every row from the states `kry` that the
        graphs before left (batched_lanczos' `more`), from that round's own graph; None past EXTRA rounds or
        where its capture failed. The graphs form a chain: each reads the states the one before wrote."""
        j = kry[0].k - self.rounds - 1   # the rounds past ROUNDS so far (every problem's state is as far on)
        if j >= self.extra:
            return None
        body = functools.partial(lanczos_more, kry, 1)   # copies: the warm-up's and the capture's own
        if not self.capture:
            return body()
        if j == len(self.more):   # the first decision to get this far (a None before it stops the chain there)
            self.more.append(self._capture(body, f"round {self.rounds + j + 1}"))
        if self.more[j] is None:
            return None
        graph, (states, alphas, betas) = self.more[j]
        graph.replay()
        return [copy.copy(k) for k in states], alphas, betas


def _rows_to_dicts(rows: torch.Tensor, m: int, keys: list) -> dict:
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


def _no_rules(L: int) -> dict:
    """Rule counters {layer 1..L, "global": {rule: 0}} (scheduler.NoiseCurvatureScheduler.rule_counts)."""
    return {k: {r: 0 for r in RULES} for k in [*range(1, L + 1), "global"]}


@torch.no_grad()
def _evaluate(net: StackedMLP, xs, ys, sidx, chunk: int = 2048):
    """End-of-task loss and accuracy of every model of `net` on its whole task: (M,) each, on the host.
    Model m reads images xs[sidx[m]] and labels ys[m]."""
    M, N = len(sidx), xs.shape[1]
    loss = torch.zeros(M, dtype=torch.float64, device=xs.device)
    correct = torch.zeros(M, dtype=torch.float64, device=xs.device)
    for i in range(0, N, chunk):
        x, y = xs[sidx, i:i + chunk], ys[:, i:i + chunk]
        logits, _, _ = net.forward(x, train=False)
        loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(M, -1).sum(1).double()
        correct += (logits.argmax(2) == y).sum(1).double()
    return (loss / N).tolist(), (correct / N).tolist()


class BatchedRuns:
    """M runs of one model shape as one engine of loop.train_stream: the stacked model, its Adam,
    Wasserstein penalty, probe and scheduler, the runs' streams on the device, and their records (written
    at the end, and replayed into W&B then)."""

    def __init__(self, cfgs: list[dict], device: torch.device, metas: list[dict], out_dirs: list[Path]):
        self.cfgs, self.device, self.metas, self.out_dirs = cfgs, device, metas, out_dirs
        c0 = cfgs[0]
        self.M = M = len(cfgs)
        self.task_epochs = [steps_per_task(c)[0] for c in cfgs]   # a task clock per model (loop.train_stream)
        self.B = B = c0["batch_size"]
        self.n_images = c0["stream"]["n_images"]
        self.drop_last = c0["stream"]["drop_last"]
        self.n_full = self.n_images // B   # full minibatches per epoch; one partial more unless drop_last
        self.betas0 = tuple(c0["optim"]["betas"])

        # data: one stream per distinct seed, on the device; model m reads seed slot sidx[m]
        x_all, y_all = load_mnist(c0["data"]["root"], train=True)
        self.seeds = sorted({c["seed"] for c in cfgs})
        self.streams = {s: make_stream(c0["stream"], x_all, y_all, s, device) for s in self.seeds}
        self.sidx = torch.tensor([self.seeds.index(c["seed"]) for c in cfgs], device=device)
        self.xs = torch.stack([self.streams[s].x for s in self.seeds])

        models = []
        for c in cfgs:
            torch.manual_seed(_sub_seed(c["seed"], 0))   # as train.Learner
            models.append(build_model(c["model"], input_dim(c["stream"])))
        self.net = net = StackedMLP(models, device)
        self.L = L = net.n_layers
        self.lr0 = [float(c["optim"]["lr"]) for c in cfgs]
        lr = torch.tensor(self.lr0, dtype=torch.float64, device=device).unsqueeze(1).repeat(1, L)
        self.wd = torch.tensor([c["regularizer"]["lam"] if c["regularizer"]["kind"] == "l2" else 0.0 for c in cfgs],
                               device=device)
        self.adam = StackedAdam(net, lr, self.wd, self.betas0, c0["optim"]["eps"], fused=c0["fused_adam"])
        self.lam_w = [c["regularizer"]["lam"] if c["regularizer"]["kind"] == "wasserstein" else 0.0 for c in cfgs]
        self.wass = StackedWasserstein(net, self.lam_w) if any(x > 0 for x in self.lam_w) else None
        # the probe runs for every model when any measures (its Lanczos for the measuring ones only); only
        # the measuring ones keep its rows
        self.measuring_m = [measures(c) for c in cfgs]
        self.measuring = any(self.measuring_m)
        init_seeds = [_sub_seed(c["seed"], 0) for c in cfgs]
        # the whole network as one more decision column: for measure.global (its lam_max) and the global variant
        global_lam = [c["measure"]["global"] for c in cfgs]
        self.global_variant = [c["scheduler"]["variant"] == "global" for c in cfgs]
        global_column = any(global_lam) or any(self.global_variant)
        self.probe = StackedProbe(net, self.adam, B, init_seeds, c0["measure"]["eig_tol"], c0["measure"]["eig_max_iter"],
                                  [c["scheduler"]["code_alpha_agg"] for c in cfgs], global_lam,
                                  global_column, self.measuring_m,
                                  torch.tensor([hessian_shift(c["regularizer"]) for c in cfgs], device=device)) \
            if self.measuring else None
        self.sched = StackedScheduler(self.adam, B, [c["scheduler"] for c in cfgs],
                                      [c["arm"] == "scheduled" for c in cfgs], L + global_column) \
            if self.measuring else None
        # each model's decision rows: its layers, and "global" for the global variant (as scheduler.step)
        self.row_keys = [list(range(1, L + 1)) + (["global"] if g else []) for g in self.global_variant]
        ramp = [c["optim"]["beta_ramp"] for c in cfgs]
        self.ramping = any(ramp)
        self.ramp_rows = None if all(ramp) else torch.tensor(ramp, device=device)
        self.records = [dict(new_record(c, device, L), name=mt.get("run"), scale=mt.get("scale"),
                             batched={"models": M, "position": i}) for i, (c, mt) in enumerate(zip(cfgs, metas))]
        self.rule_counts = [_no_rules(L) for _ in cfgs]
        self.alive = [True] * M   # False once a model's run has ended (diverged, or its last task done)
        self.left = []   # the runs that have left the stack (keep): what finish writes for each

        # each model's task labels and counters live as long as the run, updated in place (a CUDA graph
        # reads them); the models' tasks start and end on their own clocks (start_task, end_task)
        self.ys = torch.zeros(M, self.n_images, dtype=torch.long, device=device)
        self.model_rows = torch.arange(M, device=device).unsqueeze(1)
        self.correct = torch.zeros(M, device=device)           # over full minibatches
        self.correct_partial = torch.zeros(M, device=device)   # over last partial ones (stream.drop_last false)
        self.loss_sum = torch.zeros(M, device=device)
        self.indicators, self.gens = [None] * M, [None] * M
        self.steps_done = [0] * M   # per model: a diverged one's stop where train.SingleRun stops
        self.diverged, self.correct_frozen = [False] * M, [None] * M
        # decision rows (step, frac, (F, M, C) on the device) since the earliest open task's start: row
        # rows_base + i is self.rows[i]; a model's task reads its rows from row_start[m] on
        self.rows, self.rows_base, self.row_start, self.open = [], 0, [0] * M, set()
        self.graph = CudaGraphStep.for_device(self.plain_step, net.params(), device) if c0["cuda_graph"] else None
        self.decision_step_graph = CudaGraphStep.for_device(self.decision_forward_backward, net.params(), device,
                                                            keeps_grads=True) \
            if c0["decision_step_graph"] and self.measuring else None
        self.decision_graph = DecisionGraph(self) \
            if c0["decision_graph"] and self.measuring and not c0["model"]["batchnorm"] else None

    def objective(self, xb, yb, keep=False, sub: StackedMLP | None = None):
        """(logits, per-model cross-entropy, their sum, layer inputs, layer outputs) of every model on its
        minibatch; with `sub` (StackedMLP.rows), of that sub-stack's models only. The Wasserstein penalty
        is not in it: the step adds its gradient (StackedWasserstein.add_grad), the probe its Hessian
        (2 lam I, in StackedProbe's shift)."""
        net = self.net if sub is None else sub
        if sub is not None:
            xb, yb = xb[sub.idx], yb[sub.idx]
        logits, inputs, outs = net.forward(xb, keep)
        ce = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(len(net.models), -1).mean(1)
        return logits, ce, ce.sum(), inputs, outs

    def minibatch(self, bidx):
        """Each model's minibatch bidx (M, b), gathered on the device from its seed's stream: (xb, yb)."""
        return self.xs[self.sidx.unsqueeze(1), bidx], self.ys[self.model_rows, bidx]

    def forward_backward(self, bidx, counts, keep=False):
        """The step up to Adam: gather each model's minibatch bidx (M, b) on the device, forward, backward,
        count hits and sum the losses."""
        xb, yb = self.minibatch(bidx)
        logits, ce, total, inputs, outs = self.objective(xb, yb, keep)
        total.backward()
        if self.wass is not None:
            self.wass.add_grad()
        counts.add_((logits.argmax(2) == yb).sum(1))
        self.loss_sum.add_(ce.detach())
        return xb, yb, inputs, outs

    def plain_step(self, bidx):
        """A full-minibatch step without a decision: what the CUDA graph captures."""
        self.forward_backward(bidx, self.correct)
        self.adam.step()

    def decision_forward_backward(self, bidx, counts=None):
        """A decision step up to the probe: forward_backward with the layer activations kept, as values
        (xb, yb, layer inputs, loss gradients at the layer outputs): what `decision_step_graph` captures.
        Values only: the step's autograd graph goes before the probe builds its own (alive, its
        AccumulateGrad nodes, made on the default stream, break a DecisionGraph capture on CUDA)."""
        xb, yb, inputs, outs = self.forward_backward(bidx, self.correct if counts is None else counts, keep=True)
        return xb, yb, [a.detach() for a in inputs], [z.grad for z in outs]

    def start_task(self, tasks: dict[int, int]) -> None:
        """Models m start their task tasks[m]; the others go on with theirs."""
        net = self.net
        for m, t in tasks.items():
            c = self.cfgs[m]
            if t > 0 and c["arm"] == "reset":   # as train.SingleRun: a fresh model, optimiser, probe and scheduler
                torch.manual_seed(_sub_seed(c["seed"], t))
                net.load(m, build_model(c["model"], input_dim(c["stream"])))
                self.adam.reset(m, self.lr0[m])
                if self.wass is not None:
                    self.wass.reset(m)
                if self.probe is not None:
                    self.probe.reset(m, _sub_seed(c["seed"], t))
                    self.sched.reset(m)
                    self.rule_counts[m] = _no_rules(self.L)
        # each (seed, task)'s labels once: models of one seed at one task share them
        pairs = {(self.cfgs[m]["seed"], t) for m, t in tasks.items()}
        labels = {(seed, t): self.streams[seed].task(t)[1] for seed, t in pairs}
        for m, t in tasks.items():
            c = self.cfgs[m]
            self.ys[m].copy_(labels[c["seed"], t])
            self.indicators[m] = None
            if c["indicators"]["enabled"] and self.alive[m]:
                model = net.extract(m, c["model"])
                reg = self.wass.for_model(m, model) if self.lam_w[m] > 0 else None
                self.indicators[m] = task_start_indicators(c, model, self.xs[self.sidx[m]], self.ys[m], reg,
                                                           float(self.wd[m]))
            self.gens[m] = torch.Generator(device=self.device).manual_seed(_sub_seed(c["seed"], t, 1))
            self.steps_done[m], self.diverged[m], self.correct_frozen[m] = 0, False, None
            self.row_start[m] = self.rows_base + len(self.rows)
        self.open |= set(tasks)
        if len(tasks) == self.M:
            for acc in (self.correct, self.correct_partial, self.loss_sum):
                acc.zero_()
        else:
            idx = torch.tensor(sorted(tasks), device=self.device)
            for acc in (self.correct, self.correct_partial, self.loss_sum):
                acc.index_fill_(0, idx, 0)

    def minibatches(self, epoch: int):
        """streams.batches' minibatches for every model, as views of one (M, n) order: (M, B) each, then
        the partial (M, b) one unless drop_last."""
        B, n_full = self.B, self.n_full
        order = torch.stack([epoch_order(self.n_images, g) for g in self.gens])
        full = order[:, :n_full * B].view(self.M, n_full, B)
        tail = [order[:, n_full * B:]] if not self.drop_last and self.n_images % B else []
        return [full[:, j] for j in range(n_full)] + tail

    def step(self, bidx, *, step: int, frac: list[float] | None, decide: bool) -> None:
        full = bidx.shape[1] == self.B
        if self.graph is not None and full and not decide:
            self.graph(bidx)
            return
        # eager: partial minibatches, and decision steps (the probe needs the step's activations) unless
        # decision_step_graph replays their forward and backward
        counts = self.correct if full else self.correct_partial
        if decide and self.decision_step_graph is not None and full:
            xb, yb, inputs, out_grads = self.decision_step_graph(bidx)
        else:
            _clear_grads(self.net.params())
            if decide:
                xb, yb, inputs, out_grads = self.decision_forward_backward(bidx, counts)
            else:
                self.forward_backward(bidx, counts)
        if decide:
            ahead = functools.partial(self.decision_graph, bidx) if self.decision_graph is not None and full else None
            meas = self.probe.measure(inputs, out_grads, yb, lambda sub=None: self.objective(xb, yb, sub=sub)[2], ahead)
            # each model's fraction of its task (Algorithm 1's warm-up window): one number when they agree
            fr = frac[0] if len(set(frac)) == 1 else torch.tensor(frac, dtype=torch.float64).unsqueeze(1)
            self.rows.append((step, frac, self.sched.step(meas, fr)))
        self.adam.step()

    def ramp(self, epochs: list[int]) -> None:
        """The beta ramp's first-layer betas, each model at its epoch `epochs[m]` of its task."""
        if not self.ramping:
            return
        adam = self.adam
        ramped = [ramped_betas(self.betas0, ep, n) for ep, n in zip(epochs, self.task_epochs)]
        if len(set(ramped)) == 1:
            b1, b2 = ramped[0]
        else:   # the models are at other epochs of their tasks
            b1, b2 = torch.tensor(ramped, dtype=torch.float64, device=self.device).T
        if self.ramp_rows is None:
            adam.beta1[:, 0], adam.beta2[:, 0] = b1, b2
        else:
            adam.beta1[:, 0] = torch.where(self.ramp_rows, b1, adam.beta1[:, 0])
            adam.beta2[:, 0] = torch.where(self.ramp_rows, b2, adam.beta2[:, 0])

    def end_epoch(self, *, steps: list[int]) -> bool:
        """The NaN check of every model (one host sync); a diverged model's counts are frozen where
        train.SingleRun stops its task. True when no model is left training in its task."""
        finite = torch.isfinite(self.loss_sum).tolist()
        correct_now = None
        for m in range(self.M):
            if self.alive[m] and not self.diverged[m]:
                self.steps_done[m] = steps[m]
                if not finite[m]:
                    self.diverged[m] = True
                    correct_now = correct_now or list(zip(self.correct.tolist(), self.correct_partial.tolist()))
                    self.correct_frozen[m] = correct_now[m]
        return all(d or not a for d, a in zip(self.diverged, self.alive))

    def end_task(self, tasks: dict[int, int], *, steps: dict[int, int], wall_s: dict[int, float],
                 step: int) -> list[int]:
        L, ending = self.L, sorted(tasks)
        self.wall_s, self.ended = max(wall_s.values()), [m for m in ending if self.alive[m]]
        if len(ending) == self.M:
            end_loss, end_acc = _evaluate(self.net, self.xs, self.ys, self.sidx)
        else:   # the ending models only, as a sub-stack
            idx = torch.tensor(ending, device=self.device)
            sub_loss, sub_acc = _evaluate(self.net.rows(ending, idx), self.xs, self.ys[idx], self.sidx[idx])
            end_loss, end_acc = dict(zip(ending, sub_loss)), dict(zip(ending, sub_acc))
        first = min(self.row_start[m] for m in ending) - self.rows_base
        # one transfer per task end: the rows since the earliest of the ending tasks' starts
        host_rows = torch.stack([r for _, _, r in self.rows[first:]]).cpu() if self.rows[first:] else None
        correct_h = [f if f is not None else c
                     for f, c in zip(self.correct_frozen, zip(self.correct.tolist(), self.correct_partial.tolist()))]
        lr_h = self.adam.lr.tolist()
        stopped = []
        for m in ending:
            t, c, rec = tasks[m], self.cfgs[m], self.records[m]
            self.open.discard(m)
            if not self.alive[m]:
                continue
            rows_m = []
            lo = self.row_start[m] - self.rows_base
            for i, (s, frac, _) in enumerate(self.rows[lo:] if self.measuring_m[m] else []):
                rows = _rows_to_dicts(host_rows[lo - first + i], m, self.row_keys[m])
                rows_m.append(rows)
                append_decision(rec, s, t, frac[m], rows)
                for key in (["global"] if self.global_variant[m] else range(1, L + 1)):   # the rules applied
                    self.rule_counts[m][key][rows[key]["rule"]] += 1
            diverged = end_task(
                rec, t, online_acc=task_online_acc(*correct_h[m], self.steps_done[m], self.n_images, self.B,
                                                   self.drop_last),
                end_loss=end_loss[m], end_acc=end_acc[m], steps=self.steps_done[m], wall_s=wall_s[m], lr=lr_h[m],
                rows=rows_m, indicators=self.indicators[m], diverged=self.diverged[m])
            if diverged:
                stopped.append(m)
            self.alive[m] = not diverged and t + 1 < c["n_tasks"]
        # the rows no open task reads any more
        keep_from = min((self.row_start[m] for m in self.open), default=self.rows_base + len(self.rows))
        del self.rows[:keep_from - self.rows_base]
        self.rows_base = keep_from
        return stopped

    def task_line(self) -> str:
        """The online accuracies of the tasks that just ended, per model (run/seed)."""
        accs = " ".join(f"{self.records[m]['name'] or m}/s{self.cfgs[m]['seed']} "
                        f"{self.records[m]['tasks'][-1]['online_acc']:.3f}" for m in self.ended)
        return f"online acc {accs}  {self.wall_s:.1f}s"

    def state_dict(self) -> dict:
        return {"params": [p.detach() for p in self.net.params()], "buffers": self.net.buffers(),
                "adam": self.adam.state_dict(), "wass": self.wass.sorted_init if self.wass is not None else None,
                "probe": self.probe.state_dict() if self.probe else None,
                "sched": self.sched.state_dict() if self.sched else None, "records": self.records,
                "rule_counts": self.rule_counts, "alive": self.alive, "left": self.left}

    def load_state_dict(self, s: dict) -> None:
        with torch.no_grad():
            for p, q in zip(self.net.params() + self.net.buffers(), s["params"] + s["buffers"]):
                p.copy_(q)
        self.adam.load_state_dict(s["adam"])
        if self.wass is not None:
            self.wass.sorted_init = [t.clone() for t in s["wass"]]
        if self.probe is not None:
            self.probe.load_state_dict(s["probe"])
            self.sched.load_state_dict(s["sched"])
        if self.decision_graph is not None:   # captured afresh, on the loaded tensors
            self.decision_graph = DecisionGraph(self)
        self.records, self.rule_counts, self.alive, self.left = s["records"], s["rule_counts"], s["alive"], s["left"]

    def keep(self, models: list[int]) -> None:
        """Only `models` train on (at a checkpoint, no task open): the engine is built again for their
        configs (every per-model setting, the Wasserstein and whole-network subsets, graphs captured
        afresh) and their rows of the state are loaded into it. The stack shrinks as the runs of shorter
        task lengths end. The others' records stay in the state (`left`), written by `finish` with the
        rest: a job killed later (whose outputs Snakemake then deletes) writes them when it resumes."""
        s = self.state_dict()
        s["left"] = self.left + [self._run(m) for m in range(self.M) if m not in models]
        wass_models = self.wass.models if self.wass is not None else []
        global_models = self.probe.global_models if self.probe is not None else []
        idx = torch.tensor(models, device=self.device)

        def pick(xs: list) -> list:
            return [xs[m] for m in models]

        def rows(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t[idx] for t in ts]

        def subset_rows(t: torch.Tensor, of: list[int]) -> torch.Tensor:   # t's rows: the models `of`, in order
            return t[[of.index(m) for m in models if m in of]]
        self.__init__(pick(self.cfgs), self.device, pick(self.metas), pick(self.out_dirs))
        s.update(params=rows(s["params"]), buffers=rows(s["buffers"]), records=pick(s["records"]),
                 rule_counts=pick(s["rule_counts"]), alive=pick(s["alive"]),
                 adam={k: rows(v) if isinstance(v, list) else v[idx] for k, v in s["adam"].items()})
        if s["wass"] is not None:
            s["wass"] = [subset_rows(t, wass_models) for t in s["wass"]]
        if s["probe"] is not None:
            p = s["probe"]
            s["probe"] = dict(vecs=rows(p["vecs"]), has_vec=p["has_vec"][models], generators=pick(p["generators"]),
                              global_vecs=subset_rows(p["global_vecs"], global_models))
            columns = self.sched.values.shape[1]   # the whole network's column goes when no survivor has it
            s["sched"] = {k: v[models][:, :columns] for k, v in s["sched"].items()}   # host tensors
        self.load_state_dict(s)

    def _run(self, m: int) -> dict:
        """Model m's record and what finish needs to write it and replay it into W&B."""
        rules = {str(k): v for k, v in self.rule_counts[m].items()} if self.measuring_m[m] else None
        return dict(record=self.records[m], rule_counts=rules, cfg=self.cfgs[m], meta=self.metas[m],
                    out_dir=self.out_dirs[m])

    def finish(self, completed: bool) -> None:
        """Write every record, the stack's and those of the runs that left it, and replay each into W&B."""
        if not completed:
            return
        for run in self.left + [self._run(m) for m in range(self.M)]:
            finish_record(run["record"], run["out_dir"] / RECORD_NAME, run["rule_counts"])
            log_to_wandb(run["record"], run["cfg"], run["meta"])


def run_batched(cfgs: list[dict], out_dirs: list, *, metas: list[dict] | None = None, resume: bool = True,
                progress: bool = True, stop_after_task: int | None = None) -> list[dict]:
    """Train the runs `cfgs` as one batched model; write each record to its out_dir (the layout of
    train.run) and return the records. `stop_after_task` simulates an interruption (resume test)."""
    cfgs = [config.validate_run(c) for c in cfgs]
    check_batchable(cfgs)
    out_dirs = [Path(d) for d in out_dirs]
    hashes = [config.config_hash(c) for c in cfgs]
    if resume:
        done = [finished_record(d / RECORD_NAME, h) for d, h in zip(out_dirs, hashes)]
        if all(r is not None for r in done):
            return done
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
    engine = BatchedRuns(cfgs, setup_device(cfgs[0]), metas or [{} for _ in cfgs], out_dirs)
    train_stream(engine, cfgs[0], out_dirs[0] / ("batched-" + CHECKPOINT_NAME), [CHECKPOINT_FORMAT, *hashes],
                 resume=resume, progress=progress, desc=f"batched x{len(cfgs)}", stop_after_task=stop_after_task)
    # the models still in the engine, and those that left it when their runs ended
    mine = dict(zip(engine.out_dirs, engine.records)) | {run["out_dir"]: run["record"] for run in engine.left}
    return [mine[d] for d in out_dirs]


def log_to_wandb(rec: dict, cfg: dict, meta: dict) -> None:
    """Replay a finished record into W&B (one W&B run per model, as train.run logs)."""
    logger = _wandb_logger(cfg, meta)
    if logger.run is None:
        return
    d = rec["decisions"]
    if cfg["wandb"]["log_decisions"]:
        for i, s in enumerate(d["step"]):
            logger.log({f"layer{l}/{k}": v[i] for l, series in d["layers"].items() for k, v in series.items()
                        if k != "rule"}, step=s)
    step = 0
    for tr in rec["tasks"]:
        step += tr["steps"]
        logger.log(task_metrics(tr), step=step)
    logger.summary(dict(run_summary(rec), batched=True))
    logger.finish(exit_code=0 if rec["status"] == "completed" else 1)


def build_parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m trainability.batched",
        description="Train several runs x seeds as one batched model (same architecture and stream; the task "
                    "lengths may differ) and write each run's record.json where trainability-run would.",
        epilog="example: python -m trainability.batched --scale smoke --runs l2-vanilla l2-scheduled --seeds 0 1")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--scale", default=None, help="entry of `scales` (default: params.yaml's `scale`)")
    p.add_argument("--runs", nargs="+", required=True, help="entries of `runs` in params.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the scale's seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every run config (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints/records")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check that the runs can be batched, print the plan")
    return p


def main(argv=None) -> int:
    from .pipeline import run_dir
    args = build_parser().parse_args(argv)
    try:
        params, scale = config.params_and_scale(args.params, args.scale)
        seeds = args.seeds or params["scales"][scale]["seeds"]
        jobs = [(r, s) for r in args.runs for s in seeds]
        cfgs = [config.resolve_with_sets(params, scale, r, s, args.set) for r, s in jobs]
        check_batchable(cfgs)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dirs = [run_dir(params, scale, r, s) for r, s in jobs]
    if args.dry_run:
        print(f"{len(jobs)} models in one batch on {pick_device(cfgs[0]['device'])}:")
        for (r, s), d in zip(jobs, dirs):
            print(f"  {r} seed {s} -> {d}/{RECORD_NAME}")
        phases = stack_phases(cfgs)
        if len(phases) > 1:   # task lengths differ: the stack sheds the shorter ones' runs as they end
            print("the stack: " + ", then ".join(f"{len(m)} models for {e} epochs" for m, e, _ in phases))
        return 0
    recs = run_batched(cfgs, dirs, metas=[{"run": r, "scale": scale} for r, _ in jobs], resume=not args.fresh,
                       progress=not args.no_progress)
    for (r, s), rec in zip(jobs, recs):
        accs = " ".join(f"{t['online_acc']:.3f}" for t in rec["tasks"])
        print(f"{r} seed {s}: {rec['status']}; online acc per task {accs}")
    return 0 if all(r["status"] in ("completed", "diverged") for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
