"""The run's device (paper runs on one GPU; the CPU default elsewhere): which device, how many threads,
which matmul precision. Both engines set theirs up here."""
from __future__ import annotations

import torch

from .config import ConfigError


def setup_device(cfg: dict) -> torch.device:
    """The run's device, thread count and matmul precision (the keys device, threads, tf32)."""
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    set_matmul_precision(cfg, device)
    return device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but CUDA is not available (use 'auto' or 'cpu')")
    return torch.device(name)


def set_matmul_precision(cfg: dict, device: torch.device) -> None:
    """The run's `tf32` key on CUDA (process-wide backend flags, set by every run for itself). TF32 keeps
    10 mantissa bits in matmul products: faster on a GPU, and the records change. No effect on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.allow_tf32 = cfg["tf32"]
