"""The paper's model (docs/METHOD.md §2): architecture, CReLU widths, activations, init, BatchNorm, per-layer
Adam groups."""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from trainability.models import build_model, param_groups

RELU_P = 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
CRELU_P = 784 * 256 + 256 + 512 * 256 + 256 + 512 * 10 + 10


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(32, 784)


@pytest.mark.parametrize("act,expected", [("relu", RELU_P), ("leaky_relu", RELU_P), ("identity", RELU_P),
                                          ("crelu", CRELU_P)])
def test_parameter_counts(act, expected):
    m = build_model({"activation": act, "rho": 0.3, "widths": [256, 256], "batchnorm": False})
    assert n_params(m) == expected
    assert m.n_layers == 3
    assert n_params(build_model({"activation": act, "batchnorm": True})) == expected + 2 * (2 * 256)


def test_crelu_shapes_and_values(x):
    m = build_model({"activation": "crelu"})
    assert [(l.in_features, l.out_features) for l in m.linears] == [(784, 256), (512, 256), (512, 10)]
    logits, pre, post = m.forward_with_hidden(x)
    assert logits.shape == (32, 10)
    assert [p.shape for p in pre] == [(32, 256), (32, 256)]
    assert [p.shape for p in post] == [(32, 512), (32, 512)]
    torch.testing.assert_close(pre[0], m.linears[0](x))
    torch.testing.assert_close(post[0], torch.cat([F.relu(pre[0]), F.relu(-pre[0])], 1))
    torch.testing.assert_close(pre[1], m.linears[1](post[0]))
    torch.testing.assert_close(logits, m(x))
    # exactly one of the two halves is non-zero wherever z != 0: nothing is lost
    torch.testing.assert_close(post[0][:, :256] - post[0][:, 256:], pre[0])


@pytest.mark.parametrize("rho", [0.3, 0.7])
def test_leaky_relu_slope(x, rho):
    m = build_model({"activation": "leaky_relu", "rho": rho})
    logits, pre, post = m.forward_with_hidden(x)
    for z, a in zip(pre, post):
        assert (z < 0).any() and (z > 0).any()
        torch.testing.assert_close(a, torch.where(z > 0, z, rho * z))
    torch.testing.assert_close(logits, m(x))


def test_relu_hidden(x):
    m = build_model({"activation": "relu"})
    logits, pre, post = m.forward_with_hidden(x)
    assert [p.shape for p in post] == [(32, 256), (32, 256)]
    torch.testing.assert_close(post[1], F.relu(m.linears[1](post[0])))
    torch.testing.assert_close(logits, m(x))


def test_identity_is_linear(x):
    m = build_model({"activation": "identity"})
    w = m.linears[2].weight @ m.linears[1].weight @ m.linears[0].weight  # zero biases at init
    torch.testing.assert_close(m(x), x @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m(2 * x), 2 * m(x), rtol=1e-4, atol=1e-5)
    y = torch.randn_like(x)
    torch.testing.assert_close(m(x + y), m(x) + m(y), rtol=1e-4, atol=1e-4)


def test_init_kaiming_uniform_zero_bias():
    torch.manual_seed(1)
    for act in ("relu", "crelu"):
        m = build_model({"activation": act})
        for lin in m.linears:
            assert torch.all(lin.bias == 0)
            b = math.sqrt(6.0 / lin.in_features)   # gain sqrt(2) * sqrt(3 / fan_in)
            w = lin.weight
            assert w.abs().max() <= b and w.abs().max() > 0.97 * b
            # U(-b, b) has std b / sqrt(3)
            assert abs(w.std().item() - b / math.sqrt(3)) < 0.03 * b / math.sqrt(3)
            assert abs(w.mean().item()) < 0.02 * b


def test_batchnorm_train_and_eval(x):
    torch.manual_seed(2)
    m = build_model({"activation": "relu", "batchnorm": True})
    assert len(m.bns) == 2
    m.train()
    logits, pre, post = m.forward_with_hidden(x)
    for z in pre:  # pre-activation is taken after BN: per-feature standardised over the batch
        torch.testing.assert_close(z.mean(0), torch.zeros(256), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(256), atol=1e-3, rtol=0)
    assert not torch.all(m.bns[0].running_mean == 0)      # running stats moved
    # a few Adam steps reduce the loss
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(param_groups(m, 1e-2))
    first = F.cross_entropy(m(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert F.cross_entropy(m(x), y).item() < first
    # eval mode uses running statistics: a sample's output does not depend on its batch
    m.eval()
    torch.testing.assert_close(m(x[:4])[:1], m(x[:1]))
    logits, pre, post = m.forward_with_hidden(x)
    torch.testing.assert_close(logits, m(x))


def test_layer_params_and_param_groups():
    for cfg in ({"activation": "relu"}, {"activation": "crelu", "batchnorm": True}):
        m = build_model(cfg)
        groups = param_groups(m, 1e-3, weight_decay=1e-4)
        assert [g["layer"] for g in groups] == [1, 2, 3]
        assert all(g["lr"] == 1e-3 and g["weight_decay"] == 1e-4 for g in groups)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))                               # each parameter once
        assert set(ids) == {id(p) for p in m.parameters()}            # and all of them
        assert groups[0]["params"][0] is m.linears[0].weight and groups[0]["params"][1] is m.linears[0].bias
        assert groups[2]["params"] == [m.linears[2].weight, m.linears[2].bias]   # no BN on the output
        if cfg.get("batchnorm"):
            assert groups[1]["params"][2:] == [m.bns[1].weight, m.bns[1].bias]
    with pytest.raises(IndexError):
        m.layer_params(0)


def test_per_layer_lr_acts_on_its_layer_only(x):
    m = build_model({"activation": "relu"})
    opt = torch.optim.Adam(param_groups(m, 1e-3), betas=(0.9, 0.999), eps=1e-8)
    assert len(opt.param_groups) == 3 and opt.param_groups[1]["layer"] == 2
    opt.param_groups[1]["lr"] = 0.0
    before = [p.detach().clone() for p in m.parameters()]
    F.cross_entropy(m(x), torch.randint(0, 10, (32,))).backward()
    opt.step()
    after = list(m.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    # order: L1 w, b, L2 w, b, L3 w, b; all gradients are non-zero
    assert changed == [True, True, False, False, True, True]


def test_build_model_defaults_and_errors():
    m = build_model({})
    assert m.activation == "relu" and len(m.bns) == 0
    assert [(l.in_features, l.out_features) for l in m.linears] == [(784, 256), (256, 256), (256, 10)]
    m = build_model({"widths": [8], "n_classes": 3, "activation": "crelu"}, input_dim=5)
    assert [(l.in_features, l.out_features) for l in m.linears] == [(5, 8), (16, 3)]
    assert m(torch.randn(2, 5)).shape == (2, 3)
    with pytest.raises(ValueError):
        build_model({"activation": "tanh"})
    with pytest.raises(ValueError, match="input_dim"):
        build_model({"widths": [8], "input_dim": 5})
    # picklable (no lambdas), e.g. for torch.save(model) or multiprocessing
    m2 = pickle.loads(pickle.dumps(build_model({"activation": "leaky_relu", "rho": 0.7})))
    z = torch.tensor([[-1.0, 2.0]])
    torch.testing.assert_close(m2.act(z), torch.tensor([[-0.7, 2.0]]))
