# Replication DAG: data -> one job per (run, seed) -> per-experiment aggregation + figure -> tables -> report.
# Usage: snakemake --cores N            (scale from params.yaml, `default`)
#        snakemake --cores N --config scale=smoke
#        snakemake -n                   (the plan)       snakemake --report report.html
# Experiments, runs and scales are defined in params.yaml only (validated below before any job runs).
import os
import re
import sys
from snakemake.utils import min_version

min_version("9.0")

from trainability.config import ConfigError, read_yaml, validate_params, resolve_run, config_hash, experiment_names
from trainability import pipeline
from trainability.record import damaged as damaged_record
from trainability import data as data_module

# Snakemake's own loader says "not valid JSON or YAML" without a line: parse it first for the line and column
try:
    read_yaml("params.yaml")
except ConfigError as e:
    raise WorkflowError(str(e)) from None

configfile: "params.yaml"

# params.schema.yaml plus cross-references (trainability.config): the message names the key, and a
# hint about --config's strings when the command line gave a --config
try:
    validate_params(config)
except ConfigError as e:
    hint = ("\n(snakemake --config passes nested values as strings: put numbers in params.yaml, or use "
            "trainability-run --set for one run)") if workflow.config_settings.config else ""
    raise WorkflowError(f"{e}{hint}") from None
# Jobs read this file, not params.yaml: it is the config Snakemake planned with, `--config` overrides
# included, so a job trains exactly what the plan (and its record.json) says. Named by its content.
PARAMS = pipeline.write_effective_params(config)
SCALE = config["scale"]
SEEDS = config["scales"][SCALE]["seeds"]
PY = sys.executable  # jobs use the interpreter that runs Snakemake (the project's venv)

# A rerun checks the outputs it would otherwise trust. Every record is a target of `all`, so a deleted
# one is redone and what reads it after it (by mtime). A damaged one (truncated, emptied: record.damaged
# reads its first and last bytes) is moved aside to record.json.damaged, so it counts as deleted.
RECORDS = list(dict.fromkeys(r for e in experiment_names(config, SCALE)
                             for r in pipeline.experiment_records(config, SCALE, e)))
for _rec in RECORDS:
    if os.path.exists(_rec) and (_why := damaged_record(_rec)):
        os.replace(_rec, _rec + ".damaged")
        print(f"warning: {_rec} is damaged ({_why}): moved to {_rec}.damaged, its run is redone", file=sys.stderr)

report: "workflow/report/workflow.rst"

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/runs.smk"
include: "workflow/rules/figures.smk"


# The summaries live under results/ (not committed): in a fresh clone, whose figures/ holds the committed
# figures, they are missing, so the whole replication runs instead of "nothing to be done".
rule all:
    input:
        [pipeline.summary_path(config, SCALE, e) for e in experiment_names(config, SCALE)],
        [f for e in experiment_names(config, SCALE) for f in pipeline.figure_paths(SCALE, e)],
        pipeline.table_paths(SCALE),
        RECORDS,
