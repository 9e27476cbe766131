"""optiscope.Tracker: probes inside a user's own loop, checked against dense float64 Hessians, direct simulation
(the same loop without a tracker) and a killed process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_lab_common import tiny_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optiscope import Tracker
from optiscope.lab import PROBES, RunStore

torch.set_num_threads(1)
DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def data(n=64, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (X @ torch.randn(d, classes, generator=g, dtype=DT)).argmax(1)
    return X, y


def mlp(d=5, hidden=6, classes=3, bn=False, dropout=0.0, seed=0):
    return tiny_mlp(d, hidden, classes, seed=seed, dtype=DT, bn=bn, dropout=dropout)


def dense_hessian(model, X, y, loss_fn=F.cross_entropy):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        p = {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return loss_fn(torch.func.functional_call(model, p, (X,)), y)

    return torch.func.hessian(f)(torch.cat([params[n].reshape(-1) for n in names]))


def train(model, X, y, opt, steps, tracker=None, batch=16):
    for t in range(steps):
        i = torch.arange(t * batch, (t + 1) * batch) % len(X)
        opt.zero_grad()
        F.cross_entropy(model(X[i]), y[i]).backward()
        opt.step()
        if tracker is not None:
            tracker.step(t + 1, optimizer=opt)


# -------------------------------------------------------------------------------------------------------------
def test_measures_only_on_schedule_and_sharpness_is_exact():
    X, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    tr = Tracker(model, F.cross_entropy, (X, y), probes=["loss", "sharpness:tol=1e-10,max_iter=200"], every=3,
                 at=[4], loggers=[lambda step, m: seen.append((step, m))])
    tr.step(0, optimizer=opt)
    for t in range(1, 11):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
        out = tr.step(t, optimizer=opt)
        assert (out is not None) == (t % 3 == 0 or t == 4)
    assert [s for s, _ in seen] == [0, 3, 4, 6, 9]
    ev = torch.linalg.eigvalsh(dense_hessian(model, X, y))
    last = seen[-1][1]
    # the tracker measured at step 9; the model is now at step 10: re-measure now and compare with the dense truth
    now = tr.measure(10, opt)
    assert now["sharpness"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert now["loss"] == pytest.approx(float(F.cross_entropy(model(X), y)), rel=1e-12)
    assert last["sharpness"] != now["sharpness"]
    df = tr.metrics
    assert sorted(df["step"].unique()) == [0, 3, 4, 6, 9, 10]
    assert set(df["metric"]) >= {"loss", "sharpness", "sharpness_n_hvp"}


def test_tracker_does_not_change_training_bitwise_with_dropout_bn_and_adam():
    """Direct simulation: the same loop with and without a tracker gives bit-identical parameters, BN statistics,
    optimizer state and RNG stream (dropout draws from the global RNG during training)."""
    X, y = data(n=96)
    results = []
    for use in (False, True):
        model = mlp(bn=True, dropout=0.3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(123)
        tr = None
        if use:
            with pytest.warns(UserWarning, match="train-mode randomness"):
                tr = Tracker(
                    model, F.cross_entropy, [(X[:48], y[:48]), (X[48:], y[48:])],
                    probes=["loss", "accuracy", "grad_norm", "one_norm", "r_med:per_layer=5",
                            "diag_dominance:per_layer=3", "sharpness", "trace:n_probes=6", "precond_sharpness",
                            "weight_spectrum", "adam_alignment:per_layer=5", "update_norm", "adam_correction"],
                    every=2)
            tr.step(0, optimizer=opt)
        train(model, X, y, opt, 6, tracker=tr)
        results.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state()))
        if tr is not None:
            assert tr.n_measurements == 4
            assert {"precond_sharpness", "adam_correction_norm", "update_norm", "r_med"} <= set(tr.metrics["metric"])
    (sa, oa, ra), (sb, ob, rb) = results
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # parameters and BatchNorm running statistics
    assert torch.equal(ra, rb)
    for i, st in oa["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])) for k, v in st.items())


@pytest.mark.parametrize("name", sorted(PROBES))
def test_every_probe_is_pure_in_the_tracker(name):
    X, y = data()
    model = mlp(bn=True, dropout=0.2)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, X, y, opt, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    kw = {"r_med": ":per_layer=5", "adam_alignment": ":per_layer=5", "diag_dominance": ":per_layer=3",
          "trace": ":n_probes=6"}.get(name, "")
    with pytest.warns(UserWarning):
        tr = Tracker(model, F.cross_entropy, (X, y), probes=[name + kw], every=1)
    tr.step(0, optimizer=opt)
    train(model, X, y, opt, 1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    state, ostate, rng = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state()
    tr.step(1, optimizer=opt)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name
    for i, st in ostate["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(opt.state_dict()["state"][i][k]), torch.as_tensor(v)), (name, k)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())


def test_precond_sharpness_reads_torch_adam_state():
    """P = sqrt(v / (1 - beta2^t)) + eps from torch.optim.Adam's state: lambda_max(P^-1/2 H P^-1/2) vs dense."""
    X, y = data()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    train(model, X, y, opt, 3)
    tr = Tracker(model, F.cross_entropy, (X, y), probes=["precond_sharpness:tol=1e-10,max_iter=200"], every=1)
    out = tr.step(3, optimizer=opt)
    H = dense_hessian(model, X, y)
    P = torch.cat([((opt.state[p]["exp_avg_sq"] / (1 - 0.99 ** 3)).sqrt() + 1e-6).reshape(-1)
                   for p in model.parameters()])
    S = P.rsqrt()
    expected = float(torch.linalg.eigvalsh(S[:, None] * H * S[None, :])[-1])
    assert out["precond_sharpness"] == pytest.approx(expected, rel=1e-8)
    assert out["precond_sharpness_threshold"] == pytest.approx(2 * 1.9 / (0.1 * 1e-2))


