"""The bounds of the paper's Sec. 4 (Eqs. 1-3, A.3, A.5) on hand-made numbers, the volatility window against numpy,
the curvature statistics, and zero-denominator safety."""
import math

import numpy as np
import pytest
import torch

from trainability import bounds


def test_noise_bound_by_hand():
    assert bounds.alpha_g(2.0, 8.0, 256) == 256 * 2.0 / 8.0
    assert bounds.alpha_g(0.0, 8.0, 4) == 0.0


def test_volatility_tau_and_cantelli_by_hand():
    assert bounds.alpha_vol(0.5) == 2.0 and bounds.alpha_vol(0.5, kappa=4.0) == 0.5
    assert bounds.tau(1.0, 3.0) == 2 * 1.0 / (1.0 + 3.0)
    assert bounds.tau(2.0, 0.0) == pytest.approx(1.0)          # no volatility: the classic 2 / lambda
    # Eq. A.5: 2 / (mu + sigma sqrt((1 - delta) / delta)); delta = 0.2 -> sqrt(4) = 2
    assert bounds.cantelli_cap(1.0, 4.0, 0.2) == pytest.approx(2 / (1 + 2 * 2))
    assert bounds.cantelli_cap(1.0, 4.0, 1.0) == pytest.approx(2.0)   # delta = 1: no tail margin


def test_combined_bound_by_hand_and_its_limits():
    # B ||g||^2 / (sigma2_ps + beta ||g||^2 S)
    assert bounds.alpha_tilde(2.0, 8.0, 10, S=3.0, beta=0.5) == pytest.approx(10 * 2.0 / (8.0 + 0.5 * 2.0 * 3.0))
    # beta = 0 is the noise bound; sigma2_ps = 0 is the pure curvature form B / (beta S)
    assert bounds.alpha_tilde(2.0, 8.0, 10, S=3.0, beta=0.0) == bounds.alpha_g(2.0, 8.0, 10)
    assert bounds.alpha_tilde(2.0, 0.0, 10, S=4.0, beta=0.5) == pytest.approx(10 / (0.5 * 4.0))


def test_zero_negative_and_nan_denominators_give_inf_never_raise():
    assert bounds.alpha_g(1.0, 0.0, 256) == math.inf
    assert bounds.alpha_vol(0.0) == math.inf
    assert bounds.alpha_vol(-1.0) == math.inf                   # negative volatility: no constraint
    assert bounds.tau(0.0, 0.0) == math.inf
    assert bounds.alpha_tilde(1.0, 0.0, 4, S=0.0, beta=1.0) == math.inf
    assert bounds.alpha_tilde(0.0, 0.0, 4, S=0.0, beta=1.0) == math.inf
    assert bounds.cantelli_cap(0.0, 0.0, 0.5) == math.inf
    assert bounds.alpha_g(1.0, math.nan, 4) == math.inf
    assert bounds.alpha_vol(math.inf) == 0.0
    out = bounds.alpha_g(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0]), 4)   # elementwise on tensors
    assert out.tolist() == [math.inf, 2.0]
    out = bounds.cantelli_cap(torch.tensor([1.0, 0.0]), torch.tensor([4.0, 0.0]), 0.2)
    assert out[0].item() == pytest.approx(0.4) and out[1].item() == math.inf


def test_volatility_window_matches_numpy_population_variance():
    rng = np.random.default_rng(0)
    xs = rng.gamma(2.0, 1.5, size=75)
    w = bounds.VolatilityWindow(W=30)
    for i, x in enumerate(xs):
        s = w.push(x)
        win = xs[max(0, i - 29):i + 1]
        assert s["mu"] == pytest.approx(win.mean(), rel=1e-12)
        assert s["sigma2"] == pytest.approx(win.var(), rel=1e-9, abs=1e-15)       # ddof = 0
        assert s["vol"] == pytest.approx(win.var() / (win.mean() + bounds.EPS), rel=1e-9, abs=1e-15)  # Eq. 1
        assert s["sq_dev"] == pytest.approx((x - win.mean()) ** 2, rel=1e-9, abs=1e-15)
    assert len(w.values) == 30


def test_volatility_window_first_value_and_zero_mean():
    w = bounds.VolatilityWindow(W=3)
    s = w.push(2.0)
    assert s == {"mu": 2.0, "sigma2": 0.0, "vol": 0.0, "sq_dev": 0.0}
    z = bounds.VolatilityWindow(W=2)
    z.push(-bounds.EPS)
    assert z.push(-bounds.EPS)["vol"] == math.inf                # mu + eps = 0 -> inf, no ZeroDivisionError


def test_volatility_window_state_round_trip():
    a = bounds.VolatilityWindow(W=4)
    for x in [1.0, 2.0, 5.0, 3.0, 8.0]:
        a.push(x)
    b = bounds.VolatilityWindow(W=30)
    b.load_state_dict(a.state_dict())
    assert b.W == 4 and b.push(7.0) == a.push(7.0)


def test_curvature_statistics_by_kind():
    stats = {"mu": 2.0, "sigma2": 1.0, "vol": 0.5, "sq_dev": 9.0}
    x = 5.0
    assert bounds.curvature_statistic("vol", x, stats) == 0.5
    assert bounds.curvature_statistic("sq_dev", x, stats) == 9.0
    assert bounds.curvature_statistic("lam_bar", x, stats) == 5.0
    assert bounds.curvature_statistic("x2_over_mu_sq", x, stats) == pytest.approx((25.0 / 2.0) ** 2)
    assert bounds.curvature_statistic("x2_over_mu_sq", x, dict(stats, mu=0.0)) == 0.0   # authors: 0 if mu <= 0
    assert bounds.curvature_statistic("sq_dev_over_mu", x, stats) == 4.5                # (x - mu)^2 / mu
    assert bounds.curvature_statistic("sq_dev_over_mu", x, dict(stats, mu=0.0)) == 0.0
    import torch
    t = bounds.curvature_statistic("sq_dev_over_mu", torch.tensor([x]),
                               {"mu": torch.tensor([2.0]), "sq_dev": torch.tensor([9.0])})
    assert t.tolist() == [4.5]
    with pytest.raises(ValueError):
        bounds.curvature_statistic("nope", x, stats)


def test_window_feeds_the_combined_bound():
    """Eq. 2 with the paper's S = Vol from a window: sigma2_tilde = sigma2_ps + beta ||g||^2 Vol."""
    w = bounds.VolatilityWindow(W=30)
    for x in [1.0, 3.0]:
        s = w.push(x)
    assert s["mu"] == 2.0 and s["sigma2"] == 1.0
    S = bounds.curvature_statistic("vol", 3.0, s)
    want = 8 * 4.0 / (2.0 + 4.0 * 1.0 / (2.0 + bounds.EPS))
    assert bounds.alpha_tilde(4.0, 2.0, 8, S, beta=1.0) == pytest.approx(want)
