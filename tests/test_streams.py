"""Task streams (docs/METHOD.md §1): random-label and permuted MNIST, epoch batching."""
import pytest
import torch

from trainability.data import MNIST_MEAN, MNIST_STD, load_mnist
from trainability.streams import PermutedStream, RandomLabelStream, _subsample, batches, make_stream

CFG = {"kind": "random_label", "n_images": 21000, "label_fraction": 1.0}


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_mnist(mnist_root, train=True)


@pytest.fixture(scope="module")
def stream(mnist):
    return make_stream(CFG, *mnist, seed=0, device="cpu")


def test_subsample_shape_and_content(mnist, stream):
    x_u8, y = mnist
    assert isinstance(stream, RandomLabelStream)
    assert stream.n == 21000 and stream.input_dim == 784 and stream.n_classes == 10
    assert stream.x.shape == (21000, 784) and stream.x.dtype == torch.float32
    x, idx = _subsample(x_u8, 0, 21000, "cpu")
    assert len(idx.unique()) == 21000  # without replacement
    assert torch.equal(x, stream.x) and torch.equal(stream.y_true, y[idx])
    # Rows are the chosen images, flattened and normalised with the scalar mean/std.
    back = (stream.x[:3] * MNIST_STD + MNIST_MEAN) * 255
    assert torch.allclose(back, x_u8[idx[:3]].reshape(3, -1).float(), atol=1e-3)
    with pytest.raises(ValueError):
        RandomLabelStream(x_u8, y, 0, n_images=60001)


def test_normalisation(mnist, stream):
    full = RandomLabelStream(*mnist, seed=0, n_images=60000)
    assert abs(full.x.mean().item()) < 1e-4 and abs(full.x.std().item() - 1) < 1e-4
    assert abs(stream.x.mean().item()) < 0.02 and abs(stream.x.std().item() - 1) < 0.02


def test_same_seed_same_data_and_labels(mnist, stream):
    other = make_stream(CFG, *mnist, seed=0, device="cpu")
    # Labels of task 3 do not depend on which tasks were generated before (resume needs this).
    _, y3 = other.task(3)
    assert torch.equal(other.x, stream.x)
    for t in (0, 3):
        assert torch.equal(other.task(t)[1], stream.task(t)[1])
    assert torch.equal(y3, stream.task(3)[1])
    diff = make_stream(CFG, *mnist, seed=1, device="cpu")
    assert not torch.equal(diff.x, stream.x)
    assert (diff.task(0)[1] == stream.task(0)[1]).float().mean() < 0.15


def test_labels_change_between_tasks_and_are_uniform(stream):
    y0, y1 = stream.task(0)[1], stream.task(1)[1]
    assert y0.dtype == torch.int64 and y0.shape == (21000,)
    assert (y0 == y1).float().mean().item() < 0.13  # independent draws agree ~1/10 of the time
    assert (y0 == stream.y_true).float().mean().item() < 0.13  # the true labels are gone
    for y in (y0, y1):
        counts = torch.bincount(y, minlength=10).double()
        assert len(counts) == 10  # all ten classes, nothing outside 0..9
        chi2 = ((counts - 2100) ** 2 / 2100).sum().item()
        assert chi2 < 40  # df = 9: P(chi2 > 40) ~ 1e-5 under uniformity


def test_label_fraction(mnist):
    half = RandomLabelStream(*mnist, seed=0, label_fraction=0.5)
    agree = (half.task(0)[1] == half.y_true).float().mean().item()
    assert agree == pytest.approx(0.5 + 0.5 * 0.1, abs=0.015)  # kept + random-but-correct
    none = RandomLabelStream(*mnist, seed=0, label_fraction=0.0)
    assert torch.equal(none.task(4)[1], none.y_true)
    with pytest.raises(ValueError):
        RandomLabelStream(*mnist, seed=0, label_fraction=1.5)


def test_permuted_stream(mnist):
    s = make_stream({"kind": "permuted", "n_images": 2000, "label_fraction": 1.0}, *mnist, seed=0, device="cpu")
    assert isinstance(s, PermutedStream) and s.n == 2000
    x0, y0 = s.task(0)
    x1, y1 = s.task(1)
    assert torch.equal(y0, y1) and torch.equal(y0, s.y)  # true labels
    assert not torch.equal(x0, s.x) and not torch.equal(x0, x1)  # task 0 is permuted too
    # Same pixels, rearranged by one permutation shared by all images.
    assert torch.equal(x0.sort(dim=1).values, s.x.sort(dim=1).values)
    assert torch.equal(s.task(1)[0], x1)
    with pytest.raises(ValueError):
        make_stream({"kind": "nope", "n_images": 10}, *mnist, seed=0)


def test_batches_deterministic():
    def epochs(seed, drop_last=True):
        g = torch.Generator().manual_seed(seed)
        return [torch.cat(list(batches(1000, 256, g, drop_last))) for _ in range(2)], \
            [len(b) for b in batches(1000, 256, g, drop_last)]
    (a0, a1), sizes = epochs(7)
    (b0, b1), _ = epochs(7)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert not torch.equal(a0, a1)  # a new shuffle each epoch
    assert sizes == [256, 256, 256] and len(a0.unique()) == 768
    (c0, _), sizes = epochs(7, drop_last=False)
    assert sizes == [256, 256, 256, 232] and torch.equal(c0.sort().values, torch.arange(1000))
    assert list(batches(100, 256, torch.Generator(), drop_last=True)) == []


@pytest.mark.parametrize("pool", [2, 4, 7])
def test_pooled_stream_is_the_average_of_pixel_blocks(mnist, pool):
    """stream.pool averages pool x pool pixel blocks, then normalises with the full images' mean/std;
    the model's input size follows (streams.input_dim)."""
    from trainability.streams import input_dim
    x_u8, y = mnist
    s = make_stream(dict(CFG, n_images=300, pool=pool), *mnist, seed=0, device="cpu")
    side = 28 // pool
    assert s.input_dim == input_dim({"pool": pool}) == side * side
    _, idx = _subsample(x_u8, 0, 300, "cpu")
    img = x_u8[idx[5]].float() / 255
    block = img[pool:2 * pool, 2 * pool:3 * pool].mean()   # block (row 1, column 2)
    assert torch.allclose(s.x[5, side + 2] * MNIST_STD + MNIST_MEAN, block, atol=1e-6)
    # pool 1 is the paper's 784 pixels, unchanged
    assert input_dim({}) == 784
    assert torch.equal(make_stream(dict(CFG, n_images=300, pool=1), *mnist, seed=0, device="cpu").x,
                       make_stream(dict(CFG, n_images=300), *mnist, seed=0, device="cpu").x)
