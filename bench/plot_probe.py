"""Figure of the paper-scale probe (bench/paper_probe.py summaries) next to the paper's Fig. 5 levels.

    .venv/bin/python bench/plot_probe.py docs/gpu/probe_crelu.json docs/gpu/probe_l2.json \
        docs/gpu/probe_wass.json --out docs/gpu/probe.png --label "one H200"

One panel per method: our per-task online accuracy, one point per seed (red vanilla, blue per-layer
scheduler), and as dashed lines the paper's Fig. 5 values for the first tasks as read off the figure
(not our numbers).
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainability.methods import METHODS  # noqa: E402
from trainability.verdicts import PAPER_FIG5_EARLY  # noqa: E402   the paper's Fig. 5 at tasks 1 and 2

TITLES = {"crelu": "CReLU (LR 1e-2)", "l2": "L2 (1e-3)", "wass": "Wasserstein (1e-3)"}
COLORS = {"vanilla": "tab:red", "scheduled": "tab:blue"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", help="summary.json files written by bench/paper_probe.py")
    p.add_argument("--out", default="docs/gpu/probe.png")
    p.add_argument("--label", default=None, help="device named in the title (default: the summaries' device)")
    a = p.parse_args()
    runs = {}
    device = set()
    for f in a.summaries:
        s = json.load(open(f))
        device.add(s["device"])
        runs.update(s["runs"])
    methods = [m for m in METHODS if any(k.startswith(f"{m}-") for k in runs)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.6), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for i, arm in enumerate(("vanilla", "scheduled")):   # i: the two arms' offsets on the x axis
            for key, r in sorted(runs.items()):
                if key.split("/")[0] != f"{m}-{arm}":
                    continue
                tasks = [t + 1 + (i - 0.5) * 0.12 for t in range(len(r["online_acc"]))]
                ax.plot(tasks, r["online_acc"], "o", color=COLORS[arm], ms=5, alpha=0.8,
                        label=f"ours, {arm}" if key.endswith("seed0") else None)
            ax.axhline(PAPER_FIG5_EARLY[(m, arm)][0], color=COLORS[arm], ls="--", lw=1,
                       label=f"paper Fig. 5, {arm}")
        n_tasks = max(len(r["online_acc"]) for k, r in runs.items() if k.startswith(f"{m}-"))
        ax.set_xticks(range(1, n_tasks + 1))
        ax.set_xlim(0.5, n_tasks + 0.5)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("task")
        ax.set_title(TITLES[m], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("online task accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("The paper's stream (21,000 images x 250 epochs per task), first tasks, 3 seeds "
                 f"({a.label or ', '.join(sorted(device))})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
