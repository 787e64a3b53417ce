"""The paper's figures, drawn from run records (one function per figure; `FIGURES` dispatches) with the
helpers of trainability.plotting (curves: seed means with +-1 std bands; missing data gets a note).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import analysis
from .methods import METHOD_NAMES, METHODS, arm_of, method_of, methods_in
from .pipeline import figure_paths
from .plotting import (ARM_COLORS, ARM_LABELS, LAYER_COLORS, LENGTH_COLORS, PAIR_COLORS, acc_label, arm_panels, band,
                       decision_matrix, finish, mark_divergence, method_title, note, plt, runs_by_method, task_axis,
                       task_curve, task_matrix)
from .verdicts import FORMS, PAPER_FIG5_EARLY, STREAMS

FIG3_COLORS = {"alpha": "tab:blue", "alpha_vol": "tab:orange", "alpha_g": "tab:red", "alpha_tilde": "tab:green"}
FIG3_LABELS = {"alpha": r"$\alpha_t$ (layer 1)", "alpha_vol": r"$\alpha^\star_{vol}$",
               "alpha_g": r"$\alpha^\star_g$", "alpha_tilde": r"$\tilde\alpha^\star$"}
FIG4_COLORS = {"actual": "tab:blue", "combined": "tab:red", "noise": "tab:green", "vol": "tab:orange"}
FIG4_LABELS = {"actual": "actual", "combined": r"combined $\tilde\alpha^\star$", "noise": r"noise $\alpha^\star_g$",
               "vol": r"volatility $\alpha^\star_{vol}$"}
FIG4_NAMES = dict(METHOD_NAMES, relu="ReLU")   # panel titles of the vanilla runs
FIG2_TASKS = 20   # the paper's Fig. 2 shows the first 20 tasks


# ---------------------------------------------------------------- figures
def fig1(runs, ctx):
    """Paper Fig. 1: six counterexamples; each panel shows an indicator (dashed, right axis) and the task
    accuracy (solid, left axis) of two runs; the legend gives each run's final accuracy."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, (letter, title, ind, ra, rb, log) in zip(axes.flat, analysis.FIG1_PANELS):
        ax2 = ax.twinx()
        ax2.grid(False)
        handles = []
        for run, color in zip((ra, rb), PAIR_COLORS):
            recs = runs.get(run) or []
            if not recs:
                continue
            h = task_curve(ax, recs, lambda r: analysis.task_values(r, "online_acc"), color, acc_label(run, recs),
                           ema=ctx["ema"])
            task_curve(ax2, recs, lambda r, i=ind: analysis.indicator_values(r, i), color, None, ls="--",
                       log=log, ema=ctx["ema"])
            if h is not None:
                handles.append(h)
            if all(analysis.indicator_key(r, ind) is None for r in recs):
                ax2.text(0.02, 0.02, f"{run}: no '{ind}' in record", transform=ax2.transAxes, fontsize=8)
        if not handles:
            note(ax, f"no records for {ra}, {rb}")
        if log:
            ax2.set_yscale("log")
        ax.set_title(f"({letter}) {title}")
        task_axis(ax)
        ax.set_ylabel("Task accuracy (solid)")
        ax2.set_ylabel(f"{title} (dashed)")
        if handles:
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    finish(fig, "fig1", ctx["title"], ctx["scale"], runs)
    return fig