def test_dataloader_probe_data_is_the_exact_mean_and_read_once():
    X, y = data(n=60)
    model = mlp()
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    tr = Tracker(model, F.cross_entropy, loader, probes=["loss", "sharpness:tol=1e-10,max_iter=200"], every=5)
    assert torch.equal(torch.get_rng_state(), rng)  # reading the loader did not consume the global RNG
    assert len(tr.problem.probe_batches) == 4  # 16 + 16 + 16 + 12 samples
    out = tr.step(0)
    ev = torch.linalg.eigvalsh(dense_hessian(model, X, y))
    assert out["sharpness"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert out["loss"] == pytest.approx(float(F.cross_entropy(model(X), y)), rel=1e-12)


class DictModel(nn.Module):
    """A Hugging-Face-shaped toy: keyword inputs, an output object with .logits."""

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 4, dtype=DT)
        self.head = nn.Linear(4, 11, dtype=DT)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return DictModel.Out(self.head(torch.tanh(h)))


def lm_loss(out, y):
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def test_dict_inputs_and_output_objects_and_r_med_zero_rows():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (8, 5), generator=g)  # tokens 6..10 never occur: their embedding rows have H_ii = 0
    batch = ({"input_ids": ids, "attention_mask": torch.ones(8, 5, dtype=DT)}, torch.roll(ids, -1, 1))
    model = DictModel()
    with pytest.warns(UserWarning, match="exactly 0"):
        tr = Tracker(model, lm_loss, batch, probes=["loss", "accuracy", "r_med:per_layer=40", "sharpness"], every=1)
        out = tr.step(0)
    assert np.isfinite(out["r_med/emb.weight"]) and out["r_med_zeros/emb.weight"] > 0
    assert out["loss"] == pytest.approx(float(lm_loss(model(**batch[0]), batch[1])), rel=1e-12)
    assert 0 <= out["accuracy"] <= 1


