"""The paper-vs-ours verdicts: the paper's numbers (read off its figures), the rules that judge ours
against them, and one function per figure that turns the experiments' summaries into rows
[claim, paper, ours, verdict] (paper Figs. 1-9 and the appendix ablations; docs/METHOD.md §7).

Inputs are params.yaml (which runs an experiment has, in which order) and the experiments'
summary.json files (analysis.aggregate); tables.paper_vs_ours lays the rows out.
"""
from __future__ import annotations

import math

from .analysis import FIG1_PANELS
from .methods import METHOD_NAMES, methods_in


CHANCE = 0.1


VERDICT_RULES = """\
Verdicts: **reproduced** / **partly** / **not reproduced** (or **no data** when a run is missing), by
these rules. "final" = online task accuracy averaged over the last 10% of tasks (at least the last
task), per seed; "first" = task 1. Seed ranges = [min, max] over seeds.
- *A beats B*: reproduced if A's seed range lies entirely above B's (non-overlapping); partly if only A's
  mean is higher; not reproduced otherwise.
- *Fig. 5 rows (one per method and arm)*: the shape named in the paper column is checked on our seed
  means: "chance" = final <= 0.15; "rising" = final > first + 0.01; "falling" = final < first - 0.01;
  "flat" = |final - first| <= 0.03. At the `paper` scale the number must also match: reproduced if the
  shape holds and |final - paper| <= 0.05, partly if only one of the two holds (or |diff| <= 0.10), else
  not reproduced. At smaller scales tasks are shorter and fewer, so absolute accuracies are not
  comparable: the verdict is the shape only (marked "qualitative").
- *Fig. 7/8 ordering*: reproduced if short < base < long in mean and the short and long seed ranges do
  not overlap; partly if the means are ordered, or at least long > short; else not reproduced. At the
  `paper` scale a reproduced ordering whose numbers miss the paper's by > 0.05 becomes partly.
- *Fig. 6 (learned LR)*: direction of final LR / initial LR (geometric mean over layers at the end of the
  last task): cools (< 1) or warms (> 1) as in the paper; the Wasserstein saw-tooth requires the LR to rise
  again within at least half of the tasks. Reproduced if all parts hold (at the `paper` scale also the
  final LR within a factor 1.5 of the paper's), partly if some do, else not reproduced.
- *Fig. 1 (one row per panel)*: "moves the same way" = the indicator's relative change from task 1 to
  the final window has the same sign in both runs (|change| < 5% counts as flat, and flat = flat);
  "trainability differs" = final accuracies differ by >= 0.02 with non-overlapping seed ranges.
  Reproduced if both hold, partly if one, else not reproduced.
- *Claims over several methods* (Figs. 2, 3, 4, 9, appendix): the per-method test is stated in the row;
  reproduced if it holds for every method, partly if for some, not reproduced if for none.
- *Fig. 4*: rho = Spearman rank correlation between a predictor (1 - crossing fraction) and the actual
  per-task accuracy, per seed, then averaged; a predictor that is constant over the tasks (e.g. never
  crosses) has no rank information and counts as rho = 0 ("n/a" in the text); a constant prediction is
  drawn at its raw value clipped into the actual range, so one that never crosses sits at the top.
"""

STREAM_RULE = """\
- *ablation-stream (task 1)*: online accuracy of task 1 against the paper's Fig. 5 read at task 1, on
  the stream the authors ran only (the other streams are ablations the paper has no number for):
  reproduced if |ours - paper| <= 0.05, partly if <= 0.10; "scheduler beats vanilla" as *A beats B* on
  task 1.
"""

