"""Measurements (paper Sec. 3-4) against brute force on small float64 networks: per-example variance vs a
loop of per-example backward passes, layer-block eigenvalues vs eigvalsh of the exact Hessian block,
the warm-started solver vs the authors' 100-iteration cold power iteration, Adam's effective step vs
a hand computation, the probe's bookkeeping, and the indicators on constructed cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainability import eigen, indicators, measure
from trainability.models import MLP
from trainability.regularizers import WassersteinPenalty


def small(activation="relu", widths=(5, 4), d_in=6, n_classes=3, batchnorm=False, seed=0):
    torch.manual_seed(seed)
    return MLP(d_in, widths, n_classes, activation=activation, rho=0.3, batchnorm=batchnorm).double()


def data(n=8, d_in=6, n_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, n_classes, (n,), generator=g)


def layers(model):
    return {l: model.layer_params(l) for l in range(1, model.n_layers + 1)}


def flat_grad(loss, params, **kw):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, **kw)])


def block_hessian(model, x, y, params):
    """Exact Hessian of the CE loss w.r.t. `params` (one block) via torch.autograd.functional.hessian."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys, shapes, sizes = [names[id(p)] for p in params], [p.shape for p in params], [p.numel() for p in params]

    def f(flat):
        sub = {k: c.view(s) for k, c, s in zip(keys, flat.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, sub, (x,)), y)
    return torch.autograd.functional.hessian(f, torch.cat([p.detach().reshape(-1) for p in params]))


def max_mag(evals):
    return evals[evals.abs().argmax()].item()


# ----------------------------------------------------------------------------- per-example variance
@pytest.mark.parametrize("activation", ["relu", "crelu", "leaky_relu"])
def test_per_example_variance_matches_a_loop_of_backward_passes(activation):
    model = small(activation)
    x, y = data()
    B = len(x)
    reg = WassersteinPenalty(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))      # make the regulariser's gradient non-zero
    probe = measure.LayerProbe(model)
    with probe.capture():
        loss = F.cross_entropy(model(x), y) + reg(model)   # the regulariser must be excluded
        loss.backward()
    stats = probe.per_example_stats(B)
    for l in range(1, model.n_layers + 1):
        params = model.layer_params(l)
        G = torch.stack([flat_grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params) for i in range(B)])
        gbar = G.mean(0)
        want = (G - gbar).pow(2).sum(1).mean().item()
        assert stats[l][0] == pytest.approx(want, rel=1e-10)
        assert stats[l][1] == pytest.approx(gbar.pow(2).sum().item(), rel=1e-10)
        assert probe.per_example_variance(B)[l] == stats[l][0]


def test_probe_hooks_exist_only_inside_capture():
    model = small()
    x, y = data()
    probe = measure.LayerProbe(model)
    with probe.capture():
        assert all(len(lin._forward_hooks) == 1 for lin in model.linears)
        F.cross_entropy(model(x), y).backward()
    assert all(len(lin._forward_hooks) == 0 for lin in model.linears)
    with pytest.raises(RuntimeError):
        measure.LayerProbe(model).per_example_variance(len(x))


# ----------------------------------------------------------------------------- eigenvalues
def trained_small(steps=30, seed=0, **kw):
    """A small network a few Adam steps into training (non-trivial, indefinite hidden blocks)."""
    model = small(seed=seed, **kw)
    x, y = data(n=16)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_layer_block_eigenvalue_matches_exact_hessian_block():
    model, x, y = trained_small()
    P = layers(model)
    loss = F.cross_entropy(model(x), y)
    H = {l: block_hessian(model, x, y, P[l]) for l in P}
    exact = {l: max_mag(torch.linalg.eigvalsh(H[l])) for l in P}
    gen = torch.Generator().manual_seed(0)
    # Lanczos over the whole block dimension spans the space: exact
    full, vecs, _ = eigen.layer_top_eigenvalues(loss, P, tol=0.0, max_iter=100, generator=gen)
    # default tolerance, and the authors' 100 cold power iterations
    fast, _, iters = eigen.layer_top_eigenvalues(loss, P, generator=gen)
    power, _, _ = eigen.layer_top_eigenvalues(loss, P, tol=0.0, max_iter=100, generator=gen, method="power")
    for l in P:
        assert full[l] == pytest.approx(exact[l], rel=1e-8)
        assert fast[l] == pytest.approx(exact[l], rel=1e-2) and iters[l] < 100
        assert power[l] == pytest.approx(exact[l], rel=1e-6)
        assert vecs[l].norm().item() == pytest.approx(1.0)
        assert (H[l] @ vecs[l]).sub(exact[l] * vecs[l]).norm().item() < 1e-6   # an eigenvector
    # Adam's coupled L2 adds wd I to every block
    shifted, _, _ = eigen.layer_top_eigenvalues(F.cross_entropy(model(x), y), P, tol=0.0, max_iter=100,
                                            weight_decay=0.1)
    for l in P:
        want = max_mag(torch.linalg.eigvalsh(H[l] + 0.1 * torch.eye(len(H[l]), dtype=H[l].dtype)))
        assert shifted[l] == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_solvers_return_the_signed_largest_magnitude_eigenvalue(method):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.tensor([-3.0, 2.0]), torch.linspace(-1, 1, 28)]).double()
    A = Q @ torch.diag(evals) @ Q.t()
    v = torch.randn(30, generator=g, dtype=torch.float64)
    e, vec, it = eigen.SOLVERS[method](lambda u: A @ u, v / v.norm(), 1e-10, 300)
    assert e == pytest.approx(-3.0, rel=1e-6) and abs(torch.dot(vec, Q[:, 0]).item()) == pytest.approx(1, rel=1e-5)
    # a zero block and a NaN block (diverged run) neither raise nor loop forever
    e0, _, _ = eigen.SOLVERS[method](lambda u: 0 * u, v / v.norm(), 1e-3, 100)
    assert e0 == 0.0
    en, _, itn = eigen.SOLVERS[method](lambda u: u * math.nan, v / v.norm(), 1e-3, 100)
    assert math.isnan(en) and itn == 1