def fig2(runs, ctx):
    """Paper Fig. 2: volatility of normalised sharpness (mean over layers, dashed, log, per decision step)
    against task accuracy (solid, per task as a step over the task's span) for L2 at three LRs."""
    order = list(runs)   # params.yaml experiments.fig2.runs
    colors = ("tab:red", "tab:orange", "tab:purple")
    fig, axes = plt.subplots(1, len(order), figsize=(5 * len(order), 4.2), squeeze=False)
    for ax, run, color in zip(axes[0], order, colors):
        recs = runs.get(run) or []
        lr = (recs[0]["config"]["optim"]["lr"] if recs else float("nan"))
        shown = min(FIG2_TASKS, max(len(r['tasks']) for r in recs) if recs else 0)
        ax.set_title(f"L2 lr={lr:g}  (first {shown} tasks)")
        task_axis(ax, "Task ID (decision steps at task + fraction)")
        ax.set_ylabel("Task accuracy (solid)")
        if not recs:
            note(ax, "no records")
            continue
        m = task_matrix(recs, lambda r: analysis.task_values(r, "online_acc"))[:, :FIG2_TASKS]
        x = np.arange(m.shape[1] + 1) + 1.0
        mu, sd = analysis.mean_std(m)
        ax.stairs(mu, x, baseline=None, color=color, lw=1.8, label=acc_label("task accuracy", recs))
        if len(recs) > 1:
            ax.stairs(mu + sd, x, baseline=mu - sd, fill=True, color=color, alpha=0.18)
        mark_divergence(ax, recs, list(m), color, x0=1.5)
        ax2 = ax.twinx()
        ax2.grid(False)
        xv, vol = decision_matrix(recs, "vol", layer="mean", x="task", task_filter=lambda t: t < FIG2_TASKS)
        if xv.size and np.isfinite(vol).any():
            band(ax2, xv, vol, color, ls="--", log=True, ema=ctx["ema_steps"], lw=1.2,
                 label=r"Vol$_{\bar\lambda}$ (mean over layers)")
            ax2.set_yscale("log")
        else:
            note(ax2, "no volatility decisions in record")
        ax2.set_ylabel(r"Vol$_{\bar\lambda}$ (dashed)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best")
    finish(fig, "fig2", ctx["title"], ctx["scale"], runs)
    return fig


def fig3(runs, ctx):
    """Paper Fig. 3 (and 10-12): layer-1 effective step alpha vs alpha*_g, alpha*_vol and alpha_tilde*
    over optimiser steps (log y); rows = method, columns = first task, first 10 tasks, last task."""
    order = list(runs)   # params.yaml experiments.fig3.runs
    fig, axes = plt.subplots(len(order), 3, figsize=(15, 3.4 * len(order) + 0.6), squeeze=False)
    handles = None
    for row, run in zip(axes, order):
        recs = runs.get(run) or []
        n_done = min((len(r.get("tasks", [])) for r in recs), default=0)
        last = max(n_done - 1, 0)
        cols = (("task 1", lambda t: t == 0), (f"tasks 1-{min(10, max(n_done, 1))}", lambda t: t < 10),
                (f"task {last + 1} (last)", lambda t, l=last: t == l))
        for ax, (cname, filt) in zip(row, cols):
            ax.set_title(f"{method_title(method_of(run), recs)}: {cname}")
            drawn = False
            for key in ("alpha", "alpha_vol", "alpha_tilde", "alpha_g"):   # alpha_g dashed: often ~ alpha_tilde
                xv, m = decision_matrix(recs, key, layer="1", task_filter=filt)
                if xv.size and band(ax, xv, m, FIG3_COLORS[key], FIG3_LABELS[key], log=True,
                                    ls="--" if key == "alpha_g" else "-", ema=ctx["ema_steps"], lw=1.2) is not None:
                    drawn = True
            if drawn:
                ax.set_yscale("log")
                handles = handles or ax.get_legend_handles_labels()
            else:
                note(ax, "no decision records")
            ax.set_xlabel("Step")
        row[0].set_ylabel("effective step / bound")
    finish(fig, "fig3", ctx["title"], ctx["scale"], runs)
    if handles:   # one legend for all panels, above them (as in the paper)
        fig.subplots_adjust(top=1 - 0.9 / fig.get_figheight())
        fig.legend(*handles, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()),
                   frameon=False, fontsize=10)
    return fig


