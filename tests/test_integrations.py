"""Integrations: TensorBoard scalars, W&B/MLflow adapters, a Hugging Face Trainer and a Lightning Trainer running a
Tracker; the numbers they record are checked against the Hessian of the final model computed independently."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optiscope import Hessian, Tracker
from optiscope.lab import RunStore

torch.set_num_threads(1)


def small():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), X, y


def test_tensorboard_logger_writes_the_tracker_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from optiscope.integrations import TensorBoardLogger

    model, X, y = small()
    with Tracker(model, F.cross_entropy, (X, y), probes=["loss", "sharpness", "r_med:per_layer=4"], every=1,
                 loggers=[TensorBoardLogger(tmp_path / "tb")]) as tr:
        first = tr.step(0)
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        second = tr.step(1)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "optiscope/sharpness" in tags and "optiscope/r_med/0.weight" in tags
    ev = acc.Scalars("optiscope/sharpness")
    assert [e.step for e in ev] == [0, 1]
    assert [e.value for e in ev] == pytest.approx([first["sharpness"], second["sharpness"]], rel=1e-6)


class FakeRun:
    def __init__(self):
        self.calls, self.finished = [], False

    def log(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def finish(self):
        self.finished = True


class FakeMlflow:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


def test_wandb_and_mlflow_adapters_follow_the_protocol():
    from optiscope.integrations import MLflowLogger, WandbLogger
    from optiscope.lab import MetricsLogger

    run, ml = FakeRun(), FakeMlflow()
    wl, mfl = WandbLogger(run, finish=True), MLflowLogger(ml)
    assert isinstance(wl, MetricsLogger) and isinstance(mfl, MetricsLogger)
    model, X, y = small()
    with Tracker(model, F.cross_entropy, (X, y), probes=["loss"], every=2, loggers=[wl, mfl]) as tr:
        for t in range(5):
            tr.step(t)
    assert [s for s, _ in run.calls] == [0, 2, 4] and run.finished
    assert run.calls[0][1]["optiscope/loss"] == pytest.approx(float(F.cross_entropy(model(X), y)), rel=1e-6)
    assert [s for s, _ in ml.calls] == [0, 2, 4]
    mfl.log_metrics(7, {"r_med/x": math.nan, "loss": 1.0})
    assert ml.calls[-1] == (7, {"optiscope/loss": 1.0})  # NaN skipped
    with pytest.raises(ValueError, match="log"):
        WandbLogger(object())
    with pytest.raises(ValueError, match="log_metrics"):
        MLflowLogger(object())


def test_hugging_face_trainer_callback_with_a_tiny_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from optiscope.integrations.huggingface import OptiscopeCallback

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (16, 8), generator=g)
    train = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    probe = {"input_ids": ids[:8], "attention_mask": torch.ones_like(ids[:8]), "labels": ids[:8]}
    cb = OptiscopeCallback(probe, probes=["loss", "sharpness:tol=1e-8,max_iter=100"], every=2,
                           store=tmp_path / "hf", mode="eval")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    st = RunStore.open(tmp_path / "hf")
    df = st.read_metrics()
    assert sorted(df["step"].unique()) == [0, 2, 4]
    assert st.read_manifest()["runs"]["run"]["status"] == "finished"
    assert set(df["optimizer"]) == {"AdamW"}
    # the last checkpoint is the trained model: recompute independently in eval mode
    model.eval()
    H = Hessian(model, lambda out, y: out.loss, (probe, probe["labels"]))
    top = H.eigenvalues(k=1, tol=1e-8, max_iter=100).values[0]
    last = df[(df["step"] == 4) & (df["metric"] == "sharpness")]["value"].item()
    assert last == pytest.approx(float(top), rel=1e-6)
    loss = df[(df["step"] == 4) & (df["metric"] == "loss")]["value"].item()
    with torch.no_grad():
        assert loss == pytest.approx(float(model(**probe).loss), rel=1e-6)
    assert transformers.__version__


def test_lightning_callback(tmp_path):
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from optiscope.integrations.lightning import OptiscopeCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    _, X, y = small()
    module = Module()
    cb = OptiscopeCallback((X, y), loss_fn=F.cross_entropy, probes=["loss", "sharpness:tol=1e-8",
                                                                    "precond_sharpness:tol=1e-8"],
                           every=2, store=tmp_path / "lit")
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(module, DataLoader(TensorDataset(X, y), batch_size=8))
    df = RunStore.open(tmp_path / "lit").read_metrics()
    assert sorted(df["step"].unique()) == [0, 2, 4]
    assert {"precond_sharpness", "precond_sharpness_threshold"} <= set(df[df["step"] == 4]["metric"])
    top = Hessian(module, F.cross_entropy, (X, y)).eigenvalues(k=1, tol=1e-8).values[0]
    last = df[(df["step"] == 4) & (df["metric"] == "sharpness")]["value"].item()
    assert last == pytest.approx(float(top), rel=1e-6)
