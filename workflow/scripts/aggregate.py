"""Aggregate one experiment's run records over seeds.

Writes results/<scale>/experiments/<experiment>/summary.json (strict JSON, DVC metrics) and curves.csv
(long format for `dvc plots`). All logic lives in trainability.analysis.

    python workflow/scripts/aggregate.py --scale smoke --experiment fig5
"""
import argparse
import sys

from trainability.analysis import aggregate
from trainability.config import load_params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--scale", default=None, help="entry of `scales` (default: params.yaml's `scale`)")
    p.add_argument("--experiment", required=True, help="entry of `experiments` in params.yaml")
    args = p.parse_args(argv)
    params = load_params(args.params)
    scale = args.scale or params["scale"]
    if args.experiment not in params["experiments"]:
        p.error(f"unknown experiment {args.experiment!r}; known: {sorted(params['experiments'])}")
    aggregate(params, scale, args.experiment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
