"""What the `tf32` key does to speed and to the records: one short task of the paper's stream, batched,
trained twice side by side (tf32 off, then on), with the same seeds.

    python bench/tf32_effect.py --device cuda --epochs 10          # bench/gpu_check.sh step 3
    python bench/tf32_effect.py --device cpu --epochs 1 --set stream.n_images=2560   # a try-out (no TF32 on a CPU)

Prints the task's wall time for each setting, each model's online and end-of-task accuracy, end loss
and final layer-1 learning rate for both, and the largest relative difference of each decision field
(lam_max, alpha, grad_sq, ...) between the two runs. TF32 keeps 10 mantissa bits in matmul products,
so differences start at ~1e-3 and training's chaos grows them; this measures how far, for one task.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from trainability import config
from trainability.stacked.engine import run_batched


def _max_rel(a: list, b: list) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
             and math.isfinite(x) and math.isfinite(y)]
    return max((abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in pairs), default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--scale", default="paper")
    p.add_argument("--runs", nargs="+", default=["l2-vanilla", "l2-scheduled", "wass-scheduled"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs of the one task")
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    params, scale = config.params_and_scale(a.params, a.scale)
    sets = a.set + [f"device={a.device}", "n_tasks=1", f"epochs_per_task={a.epochs}", "indicators.enabled=false"]
    jobs = [(r, s) for r in a.runs for s in a.seeds]
    recs = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a one-epoch warm-up first (CUDA context, cuBLAS handles), so neither timed run pays for them
        for name, tf32, extra in (("warm-up", False, ["epochs_per_task=1"]), ("off", False, []), ("on", True, [])):
            cfgs = [config.resolve_with_sets(params, scale, r, s, sets + extra + [f"tf32={str(tf32).lower()}"])
                    for r, s in jobs]
            recs[name] = run_batched(cfgs, [Path(tmp) / name / f"m{i}" for i in range(len(cfgs))],
                                     resume=False, progress=False)
    off, on = recs["off"], recs["on"]
    print(f"{len(jobs)} models, one task of {a.epochs} epochs ({off[0]['tasks'][0]['steps']} steps) on {a.device}: "
          f"wall {off[0]['tasks'][0]['wall_s']:.1f} s with tf32 off, {on[0]['tasks'][0]['wall_s']:.1f} s on "
          f"(on/off {on[0]['tasks'][0]['wall_s'] / off[0]['tasks'][0]['wall_s']:.2f})")
    print(f"{'run':<16} {'seed':>4}  {'online acc off/on':>19}  {'end acc off/on':>17}  {'end loss off/on':>19}  "
          f"{'layer-1 lr off/on':>21}")
    for (r, s), x, y in zip(jobs, off, on):
        tx, ty = x["tasks"][0], y["tasks"][0]
        print(f"{r:<16} {s:>4}  {tx['online_acc']:>9.4f}/{ty['online_acc']:<9.4f}  "
              f"{tx['end_acc']:>8.4f}/{ty['end_acc']:<8.4f}  {tx['end_loss']:>9.4f}/{ty['end_loss']:<9.4f}  "
              f"{tx['lr'][0]:>10.3e}/{ty['lr'][0]:<10.3e}")
    fields = sorted({f for rec in off for series in rec["decisions"]["layers"].values() for f in series
                     if f not in ("rule", "eig_iters")})
    if fields:
        print("largest relative difference over every decision of the measuring models, off vs on:")
        for f in fields:
            d = [_max_rel(x["decisions"]["layers"][l][f], y["decisions"]["layers"][l][f])
                 for x, y in zip(off, on) for l in x["decisions"]["layers"] if f in x["decisions"]["layers"][l]]
            print(f"  {f:<12} {max(d, default=0.0):.2e}")


if __name__ == "__main__":
    main()
