"""Where a paper-scale job's GPU time goes, drawn from bench/decision_profile.py's and bench/project_paper.py's
JSON (bench/gpu_check.sh steps 2 and 3):

    .venv/bin/python bench/plot_gpu_profile.py \
        --profiles docs/gpu/h100/decision_profile_run4.json docs/gpu/h100/decision_profile_run5.json \
        --profile-names "eager decisions" "decision_graph" \
        --projections docs/gpu/h100/projection_run1.json docs/gpu/h100/projection_run4.json \
        docs/gpu/h100/projection_run5.json \
        --names "run 1: eager decisions" "run 4: eager decisions" "run 5: decision_graph" \
        --out docs/gpu/h100/profile.png

Left: per job and profile file (one bar each), the time of K = 40 steps (one decision and K - 1 plain steps)
split into the plain steps, the decision's Lanczos (with decision_graph: the gradient and rounds replayed
from a CUDA graph, then the host's rule and the eager rounds), Algorithm 1 and the rest of the decision
step. Middle: one round of Hessian-vector products eager against replayed from a CUDA graph (first
profile). Right: each job's projected hours for the whole paper scale, one bar per projection file.
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt   # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", nargs="+", required=True, help="decision_profile.py JSON files")
    p.add_argument("--profile-names", nargs="*", default=None, help="one name per profile file")
    p.add_argument("--projections", nargs="*", default=[], help="project_paper.py JSON files")
    p.add_argument("--label", default="one H100")
    p.add_argument("--names", nargs="*", default=None, help="one legend name per projection file")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    profiles = [json.load(open(f)) for f in a.profiles]
    pnames = a.profile_names or [f.rsplit("/", 1)[-1] for f in a.profiles]
    rows = profiles[0]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.6, 1, 1.3]})
    names = [f"{r['job'].removeprefix('batch-')}\n({r['models']} models)" for r in rows]
    ax = axes[0]
    parts = [("plain steps (39)", lambda r: (r["K"] - 1) * r["plain_ms"], "#4c72b0"),
             ("gradient + 16 rounds, CUDA graph", lambda r: r.get("ahead_ms", 0.0), "#c44e52"),
             ("Lanczos rounds (host rule, eager rounds)", lambda r: r["lanczos_ms"] - r.get("ahead_ms", 0.0),
              "#dd8452"),
             ("Algorithm 1", lambda r: r["scheduler_ms"], "#55a868"),
             ("rest of the decision step", lambda r: r["rest_ms"], "#8172b3")]
    w = 0.8 / len(profiles)
    for k, prof in enumerate(profiles):
        by_job = {r["job"]: r for r in prof}
        xs = [i - 0.4 + w * (k + 0.5) for i in range(len(rows))]
        bottom = [0.0] * len(rows)
        for label, f, color in parts:
            vals = [f(by_job[r["job"]]) if r["job"] in by_job else 0.0 for r in rows]
            ax.bar(xs, vals, w, bottom=bottom, label=label if k == 0 else None, color=color,
                   hatch="//" if k else None, edgecolor="white", linewidth=0.5)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, r in zip(xs, rows):
            if r["job"] in by_job:
                ax.text(x, bottom[xs.index(x)], f"{pnames[k]}\n{100 * by_job[r['job']]['decision_share']:.0f}%",
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("ms per 40 steps (one decision)")
    ax.set_title(f"a job's time per decision interval ({a.label}); % = decisions' share")
    ax.legend(fontsize=7)

    ax = axes[1]
    hv = [(n, r["hvp_round"]) for n, r in zip(names, rows) if "hvp_round" in r]
    xs = range(len(hv))
    ax.bar([x - 0.2 for x in xs], [h["eager_ms"] for _, h in hv], 0.4, label="eager", color="#dd8452")
    ax.bar([x + 0.2 for x in xs], [h.get("graph_ms", float("nan")) for _, h in hv], 0.4,
           label="CUDA graph replay (bit-equal)", color="#4c72b0")
    for x, (_, h) in zip(xs, hv):
        if "graph_ms" not in h:
            ax.text(x + 0.2, 0.1, "capture\nfailed", ha="center", fontsize=7)
    ax.set_xticks(list(xs), [n for n, _ in hv], fontsize=8)
    ax.set_ylabel("ms per round of products")
    ax.set_title("one Lanczos round of HVPs")
    ax.legend(fontsize=8)

    ax = axes[2]
    projs = [json.load(open(f)) for f in a.projections]
    if projs:
        jobs = [j["job"] for j in projs[0]["jobs"]]
        w = 0.8 / len(projs)
        names_p = a.names or [f.rsplit("/", 1)[-1] for f in a.projections]
        for k, (f, pr) in enumerate(zip(names_p, projs)):
            hours = {j["job"]: j["hours"] for j in pr["jobs"]}
            ax.bar([i - 0.4 + w * (k + 0.5) for i in range(len(jobs))], [hours.get(j, float("nan")) for j in jobs], w,
                   label=f"{f}: {pr['sequential_hours']:.1f} h in all, one job at a time")
        top = max(j["hours"] for pr in projs for j in pr["jobs"])
        ax.set_ylim(0, 1.35 * top)   # room for the legend above the bars
        ax.axhline(3.0, color="k", ls="--", lw=0.8)
        ax.text(len(jobs) - 0.5, 3.05, "the issue's goal for the whole scale: 3 h", ha="right", va="bottom", fontsize=7)
        ax.set_xticks(range(len(jobs)), [j.removeprefix("batch-") for j in jobs], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("projected hours, 40 tasks")
        ax.set_title("paper scale, per job (projected from measured steps)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
