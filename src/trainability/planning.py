"""Batch planning: which runs of a scale can be trained as one stacked model (trainability.batched)
and how a scale's runs become jobs. Pure config logic, next to trainability.config; the Snakefile,
dvc.yaml's generator (trainability.pipeline) and the batched engine all ask here."""
from __future__ import annotations

from . import config
from .loop import steps_per_task

# keys that may differ between the runs of one batch (all others must agree); model.activation only
# among relu / leaky_relu / identity (crelu changes the layer shapes)
PER_MODEL_KEYS = ("seed", "arm", "optim.lr", "optim.beta_ramp", "regularizer", "model.activation", "model.rho",
                  "measure.enabled", "measure.global", "scheduler.variant", "scheduler.bound",
                  "scheduler.statistic", "scheduler.beta", "scheduler.code_alpha_agg", "epochs_factor", "wandb")


def _strip(cfg: dict) -> dict:
    """The config without the keys that may differ within a batch (PER_MODEL_KEYS)."""
    out = dict(cfg)
    for key in PER_MODEL_KEYS:
        top, _, sub = key.partition(".")
        if sub:
            out[top] = {k: v for k, v in out[top].items() if k != sub}
        else:
            out.pop(top, None)
    return out


def check_batchable(cfgs: list[dict]) -> None:
    """Raise ConfigError (naming the key) unless the configs can share one batched model."""
    if not cfgs:
        raise config.ConfigError("batched run: no configs")
    ref = _strip(cfgs[0])
    for i, cfg in enumerate(cfgs):
        s = _strip(cfg)
        for k in sorted(set(ref) | set(s)):
            if ref.get(k) != s.get(k):
                a, b = ref.get(k), s.get(k)
                if isinstance(a, dict) and isinstance(b, dict):   # name the nested key: model.batchnorm
                    k += "." + next(sub for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub))
                raise config.ConfigError(f"batched run: config {i} differs from config 0 in {k!r}; only "
                                         f"{', '.join(PER_MODEL_KEYS)} may differ within a batch")
        if _shape(cfg) != _shape(cfgs[0]):
            raise config.ConfigError(f"batched run: config {i}: model.activation {cfg['model']['activation']!r} "
                                     f"gives other layer shapes than {cfgs[0]['model']['activation']!r}")


def _shape(cfg: dict) -> str:
    """The stacked model's shape family: crelu doubles each hidden layer's output."""
    return "crelu" if cfg["model"]["activation"] == "crelu" else "plain"


def batch_key(cfg: dict) -> str:
    """Runs whose configs have the same key can share a batch (check_batchable's rules). Task lengths
    (epochs_factor) may differ: each model keeps its own task clock, and the stack sheds the runs of
    the shorter lengths when they end (loop.train_stream)."""
    s = _strip(cfg)
    s["shape"] = _shape(cfg)
    return config.config_hash(s)


def batch_groups(params: dict, scale: str, runs: list[str]) -> dict[str, list[str]]:
    """{group name: [runs]} for `runs` at `scale`: runs with the same batch_key form one group (named
    after its first run), trained with all the scale's seeds in one job. Every run has a group: any run
    config can be batched, if only with itself. With the scale's `batch_max_runs`, a larger group is dealt
    round-robin into the fewest groups of at most that many runs (so each gets a share of every kind of
    run), which a device with several slots trains at once (bench/slots.py)."""
    keyed: dict[str, list[str]] = {}
    for r in runs:
        keyed.setdefault(batch_key(config.resolve_run(params, scale, r, params["scales"][scale]["seeds"][0])),
                         []).append(r)
    most = params["scales"][scale].get("batch_max_runs")
    groups = {}
    for rs in keyed.values():
        n = -(-len(rs) // most) if most else 1
        for i in range(n):
            groups[f"batch-{rs[i]}"] = rs[i::n]
    return groups


def stack_phases(cfgs: list[dict]) -> list[tuple[list[int], int, int]]:
    """How a batched job's stack shrinks as the runs of shorter task lengths end, by loop.train_stream's
    rule: [(the models in the stack, epochs, task ends in those epochs)]. A phase ends at the first task
    end where some run has ended and every run still going is at a task boundary (at the paper scale,
    right where the shorter runs end), or at the last run's end. One phase when the task lengths agree."""
    lengths = [steps_per_task(c)[0] for c in cfgs]
    T = cfgs[0]["n_tasks"]
    # every epoch at which some run ends a task, in order: the only epochs where the stack can shrink
    task_ends = sorted({e for n in set(lengths) for e in range(n, T * n + 1, n)})
    out, stack, start = [], list(range(len(cfgs))), 0
    for i, e in enumerate(task_ends):
        going = [m for m in stack if e < T * lengths[m]]
        if len(going) < len(stack) and all(e % lengths[m] == 0 for m in going):
            out.append((stack, e - start, sum(1 for x in task_ends[:i + 1] if x > start)))
            stack, start = going, e
    return out

