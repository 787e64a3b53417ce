"""Algorithm 1 on constructed measurements: the rules, their thresholds, the variants,
measure-only mode, NaN handling, state round-trip, Fig. 4's crossings and the beta-ramp quirk."""
import copy
import json
import math

import pytest
import torch

from trainability.scheduler import NoiseCurvatureScheduler, build_scheduler, crossings
from trainability.optim import ramped_betas

B = 10


def make_opt(lrs=(1e-3, 2e-3, 3e-3)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr, "layer": i + 1}
              for i, lr in enumerate(lrs)]
    return torch.optim.Adam(groups)


def layer_m(alpha, bound=0.5, lam_max=1.0, alpha_agg=1.0):
    """One layer's measurement whose noise bound alpha*_g = B ||g||^2 / sigma2_ps equals `bound`."""
    return {"grad_sq": 1.0, "sigma2_ps": B / bound, "lam_max": lam_max, "alpha": alpha, "alpha_agg": alpha_agg}


def meas(alphas, bound=0.5, glob=None, **kw):
    m = {l: layer_m(a, bound, **kw) for l, a in enumerate(alphas, start=1)}
    m["global"] = glob if glob is not None else layer_m(float("nan"), bound, **kw)
    return m


def sched(opt, **kw):
    kw.setdefault("beta", 0.0)   # beta = 0: alpha_tilde* = alpha*_g exactly, so the thresholds are explicit
    return NoiseCurvatureScheduler(opt, B, **kw)


def test_cool_multiplies_by_exactly_cool():
    opt = make_opt()
    s = sched(opt)
    # bound 0.5: gamma * bound = 0.4; alpha 0.45 > 0.4 and > floor 0.12 -> cool; alpha 0.35 -> none
    rows = s.step(meas([0.45, 0.35, 0.45]), task_frac=0.5)
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * 0.99, 2e-3, 3e-3 * 0.99]
    assert [rows[l]["rule"] for l in (1, 2, 3)] == ["cool", "none", "cool"]
    assert rows[1]["lr"] == 1e-3 * 0.99 and rows[1]["bound"] == rows[1]["alpha_tilde"] == pytest.approx(0.5)
    assert s.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_floor_blocks_cool():
    opt = make_opt()
    s = sched(opt)
    # bound 0.1: gamma * bound = 0.08; alpha = 0.12 is above it but not above the floor
    rows = s.step(meas([0.12, 0.1201, 0.05], bound=0.1), task_frac=0.5)
    assert [rows[l]["rule"] for l in (1, 2, 3)] == ["none", "cool", "none"]
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[1]["lr"] == 2e-3 * 0.99
    s2 = sched(make_opt(), floor=0.2)  # configurable
    assert s2.step(meas([0.15] * 3, bound=0.1), 0.5)[1]["rule"] == "none"


def test_warm_only_early_and_below_threshold_and_restarts_each_task():
    opt = make_opt()
    s = sched(opt)
    # bound 1.0: warm threshold 0.3 * 0.8 * 1.0 = 0.24
    rows = s.step(meas([0.2, 0.25, 0.2], bound=1.0), task_frac=0.05)
    assert [rows[l]["rule"] for l in (1, 2, 3)] == ["warm", "none", "warm"]
    assert opt.param_groups[0]["lr"] == 1e-3 * 1.01 and opt.param_groups[1]["lr"] == 2e-3
    lr = opt.param_groups[0]["lr"]
    for frac in (0.1, 0.5, 0.99):   # outside the first 10% of the task: no warm
        assert s.step(meas([0.2] * 3, bound=1.0), task_frac=frac)[1]["rule"] == "none"
    assert opt.param_groups[0]["lr"] == lr
    # next task: task_frac restarts at 0, the warm window opens again
    assert s.step(meas([0.2] * 3, bound=1.0), task_frac=0.0)[1]["rule"] == "warm"
    assert opt.param_groups[0]["lr"] == lr * 1.01
    s3 = sched(make_opt(), warm_frac=0.3)
    assert s3.step(meas([0.2] * 3, bound=1.0), task_frac=0.2)[1]["rule"] == "warm"


def test_measure_only_reports_would_be_rule_and_never_changes_lr():
    opt = make_opt()
    s = sched(opt, act=False)
    r1 = s.step(meas([0.45, 0.35, 0.45]), 0.5)
    r2 = s.step(meas([0.2, 0.2, 0.2], bound=1.0), 0.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3, 3e-3]
    assert (r1[1]["rule"], r1[2]["rule"], r2[1]["rule"]) == ("cool", "none", "warm")
    assert r1[1]["lr"] == 1e-3
    assert s.rule_counts[1] == {"cool": 1, "warm": 1, "none": 0}


