"""Write a scale's tables: Table 1 (hyperparameters, from params.yaml), results.md/.csv (from the
experiments' summary.json) and paper_vs_ours.md (the paper's numbers beside ours, with verdicts).

Writes figures/<scale>/tables/. All logic lives in trainability.tables.

    python workflow/scripts/tables.py --scale smoke
"""
import sys

from trainability.config import params_and_scale, params_parser
from trainability.tables import write_tables


def main(argv=None) -> int:
    p = params_parser(description=__doc__)
    args = p.parse_args(argv)
    params, scale = params_and_scale(args.params, args.scale)
    write_tables(params, scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
