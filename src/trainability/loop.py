"""The continual-training loop (paper Sec. 5, Algorithm 1's clock; docs/METHOD.md §1-3): written once,
followed by both engines (train.SingleRun: one model; stacked.engine.BatchedRuns: M stacked models).

A stream of `n_tasks` tasks; each task is `epochs` shuffled passes over its images in minibatches of B
(the last one partial unless stream.drop_last). Every K-th step (measure.every) is a decision: the
Sec. 4 quantities are measured on the step's minibatch before the optimiser step and Algorithm 1 acts.
The first layer's beta ramp (optim.beta_ramp) is written after each epoch's first step. The loss is
checked for NaN once per epoch (never per step: no host sync in the step path). At each task end the
task's entry is recorded; at each checkpoint (below) the state is written, from which an interrupted run
resumes with the record of an uninterrupted one.

Each model of an engine keeps its own task clock: tasks of `task_epochs[m]` epochs, the epochs of every
model the same length (one stream size and batch size), so all models step together and a model's step
count is the global one. Runs of other task lengths can thus share one batched engine; where every
running model is at a task boundary, the ended runs leave it (`keep`) and a checkpoint is written.

An engine says what each moment does to its models (indices 0..M-1; the one-model engine has M = 1):

    task_epochs                     epochs per task of each model
    measuring                       whether any model measures (decisions happen)
    device                          where its tensors live (checkpoints are loaded there)
    start_task({m: t})              those models start task t: the reset arm's rebuild, the task's data,
                                    task-start indicators
    minibatches(epoch) -> [idx]     the epoch's minibatch indices
    step(idx, step, frac, decide)   one training step; with decide (frac: each model's fraction of its
                                    task done), the measurement and Algorithm 1 first
    ramp(epochs)                    the beta ramp's value for each model's epoch of its task
    end_epoch(steps) -> bool        the NaN check after `steps[m]` steps of each model's task; True:
                                    no model is left training in its task (diverged)
    end_task({m: t}, steps, wall_s, step) -> stopped   record those models' tasks; the models whose
                                    runs stop there (diverged)
    task_line() -> str              the task's one-line summary (logs of pipeline jobs)
    state_dict(), load_state_dict(s)   everything a resumed run needs
    keep(models)                    only those models train on (M > 1 only); the others' records are kept
                                    (in the state) and written with theirs
    finish(completed)               write the records (completed) or leave them (interrupted)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .record import DamagedFileError, save_checkpoint

RESTART = "rerun with --fresh, or delete it, to start that run over"
# the checkpoint's layout; one of another layout is ignored (2: a task clock per model)
LAYOUT = 2


def acts(cfg: dict) -> bool:
    """Whether a run's scheduler acts on its learning rates (Algorithm 1's act): in the scheduled arm only;
    the vanilla and reset arms record the would-be rule."""
    return cfg["arm"] == "scheduled"


def measures(cfg: dict) -> bool:
    """Whether a run measures at decision steps: when asked to, and always in the scheduled arm."""
    return cfg["measure"]["enabled"] or acts(cfg)


def steps_per_task(cfg: dict) -> tuple[int, int, int]:
    """(epochs, steps per epoch, steps per task); an epoch keeps its last partial minibatch unless
    stream.drop_last (the authors' DataLoader keeps it: 60,000 images -> 235 steps [code])."""
    epochs = max(1, round(cfg["epochs_per_task"] * cfg["epochs_factor"]))
    n, B = cfg["stream"]["n_images"], cfg["batch_size"]   # n >= B: config.validate_run, where it enters
    per_epoch = n // B if cfg["stream"]["drop_last"] else -(-n // B)
    return epochs, per_epoch, epochs * per_epoch


def load_checkpoint(path: Path, device) -> dict:
    """A checkpoint written by train_stream; one that cannot be read (truncated, overwritten, not a
    checkpoint) raises DamagedFileError naming it and the remedy: nothing is trained over it unasked."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:   # zip, unpickling, EOF, OS errors: torch.load's failures have no common type
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DamagedFileError(path, f"{type(e).__name__}: {reason}", RESTART) from None
    if not isinstance(ckpt, dict):
        raise DamagedFileError(path, "not a checkpoint of this project", RESTART)
    return ckpt


def train_stream(engine, cfg: dict, ckpt_path: Path, key, *, resume: bool = True, progress: bool = True,
                 desc: str = "run", stop_after_task: int | None = None) -> None:
    """Train `engine` through the stream of `cfg` (the shared settings of its runs), resuming from
    `ckpt_path` when it holds a checkpoint written under `key` (the runs' config hashes), and finish it.

    Each model keeps its own task clock: model m's tasks are engine.task_epochs[m] epochs long, and all
    models step together, so a model's step count is the global one and its decisions fall where its
    one-model run's do. A checkpoint is written where every running model is at a task boundary (each
    task end when the lengths agree); there the models whose runs have ended leave the stack
    (engine.keep; their records are written with the others' at the end: a job killed later and
    resumed from a later checkpoint still writes them). `stop_after_task` simulates an interruption at the
    first checkpoint after that task of the engine's shortest tasks (the resume tests)."""
    lengths = list(engine.task_epochs)
    shortest = min(lengths)
    per_epoch, T, K = steps_per_task(cfg)[1], cfg["n_tasks"], cfg["measure"]["every"]
    span = T * max(lengths)
    orig = list(range(len(lengths)))   # the engine's models as positions in the full list of runs
    start_epoch, step = 0, 0
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, engine.device)
        if ckpt.get("key") == key and ckpt.get("layout") == LAYOUT:
            if ckpt["models"] != orig:
                engine.keep(ckpt["models"])
                orig, lengths = ckpt["models"], [lengths[m] for m in ckpt["models"]]
            engine.load_state_dict(ckpt["engine"])
            start_epoch, step = ckpt["next_epoch"], ckpt["step"]
            print(f"resuming from task {start_epoch // shortest} of {T} ({ckpt_path}: epoch {start_epoch}, "
                  f"step {step})", file=sys.stderr, flush=True)
        else:  # left by an interrupted run of configs that have since changed, or by an older engine
            print(f"warning: ignoring {ckpt_path} (written for other configs or by an older engine)",
                  file=sys.stderr)
    running = set(range(len(lengths)))   # models whose runs go on
    task_of, started, t0 = {}, {}, {}    # running models' open tasks: index, first step, wall clock
    bar = tqdm(total=span * per_epoch, initial=start_epoch * per_epoch, disable=not progress, desc=desc,
               unit="step", dynamic_ncols=True, mininterval=2)
    e = start_epoch
    while e < span and running:
        starting = {m: e // lengths[m] for m in sorted(running) if e % lengths[m] == 0}
        if starting:
            task_of.update(starting)
            started.update(dict.fromkeys(starting, step))
            t0.update(dict.fromkeys(starting, time.perf_counter()))
            engine.start_task(starting)
        for j, idx in enumerate(engine.minibatches(e)):
            decide = engine.measuring and (step + 1) % K == 0
            frac = [(step - started[m]) / (lengths[m] * per_epoch) if m in started else 0.0
                    for m in range(len(lengths))] if decide else None   # read by decisions only
            engine.step(idx, step=step, frac=frac, decide=decide)
            if j == 0:   # the ramp's value is the epoch's; the epoch's first step still used the last one
                engine.ramp([e % n for n in lengths])
            step += 1
        bar.update(per_epoch)
        e += 1
        dead = engine.end_epoch(steps=[step - started.get(m, step) for m in range(len(lengths))])
        # a task ends at its last epoch, or at once when no model is left training in its task (diverged)
        ending = {m: t for m, t in task_of.items() if dead or e % lengths[m] == 0}
        if not ending:
            continue
        now = time.perf_counter()
        stopped = engine.end_task(ending, steps={m: step - started[m] for m in ending},
                                  wall_s={m: round(now - t0[m], 3) for m in ending}, step=step)
        for m in ending:
            del task_of[m], started[m], t0[m]
        running -= set(stopped) | {m for m, t in ending.items() if t == T - 1}
        bar.set_postfix(task=max(ending.values()))
        if not progress:  # logs of pipeline jobs: one line per task end instead of a bar
            tasks = ",".join(str(t) for t in sorted(set(ending.values())))
            print(f"task {tasks}/{T}  {engine.task_line()}", file=sys.stderr, flush=True)
        if task_of or not running or e >= span:   # a running model is mid-task, or nothing is left
            continue
        if len(running) < len(lengths):   # the ended runs leave the stack
            keep = sorted(running)
            engine.keep(keep)
            orig, lengths, running = [orig[m] for m in keep], [lengths[m] for m in keep], set(range(len(keep)))
        save_checkpoint({"key": key, "layout": LAYOUT, "engine": engine.state_dict(), "models": orig,
                         "next_epoch": e, "step": step}, ckpt_path)
        if stop_after_task is not None and e >= (stop_after_task + 1) * shortest:
            bar.close()
            engine.finish(completed=False)
            return
    bar.close()
    engine.finish(completed=True)
    ckpt_path.unlink(missing_ok=True)
