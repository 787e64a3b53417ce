"""The MLPs of the paper (Sec. 5, Fig. 1; docs/METHOD.md §2): 784 -> 256 -> 256 -> 10 with ReLU, CReLU,
LeakyReLU(rho), identity, or Linear -> BatchNorm1d -> activation. Layers are numbered 1..L; the output layer
is L (the paper's layer 3). Each layer gets its own Adam parameter group (`param_groups`) so the scheduler of
Algorithm 1 can give it its own learning rate.

Init [code]: `nn.init.kaiming_uniform_(w, nonlinearity="relu")`, i.e. U(-b, b) with
b = gain * sqrt(3 / fan_in) = sqrt(6 / fan_in) (gain sqrt(2), fan_in = the Linear's input width, so 512
for the layers after a CReLU); every bias is zero. BatchNorm keeps PyTorch's init (weight 1, bias 0).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("relu", "crelu", "leaky_relu", "identity")


def crelu(z: torch.Tensor) -> torch.Tensor:
    """Concatenated ReLU: cat(relu(z), relu(-z)) along features (width doubles)."""
    return torch.cat((F.relu(z), F.relu(-z)), dim=-1)


def identity(z: torch.Tensor) -> torch.Tensor:
    return z


def activation_fn(name: str, rho: float = 0.0):
    """The activation as a module-level function / partial (picklable, no per-call branching)."""
    if name == "relu":
        return F.relu
    if name == "crelu":
        return crelu
    if name == "leaky_relu":
        return functools.partial(F.leaky_relu, negative_slope=float(rho))
    if name == "identity":
        return identity
    raise ValueError(f"model.activation: unknown {name!r}; one of {ACTIVATIONS}")


def negative_slope(name: str, rho: float = 0.0) -> float | None:
    """The activation as a LeakyReLU slope: relu 0, identity 1, leaky_relu rho; None for crelu (it changes
    the layer shapes). Lets one stacked model give each of its models its own activation."""
    return {"relu": 0.0, "identity": 1.0, "leaky_relu": float(rho)}.get(name)


class MLP(nn.Module):
    """MLP with `linears` (layer 1..L, `nn.ModuleList`) and `bns` (one BatchNorm1d per hidden layer, or
    empty). `rho` is the LeakyReLU negative slope (ignored by the other activations)."""

    def __init__(self, input_dim: int = 784, widths=(256, 256), n_classes: int = 10,
                 activation: str = "relu", rho: float = 0.0, batchnorm: bool = False):
        super().__init__()
        self.activation, self.rho = activation, float(rho)
        self.act = activation_fn(activation, rho)
        widen = 2 if activation == "crelu" else 1   # CReLU doubles what the next layer sees
        fan_ins = [input_dim] + [w * widen for w in widths]
        outs = list(widths) + [n_classes]
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in zip(fan_ins, outs))
        self.bns = nn.ModuleList(nn.BatchNorm1d(w) for w in widths) if batchnorm else nn.ModuleList()
        for lin in self.linears:
            nn.init.kaiming_uniform_(lin.weight, nonlinearity="relu")  # bound sqrt(6 / fan_in) [code]
            nn.init.zeros_(lin.bias)                                    # [paper, code]
        self._n_hidden = len(widths)

    @property
    def n_layers(self) -> int:
        return len(self.linears)

    def layer_params(self, l: int) -> list[nn.Parameter]:
        """Parameters of layer l (1-indexed): Linear weight and bias, then its BatchNorm's weight and bias."""
        if not 1 <= l <= self.n_layers:
            raise IndexError(f"layer {l} not in 1..{self.n_layers}")
        params = [self.linears[l - 1].weight, self.linears[l - 1].bias]
        if len(self.bns) and l <= self._n_hidden:
            params += [self.bns[l - 1].weight, self.bns[l - 1].bias]
        return params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # hot path: index the ModuleLists (slicing one builds a new ModuleList on every call)
        lins, bns, act = self.linears, self.bns, self.act
        for i in range(self._n_hidden):
            z = lins[i](x)
            if len(bns):
                z = bns[i](z)
            x = act(z)
        return lins[self._n_hidden](x)

    def forward_with_hidden(self, x: torch.Tensor):
        """(logits, pre, post): pre[i] = pre-activation of hidden layer i+1 (after BN, if any),
        post[i] = its activation output (2x wide for CReLU). Same computation as `forward`."""
        pre, post = [], []
        for i in range(self._n_hidden):
            z = self.linears[i](x)
            if len(self.bns):
                z = self.bns[i](z)
            x = self.act(z)
            pre.append(z)
            post.append(x)
        return self.linears[self._n_hidden](x), pre, post


MODEL_KEYS = {"activation", "rho", "widths", "batchnorm", "n_classes"}


def build_model(cfg: dict, input_dim: int = 784) -> MLP:
    """cfg = params.yaml `model` block: {activation, rho, widths, batchnorm[, n_classes]}; `input_dim` is
    the stream's (streams.input_dim)."""
    unknown = sorted(set(cfg) - MODEL_KEYS)
    if unknown:  # a misspelt or misplaced key would otherwise be silently ignored
        raise ValueError(f"model: unknown key(s) {unknown}; expected some of {sorted(MODEL_KEYS)}")
    return MLP(input_dim=input_dim, widths=tuple(cfg.get("widths", (256, 256))),
               n_classes=cfg.get("n_classes", 10), activation=cfg.get("activation", "relu"),
               rho=cfg.get("rho", 0.0), batchnorm=cfg.get("batchnorm", False))


def param_groups(model: MLP, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """One Adam parameter group per layer (docs/METHOD.md §2), tagged `"layer": l` (1-indexed). `weight_decay` is
    Adam's coupled L2 (docs/METHOD.md §3; see regularizers.adam_weight_decay)."""
    return [{"params": model.layer_params(l), "lr": lr, "weight_decay": weight_decay, "layer": l}
            for l in range(1, model.n_layers + 1)]
