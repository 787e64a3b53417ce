"""Aggregate one experiment's run records over seeds.

Writes results/<scale>/experiments/<experiment>/summary.json (strict JSON, DVC metrics) and curves.csv
(long format for `dvc plots`). All logic lives in trainability.analysis.

    python workflow/scripts/aggregate.py --scale smoke --experiment fig5
"""
import sys

from trainability.analysis import aggregate
from trainability.config import params_and_scale, params_parser
from trainability.record import DamagedFileError


def main(argv=None) -> int:
    p = params_parser(description=__doc__)
    p.add_argument("--experiment", required=True, help="entry of `experiments` in params.yaml")
    args = p.parse_args(argv)
    params, scale = params_and_scale(args.params, args.scale)
    if args.experiment not in params["experiments"]:
        p.error(f"unknown experiment {args.experiment!r}; known: {sorted(params['experiments'])}")
    aggregate(params, scale, args.experiment)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DamagedFileError as e:   # one line naming the file and the remedy, not a traceback
        sys.exit(f"error: {e}")