def test_full_top_eigenvalue_matches_exact_hessian():
    model, x, y = trained_small()
    params = list(model.parameters())
    exact = max_mag(torch.linalg.eigvalsh(block_hessian(model, x, y, params)))
    e, v, it = eigen.full_top_eigenvalue(F.cross_entropy(model(x), y), params, tol=0.0, max_iter=300)
    assert e == pytest.approx(exact, rel=1e-8) and v.numel() == sum(p.numel() for p in params)


def test_power_iteration_cold_runs_exactly_max_iter_and_tolerance_stops_early():
    model, x, y = trained_small()
    P = layers(model)
    loss = F.cross_entropy(model(x), y)
    _, _, cold = eigen.layer_top_eigenvalues(loss, P, tol=0.0, max_iter=100, method="power")
    _, _, tol = eigen.layer_top_eigenvalues(loss, P, tol=1e-3, max_iter=100, method="power")
    assert all(cold[l] == 100 for l in P) and all(2 <= tol[l] < 100 for l in P)


def test_warm_started_solver_tracks_the_cold_100_iteration_estimate_during_training():
    """The probe's warm-started Lanczos (tol 1e-3) vs the authors' 100 cold power iterations, at
    decisions spaced by Adam steps: within 2% (docs/METHOD.md §6 [choice]), with far fewer products."""
    model = small(widths=(16, 16), d_in=12, n_classes=5)
    x, y = data(n=64, d_in=12, n_classes=5)
    opt = torch.optim.Adam(M_groups(model), lr=1e-2)
    probe = measure.DecisionProbe(model, opt, len(x))
    P = layers(model)
    for decision in range(6):
        for _ in range(10):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        opt.zero_grad()
        with probe.capture():
            F.cross_entropy(model(x), y).backward()
        m = probe.measure(lambda: F.cross_entropy(model(x), y))
        cold, _, _ = eigen.layer_top_eigenvalues(F.cross_entropy(model(x), y), P, tol=0.0, max_iter=100,
                                             generator=torch.Generator().manual_seed(decision),
                                             method="power")
        for l in P:
            assert m[l]["lam_max"] == pytest.approx(cold[l], rel=0.02)
            if decision > 0:   # warm start
                assert m[l]["eig_iters"] <= 20


# ----------------------------------------------------------------------------- Adam effective step
def M_groups(model, lr=1e-2, wd=0.0):
    return [{"params": model.layer_params(l), "lr": lr * l, "weight_decay": wd, "layer": l}
            for l in range(1, model.n_layers + 1)]


