"""W&B logging that can never fail a run.

Offline by default (no account, no network): runs land in `<dir>/wandb/offline-run-*` and can be
uploaded later with `wandb sync <dir>/wandb/offline-run-*`. Any W&B error is reported once and logging
is switched off; the local run record stays the source of every figure.
"""
from __future__ import annotations

import os
import sys
import warnings


def task_metrics(task_rec: dict) -> dict:
    """What W&B gets at the end of a task, from the record's task entry."""
    return {"task": task_rec["task"], "online_acc": task_rec["online_acc"], "end_loss": task_rec["end_loss"],
            "end_acc": task_rec["end_acc"], **{f"lr/layer{i + 1}": lr for i, lr in enumerate(task_rec["lr"])},
            **{f"crossings/{k}": v for k, v in (task_rec["crossings"] or {}).items()},
            **{f"indicators/{k}": v for k, v in (task_rec["indicators"] or {}).items()}}


def decision_metrics(rows: dict) -> dict:
    """What W&B gets at a decision step (wandb.log_decisions), from its rows {layer: {field: value}}."""
    return {f"layer{l}/{k}": v for l, r in rows.items() for k, v in r.items() if k != "rule"}


def run_summary(record: dict) -> dict:
    """The W&B run summary of a finished record."""
    tasks = record["tasks"]
    return {"status": record["status"], "final_online_acc": tasks[-1]["online_acc"],
            "mean_online_acc": sum(r["online_acc"] for r in tasks) / len(tasks)}


def _skip_launch_inputs(wandb) -> None:
    """wandb.init ends by applying the inputs a W&B Launch agent staged in this process, and to look
    for them it imports W&B Launch (with wandb.apis.public.artifacts: seconds of import per run, the
    largest part of an offline init). Inputs can only be staged through wandb.sdk.launch, so when
    nothing imported it there is nothing to apply and the lookup is skipped."""
    if "wandb.sdk.launch" in sys.modules:
        return
    run_cls = wandb.sdk.wandb_run.Run
    if hasattr(run_cls, "_detect_and_apply_job_inputs") and not getattr(run_cls, "_trainability_skip", False):
        original = run_cls._detect_and_apply_job_inputs

        def detect(self):
            if "wandb.sdk.launch" in sys.modules:
                original(self)
        run_cls._detect_and_apply_job_inputs = detect
        run_cls._trainability_skip = True


class WandbLogger:
    def __init__(self, cfg: dict, *, project: str, name: str | None, group: str | None,
                 mode: str = "offline", entity: str | None = None, dir: str = ".",
                 tags: list[str] | None = None, job_type: str | None = None):
        self.run = None
        if mode == "disabled":
            return
        try:
            os.environ.setdefault("WANDB_SILENT", "true")
            os.makedirs(dir, exist_ok=True)
            import wandb
            _skip_launch_inputs(wandb)

            def init(m: str):
                # online: give up after 15 s (a set key without network would cost each job 60 s)
                return wandb.init(project=project, entity=entity, name=name, group=group,
                                  job_type=job_type, tags=tags or [], config=cfg, mode=m, dir=dir,
                                  reinit="create_new",
                                  settings=wandb.Settings(init_timeout=15 if m == "online" else 60,
                                                          console="off", x_disable_stats=True))
            try:
                self.run = init(mode)
            except Exception as e:  # noqa: BLE001
                if mode != "online":
                    raise
                print(f"[wandb] online init failed ({e}); logging offline instead (`wandb sync` later)",
                      file=sys.stderr)
                self.run = init("offline")
        except Exception as e:  # noqa: BLE001 - W&B must never fail a run
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        warnings.warn(f"W&B logging disabled for this run: {type(e).__name__}: {e}", stacklevel=3)
        print(f"[wandb] disabled: {e}", file=sys.stderr)
        self.run = None

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def summary(self, data: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(data)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        self.run = None


def run_logger(cfg: dict, meta: dict) -> WandbLogger:
    """The W&B run of one run (meta: its run and scale names), as both engines name and tag it."""
    w = cfg["wandb"]
    run, scale = meta.get("run", "run"), meta.get("scale", "custom")
    return WandbLogger(cfg, project=w["project"], entity=w["entity"], mode=w["mode"], dir=w["dir"],
                       name=w["name"] or f"{scale}/{run}/seed{cfg['seed']}",
                       group=w["group"] or f"{scale}/{run}", job_type=cfg["arm"],
                       tags=[scale, cfg["arm"], run.split("-")[0], *w["tags"]])


def replay_record(rec: dict, cfg: dict, meta: dict) -> None:
    """Replay a finished record into W&B, as the one-model engine logs it live (the batched engine's runs,
    after their job): the decisions, the task entries and the summary."""
    logger = run_logger(cfg, meta)
    if logger.run is None:
        return
    d = rec["decisions"]
    if cfg["wandb"]["log_decisions"]:
        for i, s in enumerate(d["step"]):
            logger.log(decision_metrics({l: {k: v[i] for k, v in series.items()} for l, series in d["layers"].items()}),
                       step=s)
    step = 0
    for tr in rec["tasks"]:
        step += tr["steps"]
        logger.log(task_metrics(tr), step=step)
    logger.summary(dict(run_summary(rec), batched=True))
    logger.finish(exit_code=0 if rec["status"] == "completed" else 1)
