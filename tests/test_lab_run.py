"""Run / compare / switch / repeat / match_by_loss / full-batch accumulation / divergence."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from test_lab_common import regression_problem, tiny_problem

from optiscope.lab import Run, RunStore, batch_indices, compare, match_by_loss, matched_values, repeat, switch


def sgd(lr):
    def factory(params):
        return torch.optim.SGD(params, lr=lr)
    factory.__name__ = "sgd"
    return factory


def test_batch_indices_are_epoch_permutations_and_pure():
    n, b = 50, 8
    nb = n // b
    seen = torch.cat([batch_indices(t, n, b, 3) for t in range(nb)])
    assert len(set(seen.tolist())) == nb * b  # no repeats within an epoch
    assert torch.equal(batch_indices(7, n, b, 3), batch_indices(7, n, b, 3))
    assert not torch.equal(batch_indices(0, n, b, 3), batch_indices(0, n, b, 4))
    assert not torch.equal(batch_indices(0, n, b, 3), batch_indices(nb, n, b, 3))  # new epoch, new order


def test_run_matches_hand_computed_sgd_steps():
    pb = tiny_problem()
    ref = copy.deepcopy(pb.model)
    res = Run(pb, sgd(0.1), steps=3, batch_size=16, probes=[], seed=5).execute()
    X, y = pb.train
    for t in range(3):
        idx = batch_indices(t, len(X), 16, 5)
        ref.zero_grad()
        pb.loss_fn(ref(X[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    for (n, p), q in zip(pb.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert res.status == "finished" and res.diverged_at is None
    bl = res.series("batch_loss")
    assert list(bl.index) == [0, 1, 2]


def test_full_batch_accumulation_equals_one_batch():
    a, b = tiny_problem(), tiny_problem()
    Run(a, sgd(0.5), steps=2, full_batch=True, probes=[]).execute()
    Run(b, sgd(0.5), steps=2, full_batch=True, accumulation_chunks=5, probes=[]).execute()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    c = tiny_problem()
    Run(c, sgd(0.5), steps=2, full_batch=True, accumulation_chunks=7, probes=[], lr_schedule="cosine").execute()
    assert not all(torch.allclose(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


def test_probe_schedule_and_lr_schedule():
    pb = tiny_problem()
    res = Run(pb, sgd(0.1), steps=10, batch_size=16, probe_every=4, probe_steps=[3], probes=["loss"]).execute()
    assert sorted(res.series("loss").index) == [0, 3, 4, 8, 10]
    lrs = []

    def spy(problem, state):
        lrs.append(state.optimizer.param_groups[0]["lr"])
        return {}

    Run(tiny_problem(), sgd(1.0), steps=4, batch_size=16, probe_every=1, probes=[spy],
        lr_schedule="step:every=2,gamma=0.5").execute()
    assert lrs[1:] == [1.0, 0.5, 0.5, 0.25][:4] or lrs[1:] == [1.0, 1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="valid"):
        Run(tiny_problem(), sgd(1.0), steps=4, lr_schedule="exp")


def test_compare_same_init_same_order_and_model_untouched(tmp_path):
    pb = tiny_problem()
    init = copy.deepcopy(pb.model.state_dict())
    res = compare(pb, {"a": sgd(0.1), "b": sgd(0.1), "c": "adam:lr=1e-2"}, steps=6, batch_size=16, probe_every=3,
                  probes=["loss", "grad_norm"], store=tmp_path)
    a, b = (res[k].metrics.drop(columns=["run"]) for k in "ab")
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))  # identical trajectories
    la, lc = res["a"].series("loss"), res["c"].series("loss")
    assert la[0] == lc[0] and la[6] != lc[6]
    assert all(torch.equal(v, pb.model.state_dict()[k]) for k, v in init.items())
    m = RunStore.open(tmp_path).read_manifest()
    assert m["status"] == "finished" and set(m["runs"]) == {"a", "b", "c"}
    stored = RunStore.open(tmp_path).read_metrics()
    assert set(stored["run"]) == {"a", "b", "c"}


def test_divergence_is_an_outcome_and_others_continue(tmp_path):
    pb = regression_problem(dtype=torch.float32)
    pb.model = torch.nn.Sequential(torch.nn.Linear(4, 1))
    res = compare(pb, {"boom": sgd(1e3), "ok": sgd(1e-2)}, steps=20, batch_size=16, probe_every=5,
                  probes=["loss"], store=tmp_path)
    assert res["boom"].status.startswith("diverged at step ")
    t = res["boom"].diverged_at
    assert res["boom"].status == f"diverged at step {t}" and 0 < t < 20
    assert res["ok"].status == "finished"
    st = RunStore.open(tmp_path)
    m = st.read_manifest()
    assert m["runs"]["boom"]["status"] == f"diverged at step {t}"
    assert "diverged" in m["status"]
    ck = st.list_checkpoints("boom")
    assert ck and ck[-1][0] < t
    last = st.load_checkpoint(ck[-1][1])
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    # recorded, not silent: a 'diverged' row, and no NaN loss values
    df = res["boom"].metrics
    assert (df["metric"] == "diverged").any()
    assert np.isfinite(df[df["metric"] == "loss"]["value"]).all()


def test_switch_equals_manual_two_phase_training():
    pb = tiny_problem()
    init = copy.deepcopy(pb.model)
    res = switch(pb, sgd(0.2), "adam:lr=1e-2", switch_step=3, steps=6, batch_size=16, probes=["loss"],
                 probe_every=3)
    assert res.name == "sgd->adam"
    from optiscope.optim import make_optimizer

    X, y = pb.train
    opt = torch.optim.SGD(init.parameters(), lr=0.2)
    for t in range(6):
        if t == 3:
            opt = make_optimizer("adam:lr=1e-2", list(init.parameters()))
        idx = batch_indices(t, len(X), 16, 0)
        opt.zero_grad()
        pb.loss_fn(init(X[idx]), y[idx]).backward()
        opt.step()
    for p, q in zip(res.model.parameters(), init.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="switch_step"):
        switch(pb, sgd(0.1), sgd(0.1), switch_step=6, steps=6)


def test_repeat_aggregates_over_data_orders():
    pb = tiny_problem()
    res = repeat(pb, sgd(0.3), n_repeats=3, steps=6, batch_size=16, probe_every=3, probes=["loss", "grad_norm"])
    assert len(res.runs) == 3
    s = res.summary
    l0 = s[(s.metric == "loss") & (s.step == 0)].iloc[0]
    assert l0["std"] == 0 and l0["n"] == 3  # same init
    l6 = s[(s.metric == "loss") & (s.step == 6)].iloc[0]
    finals = [r.series("loss")[6] for r in res.runs]
    assert l6["std"] > 0 and l6["mean"] == pytest.approx(np.mean(finals))
    assert l6["std"] == pytest.approx(np.std(finals, ddof=1))
    per_layer = s[(s.metric == "grad_norm_layer") & (s.step == 6)]
    assert set(per_layer.layer) == set(pb.layers)


def _tidy(run, steps, values, metric="loss", layer=""):
    return pd.DataFrame({"run": run, "optimizer": run, "step": steps, "metric": metric, "layer": layer,
                         "value": values})


def test_match_by_loss_nearest_and_interpolated():
    a = _tidy("adam", [0, 10, 20], [1.0, 0.5, 0.2])
    b = _tidy("sgd", [0, 10, 20, 30], [1.0, 0.8, 0.6, 0.45])
    m = match_by_loss(a, b)
    assert list(m.step_b) == [0, 30, 30]
    assert m.step_b_interp[0] == 0
    assert m.step_b_interp[1] == pytest.approx(20 + (0.5 - 0.6) / (0.45 - 0.6) * 10)
    assert np.isnan(m.step_b_interp[2])
    ra = pd.concat([a, _tidy("adam", [0, 10, 20], [3.0, 2.0, 1.5], "r_med", "w")])
    rb = pd.concat([b, _tidy("sgd", [0, 10, 20, 30], [3.0, 4.0, 5.0, 6.0], "r_med", "w")])
    mv = matched_values(ra, rb, m, "r_med")
    assert list(mv.value_b) == [3.0, 6.0, 6.0] and list(mv.value_a) == [3.0, 2.0, 1.5]
    with pytest.raises(ValueError, match="no rows"):
        match_by_loss(a, b, metric="nope")


def test_bad_inputs_are_value_errors():
    pb = tiny_problem()
    with pytest.raises(ValueError, match="steps"):
        Run(pb, sgd(0.1), steps=-1)
    with pytest.raises(ValueError, match="probe_steps"):
        Run(pb, sgd(0.1), steps=5, probe_steps=[9])
    with pytest.raises(ValueError, match="valid:.*adam"):
        Run(pb, "adamw:lr=1", steps=2).execute()
    with pytest.raises(ValueError, match="train"):
        type(pb)(pb.model, pb.loss_fn, train=(pb.train[0], pb.train[1][:3]))
    with pytest.raises(ValueError, match="a dict"):
        Run(pb, sgd(0.1), steps=1, probes=[lambda problem, state: 3.0]).execute()
