"""Aggregation math (analysis.py), strict-JSON output, tables' verdict rules, and figures that must not
crash on missing data. Records here are small and hand-built in the documented format (docs/DESIGN.md)."""
import csv
import json
import math

import numpy as np
import pytest

from trainability import analysis, tables, verdicts

LAYERS = ("1", "2", "3")


def make_record(seed=0, accs=(0.5, 0.4, 0.3), n_tasks=None, status="completed", crossings=None,
                indicators=None, per_task=4, lr=1e-3, decisions=True):
    """A record with len(accs) tasks; decisions: per_task per task, 3 layers."""
    n = len(accs)
    tasks = []
    for t, a in enumerate(accs):
        tasks.append({"task": t, "online_acc": a, "end_acc": a + 0.1 if a == a else a, "end_loss": 2.0,
                      "steps": 10, "wall_s": 0.1, "lr": [lr * (1 + 0.1 * t)] * 3,
                      "crossings": crossings[t] if crossings else None,
                      "indicators": indicators[t] if indicators else None})
    rec = {"config": {"n_tasks": n_tasks or n, "optim": {"lr": lr}, "epochs_per_task": 4, "epochs_factor": 1.0,
                      "regularizer": {"kind": "l2", "lam": 1e-3}},
           "seed": seed, "status": status, "diverged_at_task": n - 1 if status == "diverged" else None,
           "provenance": {}, "tasks": tasks,
           "decisions": {"step": [], "task": [], "task_frac": [], "layers": {l: {} for l in LAYERS}}}
    if decisions:
        d = rec["decisions"]
        for t in range(n):
            for k in range(per_task):
                d["step"].append(t * 40 + k * 10 + 9)
                d["task"].append(t)
                d["task_frac"].append(k / per_task)
                for l in LAYERS:
                    row = d["layers"][l]
                    for key, val in (("alpha", 2.0 / (k + 1)), ("alpha_g", 1.0), ("alpha_vol", 0.8),
                                     ("alpha_tilde", 0.9), ("vol", 0.1 * (t + 1)), ("lr", lr * (1 + 0.1 * t))):
                        row.setdefault(key, []).append(val)
                    row.setdefault("rule", []).append("none")
    return rec


# ---------------------------------------------------------------- basic math
def test_final_window():
    assert [analysis.final_window(n) for n in (1, 3, 10, 11, 40)] == [1, 1, 1, 2, 4]


def test_final_acc_uses_last_tenth_of_planned_tasks():
    rec = make_record(accs=[0.1 * i for i in range(20)])           # window = last 2 tasks
    assert analysis.final_acc(rec) == pytest.approx((1.8 + 1.9) / 2)
    short = make_record(accs=[0.5, 0.4], n_tasks=20, status="diverged")
    assert math.isnan(analysis.final_acc(short))                           # never reached the window
    assert analysis.final_acc(make_record(accs=[0.5, 0.4, float("nan")])) != analysis.final_acc(make_record())


def test_mean_std_over_seeds_ignores_nan_and_pads():
    m = analysis.stack([[1.0, 2.0, 3.0], [3.0, 4.0]])
    assert m.shape == (2, 3) and math.isnan(m[1, 2])
    mu, sd = analysis.mean_std(m)
    np.testing.assert_allclose(mu, [2.0, 3.0, 3.0])
    np.testing.assert_allclose(sd, [1.0, 1.0, 0.0])                 # ddof = 0
    s = analysis.stat([0.1, 0.3, float("nan"), None])
    assert s["mean"] == pytest.approx(0.2) and s["std"] == pytest.approx(0.1)
    assert s["n"] == 2 and s["min"] == 0.1 and s["max"] == 0.3 and len(s["per_seed"]) == 4
    assert math.isnan(analysis.stat([]).get("mean"))


def test_run_summary_counts_divergence():
    recs = [make_record(0, accs=[0.5, 0.4, 0.3]), make_record(1, accs=[0.5, 0.2, 0.1]),
            make_record(2, accs=[0.5, float("nan")], n_tasks=3, status="diverged")]
    s = analysis.run_summary(recs)
    assert s["n_seeds"] == 3 and s["diverged"] == 1 and s["n_tasks"] == 3
    assert s["final_acc"]["mean"] == pytest.approx(0.2) and s["final_acc"]["n"] == 2
    assert s["mean_acc"]["per_seed"][2] == pytest.approx(0.5)
    assert s["first_acc"]["mean"] == pytest.approx(0.5)
    # geometric mean over layers at each seed's last task (the diverged seed stops at task 2)
    assert s["final_lr"]["mean"] == pytest.approx((1.2e-3 + 1.2e-3 + 1.1e-3) / 3)


