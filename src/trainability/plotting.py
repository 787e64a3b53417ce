"""The figures' plotting helpers and look (trainability.figures draws the paper's figures with them).

Every curve is the mean over the real seeds with a +-1 std band over those seeds (never synthetic
copies); log-scale panels use the mean and std of log10 values (a geometric band). Optional per-seed
EMA smoothing. Missing data never crashes a panel: a run without records, decisions or indicators
gets a note; a diverged seed is drawn up to its last task and marked with an x.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import analysis  # noqa: E402
from .methods import METHOD_NAMES, METHODS, arm_of, method_of  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
                     "figure.dpi": 110, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3})

ARM_COLORS = {"vanilla": "0.25", "reset": "tab:orange", "scheduled": "tab:blue", "global": "tab:green",
              "noise": "tab:purple", "curvature": "tab:brown", "authors": "tab:red",
              "eq2": "tab:cyan"}
ARM_LABELS = {"vanilla": "vanilla", "reset": "reset", "scheduled": "per-layer scheduler",
              "global": "global scheduler", "noise": "noise-only bound", "curvature": "curvature-only bound",
              "authors": "scheduler, authors' Eq. 2 settings", "eq2": "scheduler, Eq. 2 as written"}
ARM_STYLES = {"reset": "--", "noise": "-.", "global": "-."}
LENGTH_COLORS = {"short": "tab:red", "scheduled": "tab:orange", "long": "tab:blue"}   # paper Figs. 7-8
LAYER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
PAIR_COLORS = ("tab:blue", "tab:orange")
PAPER_FIG = {"fig1": "Fig. 1", "fig2": "Fig. 2", "fig3": "Fig. 3 (and 10-12)", "fig4": "Fig. 4",
             "fig5": "Fig. 5", "fig6": "Fig. 6", "fig7": "Figs. 7-8", "fig9": "Fig. 9",
             "ablation-global": "Appendix", "ablation-bound": "Appendix"}


# ---------------------------------------------------------------- helpers
def runs_by_method(runs: dict) -> dict[str, dict[str, str]]:
    """{method: {arm: run}} in params.yaml order."""
    out: dict = {}
    for r in runs:
        out.setdefault(method_of(r), {})[arm_of(r)] = r
    return out


def method_title(method: str, records: list[dict]) -> str:
    cfg = records[0]["config"] if records else {}
    name = METHOD_NAMES.get(method, method)
    lam = (cfg.get("regularizer") or {}).get("lam")
    if method in ("l2", "wass") and lam:
        return f"{name} ($\\lambda$={lam:g})"
    lr = (cfg.get("optim") or {}).get("lr")
    return f"{name} (lr {lr:g})" if lr else name


def align(xs: list, ys: list) -> tuple[np.ndarray, np.ndarray]:
    """Put per-seed series with their own x values on a common x grid (NaN where a seed has no value)."""
    x_all = np.unique(np.concatenate([np.asarray(x, float) for x in xs])) if xs else np.zeros(0)
    m = np.full((len(xs), x_all.size), np.nan)
    for i, (x, y) in enumerate(zip(xs, ys)):
        n = min(len(x), len(y))
        m[i, np.searchsorted(x_all, np.asarray(x[:n], float))] = np.asarray(y[:n], float)
    return x_all, m


def band(ax, x, matrix, color, label=None, ls="-", log=False, ema=0.0, lw=1.6, **kw):
    """Mean over seeds (rows) with a +-1 std band; log=True: mean/std of log10 (geometric band)."""
    m = np.atleast_2d(np.asarray(matrix, float))
    if m.size == 0 or not np.isfinite(m).any():
        return None
    if ema:
        m = np.array([analysis.ema(row, ema) for row in m])
    if log:
        m = np.where(m > 0, np.log10(np.where(m > 0, m, 1.0)), np.nan)
    mu, sd = analysis.mean_std(m)
    lo, hi = mu - sd, mu + sd
    if log:
        mu, lo, hi = 10 ** mu, 10 ** lo, 10 ** hi
    x = np.asarray(x, float)[:mu.size]
    line, = ax.plot(x, mu, color=color, ls=ls, lw=lw, label=label, **kw)
    if (np.isfinite(m).sum(0) > 1).any():
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
    return line


def task_matrix(records: list[dict], fn) -> np.ndarray:
    return analysis.stack([fn(r) for r in records])


def acc_label(label: str, records: list[dict]) -> str:
    """Legend label with the run's final task accuracy (mean +- std over seeds) and divergences."""
    s = analysis.run_summary(records)
    f = s["final_acc"]
    out = f"{label}: final {f['mean']:.2f}" + (f"±{f['std']:.2f}" if f["n"] > 1 else "") \
        if math.isfinite(f["mean"]) else f"{label}: final n/a"
    if s["diverged"]:
        out += f", {s['diverged']}/{s['n_seeds']} diverged"
    return out


