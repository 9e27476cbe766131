"""Probes against dense float64 ground truth, and their purity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_lab_common import dense_hessian, offsets, tiny_problem

from optiscope.lab import PROBES, ProbeState, Run, make_probe, make_probes
from optiscope.optim import make_optimizer


def _state(problem, opt=None, step=3, cache=None, last_update=None, seed=0):
    return ProbeState(step=step, model=problem.model, optimizer=opt, problem=problem, seed=seed,
                      cache={} if cache is None else cache, last_update=last_update)


def _adam_after_steps(problem, n=3, lr=1e-2):
    opt = make_optimizer(f"adam:lr={lr}", list(problem.model.parameters()))
    X, y = problem.train
    for _ in range(n):
        opt.zero_grad()
        problem.loss_fn(problem.model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def test_r_med_matches_dense_diagonal():
    pb = tiny_problem()
    H = dense_hessian(pb)
    st = _state(pb)
    out = make_probe("r_med", per_layer=10, params=None)(pb, st)  # every tensor, not the weights default
    coords = st.cache["coords_10"]
    off = offsets(pb.model)
    for name, idx in coords.items():
        h = torch.diagonal(H)[off[name] + idx]
        assert out["r_med"][name] == pytest.approx(float(h.max()) / float(np.median(h.numpy())), rel=1e-8)
    methods = st.hessian().diagonal(coords).method  # second-order backprop spends no HVPs (curvature.diagonal)
    assert out["r_med_n_hvp"] == sum(len(i) for n, i in coords.items() if methods[n] != "structured")


def test_sharpness_trace_match_dense_and_warm_start_is_used(monkeypatch):
    pb = tiny_problem()
    H = dense_hessian(pb)
    ev = torch.linalg.eigvalsh(H)
    st = _state(pb)
    out = make_probe("sharpness", tol=1e-10, max_iter=200)(pb, st)
    assert out["sharpness"] == pytest.approx(float(ev[-1]), rel=1e-6)
    assert "sharpness_v0" in st.cache
    # a second checkpoint starts Lanczos from the stored vector
    from optiscope.curvature import Hessian

    seen = {}
    orig = Hessian.eigenvalues

    def spy(self, *a, **kw):
        seen["v0"] = kw.get("v0")
        return orig(self, *a, **kw)

    monkeypatch.setattr(Hessian, "eigenvalues", spy)
    prev = {k: v.clone() for k, v in st.cache["sharpness_v0"].items()}
    make_probe("sharpness")(pb, _state(pb, cache=st.cache))
    assert seen["v0"] is not None and all(torch.equal(seen["v0"][k], prev[k]) for k in prev)
    tr = make_probe("trace", n_probes=300)(pb, _state(pb))
    assert tr["trace"] == pytest.approx(float(torch.trace(H)), rel=0.05)


def test_grad_and_one_norm_match_autograd():
    pb = tiny_problem()
    X, y = pb.probe_batch
    grads = torch.autograd.grad(pb.loss_fn(pb.model(X), y), list(pb.model.parameters()))
    flat = torch.cat([g.reshape(-1) for g in grads])
    out = make_probe("grad_norm")(pb, _state(pb))
    assert out["grad_norm"] == pytest.approx(float(flat.norm()), rel=1e-10)
    assert out["grad_norm_1"] == pytest.approx(float(flat.abs().sum()), rel=1e-10)
    on = make_probe("one_norm", eps=1e-3)(pb, _state(pb))
    assert on["one_norm"] == pytest.approx(float(torch.sqrt(flat ** 2 + 1e-3).sum()), rel=1e-10)
    # eps from the optimizer when not given
    opt = make_optimizer("adam:lr=1e-3,eps=0.01", list(pb.model.parameters()))
    on2 = make_probe("one_norm")(pb, _state(pb, opt=opt))
    assert on2["one_norm_eps"] == 0.01
    assert on2["one_norm"] == pytest.approx(float(torch.sqrt(flat ** 2 + 0.01).sum()), rel=1e-10)


def test_precond_sharpness_matches_dense():
    pb = tiny_problem()
    opt = _adam_after_steps(pb)
    H = dense_hessian(pb)
    P = torch.cat([p.reshape(-1) for p in opt.diagonal_preconditioner()])
    S = P.rsqrt()
    expected = float(torch.linalg.eigvalsh(S[:, None] * H * S[None, :])[-1])
    out = make_probe("precond_sharpness", tol=1e-10, max_iter=200)(pb, _state(pb, opt=opt))
    assert out["precond_sharpness"] == pytest.approx(expected, rel=1e-6)
    assert out["precond_sharpness_threshold"] == pytest.approx(2 * 1.9 / (0.1 * 1e-2))
    sgd = make_optimizer("sgd:lr=0.1", list(pb.model.parameters()))
    assert make_probe("precond_sharpness")(pb, _state(pb, opt=sgd)) == {}


def test_diag_dominance_matches_dense_block():
    pb = tiny_problem()
    H = dense_hessian(pb)
    st = _state(pb)
    out = make_probe("diag_dominance", per_layer=4)(pb, st)
    coords = st.cache["coords_4"]
    off = offsets(pb.model)
    idx = torch.cat([off[n] + c for n, c in coords.items()])
    B = H[idx][:, idx].abs()
    r = (B.sum(1) - B.diagonal()) / B.diagonal()
    assert out["diag_dominance"] == pytest.approx(float(np.median(r.numpy())), rel=1e-8)


def test_alignment_and_update_and_spectrum():
    pb = tiny_problem()
    before = {n: p.detach().clone() for n, p in pb.model.named_parameters()}
    opt = _adam_after_steps(pb, n=2)
    upd = {n: p.detach() - before[n] for n, p in pb.model.named_parameters()}
    H = dense_hessian(pb)
    st = _state(pb, opt=opt, last_update=upd)
    out = make_probe("adam_alignment", per_layer=12)(pb, st)
    X, y = pb.probe_batch
    grads = dict(zip([n for n, _ in pb.model.named_parameters()],
                     torch.autograd.grad(pb.loss_fn(pb.model(X), y), list(pb.model.parameters()))))
    off = offsets(pb.model)
    name = "0.weight"
    c = st.cache["coords_12"][name]
    h = torch.diagonal(H)[off[name] + c].numpy()
    assert out["align_grad"][name] == pytest.approx(spearmanr(h, grads[name].reshape(-1)[c].abs()).statistic)
    assert out["align_update"][name] == pytest.approx(spearmanr(h, upd[name].reshape(-1)[c].abs()).statistic)
    assert name in out["align_precond"]
    un = make_probe("update_norm")(pb, st)
    assert un["update_norm"] == pytest.approx(float(torch.cat([u.reshape(-1) for u in upd.values()]).norm()))
    ws = make_probe("weight_spectrum")(pb, st)
    W = pb.model[0].weight.detach()
    np.testing.assert_allclose(ws["singular_values.0.weight"], torch.linalg.svdvals(W).numpy(), rtol=1e-10)
    s = torch.linalg.svdvals(W)
    p = s / s.sum()
    assert ws["erank"]["0.weight"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-8)


ALL = list(PROBES)  # includes the lazily registered adam_correction probe (seed 001 work)


@pytest.mark.parametrize("name", ALL)
def test_probes_are_pure(name):
    """Called directly (no guard): parameters, buffers (BN running stats), optimizer state, .grad, global RNG."""
    pb = tiny_problem(bn=True, dropout=0.2)
    opt = _adam_after_steps(pb, n=2)
    pb.model.train()
    for p in pb.model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state_before = copy.deepcopy(pb.model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    rng_before = torch.get_rng_state()
    upd = {n: torch.ones_like(p) * 1e-3 for n, p in pb.model.named_parameters()}
    probe = make_probe(name) if name not in ("r_med", "adam_alignment", "diag_dominance") else make_probe(
        name, per_layer=5)
    probe(pb, _state(pb, opt=opt, last_update=upd))
    for k, v in pb.model.state_dict().items():
        assert torch.equal(v, state_before[k]), f"{name} changed {k}"
    after = opt.state_dict()
    for i, s in opt_before["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(after["state"][i][k]), torch.as_tensor(v)), f"{name} changed opt {k}"
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in pb.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before), f"{name} consumed the global RNG"


def test_same_coordinates_at_every_checkpoint():
    pb = tiny_problem()
    seen = []

    def spy(problem, state):
        seen.append({k: v.clone() for k, v in state.coordinates(7).items()})
        return {}

    Run(pb, lambda p: torch.optim.SGD(p, lr=0.1), steps=6, batch_size=16, probe_every=2,
        probes=[make_probe("r_med", per_layer=7), spy]).execute()
    assert len(seen) == 4
    for s in seen[1:]:
        assert all(torch.equal(s[k], seen[0][k]) for k in s)


def test_make_probes_errors_and_specs():
    with pytest.raises(ValueError, match="valid:.*r_med"):
        make_probe("rmed")
    with pytest.raises(ValueError, match="not key=value"):
        make_probes(["r_med:per_layer"])
    with pytest.raises(ValueError, match="per_layer"):
        make_probe("r_med", per_layer=0)
    ps = make_probes("loss,r_med:per_layer=50,delta=0.1,sharpness")
    assert [p.name for p in ps] == ["loss", "r_med", "sharpness"]
    assert ps[1].per_layer == 50 and ps[1].delta == 0.1
    with pytest.raises(ValueError, match="adam_correction|bad options"):
        make_probe("adam_correction", no_such_option=1)