def fig4(runs, ctx):
    """Paper Fig. 4: per task, predicted accuracy = 1 - crossing fraction (per seed, affinely rescaled to
    that seed's actual range) for each bound, against the actual online accuracy; titles give the
    Spearman rank correlation (mean over seeds) of each predictor with the actual accuracy (ours)."""
    order = list(runs)   # params.yaml experiments.fig4.runs
    fig, axes = plt.subplots(1, len(order), figsize=(4.4 * len(order), 4.4), squeeze=False)
    names = {r: FIG4_NAMES.get(method_of(r), r) if arm_of(r) == "vanilla" else r for r in order}
    for ax, run in zip(axes[0], order):
        recs = runs.get(run) or []
        task_axis(ax)
        if not recs:
            ax.set_title(names.get(run, run))
            note(ax, "no records")
            continue
        acts = [analysis.task_values(r, "online_acc") for r in recs]
        band(ax, np.arange(1, max(map(len, acts)) + 1), analysis.stack(acts), FIG4_COLORS["actual"],
             FIG4_LABELS["actual"], lw=2.2)
        pred = analysis.prediction_summary(recs)
        rhos = []
        for p in analysis.PREDICTORS:
            resc = [analysis.affine_rescale(analysis.predicted_acc(r, p), a) for r, a in zip(recs, acts)]
            band(ax, np.arange(1, max(map(len, resc)) + 1), analysis.stack(resc), FIG4_COLORS[p], FIG4_LABELS[p],
                 ls="--")
            rho = pred[p]["spearman"]["mean"]
            raw = analysis.stack([analysis.predicted_acc(r, p) for r in recs])
            const = np.isfinite(raw).any() and analysis.nanstd(raw, 1).max() == 0
            rhos.append(f"{p} {rho:+.2f}" if math.isfinite(rho) else f"{p} const" if const else f"{p} n/a")
        mark_divergence(ax, recs, acts, FIG4_COLORS["actual"])
        ax.set_title(f"{names.get(run, run)}\nSpearman $\\rho$: " + ", ".join(rhos), fontsize=10)
    axes[0][0].set_ylabel("(Predicted) task accuracy")
    axes[0][0].legend(loc="best")
    finish(fig, "fig4", ctx["title"], ctx["scale"], runs)
    return fig


def fig5(runs, ctx):
    """Paper Fig. 5: task accuracy of vanilla vs reset vs per-layer scheduler, per method; with Eq. 2 as the
    paper writes it beside the scheduler where a scale runs both (the paper scale: the paper as run vs as
    written)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    arm_panels(axes, runs, ("vanilla", "reset", "scheduled", "eq2"), ema=ctx["ema"])
    finish(fig, "fig5", ctx["title"], ctx["scale"], runs)
    return fig


def fig6(runs, ctx):
    """Paper Fig. 6: the learned LR of each layer over optimiser steps (scheduled runs, log y); dotted
    vertical lines are task boundaries."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    by = runs_by_method(runs)
    for ax, method in zip(axes, METHODS):
        run = by.get(method, {}).get("scheduled")
        recs = runs.get(run) or []
        ax.set_title(method_title(method, recs))
        ax.set_xlabel("Step")
        layers = analysis.decision_layers(recs[0]) if recs else []
        drawn = False
        for i, l in enumerate(layers):
            xv, m = decision_matrix(recs, "lr", layer=l)
            if xv.size and band(ax, xv, m, LAYER_COLORS[i % len(LAYER_COLORS)], f"layer {l}", log=True,
                                ema=0.0) is not None:
                drawn = True
        if drawn:
            steps = analysis.decision_array(recs[0], "step")
            tasks = analysis.decision_array(recs[0], "task")
            for b in steps[1:][np.diff(tasks) > 0]:
                ax.axvline(b, color="0.6", ls=":", lw=0.8)
            init = recs[0]["config"]["optim"]["lr"]
            ax.axhline(init, color="0.3", lw=0.8, ls="-.", label=f"initial lr {init:g}")
            ax.set_yscale("log")
            ax.legend(loc="best")
        else:
            note(ax, "no LR decisions in record")
    axes[0].set_ylabel("Learning rate")
    finish(fig, "fig6", ctx["title"], ctx["scale"], runs)
    return fig