def test_adam_effective_step_by_hand_after_three_steps():
    model = small()
    x, y = data()
    b1, b2, eps = 0.8, 0.9, 1e-8
    opt = torch.optim.Adam(M_groups(model), betas=(b1, b2), eps=eps)
    assert math.isnan(measure.adam_effective_step(opt, opt.param_groups[0]))
    assert math.isnan(measure.adam_alpha_agg(opt, opt.param_groups[0]))
    v = {id(p): torch.zeros_like(p) for p in model.parameters()}
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for p in model.parameters():       # Adam's second moment, by hand
            v[id(p)] = b2 * v[id(p)] + (1 - b2) * p.grad ** 2
        opt.step()
    k = 3
    total_all, n_all = 0.0, 0
    for g in opt.param_groups:
        W = g["params"][0]                  # the weight; the bias is skipped
        v_hat = v[id(W)] / (1 - b2 ** k)
        rms = v_hat.mean().sqrt().item()
        total_all, n_all = total_all + v_hat.sum().item(), n_all + W.numel()
        assert measure.adam_effective_step(opt, g) == pytest.approx(g["lr"] / ((1 - b1 ** k) * (rms + eps)), rel=1e-9)
        assert measure.adam_alpha_agg(opt, g) == pytest.approx(g["lr"] / (rms + eps), rel=1e-9)
    lr0 = opt.param_groups[0]["lr"]
    raw = sum(t.sum().item() for t in v.values())            # no bias correction, biases included [code]
    n_params = sum(p.numel() for p in model.parameters())
    for g in opt.param_groups:   # the authors' form: global RMS of raw v, first group's LR, every layer
        assert measure.adam_alpha_agg(opt, g, code_form=True) == pytest.approx(
            lr0 / (math.sqrt(raw / n_params) + eps), rel=1e-9)
    glob_alpha, glob_agg = measure._global_effective_step(opt)     # the global variant keeps v_hat over weights
    assert glob_agg == pytest.approx(lr0 / (math.sqrt(total_all / n_all) + eps), rel=1e-9)


# ----------------------------------------------------------------------------- the decision probe
def decision(model, opt, probe, x, y, reg=None):
    def closure():
        loss = F.cross_entropy(model(x), y)
        return loss + reg(model) if reg is not None else loss
    opt.zero_grad()
    with probe.capture():
        closure().backward()
    return probe.measure(closure)


def test_decision_probe_reports_every_quantity_at_the_gradient_parameters():
    model = small()
    x, y = data()
    reg = WassersteinPenalty(model, 0.1)
    wd = 0.01
    opt = torch.optim.Adam(M_groups(model, wd=wd))
    probe = measure.DecisionProbe(model, opt, len(x), global_too=True)
    for _ in range(2):
        decision(model, opt, probe, x, y, reg)
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    m = decision(model, opt, probe, x, y, reg)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))   # measure never steps
    loss = F.cross_entropy(model(x), y) + reg(model)
    P = layers(model)
    eig, _, _ = eigen.layer_top_eigenvalues(loss, P, tol=0.0, max_iter=200, weight_decay=wd)
    var = probe.layer_probe.per_example_variance(len(x))
    for g in opt.param_groups:
        l = g["layer"]
        want = sum((p.grad + wd * p).pow(2).sum().item() for p in P[l])   # regulariser and L2 included
        assert m[l]["grad_sq"] == pytest.approx(want, rel=1e-12)
        assert m[l]["sigma2_ps"] == var[l]
        assert m[l]["lam_max"] == pytest.approx(eig[l], rel=1e-3)
        assert m[l]["alpha"] == measure.adam_effective_step(opt, g)
        assert m[l]["alpha_agg"] == measure.adam_alpha_agg(opt, g)
        assert m[l]["eig_iters"] >= 2
    glob = m["global"]
    assert {m[l]["batch_size"] for l in m} == {len(x)}
    assert glob["grad_sq"] == pytest.approx(sum(m[l]["grad_sq"] for l in P))
    assert glob["sigma2_ps"] == pytest.approx(sum(m[l]["sigma2_ps"] for l in P))
    full, _, _ = eigen.full_top_eigenvalue(F.cross_entropy(model(x), y) + reg(model), list(model.parameters()),
                                       tol=0.0, max_iter=300, weight_decay=wd)
    assert glob["lam_max"] == pytest.approx(full, rel=1e-3)
    assert math.isfinite(glob["alpha"]) and math.isfinite(glob["alpha_agg"])


def test_decision_probe_state_round_trip_resumes_exactly():
    def setup():
        model = small()
        return model, torch.optim.Adam(M_groups(model))
    x, y = data()
    m1, o1 = setup()
    p1 = measure.DecisionProbe(m1, o1, len(x), seed=3)
    decision(m1, o1, p1, x, y)
    o1.step()
    m2, o2 = setup()
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(o1.state_dict())
    p2 = measure.DecisionProbe(m2, o2, len(x), seed=99)
    p2.load_state_dict(p1.state_dict())
    a, b = decision(m1, o1, p1, x, y), decision(m2, o2, p2, x, y)
    assert a == b


def test_decision_probe_leaves_batchnorm_statistics_as_one_step_would():
    model = small(batchnorm=True)
    x, y = data()
    opt = torch.optim.Adam(M_groups(model))
    probe = measure.DecisionProbe(model, opt, len(x))
    opt.zero_grad()
    with probe.capture():
        F.cross_entropy(model(x), y).backward()
    after_step = [b.clone() for b in model.buffers()]
    m = probe.measure(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(after_step, model.buffers()))
    assert all(math.isfinite(m[l]["lam_max"]) for l in (1, 2, 3))


