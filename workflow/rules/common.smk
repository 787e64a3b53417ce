# Helpers shared by the rules. Paths come from trainability.pipeline (shared with dvc.yaml).


def run_config_hash(wildcards):
    """Hash of the resolved run config: a change of any of its params.yaml keys reruns the job."""
    return config_hash(resolve_run(config, SCALE, wildcards.run, int(wildcards.seed)))


def run_resource(name):
    """A resource of one (run, seed) job from its config (pipeline.job_resources): `gpu` (1 when the run's
    device is cuda/auto, whatever the submitting host has) or `runtime` (minutes)."""
    return lambda wildcards: pipeline.job_resources([resolve_run(config, SCALE, wildcards.run, int(wildcards.seed))])[name]
