"""Aggregation of run records over seeds: the numbers behind every figure and table.

Everything downstream of training reads records through this module, so a statistic is defined once:
final-window accuracy, mean and std over (real) seeds, Spearman rank correlation, the Fig. 4
crossing-based accuracy prediction and its affine rescaling, and the strict-JSON summary that DVC reads.
Conventions: std is over seeds with ddof=0 (np.std); NaN/None/missing values are ignored, never
replaced; a statistic with no finite input is NaN in Python and `null` in the written JSON.
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np

from .config import experiment_runs
from .pipeline import curves_path, metrics_path, record_path, summary_path
from .record import load_record

FINAL_FRAC = 0.1          # "final accuracy" = mean over the last 10% of the planned tasks (at least one)
PREDICTORS = ("combined", "noise", "vol")   # keys of record["tasks"][t]["crossings"] (Fig. 4)
CURVE_COLUMNS = ("run", "seed", "task", "online_acc", "end_acc", "end_loss")

# Fig. 1 panels (paper Sec. 3): (letter, title, indicator, run A, run B, log y)
FIG1_PANELS = (
    ("a", "Hessian rank", "hessian_rank", "l2-lr1e-4", "wass-vanilla", False),
    ("b", "Unit-sign entropy", "unit_sign_entropy", "bn-l2", "leaky-rho03", False),
    ("c", "Sharpness", "sharpness", "leaky-rho07", "leaky-rho03", True),
    ("d", "Weight norm", "weight_norm", "leaky-rho07", "leaky-rho03", False),
    ("e", "Gradient norm", "grad_norm", "bn-l2-lr1e-5", "wass-lr1e-5", False),
    ("f", "Grad/param ratio", "grad_param_ratio", "linear", "leaky-rho03", False),
)
# other spellings measure.compute_indicators might use for the same indicator
INDICATOR_ALIASES = {
    "hessian_rank": ("hessian_rank", "rank", "fisher_rank"),
    "unit_sign_entropy": ("unit_sign_entropy", "sign_entropy", "entropy"),
    "sharpness": ("sharpness", "lam_max", "top_eigenvalue"),
    "weight_norm": ("weight_norm", "param_norm"),
    "grad_norm": ("grad_norm", "gradient_norm", "update_norm"),
    "grad_param_ratio": ("grad_param_ratio", "grad_to_param", "ratio"),
}


# ---------------------------------------------------------------- basic math
def num(v) -> float:
    """A record value as float; None, strings and bools become NaN."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def nanmean(a, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(a, float), axis=axis)


def nanstd(a, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(np.asarray(a, float), axis=axis)


def stack(series: list) -> np.ndarray:
    """Seeds x time matrix from 1-D series of unequal length (a diverged seed is shorter), NaN-padded."""
    n = max((len(s) for s in series), default=0)
    out = np.full((len(series), n), np.nan)
    for i, s in enumerate(series):
        out[i, :len(s)] = np.asarray(s, float)
    return out


def mean_std(matrix, axis=0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof=0) over seeds (axis 0), ignoring NaN."""
    return nanmean(matrix, axis), nanstd(matrix, axis)


def stat(values) -> dict:
    """Summary of one number per seed: mean, std (ddof=0), min, max over the finite values, and the list."""
    v = np.asarray([num(x) for x in values], float)
    f = v[np.isfinite(v)]
    return {"mean": float(f.mean()) if f.size else math.nan,
            "std": float(f.std()) if f.size else math.nan,
            "min": float(f.min()) if f.size else math.nan,
            "max": float(f.max()) if f.size else math.nan,
            "n": int(f.size), "per_seed": [float(x) for x in v]}


def final_window(n_tasks: int) -> int:
    """Number of tasks in the final window: the last 10% of the tasks, at least one."""
    return max(1, math.ceil(FINAL_FRAC * n_tasks))


def rankdata(a) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (like scipy.stats.rankdata 'average')."""
    a = np.asarray(a, float)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation over the pairs where both are finite; NaN if < 3 pairs or a constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    m = np.isfinite(x) & np.isfinite(y)
    if m.sum() < 3:
        return math.nan
    rx, ry = rankdata(x[m]), rankdata(y[m])
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def affine_rescale(pred, target) -> np.ndarray:
    """Map pred's [min, max] onto target's [min, max] (Fig. 4). A constant pred has no scale: it keeps its
    raw value, clipped into target's range (a predictor that never crosses, 1.0, sits at the top)."""
    pred, target = np.asarray(pred, float), np.asarray(target, float)
    p, t = pred[np.isfinite(pred)], target[np.isfinite(target)]
    if p.size == 0 or t.size == 0:
        return np.full(pred.shape, np.nan)
    lo, hi = t.min(), t.max()
    if p.max() == p.min():
        return np.where(np.isfinite(pred), np.clip(p[0], lo, hi), np.nan)
    return lo + (pred - p.min()) / (p.max() - p.min()) * (hi - lo)


def ema(y, alpha: float) -> np.ndarray:
    """Exponential moving average (weight alpha on the past); NaN entries stay NaN and are skipped."""
    y = np.asarray(y, float)
    if not alpha:
        return y.copy()
    out, prev = np.full(y.shape, np.nan), math.nan
    for i, v in enumerate(y):
        if math.isfinite(v):
            prev = v if not math.isfinite(prev) else alpha * prev + (1 - alpha) * v
            out[i] = prev
    return out


def geomean(values) -> float:
    v = np.asarray([num(x) for x in values], float)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.exp(np.log(v).mean())) if v.size else math.nan