def fig7(runs, ctx):
    """Paper Figs. 7-8: task-length ablation of the scheduled runs: task accuracy (top) and the LR at the
    end of each task (bottom; geometric mean over layers) for short / base / long tasks."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    by = runs_by_method(runs)
    labels = {}
    for recs in runs.values():
        if recs:
            c = recs[0]["config"]
            labels[id(recs)] = f"{max(1, round(c['epochs_per_task'] * c['epochs_factor']))} epochs/task"
    for col, method in enumerate(METHODS):
        ax, axl = axes[0][col], axes[1][col]
        arms = by.get(method, {})
        recs0 = next((runs[r] for r in arms.values() if runs[r]), [])
        ax.set_title(method_title(method, recs0))
        drawn = False
        for arm in ("short", "scheduled", "long"):
            recs = runs.get(arms.get(arm)) or []
            if not recs:
                continue
            task_curve(ax, recs, lambda r: analysis.task_values(r, "online_acc"), LENGTH_COLORS[arm],
                       acc_label(labels[id(recs)], recs), ema=ctx["ema"])
            task_curve(axl, recs, lambda r: np.array([analysis.geomean(row) for row in analysis.task_lrs(r)]),
                       LENGTH_COLORS[arm], labels[id(recs)], log=True)
            drawn = True
        if not drawn:
            note(ax, "no records")
            note(axl, "no records")
        else:
            axl.set_yscale("log")
            axl.legend(loc="best")
            ax.legend(loc="best")
        task_axis(ax)
        task_axis(axl)
    axes[0][0].set_ylabel("Task accuracy (online)")
    axes[1][0].set_ylabel("LR at task end (geo. mean over layers)")
    finish(fig, "fig7", ctx["title"], ctx["scale"], runs)
    return fig


def fig9(runs, ctx):
    """Paper Fig. 9: "Hessian rank" (empirical-Fisher rank proxy at each task start), vanilla vs scheduled."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    arm_panels(axes, runs, ("vanilla", "scheduled"), fn=lambda r: analysis.indicator_values(r, "hessian_rank"),
               ylabel="Hessian rank (fraction)", ema=ctx["ema"], value_name="rank")
    for ax in axes:   # legend shows final accuracy; this figure is about rank
        task_axis(ax, "Task ID (rank measured at task start)")
    finish(fig, "fig9", ctx["title"], ctx["scale"], runs)
    return fig


def ablation_global(runs, ctx):
    """Appendix (v3): vanilla vs reset vs per-layer scheduler vs global scheduler."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    arm_panels(axes, runs, ("vanilla", "reset", "scheduled", "global"), ema=ctx["ema"])
    finish(fig, "ablation-global", ctx["title"], ctx["scale"], runs)
    return fig


def ablation_bound(runs, ctx):
    """Appendix (v3): the scheduler with the noise-only, curvature-only and combined bounds."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    labels = dict(ARM_LABELS, scheduled="combined bound")
    arm_panels(axes, runs, ("noise", "curvature", "scheduled"), ema=ctx["ema"], labels=labels)
    finish(fig, "ablation-bound", ctx["title"], ctx["scale"], runs)
    return fig


