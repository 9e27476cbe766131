"""optiscope.curvature.ntk: empirical NTK against dense Jacobians (float64) and the closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from optiscope.curvature.ntk import NTKOneHiddenLayer, empirical_ntk


def dense_jacobian(model, X):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return functional_call(model, p, (X,)).reshape(X.shape[0], -1)

    J = jacrev(f)(params)
    return torch.cat([J[k].reshape(X.shape[0], J[k].shape[1], -1) for k in params], dim=2)  # (N, O, P)


def test_empirical_ntk_matches_dense_jacobian_scalar_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    X = torch.randn(9, 3, dtype=torch.float64)
    J = dense_jacobian(model, X)[:, 0]
    before = [p.clone() for p in model.parameters()]
    K = empirical_ntk(model, X, chunk_size=4)
    torch.testing.assert_close(K, J @ J.T, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # recomputing path (tiny memory budget) gives the same kernel
    K2 = empirical_ntk(model, X, chunk_size=2, memory_budget_mb=1e-6)
    torch.testing.assert_close(K, K2, rtol=1e-12, atol=1e-12)


def test_multi_output_trace_and_index():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    J = dense_jacobian(model, X)
    Kt = empirical_ntk(model, X)
    torch.testing.assert_close(Kt, torch.einsum("aop,bop->ab", J, J), rtol=1e-10, atol=1e-12)
    K1 = empirical_ntk(model, X, output=1)
    torch.testing.assert_close(K1, J[:, 1] @ J[:, 1].T, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        empirical_ntk(model, X, output=5)
    with pytest.raises(ValueError, match="unknown parameter"):
        empirical_ntk(model, X, params=["nope"])


def test_one_hidden_layer_closed_form_equals_empirical_ntk():
    X = torch.randn(11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    net = NTKOneHiddenLayer(6, width=40, seed=3, dtype=torch.float64)
    K = net.ntk(X, chunk_size=4)
    torch.testing.assert_close(K, empirical_ntk(net, X), rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(K).min() > -1e-10
    assert net(X).shape == (11,)


def test_ntk_parameterisation_scale_is_width_independent():
    X = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    d = [NTKOneHiddenLayer(5, width=w, seed=0, dtype=torch.float64).ntk(X).diagonal().mean() for w in (200, 3000)]
    assert float(d[0] / d[1]) == pytest.approx(1.0, abs=0.15)