FORMS_RULE = """\
- *ablation-forms (task 1)*: the scheduler's forms on the authors' stream, task 1, against the paper's
  Fig. 5 read at task 1 (the scheduled level for every scheduled form): reproduced if |ours - paper| <=
  0.05, partly if <= 0.10; "beats vanilla" as *A beats B* on task 1.
"""
# the scheduler's forms of experiment ablation-forms, by run-name arm (docs/LEDGER.md "Which scheduler made Fig. 5")
# (the experiment runs at scale paper-task1, whose *-scheduled arm is Eq. 2 as written: no family refinement)
FORMS = {"vanilla": "vanilla", "scheduled": "Eq. 2 as written",
         "authors": "authors' bound, Table 1 rule (502f93a)",
         "authors-nowarm": "authors' bound, no warm, cool 0.95 (camera-ready)"}

# Paper Fig. 5 (task accuracy, 40 tasks x 250 epochs, 3 seeds): (text, value at task 40, shape)
PAPER_FIG5 = {
    ("crelu", "vanilla"): ("~0.10 throughout", 0.10, "chance"),
    ("crelu", "reset"): ("~0.10", 0.10, "chance"),
    ("crelu", "scheduled"): ("rises to ~0.50 by task 8, ~0.54 at task 40", 0.54, "rising"),
    ("l2", "vanilla"): ("0.18 falling to ~0.11", 0.11, "falling"),
    ("l2", "reset"): ("~0.18-0.19 flat", 0.185, "flat"),
    ("l2", "scheduled"): ("0.38 rising to ~0.49 at task 40", 0.49, "rising"),
    ("wass", "vanilla"): ("~0.60 falling to ~0.58", 0.58, "falling"),
    ("wass", "reset"): ("~0.60-0.615", 0.61, "flat"),
    ("wass", "scheduled"): ("~0.64-0.65", 0.645, "flat"),
}
# Paper Fig. 5 read at tasks 1 and 2 (mean of 3 seeds; the authors' stream): the levels the
# `ablation-stream` experiment compares its first tasks with
PAPER_FIG5_EARLY = {("crelu", "vanilla"): (0.10, 0.10), ("crelu", "scheduled"): (0.13, 0.27),
                    ("l2", "vanilla"): (0.18, 0.15), ("l2", "scheduled"): (0.38, 0.40),
                    ("wass", "vanilla"): (0.60, 0.58), ("wass", "scheduled"): (0.65, 0.635)}
# the streams of experiment ablation-stream, by run-name suffix
STREAMS = {"": "authors' stream (60,000 images, beta ramp)", "-noramp": "60,000 images, no beta ramp",
           "-appendix": "App. D.1: 21,000 images, no ramp"}
# Paper Fig. 7 at task 40 (scheduled; 100 / 250 / 500 epochs per task)
PAPER_FIG7 = {"crelu": (0.38, 0.54, 0.67), "l2": (0.32, 0.49, 0.58), "wass": (0.46, 0.64, 0.71)}
# Paper Fig. 6 (and Fig. 8 for CReLU at LR 1e-2): (text, expected direction, final LR)
PAPER_FIG6 = {"l2": ("cools to ~4e-4", "cools", 4e-4),
              "wass": ("saw-tooths at ~6-8e-4 (below 1e-3)", "cools", 7e-4),
              "crelu": ("Fig. 6 (LR 1e-3): warms to ~2e-3 with spikes at task starts; "
                        "Fig. 8 (LR 1e-2): cools to ~3e-3", None, None)}
REP, PART, NOT, NODATA = "reproduced", "partly", "not reproduced", "no data"


# ---------------------------------------------------------------- helpers
def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt(s: dict | None, digits: int = 3) -> str:
    """'mean ± std (n=k)' of a summary stat; 'n/a' if missing."""
    if not s or not finite(s.get("mean")):
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


def beats(a: dict | None, b: dict | None) -> str:
    """Verdict for 'A beats B' on per-seed final accuracies (see VERDICT_RULES)."""
    if not a or not b or not finite(a.get("mean")) or not finite(b.get("mean")):
        return NODATA
    if a["min"] > b["max"]:
        return REP
    return PART if a["mean"] > b["mean"] else NOT