# ---------------------------------------------------------------- record access
def task_values(rec: dict, key: str) -> np.ndarray:
    """Per-task value of `key` (e.g. online_acc) in task order; missing -> NaN."""
    return np.array([num(t.get(key)) for t in rec.get("tasks", [])], float)


def planned_tasks(rec: dict) -> int:
    return int((rec.get("config") or {}).get("n_tasks") or len(rec.get("tasks", [])))


def final_acc(rec: dict, key: str = "online_acc") -> float:
    """Mean of `key` over the final window of the *planned* stream; NaN if the run never got there."""
    n = planned_tasks(rec)
    first = n - final_window(n)
    vals = [num(t.get(key)) for t in rec.get("tasks", []) if first <= int(t.get("task", -1)) < n]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def indicator_key(rec: dict, name: str) -> str | None:
    """The key under which the record stores indicator `name` (first alias present), or None."""
    for t in rec.get("tasks", []):
        ind = t.get("indicators") or {}
        for k in INDICATOR_ALIASES.get(name, (name,)):
            if k in ind:
                return k
    return None


def indicator_values(rec: dict, name: str) -> np.ndarray:
    k = indicator_key(rec, name)
    return np.array([num((t.get("indicators") or {}).get(k)) if k else math.nan
                     for t in rec.get("tasks", [])], float)


def task_lrs(rec: dict) -> np.ndarray:
    """Tasks x layers matrix of the LR at the end of each task (record['tasks'][t]['lr'])."""
    rows = [t.get("lr") or [] for t in rec.get("tasks", [])]
    return stack([[num(v) for v in r] for r in rows]) if rows else np.zeros((0, 0))


def decision_layers(rec: dict) -> list[str]:
    """Numbered layers with decision series ("1", "2", ...; not "global"), in order."""
    layers = ((rec.get("decisions") or {}).get("layers") or {})
    return sorted((k for k, v in layers.items() if k.isdigit() and v), key=int)


def decision_array(rec: dict, key: str) -> np.ndarray:
    """A top-level decision series (step, task, task_frac)."""
    return np.array([num(v) for v in (rec.get("decisions") or {}).get(key, [])], float)


def layer_series(rec: dict, layer: str, key: str) -> np.ndarray:
    """Decision-step series of `key` for `layer` ("1", ..., "global"); empty if absent."""
    layers = ((rec.get("decisions") or {}).get("layers") or {})
    return np.array([num(v) for v in (layers.get(str(layer)) or {}).get(key, [])], float)


def layer_mean_series(rec: dict, key: str) -> np.ndarray:
    """Mean over numbered layers of a decision series (e.g. volatility), NaN-aware."""
    series = [layer_series(rec, l, key) for l in decision_layers(rec)]
    series = [s for s in series if s.size]
    return nanmean(stack(series), axis=0) if series else np.zeros(0)


def per_task_mean(rec: dict, values: np.ndarray) -> np.ndarray:
    """Mean of a decision-step series within each task present in the record (NaN if none)."""
    tasks = decision_array(rec, "task")[:len(values)]
    n = len(rec.get("tasks", []))
    return np.array([nanmean(values[tasks == t]) if np.any(tasks == t) else math.nan for t in range(n)])


def predicted_acc(rec: dict, predictor: str) -> np.ndarray:
    """Fig. 4: per task, 1 - fraction of decision steps where some layer's alpha exceeds the bound."""
    return np.array([1 - num((t.get("crossings") or {}).get(predictor)) for t in rec.get("tasks", [])])


# ---------------------------------------------------------------- loading
def load_experiment(params: dict, scale: str, experiment: str, log=print) -> dict[str, list[dict]]:
    """{run: [record per seed that exists]}; missing records are reported, not fatal."""
    seeds = params["scales"][scale]["seeds"]
    out = {}
    for run in experiment_runs(params, scale, experiment):
        out[run] = []
        for s in seeds:
            p = Path(record_path(params, scale, run, s))
            if p.exists():
                out[run].append(load_record(p))
            else:
                log(f"warning: missing record {p}")
    return out


