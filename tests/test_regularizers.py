"""The baselines' regularisers (docs/METHOD.md §3): Wasserstein-to-init (value and gradient by hand) and
coupled L2 = Adam weight_decay."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainability.models import build_model, param_groups
from trainability.regularizers import WassersteinPenalty, adam_weight_decay, build_regularizer, hessian_shift


class Tiny(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))


def test_wasserstein_by_hand():
    m = Tiny([3.0, 1.0, 2.0], [0.0, 1.0])
    pen = WassersteinPenalty(m, lam=0.1)
    assert pen(m).item() == 0.0
    with torch.no_grad():
        m.w.copy_(torch.tensor([0.5, 2.5, 1.0]))
    # sort(p) = [0.5, 1.0, 2.5], sort(p0) = [1, 2, 3] -> differences [-0.5, -1.0, -0.5]
    r = pen(m)
    torch.testing.assert_close(r, torch.tensor(0.1 * (0.25 + 1.0 + 0.25)))
    r.backward()
    # d/dp_i = 2 lam (p_i - p0_(rank of p_i)): p[0]=0.5 rank 0, p[1]=2.5 rank 2, p[2]=1.0 rank 1
    torch.testing.assert_close(m.w.grad, torch.tensor([2 * 0.1 * -0.5, 2 * 0.1 * -0.5, 2 * 0.1 * -1.0]))
    torch.testing.assert_close(m.b.grad, torch.zeros(2))


def test_wasserstein_bias_included_and_permutation_invariant():
    m = Tiny([[3.0, 1.0], [2.0, 0.0]], [0.0, 1.0])
    pen = WassersteinPenalty(m, lam=1.0)
    with torch.no_grad():
        m.b.copy_(torch.tensor([1.0, 0.0]))        # a permutation of the init: same distribution
        m.w.copy_(torch.tensor([[0.0, 2.0], [3.0, 1.0]]))
    assert pen(m).item() == 0.0
    with torch.no_grad():
        m.b.copy_(torch.tensor([4.0, -1.0]))       # sorted [-1, 4] vs [0, 1]: 1 + 9
    torch.testing.assert_close(pen(m), torch.tensor(10.0))
    m.zero_grad()
    pen(m).backward()
    torch.testing.assert_close(m.b.grad, torch.tensor([2 * 3.0, 2 * -1.0]))


def test_wasserstein_matches_loop_on_mlp_and_scales_with_lambda():
    torch.manual_seed(0)
    m = build_model({"activation": "relu", "widths": [16, 8], "batchnorm": True}, input_dim=12)
    p0 = [p.detach().clone() for p in m.parameters()]
    pen1, pen3 = WassersteinPenalty(m, 1e-3), WassersteinPenalty(m, 3e-3)
    assert pen1(m).item() == 0.0
    m.zero_grad()
    pen1(m).backward()
    assert all(torch.all(p.grad == 0) for p in m.parameters())   # zero gradient at init
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    ref = sum(((p.detach().flatten().sort().values - q.flatten().sort().values) ** 2).sum()
              for p, q in zip(m.parameters(), p0))
    torch.testing.assert_close(pen1(m), 1e-3 * ref)
    torch.testing.assert_close(pen3(m), 3 * pen1(m))
    assert len(pen1.sorted_init) == len(p0) == 10  # 3 linears (w, b) + 2 BN (w, b)


def test_wasserstein_state_dict_and_reset():
    torch.manual_seed(0)
    m = build_model({"widths": [8], "n_classes": 3}, input_dim=4)
    pen = WassersteinPenalty(m, 0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5).add_(0.1)
    value = pen(m)
    buf = io.BytesIO()
    torch.save(pen.state_dict(), buf)
    buf.seek(0)
    other = WassersteinPenalty(m, 0.0)               # captures the moved parameters as its "init"
    assert other(m).item() == 0.0
    other.load_state_dict(torch.load(buf))
    assert other.lam == 0.5
    torch.testing.assert_close(other(m), value)
    pen.reset(m)                                      # reset arm: the current parameters are the new init
    assert pen(m).item() == 0.0
    with pytest.raises(ValueError):
        other.load_state_dict(WassersteinPenalty(build_model({"widths": [9]}, input_dim=4), 1.0).state_dict())


def test_the_wasserstein_penaltys_hessian_is_2_lam_identity():
    """hessian_shift's claim, checked by autograd: the penalty's Hessian-vector product (through the sort,
    twice) is 2 lam v, to the bit (x2 is exact), on an MLP moved away from its start so that the sort's
    permutation is not the identity; and coupled L2's shift is its lam (Adam's weight_decay)."""
    torch.manual_seed(0)
    m = build_model({"widths": [6, 5]}, input_dim=4)
    cfg = {"kind": "wasserstein", "lam": 3e-3}
    pen = build_regularizer(cfg, m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = list(m.parameters())
    grads = torch.autograd.grad(pen(m), params, create_graph=True)
    vs = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, grad_outputs=vs)
    assert pen(m) > 0
    assert all(torch.equal(h, hessian_shift(cfg) * v) for h, v in zip(hv, vs))
    assert hessian_shift(cfg) == 6e-3
    assert hessian_shift({"kind": "l2", "lam": 1e-3}) == adam_weight_decay({"kind": "l2", "lam": 1e-3}) == 1e-3
    assert hessian_shift({"kind": "none", "lam": 5.0}) == 0.0


def test_build_regularizer_and_adam_weight_decay():
    m = build_model({"widths": [4]}, input_dim=3)
    assert build_regularizer({"kind": "none", "lam": 0.0}, m) is None
    assert build_regularizer({"kind": "l2", "lam": 1e-3}, m) is None
    w = build_regularizer({"kind": "wasserstein", "lam": 1e-3}, m)
    assert isinstance(w, WassersteinPenalty) and w.lam == 1e-3
    assert adam_weight_decay({"kind": "l2", "lam": 1e-3}) == 1e-3
    assert adam_weight_decay({"kind": "wasserstein", "lam": 1e-3}) == 0.0
    assert adam_weight_decay({"kind": "none", "lam": 5.0}) == 0.0
    with pytest.raises(ValueError):
        build_regularizer({"kind": "l1", "lam": 1.0}, m)


def _trajectory(decay_in_adam: bool, lam: float, opt_cls=torch.optim.Adam):
    torch.manual_seed(0)
    m = build_model({"widths": [6], "n_classes": 3}, input_dim=5)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    wd = lam if decay_in_adam else 0.0
    opt = opt_cls(param_groups(m, 1e-2, weight_decay=wd), betas=(0.9, 0.999), eps=1e-8)
    out = []
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        if not decay_in_adam:
            for p in m.parameters():
                p.grad.add_(p.detach(), alpha=lam)   # coupled L2 by hand: grad + lam * theta
        opt.step()
        out.append([p.detach().clone() for p in m.parameters()])
    return out


def test_coupled_l2_is_adam_weight_decay():
    lam = 0.1
    a, b = _trajectory(True, lam), _trajectory(False, lam)
    for step_a, step_b in zip(a, b):
        for pa, pb in zip(step_a, step_b):
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
    # the test can tell coupled from decoupled (AdamW) decay and from no decay at all
    c, d = _trajectory(True, lam, torch.optim.AdamW), _trajectory(False, 0.0)
    assert any(not torch.allclose(pa, pc, atol=1e-5) for pa, pc in zip(a[-1], c[-1]))
    assert any(not torch.allclose(pa, pd, atol=1e-5) for pa, pd in zip(a[-1], d[-1]))
