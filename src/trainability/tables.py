"""Tables: Table 1 (hyperparameters, from params.yaml), our results, and the paper's numbers beside ours.

Inputs are params.yaml and the experiments' summary.json files (written by analysis.aggregate); no
number of ours is typed in here. The paper's numbers and the verdict rules live in trainability.verdicts.
"""
from __future__ import annotations

import json
from pathlib import Path

from .analysis import load_summary, write_csv
from .config import deep_merge, experiment_names
from .pipeline import TABLES, table_paths
from .verdicts import FORMS_RULE, NODATA, NOT, PART, REP, STREAM_RULE, VERDICT_RULES, finite, tally, verdict_rows

# Tag of each run-config key, copied from the comments in params.yaml / docs/LEDGER.md
# (paper = stated in the paper, code = the authors' code, choice = ours).
TAGS = {
    "device": "choice", "threads": "choice", "cuda_graph": "choice", "decision_graph": "choice",
    "decision_step_graph": "choice", "fused_adam": "choice", "tf32": "choice",
    "n_tasks": "paper", "epochs_per_task": "paper",
    "epochs_factor": "choice (task-length ablation factor)", "batch_size": "paper", "arm": "paper",
    "stream.kind": "paper", "stream.n_images": "code (App. D.1 says 21,000)", "stream.label_fraction": "paper",
    "stream.drop_last": "code (the last partial minibatch is kept)",
    "model.activation": "paper", "model.rho": "paper (Fig. 1)", "model.widths": "paper",
    "model.batchnorm": "paper (Fig. 1)", "optim.lr": "paper", "optim.betas": "paper", "optim.eps": "paper",
    "optim.beta_ramp": "code (the authors' first-layer beta ramp)",
    "regularizer.kind": "paper (per run)", "regularizer.lam": "paper/code (per run)",
    "measure.enabled": "choice", "measure.every": "paper (K)", "measure.eig_tol": "choice (warm start)",
    "measure.eig_max_iter": "code", "measure.global": "paper (appendix variant)",
    "scheduler.variant": "paper", "scheduler.bound": "paper", "scheduler.safety": "paper (gamma)",
    "scheduler.cool": "paper (Table 1)", "scheduler.warm": "paper (Table 1)", "scheduler.floor": "code",
    "scheduler.warm_frac": "paper (Table 1)", "scheduler.warm_factor": "paper", "scheduler.window": "paper (W)",
    "scheduler.kappa": "choice", "scheduler.beta": "choice (paper: beta in [0, 1])",
    "scheduler.statistic": "choice (paper's Vol)", "scheduler.code_alpha_agg": "choice (code form: switch)",
    "indicators.enabled": "paper", "indicators.n_fixed": "paper",
    "data.root": "choice",
}
# per-method settings of the runs (docs/METHOD.md §2-3)
RUN_TAGS = {"crelu": "CReLU, LR 1e-2: code (camera-ready runs)", "l2": "coupled L2 1e-3: paper; coupling: code",
            "wass": "Wasserstein-to-init 1e-3: code", "relu": "plain ReLU: paper",
            "bn": "BatchNorm MLP: paper Fig. 1 / code", "leaky": "LeakyReLU: paper Fig. 1",
            "linear": "deep linear: paper Fig. 1"}