def across(results: list[bool | None]) -> str:
    """Claim over several methods: all -> reproduced, some -> partly, none -> not reproduced."""
    known = [r for r in results if r is not None]
    if not known:
        return NODATA
    return REP if all(known) else PART if any(known) else NOT


def run_stats(summaries: dict, experiment: str, run: str) -> dict | None:
    s = summaries.get(experiment)
    return (s or {}).get("runs", {}).get(run)


# ---------------------------------------------------------------- one function per figure
def shape_holds(shape: str, first: float, final: float) -> bool | None:
    if not (finite(first) and finite(final)):
        return None
    return {"chance": final <= CHANCE + 0.05, "rising": final > first + 0.01,
            "falling": final < first - 0.01, "flat": abs(final - first) <= 0.03}[shape]


def fig5_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Fig. 5: each method's curve shape (and number at the `paper` scale), and which arm beats which."""
    rows = []
    for (method, arm), (text, value, shape) in PAPER_FIG5.items():
        s = run_stats(summaries, "fig5", f"{method}-{arm}")
        claim = f"Fig. 5 {METHOD_NAMES[method]} {arm}: {shape}"
        if not s:
            rows.append([claim, text, "n/a", NODATA])
            continue
        first, final = s["first_acc"]["mean"], s["final_acc"]["mean"]
        ok = shape_holds(shape, first, final)
        ours = f"first {first:.3f} → final {fmt(s['final_acc'])}" if finite(first) else fmt(s["final_acc"])
        if ok is None:
            v = NODATA
        elif paper_scale:
            diff = abs(final - value)
            v = REP if ok and diff <= 0.05 else PART if ok or diff <= 0.10 else NOT
        else:
            v = (REP if ok else NOT) + " (qualitative)"
        rows.append([claim, text, ours, v])
    for method in methods_in(experiment_runs(params, "fig5")):
        sched, van, res = (run_stats(summaries, "fig5", f"{method}-{a}") for a in ("scheduled", "vanilla", "reset"))
        g = lambda s: (s or {}).get("final_acc")  # noqa: E731
        rows.append([f"Fig. 5 {METHOD_NAMES[method]}: scheduler beats vanilla", "yes",
                     f"{fmt(g(sched))} vs {fmt(g(van))}", beats(g(sched), g(van))])
        rows.append([f"Fig. 5 {METHOD_NAMES[method]}: scheduler beats reset", "yes",
                     f"{fmt(g(sched))} vs {fmt(g(res))}", beats(g(sched), g(res))])
        if method != "crelu":
            rows.append([f"Fig. 5 {METHOD_NAMES[method]}: reset beats vanilla", "yes",
                         f"{fmt(g(res))} vs {fmt(g(van))}", beats(g(res), g(van))])
    return rows


def stream_rows(summaries: dict) -> list[list[str]]:
    """Experiment ablation-stream: task-1 accuracy on each stream against the paper's Fig. 5 at task 1.
    Only the authors' stream is what the paper ran, so only it gets a verdict on the number: reproduced
    within 0.05, partly within 0.10 (the other streams are ablations: the paper has no number for them)."""
    runs = ((summaries.get("ablation-stream") or {}).get("runs") or {})
    rows = []
    for method in (m for m in methods_in(runs) if m in METHOD_NAMES):   # methods the paper has numbers for
        for suffix, stream in STREAMS.items():
            arms = ("vanilla", "scheduled") + (("eq2",) if f"{method}-eq2{suffix}" in runs else ())
            stats = {arm: run_stats(summaries, "ablation-stream", f"{method}-{arm}{suffix}") for arm in arms}
            if not any(stats.values()):
                continue
            for arm, st in stats.items():
                paper = PAPER_FIG5_EARLY[(method, "vanilla" if arm == "vanilla" else "scheduled")][0]
                first = (st or {}).get("first_acc")
                if not first or not finite(first.get("mean")):
                    v = NODATA
                elif suffix:
                    v = "ablation (no paper number)"
                else:
                    diff = abs(first["mean"] - paper)
                    v = REP if diff <= 0.05 else PART if diff <= 0.10 else NOT
                ours = f"{fmt(first)}, seeds [{first['min']:.3f}, {first['max']:.3f}]" if v != NODATA else "n/a"
                rows.append([f"Fig. 5 task 1, {METHOD_NAMES[method]} {arm}, {stream}", f"{paper:.2f}", ours, v])
            g = lambda a: (stats[a] or {}).get("first_acc")  # noqa: E731
            for arm in arms[1:]:
                what = "scheduler" if arm == "scheduled" else "Eq. 2 as written"
                rows.append([f"Task 1, {METHOD_NAMES[method]}: {what} beats vanilla, {stream}", "yes",
                             f"{fmt(g(arm))} vs {fmt(g('vanilla'))}", beats(g(arm), g("vanilla"))])
    return rows


