# Runs: one job per (run, seed), or, at a scale with `batched: true` (the paper scale, on a GPU), one job
# per batch group: every run sharing a model shape and stream (task lengths may differ), all seeds,
# trained as one batched model (trainability.batched). Both write the same record.json files.

GROUPS, SINGLE_RUNS = pipeline.run_jobs(config, SCALE)


rule run:
    """One continual-learning stream: one (run config, seed). Writes the run record."""
    input:
        rules.prepare_data.output,
    output:
        pipeline.record_path(config, SCALE, "{run}", "{seed}"),
    params:
        config_hash=run_config_hash,
        out=lambda w: pipeline.run_dir(config, SCALE, w.run, int(w.seed)),
    log:
        f"{pipeline.results_dir(config)}/{SCALE}/logs/{{run}}-seed{{seed}}.log",
    threads: config["run_defaults"]["threads"] or 1
    resources:
        gpu=run_resource("gpu"),
        runtime=run_resource("runtime"),
        mem_mb=2000,
    wildcard_constraints:
        run="|".join(re.escape(r) for r in SINGLE_RUNS) or "(?!)",
        seed=r"\d+",
    shell:
        "{PY} -m trainability.train --params {PARAMS} --scale {SCALE} --run {wildcards.run} --seed {wildcards.seed} "
        "--out {params.out} --no-progress > {log} 2>&1"


for group, members in GROUPS.items():

    rule:
        name:
            "run_" + group.replace("-", "_")
        input:
            rules.prepare_data.output,
        output:
            [pipeline.record_path(config, SCALE, r, s) for r in members for s in SEEDS],
        params:
            config_hash=config_hash({r: resolve_run(config, SCALE, r, s) for r in members for s in SEEDS}),
            runs=" ".join(members),
        log:
            f"{pipeline.results_dir(config)}/{SCALE}/logs/{group}.log",
        threads: config["run_defaults"]["threads"] or 1
        resources:
            **pipeline.job_resources([resolve_run(config, SCALE, r, s) for r in members for s in SEEDS]),
            mem_mb=8000,
        shell:
            "{PY} -m trainability.batched --params {PARAMS} --scale {SCALE} --runs {params.runs} --no-progress > {log} 2>&1"
