"""How far a rounding-sized nudge moves a run's record: each run trained twice by the single-model engine on
the CPU, the second time with its initial weights multiplied by (1 + eps * N(0, 1)), and the record fields
that then differ beyond --rtol counted (tests/test_batched.py's comparison).

    .venv/bin/python bench/rounding_sensitivity.py                  # eps 1e-7, rtol 5e-3, the tests' tiny runs

Why: on a GPU the batched and the single engine sum in different orders (baddbmm against addmm), so their
records can agree only as far as a run is insensitive to rounding. A run whose record moves under a 1e-7
nudge cannot be compared at 5e-3 to the end of its tasks (tests/test_batched.py's `rounding_chaotic`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]
from test_batched import _close, _comparable   # noqa: E402
from test_train import tiny                    # noqa: E402

from trainability import train                 # noqa: E402

STREAMS = {   # the two streams of tests/test_batched.py's mixed batches
    "authors": {"stream": {"n_images": 600, "drop_last": False}, "optim": {"beta_ramp": True}, "measure": {"every": 3},
                "scheduler": {"floor": 0.0, "warm_frac": 1.0, "warm_factor": 1.0}},
    "appendix": {"scheduler": {"floor": 0.0, "warm_frac": 1.0, "warm_factor": 1.0}},
}


def nudged(build, eps: float):
    def build_nudged(*args, **kwargs):
        model = build(*args, **kwargs)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + eps * torch.randn(p.shape, generator=g))
        return model
    return build_nudged


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["l2-vanilla", "l2-reset", "l2-scheduled", "wass-vanilla", "wass-scheduled"])
    p.add_argument("--eps", type=float, default=1e-7)
    p.add_argument("--rtol", type=float, default=5e-3)
    p.add_argument("--data-root", default="data")
    a = p.parse_args()
    build = train.build_model
    print(f"fields beyond rtol {a.rtol} after a {a.eps:g} relative nudge of the initial weights (tiny runs, CPU)")
    for stream, over in STREAMS.items():
        for name in a.runs:
            cfg = tiny(name, data={"root": a.data_root}, **over)
            with tempfile.TemporaryDirectory() as t:
                train.build_model = build
                base = train.run(cfg, Path(t) / "a", progress=False)
                train.build_model = nudged(build, a.eps)
                moved = train.run(cfg, Path(t) / "b", progress=False)
            train.build_model = build
            diffs = _close(_comparable(base), _comparable(moved), a.rtol)
            example = next((d for d in diffs if "decisions" in d), "")
            print(f"{stream:>9} {name:>15}: {len(diffs):4d} fields  {example}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