# ----------------------------------------------------------------------------- indicators
def per_example_grads_loop(model, x, y):
    params = list(model.parameters())
    return torch.stack([flat_grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params) for i in range(len(x))])


def rank_of(G, mass=0.99):
    s = torch.linalg.svdvals(G @ G.t())
    cum = torch.cumsum(s, 0) / s.sum()
    return (int((cum < mass).sum()) + 1) / len(G)


def test_hessian_rank_matches_brute_force_and_constructed_cases():
    model, _, _ = trained_small()
    x, y = data(n=20, seed=5)
    assert indicators.hessian_rank(model, x, y) == pytest.approx(rank_of(per_example_grads_loop(model, x, y)))
    # 20 copies of one example: rank 1 -> 1/20
    assert indicators.hessian_rank(model, x[:1].repeat(20, 1), y[:1].repeat(20)) == pytest.approx(1 / 20)
    # 3 distinct examples, repeated: at most 3 of 12
    idx = torch.arange(12) % 3
    assert indicators.hessian_rank(model, x[idx], y[idx]) <= 3 / 12
    # BatchNorm: evaluated in eval mode, training mode restored
    bn = small(batchnorm=True)
    r = indicators.hessian_rank(bn, x, y)
    assert 0 < r <= 1 and bn.training


def test_unit_sign_entropy_on_hand_numbers():
    pre = torch.tensor([[1.0, -1.0, 0.0], [2.0, -3.0, 1.0], [-1.0, -2.0, 0.5], [3.0, -1.0, -2.0]])
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))   # 3 of 4 positive
    h3 = math.log(2)                                         # 2 of 4 positive (0 is not > 0)
    assert indicators.unit_sign_entropy(pre) == pytest.approx((h1 + 0.0 + h3) / 3)


def test_effective_rank_of_rank_k_matrices():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    for k in (1, 3, 7):
        A = U[:, :k] @ V[:, :k].t() * 2.5          # k equal singular values
        assert indicators.effective_rank(A) == pytest.approx(k, rel=1e-9)
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    A = U[:, :2] @ torch.diag(s) @ V[:, :2].t()
    p = s / s.sum()
    assert indicators.effective_rank(A) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert indicators.effective_rank(torch.zeros(4, 3)) == 0.0


def test_dead_fraction_and_norms_on_hand_numbers():
    post = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    assert indicators.dead_fraction(post) == 0.5
    model = small()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-2.0)
    assert indicators.weight_norm(model) == 2.0
    grads = [torch.full_like(p, 0.5) for p in model.parameters()]
    assert indicators.grad_norm(model, grads) == 0.5 and indicators.grad_param_ratio(model, grads) == 0.25


def test_compute_indicators_leaves_gradients_and_statistics_untouched():
    model = small(batchnorm=True)
    x, y = data(n=16)
    reg = WassersteinPenalty(model, 0.1)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    bufs = [b.clone() for b in model.buffers()]
    ind = indicators.compute_indicators(model, x, y, x[:10], y[:10], reg, weight_decay=0.01)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    assert set(ind) >= {"hessian_rank", "unit_sign_entropy", "sharpness", "weight_norm", "grad_norm",
                        "grad_param_ratio", "effective_rank", "dead_fraction"}
    assert all(math.isfinite(v) for v in ind.values())
    with measure.buffers_kept(model):
        want, _, _ = eigen.full_top_eigenvalue(indicators.objective(model, x, y, reg, 0.01), list(model.parameters()),
                                           tol=0.0, max_iter=300)
    assert ind["sharpness"] == pytest.approx(want, rel=1e-2)
    assert indicators.sharpness(model, x, y, reg, 0.01) == ind["sharpness"]
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))


def test_a_partial_minibatch_is_measured_at_its_own_size():
    """An epoch's last partial minibatch (stream.drop_last false): the per-example variance and the
    scheduler's B are that minibatch's size, not the configured batch size (the authors' B = inputs.size(0))."""
    model = small()
    x, y = data()
    b = len(x) - 3
    opt = torch.optim.Adam(M_groups(model))
    probe = measure.DecisionProbe(model, opt, batch_size=len(x))      # configured B
    decision(model, opt, probe, x, y, None)
    opt.step()
    m = decision(model, opt, probe, x[:b], y[:b], None)
    assert m[1]["batch_size"] == b
    assert m[1]["sigma2_ps"] == probe.layer_probe.per_example_variance(b)[1]
    from trainability.scheduler import NoiseCurvatureScheduler
    row = NoiseCurvatureScheduler(opt, len(x), act=False, bound="noise").step(m, 0.5)[1]
    assert row["alpha_g"] == pytest.approx(b * m[1]["grad_sq"] / m[1]["sigma2_ps"], rel=1e-12)
