"""Exact Hessian diagonals (curvature.diagonal): second-order backpropagation and restricted HVP columns agree with
full HVP columns and with the dense float64 Hessian on MLPs, CNNs, residual, BatchNorm (eval and train mode),
LayerNorm, embedding and transformer models, for cross-entropy and mean-squared error, one batch or several."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from optiscope.curvature import Hessian
from optiscope.curvature.diagonal import structured_plan
from optiscope.zoo.models import MLP, TinyTransformer

DT = torch.float64


class Residual(nn.Module):
    """``linear -> tanh -> (x + tanh(linear(x))) -> linear``: a residual branch in the middle."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.tanh(self.mid(h)))


class Embedder(nn.Module):
    """Token ids -> embedding -> flatten -> linear -> GELU -> linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3, padding_idx=0)
        self.flat = nn.Flatten()
        self.hid = nn.Linear(12, 5)
        self.act = nn.GELU()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.act(self.hid(self.flat(self.emb(x)))))


class Tied(nn.Module):
    """The same square linear layer applied twice (its parameters are used twice)."""

    def __init__(self):
        super().__init__()
        self.first, self.shared, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.first(x)))))))


def _batches(X, y, sizes):
    out, s = [], 0
    for n in sizes:
        out.append((X[s:s + n], y[s:s + n]))
        s += n
    return out


def make(kind: str, seed: int = 0):
    """(model, loss_fn, data) of one small float64 problem."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    ce = nn.CrossEntropyLoss()
    X = torch.randn(14, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (14,), generator=g)
    if kind == "mlp_ce":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
        return model.to(DT), ce, (X, y)
    if kind == "mlp_mse_batches":
        model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(6, 5), nn.Softplus(),
                              nn.Linear(5, 2)).to(DT).eval()
        Y = torch.randn(14, 2, generator=g, dtype=DT)
        return model, nn.MSELoss(), _batches(X, Y, (5, 6, 3))
    if kind == "mlp_layernorm":
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        return model.to(DT), ce, _batches(X, y, (9, 5))
    if kind == "zoo_mlp":
        model = MLP(4, 3, depth=3, width=6, activation="tanh", seed=seed).to(DT)
        return model, ce, (X, y)
    if kind in ("cnn", "cnn_mse"):
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GELU(), nn.AvgPool2d(2), nn.Conv2d(3, 4, 2),
                              nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)).to(DT)
        Xi = torch.randn(6, 2, 6, 6, generator=g, dtype=DT)
        if kind == "cnn":
            return model, ce, _batches(Xi, torch.randint(0, 3, (6,), generator=g), (4, 2))
        return model, nn.MSELoss(), (Xi, torch.randn(6, 3, generator=g, dtype=DT))
    if kind in ("bn_eval", "bn_train"):
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Softplus(), nn.Flatten(),
                              nn.Linear(2 * 4 * 4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        Xi = torch.randn(8, 1, 6, 6, generator=g, dtype=DT)
        with torch.no_grad():
            model.train()(Xi)  # non-trivial running statistics
        model.train(kind == "bn_train")
        return model, ce, (Xi, torch.randint(0, 3, (8,), generator=g))
    if kind == "residual":
        return Residual().to(DT), ce, (X, y)
    if kind == "embedding":
        ids = torch.randint(0, 7, (10, 4), generator=g)
        return Embedder().to(DT), ce, (ids, torch.randint(0, 3, (10,), generator=g))
    if kind == "transformer":
        model = TinyTransformer(3, 4, vocab_size=5, d_model=8, n_heads=2, n_layers=1, seed=seed).to(DT).eval()
        ids = torch.randint(0, 5, (6, 4), generator=g)
        return model, ce, _batches(ids, torch.randint(0, 3, (6,), generator=g), (4, 2))
    if kind == "transformer_mse":
        model = TinyTransformer(2, 4, token_dim=3, d_model=8, n_heads=2, n_layers=1, seed=seed).to(DT).eval()
        return model, nn.MSELoss(), (torch.randn(5, 4, 3, generator=g, dtype=DT),
                                     torch.randn(5, 2, generator=g, dtype=DT))
    if kind == "tied":
        return Tied().to(DT), ce, (X, y)
    raise AssertionError(kind)


KINDS = ["mlp_ce", "mlp_mse_batches", "mlp_layernorm", "zoo_mlp", "cnn", "cnn_mse", "bn_eval", "bn_train",
         "residual", "embedding", "transformer", "transformer_mse", "tied"]

#: parameters that second-order backpropagation must cover (all others fall back)
STRUCTURED = {
    "mlp_ce": "all", "mlp_mse_batches": "all", "mlp_layernorm": "all", "zoo_mlp": "all", "cnn": "all",
    "cnn_mse": "all", "bn_eval": "all", "embedding": "all",
    "bn_train": {"5.weight", "5.bias", "7.weight", "7.bias"},  # the train-mode BatchNorm1d and above
    "residual": {"out.weight", "out.bias"},
    "transformer": {"head.weight", "head.bias"},
    "transformer_mse": {"head.weight", "head.bias"},
    "tied": {"head.weight", "head.bias"},
}


def _all_coords(H):
    return {n: torch.arange(s) for n, s in H.sizes.items()}


def _dense_diag(H):
    return torch.diagonal(H.dense())


@pytest.mark.parametrize("kind", KINDS)
def test_auto_matches_hvp_columns_and_dense(kind):
    model, loss, data = make(kind)
    H = Hessian(model, loss, data)
    coords = _all_coords(H)
    auto = H.diagonal(coords)
    cols = H.diagonal(coords, method="hvp")
    layer = H.diagonal(coords, method="layer-hvp")
    ref = _dense_diag(H)
    for n in H.param_names:
        r = ref[H.offsets[n]: H.offsets[n] + H.sizes[n]]
        torch.testing.assert_close(cols.values[n], r, atol=1e-10, rtol=0)
        torch.testing.assert_close(auto.values[n], cols.values[n], atol=1e-10, rtol=0, msg=f"{kind}: {n}")
        torch.testing.assert_close(layer.values[n], cols.values[n], atol=1e-10, rtol=0, msg=f"{kind}: {n}")
    assert set(layer.method.values()) == {"layer-hvp"} and set(cols.method.values()) == {"hvp"}
    # the reference is not trivially zero
    assert float(ref.abs().max()) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_method_labels(kind):
    model, loss, data = make(kind)
    H = Hessian(model, loss, data)
    res = H.diagonal(_all_coords(H))
    want = set(H.param_names) if STRUCTURED[kind] == "all" else STRUCTURED[kind]
    got = {n for n, m in res.method.items() if m == "structured"}
    assert got == want
    for n in H.param_names:
        if n not in want:
            assert res.method[n] == "layer-hvp"
            assert res.reason[n]  # says why it was not structured
    covered, why = structured_plan(H)
    assert set(covered) == want and set(why) == set(H.param_names) - want
    n_fallback = sum(H.sizes[n] for n in H.param_names if n not in want)
    assert res.n_hvp == n_fallback  # second-order backprop uses no HVP; restricted columns one per entry


def test_structured_on_unsupported_model_names_the_layer():
    model, loss, data = make("transformer")
    H = Hessian(model, loss, data)
    with pytest.raises(ValueError, match=r"method='structured' cannot handle parameter 'pos'.*not a chain"):
        H.diagonal(_all_coords(H), method="structured")
    model, loss, data = make("bn_train")
    H = Hessian(model, loss, data)
    with pytest.raises(ValueError, match=r"'0\.weight'.*batch statistics"):
        H.diagonal(_all_coords(H), method="structured")
    with pytest.raises(ValueError, match="method must be one of"):
        H.diagonal(_all_coords(H), method="backpack")
    # the structured parameters alone are fine
    res = H.diagonal({"7.weight": [0, 3], "5.bias": [1]}, method="structured")
    assert res.method == {"5.bias": "structured", "7.weight": "structured"} and res.n_hvp == 0


def test_structured_against_torch_func_hessian_and_sampled_coordinates():
    """An independent dense reference (torch.func.hessian on the flat parameters) for sampled coordinates of one
    layer of a GELU/LayerNorm network, with frozen parameters."""
    model, loss, (X, y) = make("mlp_ce")
    names = ["0.weight", "2.weight", "2.bias"]
    H = Hessian(model, loss, (X, y), params=names)
    coords = H.sample_coordinates(per_layer=4, seed=5, layers=["0.weight", "2.bias"])
    res = H.diagonal(coords, method="structured")
    params = dict(model.named_parameters())
    for n in coords:
        def f(p, n=n):
            return loss(functional_call(model, {**params, n: p}, (X,)), y)

        ref = torch.diagonal(hessian(f)(params[n].detach()).reshape(H.sizes[n], H.sizes[n]))
        torch.testing.assert_close(res.values[n], ref[coords[n]], atol=1e-12, rtol=0)
    assert list(res.values) == ["0.weight", "2.bias"]


def test_probe_side_effects_and_float32():
    """Train-mode BatchNorm: running statistics, training flags and the RNG are untouched; float32 agrees with
    float64 to float32 accuracy."""
    model, loss, (X, y) = make("bn_train")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    H = Hessian(model, loss, (X, y))
    r64 = H.diagonal(_all_coords(H))
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    m32 = make("bn_train")[0].float()
    m32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    H32 = Hessian(m32, loss, (X.float(), y))
    r32 = H32.diagonal(_all_coords(H32))
    assert r32.method == r64.method
    scale = max(float(v.abs().max()) for v in r64.values.values())
    for n in H.param_names:
        assert float((r32.values[n].double() - r64.values[n]).abs().max()) <= 1e-4 * scale, n


def test_diagonal_block_and_function_hessian_unchanged():
    model, loss, data = make("cnn")
    H = Hessian(model, loss, data)
    coords = H.sample_coordinates(per_layer=3, seed=1)
    b = H.diagonal_block(coords)
    d = H.diagonal(coords)
    for n, sl in b.index.items():
        torch.testing.assert_close(torch.diagonal(b.matrix)[sl], d.values[n], atol=1e-10, rtol=0)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    Hf = Hessian.from_function(lambda p: (p["a"] ** 4).sum() + p["a"].prod(), {"a": w})
    res = Hf.diagonal({"a": [0, 1, 2]})
    assert res.method == {"a": "layer-hvp"}
    torch.testing.assert_close(res.values["a"], 12 * w ** 2, atol=1e-12, rtol=0)
