# Helpers shared by the rules. Paths come from trainability.pipeline (shared with dvc.yaml).


def run_config_hash(wildcards):
    """Hash of the resolved run config: a change of any of its params.yaml keys reruns the job."""
    return config_hash(resolve_run(config, SCALE, wildcards.run, int(wildcards.seed)))


def run_resources_gpu(wildcards):
    """A run asks for a GPU when its resolved device wants CUDA (the `paper` scale uses `auto`)."""
    cfg = resolve_run(config, SCALE, wildcards.run, int(wildcards.seed))
    return 1 if cfg["device"] in ("auto", "cuda") and _cuda_available() else 0


def _cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False
