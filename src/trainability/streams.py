"""Task streams (paper Sec. 5, App. D.1; docs/METHOD.md §1): random-label MNIST (the paper) and
permuted-pixel MNIST (beyond it).

Data live on the device as tensors; every random draw is a function of (seed, task) alone, so a task
can be regenerated after a restart without any saved random state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import MNIST_MEAN, MNIST_STD


def mix_seed(*parts: int, start: int = 0) -> int:
    """The one seed-mixing formula: a derived seed as a function of (start, parts) alone, so that every
    random draw of a run (images, labels, shuffles, inits) depends on (seed, task, ...) only."""
    s = start
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**62)
    return s


def sub_seed(seed: int, *parts: int) -> int:
    """A run's derived seed of (seed, task, ...): mix_seed started at the run's seed (both engines' inits,
    shuffles and probe starts)."""
    return mix_seed(*parts, start=seed)


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(*parts))


def input_dim(stream_cfg: dict) -> int:
    """Number of model inputs: 784 pixels, or (28 / pool)^2 with `stream.pool`."""
    return (28 // stream_cfg.get("pool", 1)) ** 2


def _subsample(x_uint8: torch.Tensor, seed: int, n_images: int, device,
               pool: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick n_images once per seed; average-pool by `pool` (1: none, the paper); flatten and normalise with
    the dataset's scalar mean/std."""
    if n_images > len(x_uint8):
        raise ValueError(f"stream.n_images={n_images} exceeds the {len(x_uint8)} MNIST training images")
    idx = torch.randperm(len(x_uint8), generator=_generator(torch.device("cpu"), seed, 0))[:n_images]
    x = x_uint8[idx].float() / 255.0
    if pool > 1:   # [choice] a smaller input for the CPU default: fewer parameters to memorise with
        x = F.avg_pool2d(x.unsqueeze(1), pool)
    x = (x.reshape(n_images, -1) - MNIST_MEAN) / MNIST_STD
    return x.to(device), idx


class RandomLabelStream:
    """Random-label MNIST (docs/METHOD.md §1): fixed images; at each task the labels of a fraction `label_fraction`
    of the examples (1.0, every example, in the paper) are redrawn uniformly from {0..n_classes-1}
    (`torch.randint(0, n_classes)`, i.e. all ten classes); the others keep their true label. With
    fraction < 1 exactly round(fraction * n) examples, chosen afresh at each task, get a random label
    (which matches the true one by chance 1/n_classes). Task t's labels depend on (seed, t) only."""

    def __init__(self, x_uint8, y, seed: int, n_images: int = 21000, label_fraction: float = 1.0,
                 n_classes: int = 10, device="cpu", pool: int = 1):
        if not 0.0 <= label_fraction <= 1.0:
            raise ValueError(f"stream.label_fraction={label_fraction} must lie in [0, 1]")
        self.device = torch.device(device)
        self.seed, self.label_fraction, self.n_classes = seed, label_fraction, n_classes
        self.x, idx = _subsample(x_uint8, seed, n_images, self.device, pool)
        self.y_true = y[idx].to(self.device)
        self.n, self.input_dim = self.x.shape

    def task(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(torch.device("cpu"), self.seed, 1, t)
        # Drawn on the CPU so that a task's labels are the same on every device.
        y = torch.randint(0, self.n_classes, (self.n,), generator=g)
        if self.label_fraction < 1.0:
            keep = torch.randperm(self.n, generator=g)[round(self.label_fraction * self.n):]
            y[keep] = self.y_true.cpu()[keep]
        return self.x, y.to(self.device)


class PermutedStream:
    """Permuted-pixel MNIST (beyond the paper): task t applies its own fixed pixel permutation (every
    task is permuted, task 0 included) to the same images, with their true labels."""

    def __init__(self, x_uint8, y, seed: int, n_images: int = 21000, device="cpu", pool: int = 1):
        self.device = torch.device(device)
        self.seed = seed
        self.x, idx = _subsample(x_uint8, seed, n_images, self.device, pool)
        self.y = y[idx].to(self.device)
        self.n, self.input_dim = self.x.shape
        self.n_classes = 10

    def task(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(self.input_dim, generator=_generator(torch.device("cpu"), self.seed, 2, t))
        return self.x[:, perm.to(self.device)], self.y


def make_stream(cfg: dict, x_uint8, y, seed: int, device="cpu"):
    """cfg = params.yaml `stream` block: {kind, n_images, label_fraction, pool} (drop_last is the loop's)."""
    pool = cfg.get("pool", 1)
    if cfg["kind"] == "random_label":
        return RandomLabelStream(x_uint8, y, seed, cfg["n_images"], cfg.get("label_fraction", 1.0), device=device,
                                 pool=pool)
    if cfg["kind"] == "permuted":
        return PermutedStream(x_uint8, y, seed, cfg["n_images"], device=device, pool=pool)
    raise ValueError(f"stream.kind: unknown {cfg['kind']!r}")


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch's shuffled order of the n images (on the generator's device)."""
    return torch.randperm(n, generator=generator, device=generator.device)


def split_batches(order: torch.Tensor, batch_size: int, drop_last: bool = True):
    """An epoch's minibatches from its order (..., n) (one model's, or every model's of a stack, (M, n)):
    views of batch_size indices along the last dimension, then the partial tail of n % batch_size unless
    drop_last (both engines; loop.steps_per_task counts them)."""
    n = order.shape[-1]
    stop = n - n % batch_size if drop_last else n
    return order[..., :stop].split(batch_size, dim=-1) if stop else ()


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    """Index tensors of one shuffled epoch (epoch_order in minibatches, split_batches). The last partial
    batch is dropped by default so every minibatch has exactly B examples (B enters the noise bound)."""
    return split_batches(epoch_order(n, generator), batch_size, drop_last)