def test_global_variant_same_factor_for_all_groups():
    opt = make_opt()
    s = sched(opt, variant="global")
    # per-layer entries would say "none"; the global one says cool -> every group cools
    rows = s.step(meas([0.01] * 3, glob=layer_m(0.45)), 0.5)
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * 0.99, 2e-3 * 0.99, 3e-3 * 0.99]
    assert rows["global"]["rule"] == "cool" and all(rows[l]["rule"] == "cool" for l in (1, 2, 3))
    assert rows[2]["alpha"] == 0.01   # per-layer quantities still logged for Figs. 3-4
    assert s.rule_counts["global"]["cool"] == 1 and s.rule_counts[1] == {"cool": 0, "warm": 0, "none": 0}
    rows = s.step(meas([0.45] * 3, glob=layer_m(0.2, bound=1.0)), 0.0)
    assert rows["global"]["rule"] == "warm"
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * 0.99 * 1.01, 2e-3 * 0.99 * 1.01, 3e-3 * 0.99 * 1.01]


def test_bound_choice_noise_curvature_combined():
    # constant lambda_bar = 1: mu = 1, sigma2 = 0 -> tau = 2; alpha*_g = 0.5; alpha = 1
    m = meas([1.0] * 3)
    noise = sched(make_opt(), bound="noise").step(m, 0.5)[1]
    curv = sched(make_opt(), bound="curvature").step(m, 0.5)[1]
    assert noise["bound"] == noise["alpha_g"] == pytest.approx(0.5) and noise["rule"] == "cool"
    assert curv["bound"] == curv["tau"] == pytest.approx(2.0) and curv["rule"] == "none"   # 1 < 0.8 * 2
    # combined with beta > 0 and a volatile lambda_bar: alpha_tilde* < alpha*_g
    s = NoiseCurvatureScheduler(make_opt(), B, beta=1.0)
    s.step(meas([0.05] * 3, lam_max=1.0), 0.5)
    row = s.step(meas([0.05] * 3, lam_max=3.0), 0.5)[1]
    assert row["mu"] == pytest.approx(2.0) and row["sigma2_win"] == pytest.approx(1.0)
    assert row["vol"] == pytest.approx(0.5) and row["alpha_vol"] == pytest.approx(2.0)
    assert row["bound"] == row["alpha_tilde"] == pytest.approx(B * 1.0 / (B / 0.5 + 1.0 * 1.0 * 0.5))
    assert row["alpha_tilde"] < row["alpha_g"]
    # the authors' statistic: S = lambda_bar itself
    authors = NoiseCurvatureScheduler(make_opt(), B, beta=20.0, statistic="lam_bar")
    a = authors.step(meas([0.05] * 3, lam_max=3.0), 0.5)[1]
    assert a["alpha_tilde"] == pytest.approx(B / (B / 0.5 + 20.0 * 3.0))


def test_lam_bar_is_alpha_agg_times_lam_max():
    row = sched(make_opt()).step(meas([0.05] * 3, lam_max=4.0, alpha_agg=0.25), 0.5)[1]
    assert row["lam_bar"] == 1.0 and row["lam_max"] == 4.0


def test_nan_does_nothing():
    opt = make_opt()
    s = sched(opt)
    nan = float("nan")
    rows = s.step(meas([nan, 0.45, 0.45], lam_max=nan), 0.0)
    assert all(rows[l]["rule"] == "none" for l in (1, 2, 3))   # NaN alpha, or NaN curvature -> NaN bound
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3, 3e-3]
    assert len(s.windows[1].values) == 0   # a NaN lambda_bar is not pushed into the window
    assert all(math.isnan(rows[2][k]) for k in ("alpha_tilde", "tau", "alpha_vol", "bound"))
    # NaN noise inputs: NaN alpha*_g and alpha_tilde*, not "+inf = no constraint" (which would warm)
    rows = sched(make_opt()).step({l: dict(layer_m(0.01), sigma2_ps=float("nan")) for l in (1, 2, 3)}, 0.0)
    assert math.isnan(rows[1]["alpha_g"]) and rows[1]["rule"] == "none"
    s = sched(opt, bound="noise")
    assert s.step(meas([nan, 0.45, 0.45]), 0.0)[1]["rule"] == "none"
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[1]["lr"] == 2e-3 * 0.99


