"""What makes a Tracker checkpoint cheap, checked against fresh operators, dense float64 Hessians and direct
counts: the probe loss is validated once per model structure (later checkpoints take the loss from the gradient-
graph build), and Lanczos keeps its Krylov basis free of subnormal numbers (which slow CPU arithmetic down)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_lab_common import tiny_mlp

from optiscope import Hessian, Tracker
from optiscope.curvature import _problem
from optiscope.curvature._problem import LossFunction, NonFiniteLossError
from optiscope.curvature.spectrum import _flush_tiny, lanczos

torch.set_num_threads(1)
DT = torch.float64


def data(n=64, d=5, classes=3, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = (X @ torch.randn(d, classes, generator=g, dtype=dtype)).argmax(1)
    return X, y


def dense_top(model, X, y):
    """Largest eigenvalue of the dense float64 Hessian of the mean cross-entropy."""
    named = dict(model.named_parameters())
    names = list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def f(flat):
        p = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, p, (X,)), y)

    H = torch.func.hessian(f)(torch.cat([named[n].detach().reshape(-1) for n in names]))
    return float(torch.linalg.eigvalsh(H)[-1])


def sgd_steps(model, X, y, steps, lr=0.3):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return opt


# ----------------------------------------------------------------------------------------------------------------
# Hessian._prevalidated: a fresh operator without the validating forward pass
@pytest.mark.parametrize("batches", [1, 2])
def test_prevalidated_hessian_equals_a_fresh_one(batches):
    X, y = data()
    model = tiny_mlp(dtype=DT)
    sgd_steps(model, X, y, 3)
    d = (X, y) if batches == 1 else [(X[:40], y[:40]), (X[40:], y[40:])]
    fresh = Hessian(model, F.cross_entropy, d)
    pre = Hessian._prevalidated(model, LossFunction.from_model(model, F.cross_entropy, d))
    assert pre._loss_value is None  # nothing evaluated yet
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in fresh.params.items()}
    hf, hp = fresh.hvp(v), pre.hvp(v)
    assert pre.n_hvp == fresh.n_hvp == 1  # counted from zero, like a fresh operator
    assert all(torch.allclose(hf[n], hp[n], rtol=1e-12, atol=1e-14) for n in hf)
    assert pre.loss() == pytest.approx(fresh.loss(), rel=1e-13)
    assert pre.loss() == pytest.approx(float(F.cross_entropy(model(X), y)), rel=1e-12)
    gf, gp = fresh.gradient(), pre.gradient()
    assert all(torch.allclose(gf[n], gp[n], rtol=1e-12, atol=1e-14) for n in gf)
    top = pre.eigenvalues(k=1, tol=1e-10, max_iter=200).values[0]
    assert top == pytest.approx(dense_top(model, X, y), rel=1e-9)


def test_prevalidated_hessian_reports_a_non_finite_loss_at_first_use():
    X, y = data()
    model = tiny_mlp(dtype=DT)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLossError):
        Hessian(model, F.cross_entropy, (X, y))  # the constructor validates
    for first_use in ("hvp", "eigenvalues", "loss", "gradient", "diagonal"):
        for d in ((X, y), [(X[:40], y[:40]), (X[40:], y[40:])]):
            H = Hessian._prevalidated(model, LossFunction.from_model(model, F.cross_entropy, d))
            with pytest.raises(NonFiniteLossError):
                if first_use == "hvp":
                    H.hvp({n: torch.ones_like(p) for n, p in H.params.items()})
                elif first_use == "eigenvalues":
                    H.eigenvalues(k=1)
                elif first_use == "loss":
                    H.loss()
                elif first_use == "gradient":
                    H.gradient()
                else:
                    H.diagonal(H.sample_coordinates(per_layer=3))


# ----------------------------------------------------------------------------------------------------------------
# the Tracker validates the probe loss once per model structure
def test_tracker_validates_once_per_structure_and_stays_exact(monkeypatch):
    X, y = data()
    model = tiny_mlp(dtype=DT)
    calls = []
    value = _problem.LossFunction.value
    monkeypatch.setattr(_problem.LossFunction, "value", lambda self: calls.append(1) or value(self))
    tr = Tracker(model, F.cross_entropy, (X, y), probes=["sharpness:tol=1e-10,max_iter=200"], every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    seen = []
    for t in range(4):
        out = tr.step(t, optimizer=opt)
        seen.append((out["sharpness"], dense_top(model, X, y)))
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    assert len(calls) == 1  # the first checkpoint validated; later ones took the loss from the graph build
    for got, want in seen:
        assert got == pytest.approx(want, rel=1e-9)
    assert len({round(w, 12) for _, w in seen}) == 4  # the parameters did move between checkpoints
    # a structure change (a parameter given new storage, as model.to() or load_state_dict(assign=True) do) is
    # validated again
    model[0].weight.data = model[0].weight.data.clone()
    out = tr.step(4, optimizer=opt)
    assert len(calls) == 2
    assert out["sharpness"] == pytest.approx(dense_top(model, X, y), rel=1e-9)
    tr.step(5, optimizer=opt)
    assert len(calls) == 2
    model.eval()  # a module mode change is a structure change too
    tr.step(6, optimizer=opt)
    assert len(calls) == 3


def test_tracker_records_divergence_after_validation():
    X, y = data()
    model = tiny_mlp(dtype=DT)
    tr = Tracker(model, F.cross_entropy, (X, y), probes=["sharpness"], every=1)
    assert tr.step(0)["sharpness"] > 0
    with torch.no_grad():
        model[2].weight.fill_(math.inf)  # in place: same storage, so the checkpoint is not validated again
    assert tr._structure() == tr._validated
    out = tr.step(1)
    assert out == {"diverged": 1.0}


# ----------------------------------------------------------------------------------------------------------------
# Lanczos never multiplies by subnormal-level entries
def test_flush_tiny_zeroes_only_what_is_below_rounding():
    info = torch.finfo(torch.float32)
    q = torch.tensor([0.5, -1e-20, 2e-31, -5e-32, 1e-39, 0.0, -0.5], dtype=torch.float32)
    out = _flush_tiny(q)
    thr = info.tiny / info.eps
    assert thr == pytest.approx(9.86e-32, rel=1e-2)
    assert torch.equal(out, torch.where(q.abs() <= thr, torch.zeros_like(q), q))
    assert out[1] == q[1] and out[2] == q[2] and out[3] == 0 and out[4] == 0
    x = torch.tensor([1e-200, 1e-300, 1.0], dtype=torch.float64)
    assert torch.equal(_flush_tiny(x), torch.tensor([1e-200, 0.0, 1.0], dtype=torch.float64))
    h = torch.tensor([1e-6, 1.0], dtype=torch.float16)
    assert torch.equal(_flush_tiny(h), h)  # no negligible threshold in half precision: left alone


def test_lanczos_warm_start_with_tiny_entries_gives_the_same_eigenvalue_without_them():
    """A warm start whose entries on the operator's null space are at subnormal level (what repeated warm starts
    produce on weights into dead units): no operator input contains such entries, and the result equals the run
    from the start with those entries zeroed, to the last bit."""
    n, null = 400, 100
    g = torch.Generator().manual_seed(0)
    Qo, _ = torch.linalg.qr(torch.randn(n - null, n - null, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.1, 1.0, n - null, dtype=torch.float64)
    lam[-1], lam[-2] = 3.0, 2.5
    Md = (Qo * lam) @ Qo.T
    M = torch.zeros(n, n, dtype=torch.float64)
    M[:n - null, :n - null] = Md
    M = M.float()
    inputs = []

    def A(x):
        inputs.append(x.clone())
        return M @ x

    start = torch.zeros(n)
    start[:n - null] = Qo[:, -1].float() + 0.3 * torch.randn(n - null, generator=g)
    tails = torch.tensor([1e-33, -3e-36, 1e-39, -2e-40])  # below 1e-31, some of them subnormal
    start[n - null:] = tails.repeat(null // 4)
    vals, vecs, *_ = lanczos(A, start, n, 1, "LA", 1e-7, 60, g, "eigenvalue")
    thr = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps
    assert all(not bool(((x != 0) & (x.abs() <= thr)).any()) for x in inputs)
    assert all(bool((x[n - null:] == 0).all()) for x in inputs)
    assert float(vals[0]) == pytest.approx(3.0, rel=1e-6)
    clean = start.clone()
    clean[n - null:] = 0
    inputs.clear()
    vals2, vecs2, *_ = lanczos(A, clean, n, 1, "LA", 1e-7, 60, torch.Generator().manual_seed(0), "eigenvalue")
    assert np.array_equal(vals, vals2) and torch.equal(vecs[0], vecs2[0])
