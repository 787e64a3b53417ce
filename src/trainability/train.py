"""The continual-training engine (paper Sec. 5, Algorithm 1; docs/METHOD.md §1-3, 6) and the `trainability-run` command.

One run = one stream of tasks, one model, one Adam with a parameter group per layer, one arm
(vanilla / reset / scheduled). Every `measure.every` steps the per-layer quantities of the paper's Sec. 4 are
measured on the current minibatch, before the optimiser step, and handed to the scheduler (which only
records them unless the arm is `scheduled`). Checkpoints are written at task boundaries; a restarted
run resumes from the last one and gives the same record as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import (ConfigError, config_hash, params_and_scale, params_parser, resolve_with_sets,
                     validate_run)
from .data import DataError, load_mnist
from .indicators import task_start_indicators
from .measure import DecisionProbe
from .models import build_model, param_groups
from .optim import ramped_betas
from .record import (CHECKPOINT_NAME, RECORD_NAME, append_decision, end_task, finish_record, finished_record,
                     new_record, save_checkpoint)
from .regularizers import adam_weight_decay, build_regularizer
from .scheduler import build_scheduler
from .streams import batches, input_dim, make_stream, mix_seed
from .wandb_log import WandbLogger, run_summary, task_metrics


def measures(cfg: dict) -> bool:
    """Whether a run measures at decision steps: when asked to, and always in the scheduled arm."""
    return cfg["measure"]["enabled"] or cfg["arm"] == "scheduled"


def setup_device(cfg: dict) -> torch.device:
    """The run's device, thread count and matmul precision (the keys device, threads, tf32)."""
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    set_matmul_precision(cfg, device)
    return device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but CUDA is not available (use 'auto' or 'cpu')")
    return torch.device(name)


def set_matmul_precision(cfg: dict, device: torch.device) -> None:
    """The run's `tf32` key on CUDA (process-wide backend flags, set by every run for itself). TF32 keeps
    10 mantissa bits in matmul products: faster on a GPU, and the records change. No effect on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.allow_tf32 = cfg["tf32"]


def _sub_seed(seed: int, *parts: int) -> int:
    """Derived seed of (seed, task, ...): streams.mix_seed started at the run's seed."""
    return mix_seed(*parts, start=seed)


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
        sched_cfg = dict(cfg["scheduler"], act=cfg["arm"] == "scheduled")
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


def steps_per_task(cfg: dict) -> tuple[int, int, int]:
    """(epochs, steps per epoch, steps per task); an epoch keeps its last partial minibatch unless
    stream.drop_last (the authors' DataLoader keeps it: 60,000 images -> 235 steps [code])."""
    epochs = max(1, round(cfg["epochs_per_task"] * cfg["epochs_factor"]))
    n, B = cfg["stream"]["n_images"], cfg["batch_size"]
    per_epoch = n // B if cfg["stream"]["drop_last"] else -(-n // B)
    if per_epoch < 1:
        raise ConfigError(f"stream.n_images ({cfg['stream']['n_images']}) must be >= batch_size "
                            f"({cfg['batch_size']})")
    return epochs, per_epoch, epochs * per_epoch


def task_online_acc(correct_full: float, correct_partial: float, steps: int, n: int, B: int,
                    drop_last: bool) -> float:
    """"Task accuracy" (docs/METHOD.md §1): the mean over the task's minibatches of each one's pre-update accuracy,
    a partial minibatch weighing as much as a full one (the authors' mean of per-batch means [code])."""
    last = n % B
    if drop_last or last == 0:
        return (correct_full + correct_partial) / (steps * B)
    return (correct_full + correct_partial * B / last) / (steps * B)


