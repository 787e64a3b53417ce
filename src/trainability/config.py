"""Configuration: params.yaml is the single source of truth.

A *run config* is `run_defaults`, overridden by the scale's `run` block, then by the run's family in
`families` (named by the run's `extends`), then by the scale's refinement of that family
(`scales.<scale>.families`, e.g. the scheduler as the authors ran it at the paper scale), then by the
named run in `runs`, then by the seed. `params.schema.yaml` (beside this file) validates both params.yaml and every
resolved run config, so a bad value fails before any compute with a message naming the key.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import re
from importlib.resources import files
from pathlib import Path

import yaml

SCHEMA_PATH = Path(str(files("trainability") / "params.schema.yaml"))


class ConfigError(ValueError):
    """An invalid params.yaml or run config; the message names the offending key."""


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The parsed schema, read once per process: every resolve_run validates against it, and parsing
    the YAML (~10 ms) dominated the cost of planning a DAG. Callers must not modify it."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _finite_number(_, x) -> bool:
    """JSON Schema's "number", finite: JSON has no NaN or infinity, but YAML does (`.nan`, `.inf`), and
    every range check passes for NaN (NaN <= 0 is false), so NaN would reach PyTorch."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validator(schema: dict):
    """JSON Schema 2020-12 (as Snakemake) with a strict "integer": 3.0 is refused where a count is expected
    (JSON Schema accepts whole-number floats as integers, and they crash range() and tensor shapes later),
    and a finite "number"."""
    import jsonschema

    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many({
        "integer": lambda _, x: isinstance(x, int) and not isinstance(x, bool),
        "number": _finite_number})
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)(schema)


def _message(error) -> str:
    if error.validator == "type" and isinstance(error.instance, float) and not math.isfinite(error.instance):
        return f"{error.instance} is not a finite number"
    return error.message


def _check(instance: dict, schema: dict, what: str) -> None:
    validator = _validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {_message(e)}" for e in errors[:10]]
        raise ConfigError(f"invalid {what}:\n" + "\n".join(lines))


def deep_merge(base: dict, override: dict | None) -> dict:
    """Recursive dict merge; `override` wins, lists are replaced whole."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def validate_params(params: dict) -> dict:
    """Validate a params.yaml dict (schema + cross references). Returns it unchanged."""
    _check(params, load_schema(), "params.yaml")
    if params["scale"] not in params["scales"]:
        raise ConfigError(f"invalid params.yaml:\n  scale: {params['scale']!r} is not one of scales "
                          f"{sorted(params['scales'])}")
    for name, run in params["runs"].items():
        if "extends" in run and run["extends"] not in params.get("families", {}):
            raise ConfigError(f"invalid params.yaml:\n  runs.{name}.extends: unknown family {run['extends']!r}; "
                              f"known: {sorted(params.get('families', {}))}")
    for name, exp in params["experiments"].items():
        for r in exp["runs"]:
            if r not in params["runs"]:
                raise ConfigError(f"invalid params.yaml:\n  experiments.{name}.runs: unknown run {r!r}")
    for name, scale in params["scales"].items():
        for e in scale.get("experiments", []):
            if e not in params["experiments"]:
                raise ConfigError(f"invalid params.yaml:\n  scales.{name}.experiments: unknown experiment {e!r}")
        for key in ("runs", "skip_runs"):
            for r in scale.get(key, []):
                if r not in params["runs"]:
                    raise ConfigError(f"invalid params.yaml:\n  scales.{name}.{key}: unknown run {r!r}")
        for f in scale.get("families", {}):
            if f not in params.get("families", {}):
                raise ConfigError(f"invalid params.yaml:\n  scales.{name}.families.{f}: unknown family {f!r}; "
                                  f"known: {sorted(params.get('families', {}))}")
    # every run must resolve to a valid config at every scale: catch impossible combinations early
    for scale in params["scales"]:
        for run in params["runs"]:
            resolve_run(params, scale, run, seed=0)
    return params


def read_yaml(path: str | Path):
    """A YAML file's content; a syntax error becomes a ConfigError naming the file, line and column (the
    Snakefile checks params.yaml with it before Snakemake's own loader, which gives neither)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    loaded = read_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (scale, scales, run_defaults, runs, ...)")
    params = deep_merge(loaded, overrides)
    return validate_params(params)


def experiment_names(params: dict, scale: str) -> list[str]:
    """The experiments the pipeline runs at a scale: the scale's `experiments` list, else all of them,
    in params.yaml order."""
    allowed = set(params["scales"][scale].get("experiments") or params["experiments"])
    return [e for e in params["experiments"] if e in allowed]


def run_family(params: dict, run: str) -> str | None:
    """The `families` entry a run extends (None if it extends none)."""
    return params["runs"][run].get("extends")


