"""The batched engine's command, `python -m trainability.batched` (the Snakefile's and dvc.yaml's)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from .. import config
from ..data import DataError
from ..devices import pick_device
from ..planning import check_batchable, stack_phases
from ..record import RECORD_NAME, DamagedFileError, RunFolderError, run_folder_lock
from .engine import run_batched


def build_parser():
    p = config.params_parser(
        prog="python -m trainability.batched",
        description="Train several runs x seeds as one batched model (same architecture and stream; the task "
                    "lengths may differ) and write each run's record.json where trainability-run would.",
        epilog="example: python -m trainability.batched --scale smoke --runs l2-vanilla l2-scheduled --seeds 0 1")
    p.add_argument("--runs", nargs="+", required=True, help="entries of `runs` in params.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the scale's seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every run config (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints/records")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check that the runs can be batched, print the plan")
    return p


def main(argv=None) -> int:
    from ..pipeline import run_dir
    args = build_parser().parse_args(argv)
    try:
        params, scale = config.params_and_scale(args.params, args.scale)
        seeds = args.seeds or params["scales"][scale]["seeds"]
        jobs = [(r, s) for r in args.runs for s in seeds]
        cfgs = [config.resolve_with_sets(params, scale, r, s, args.set) for r, s in jobs]
        check_batchable(cfgs)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dirs = [run_dir(params, scale, r, s) for r, s in jobs]
    if args.dry_run:
        print(f"{len(jobs)} models in one batch on {pick_device(cfgs[0]['device'])}:")
        for (r, s), d in zip(jobs, dirs):
            print(f"  {r} seed {s} -> {d}/{RECORD_NAME}")
        phases = stack_phases(cfgs)
        if len(phases) > 1:   # task lengths differ: the stack sheds the shorter ones' runs as they end
            print("the stack: " + ", then ".join(f"{len(m)} models for {e} epochs" for m, e, _ in phases))
        return 0
    try:
        with contextlib.ExitStack() as locks:   # every run's folder, as trainability-run holds its one
            for d in dirs:
                locks.enter_context(run_folder_lock(Path(d)))
            recs = run_batched(cfgs, dirs, metas=[{"run": r, "scale": scale} for r, _ in jobs], resume=not args.fresh,
                               progress=not args.no_progress)
    except (RunFolderError, DataError, DamagedFileError) as e:   # one line: the file and the remedy
        print(f"error: {e}", file=sys.stderr)
        return 2
    for (r, s), rec in zip(jobs, recs):
        accs = " ".join(f"{t['online_acc']:.3f}" for t in rec["tasks"])
        print(f"{r} seed {s}: {rec['status']}; online acc per task {accs}")
    return 0 if all(r["status"] in ("completed", "diverged") for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
