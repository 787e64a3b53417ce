"""The one-model engine (paper Sec. 5, Algorithm 1; docs/METHOD.md §1-3, 6) and the `trainability-run` command.

One run = one stream of tasks, one model, one Adam with a parameter group per layer, one arm
(vanilla / reset / scheduled). Every `measure.every` steps the per-layer quantities of the paper's Sec. 4 are
measured on the current minibatch, before the optimiser step, and handed to the scheduler (which only
records them unless the arm is `scheduled`). The loop itself (tasks, epochs, steps, checkpoints at task
boundaries, resuming) is loop.train_stream, which the batched engine follows too; `SingleRun` says what
each of its moments does to one model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import (ConfigError, config_hash, params_and_scale, params_parser, resolve_with_sets,
                     validate_run)
from .data import DataError, load_mnist
from .devices import setup_device
from .indicators import task_start_indicators
from .loop import acts, measures, steps_per_task, train_stream
from .measure import DecisionProbe
from .models import build_model, param_groups
from .optim import ramped_betas
from .record import (CHECKPOINT_NAME, RECORD_NAME, DamagedFileError, RunFolderError, append_decision, end_task,
                     finish_record, finished_record, new_record, run_folder_lock, task_online_acc)
from .regularizers import adam_weight_decay, build_regularizer
from .scheduler import build_scheduler
from .streams import batches, input_dim, make_stream, sub_seed
from .wandb_log import decision_metrics, run_logger, run_summary, task_metrics


class Learner:
    """Model, optimiser, regulariser, measurement probe and scheduler of one run (rebuilt by `reset`)."""

    def __init__(self, cfg: dict, device: torch.device, init_seed: int):
        torch.manual_seed(init_seed)
        self.model = build_model(cfg["model"], input_dim(cfg["stream"])).to(device)
        o = cfg["optim"]
        self.optimizer = torch.optim.Adam(
            param_groups(self.model, o["lr"], adam_weight_decay(cfg["regularizer"])),
            lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
        self.regularizer = build_regularizer(cfg["regularizer"], self.model)
        self.measuring = measures(cfg)
        m = cfg["measure"]
        self.probe = DecisionProbe(self.model, self.optimizer, cfg["batch_size"], eig_tol=m["eig_tol"],
                                   eig_max_iter=m["eig_max_iter"], global_too=m["global"],
                                   code_alpha_agg=cfg["scheduler"]["code_alpha_agg"], seed=init_seed) \
            if self.measuring else None
        sched_cfg = dict(cfg["scheduler"], act=acts(cfg))
        self.scheduler = build_scheduler(sched_cfg, self.optimizer, cfg["batch_size"])

    def loss(self, x, y):
        logits = self.model(x)
        ce = F.cross_entropy(logits, y)
        total = ce + self.regularizer(self.model) if self.regularizer is not None else ce
        return logits, ce, total

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "regularizer": self.regularizer.state_dict() if hasattr(self.regularizer, "state_dict") else None,
                "probe": self.probe.state_dict() if self.probe else None,
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        if s["regularizer"] is not None:
            self.regularizer.load_state_dict(s["regularizer"])
        if self.probe and s["probe"] is not None:
            self.probe.load_state_dict(s["probe"])
        self.scheduler.load_state_dict(s["scheduler"])


@torch.no_grad()
def evaluate(model, x, y, chunk: int = 4096) -> tuple[float, float]:
    """Loss and accuracy of the model on a whole task (end-of-task training metrics)."""
    was_training = model.training
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + chunk]).sum().item()
    model.train(was_training)
    return loss / len(x), correct / len(x)


class SingleRun:
    """One run as an engine of loop.train_stream: a Learner (rebuilt at each task start in the reset arm)
    on one stream, its record, and its W&B run (logged live, task by task)."""

    def __init__(self, cfg: dict, device: torch.device, meta: dict, record_path: Path):
        self.cfg, self.device, self.seed, self.record_path = cfg, device, cfg["seed"], record_path
        x_all, y_all = load_mnist(cfg["data"]["root"], train=True)
        self.stream = make_stream(cfg["stream"], x_all, y_all, self.seed, device)
        self.B = cfg["batch_size"]
        self.epochs = steps_per_task(cfg)[0]
        self.task_epochs = [self.epochs]
        self.learner = Learner(cfg, device, init_seed=sub_seed(self.seed, 0))
        self.measuring = self.learner.probe is not None
        self.record = new_record(cfg, device, self.learner.model.n_layers)
        self.record.update(name=meta.get("run"), scale=meta.get("scale"))
        self.logger = run_logger(cfg, meta)

    def start_task(self, tasks: dict[int, int]) -> None:
        cfg = self.cfg
        self.task = t = tasks[0]
        if cfg["arm"] == "reset" and t > 0:
            self.learner = Learner(cfg, self.device, init_seed=sub_seed(self.seed, t))
        self.x, self.y = self.stream.task(t)
        self.indicators = task_start_indicators(cfg, self.learner.model, self.x, self.y, self.learner.regularizer,
                                                adam_weight_decay(cfg["regularizer"])) \
            if cfg["indicators"]["enabled"] else None
        self.gen = torch.Generator(device=self.device).manual_seed(sub_seed(self.seed, t, 1))
        self.correct = torch.zeros((), device=self.device)          # over full minibatches
        self.correct_partial = torch.zeros((), device=self.device)  # over last partial ones (drop_last false)
        self.loss_sum = torch.zeros((), device=self.device)
        self.rows = []
        self.diverged = False

    def minibatches(self, epoch: int):
        return batches(self.stream.n, self.B, self.gen, drop_last=self.cfg["stream"]["drop_last"])

    def step(self, idx, *, step: int, frac: list[float] | None, decide: bool) -> None:
        learner = self.learner
        xb, yb = self.x[idx], self.y[idx]
        learner.optimizer.zero_grad(set_to_none=True)
        with learner.probe.capture() if decide else contextlib.nullcontext():  # hooks see the step's passes
            logits, ce, total = learner.loss(xb, yb)
            total.backward()
        hits = (logits.argmax(1) == yb).sum()      # pre-update: online accuracy (docs/METHOD.md §1)
        if len(idx) == self.B:
            self.correct += hits
        else:
            self.correct_partial += hits
        self.loss_sum += ce.detach()
        if decide:
            m = learner.probe.measure(lambda: learner.loss(xb, yb)[2])
            rows = learner.scheduler.step(m, frac[0])
            self.rows.append(rows)
            append_decision(self.record, step, self.task, frac[0], rows)
            if self.cfg["wandb"]["log_decisions"]:
                self.logger.log(decision_metrics(rows), step=step)
        learner.optimizer.step()

    def ramp(self, epochs: list[int]) -> None:
        if self.cfg["optim"]["beta_ramp"]:
            self.learner.optimizer.param_groups[0]["betas"] = ramped_betas(tuple(self.cfg["optim"]["betas"]),
                                                                            epochs[0], self.epochs)

    def end_epoch(self, *, steps: list[int]) -> bool:
        self.diverged = not torch.isfinite(self.loss_sum)   # one host sync per epoch, not per step
        return self.diverged

    def end_task(self, tasks: dict[int, int], *, steps: dict[int, int], wall_s: dict[int, float],
                 step: int) -> list[int]:
        cfg, t, steps, wall_s = self.cfg, tasks[0], steps[0], wall_s[0]
        online_acc = task_online_acc(self.correct.item(), self.correct_partial.item(), steps, self.stream.n,
                                     self.B, cfg["stream"]["drop_last"])
        end_loss, end_acc = evaluate(self.learner.model, self.x, self.y)
        diverged = end_task(self.record, t, online_acc=online_acc, end_loss=end_loss, end_acc=end_acc,
                            steps=steps, wall_s=wall_s, lr=[g["lr"] for g in self.learner.optimizer.param_groups],
                            rows=self.rows, indicators=self.indicators, diverged=self.diverged)
        self.logger.log(task_metrics(self.record["tasks"][-1]), step=step)
        return [0] if diverged else []

    def task_line(self) -> str:
        tr = self.record["tasks"][-1]
        return (f"online acc {tr['online_acc']:.4f}  end acc {tr['end_acc']:.4f}  lr {tr['lr'][0]:.3g}  "
                f"{tr['wall_s']:.1f}s")

    def state_dict(self) -> dict:
        return {"learner": self.learner.state_dict(), "record": self.record}

    def load_state_dict(self, s: dict) -> None:
        self.learner.load_state_dict(s["learner"])
        self.record = s["record"]

    def finish(self, completed: bool) -> None:
        if completed:
            learner = self.learner
            finish_record(self.record, self.record_path, learner.scheduler.rule_counts if self.measuring else None)
            self.logger.summary(run_summary(self.record))
        self.logger.finish(exit_code=0 if self.record["status"] == "completed" else 1)


def run(cfg: dict, out_dir: str | Path, *, meta: dict | None = None, resume: bool = True,
        progress: bool = True, stop_after_task: int | None = None) -> dict:
    """Run one continual-learning stream; returns (and writes to out_dir/record.json) the run record.

    `stop_after_task` simulates an interruption (used by the resume test).
    """
    cfg = validate_run(cfg)
    meta = meta or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg)
    done = finished_record(out_dir / RECORD_NAME, chash) if resume else None
    if done is not None:
        return done
    engine = SingleRun(cfg, setup_device(cfg), meta, out_dir / RECORD_NAME)
    train_stream(engine, cfg, out_dir / CHECKPOINT_NAME, [chash], resume=resume, progress=progress,
                 desc=f"{meta.get('run', 'run')} s{cfg['seed']}", stop_after_task=stop_after_task)
    return engine.record


def build_parser() -> argparse.ArgumentParser:
    p = params_parser(
        prog="trainability-run",
        description="Run one continual-learning stream (one run config x one seed) and write its record.json. "
                    "The config is run_defaults <- scales[SCALE].run <- runs[RUN] from params.yaml, then --set.",
        epilog="example: trainability-run --run crelu-scheduled --scale smoke --seed 0 --out /tmp/crelu")
    p.add_argument("--run", required=True, help="entry of `runs` in params.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: <results_dir>/<scale>/runs/<run>/seed<seed>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, e.g. --set optim.lr=1e-2 --set n_tasks=5 (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint/record and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params, scale = params_and_scale(args.params, args.scale)
        cfg = resolve_with_sets(params, scale, args.run, args.seed, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(cfg, indent=2))
        return 0
    from .pipeline import run_dir
    out = Path(args.out or run_dir(params, scale, args.run, args.seed))
    try:
        with run_folder_lock(out):
            rec = run(cfg, out, meta={"run": args.run, "scale": scale}, resume=not args.fresh,
                      progress=not args.no_progress)
    except (RunFolderError, DataError, DamagedFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for tr in rec["tasks"]:
        print(f"task {tr['task']:3d}  online acc {tr['online_acc']:.4f}  end acc {tr['end_acc']:.4f}  "
              f"end loss {tr['end_loss']:.4f}")
    print(f"{rec['status']}: {out / RECORD_NAME}")
    return 0 if rec["status"] in ("completed", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
