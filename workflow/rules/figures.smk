rule experiment:
    """Aggregate an experiment's runs over seeds, then draw its figure (the paper's layout)."""
    input:
        records=lambda w: pipeline.experiment_records(config, SCALE, w.experiment),
    output:
        summary=pipeline.summary_path(config, SCALE, "{experiment}"),
        metrics=pipeline.metrics_path(config, SCALE, "{experiment}"),
        curves=pipeline.curves_path(config, SCALE, "{experiment}"),
        png=report(f"figures/{SCALE}/{{experiment}}.png", category="Figures"),
        pdf=f"figures/{SCALE}/{{experiment}}.pdf",
    log:
        f"{pipeline.results_dir(config)}/{SCALE}/logs/experiment-{{experiment}}.log",
    resources:
        runtime=10,
    shell:
        "({PY} workflow/scripts/aggregate.py --params {PARAMS} --scale {SCALE} --experiment {wildcards.experiment} && "
        "{PY} workflow/scripts/figures.py --params {PARAMS} --scale {SCALE} --experiment {wildcards.experiment}) > {log} 2>&1"


rule tables:
    """Table 1 (from params.yaml), the results table, and the paper-vs-ours table."""
    input:
        [pipeline.summary_path(config, SCALE, e) for e in experiment_names(config, SCALE)],
    output:
        [report(p, category="Tables") for p in pipeline.table_paths(SCALE)],
    log:
        f"{pipeline.results_dir(config)}/{SCALE}/logs/tables.log",
    resources:
        runtime=10,
    shell:
        "{PY} workflow/scripts/tables.py --params {PARAMS} --scale {SCALE} > {log} 2>&1"