def forms_rows(summaries: dict) -> list[list[str]]:
    """Experiment ablation-forms: task-1 accuracy of each form of the scheduler against the paper's Fig. 5
    at task 1 (FORMS_RULE), and whether each scheduled form beats vanilla on task 1."""
    runs = ((summaries.get("ablation-forms") or {}).get("runs") or {})
    rows = []
    for method in (m for m in methods_in(runs) if m in METHOD_NAMES):
        first = {form: ((run_stats(summaries, "ablation-forms", f"{method}-{form}") or {}).get("first_acc"))
                 for form in FORMS}
        for form, label in FORMS.items():
            st = first[form]
            if f"{method}-{form}" not in runs:
                continue
            paper = PAPER_FIG5_EARLY[(method, "vanilla" if form == "vanilla" else "scheduled")][0]
            if not st or not finite(st.get("mean")):
                rows.append([f"Fig. 5 task 1, {METHOD_NAMES[method]}, {label}", f"{paper:.2f}", "n/a", NODATA])
                continue
            diff = abs(st["mean"] - paper)
            v = REP if diff <= 0.05 else PART if diff <= 0.10 else NOT
            rows.append([f"Fig. 5 task 1, {METHOD_NAMES[method]}, {label}", f"{paper:.2f}",
                         f"{fmt(st)}, seeds [{st['min']:.3f}, {st['max']:.3f}]", v])
            if form != "vanilla":
                rows.append([f"Task 1, {METHOD_NAMES[method]}: {label} beats vanilla", "yes",
                             f"{fmt(st)} vs {fmt(first['vanilla'])}", beats(st, first["vanilla"])])
    return rows


