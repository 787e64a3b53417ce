"""The stacked model: the MLPs of models.MLP for M runs as one set of tensors with a leading model
dimension (every layer one batched matmul), and the activations written for the stack."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from ..models import activation_fn, build_model, crelu, negative_slope


def model_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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
            slopes = [negative_slope(m.activation, m.rho) for m in models]
            self.slope = torch.tensor(slopes, device=device).view(-1, 1, 1)
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


def clear_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


@torch.no_grad()
def evaluate_stack(net: StackedMLP, xs, ys, sidx, chunk: int = 2048):
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