def mark_divergence(ax, records: list[dict], values, color, x0: float = 1.0) -> None:
    """An x at the last task of each diverged seed (task ids start at x0)."""
    for r, v in zip(records, values):
        if r.get("status") == "diverged":
            v = np.asarray(v, float)
            ok = np.flatnonzero(np.isfinite(v))
            if ok.size:
                ax.plot(ok[-1] + x0, v[ok[-1]], marker="x", ms=9, mew=2, color=color, ls="none")


def note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4",
            wrap=True)


def task_axis(ax, label: str = "Task ID") -> None:
    """An x axis of task ids: whole-number ticks (matplotlib's automatic ticks, minus fractional ones,
    which a 2-task run would otherwise get)."""
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True))


def task_curve(ax, records, fn, color, label, ls="-", log=False, ema=0.0, x0=1.0):
    """Per-task curve of fn(record) (mean +- std over seeds), divergences marked."""
    if not records:
        return None
    m = task_matrix(records, fn)
    line = band(ax, np.arange(m.shape[1]) + x0, m, color, label=label, ls=ls, log=log, ema=ema)
    mark_divergence(ax, records, [fn(r) for r in records], color, x0)
    return line


def decision_matrix(records: list[dict], key: str, layer: str = "1", task_filter=None, x="step"):
    """Seeds x decisions matrix of a layer's decision series, with x = optimiser step (or task + fraction)."""
    xs, ys = [], []
    for r in records:
        y = analysis.layer_series(r, layer, key) if layer != "mean" else analysis.layer_mean_series(r, key)
        tasks = analysis.decision_array(r, "task")
        xv = analysis.decision_array(r, "step") if x == "step" else tasks + 1 + analysis.decision_array(r, "task_frac")
        n = min(y.size, tasks.size, xv.size)
        if n == 0:
            continue
        keep = task_filter(tasks[:n]) if task_filter else np.ones(n, bool)
        xs.append(xv[:n][keep])
        ys.append(y[:n][keep])
    return align(xs, ys) if xs else (np.zeros(0), np.zeros((0, 0)))


def finish(fig, experiment: str, title: str, scale: str, runs: dict) -> None:
    seeds = sorted({r.get("seed") for recs in runs.values() for r in recs}, key=str)
    fig.suptitle(f"{PAPER_FIG.get(experiment, experiment)}: {title}  (scale {scale}, seeds {seeds})",
                 fontsize=12)
    fig.tight_layout()


def value_label(label: str, records: list[dict], fn, name: str, fmt: str = ".2f") -> str:
    """Legend label with the final-window mean of fn(record) (e.g. the final Hessian rank)."""
    s = analysis.stat([analysis.final_window_mean(fn(r), analysis.planned_tasks(r)) for r in records])
    return f"{label}: final {name} {s['mean']:{fmt}}" if math.isfinite(s["mean"]) else f"{label}: {name} n/a"


def arm_panels(axes, runs: dict, arms: tuple, fn=None, ylabel="Task accuracy (online)", ema=0.0,
               colors=ARM_COLORS, labels=ARM_LABELS, log=False, value_name=None, value_fmt=".2f"):
    """One panel per method (CReLU, L2, Wasserstein), one curve per arm; fn(record) = per-task values
    (default: online accuracy; then the legend gives the final accuracy, else final `value_name`)."""
    by = runs_by_method(runs)
    for ax, method in zip(axes, METHODS):
        arms_here = by.get(method, {})
        recs0 = next((runs[r] for r in arms_here.values() if runs[r]), [])
        ax.set_title(method_title(method, recs0))
        drawn = False
        for arm in arms:
            run = arms_here.get(arm)
            if run is None or not runs.get(run):
                continue
            recs = runs[run]
            label = (acc_label(labels.get(arm, arm), recs) if fn is None
                     else value_label(labels.get(arm, arm), recs, fn, value_name, value_fmt))
            task_curve(ax, recs, fn or (lambda r: analysis.task_values(r, "online_acc")), colors[arm], label,
                       ls=ARM_STYLES.get(arm, "-"), ema=ema, log=log)
            drawn = True
        if not drawn:
            note(ax, "no records")
        task_axis(ax)
        if drawn:
            ax.legend(loc="best")
            if log:
                ax.set_yscale("log")
    axes[0].set_ylabel(ylabel)