def ablation_authors(runs, ctx):
    """Beyond the paper: the scheduler with Eq. 2 as the paper writes it vs the authors' per-method
    settings [code] (statistic and beta), against vanilla: task accuracy (top), learned LR (bottom)."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    arms = ("vanilla", "scheduled", "authors")
    labels = dict(ARM_LABELS, scheduled="scheduler, paper's Eq. 2")
    arm_panels(axes[0], runs, arms, ema=ctx["ema"], labels=labels)
    arm_panels(axes[1], runs, arms, fn=lambda r: np.array([analysis.geomean(row) for row in analysis.task_lrs(r)]),
               ylabel="LR at task end (geo. mean over layers)", labels=labels, log=True, value_name="LR",
               value_fmt=".2e")
    finish(fig, "ablation-authors", ctx["title"], ctx["scale"], runs)
    return fig


STREAM_TICKS = {"": "authors' stream\n(60k, ramp)", "-noramp": "60k images,\nno ramp",
                "-appendix": "App. D.1:\n21k, no ramp"}


def ablation_stream(runs, ctx):
    """Beyond the paper's text: the stream the authors ran (60,000 images with the last partial batch,
    first-layer beta ramp) vs the same without the ramp vs App. D.1's 21,000 images. Left panels: task-1
    online accuracy per run (one dot per seed, bar = mean) against the paper's Fig. 5 level at task 1;
    right: the scheduled runs' per-layer LR through task 1 on the authors' stream."""
    methods = [m for m in methods_in(runs) if any(runs.get(f"{m}-{a}") for a in ("vanilla", "scheduled"))]
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(5.2 * (len(methods) + 1), 4.6), squeeze=False)
    axes = axes[0]
    # Eq. 2 as written beside the scheduled arm where a scale runs it (its scheduled arm is the authors' form)
    arms = ("vanilla", "scheduled") + (("eq2",) if any(r.endswith("-eq2") for r in runs) else ())
    w = len(arms) + 1
    for ax, method in zip(axes, methods):
        ticks, top = [], 0.2
        streams = [(suf, st) for suf, st in STREAMS.items()
                   if any(runs.get(f"{method}-{a}{suf}") for a in ("vanilla", "scheduled"))]
        for i, (suffix, stream) in enumerate(streams):
            for j, arm in enumerate(arms):
                recs = runs.get(f"{method}-{arm}{suffix}") or []
                x = i * w + j
                vals = [analysis.task_values(r, "online_acc")[0] for r in recs
                        if analysis.task_values(r, "online_acc").size]
                if vals:
                    ax.bar(x, np.mean(vals), color=ARM_COLORS[arm], alpha=0.55, width=0.8,
                           label=f"ours, {arm} (dots: seeds)" if i == 0 else None)
                    ax.plot([x] * len(vals), vals, "o", color=ARM_COLORS[arm], ms=5)
                    ax.text(x, np.mean(vals) + 0.01, f"{np.mean(vals):.2f}", ha="center", fontsize=8)
                    top = max(top, max(vals))
            ticks.append((i * w + (len(arms) - 1) / 2, STREAM_TICKS[suffix]))
        ax.set_ylim(0, top * 1.45)   # room for the legend above the bars
        ax.set_xlim(-0.8, w * max(len(streams), 2) - 1.2)
        for arm, ls in (("vanilla", "--"), ("scheduled", "-")):
            ax.axhline(PAPER_FIG5_EARLY[(method, arm)][0], color=ARM_COLORS[arm], ls=ls, lw=1.2,
                       label=f"paper Fig. 5 task 1, {arm}")
        ax.axhline(0.1, color="0.6", lw=0.8, ls=":")
        ax.set_xticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=8)
        recs0 = next((runs[r] for r in runs if r.startswith(method + "-") and runs[r]), [])
        ax.set_title(method_title(method, recs0) + ": task 1")
        ax.set_ylabel("Task accuracy (online), task 1")
        ax.legend(loc="upper left", fontsize=7)
    ax = axes[-1]
    for method, color in zip(methods, PAIR_COLORS + ("tab:green",)):
        recs = runs.get(f"{method}-scheduled") or []
        for layer, ls in zip(("1", "2", "3"), ("-", "--", ":")):
            x, m = decision_matrix(recs, "lr", layer, task_filter=lambda t: t == 0, x="task")
            if m.size:
                band(ax, x - 1, m, color, label=f"{METHOD_NAMES[method]} layer {layer}", ls=ls, log=True)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of task 1")
    ax.set_ylabel("learning rate (scheduled, authors' stream)")
    ax.set_title("Learned LR through task 1")
    if ax.lines:
        ax.legend(loc="best", fontsize=7)
    else:
        note(ax, "no decisions")
    finish(fig, "ablation-stream", ctx["title"], ctx["scale"], runs)
    return fig


FORM_COLORS = {"vanilla": "0.25", "scheduled": "tab:blue", "authors": "tab:red", "authors-nowarm": "tab:purple"}
FORM_TICKS = {"vanilla": "vanilla", "scheduled": "Eq. 2\nas written", "authors": "authors'\nbound", "authors-nowarm":
              "authors' bound,\nno warm, cool .95"}


def ablation_forms(runs, ctx):
    """Beyond the paper: the scheduler as the paper writes it (Eq. 2 and Algorithm 1) vs as the authors ran
    it (their per-method bound, with the Table 1 rule and with their camera-ready rule), on task 1 of the
    authors' stream. Top: task-1 online accuracy per form (dots = seeds, bar = mean) against the paper's
    Fig. 5 at task 1; bottom: each scheduled form's per-layer LR through task 1, with its cool / warm
    decision counts per layer (mean over seeds)."""
    methods = [m for m in METHODS if any(runs.get(f"{m}-{f}") for f in FORMS)]
    fig, axes = plt.subplots(2, len(methods), figsize=(5.4 * len(methods), 9.2), squeeze=False)
    for col, method in enumerate(methods):
        ax, top = axes[0, col], 0.2
        forms = [f for f in FORMS if f"{method}-{f}" in runs]
        for x, form in enumerate(forms):
            vals = [analysis.task_values(r, "online_acc")[0] for r in runs[f"{method}-{form}"]
                    if analysis.task_values(r, "online_acc").size]
            if vals:
                ax.bar(x, np.mean(vals), color=FORM_COLORS[form], alpha=0.55, width=0.8)
                ax.plot([x] * len(vals), vals, "o", color=FORM_COLORS[form], ms=5)
                ax.text(x, np.mean(vals) + 0.01, f"{np.mean(vals):.2f}", ha="center", fontsize=8)
                top = max(top, max(vals))
            else:
                ax.text(x, 0.02, "no data", ha="center", fontsize=8, rotation=90)
        for arm, ls in (("vanilla", "--"), ("scheduled", "-")):
            ax.axhline(PAPER_FIG5_EARLY[(method, arm)][0], color="k", ls=ls, lw=1.0,
                       label=f"paper Fig. 5 task 1, {'vanilla' if arm == 'vanilla' else 'scheduler'}")
        ax.axhline(0.1, color="0.6", lw=0.8, ls=":")
        ax.set_ylim(0, top * 1.35)
        ax.set_xticks(range(len(forms)), [FORM_TICKS[f] for f in forms], fontsize=8)
        recs0 = next((runs[r] for r in runs if r.startswith(method + "-") and runs[r]), [])
        ax.set_title(method_title(method, recs0) + ": task 1")
        ax.set_ylabel("Task accuracy (online), task 1")
        ax.legend(loc="upper left", fontsize=7)
        ax, text = axes[1, col], []
        for form in (f for f in forms if f != "vanilla"):
            recs = runs[f"{method}-{form}"]
            for layer, ls in zip(("1", "2", "3"), ("-", "--", ":")):
                x, m = decision_matrix(recs, "lr", layer, task_filter=lambda t: t == 0, x="task")
                if m.size:
                    band(ax, x - 1, m, FORM_COLORS[form], label=f"{FORM_TICKS[form].replace(chr(10), ' ')}, "
                         f"layer {layer}" if layer == "1" else None, ls=ls, log=True)
            rc = analysis.mean_rule_counts(recs)
            if rc:
                text.append(f"{FORM_TICKS[form].replace(chr(10), ' ')}: cool/warm per layer "
                            + ", ".join(f"{rc[k]['cool']:.0f}/{rc[k]['warm']:.0f}" for k in rc if k.isdigit()))
        ax.set_yscale("log")
        ax.set_xlabel("fraction of task 1 (layers: solid 1, dashed 2, dotted 3)")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{METHOD_NAMES[method]}: learned LR through task 1")
        if ax.lines:
            ax.legend(loc="upper right", fontsize=7)
            ax.text(0.0, -0.2, "\n".join(text), transform=ax.transAxes, fontsize=7, va="top")
        else:
            note(ax, "no decisions")
    finish(fig, "ablation-forms", ctx["title"], ctx["scale"], runs)
    return fig


FIGURES = {"fig1": fig1, "fig2": fig2, "fig3": fig3, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig7": fig7,
           "fig9": fig9, "ablation-global": ablation_global, "ablation-bound": ablation_bound,
           "ablation-authors": ablation_authors, "ablation-stream": ablation_stream, "ablation-forms": ablation_forms}


def make_figure(params: dict, scale: str, experiment: str, ema: float = 0.0, ema_steps: float = 0.6,
                log=print) -> list[str]:
    """Draw `experiment`'s figure from its records and write figures/<scale>/<experiment>.png and .pdf."""
    if experiment not in FIGURES:
        raise KeyError(f"no figure for experiment {experiment!r}; known: {sorted(FIGURES)}")
    runs = analysis.load_experiment(params, scale, experiment, log=log)
    ctx = {"scale": scale, "title": params["experiments"][experiment].get("title", experiment),
           "ema": ema, "ema_steps": ema_steps}
    fig = FIGURES[experiment](runs, ctx)
    paths = figure_paths(scale, experiment)
    Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    for p in paths:  # no timestamps in the files: a rerun regenerates them byte for byte
        fig.savefig(p, metadata={"CreationDate": None} if p.endswith(".pdf") else {"Software": None})
    plt.close(fig)
    log(f"wrote {', '.join(paths)}")
    return paths
