"""Write a scale's tables: Table 1 (hyperparameters, from params.yaml), results.md/.csv (from the
experiments' summary.json) and paper_vs_ours.md (the paper's numbers beside ours, with verdicts).

Writes figures/<scale>/tables/. All logic lives in trainability.tables.

    python workflow/scripts/tables.py --scale smoke
"""
import argparse
import sys

from trainability.config import load_params
from trainability.tables import write_tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--scale", default=None, help="entry of `scales` (default: params.yaml's `scale`)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    write_tables(params, args.scale or params["scale"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
