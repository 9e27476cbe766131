"""zoo.models: init variances vs seed 002's definitions, determinism, shapes, input checks, exact forward maths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optiscope.zoo import (
    FCN,
    MLP,
    MODELS,
    Bilinear,
    DeepLinear,
    HalfMSELoss,
    NeuralChain,
    SmallCNN,
    StrippedResNet,
    TinyTransformer,
    TwoLayerLinear,
    build_model,
    digits,
    fortunes,
    teacher_regression,
)
from optiscope.zoo.init import INITS, init_variance, init_weight_, parse_init


@pytest.fixture(scope="module")
def digit_data():
    return digits(n_train=64, n_test=32, seed=0)


@pytest.mark.parametrize("init", [i for i in INITS if i != "torch"])
def test_mlp_init_variance_matches_definition(init):
    """Every layer's empirical weight variance over its ~10^4-10^5 entries vs seed 002 §2's sigma^2."""
    m = MLP(input_dim=300, output_dim=40, depth=3, width=200, init=init, seed=1)
    scheme, dist = parse_init(init)
    for layer in m.layers:
        w = layer.weight.detach().double()
        fan_out, fan_in = w.shape
        var = init_variance(scheme, fan_in, fan_out)
        expected = {"lecun": 1 / fan_in, "xavier": 2 / (fan_in + fan_out), "he": 2 / fan_in}[scheme]
        assert var == pytest.approx(expected)
        n = w.numel()
        # standard error of a variance estimate: sigma^2 sqrt((kurtosis - 1) / n); allow 5 standard errors
        kurt = 3.0 if dist == "normal" else 1.8
        assert abs(w.pow(2).mean().item() - var) < 5 * var * math.sqrt((kurt - 1) / n)
        assert abs(w.mean().item()) < 5 * math.sqrt(var / n)
        emp_kurt = (w.pow(4).mean() / w.pow(2).mean() ** 2).item()
        assert emp_kurt == pytest.approx(kurt, abs=0.25)  # the distribution family, not just the variance
        if dist == "uniform":
            assert w.abs().max().item() <= math.sqrt(3 * var) + 1e-7
        assert torch.all(layer.bias == 0)


def test_conv_init_uses_receptive_field_fans():
    w = torch.empty(64, 32, 3, 3)
    init_weight_(w, "he_normal", torch.Generator().manual_seed(0))
    assert w.var().item() == pytest.approx(2 / (32 * 9), rel=0.05)
    fcn = FCN(image_shape=(3, 8, 8), depth=3, channels=48, kernel=5, init="xavier_uniform", seed=0)
    wmid = fcn.layers[1].weight.detach()
    assert wmid.var().item() == pytest.approx(2 / (48 * 25 + 48 * 25), rel=0.05)
    assert fcn.effective_width == 48 * 25


def test_torch_init_bounds():
    m = SmallCNN(image_shape=(1, 8, 8), n_classes=10, seed=0)
    lin = m.classifier[1]
    bound = 1 / math.sqrt(lin.in_features)
    assert lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
    assert lin.weight.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)


def test_neural_chain_init_draws():
    c = NeuralChain(depth=5000, init="uniform", seed=0)
    w = torch.cat([p.detach() for p in c.weights])
    # E[w^2] = a^2 / 3 = 1 for a = sqrt(3); standard error sqrt(0.8 / 5000) = 0.013
    assert w.abs().max() <= math.sqrt(3) and w.pow(2).mean().item() == pytest.approx(1.0, abs=0.06)
    n = NeuralChain(depth=5000, init="normal", scale=0.5, seed=0)
    wn = torch.cat([p.detach() for p in n.weights])
    assert wn.std().item() == pytest.approx(0.5, rel=0.05)
    const = NeuralChain(depth=4, init="constant", scale=0.5)
    assert const(torch.tensor([[2.0]])).item() == pytest.approx(2 * 0.5 ** 4)
    assert len(list(const.parameters())) == 4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_determinism_and_global_rng_untouched(name, digit_data):
    data = fortunes(seq_len=16, n_train=8, n_test=8) if name == "transformer_lm" else digit_data
    spec = {"stripped_resnet": "stripped_resnet:stages=[1,1],channels=[4,8]"}.get(name, name)
    needs_data = name not in ("neural_chain", "bilinear")
    state = torch.random.get_rng_state()
    a = build_model(spec, data if needs_data else None, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model(spec, data if needs_data else None, seed=7)
    c = build_model(spec, data if needs_data else None, seed=8)
    pa, pb, pc = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (a, b, c)]
    assert torch.equal(pa, pb)
    if name != "bilinear":  # Bilinear's start is given, not drawn
        assert not torch.equal(pa, pc)


@pytest.mark.parametrize("spec,out_shape", [
    ("mlp:depth=3,width=16", (5, 10)), ("mlp:depth=1", (5, 10)),
    ("mlp:depth=5,width=16,residual=3,batchnorm=true", (5, 10)),
    ("deep_linear:depth=3,width=8", (5, 10)), ("two_layer_linear:m=12", (5, 10)),
    ("transformer:d_model=16,n_heads=2,n_layers=1", (5, 10)), ("fcn:depth=3,channels=4", (5, 1, 8, 8)),
    ("stripped_resnet:stages=[2,2],channels=[4,8]", (5, 10)), ("small_cnn:channels=[4,8,8],hidden=16", (5, 10)),
])
def test_shapes_and_input_checks(spec, out_shape, digit_data):
    m = build_model(spec, digit_data)
    x = digit_data.train[0][:5]
    assert tuple(m(x).shape) == out_shape
    with pytest.raises(ValueError, match="expected input"):
        m(torch.zeros(5, 63))
    with pytest.raises(ValueError, match="expected input"):
        m(torch.zeros(5))


def test_image_models_accept_image_tensors(digit_data):
    img = digit_data.train[0][:3].reshape(3, 1, 8, 8)
    for spec in ("fcn:depth=2,channels=4", "small_cnn:channels=[4,4,4],hidden=8",
                 "stripped_resnet:stages=[1,1],channels=[4,4]"):
        m = build_model(spec, digit_data)
        assert torch.equal(m(img), m(img.reshape(3, 64)))
    with pytest.raises(ValueError, match=r"\(batch, 1, 8, 8\)"):
        build_model("fcn", digit_data)(torch.zeros(3, 3, 8, 8))


def test_mlp_residual_and_batchnorm_forward_by_hand():
    m = MLP(input_dim=4, output_dim=2, depth=4, width=6, activation="tanh", residual=2, seed=0).double()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    L = m.layers
    h = torch.tanh(L[0](x))
    h = torch.tanh(h + L[2](torch.tanh(L[1](h))))
    assert torch.allclose(m(x), L[3](h), atol=1e-14)
    plain = MLP(input_dim=4, output_dim=2, depth=4, width=6, activation="tanh", seed=0).double()
    hp = torch.tanh(L[2](torch.tanh(L[1](torch.tanh(L[0](x))))))
    assert torch.allclose(plain(x), L[3](hp), atol=1e-14)
    bn = MLP(input_dim=4, output_dim=2, depth=4, width=6, batchnorm=True)
    assert sum(isinstance(mod, nn.BatchNorm1d) for mod in bn.modules()) == 3


def test_linear_models_forward_maths():
    dl = DeepLinear(input_dim=5, output_dim=3, depth=3, width=4, seed=0).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    assert torch.allclose(dl(x), x @ dl.end_to_end().T, atol=1e-14)
    big = DeepLinear(input_dim=100, output_dim=100, depth=3, width=100, init_scale=1e-3, seed=0)
    fro = torch.linalg.matrix_norm(big.end_to_end()).item()
    assert 0.6 * 1e-3 * 10 < fro < 1.4 * 1e-3 * 10  # ||W_e(0)||_F ~ init_scale sqrt(n) (ACHL gaussian init)
    tl = TwoLayerLinear(d=6, m=200, k=2, init_std=0.01, seed=0).double()
    assert torch.allclose(tl(x[:, :5].new_ones(2, 6)), torch.ones(2, 6, dtype=torch.float64) @ tl.W1.T @ tl.W2.T)
    assert tl.W1.std().item() == pytest.approx(0.01, rel=0.1)
    data = teacher_regression(d=6, n=10, n_test=5, k=2)
    assert build_model("two_layer_linear:m=9", data).W2.shape == (2, 9)


def test_bilinear_loss_and_dense_hessian_float64():
    model = Bilinear(theta1=0.75, theta2=2.0).double()  # exact in float32
    x, y = Bilinear.data(y=1.5, dtype=torch.float64)
    loss_fn = HalfMSELoss()

    def loss(theta):
        return loss_fn(torch.func.functional_call(model, {"theta": theta}, (x,)), y)

    theta = model.theta.detach()
    assert loss(theta).item() == pytest.approx(0.0, abs=1e-15)  # 0.75 * 2 = 1.5: on the hyperbola
    H = torch.func.hessian(loss)(theta)
    expected = torch.tensor([[2.0 ** 2, 2 * 1.5 - 1.5], [2 * 1.5 - 1.5, 0.75 ** 2]], dtype=torch.float64)
    assert torch.allclose(H, expected, atol=1e-12)  # spec §1d closed form
    assert torch.linalg.eigvalsh(H).max().item() == pytest.approx(0.75 ** 2 + 2.0 ** 2)  # sharpness
    off = torch.tensor([2.0, 3.0], dtype=torch.float64)
    assert loss(off).item() == pytest.approx((1.5 - 6.0) ** 2 / 2)


def test_transformer_causality_and_classifier_pooling():
    lm = TinyTransformer(n_outputs=256, seq_len=12, vocab_size=256, d_model=16, n_heads=2, n_layers=2, causal=True)
    lm = lm.double()
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 256
    out, out2 = lm(x), lm(x2)
    assert out.shape == (2, 12, 256)
    assert torch.allclose(out[:, :7], out2[:, :7], atol=1e-12)  # positions < 7 never see tokens >= 7
    assert not torch.allclose(out[:, 7:], out2[:, 7:])
    assert lm(x[:, :5]).shape == (2, 5, 256)  # shorter sequences are fine
    with pytest.raises(ValueError, match="token ids"):
        lm(torch.randint(0, 256, (2, 13)))
    clf = TinyTransformer(n_outputs=3, seq_len=4, token_dim=5, d_model=8, n_heads=2, n_layers=1)
    z = torch.randn(2, 4, 5)
    assert torch.allclose(clf(z), clf(z.reshape(2, 20)))
    with pytest.raises(ValueError, match="exactly one"):
        TinyTransformer(n_outputs=3, seq_len=4)


def test_transformer_hessian_vector_product_runs_in_float64():
    """The curvature layer differentiates twice through the model; check a double-backward HVP is finite and
    symmetric (u^T H v = v^T H u) under the math SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = TinyTransformer(n_outputs=4, seq_len=6, vocab_size=11, d_model=8, n_heads=2, n_layers=1).double()
    x = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 3])
    params = {k: v.detach() for k, v in m.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    u = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}

    def loss(p):
        return nn.functional.cross_entropy(torch.func.functional_call(m, p, (x,)), y)

    with sdpa_kernel(SDPBackend.MATH):
        hv = torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1]
        hu = torch.func.jvp(torch.func.grad(loss), (params,), (u,))[1]
    uHv = sum((u[k] * hv[k]).sum() for k in params).item()
    vHu = sum((v[k] * hu[k]).sum() for k in params).item()
    assert math.isfinite(uHv) and uHv == pytest.approx(vHu, rel=1e-8)