def fig7_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Figs. 7-8: longer tasks give higher accuracy and end at a higher LR."""
    rows = []
    for method, paper in PAPER_FIG7.items():
        st = [run_stats(summaries, "fig7", f"{method}-{a}") for a in ("short", "scheduled", "long")]
        acc = [(s or {}).get("final_acc") for s in st]
        lr = [(s or {}).get("final_lr") for s in st]
        name = METHOD_NAMES[method]
        if not all(a and finite(a["mean"]) for a in acc):
            rows.append([f"Fig. 7 {name}: longer tasks give higher accuracy", "", "n/a", NODATA])
        else:
            m = [a["mean"] for a in acc]
            ordered = m[0] < m[1] < m[2]
            v = REP if ordered and acc[0]["max"] < acc[2]["min"] else PART if ordered or m[2] > m[0] else NOT
            if paper_scale and v == REP and max(abs(a - p) for a, p in zip(m, paper)) > 0.05:
                v = PART
            rows.append([f"Fig. 7 {name}: longer tasks give higher accuracy (short / base / long)",
                         " / ".join(f"{p:.2f}" for p in paper), " / ".join(fmt(a, 3) for a in acc),
                         v if paper_scale else v + " (qualitative)"])
        if not all(x and finite(x["mean"]) for x in lr):
            rows.append([f"Fig. 8 {name}: longer tasks end at a higher LR", "yes", "n/a", NODATA])
        else:
            m = [x["mean"] for x in lr]
            v = REP if m[0] < m[1] < m[2] else PART if m[2] > m[0] else NOT
            rows.append([f"Fig. 8 {name}: longer tasks end at a higher LR (short / base / long)", "yes",
                         " / ".join(f"{x:.2e}" for x in m), v])
    return rows


def fig6_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Fig. 6 (and Fig. 8's CReLU at LR 1e-2): the direction of each method's learned LR."""
    rows = []
    for method, (text, direction, value) in PAPER_FIG6.items():
        s = run_stats(summaries, "fig6", f"{method}-scheduled")
        claim = f"Fig. 6 {METHOD_NAMES[method]}: learned LR"
        if not s or not finite(s["final_lr"]["mean"]) or not finite(s.get("init_lr")):
            rows.append([claim, text, "n/a", NODATA])
            continue
        init, final, warm = s["init_lr"], s["final_lr"]["mean"], s["warm_tasks_frac"]["mean"]
        if method == "crelu":   # Fig. 6 ran CReLU at LR 1e-3 (warms); Fig. 8 at 1e-2 (cools to ~3e-3)
            direction, value = ("cools", 3e-3) if init >= 5e-3 else ("warms", 2e-3)
        parts = [(final < init) if direction == "cools" else (final > init)]
        if method == "wass":
            parts.append(finite(warm) and warm >= 0.5)
        if paper_scale:
            parts.append(value / 1.5 <= final <= value * 1.5)
        ours = (f"{init:.1e} → {fmt(s['final_lr'], 6)}; LR rises again in "
                f"{warm:.0%} of tasks" if finite(warm) else f"{init:.1e} → {fmt(s['final_lr'], 6)}")
        v = REP if all(parts) else PART if any(parts) else NOT
        rows.append([f"{claim} {direction}", text, ours, v])
    return rows


def fig1_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Fig. 1: per panel, the indicator moves the same way in two runs whose trainability differs."""
    rows = []
    for letter, title, ind, ra, rb, _ in FIG1_PANELS:
        a, b = run_stats(summaries, "fig1", ra), run_stats(summaries, "fig1", rb)
        claim = f"Fig. 1({letter}) {title}: moves the same way in `{ra}` and `{rb}`, trainability differs"
        ia, ib = ((s or {}).get("indicators", {}).get(ind) for s in (a, b))
        if not (a and b and ia and ib):
            rows.append([claim, "yes", "n/a", NODATA])
            continue
        dirs = [_direction(i["first"]["mean"], i["last"]["mean"]) for i in (ia, ib)]
        fa, fb = a["final_acc"], b["final_acc"]
        differs = (finite(fa["mean"]) and finite(fb["mean"]) and abs(fa["mean"] - fb["mean"]) >= 0.02
                   and (fa["min"] > fb["max"] or fb["min"] > fa["max"]))
        same = None not in dirs and dirs[0] == dirs[1]
        ours = (f"{ind}: {ra} {_arrow(ia)} ({dirs[0]}), {rb} {_arrow(ib)} ({dirs[1]}); "
                f"final acc {fa['mean']:.3f} vs {fb['mean']:.3f}")
        rows.append([claim, "yes", ours, REP if same and differs else PART if same or differs else NOT])
    return rows


def _direction(first, last) -> str | None:
    if not (finite(first) and finite(last)):
        return None
    rel = (last - first) / abs(first) if first else (math.copysign(math.inf, last) if last else 0.0)
    return "up" if rel > 0.05 else "down" if rel < -0.05 else "flat"


def _arrow(i: dict) -> str:
    f, l = i["first"]["mean"], i["last"]["mean"]
    return f"{f:.3g} → {l:.3g}" if finite(f) and finite(l) else "n/a"



def experiment_runs(params: dict, experiment: str) -> list[str]:
    """The experiment's runs in params.yaml order; none if params.yaml has no such experiment."""
    return (params["experiments"].get(experiment) or {}).get("runs", [])


def _summary_runs(summaries: dict, experiment: str) -> dict:
    return (summaries.get(experiment) or {}).get("runs") or {}


