"""The continual-training loop (paper Sec. 5, Algorithm 1's clock; docs/METHOD.md §1-3): written once,
followed by both engines (train.SingleRun: one model; batched.BatchedRuns: M stacked models).

A stream of `n_tasks` tasks; each task is `epochs` shuffled passes over its images in minibatches of B
(the last one partial unless stream.drop_last). Every K-th step (measure.every) is a decision: the
Sec. 4 quantities are measured on the step's minibatch before the optimiser step and Algorithm 1 acts.
The first layer's beta ramp (optim.beta_ramp) is written after each epoch's first step. The loss is
checked for NaN once per epoch (never per step: no host sync in the step path). At each task end the
task's entry is recorded and a checkpoint written, from which an interrupted run resumes with the
record of an uninterrupted one.

An engine says what each moment does to its model(s):

    measuring                       whether any model measures (decisions happen)
    device                          where its tensors live (checkpoints are loaded there)
    start_task(t)                   the reset arm's rebuild, the task's data, task-start indicators
    minibatches(epoch) -> [idx]     the epoch's minibatch indices
    step(idx, step, frac, decide)   one training step; with decide, the measurement and Algorithm 1 first
    ramp(epoch)                     the beta ramp's value for this epoch (a no-op when it is off)
    end_epoch(steps) -> bool        the NaN check after `steps` steps of the task; True: nothing left to
                                    train in this task (diverged)
    end_task(t, steps, wall_s, step) -> bool   record the task; False: nothing left to train at all
    task_line() -> str              the task's one-line summary (logs of pipeline jobs)
    state_dict(), load_state_dict(s)   everything a resumed run needs
    finish(completed)               write the record(s) (completed) or leave them (interrupted)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .record import save_checkpoint


def measures(cfg: dict) -> bool:
    """Whether a run measures at decision steps: when asked to, and always in the scheduled arm."""
    return cfg["measure"]["enabled"] or cfg["arm"] == "scheduled"


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


def train_stream(engine, cfg: dict, ckpt_path: Path, key, *, resume: bool = True, progress: bool = True,
                 desc: str = "run", stop_after_task: int | None = None) -> None:
    """Train `engine` through the stream of `cfg` (the shared settings of its runs), resuming from
    `ckpt_path` when it holds a checkpoint written under `key` (the runs' config hashes), and finish it.
    `stop_after_task` simulates an interruption after that task (the resume tests)."""
    epochs, per_epoch, task_steps = steps_per_task(cfg)
    K, T = cfg["measure"]["every"], cfg["n_tasks"]
    start_task, step = 0, 0
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=engine.device, weights_only=False)
        if ckpt.get("key") == key:
            engine.load_state_dict(ckpt["engine"])
            start_task, step = ckpt["next_task"], ckpt["step"]
        else:  # left by an interrupted run of configs that have since changed, or by an older engine
            print(f"warning: ignoring {ckpt_path} (written for other configs or by an older engine)",
                  file=sys.stderr)
    bar = tqdm(total=T * task_steps, initial=start_task * task_steps, disable=not progress, desc=desc,
               unit="step", dynamic_ncols=True, mininterval=2)
    for t in range(start_task, T):
        t0 = time.perf_counter()
        engine.start_task(t)
        step_in_task = 0
        for epoch in range(epochs):
            for j, idx in enumerate(engine.minibatches(epoch)):
                decide = engine.measuring and (step + 1) % K == 0
                engine.step(idx, step=step, frac=step_in_task / task_steps, decide=decide)
                if j == 0:   # the ramp's value is the epoch's; the epoch's first step still used the last one
                    engine.ramp(epoch)
                step += 1
                step_in_task += 1
            bar.update(per_epoch)
            if engine.end_epoch(steps=step_in_task):
                break
        going = engine.end_task(t, steps=step_in_task, wall_s=round(time.perf_counter() - t0, 3), step=step)
        bar.set_postfix(task=t)
        if not progress:  # logs of pipeline jobs: one line per task instead of a bar
            print(f"task {t}/{T}  {engine.task_line()}", file=sys.stderr, flush=True)
        if not going:
            break
        save_checkpoint({"key": key, "engine": engine.state_dict(), "next_task": t + 1, "step": step}, ckpt_path)
        if stop_after_task is not None and t >= stop_after_task and t + 1 < T:
            bar.close()
            engine.finish(completed=False)
            return
    bar.close()
    engine.finish(completed=True)
    ckpt_path.unlink(missing_ok=True)
