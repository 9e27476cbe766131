"""The Hessian engine: graph reuse, chunking by measured speed, devices, bad inputs, trace estimators."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from test_curvature import TinyTransformer, _seq_ce  # the same tiny models as the dense-reference tests
from torch import nn

from optiscope.curvature import Hessian, trace_estimate
from optiscope.curvature import hessian as hessian_module
from optiscope.curvature.hessian import _ChunkChooser
from optiscope.curvature.trace import TRACE_METHODS

DT = torch.float64



def problem(kind: str, n: int = 12):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        X, y = torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
        return model, nn.CrossEntropyLoss(), X, y
    if kind == "cnn_bn":  # train-mode BatchNorm: batch statistics, running stats must stay untouched
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Softplus(), nn.Flatten(),
                              nn.Linear(2 * 4 * 4, 3)).to(DT).train()
        X, y = torch.randn(n, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
        return model, nn.CrossEntropyLoss(), X, y
    if kind == "transformer":
        model = TinyTransformer().to(DT).eval()
        X = torch.randint(0, 5, (3, 4), generator=g)
        return model, _seq_ce, X, torch.randint(0, 5, X.shape, generator=g)
    raise AssertionError(kind)


def rand_batch(H, seed, batch):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, *s, generator=g, dtype=DT) for n, s in H.shapes.items()}


# ------------------------------------------------------------------------------------------------ graph reuse
@pytest.mark.parametrize("kind", ["mlp", "cnn_bn", "transformer"])
def test_graph_reuse_equals_rebuilding(kind):
    model, loss_fn, X, y = problem(kind)
    kept = Hessian(model, loss_fn, (X, y))
    rebuilt = Hessian(model, loss_fn, (X, y), keep_graph=False)
    V = rand_batch(kept, 0, 5)
    for _ in range(3):  # repeated calls through the same kept graph
        a = kept.flatten(kept.hvp_batch(V))
        b = rebuilt.flatten(rebuilt.hvp_batch(V))
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        v = {n: t[2] for n, t in V.items()}
        torch.testing.assert_close(kept.flatten(kept.hvp(v)), b[2], atol=1e-12, rtol=1e-12)
    assert kept.n_graph_builds == 1 and kept.graph_kept
    assert rebuilt.n_graph_builds == 3 and not rebuilt.graph_kept
    # and both equal an independent dense Hessian column by column
    D = Hessian(model, loss_fn, (X, y), batch_mode="reverse-over-reverse").dense()
    torch.testing.assert_close(a, (D @ kept.flatten(V).T).T, atol=1e-10, rtol=1e-10)


def test_multibatch_keeps_what_fits_and_rebuilds_the_rest():
    model, loss_fn, X, y = problem("mlp", n=30)
    batches = [(X[:10], y[:10]), (X[10:20], y[10:20]), (X[20:], y[20:])]
    ref = Hessian(model, loss_fn, (X, y)).dense()  # one batch: the exact mean over all samples
    probe = Hessian(model, loss_fn, batches)
    per_batch = probe._measure_graph_bytes(0)
    budget_mb = 1.5 * per_batch / 2 ** 20  # room for one batch's graph, not two
    H = Hessian(model, loss_fn, batches, memory_budget_mb=budget_mb)
    V = rand_batch(H, 3, 4)
    out = H.flatten(H.hvp_batch(V))
    assert H._kept_terms == [0] and H.graph_kept
    H.hvp_batch(V)
    assert H.n_graph_builds == 1 + 2 * 2  # batch 0 once; batches 1 and 2 rebuilt per call
    torch.testing.assert_close(out, (ref @ H.flatten(V).T).T, atol=1e-12, rtol=1e-12)
    everything = Hessian(model, loss_fn, batches, keep_graph=True)
    torch.testing.assert_close(everything.flatten(everything.hvp_batch(V)), out, atol=1e-12, rtol=1e-12)
    assert everything._kept_terms == [0, 1, 2]


def test_release_and_context_manager_free_the_graph():
    model, loss_fn, X, y = problem("mlp")
    H = Hessian(model, loss_fn, (X, y))
    v = {n: t[0] for n, t in rand_batch(H, 0, 1).items()}
    hv = H.flatten(H.hvp(v))
    ref = weakref.ref(H._kept.grads[0])
    H.release()
    gc.collect()
    assert ref() is None and not H.graph_kept  # the graph's tensors are gone
    torch.testing.assert_close(H.flatten(H.hvp(v)), hv, atol=0, rtol=0)  # rebuilt on demand, same numbers
    assert H.n_graph_builds == 2
    with Hessian(model, loss_fn, (X, y)) as H2:
        H2.hvp(v)
        ref2 = weakref.ref(H2._kept.grads[0])
    gc.collect()
    assert ref2() is None and not H2.graph_kept


def test_purity_with_kept_graph():
    model, loss_fn, X, y = problem("cnn_bn")
    model = nn.Sequential(*model[:3], nn.Dropout(0.3), *model[3:]).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning):
        H = Hessian(model, loss_fn, (X, y))
    V = rand_batch(H, 1, 3)
    a = H.flatten(H.hvp_batch(V))
    H.eigenvalues(k=1, tol=1e-6)
    H.trace(12)
    b = H.flatten(H.hvp_batch(V))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), f"{k} changed"
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.warns(UserWarning):
        fresh = Hessian(model, loss_fn, (X, y), keep_graph=False)  # same frozen dropout mask when rebuilt
    torch.testing.assert_close(fresh.flatten(fresh.hvp_batch(V)), a, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ chunk rule
def test_chunk_chooser_picks_the_fastest_size_and_prefers_the_loop_when_close():
    def run(per_vector, bound=64):
        state = {}
        ch = _ChunkChooser(state, bound, torch.device("cpu"))
        seen = []
        for _ in range(100):
            size, timed = ch.next(1000)
            seen.append(size)
            if not timed:
                break
            ch.record(size, per_vector(size) * size)
        return state["chosen"], seen

    chosen, seen = run(lambda s: 1.0 if s == 1 else 1.5)  # batching slower: the loop
    assert chosen == 1 and seen[:3] == [1, 1, 2]
    chosen, _ = run(lambda s: {1: 1.0, 2: 0.8, 4: 0.5, 8: 0.6, 16: 0.7}.get(s, 1.0))  # 4 is fastest
    assert chosen == 4
    chosen, _ = run(lambda s: 1.0 if s == 1 else 0.95)  # within 10% of the loop: the loop
    assert chosen == 1
    chosen, seen = run(lambda s: 1.0 / s, bound=4)  # improving up to the memory bound
    assert chosen == 4 and max(seen) == 4
    # fewer vectors than the next size to explore: use the best known size, untimed
    state = {"times": {1: 1.0}, "counts": {1: 2}, "chosen": None}
    assert _ChunkChooser(state, 64, torch.device("cpu")).next(1) == (1, False)


def test_measured_chunk_is_cached_and_results_do_not_depend_on_it():
    model, loss_fn, X, y = problem("mlp")
    H = Hessian(model, loss_fn, (X, y))
    hessian_module.CHUNK_CACHE.pop(H._cache_key, None)
    V = rand_batch(H, 2, 40)
    out = H.flatten(H.hvp_batch(V))
    state = hessian_module.CHUNK_CACHE[H._cache_key]
    for _ in range(20):  # exploration continues across calls until the time per vector stops improving
        if state["chosen"] is not None:
            break
        torch.testing.assert_close(H.flatten(H.hvp_batch(V)), out, atol=1e-12, rtol=1e-12)
    assert state["chosen"] is not None and state["chosen"] <= H.max_chunk_size
    assert H.chunk_size == state["chosen"]
    H2 = Hessian(model, loss_fn, (X, y))  # same signature: shares the decision
    assert H2.chunk_size == state["chosen"]
    for c in (1, 3, 40):
        Hc = Hessian(model, loss_fn, (X, y), chunk_size=c)
        torch.testing.assert_close(Hc.flatten(Hc.hvp_batch(V)), out, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ devices
def test_device_follows_the_model_and_explicit_cpu():
    model, loss_fn, X, y = problem("mlp")
    H = Hessian(model, loss_fn, (X, y))
    Hc = Hessian(model, loss_fn, (X, y), device="cpu")
    assert H.device.type == "cpu" and Hc.device.type == "cpu"
    v = {n: t[0] for n, t in rand_batch(H, 0, 1).items()}
    torch.testing.assert_close(H.flatten(H.hvp(v)), Hc.flatten(Hc.hvp(v)), atol=0, rtol=0)


def test_device_errors_name_the_problem():
    model, loss_fn, X, y = problem("mlp")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Hessian(model, loss_fn, (X, y), device="cuda:7")
    else:
        with pytest.raises(ValueError, match="does not exist|model is on"):
            Hessian(model, loss_fn, (X, y), device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ValueError, match="not a device name"):
        Hessian(model, loss_fn, (X, y), device="gpu-please")
    with pytest.raises(ValueError, match="meta"):
        Hessian(model, loss_fn, (X, y), device="meta")
    with pytest.raises(ValueError, match=r"inputs of batch 0 are on meta.*model is on cpu"):
        Hessian(model, loss_fn, (X.to("meta"), y))
    with pytest.raises(ValueError, match="targets of batch 1"):
        Hessian(model, loss_fn, [(X, y), (X, y.to("meta"))])
    with pytest.raises(ValueError, match="'meta' device"):
        Hessian(nn.Linear(4, 3, device="meta"), loss_fn, (X, y))


# ------------------------------------------------------------------------------------------------ bad inputs
def test_rejected_data_is_a_value_error_naming_the_problem():
    model, loss_fn, X, y = problem("mlp")
    with pytest.raises(ValueError, match="shape"):
        Hessian(model, loss_fn, (torch.randn(12, 5, dtype=DT), y))  # wrong input width
    with pytest.raises(ValueError, match="integers"):
        Hessian(model, loss_fn, (torch.randint(0, 3, (12, 4)), y))
    with pytest.raises(ValueError, match=r"torch.float64 but the model's parameters are torch.float32"):
        Hessian(nn.Linear(4, 3), loss_fn, (X, y))
    H = Hessian(model, loss_fn, (X, y))
    v = {n: torch.zeros_like(p) for n, p in H.params.items()}
    v[H.param_names[0]][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        H.hvp(v)
    V = rand_batch(H, 0, 2)
    V[H.param_names[-1]][1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        H.hvp_batch(V)
    with pytest.raises(ValueError, match="keep_graph"):
        Hessian(model, loss_fn, (X, y), keep_graph="yes")
    with pytest.raises(ValueError, match="method must be one of"):
        H.trace(10, method="nope")
    with pytest.raises(ValueError, match="n_probes must be an integer >= 4"):
        H.trace(3, method="xtrace")


# ------------------------------------------------------------------------------------------------ trace
def _operator(kind: str, n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    if kind == "flat":  # flat, indefinite spectrum
        lam = torch.randn(n, generator=g, dtype=DT)
    else:  # low rank plus small noise
        lam = torch.cat([torch.linspace(50, 5, 8, dtype=DT), 0.01 * torch.randn(n - 8, generator=g, dtype=DT)])
    A = (U * lam) @ U.T
    return A, float(lam.sum())


def _errors(A, exact, method, m, seeds=120):
    out = []
    for s in range(seeds):
        r = trace_estimate(lambda X: X @ A, A.shape[0], m, method, torch.Generator().manual_seed(s), DT, "cpu")
        assert r.n_hvp == m and math.isfinite(r.stderr)
        out.append((r.value - exact, r.stderr))
    return np.array(out)


@pytest.mark.parametrize("kind", ["flat", "low-rank"])
@pytest.mark.parametrize("method", ["adaptive", "xtrace", "hutchinson", "hutch++"])
def test_trace_estimators_are_unbiased_z_test(kind, method):
    A, exact = _operator(kind)
    e = _errors(A, exact, method, 30)[:, 0]
    z = e.mean() / (e.std(ddof=1) / math.sqrt(len(e)))
    assert abs(z) < 4, (method, kind, z)


@pytest.mark.parametrize("kind", ["flat", "low-rank"])
def test_adaptive_is_never_worse_than_the_better_of_hutchinson_and_hutchpp(kind):
    A, exact = _operator(kind)
    rms = {m: math.sqrt(float(np.mean(_errors(A, exact, m, 30)[:, 0] ** 2)))
           for m in ("adaptive", "hutchinson", "hutch++")}
    assert rms["adaptive"] <= 1.1 * min(rms["hutchinson"], rms["hutch++"]), rms
    if kind == "low-rank":
        assert rms["adaptive"] < 0.2 * rms["hutchinson"], rms  # the deflation is used where it pays


def test_adaptive_choice_and_stderr_calibration():
    A, exact = _operator("flat")
    H = Hessian.from_function(lambda p: 0.5 * p["x"] @ A @ p["x"], {"x": torch.zeros(A.shape[0], dtype=DT)})
    r = H.trace(30, method="adaptive", seed=0)
    assert r.choice == "hutchinson" and r.n_hvp == 30 and H.n_hvp == 30
    B, _ = _operator("low-rank")
    HB = Hessian.from_function(lambda p: 0.5 * p["x"] @ B @ p["x"], {"x": torch.zeros(B.shape[0], dtype=DT)})
    assert HB.trace(30, method="adaptive", seed=0).choice == "xtrace"
    # the reported stderr matches the spread of the estimates (within a factor 1.5)
    for kind in ("flat", "low-rank"):
        A, exact = _operator(kind)
        e = _errors(A, exact, "adaptive", 30)
        ratio = float(np.sqrt(np.mean(e[:, 1] ** 2)) / e[:, 0].std(ddof=1))
        assert 0.66 < ratio < 1.5, (kind, ratio)


def test_xtrace_exact_when_sketch_spans_the_range():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=DT))
    A = (U * torch.tensor([3.0, -2.0, 1.0], dtype=DT)) @ U.T  # rank 3
    for method in ("xtrace", "adaptive"):
        r = trace_estimate(lambda X: X @ A, 40, 12, method, torch.Generator().manual_seed(1), DT, "cpu")
        assert abs(r.value - 2.0) < 1e-10, (method, r)
    assert set(TRACE_METHODS) == {"adaptive", "hutchinson", "hutch++", "xtrace"}


# ------------------------------------------------------------------------------------------------ Lanczos stop
def test_lanczos_eigenvalue_stop_is_accurate_and_cheaper_than_the_residual_stop():
    g = torch.Generator().manual_seed(0)
    n = 400
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    lam = torch.cat([torch.tensor([10.0, 9.0, 8.5, 8.0, 7.0], dtype=DT), torch.rand(n - 5, generator=g, dtype=DT) * 5])
    A = (U * lam) @ U.T
    H = Hessian.from_function(lambda p: 0.5 * p["x"] @ A @ p["x"], {"x": torch.zeros(n, dtype=DT)})
    for k in (1, 5):
        fast = H.eigenvalues(k=k, which="LA", tol=1e-3, seed=1)
        slow = H.eigenvalues(k=k, which="LA", tol=1e-3, seed=1, stop="residual")
        want = torch.sort(lam, descending=True).values[:k].numpy()
        assert np.max(np.abs(fast.values - want) / want) <= 1e-3
        assert fast.converged and fast.n_hvp < slow.n_hvp
        # within 1.3x of the best possible stop (first step whose Ritz values are all within 1e-3)
        oracle = next(i + 1 for i, th in enumerate(fast.ritz_history)
                      if len(th) == k and np.max(np.abs(th - want) / want) <= 1e-3)
        assert fast.n_hvp <= 1.3 * oracle + 1, (k, fast.n_hvp, oracle)
    with pytest.raises(ValueError, match="stop must be"):
        H.eigenvalues(stop="never")


def test_slq_moments_exact_with_three_term_recurrence():
    A, _ = _operator("flat", n=60)
    H = Hessian.from_function(lambda p: 0.5 * p["x"] @ A @ p["x"], {"x": torch.zeros(60, dtype=DT)})
    d = H.density(n_probes=2, n_lanczos=20, seed=0)
    g = torch.Generator().manual_seed(0)
    v = (torch.randint(0, 2, (2, 60), generator=g).to(DT) * 2 - 1)
    for j in (1, 2, 5, 11):
        quad = np.sum(d.weights * d.nodes ** j, axis=1)
        direct = np.array([float(x @ torch.linalg.matrix_power(A, j) @ x / 60) for x in v])
        np.testing.assert_allclose(quad, direct, rtol=1e-8, atol=1e-10)
