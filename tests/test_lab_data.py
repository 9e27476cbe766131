"""lab.Problem with real data: Datasets, DataLoaders, iterables of batches, dict/tuple inputs, output objects and
device=; the same-batch-order guarantee for all of them (checked by running the lab on each form)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from optiscope.lab import Problem, Run, RunStore, compare

torch.set_num_threads(1)
DT = torch.float64


def xy(n=48, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    return X, (X @ torch.randn(d, classes, generator=g, dtype=DT)).argmax(1)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def run_metrics(problem, **kw):
    res = Run(problem, "sgd:lr=0.2", steps=6, batch_size=8, probe_every=3,
              probes=["loss", "sharpness", "r_med:per_layer=4"], **kw).execute()
    return res.metrics.sort_values(["step", "metric", "layer"]).reset_index(drop=True)


def test_dataset_loader_iterable_and_tensors_give_the_same_run():
    X, y = xy()
    ref = run_metrics(Problem(net(), F.cross_entropy, train=(X, y)))
    forms = {
        "dataset": TensorDataset(X, y),
        "loader": DataLoader(TensorDataset(X, y), batch_size=10),  # ragged last batch: 10+10+10+10+8
        "list of batches": [(X[:20], y[:20]), (X[20:], y[20:])],
        "generator": ((X[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)),
    }
    for what, train in forms.items():
        got = run_metrics(Problem(net(), F.cross_entropy, train=train))
        assert got["value"].tolist() == ref["value"].tolist(), what  # bit-identical: same batches, same numbers


def test_a_shuffling_loader_is_read_once_in_its_order_and_leaves_the_rng_alone():
    X, y = xy()
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)  # draws its order from the global RNG
    rng = torch.get_rng_state()
    pb = Problem(net(), F.cross_entropy, train=loader)
    assert torch.equal(torch.get_rng_state(), rng)
    Xs, ys = pb.train
    # the same samples, in the order the loader produced them
    order = torch.tensor([int((X == row).all(1).nonzero()) for row in Xs])
    assert sorted(order.tolist()) == list(range(48)) and torch.equal(ys, y[order])
    # within one Problem every optimizer of a comparison sees the same batches: identical runs for identical specs
    res = compare(pb, {"a": "sgd:lr=0.1", "b": "sgd:lr=0.1"}, steps=4, batch_size=8, probe_every=2,
                  probes=["loss"])
    assert res["a"].metrics["value"].tolist() == res["b"].metrics["value"].tolist()


class PairDataset(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"a": self.X[i, :2], "b": self.X[i, 2:]}, self.y[i]


class TwoInputs(nn.Module):
    """``model(a=..., b=...)`` returning an object with ``.logits`` (as Hugging Face models do)."""

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 5, dtype=DT)
        self.l2 = nn.Linear(5, 3, dtype=DT)

    def forward(self, a, b):
        return TwoInputs.Out(self.l2(torch.tanh(self.l1(torch.cat([a, b], -1)))))


class TupleInputs(TwoInputs):
    def forward(self, a, b):  # called as model(*(a, b)); returns a tensor
        return super().forward(a, b).logits


def test_dict_and_tuple_inputs_with_output_objects_match_the_tensor_problem():
    X, y = xy()
    ref = run_metrics(Problem(net(), F.cross_entropy, train=(X, y)))
    model = TwoInputs()
    plain = nn.Sequential(model.l1, nn.Tanh(), model.l2)  # the same function on tensor inputs
    ref2 = run_metrics(Problem(plain, F.cross_entropy, train=(X, y)))
    dict_pb = Problem(TwoInputs(), lambda out, t: F.cross_entropy(out.logits, t), train=PairDataset(X, y),
                      eval=PairDataset(X[:8], y[:8]))
    assert set(dict_pb.train[0]) == {"a", "b"} and dict_pb.n_train == 48
    got = run_metrics(dict_pb)
    assert set(got[got["metric"] == "eval_loss"]["step"]) == {0, 3, 6}
    # parameter names differ (l1.weight vs 0.weight), hence the sampled R_med coordinates; compare the rest
    def same(a):
        return a[~a["metric"].str.startswith("r_med") & (a["metric"] != "eval_loss")]["value"].tolist()

    assert same(got) == pytest.approx(same(ref2), rel=1e-12, abs=1e-12)
    tup = run_metrics(Problem(TupleInputs(), F.cross_entropy, train=((X[:, :2], X[:, 2:]), y)))
    assert same(tup) == pytest.approx(same(ref2), rel=1e-12, abs=1e-12)
    assert len(ref) == len(got) - 3  # + eval_loss at steps 0, 3, 6
    acc = Run(dict_pb, "sgd:lr=0.1", steps=1, batch_size=8, probes=["accuracy"]).execute().metrics
    assert set(acc["metric"]) == {"batch_loss", "accuracy", "eval_accuracy"}


def test_probe_batch_as_several_batches_is_the_exact_mean():
    X, y = xy()
    pb = Problem(net(), F.cross_entropy, train=(X, y), probe_batch=DataLoader(TensorDataset(X, y), batch_size=20))
    assert len(pb.probe_batches) == 3
    one = Problem(net(), F.cross_entropy, train=(X, y), probe_batch=(X, y))
    a = Run(pb, "sgd:lr=0.1", steps=0, probes=["loss:on=probe", "sharpness:tol=1e-10"]).execute().metrics
    b = Run(one, "sgd:lr=0.1", steps=0, probes=["loss:on=probe", "sharpness:tol=1e-10"]).execute().metrics
    va, vb = a.set_index("metric")["value"], b.set_index("metric")["value"]
    assert va["loss"] == pytest.approx(vb["loss"], rel=1e-13)
    assert va["sharpness"] == pytest.approx(vb["sharpness"], rel=1e-8)


def test_device_cpu_gives_the_same_numbers_and_bad_devices_are_named():
    X, y = xy()
    ref = run_metrics(Problem(net(), F.cross_entropy, train=(X, y)))
    got = run_metrics(Problem(net(), F.cross_entropy, train=(X, y), device="cpu"))
    assert got["value"].tolist() == ref["value"].tolist()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Problem(net(), F.cross_entropy, train=(X, y), device="cuda")
    with pytest.raises(ValueError, match="not a device name"):
        Problem(net(), F.cross_entropy, train=(X, y), device="gpu0")
    with pytest.raises(ValueError, match="train is on meta but the model is on cpu"):
        Problem(net(), F.cross_entropy, train=(X.to("meta"), y.to("meta")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_trains_there_with_the_cpu_batches():
    X, y = xy()
    pb = Problem(net(), F.cross_entropy, train=(X, y), device="cuda")
    assert next(pb.model.parameters()).is_cuda and pb.train[0].is_cuda
    got = run_metrics(pb)
    ref = run_metrics(Problem(net(), F.cross_entropy, train=(X, y)))
    assert got["value"].tolist() == pytest.approx(ref["value"].tolist(), rel=1e-6, abs=1e-9)


def test_bad_data_names_the_problem():
    X, y = xy()
    with pytest.raises(ValueError, match=r"batch 0 is a dict .*\(b, b\['labels'\]\)"):
        Problem(net(), F.cross_entropy, train=DataLoader([{"x": X[i], "labels": y[i]} for i in range(4)],
                                                         batch_size=2))
    with pytest.raises(ValueError, match="Dataset items must be \\(input, target\\) samples"):
        Problem(net(), F.cross_entropy, train=DatasetOfTensors(X))
    with pytest.raises(ValueError, match="inputs have 48 samples but targets have 47"):
        Problem(net(), F.cross_entropy, train=(X, y[:47]))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        Problem(TwoInputs(), F.cross_entropy, train=({"a": X[:, :2], "b": X[:10, 2:]}, y))
    with pytest.raises(ValueError, match="cannot be concatenated"):
        Problem(net(), F.cross_entropy, train=[(X[:8], y[:8]), (X[8:16, :3], y[8:16])])
    with pytest.raises(ValueError, match="train is empty"):
        Problem(net(), F.cross_entropy, train=[])
    with pytest.raises(ValueError, match="train is a Tensor"):
        Problem(net(), F.cross_entropy, train=X)


class DatasetOfTensors(Dataset):
    def __init__(self, X):
        self.X = X

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i]


def test_hessian_names_active_dropout_and_the_lab_states_the_adam_convention(tmp_path):
    import warnings

    from optiscope import Hessian

    X, y = xy()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).to(DT)
    with pytest.warns(UserWarning, match=r"train-mode randomness is active in the model \(1 module\(s\): 2 \(Dropout "
                                         r"p=0.3\)\).*model.eval\(\)"):
        Hessian(model, F.cross_entropy, (X, y))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Hessian(model, F.cross_entropy, (X, y))  # no warning in eval mode
    res = compare(Problem(net(), F.cross_entropy, train=(X, y)), {"adam": "adam:lr=1e-3", "sgd": "sgd:lr=0.1"},
                  steps=2, batch_size=8, probes=["loss"], store=tmp_path / "conv")
    runs = RunStore.open(tmp_path / "conv").read_manifest()["runs"]
    assert any("eps inside the square root" in n for n in runs["adam"]["notes"])
    assert "notes" not in runs["sgd"]
    assert res["adam"].status == "finished"