# ---------------------------------------------------------------- summaries
def run_summary(records: list[dict]) -> dict:
    """Per-run numbers over seeds (every experiment)."""
    accs = [task_values(r, "online_acc") for r in records]
    out = {
        "n_seeds": len(records),
        "seeds": [r.get("seed") for r in records],
        "diverged": sum(r.get("status") == "diverged" for r in records),
        "diverged_at_task": [r.get("diverged_at_task") for r in records if r.get("status") == "diverged"],
        "n_tasks": max((len(a) for a in accs), default=0),
        "final_window": final_window(max((planned_tasks(r) for r in records), default=1)),
        "final_acc": stat([final_acc(r) for r in records]),
        "mean_acc": stat([nanmean(a) if a.size else math.nan for a in accs]),
        "first_acc": stat([a[0] if a.size else math.nan for a in accs]),
        "final_end_acc": stat([final_acc(r, "end_acc") for r in records]),
    }
    lrs = [task_lrs(r) for r in records]
    out["init_lr"] = num(((records[0].get("config") or {}).get("optim") or {}).get("lr")) if records else math.nan
    out["final_lr"] = stat([geomean(m[-1]) if m.size else math.nan for m in lrs])   # geometric mean over layers
    out["final_lr_per_layer"] = [stat(col) for col in
                                 (np.array([m[-1] for m in lrs if m.size]).T if any(m.size for m in lrs) else [])]
    out["warm_tasks_frac"] = stat([warm_tasks_frac(r) for r in records])
    out["rule_counts"] = mean_rule_counts(records)
    names = sorted({k for r in records for t in r.get("tasks", []) for k in (t.get("indicators") or {})})
    ind = {}
    for k in names:
        series = [np.array([num((t.get("indicators") or {}).get(k)) for t in r.get("tasks", [])]) for r in records]
        ind[k] = {"first": stat([s[0] if s.size else math.nan for s in series]),
                  "last": stat([final_window_mean(s, planned_tasks(r)) for s, r in zip(series, records)])}
    out["indicators"] = ind
    return out


def mean_rule_counts(records: list[dict]) -> dict:
    """{layer: {rule: mean over seeds}} of Algorithm 1's decisions over the whole run (record
    `rule_counts`: what the scheduler did, or, in a vanilla or reset run, would have done)."""
    counts = [r["rule_counts"] for r in records if r.get("rule_counts")]
    layers = sorted({k for c in counts for k in c}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k))
    return {k: {rule: float(np.mean([c.get(k, {}).get(rule, 0) for c in counts]))
                for rule in ("cool", "warm", "none")} for k in layers}


def final_window_mean(values: np.ndarray, n_planned: int) -> float:
    w = values[n_planned - final_window(n_planned):n_planned]
    w = w[np.isfinite(w)]
    return float(w.mean()) if w.size else math.nan


def warm_tasks_frac(rec: dict) -> float:
    """Fraction of tasks t >= 1 where some layer's LR rises above its value at the end of task t-1
    (the saw-tooth of Figs. 6 and 8). NaN without LR decisions or with a single task."""
    lrs, tasks = task_lrs(rec), decision_array(rec, "task")
    layers = decision_layers(rec)
    if lrs.shape[0] < 2 or not layers or tasks.size == 0:
        return math.nan
    hits = 0
    for t in range(1, lrs.shape[0]):
        rose = False
        for i, l in enumerate(layers):
            s = layer_series(rec, l, "lr")[:tasks.size]
            within = s[tasks[:s.size] == t]
            if i < lrs.shape[1] and within.size and np.nanmax(within) > lrs[t - 1, i] * (1 + 1e-9):
                rose = True
        hits += rose
    return hits / (lrs.shape[0] - 1)


def volatility_summary(records: list[dict]) -> dict:
    """Fig. 2: per-task volatility (mean over layers) and its lagged rank correlation with the accuracy
    change: spearman(Vol at task t, acc[t+1] - acc[t]); negative = volatility precedes a drop."""
    first, last, lag = [], [], []
    for r in records:
        v = per_task_mean(r, layer_mean_series(r, "vol"))
        a = task_values(r, "online_acc")
        first.append(v[0] if v.size else math.nan)
        last.append(final_window_mean(v, planned_tasks(r)) if v.size else math.nan)
        lag.append(spearman(v[:-1], np.diff(a)[:max(0, len(v) - 1)]) if v.size > 1 else math.nan)
    return {"vol_first_task": stat(first), "vol_last_tasks": stat(last), "lag_spearman": stat(lag)}