# ---------------------------------------------------------------- helpers
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def show(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def collect(params: dict, scale: str) -> dict:
    """{experiment: summary dict or None}."""
    return {e: load_summary(params, scale, e) for e in experiment_names(params, scale)}


def any_run(summaries: dict, run: str) -> dict | None:
    for s in summaries.values():
        if s and run in s.get("runs", {}):
            return s["runs"][run]
    return None


# ---------------------------------------------------------------- Table 1
def table1(params: dict, scale: str) -> str:
    """Table 1: the hyperparameters of the scale (run_defaults <- scales[scale].run), tagged. Rows in
    sorted order, so Snakemake's jobs (which read params key-sorted) and DVC's (params.yaml's order) write
    the same bytes."""
    base = flatten(params["run_defaults"])
    cfg = flatten(deep_merge(params["run_defaults"], params["scales"][scale].get("run")))
    rows = []
    for k, v in sorted(cfg.items()):
        if k.startswith("wandb."):
            continue
        tag = TAGS.get(k, "choice")
        if k in base and base[k] != v:
            tag = f"choice (scale `{scale}`; default {show(base[k])}: {tag})"
        rows.append([f"`{k}`", show(v), tag])
    refined = params["scales"][scale].get("families", {})   # the scale's refinements, merged in
    families = [[f"`{f}`", f"`{json.dumps(deep_merge(o or {}, refined.get(f)), sort_keys=True)}`",
                 RUN_TAGS.get(f, "") + (f"; refined by `scales.{scale}.families`" if f in refined else "")]
                for f, o in sorted(params.get("families", {}).items())]
    runs = [[f"`{r}`", f"`{json.dumps(o or {}, sort_keys=True)}`", RUN_TAGS.get(r.split("-")[0], "")]
            for r, o in sorted(params["runs"].items())]
    return (f"# Table 1: hyperparameters (scale `{scale}`)\n\n"
            f"Generated from params.yaml: `run_defaults` overridden by `scales.{scale}.run`. "
            f"Seeds: {params['scales'][scale]['seeds']}. {params['scales'][scale].get('description', '')}\n\n"
            + table(["setting", "value", "tag"], rows)
            + "\n## Families (settings shared by a method's runs, with the scale's refinements)\n\n"
            + table(["family", "settings", "tag"], families)
            + "\n## Runs (overrides of the settings above, after the family they extend)\n\n"
            + table(["run", "overrides", "tag"], runs))


# ---------------------------------------------------------------- results
RESULT_COLUMNS = ("method", "arm", "run", "n_seeds", "diverged", "final_acc_mean", "final_acc_std",
                  "mean_acc_mean", "mean_acc_std", "first_acc_mean", "final_lr_mean", "mean_acc_per_seed")


def result_rows(params: dict, summaries: dict) -> list[dict]:
    """One row per run that some experiment summarised, by run name (whatever params' key order)."""
    rows = []
    for run in sorted(params["runs"]):
        s = any_run(summaries, run)
        if s is None:
            continue
        method, _, arm = run.partition("-")
        rows.append({"method": method, "arm": arm or "-", "run": run, "n_seeds": s["n_seeds"],
                     "diverged": s["diverged"],
                     "final_acc_mean": s["final_acc"]["mean"], "final_acc_std": s["final_acc"]["std"],
                     "mean_acc_mean": s["mean_acc"]["mean"], "mean_acc_std": s["mean_acc"]["std"],
                     "first_acc_mean": s["first_acc"]["mean"], "final_lr_mean": s["final_lr"]["mean"],
                     # per-seed values let a rerun of one seed be checked against the committed table
                     "mean_acc_per_seed": ";".join(repr(x) for x in s["mean_acc"].get("per_seed", []))})
    return rows


def results_md(rows: list[dict], scale: str) -> str:
    def pm(m, s):
        return f"{m:.3f} ± {s:.3f}" if finite(m) else "n/a"
    body = [[r["method"], r["arm"], f"`{r['run']}`", r["n_seeds"], r["diverged"],
             pm(r["final_acc_mean"], r["final_acc_std"]), pm(r["mean_acc_mean"], r["mean_acc_std"]),
             f"{r['final_lr_mean']:.2e}" if finite(r["final_lr_mean"]) else "n/a"] for r in rows]
    return (f"# Results (scale `{scale}`)\n\nOnline task accuracy, mean ± std over seeds (ddof=0). "
            "final = mean over the last 10% of tasks (at least the last); mean = over all tasks; "
            "final LR = geometric mean over layers at the end of the last task.\n\n"
            + table(["method", "arm", "run", "seeds", "diverged", "final acc", "mean acc", "final LR"], body))


def write_results_csv(rows: list[dict], path) -> None:
    write_csv(rows, path, RESULT_COLUMNS)


# ---------------------------------------------------------------- paper vs ours
def paper_vs_ours(params: dict, scale: str, summaries: dict) -> str:
    """The paper-vs-ours table (markdown): the tally, the verdict rules and one row per claim."""
    paper_scale = scale.startswith("paper")
    rows = verdict_rows(params, scale, summaries)
    counts = tally(rows)
    scale_note = (f"Scale `{scale}` runs the paper's stream and model: numbers are compared with the paper's"
                  + (" (first task only)." if scale != "paper" else ".") if paper_scale else
                  f"Scale `{scale}` is smaller than the paper's (fewer and shorter tasks, fewer images): "
                  "absolute accuracies are not comparable, so rows with paper numbers are judged on the "
                  "qualitative direction only and marked \"(qualitative)\".")
    missing = [e for e, s in summaries.items() if s is None]
    return (f"# Paper vs ours (scale `{scale}`)\n\n{scale_note}\n"
            + (f"\nMissing summaries: {', '.join(missing)}.\n" if missing else "")
            + f"\nTally: {counts[REP]} reproduced, {counts[PART]} partly, {counts[NOT]} not reproduced, "
              f"{counts[NODATA]} no data.\n\n" + VERDICT_RULES
            + (STREAM_RULE if "ablation-stream" in summaries else "")
            + (FORMS_RULE if "ablation-forms" in summaries else "") + "\n"
            + table(["claim", "paper", "ours", "verdict"], rows))


def write_tables(params: dict, scale: str, log=print) -> list[str]:
    """Write figures/<scale>/tables/{table1.md, results.md, results.csv, paper_vs_ours.md}."""
    paths = dict(zip(TABLES, table_paths(scale)))
    Path(paths["table1.md"]).parent.mkdir(parents=True, exist_ok=True)
    summaries = collect(params, scale)
    rows = result_rows(params, summaries)
    Path(paths["table1.md"]).write_text(table1(params, scale))
    Path(paths["results.md"]).write_text(results_md(rows, scale))
    write_results_csv(rows, paths["results.csv"])
    Path(paths["paper_vs_ours.md"]).write_text(paper_vs_ours(params, scale, summaries))
    paths = list(paths.values())
    log(f"wrote {', '.join(paths)}")
    return paths