def experiment_runs(params: dict, scale: str, experiment: str) -> list[str]:
    """An experiment's runs at a scale: its `runs` less those the scale leaves out (`runs`, `skip_runs`)."""
    sc = params["scales"][scale]
    return [r for r in params["experiments"][experiment]["runs"]
            if r in (sc.get("runs") or [r]) and r not in sc.get("skip_runs", [])]


def run_names(params: dict, scale: str) -> list[str]:
    """The runs the pipeline executes at a scale: those its experiments use (restricted to the scale's
    `runs` list if it has one, less its `skip_runs`), in params.yaml order. Other runs stay runnable with
    trainability-run."""
    used = {r for e in experiment_names(params, scale) for r in experiment_runs(params, scale, e)}
    return [r for r in params["runs"] if r in used]


def resolve_run(params: dict, scale: str, run: str, seed: int) -> dict:
    """The complete config of one (scale, run, seed), validated."""
    if run not in params["runs"]:
        raise ConfigError(f"unknown run {run!r}; known runs: {sorted(params['runs'])}")
    cfg = deep_merge(params["run_defaults"], params["scales"][scale].get("run"))
    entry = dict(params["runs"][run])
    family = entry.pop("extends", None)
    if family is not None:
        cfg = deep_merge(cfg, params.get("families", {}).get(family))
        cfg = deep_merge(cfg, params["scales"][scale].get("families", {}).get(family))
    cfg = deep_merge(cfg, entry)
    cfg["seed"] = int(seed)
    cfg.setdefault("wandb", {})
    validate_run(cfg, where=f"run {run!r} at scale {scale!r}")
    return cfg


def validate_run(cfg: dict, where: str = "run config") -> dict:
    schema = load_schema()
    run_schema = {"definitions": schema["definitions"],
                  "allOf": [{"$ref": "#/definitions/run"},
                            schema["properties"]["run_defaults"]["allOf"][1],
                            {"required": ["seed"]}]}
    _check(cfg, run_schema, where)
    if cfg["stream"]["n_images"] < cfg["batch_size"]:
        raise ConfigError(f"invalid {where}:\n  stream.n_images: {cfg['stream']['n_images']} is below "
                          f"batch_size {cfg['batch_size']} (an epoch would hold no minibatch)")
    return cfg


class _SetLoader(yaml.SafeLoader):
    """YAML for --set values: PyYAML's YAML 1.1 reads an unquoted 3e-4 or 1e3 as a string (its floats need
    a dot and a signed exponent); YAML 1.2 reads them as numbers, as users mean. Only plain (unquoted)
    scalars are resolved, so a quoted "1e3" stays a string."""


_SetLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def set_dotted(cfg: dict, assignment: str) -> dict:
    """Apply a `key.sub=value` override (value parsed as YAML, with YAML 1.2's exponent floats) to a copy of cfg."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_SetLoader)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML (quote a string, "
                          "e.g. --set 'wandb.name=\"my run\"')") from None
    override: dict = {}
    node = override
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return deep_merge(cfg, override)


def params_parser(**kwargs) -> argparse.ArgumentParser:
    """A command's argument parser with the two options every command shares: --params and --scale
    (read them with params_and_scale). kwargs go to argparse.ArgumentParser."""
    p = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--scale", default=None, help="entry of `scales` (default: params.yaml's `scale`)")
    return p


def params_and_scale(path: str | Path, scale: str | None = None) -> tuple[dict, str]:
    """(validated params, scale) for a command line: `scale` defaults to params.yaml's `scale`."""
    params = load_params(path)
    scale = scale or params["scale"]
    if scale not in params["scales"]:
        raise ConfigError(f"--scale {scale!r} is not one of {sorted(params['scales'])}")
    return params, scale


def resolve_with_sets(params: dict, scale: str, run: str, seed: int, assignments: list[str]) -> dict:
    """resolve_run, then the command line's `--set key=value` overrides, validated again."""
    cfg = resolve_run(params, scale, run, seed)
    for a in assignments:
        cfg = set_dotted(cfg, a)
    return validate_run(cfg, where=f"run {run!r} after --set")


# how a run executes, not what it computes (the same records, or equal up to float rounding as between
# devices): left out of config_hash
EXECUTION_KEYS = ("wandb", "device", "threads", "data", "cuda_graph", "decision_graph", "decision_step_graph",
                  "fused_adam")


def config_hash(cfg: dict) -> str:
    """Stable hash of the scientific config (W&B naming and resume checks excluded). tf32 enters only
    when on, so the records written before the key existed keep their hash."""
    core = {k: v for k, v in cfg.items() if k not in EXECUTION_KEYS and not (k == "tf32" and not v)}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]