def _wandb_logger(cfg: dict, meta: dict) -> WandbLogger:
    w = cfg["wandb"]
    run, scale = meta.get("run", "run"), meta.get("scale", "custom")
    return WandbLogger(cfg, project=w["project"], entity=w["entity"], mode=w["mode"], dir=w["dir"],
                       name=w["name"] or f"{scale}/{run}/seed{cfg['seed']}",
                       group=w["group"] or f"{scale}/{run}", job_type=cfg["arm"],
                       tags=[scale, cfg["arm"], run.split("-")[0], *w["tags"]])


def run(cfg: dict, out_dir: str | Path, *, meta: dict | None = None, resume: bool = True,
        progress: bool = True, stop_after_task: int | None = None) -> dict:
    """Run one continual-learning stream; returns (and writes to out_dir/record.json) the run record.

    `stop_after_task` simulates an interruption (used by the resume test).
    """
    cfg = validate_run(cfg)
    meta = meta or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path, ckpt_path = out_dir / RECORD_NAME, out_dir / CHECKPOINT_NAME
    chash = config_hash(cfg)
    done = finished_record(record_path, chash) if resume else None
    if done is not None:
        return done
    device = setup_device(cfg)
    seed = cfg["seed"]

    x_all, y_all = load_mnist(cfg["data"]["root"], train=True)
    stream = make_stream(cfg["stream"], x_all, y_all, seed, device)
    epochs, per_epoch, task_steps = steps_per_task(cfg)
    K, B = cfg["measure"]["every"], cfg["batch_size"]

    learner = Learner(cfg, device, init_seed=_sub_seed(seed, 0))
    n_layers = learner.model.n_layers
    record = new_record(cfg, device, n_layers)
    record.update(name=meta.get("run"), scale=meta.get("scale"))
    start_task, step = 0, 0
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["record"]["provenance"]["config_hash"] == chash:
            learner.load_state_dict(ckpt["learner"])
            record, start_task, step = ckpt["record"], ckpt["next_task"], ckpt["step"]
        else:  # left by an interrupted run of a config that has since changed: obsolete, start over
            print(f"warning: ignoring {ckpt_path} (written for a different config)", file=sys.stderr)

    logger = _wandb_logger(cfg, meta)
    bar = tqdm(total=cfg["n_tasks"] * task_steps, initial=start_task * task_steps, disable=not progress,
               desc=f"{meta.get('run', 'run')} s{seed}", unit="step", dynamic_ncols=True, mininterval=2)
    model = learner.model
    for t in range(start_task, cfg["n_tasks"]):
        if cfg["arm"] == "reset" and t > 0:
            learner = Learner(cfg, device, init_seed=_sub_seed(seed, t))
            model = learner.model
        x, y = stream.task(t)
        t0 = time.perf_counter()
        indicators = task_start_indicators(cfg, model, x, y, learner.regularizer,
                                           adam_weight_decay(cfg["regularizer"])) \
            if cfg["indicators"]["enabled"] else None
        gen = torch.Generator(device=device).manual_seed(_sub_seed(seed, t, 1))
        correct = torch.zeros((), device=device)          # over full minibatches
        correct_partial = torch.zeros((), device=device)  # over last partial ones (drop_last false)
        loss_sum = torch.zeros((), device=device)
        rows_this_task = []
        step_in_task = 0
        diverged = False
        for epoch in range(epochs):
            for idx in batches(stream.n, B, gen, drop_last=cfg["stream"]["drop_last"]):
                xb, yb = x[idx], y[idx]
                frac = step_in_task / task_steps
                decide = learner.probe is not None and (step + 1) % K == 0
                learner.optimizer.zero_grad(set_to_none=True)
                if decide:
                    with learner.probe.capture():  # hooks see this step's forward and backward
                        logits, ce, total = learner.loss(xb, yb)
                        total.backward()
                else:
                    logits, ce, total = learner.loss(xb, yb)
                    total.backward()
                hits = (logits.argmax(1) == yb).sum()      # pre-update: online accuracy (docs/METHOD.md §1)
                if len(idx) == B:
                    correct += hits
                else:
                    correct_partial += hits
                loss_sum += ce.detach()
                if decide:
                    m = learner.probe.measure(lambda: learner.loss(xb, yb)[2])
                    rows = learner.scheduler.step(m, frac)
                    rows_this_task.append(rows)
                    append_decision(record, step, t, frac, rows)
                    if cfg["wandb"]["log_decisions"]:
                        logger.log({f"layer{l}/{k}": v for l, r in rows.items() for k, v in r.items()
                                    if k != "rule"}, step=step)
                learner.optimizer.step()
                if cfg["optim"]["beta_ramp"]:
                    g0 = learner.optimizer.param_groups[0]
                    g0["betas"] = ramped_betas(tuple(cfg["optim"]["betas"]), epoch, epochs)
                step += 1
                step_in_task += 1
            bar.update(per_epoch)
            if not torch.isfinite(loss_sum):  # one host sync per epoch, not per step
                diverged = True
                break
        online_acc = task_online_acc(correct.item(), correct_partial.item(), step_in_task, stream.n, B,
                                     cfg["stream"]["drop_last"])
        end_loss, end_acc = evaluate(model, x, y)
        diverged = end_task(record, t, online_acc=online_acc, end_loss=end_loss, end_acc=end_acc,
                            steps=step_in_task, wall_s=round(time.perf_counter() - t0, 3),
                            lr=[g["lr"] for g in learner.optimizer.param_groups], rows=rows_this_task,
                            indicators=indicators, diverged=diverged)
        task_rec = record["tasks"][-1]
        logger.log(task_metrics(task_rec), step=step)
        bar.set_postfix(task=t, acc=f"{online_acc:.3f}")
        if not progress:  # logs of pipeline jobs: one line per task instead of a bar
            print(f"task {t}/{cfg['n_tasks']}  online acc {online_acc:.4f}  end acc {end_acc:.4f}  "
                  f"lr {task_rec['lr'][0]:.3g}  {task_rec['wall_s']:.1f}s", file=sys.stderr, flush=True)
        if diverged:
            break
        save_checkpoint({"learner": learner.state_dict(), "record": record, "next_task": t + 1,
                         "step": step}, ckpt_path)
        if stop_after_task is not None and t >= stop_after_task and t + 1 < cfg["n_tasks"]:
            bar.close()
            logger.finish(exit_code=1)
            return record
    bar.close()
    finish_record(record, record_path, learner.scheduler.rule_counts if learner.probe is not None else None)
    logger.summary(run_summary(record))
    logger.finish(exit_code=0 if record["status"] == "completed" else 1)
    ckpt_path.unlink(missing_ok=True)
    return record


class RunFolderError(RuntimeError):
    """The output folder cannot be written, or another process is writing it."""


@contextlib.contextmanager
def run_folder_lock(out: Path):
    """Check that `out` is writable (before any training) and hold `out/.lock` while the run writes
    there: a second process on the same folder is refused instead of racing on the same files. A lock
    left by a process that no longer runs is taken over."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = out / ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                pid = lock.read_text().strip()
                if pid.isdigit() and _alive(int(pid)):
                    raise RunFolderError(f"{out} is in use by process {pid} (another run with the same "
                                         "--out); wait for it or choose another --out") from None
                lock.unlink(missing_ok=True)   # stale: its process is gone
        else:
            raise RunFolderError(f"could not lock {out}")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:   # read-only, not a folder, no space...
        raise RunFolderError(f"cannot write to {out} ({e.strerror}): choose a writable --out") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    except (RunFolderError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for tr in rec["tasks"]:
        print(f"task {tr['task']:3d}  online acc {tr['online_acc']:.4f}  end acc {tr['end_acc']:.4f}  "
              f"end loss {tr['end_loss']:.4f}")
    print(f"{rec['status']}: {out / RECORD_NAME}")
    return 0 if rec["status"] in ("completed", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