def fig2_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Fig. 2: volatility growth precedes the accuracy collapse, per run of the experiment."""
    runs = _summary_runs(summaries, "fig2")
    res, txt = [], []
    for run in experiment_runs(params, "fig2"):
        v = (runs.get(run) or {}).get("volatility", {}).get("lag_spearman", {}).get("mean")
        res.append(v < 0 if finite(v) else None)
        txt.append(f"{run} {v:+.2f}" if finite(v) else f"{run} n/a")
    return [["Fig. 2: volatility growth precedes accuracy collapse (per run: Spearman of Vol at task t "
             "with the accuracy change t → t+1 is negative; figure ambiguous)", "yes (qualitative)",
             "; ".join(txt), across(res)]]


def fig3_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Fig. 3: layer-1 alpha spikes at each task start and decays; later it sits above the bound longer."""
    runs = _summary_runs(summaries, "fig3")
    dec, above, t1, t2 = [], [], [], []
    for run in experiment_runs(params, "fig3"):
        e = (runs.get(run) or {}).get("effective_step") or {}
        d = (e.get("spike_decay_frac") or {}).get("mean")
        f, l = ((e.get(k) or {}).get("mean") for k in ("above_tilde_first_task", "above_tilde_last_task"))
        dec.append(d >= 0.8 if finite(d) else None)
        above.append(l > f if finite(f) and finite(l) else None)
        t1.append(f"{run} {d:.0%}" if finite(d) else f"{run} n/a")
        t2.append(f"{run} {f:.0%} → {l:.0%}" if finite(f) and finite(l) else f"{run} n/a")
    return [["Fig. 3: layer-1 alpha spikes at each task start and decays (per method: alpha at the task's "
             "first decision > at its last in >= 80% of tasks)", "yes", "; ".join(t1), across(dec)],
            ["Fig. 3: in later tasks alpha sits above the bound longer (per method: fraction of decisions "
             "with alpha > alpha_tilde*, last task > first task)", "yes", "; ".join(t2), across(above)]]


FIG4_CRELU_RUN = "crelu-vanilla"   # the run of Fig. 4's claim that volatility alone fails for CReLU


def fig4_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Fig. 4: the combined bound predicts per-task accuracy best; noise-only over-predicts;
    volatility-only fails for CReLU."""
    runs = _summary_runs(summaries, "fig4")
    best, over, txt, crelu_vol = [], [], {}, None
    for run in experiment_runs(params, "fig4"):
        p = (runs.get(run) or {}).get("prediction") or {}
        rho = {k: ((p.get(k) or {}).get("spearman") or {}).get("mean") for k in ("combined", "noise", "vol")}
        bias = {k: ((p.get(k) or {}).get("bias") or {}).get("mean") for k in ("combined", "noise")}
        r0 = {k: v if finite(v) else 0.0 for k, v in rho.items()}   # constant prediction: no rank information
        best.append(r0["combined"] >= max(r0["noise"], r0["vol"]) if any(map(finite, rho.values())) else None)
        over.append(bias["noise"] > 0 and bias["noise"] > (bias["combined"] if finite(bias["combined"]) else -1)
                    if finite(bias["noise"]) else None)
        txt[run] = f"{run}: " + ", ".join(f"{k} {v:+.2f}" if finite(v) else f"{k} n/a" for k, v in rho.items())
        if run == FIG4_CRELU_RUN and any(map(finite, rho.values())):
            crelu_vol = (r0["vol"] < 0.3, r0["vol"] < r0["combined"])
    return [["Fig. 4: the combined bound tracks per-task accuracy best (per method: its Spearman rho "
             ">= noise-only and volatility-only)", "yes", "; ".join(txt.values()), across(best)],
            ["Fig. 4: noise-only over-predicts (per method: mean of rescaled prediction - actual > 0 "
             "and above the combined bound's)", "yes", f"{sum(bool(o) for o in over)} of "
             f"{sum(o is not None for o in over)} methods", across(over)],
            ["Fig. 4: volatility-only fails for CReLU (rho < 0.3 and below the combined bound's)", "yes",
             txt.get(FIG4_CRELU_RUN, "n/a"),
             NODATA if crelu_vol is None else REP if all(crelu_vol) else PART if any(crelu_vol) else NOT]]


def fig9_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Fig. 9: the scheduler preserves the Hessian rank."""
    res, txt = [], []
    for m in methods_in(experiment_runs(params, "fig9")):
        a, b = (run_stats(summaries, "fig9", f"{m}-{arm}") for arm in ("scheduled", "vanilla"))
        ra, rb = (((s or {}).get("indicators", {}).get("hessian_rank") or {}).get("last", {}).get("mean")
                  for s in (a, b))
        res.append(ra >= rb if finite(ra) and finite(rb) else None)
        txt.append(f"{METHOD_NAMES[m]} {ra:.2f} vs {rb:.2f}" if finite(ra) and finite(rb) else f"{METHOD_NAMES[m]} n/a")
    return [["Fig. 9: the scheduler preserves Hessian rank (per method: final rank scheduled >= vanilla; "
             "paper legend ambiguous)", "yes", "; ".join(txt), across(res)]]


