"""Publish a scale's figures and tables to W&B as one `report` run (offline by default).

    .venv/bin/python workflow/scripts/wandb_report.py --scale default            # offline, sync later
    .venv/bin/python workflow/scripts/wandb_report.py --scale default --mode online

The run (job type `report`, group `<scale>/report`) holds every figure as an image and every table as
text; in the W&B UI, "Create report" from it (or from the project's run groups) gives a shareable page.
"""
import glob
import os
import sys

from trainability.config import params_and_scale, params_parser


def main() -> int:
    p = params_parser(description=__doc__)
    p.add_argument("--mode", default=None, choices=["offline", "online", "disabled"])
    args = p.parse_args()
    params, scale = params_and_scale(args.params, args.scale)
    w = params["run_defaults"]["wandb"]
    figs = sorted(glob.glob(f"figures/{scale}/*.png"))
    tables = sorted(glob.glob(f"figures/{scale}/tables/*.md"))
    if not figs:
        print(f"no figures under figures/{scale}/: run the pipeline first", file=sys.stderr)
        return 1
    import wandb
    os.makedirs(w["dir"], exist_ok=True)
    run = wandb.init(project=w["project"], entity=w["entity"], mode=args.mode or w["mode"], dir=w["dir"],
                     name=f"{scale}/report", group=f"{scale}/report", job_type="report", tags=[scale, "report"])
    run.log({f"figures/{os.path.basename(f)[:-4]}": wandb.Image(f) for f in figs})
    run.log({f"tables/{os.path.basename(t)[:-3]}": wandb.Html("<pre>" + open(t).read() + "</pre>") for t in tables})
    run.finish()
    print(f"logged {len(figs)} figures and {len(tables)} tables to W&B ({args.mode or w['mode']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