def test_rankdata_averages_ties():
    np.testing.assert_allclose(analysis.rankdata([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(analysis.rankdata([3, 1, 3, 3]), [3, 1, 3, 3])


def test_spearman_hand_computed():
    # ranks x = 1..5, ranks y = [1, 2, 3.5, 5, 3.5]: rho = 8 / sqrt(10 * 9.5)
    assert analysis.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert analysis.spearman([1, 2, 3, 4], [10, 100, 1000, 1e4]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert analysis.spearman([1, 2, float("nan"), 3, 4], [1, 2, 9, 3, 4]) == pytest.approx(1.0)   # NaN pair dropped
    assert math.isnan(analysis.spearman([1, 2, 3], [5, 5, 5]))             # constant
    assert math.isnan(analysis.spearman([1, 2], [1, 2]))                   # too few pairs


def test_affine_rescale():
    np.testing.assert_allclose(analysis.affine_rescale([0, 0.5, 1], [0.4, 0.2, 0.3]), [0.2, 0.3, 0.4])
    np.testing.assert_allclose(analysis.affine_rescale([0.9, 0.6, 0.75], [0.1, 0.2, 0.3]), [0.3, 0.1, 0.2])
    np.testing.assert_allclose(analysis.affine_rescale([1.0, 1.0], [0.1, 0.3]), [0.3, 0.3])   # constant: clipped raw
    np.testing.assert_allclose(analysis.affine_rescale([0.2, 0.2], [0.1, 0.3]), [0.2, 0.2])
    out = analysis.affine_rescale([0.0, float("nan"), 1.0], [0.1, 0.2, 0.5])
    assert out[0] == pytest.approx(0.1) and math.isnan(out[1]) and out[2] == pytest.approx(0.5)


def test_ema_skips_nan():
    np.testing.assert_allclose(analysis.ema([1.0, 3.0, float("nan"), 5.0], 0.5), [1.0, 2.0, np.nan, 3.5])
    np.testing.assert_allclose(analysis.ema([1.0, 3.0], 0.0), [1.0, 3.0])


# ---------------------------------------------------------------- Fig. 4 prediction
def test_crossing_based_prediction_and_spearman():
    accs = [0.6, 0.5, 0.45, 0.3]
    cross = [{"combined": c, "noise": 0.0, "vol": v} for c, v in ((0.1, 0.5), (0.3, 0.2), (0.4, 0.9), (0.8, 0.1))]
    cross[2]["noise"] = 0.5
    rec = make_record(accs=accs, crossings=cross)
    np.testing.assert_allclose(analysis.predicted_acc(rec, "combined"), [0.9, 0.7, 0.6, 0.2])
    p = analysis.prediction_summary([rec, make_record(seed=1, accs=accs, crossings=cross)])
    assert p["combined"]["spearman"]["mean"] == pytest.approx(1.0)
    assert p["combined"]["mae"]["mean"] < p["vol"]["mae"]["mean"]
    # noise: prediction [1, 1, 0.5, 1] -> rescaled [0.6, 0.6, 0.3, 0.6]; bias = mean(resc - actual) > 0
    assert p["noise"]["bias"]["mean"] == pytest.approx(np.mean([0, 0.1, -0.15, 0.3]))
    none = make_record(accs=accs)                                   # no crossings (measure disabled)
    assert np.isnan(analysis.predicted_acc(none, "combined")).all()
    assert math.isnan(analysis.prediction_summary([none])["combined"]["spearman"]["mean"])


def test_fig2_fig3_extras():
    rec = make_record(accs=[0.5, 0.48, 0.40, 0.25])                 # vol grows, accuracy falls faster
    v = analysis.volatility_summary([rec])
    assert v["vol_first_task"]["mean"] == pytest.approx(0.1)
    assert v["lag_spearman"]["mean"] == pytest.approx(-1.0)
    e = analysis.effective_step_summary([rec])
    assert e["spike_decay_frac"]["mean"] == 1.0                    # alpha = 2, 1, 0.67, 0.5 within each task
    assert e["above_tilde_first_task"]["mean"] == pytest.approx(0.5)


# ---------------------------------------------------------------- strict JSON and files
def _no_nan(s):
    raise ValueError(f"non-strict JSON token {s}")


def test_strict_json_nan_to_null(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf"), np.float32(2.5)], "c": {"d": np.int64(3)}, "e": None}
    p = tmp_path / "s.json"
    analysis.write_strict_json(obj, p)
    back = json.loads(p.read_text(), parse_constant=_no_nan)
    assert back == {"a": None, "b": [1.0, None, 2.5], "c": {"d": 3}, "e": None}


def test_aggregate_end_to_end(tmp_path):
    params = {"results_dir": str(tmp_path / "results"), "scales": {"s": {"seeds": [0, 1, 2]}},
              "experiments": {"fig4": {"runs": ["l2-vanilla", "relu-vanilla"]}}}
    cross = [{"combined": 0.1 * t, "noise": 0.0, "vol": float("nan")} for t in range(3)]
    for seed in (0, 1):
        p = tmp_path / "results" / "s" / "runs" / "l2-vanilla" / f"seed{seed}" / "record.json"
        p.parent.mkdir(parents=True)
        rec = make_record(seed, accs=[0.5, 0.4, float("nan")], crossings=cross)
        p.write_text(json.dumps(rec))                               # Python's json writes NaN tokens
        assert "NaN" in p.read_text()
    logs = []
    summary = analysis.aggregate(params, "s", "fig4", log=logs.append)
    assert any("missing record" in m for m in logs)                 # seed 2 and relu-vanilla are missing
    text = (tmp_path / "results/s/experiments/fig4/summary.json").read_text()
    s = json.loads(text, parse_constant=_no_nan)
    assert s == summary
    r = s["runs"]["l2-vanilla"]
    assert r["n_seeds"] == 2 and r["final_acc"]["mean"] is None and r["mean_acc"]["mean"] == pytest.approx(0.45)
    assert r["prediction"]["vol"]["spearman"]["mean"] is None
    assert s["runs"]["relu-vanilla"]["n_seeds"] == 0
    metrics = json.loads((tmp_path / "results/s/experiments/fig4/metrics.json").read_text())
    assert metrics["l2-vanilla"] == {"final_acc": None, "mean_acc": pytest.approx(0.45)}   # dvc metrics show
    rows = list(csv.DictReader(open(tmp_path / "results/s/experiments/fig4/curves.csv")))
    assert len(rows) == 6 and list(rows[0]) == list(analysis.CURVE_COLUMNS)
    assert rows[2]["online_acc"] == "" and float(rows[0]["online_acc"]) == 0.5


# ---------------------------------------------------------------- tables' rules
def test_verdict_rules():
    hi = analysis.stat([0.5, 0.52, 0.51])
    lo = analysis.stat([0.2, 0.3, 0.25])
    mid = analysis.stat([0.1, 0.6, 0.4])
    assert verdicts.beats(hi, lo) == verdicts.REP and verdicts.beats(hi, mid) == verdicts.PART
    assert verdicts.beats(lo, hi) == verdicts.NOT
    assert verdicts.beats(hi, None) == verdicts.NODATA
    assert verdicts.across([True, True]) == verdicts.REP and verdicts.across([True, False, None]) == verdicts.PART
    assert verdicts.across([False]) == verdicts.NOT and verdicts.across([None]) == verdicts.NODATA
    assert verdicts.shape_holds("chance", 0.1, 0.11) and not verdicts.shape_holds("rising", 0.3, 0.305)
    assert verdicts.shape_holds("falling", 0.18, 0.11) and verdicts.shape_holds("flat", 0.60, 0.615)
    assert verdicts._direction(1.0, 1.2) == "up" and verdicts._direction(1.0, 1.01) == "flat"
    assert verdicts._direction(None, 1) is None


def test_tables_without_summaries(tmp_path, monkeypatch):
    from trainability.config import load_params
    params = load_params("params.yaml")
    params["results_dir"] = str(tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    paths = tables.write_tables(params, "smoke", log=lambda m: None)
    text = open(paths[-1]).read()
    assert "Tally: 0 reproduced, 0 partly, 0 not reproduced" in text and "| no data |" in text
    t1 = open(paths[0]).read()
    assert "`n_tasks` | 3 | choice (scale `smoke`; default 40: paper)" in t1


# ---------------------------------------------------------------- figures never crash on missing data
def test_all_figures_draw_from_partial_records(tmp_path, monkeypatch):
    from trainability import figures
    from trainability.config import load_params
    params = load_params("params.yaml")
    params["results_dir"] = str(tmp_path / "results")
    ind = [{"hessian_rank": 0.9 - 0.1 * t, "unit_sign_entropy": 0.6, "sharpness": 10.0 * (t + 1),
            "weight_norm": 0.1, "grad_norm": float("nan"), "grad_param_ratio": 0.01} for t in range(3)]
    cross = [{"combined": 0.2, "noise": 0.1, "vol": 0.3}] * 3
    written = set()
    for exp in figures.FIGURES:
        for i, run in enumerate(params["experiments"][exp]["runs"]):
            if i % 3 == 2 or run in written:                        # leave some runs without records
                continue
            for seed in params["scales"]["smoke"]["seeds"]:
                p = tmp_path / "results" / "smoke" / "runs" / run / f"seed{seed}" / "record.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                diverged = seed == 1 and i == 0
                rec = make_record(seed, accs=[0.3, 0.2, float("nan")] if diverged else [0.3, 0.25, 0.2],
                                  status="diverged" if diverged else "completed", indicators=ind,
                                  crossings=cross, decisions=i != 1)
                p.write_text(json.dumps(rec))
            written.add(run)
    monkeypatch.chdir(tmp_path)
    for exp in figures.FIGURES:
        paths = figures.make_figure(params, "smoke", exp, ema=0.3, log=lambda m: None)
        assert all((tmp_path / p).stat().st_size > 1000 for p in paths)


def test_stream_rows_judge_only_the_authors_stream_against_the_paper():
    """ablation-stream: task-1 numbers on the authors' stream get verdicts against Fig. 5's task-1 level;
    the ablation streams are reported without one."""
    def summ(*accs):
        return analysis.run_summary([make_record(s, accs=(a,)) for s, a in enumerate(accs)])
    runs = {"l2-vanilla": summ(0.17, 0.20), "l2-scheduled": summ(0.40, 0.42),
            "l2-vanilla-appendix": summ(0.86, 0.87), "l2-scheduled-appendix": summ(0.86, 0.88)}
    rows = {r[0]: r for r in verdicts.stream_rows({"ablation-stream": {"runs": runs}})}
    assert rows["Fig. 5 task 1, L2 vanilla, authors' stream (60,000 images, beta ramp)"][3] == verdicts.REP
    assert rows["Fig. 5 task 1, L2 scheduled, authors' stream (60,000 images, beta ramp)"][3] == verdicts.REP
    assert rows["Task 1, L2: scheduler beats vanilla, authors' stream (60,000 images, beta ramp)"][3] == verdicts.REP
    assert rows["Fig. 5 task 1, L2 vanilla, App. D.1: 21,000 images, no ramp"][3].startswith("ablation")
    assert rows["Task 1, L2: scheduler beats vanilla, App. D.1: 21,000 images, no ramp"][3] == verdicts.PART
    assert not any("CReLU" in k for k in rows)   # no records, no rows


def test_forms_rows_judge_each_scheduler_form_against_the_papers_task1_level():
    """ablation-forms: every form of the scheduler gets a verdict against the paper's scheduled level at
    task 1 (vanilla against the vanilla level), and a 'beats vanilla' row per scheduled form."""
    def summ(*accs):
        return analysis.run_summary([make_record(s, accs=(a,)) for s, a in enumerate(accs)])
    runs = {"crelu-vanilla": summ(0.10, 0.10), "crelu-scheduled": summ(0.10, 0.10), "crelu-authors": summ(0.60, 0.62),
            "crelu-authors-nowarm": summ(0.14, 0.15)}
    rows = {r[0]: r for r in verdicts.forms_rows({"ablation-forms": {"runs": runs}})}
    assert rows["Fig. 5 task 1, CReLU, vanilla"][3] == verdicts.REP
    assert rows["Fig. 5 task 1, CReLU, Eq. 2 as written"][3] == verdicts.REP        # 0.10 vs 0.13
    assert rows["Fig. 5 task 1, CReLU, authors' bound, Table 1 rule (502f93a)"][3] == verdicts.NOT
    assert rows["Task 1, CReLU: authors' bound, Table 1 rule (502f93a) beats vanilla"][3] == verdicts.REP
    assert rows["Task 1, CReLU: Eq. 2 as written beats vanilla"][3] != verdicts.REP
    assert not any("L2" in k for k in rows)   # no records, no rows
