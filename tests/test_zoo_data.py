"""zoo.data: loaders on the real Debian files, determinism, splits, synthetic generators, batches, losses."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from optiscope.zoo.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    FORTUNES_DIR,
    HalfMSELoss,
    SequenceCrossEntropy,
    batch_iterator,
    default_loss,
    digits,
    fashion_mnist,
    fortune_files,
    fortunes,
    load_dataset,
    powerlaw_features,
    random_labels,
    teacher_regression,
)

needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists(),
                                   reason="apt-get install dataset-fashion-mnist")
needs_fortunes = pytest.mark.skipif(not Path(FORTUNES_DIR).is_dir(), reason="apt-get install fortunes")


def test_registry_names():
    assert set(DATASETS) == {"digits", "fashion_mnist", "fortunes", "random_labels", "teacher_regression",
                             "powerlaw_features"}


def test_digits_split_normalisation_determinism():
    d = digits(seed=3)
    Xtr, ytr = d.train
    assert d.input_shape == (64,) and d.n_classes == 10 and d.task == "classification"
    assert len(Xtr) + len(d.test[0]) == 1797 and len(d.test[0]) == round(0.2 * 1797)
    assert abs(Xtr.mean().item()) < 1e-5 and abs(Xtr.std(unbiased=False).item() - 1) < 1e-4
    assert set(ytr.tolist()) == set(range(10)) and ytr.dtype == torch.int64
    again = digits(seed=3)
    assert torch.equal(again.train[0], Xtr) and torch.equal(again.test[1], d.test[1])
    assert not torch.equal(digits(seed=4).train[1], ytr)
    img = digits(seed=3, flatten=False, n_train=100, n_test=50)
    assert img.train[0].shape == (100, 1, 8, 8) and img.test[0].shape == (50, 1, 8, 8)
    # raw pixel values recovered from the normalisation match scikit-learn's images
    from sklearn.datasets import load_digits

    raw = load_digits().images.reshape(-1, 64)
    rec = Xtr[0].double().numpy() * d.meta["pixel_std"] + d.meta["pixel_mean"]
    assert np.abs(raw - rec).sum(1).min() < 1e-4


def test_mutating_a_loaded_dataset_does_not_leak_into_the_cache():
    d = digits()
    d.train[0].zero_()
    assert digits().train[0].abs().sum() > 0


@needs_fashion
def test_fashion_mnist_real_files():
    d = fashion_mnist(n_train=500, n_test=200, seed=1)
    assert d.train[0].shape == (500, 784) and d.test[0].shape == (200, 784) and d.n_classes == 10
    assert abs(d.train[0].mean().item()) < 1e-4 and abs(d.train[0].std(unbiased=False).item() - 1) < 1e-3
    full = fashion_mnist(seed=1)
    assert len(full.train[0]) == 60000 and len(full.test[0]) == 10000
    assert torch.bincount(full.train[1]).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    # the first raw training label of the official file
    with gzip.open(Path(FASHION_MNIST_DIR) / "train-labels-idx1-ubyte.gz") as f:
        first_labels = list(f.read()[8:13])
    assert full.train[1][:5].tolist() == first_labels
    assert torch.equal(fashion_mnist(n_train=500, n_test=200, seed=1).train[0], d.train[0])
    img = fashion_mnist(n_train=10, n_test=10, flatten=False)
    assert img.input_shape == (1, 28, 28)


@needs_fashion
def test_fashion_mnist_env_override_and_missing_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTISCOPE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(n_train=10)
    for name in os.listdir(FASHION_MNIST_DIR):
        os.symlink(Path(FASHION_MNIST_DIR) / name, tmp_path / name)
    assert fashion_mnist(n_train=10, n_test=10).meta["source"] == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="OPTISCOPE_FASHION_MNIST"):
        fashion_mnist(root=tmp_path / "nowhere")


@needs_fortunes
def test_fortunes_real_files_and_next_token_targets():
    files = fortune_files()
    names = [p.name for p in files]
    assert "computers" in names and not any(n.endswith((".dat", ".u8")) for n in names)
    d = fortunes(seq_len=32, seed=0)
    X, y = d.train
    assert d.task == "lm" and d.n_classes == 256 and X.shape[1] == 32 and X.dtype == torch.int64
    assert torch.equal(X[:, 1:], y[:, :-1])  # next-token targets
    total = sum(p.stat().st_size for p in files)
    assert d.meta["n_bytes"] == total
    assert len(X) + len(d.test[0]) == total // 33
    text = bytes(X[:50].flatten().tolist()).decode("latin-1")
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text)  # it is English text
    assert torch.equal(fortunes(seq_len=32, seed=0).test[0], d.test[0])


def test_fortunes_missing_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fortunes(root=tmp_path)
    (tmp_path / "a").write_bytes(b"hello world, " * 20)
    (tmp_path / "a.dat").write_bytes(b"\x00" * 100)
    d = fortunes(seq_len=7, root=tmp_path, test_fraction=0.25)
    assert d.meta["files"] == ("a",) and d.meta["n_bytes"] == 260


def test_random_labels_same_inputs_random_targets():
    base = digits(seed=0)
    r = random_labels(base, seed=5)
    assert torch.equal(r.train[0], base.train[0]) and r.n_classes == 10
    assert not torch.equal(r.train[1], base.train[1])
    agreement = (r.train[1] == base.train[1]).float().mean().item()
    assert 0.03 < agreement < 0.2  # independent of the true labels (expected 0.1)
    assert torch.equal(random_labels(base, seed=5).train[1], r.train[1])
    spec = load_dataset("random_labels:base=digits,n_classes=3", seed=2)
    assert spec.n_classes == 3 and spec.train[1].max() == 2
    with pytest.raises(ValueError, match="regression"):
        random_labels(teacher_regression(d=3, n=5, n_test=5))


def test_teacher_regression_whitened_and_linear():
    d = teacher_regression(d=8, n=20000, n_test=10, k=2, seed=1, dtype=torch.float64)
    X, Y = d.train
    cov = X.T @ X / len(X)
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=0.05)
    assert torch.allclose(Y, X @ d.meta["teacher"].T, atol=1e-12)
    assert d.output_dim == 2 and d.n_classes is None


def test_powerlaw_features_spectrum_and_target_moments():
    d = powerlaw_features(nu=1.5, kappa=1.0, d=32, n=50000, n_test=10, seed=0, dtype=torch.float64)
    X, y = d.train
    emp = np.sort(np.linalg.eigvalsh((X.T @ X / len(X)).numpy()))[::-1]
    lam = d.meta["eigenvalues"]
    np.testing.assert_allclose(emp[:5], lam[:5], rtol=0.05)
    Q, w = d.meta["eigenvectors"], d.meta["teacher"].numpy()
    c = lam * (Q.T @ w) ** 2
    np.testing.assert_allclose(c, d.meta["c"], rtol=1e-10)
    assert d.meta["c"].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(y[:, 0].numpy(), X.numpy() @ w, atol=1e-10)
    with pytest.raises(ValueError, match="kappa"):
        powerlaw_features(kappa=0.0)


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="bad arguments"):
        load_dataset("digits:size=3")
    with pytest.raises(ValueError, match="n_train"):
        digits(n_train=10_000)


def test_batch_iterator_deterministic_epochs_and_steps():
    X = torch.arange(10).float()[:, None]
    y = torch.arange(10)
    a = [b[1].tolist() for b in batch_iterator(X, y, 4, seed=1, epochs=2)]
    b = [b[1].tolist() for b in batch_iterator(X, y, 4, seed=1, epochs=2)]
    assert a == b and [len(x) for x in a] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(a[:3], [])) == list(range(10)) and sorted(sum(a[3:], [])) == list(range(10))
    assert a[:3] != a[3:]  # fresh permutation per epoch
    assert [b[1].tolist() for b in batch_iterator(X, y, 4, seed=2)] != a[:3]
    steps = list(batch_iterator(X, y, 4, seed=1, steps=7, drop_last=True))
    assert len(steps) == 7 and all(len(s[1]) == 4 for s in steps)
    plain = [b[1].tolist() for b in batch_iterator(X, y, 5, shuffle=False)]
    assert plain == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="samples"):
        next(batch_iterator(X, y[:3], 2))


def test_default_losses():
    assert isinstance(default_loss(digits(n_train=10, n_test=10)), torch.nn.CrossEntropyLoss)
    loss = default_loss(teacher_regression(d=2, n=4, n_test=4))
    assert isinstance(loss, HalfMSELoss)
    out, tgt = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert loss(out, tgt).item() == pytest.approx(0.5 * (5 + 2) / 2)
    lm = SequenceCrossEntropy()
    logits = torch.zeros(2, 3, 4)
    assert lm(logits, torch.zeros(2, 3, dtype=torch.long)).item() == pytest.approx(np.log(4))
    with pytest.raises(ValueError, match="differ"):
        loss(torch.zeros(3, 2), torch.zeros(3, 3))