def test_store_show_plot_and_notes(tmp_path):
    from optiscope.optim import Adam

    X, y = data()
    model = mlp()
    opt = Adam(model.parameters(), lr=1e-2)  # optiscope's adam: eps inside the square root
    with Tracker(model, F.cross_entropy, (X, y), probes=["loss", "r_med:per_layer=5", "sharpness"], every=2,
                 store=tmp_path / "run", name="mine") as tr:
        tr.step(0, optimizer=opt)
        train(model, X, y, opt, 4, tracker=tr)
    st = RunStore.open(tmp_path / "run")
    df = st.read_metrics()
    assert sorted(df["step"].unique()) == [0, 2, 4] and set(df["run"]) == {"mine"}
    assert list(df.columns) == ["run", "optimizer", "step", "metric", "layer", "value"]
    m = st.read_manifest()
    assert m["status"] == "finished" and m["runs"]["mine"]["status"] == "finished"
    assert any("eps inside the square root" in n for n in m["runs"]["mine"]["notes"])
    exe = [sys.executable, "-m", "optiscope.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    show = subprocess.run(exe + ["show", str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert show.returncode == 0 and "mine" in show.stdout and "finished" in show.stdout
    plot = subprocess.run(exe + ["plot", str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "run" / "figures" / "r_med.png").exists()
    # a second tracker on the same run name is refused unless resuming; resume drops rows at/after its first step
    with pytest.raises(ValueError, match="already holds run 'mine'"):
        Tracker(model, F.cross_entropy, (X, y), probes=["loss"], every=2, store=tmp_path / "run", name="mine")
    with Tracker(model, F.cross_entropy, (X, y), probes=["loss"], every=2, store=tmp_path / "run", name="mine",
                 resume=True) as tr2:
        tr2.step(2)
    df2 = RunStore.open(tmp_path / "run").read_metrics()
    assert sorted(df2["step"].unique()) == [0, 2]
    assert set(df2[df2["step"] == 2]["metric"]) == {"loss"}


def test_killed_process_keeps_what_was_measured(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch, torch.nn.functional as F
        from torch import nn
        from optiscope import Tracker
        torch.manual_seed(0)
        X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr = Tracker(model, F.cross_entropy, (X, y), probes=["loss", "sharpness"], every=2,
                     store={str(tmp_path / 'killed')!r})
        for t in range(0, 100):
            if t:
                opt.zero_grad(); F.cross_entropy(model(X), y).backward(); opt.step()
            tr.step(t, optimizer=opt)
            if t == 6:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    st = RunStore.open(tmp_path / "killed")
    df = st.read_metrics()
    assert sorted(df["step"].unique()) == [0, 2, 4, 6]
    assert st.read_manifest()["runs"]["run"]["last_step"] == 6
    show = subprocess.run([sys.executable, "-m", "optiscope.cli.main", "show", str(tmp_path / "killed")],
                          capture_output=True, text=True)
    assert show.returncode == 0 and "run" in show.stdout


def test_update_norm_is_the_last_optimizer_step():
    X, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = Tracker(model, F.cross_entropy, (X, y), probes=["update_norm"], every=3)
    before = None
    for t in range(1, 7):
        if t == 3:
            before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
        out = tr.step(t, optimizer=opt)
        if t == 3:
            after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            assert out["update_norm"] == pytest.approx(float((after - before).norm()), rel=1e-12)


# -------------------------------------------------------------------------------------------------------------
def test_bad_input_names_the_problem():
    X, y = data()
    model = mlp()
    with pytest.raises(ValueError, match="not a scalar; reduce"):
        Tracker(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (X, y))
    with pytest.raises(ValueError, match="returned Out, not a scalar tensor .*model output object"):
        Tracker(DictModel(), lambda o, t: o, ({"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                               "attention_mask": torch.ones(2, 3, dtype=DT)}, torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        Tracker(model, F.cross_entropy, (X.to("meta"), y.to("meta")))
    dict_loader = DataLoader([{"x": X[i], "labels": y[i]} for i in range(8)], batch_size=4)
    with pytest.raises(ValueError, match=r"batch 0 is a dict .*\(b, b\['labels'\]\)"):
        Tracker(model, F.cross_entropy, dict_loader)
    with pytest.raises(ValueError, match="batch 0 is a Tensor, not an"):
        Tracker(model, F.cross_entropy, DataLoader(X, batch_size=8))
    with pytest.raises(ValueError, match="data is empty"):
        Tracker(model, F.cross_entropy, [])
    for every in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="every = .* must be an integer >= 1"):
            Tracker(model, F.cross_entropy, (X, y), every=every)
    with pytest.raises(ValueError, match="mode"):
        Tracker(model, F.cross_entropy, (X, y), mode="inference")
    with pytest.raises(ValueError, match="log_metrics"):
        Tracker(model, F.cross_entropy, (X, y), loggers=[42])
    tr = Tracker(model, F.cross_entropy, (X, y), probes=["loss"], every=2)
    tr.step(4)
    with pytest.raises(ValueError, match="step 3 after step 4: steps must increase"):
        tr.step(3)
    with pytest.raises(ValueError, match="step 4 after step 4"):
        tr.step(4)
    with pytest.raises(ValueError, match="step = -1 must be >= 0"):
        tr.step(-1)
    with pytest.raises(ValueError, match="must be an integer"):
        tr.step(5.0)
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        tr.step(5, optimizer="adam")
    tr.close()
    with pytest.raises(ValueError, match="closed"):
        tr.step(6)


def test_eval_mode_measures_the_deterministic_model():
    X, y = data()
    model = mlp(dropout=0.5)
    model.train()
    tr = Tracker(model, F.cross_entropy, (X, y), probes=["loss", "sharpness:tol=1e-10,max_iter=200"], mode="eval")
    out = tr.step(0)
    model.eval()
    ev = torch.linalg.eigvalsh(dense_hessian(model, X, y))
    assert out["sharpness"] == pytest.approx(float(ev[-1]), rel=1e-9)
    model.train()
    assert json.dumps(tr.notes) == "[]"  # no dropout note when measuring in eval mode


def test_probe_cost_is_stated_once_and_warned_when_expensive(tmp_path):
    import time

    X, y = data()
    model = mlp()

    def slow_probe(problem, state):
        time.sleep(0.05)
        return {"custom": float(state.step)}

    tr = Tracker(model, F.cross_entropy, (X, y), probes=[slow_probe], every=2, store=tmp_path / "cost")
    tr.step(0)
    tr.step(1)
    with pytest.warns(UserWarning, match=r"probes cost .* per checkpoint, .*x the training time.*raise every="):
        out = tr.step(2)
    assert out == {"custom": 2.0}
    tr.step(3)
    tr.step(4)  # stated once only
    assert sum("probes cost" in n for n in tr.notes) == 1
    tr.close()
    entry = RunStore.open(tmp_path / "cost").read_manifest()["runs"]["run"]
    assert "probes cost" in entry["probe_cost"] and entry["probe_seconds"] > entry["train_seconds"]


def test_batches_of_different_lengths_and_config_yaml(tmp_path):
    """Probe batches padded to different lengths (as a collator makes them) are kept apart, never concatenated."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 11, (3, 7), generator=g)
    batches = [({"input_ids": x, "attention_mask": torch.ones(x.shape, dtype=DT)}, torch.roll(x, -1, 1)) for x in (a, b)]
    model = DictModel()
    tr = Tracker(model, lm_loss, batches, probes=["loss", "r_med:per_layer=5"], store=tmp_path / "s")
    out = tr.step(0)
    expect = sum(float(lm_loss(model(**x), t)) * len(t) for x, t in batches) / 7
    assert out["loss"] == pytest.approx(expect, rel=1e-12)
    tr.close()
    import yaml

    cfg = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    assert cfg["probes"][0] == "loss:on=probe" and cfg["probes"][1].startswith("r_med:per_layer=5,delta=0.0")
    with pytest.raises(ValueError, match="on='train': the tracker knows only its probe data"):
        Tracker(model, lm_loss, batches, probes=["loss:on=train"])


def test_optional_cost_estimate_before_the_first_checkpoint(tmp_path, capsys):
    X, y = data()
    tr = Tracker(mlp(), F.cross_entropy, (X, y), probes=["sharpness:max_iter=30", "r_med:per_layer=5"],
                 store=tmp_path / "b", estimate_cost=True)
    assert tr.budget.hvps["sharpness"] == 30 and tr.budget.seconds_per_hvp > 0
    assert "HVPs per checkpoint" in capsys.readouterr().err
    tr.close()
    assert "HVPs per checkpoint" in RunStore.open(tmp_path / "b").read_manifest()["runs"]["run"]["probe_budget"]
