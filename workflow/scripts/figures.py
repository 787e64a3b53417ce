"""Draw one experiment's figure (the paper's layout) from its run records.

Writes figures/<scale>/<experiment>.png and .pdf. All logic lives in trainability.figures.

    python workflow/scripts/figures.py --scale smoke --experiment fig5
"""
import sys

from trainability.config import params_and_scale, params_parser
from trainability.figures import FIGURES, make_figure
from trainability.record import DamagedFileError


def main(argv=None) -> int:
    p = params_parser(description=__doc__)
    p.add_argument("--experiment", required=True, choices=sorted(FIGURES), help="experiment to draw")
    p.add_argument("--ema", type=float, default=0.0,
                   help="per-seed EMA weight for per-task curves, 0 = off (default: %(default)s)")
    p.add_argument("--ema-steps", type=float, default=0.6,
                   help="per-seed EMA weight for decision-step curves (Figs. 2-3), 0 = off (default: %(default)s)")
    args = p.parse_args(argv)
    params, scale = params_and_scale(args.params, args.scale)
    make_figure(params, scale, args.experiment, ema=args.ema, ema_steps=args.ema_steps)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DamagedFileError as e:   # one line naming the file and the remedy, not a traceback
        sys.exit(f"error: {e}")