def effective_step_summary(records: list[dict], layer: str = "1") -> dict:
    """Fig. 3: does layer-1 alpha spike at task start and decay (alpha at the task's first decision >
    at its last), and what fraction of the decisions of the first / last task have alpha > alpha_tilde."""
    decay, first, last = [], [], []
    for r in records:
        a, at, tasks = layer_series(r, layer, "alpha"), layer_series(r, layer, "alpha_tilde"), decision_array(r, "task")
        n = min(a.size, at.size, tasks.size)
        if n == 0:
            decay.append(math.nan)
            first.append(math.nan)
            last.append(math.nan)
            continue
        a, at, tasks = a[:n], at[:n], tasks[:n]
        ids = np.unique(tasks)
        d = [a[tasks == t][0] > a[tasks == t][-1] for t in ids if (tasks == t).sum() >= 2]
        decay.append(float(np.mean(d)) if d else math.nan)
        first.append(_frac_above(a[tasks == ids[0]], at[tasks == ids[0]]))
        last.append(_frac_above(a[tasks == ids[-1]], at[tasks == ids[-1]]))
    return {"spike_decay_frac": stat(decay), "above_tilde_first_task": stat(first),
            "above_tilde_last_task": stat(last)}


def _frac_above(a: np.ndarray, bound: np.ndarray) -> float:
    m = np.isfinite(a) & np.isfinite(bound)
    return float(np.mean(a[m] > bound[m])) if m.any() else math.nan


def prediction_summary(records: list[dict]) -> dict:
    """Fig. 4: for each predictor, Spearman(1 - crossing fraction, actual online acc) per seed, the
    Spearman of the seed-mean curves, and the mean abs error / bias of the rescaled prediction."""
    acts = [task_values(r, "online_acc") for r in records]
    out = {}
    for p in PREDICTORS:
        preds = [predicted_acc(r, p) for r in records]
        resc = [affine_rescale(q, a) for q, a in zip(preds, acts)]
        out[p] = {"spearman": stat([spearman(q, a) for q, a in zip(preds, acts)]),
                  "spearman_of_means": spearman(nanmean(stack(preds), 0), nanmean(stack(acts), 0))
                  if records else math.nan,
                  "mae": stat([nanmean(np.abs(q - a)) for q, a in zip(resc, acts)]),
                  "bias": stat([nanmean(q - a) for q, a in zip(resc, acts)])}
    return out


EXTRAS = {"fig2": ("volatility", volatility_summary), "fig3": ("effective_step", effective_step_summary),
          "fig4": ("prediction", prediction_summary)}


def summarize(runs: dict[str, list[dict]], experiment: str, scale: str) -> dict:
    """The experiment's summary.json content (before strict-JSON conversion)."""
    out = {"experiment": experiment, "scale": scale, "final_frac": FINAL_FRAC, "std": "over seeds, ddof=0",
           "runs": {}}
    for run, recs in runs.items():
        s = run_summary(recs)
        if experiment in EXTRAS:
            key, fn = EXTRAS[experiment]
            s[key] = fn(recs)
        out["runs"][run] = s
    return out


def curve_rows(runs: dict[str, list[dict]]) -> list[dict]:
    """Long-format rows (run, seed, task, online_acc, end_acc, end_loss) for dvc plots."""
    rows = []
    for run, recs in runs.items():
        for r in recs:
            for t in r.get("tasks", []):
                rows.append({"run": run, "seed": r.get("seed"), "task": t.get("task"),
                             **{k: num(t.get(k)) for k in CURVE_COLUMNS[3:]}})
    return rows


# ---------------------------------------------------------------- output
def strict(obj):
    """Recursively convert to strict-JSON-able Python: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [strict(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_strict_json(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict(obj), indent=1, allow_nan=False) + "\n")


def write_csv(rows: list[dict], path, columns) -> None:
    """CSV with the given columns; NaN and inf become empty cells (what spreadsheets and DVC expect)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})


def write_curves(rows: list[dict], path) -> None:
    write_csv(rows, path, CURVE_COLUMNS)


def aggregate(params: dict, scale: str, experiment: str, log=print) -> dict:
    """Read the experiment's records, write summary.json (strict JSON) and curves.csv; return the summary."""
    runs = load_experiment(params, scale, experiment, log=log)
    summary = summarize(runs, experiment, scale)
    write_strict_json(summary, summary_path(params, scale, experiment))
    write_curves(curve_rows(runs), curves_path(params, scale, experiment))
    write_strict_json({run: {"final_acc": s["final_acc"]["mean"], "mean_acc": s["mean_acc"]["mean"]}
                       for run, s in summary["runs"].items()}, metrics_path(params, scale, experiment))
    log(f"wrote {summary_path(params, scale, experiment)} and {curves_path(params, scale, experiment)} "
        f"({sum(len(v) for v in runs.values())} records)")
    return strict(summary)


def load_summary(params: dict, scale: str, experiment: str) -> dict | None:
    p = Path(summary_path(params, scale, experiment))
    return json.loads(p.read_text()) if p.exists() else None
