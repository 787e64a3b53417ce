rule run:
    """One continual-learning stream: one (run config, seed). Writes the run record."""
    input:
        rules.prepare_data.output,
    output:
        f"{P.results_dir(config)}/{SCALE}/runs/{{run}}/seed{{seed}}/record.json",
    params:
        config_hash=run_config_hash,
        out=lambda w: P.run_dir(config, SCALE, w.run, int(w.seed)),
    log:
        f"{P.results_dir(config)}/{SCALE}/logs/{{run}}-seed{{seed}}.log",
    threads: config["run_defaults"]["threads"] or 1
    resources:
        gpu=run_resources_gpu,
        mem_mb=2000,
    wildcard_constraints:
        seed=r"\d+",
    shell:
        "{PY} -m trainability.train --scale {SCALE} --run {wildcards.run} --seed {wildcards.seed} "
        "--out {params.out} --no-progress > {log} 2>&1"
