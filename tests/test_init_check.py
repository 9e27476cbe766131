"""lab.init_check (measurement API) and the `optiscope init-check` CLI, against dense torch.func Hessians."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from optiscope.lab.init_check import (
    InitCheckConfig,
    InitCheckResult,
    half_mse,
    init_check,
    measure_at_init,
    model_factory,
    teacher_batch,
)


def _tiny_mlp(depth=3, width=3, seed=0, init="he_uniform", activation="relu"):
    return model_factory(f"mlp:activation={activation},bias=false", init=init)(depth, width, seed).double()


def _dense_reference(model, batch):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    X, y = batch

    def loss(flat):
        d, i = {}, 0
        for n in names:
            k = params[n].numel()
            d[n] = flat[i:i + k].reshape(params[n].shape)
            i += k
        return half_mse(torch.func.functional_call(model, d, (X,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    H = torch.func.hessian(loss)(flat)
    g = torch.func.grad(loss)(flat)
    sizes = [params[n].numel() for n in names]
    return H, g, names, sizes


def test_measure_at_init_exact_path_matches_torch_func():
    model = _tiny_mlp()
    batch = teacher_batch(10, 3, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = measure_at_init(model, half_mse, batch, hessian="full", exact_max_dim=1000)
    H, g, names, sizes = _dense_reference(model, batch)
    assert m.exact
    off = np.cumsum([0] + sizes)
    F = np.array([[float(H[off[a]:off[a + 1], off[b]:off[b + 1]].norm()) for b in range(len(names))]
                  for a in range(len(names))])
    np.testing.assert_allclose(m.block_frobenius, F, rtol=1e-10)
    ev = torch.linalg.eigvalsh(H)
    assert m.values["eig_max"] == pytest.approx(float(ev[-1]), rel=1e-10)
    assert m.values["eig_min"] == pytest.approx(float(ev[0]), rel=1e-10, abs=1e-12)
    assert m.values["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-10)
    assert m.values["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert m.values["hess_diag_norm"] == pytest.approx(math.sqrt(sum(F[i, i] ** 2 for i in range(len(names)))))
    out = model(batch[0])
    assert m.values["output_norm"] == pytest.approx(float(out.pow(2).sum(1).mean().sqrt()))
    for n, p in model.named_parameters():  # pure
        assert torch.equal(p, before[n])


def test_measure_at_init_estimator_path_agrees_with_exact():
    model = _tiny_mlp(depth=3, width=4, seed=3)
    batch = teacher_batch(12, 4, seed=2)
    exact = measure_at_init(model, half_mse, batch, exact_max_dim=1000)
    est = measure_at_init(model, half_mse, batch, exact_max_dim=0, n_probes=400, eig_tol=1e-8, eig_max_iter=200)
    assert not est.exact
    np.testing.assert_allclose(est.block_frobenius, exact.block_frobenius, rtol=0.15, atol=1e-8)
    assert est.values["eig_max"] == pytest.approx(exact.values["eig_max"], rel=1e-6)
    assert est.values["eig_min"] == pytest.approx(exact.values["eig_min"], rel=1e-6)
    assert est.values["trace"] == pytest.approx(exact.values["trace"], rel=0.1)
    with pytest.raises(ValueError, match="hessian"):
        measure_at_init(model, half_mse, batch, hessian="diag")


def _synthetic(values_by_depth, width=8, seeds=3):
    rows = []
    for d, v in values_by_depth.items():
        for s in range(seeds):
            rows.append({"depth": d, "width": width, "seed": s, "quantity": "grad_norm", "layer": "", "value": v})
    return InitCheckResult(pd.DataFrame(rows), InitCheckConfig())


def test_vanishing_depth_interpolation_and_flag():
    res = _synthetic({2: 1.0, 4: 1e-2, 6: 1e-4})
    # 1e-3 lies halfway (in log) between depth 4 and depth 6
    assert res.vanishing_depth(threshold=1e-3) == pytest.approx(5.0)
    assert res.vanishing_depth(threshold=1e-2) == pytest.approx(4.0)
    assert res.vanishing_depth(threshold=1e-5) is None
    v = res.vanishing().iloc[0]
    assert v["vanishing"] and v["log10_slope_per_layer"] == pytest.approx(-1.0)
    flat = _synthetic({2: 1.0, 4: 0.9, 6: 1.1, 8: 1.0})
    assert not flat.vanishing().iloc[0]["vanishing"]
    with pytest.raises(ValueError, match="reference depth"):
        res.vanishing_depth(reference_depth=3)


def test_init_check_records_and_summary_statistics():
    cfg = InitCheckConfig(depths=(2, 3), widths=(3,), n_seeds=3, n_samples=8, hessian="blocks")
    res = init_check(model_factory("mlp:bias=false", init="lecun_normal"), cfg)
    g = res.records[(res.records["quantity"] == "grad_norm") & (res.records["layer"] == "")]
    assert len(g) == 6 and set(g["seed"]) == {0, 1, 2}
    summ = res.summary(["grad_norm"])
    row = summ[summ["depth"] == 3].iloc[0]
    vals = g[g["depth"] == 3]["value"].to_numpy()
    assert row["median"] == pytest.approx(np.median(vals)) and row["mean"] == pytest.approx(vals.mean())
    assert row["q25"] == pytest.approx(np.quantile(vals, 0.25))
    per_layer = res.records[(res.records["quantity"] == "grad_norm") & (res.records["layer"] != "")]
    tot = per_layer[per_layer["depth"] == 3].groupby("seed")["value"].apply(lambda v: math.sqrt((v ** 2).sum()))
    np.testing.assert_allclose(tot.to_numpy(), g[g["depth"] == 3].sort_values("seed")["value"].to_numpy())
    m = res.to_metrics()
    assert list(m.columns) == ["run", "optimizer", "step", "metric", "layer", "value"]
    # same seed -> same numbers
    res2 = init_check(model_factory("mlp:bias=false", init="lecun_normal"), cfg)
    pd.testing.assert_frame_equal(res.records, res2.records)


def test_model_factory_init_variance():
    model = model_factory("mlp:bias=false", init="he_uniform")(4, 64, 0)
    w = model.layers[1].weight.detach()
    assert float(w.var()) == pytest.approx(2 / 64, rel=0.1)
    assert float(w.abs().max()) <= math.sqrt(6 / 64)
    with pytest.raises(ValueError, match="init-check supports"):
        model_factory("bilinear")


def test_cli_parse_int_list():
    from optiscope.cli.init_check import parse_int_list

    assert parse_int_list("2,4,...,10") == (2, 4, 6, 8, 10)
    assert parse_int_list("2,4,8,...,64") == (2, 4, 8, 16, 32, 64)
    assert parse_int_list("3,5,9") == (3, 5, 9)
    assert parse_int_list("2:8:3") == (2, 5, 8)
    for bad in ("", "2,...", "a,b", "4,2,...,1"):
        with pytest.raises(ValueError, match="depths"):
            parse_int_list(bad)


def test_cli_init_check_flags_vanishing(tmp_path):
    from optiscope.cli.main import app

    out = tmp_path / "ic"
    r = CliRunner().invoke(app, ["init-check", "--model", "mlp:width=4,activation=linear,bias=false", "--depths",
                                 "2,6,...,30", "--init", "torch", "--seeds", "3", "--hessian", "none", "--out",
                                 str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "VANISHING" in r.output
    assert (out / "metrics.parquet").exists() and (out / "figures" / "init_check.png").exists()
    bad = CliRunner().invoke(app, ["init-check", "--depths", "x", "--quiet"])
    assert bad.exit_code == 2 and "cannot parse" in bad.output