def _sequence(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a, lam = torch.rand(3, generator=g) * 0.6, 0.5 + torch.rand(3, generator=g) * 3
        m = {l: layer_m(float(a[l - 1]), bound=0.4, lam_max=float(lam[l - 1])) for l in (1, 2, 3)}
        m["global"] = layer_m(0.3, lam_max=1.0)
        out.append((m, (i % 10) / 10))
    return out


def test_state_dict_round_trip_gives_identical_decisions():
    seq = _sequence(40, 0)
    opt_a = make_opt()
    a = NoiseCurvatureScheduler(opt_a, B, window=5)
    for m, f in seq[:20]:
        a.step(m, f)
    state = json.loads(json.dumps(a.state_dict()))   # JSON-able, and survives it
    opt_b = make_opt()
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    b = NoiseCurvatureScheduler(opt_b, B, window=5)
    b.load_state_dict(state)
    assert b.rule_counts == a.rule_counts
    for m, f in seq[20:]:
        ra, rb = a.step(m, f), b.step(m, f)
        assert json.dumps(ra) == json.dumps(rb)
    assert a.get_last_lr() == b.get_last_lr() and a.rule_counts == b.rule_counts


def test_rule_counts():
    s = sched(make_opt())
    s.step(meas([0.45, 0.2, 0.01], bound=0.5), 0.0)    # cool, none (0.2 > 0.12), warm (0.01 < 0.12)
    s.step(meas([0.45, 0.2, 0.01], bound=0.5), 0.5)    # cool, none, none
    assert s.rule_counts[1] == {"cool": 2, "warm": 0, "none": 0}
    assert s.rule_counts[2] == {"cool": 0, "warm": 0, "none": 2}
    assert s.rule_counts[3] == {"cool": 0, "warm": 1, "none": 1}


def test_crossings_on_hand_made_rows():
    def r(alpha, at, ag, av):
        return {"alpha": alpha, "alpha_tilde": at, "alpha_g": ag, "alpha_vol": av}
    rows = [
        {1: r(0.5, 0.4, 1.0, 1.0), 2: r(0.1, 1.0, 1.0, 1.0)},           # combined only (layer 1)
        {1: r(0.1, 1.0, 1.0, 1.0), 2: r(0.5, 0.4, 0.4, 1.0)},           # combined + noise (layer 2)
        {1: r(0.1, 1.0, 1.0, 0.05), 2: r(0.1, 1.0, 1.0, 1.0)},          # vol only
        {1: r(0.1, 1.0, 1.0, 1.0), 2: r(0.1, float("nan"), 1.0, 1.0),   # nothing (NaN never crosses;
         "global": r(9.0, 0.1, 0.1, 0.1)},                              #   "global" is not a layer)
    ]
    assert crossings(rows) == {"combined": 0.5, "noise": 0.25, "vol": 0.25}
    assert all(math.isnan(v) for v in crossings([]).values())
    # no safety factor: alpha just above the bound counts
    assert crossings([{1: r(0.41, 0.4, 0.4, 0.4)}]) == {"combined": 1.0, "noise": 1.0, "vol": 1.0}


def test_beta_ramp_is_the_authors_formula():
    """optim.ramped_betas: linear in the epoch towards (0.99, 0.75) over 2E epochs [code]."""
    assert ramped_betas((0.9, 0.999), 0, 250) == (0.9, 0.999)
    b1, b2 = ramped_betas((0.9, 0.999), 249, 250)          # a task's last epoch
    assert b1 == pytest.approx(0.9 + 0.09 * 249 / 500) and b2 == pytest.approx(0.999 - 0.249 * 249 / 500)
    assert (round(b1, 3), round(b2, 3)) == (0.945, 0.875)
    assert ramped_betas((0.9, 0.999), 5, 5) == pytest.approx((0.945, 0.8745))   # halfway at e = E


def test_build_scheduler_and_validation():
    cfg = {"variant": "global", "bound": "noise", "safety": 0.5, "cool": 0.9, "warm": 1.1, "floor": 0.0,
           "warm_frac": 0.2, "warm_factor": 0.5, "window": 7, "kappa": 2.0, "beta": 20.0,
           "statistic": "sq_dev", "code_alpha_agg": False, "act": False}
    s = build_scheduler(cfg, make_opt(), 64)
    assert (s.B, s.variant, s.bound, s.safety, s.windows[1].W, s.act) == (64, "global", "noise", 0.5, 7, False)
    for bad in ({"variant": "x"}, {"bound": "x"}, {"statistic": "x"}):
        with pytest.raises(ValueError):
            NoiseCurvatureScheduler(make_opt(), B, **bad)
