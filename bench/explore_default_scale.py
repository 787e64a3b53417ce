"""Exploration behind the `default` scale (issue: a CPU-sized configuration where the claims show).

Runs vanilla vs per-layer-scheduled for a method at several stream sizes (seed 0, W&B off, indicators
off) and draws per-task online accuracy for each candidate into one figure:

    .venv/bin/python bench/explore_default_scale.py --out docs/exploration            # run + plot
    .venv/bin/python bench/explore_default_scale.py --candidates H --seeds 1 2        # more seeds of one
    .venv/bin/python bench/explore_default_scale.py --out docs/exploration --plot-only

Candidates are `--set` overrides of the `default` scale's run config; edit CANDIDATES to try others.
Each run is an ordinary `trainability-run`, so its record.json sits under OUT/runs/<candidate>/<run>/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CANDIDATES = {  # name: (description, overrides)
    "A: 2560 img x 60 ep": ("2,560 images, 60 epochs/task, K=10",
                            ["stream.n_images=2560", "epochs_per_task=60", "measure.every=10"]),
    "B: 10240 img x 25 ep": ("10,240 images, 25 epochs/task, K=10",
                             ["stream.n_images=10240", "epochs_per_task=25", "measure.every=10"]),
    "C: 4096 img x 40 ep": ("4,096 images, 40 epochs/task, K=10",
                            ["stream.n_images=4096", "epochs_per_task=40", "measure.every=10"]),
    "E: default, beta2 0.99": ("the default stream with Adam beta2 = 0.99 (second-moment memory ~100 steps)",
                               ["stream.n_images=4096", "epochs_per_task=24", "n_tasks=6", "measure.every=16",
                                "optim.betas=[0.9,0.99]"]),
    "G: 1024 img x 100 ep, beta2 0.99": ("1,024 images, 100 epochs/task (memorised early), Adam beta2 0.99, K=10",
                                         ["stream.n_images=1024", "epochs_per_task=100", "n_tasks=6",
                                          "measure.every=10", "optim.betas=[0.9,0.99]"]),
    "H: 2560 img x 60 ep, beta2 0.99": ("candidate A's stream with Adam beta2 0.99, 6 tasks",
                                        ["stream.n_images=2560", "epochs_per_task=60", "n_tasks=6",
                                         "measure.every=10", "optim.betas=[0.9,0.99]"]),
    "R: default, authors' beta ramp": ("the default stream with the authors' layer-1 Adam beta ramp [code quirk]",
                                       ["stream.n_images=4096", "epochs_per_task=24", "n_tasks=6",
                                        "measure.every=16", "optim.beta_ramp=true"]),
    "D: default scale": ("the chosen default: 4,096 images, 24 epochs/task, 6 tasks, K=16 (seed 0 of the DAG)",
                         ["stream.n_images=4096", "epochs_per_task=24", "n_tasks=6", "measure.every=16"]),
}
RUNS = ["l2-vanilla", "l2-scheduled", "crelu-vanilla", "crelu-scheduled", "wass-vanilla", "wass-scheduled"]


def run_one(out: Path, cand: str, run: str, seed: int = 0) -> None:
    letter = cand.split(":")[0]
    d = out / "runs" / letter / run if seed == 0 else out / "runs" / f"{letter}-seeds" / run / f"seed{seed}"
    if (d / "record.json").exists():
        return
    sets = [a for o in CANDIDATES[cand][1] + ["wandb.mode=disabled", "indicators.enabled=false"]
            for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "trainability.train", "--scale", "default", "--run", run,
                    "--seed", str(seed), "--out", str(d), "--no-progress", *sets], check=True)


DAG_RECORD = "results/default/runs/{run}/seed{seed}/record.json"   # candidate D = the default DAG's runs


def _records(out: Path, cand: str, run: str):
    """(seed, record path) of a candidate's run: seed 0 from the exploration, further seeds from
    OUT/runs/<letter>-seeds/<run>/seed<s>/ (run by hand for the candidates worth a second look), and for
    D the default DAG's three seeds (the same config; indicators do not change the training)."""
    letter = cand.split(":")[0]
    if letter == "D":
        return [(s, Path(DAG_RECORD.format(run=run, seed=s))) for s in (0, 1, 2)]
    found = [(0, out / "runs" / letter / run / "record.json")]
    found += [(int(d.name[4:]), d / "record.json")
              for d in sorted((out / "runs" / f"{letter}-seeds" / run).glob("seed*"))]
    return found


def collect(out: Path) -> Path:
    """Per-task online accuracy of every finished exploration run -> OUT/exploration.csv (committed;
    the records themselves are large and stay local)."""
    rows = ["candidate,run,seed,task,online_acc"]
    for cand in CANDIDATES:
        for run in RUNS:
            for seed, f in _records(out, cand, run):
                if f.exists():
                    rows += [f"{cand.split(':')[0]},{run},{seed},{t['task']},{t['online_acc']:.6f}"
                             for t in json.loads(f.read_text())["tasks"]]
    path = out / "exploration.csv"
    if len(rows) > 1:
        path.write_text("\n".join(rows) + "\n")
    return path


def plot(out: Path) -> None:
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data: dict = {}
    with open(collect(out)) as f:
        for r in csv.DictReader(f):
            data.setdefault((r["candidate"], r["run"]), {}).setdefault(int(r["seed"]), []).append(
                (int(r["task"]) + 1, float(r["online_acc"])))
    methods = ["l2", "crelu", "wass"]
    cands = [c for c in CANDIDATES if any(k[0] == c.split(":")[0] for k in data)]   # rows with runs only
    fig, axes = plt.subplots(len(cands), 3, figsize=(12, 3 * len(cands)), squeeze=False)
    for i, cand in enumerate(cands):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            for arm, color in (("vanilla", "tab:red"), ("scheduled", "tab:blue")):
                for seed, pts in sorted(data.get((cand.split(":")[0], f"{m}-{arm}"), {}).items()):
                    ax.plot(*zip(*pts), color=color, marker="." if seed == 0 else None,
                            lw=1.5 if seed == 0 else 0.8, alpha=1.0 if seed == 0 else 0.6,
                            label=arm if seed == 0 else None)
            ax.set_title(f"{cand} | {m}", fontsize=9)
            ax.set_ylim(0.05, 1.0)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("online task accuracy")
            if i == len(cands) - 1:
                ax.set_xlabel("task")
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.suptitle("Exploration for the default scale (red vanilla, blue per-layer scheduler; "
                 "seed 0 with markers, further seeds thin where run)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))   # leave room for the suptitle
    fig.savefig(out / "exploration.png", dpi=120)
    print(f"wrote {out / 'exploration.png'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/exploration")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--candidates", nargs="+", default=None, help="letters to run (default: all), e.g. A D")
    p.add_argument("--runs", nargs="+", default=RUNS, help="runs to run (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to run (default: 0)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        with ThreadPoolExecutor(args.jobs) as ex:
            todo = [(c, r, s) for c in CANDIDATES for r in args.runs for s in args.seeds
                    if args.candidates is None or c.split(":")[0] in args.candidates]
            list(ex.map(lambda crs: run_one(out, *crs), todo))
    plot(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