# appendix ablations: (experiment, the arm that should be best, the arms it should beat, claim)
APPENDIX_CLAIMS = (
    ("ablation-global", "scheduled", ("vanilla", "reset", "global"),
     "Appendix: per-layer scheduler is best (final acc >= vanilla, reset, global)"),
    ("ablation-bound", "scheduled", ("noise", "curvature"),
     "Appendix: combined bound is best (final acc >= noise-only, curvature-only)"))


def appendix_rows(params: dict, summaries: dict, paper_scale: bool) -> list[list[str]]:
    """Appendix (v3): the per-layer scheduler and the combined bound are best."""
    rows = []
    for exp, best_arm, others, claim in APPENDIX_CLAIMS:
        res, txt = [], []
        for m in methods_in(experiment_runs(params, exp)):
            vals = {a: ((run_stats(summaries, exp, f"{m}-{a}") or {}).get("final_acc") or {}).get("mean")
                    for a in (best_arm, *others)}
            if finite(vals[best_arm]) and all(finite(v) for v in vals.values()):
                res.append(all(vals[best_arm] >= vals[o] for o in others))
            else:
                res.append(None)
            txt.append(f"{METHOD_NAMES[m]}: " + ", ".join(f"{a} {v:.3f}" if finite(v) else f"{a} n/a"
                                                          for a, v in vals.items()))
        rows.append([claim + " (inferred; not verified against the v3 text)", "yes", "; ".join(txt), across(res)])
    return rows


# the paper's figures in the order of the paper-vs-ours table
FIGURE_ROWS = (fig1_rows, fig2_rows, fig3_rows, fig4_rows, fig5_rows, fig6_rows, fig7_rows, fig9_rows,
               appendix_rows)


def verdict_rows(params: dict, scale: str, summaries: dict) -> list[list[str]]:
    """Every row [claim, paper, ours, verdict] of the paper-vs-ours table at `scale`: the paper's
    figures (when any of their experiments ran), then the ablation-stream and ablation-forms rows (when
    they ran)."""
    paper_scale = scale.startswith("paper")
    rows = []
    if set(summaries) - {"ablation-stream", "ablation-forms"}:   # the paper's figures (not at paper-task1)
        for figure_rows in FIGURE_ROWS:
            rows += figure_rows(params, summaries, paper_scale)
    if "ablation-stream" in summaries:
        rows += stream_rows(summaries)
    if "ablation-forms" in summaries:
        rows += forms_rows(summaries)
    return rows


def tally(rows: list[list[str]]) -> dict[str, int]:
    """How many rows got each verdict (a "(qualitative)" verdict counts as its verdict)."""
    return {v: sum(r[3].startswith(v) for r in rows) for v in (REP, PART, NOT, NODATA)}