def test_fcn_padding_modes_and_resnet_flags():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    zeros = FCN(image_shape=(3, 8, 8), depth=3, channels=4, padding_mode="zeros", seed=0)
    circ = FCN(image_shape=(3, 8, 8), depth=3, channels=4, padding_mode="circular", seed=0)
    assert zeros(x).shape == x.shape and not torch.allclose(zeros(x), circ(x))
    # circular padding commutes with circular shifts of the image
    assert torch.allclose(circ(torch.roll(x, 2, dims=3)), torch.roll(circ(x), 2, dims=3), atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        FCN(kernel=4)
    kw = {"image_shape": (3, 16, 16), "stages": (3, 3), "channels": (4, 8), "seed": 0}
    plain, res, bn = StrippedResNet(**kw), StrippedResNet(residual=True, **kw), StrippedResNet(batchnorm=True, **kw)
    n_conv = sum(isinstance(mod, nn.Conv2d) for mod in plain.modules())
    assert n_conv == 1 + 3 + 3
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in bn.modules()) == n_conv
    assert not torch.allclose(plain(x.repeat(1, 1, 2, 2)), res(x.repeat(1, 1, 2, 2)))
    wide = StrippedResNet(wide=True, **kw)
    assert wide.fc.in_features == 16


def test_small_cnn_matches_authors_layout():
    m = SmallCNN(image_shape=(3, 32, 32), n_classes=10)
    convs = [mod for mod in m.features if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert m.classifier[1].in_features == 2048 and m.classifier[1].out_features == 512  # spec §1e
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_errors_and_spec_seed(digit_data):
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", digit_data)
    with pytest.raises(ValueError, match="bad arguments"):
        build_model("mlp:depth=2,color=3", digit_data)
    with pytest.raises(ValueError, match="input_dim"):
        build_model("mlp")  # no dataset and no sizes
    with pytest.raises(ValueError, match="init"):
        build_model("mlp:init=orthogonal", digit_data)
    a = build_model("mlp:seed=3", digit_data, seed=0)
    b = build_model("mlp", digit_data, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert isinstance(build_model(("mlp", {"depth": 2}), digit_data), MLP)
    assert build_model("mlp", "digits").layers[0].in_features == 64
