"""Draw one experiment's figure (the paper's layout) from its run records.

Writes figures/<scale>/<experiment>.png and .pdf. All logic lives in trainability.figures.

    python workflow/scripts/figures.py --scale smoke --experiment fig5
"""
import argparse
import sys

from trainability.config import load_params
from trainability.figures import FIGURES, make_figure


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--scale", default=None, help="entry of `scales` (default: params.yaml's `scale`)")
    p.add_argument("--experiment", required=True, choices=sorted(FIGURES), help="experiment to draw")
    p.add_argument("--ema", type=float, default=0.0,
                   help="per-seed EMA weight for per-task curves, 0 = off (default: %(default)s)")
    p.add_argument("--ema-steps", type=float, default=0.6,
                   help="per-seed EMA weight for decision-step curves (Figs. 2-3), 0 = off (default: %(default)s)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    make_figure(params, args.scale or params["scale"], args.experiment, ema=args.ema, ema_steps=args.ema_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
