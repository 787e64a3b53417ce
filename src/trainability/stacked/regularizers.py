"""regularizers.WassersteinPenalty on the stacked model (coupled L2 is StackedAdam's weight decay)."""
from __future__ import annotations

import torch

from ..regularizers import WassersteinPenalty
from .model import StackedMLP


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
