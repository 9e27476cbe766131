"""Built-in datasets: real (digits, Fashion-MNIST, fortunes) and synthetic (random labels, teacher, power law).

Every loader is deterministic given ``seed`` (train/test split, subsets, synthetic draws) and returns a
:class:`Dataset` of tensors with metadata. Nothing downloads: missing data raises ``FileNotFoundError`` naming the
Debian package or the path that provides it (docs/architecture.md).

* images are normalised to zero mean / unit standard deviation with the (scalar) statistics of the training split;
* decoded raw arrays are cached per process (``functools.lru_cache``), so repeated loads only re-split and
  re-normalise; the cached arrays are never handed out (every call returns fresh tensors).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from optiscope.utils.spec import parse_spec

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FORTUNES_DIR = "/usr/share/games/fortunes"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


@dataclass(eq=False)
class Dataset:
    """A train/test split as tensors plus what a model needs to know about it.

    ``train = (X, y)``, ``test = (X, y)``; ``input_shape`` is the shape of one input (without the batch dimension);
    ``n_classes`` is the number of classes (vocabulary size for ``task="lm"``, ``None`` for regression);
    ``output_dim`` is the width of a model's output (``n_classes`` or the regression target dimension).
    """

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    n_classes: int | None
    input_shape: tuple[int, ...]
    task: Literal["classification", "regression", "lm"]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dim(self) -> int:
        """Width of the model output this dataset needs: the number of classes, or the target dimension for
        regression."""
        if self.task == "regression":
            y = self.train[1]
            return 1 if y.ndim == 1 else int(y.shape[-1])
        return int(self.n_classes)

    @property
    def input_dim(self) -> int:
        """Number of input features (``prod(input_shape)``)."""
        return int(math.prod(self.input_shape))

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, task={self.task}, train={tuple(self.train[0].shape)}, "
                f"test={tuple(self.test[0].shape)}, n_classes={self.n_classes}, input_shape={self.input_shape})")


# ------------------------------------------------------------------------------------------------- helpers
def _check_int(value: Any, name: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {minimum}")
    return int(value)


def _split_indices(n: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _subset(n_avail: int, n_want: int | None, seed: int, what: str) -> np.ndarray:
    if n_want is None:
        return np.arange(n_avail)
    if n_want > n_avail:
        raise ValueError(f"{what}={n_want} exceeds the {n_avail} available samples")
    return np.sort(np.random.default_rng(seed).permutation(n_avail)[:n_want])


def _normalise(train: np.ndarray, test: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 float, float]:
    """Scale both splits by the training split's scalar mean and standard deviation (statistics in float64)."""
    t_train = torch.from_numpy(np.ascontiguousarray(train))
    mean = float(t_train.mean(dtype=torch.float64)) if t_train.numel() else 0.0
    std = float(t_train.to(torch.float64).std(unbiased=False)) if t_train.numel() else 1.0
    std = std if std > 0 else 1.0

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).sub_(mean).div_(std)

    return to(train), to(test), mean, std


def _image_shape(shape: tuple[int, int], flatten: bool) -> tuple[int, ...]:
    return (shape[0] * shape[1],) if flatten else (1, *shape)


# -------------------------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images, target = d.images.astype(np.float64), d.target.astype(np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def digits(n_train: int | None = None, n_test: int | None = None, test_fraction: float = 0.2, seed: int = 0,
           flatten: bool = True, dtype: torch.dtype = torch.float32) -> Dataset:
    """scikit-learn's handwritten digits: 1797 8x8 images, 10 classes (ships inside the scikit-learn wheel).

    A seeded random ``test_fraction`` of the images is the test split; ``n_train`` / ``n_test`` take seeded
    subsets of the splits. ``flatten=True`` gives inputs of shape ``(64,)``, else ``(1, 8, 8)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must lie in (0, 1)")
    _check_int(n_train, "n_train", allow_none=True), _check_int(n_test, "n_test", allow_none=True)
    images, target = _digits_raw()
    tr, te = _split_indices(len(target), int(round(test_fraction * len(target))), seed)
    tr = tr[_subset(len(tr), n_train, seed + 1, "n_train")]
    te = te[_subset(len(te), n_test, seed + 2, "n_test")]
    shape = _image_shape((8, 8), flatten)
    Xtr, Xte, mean, std = _normalise(images[tr], images[te], dtype)
    return Dataset("digits", (Xtr.reshape(-1, *shape), torch.as_tensor(target[tr])),
                   (Xte.reshape(-1, *shape), torch.as_tensor(target[te])), 10, shape, "classification",
                   {"pixel_mean": mean, "pixel_std": std, "image_shape": (1, 8, 8),
                    "source": "sklearn.datasets.load_digits"})


# ------------------------------------------------------------------------------------------- fashion-mnist
def _read_idx_gz(path: Path) -> np.ndarray:
    """Decode one gzipped IDX file (big-endian header: 0x00 0x00 dtype ndim, then ndim uint32 sizes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} bytes")
    return arr.reshape(dims)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """Directory holding the four IDX ``.gz`` files: ``root``, else ``$OPTISCOPE_FASHION_MNIST``, else Debian's."""
    return Path(root or os.environ.get("OPTISCOPE_FASHION_MNIST") or FASHION_MNIST_DIR)


@functools.lru_cache(maxsize=4)
def _fashion_raw(root: str) -> dict[str, np.ndarray]:
    names = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
             "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
    missing = [n for n in names.values() if not (Path(root) / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing in {root}. Install it with "
            f"`apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}), or point the `root` "
            "argument or the OPTISCOPE_FASHION_MNIST environment variable at a directory holding the four IDX .gz "
            "files")
    out = {k: _read_idx_gz(Path(root) / v) for k, v in names.items()}
    for v in out.values():
        v.setflags(write=False)
    return out


def fashion_mnist(n_train: int | None = None, n_test: int | None = None, seed: int = 0, flatten: bool = True,
                  root: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60000 + 10000 28x28 grey images, 10 classes, from the IDX ``.gz`` files.

    Files from Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist`` (override: ``root`` or
    ``OPTISCOPE_FASHION_MNIST``). ``n_train`` / ``n_test``: seeded random subsets of the official splits.
    """
    _check_int(n_train, "n_train", allow_none=True), _check_int(n_test, "n_test", allow_none=True)
    raw = _fashion_raw(str(fashion_mnist_dir(root)))
    tr = _subset(len(raw["train_labels"]), n_train, seed, "n_train")
    te = _subset(len(raw["test_labels"]), n_test, seed + 1, "n_test")
    shape = _image_shape((28, 28), flatten)
    Xtr, Xte, mean, std = _normalise(raw["train_images"][tr], raw["test_images"][te], dtype)
    return Dataset("fashion_mnist",
                   (Xtr.reshape(-1, *shape), torch.as_tensor(raw["train_labels"][tr].astype(np.int64))),
                   (Xte.reshape(-1, *shape), torch.as_tensor(raw["test_labels"][te].astype(np.int64))),
                   10, shape, "classification",
                   {"pixel_mean": mean, "pixel_std": std, "classes": FASHION_MNIST_CLASSES, "image_shape": (1, 28, 28),
                    "source": str(fashion_mnist_dir(root))})


# ------------------------------------------------------------------------------------------------ fortunes
def fortune_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The corpus files: every regular (non-symlink) file directly in ``root`` except ``*.dat`` / ``*.u8``.

    Debian's ``fortunes`` package installs one plain-text file per topic (art, computers, cookie, ..., zippy) plus
    a ``strfile`` index ``<name>.dat`` and a ``<name>.u8`` symlink for each; only the plain text files are used,
    in sorted order.
    """
    root = Path(root or FORTUNES_DIR)
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink()
                   and p.suffix not in (".dat", ".u8")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no fortune files in {root}. Install them with `apt-get install fortunes` "
                                f"(files go to {FORTUNES_DIR}) or pass `root` pointing at plain-text files")
    return files


@functools.lru_cache(maxsize=4)
def _fortunes_bytes(root: str) -> tuple[np.ndarray, tuple[str, ...]]:
    files = fortune_files(root)
    data = np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)
    data.setflags(write=False)
    return data, tuple(p.name for p in files)


def fortunes(seq_len: int = 64, n_train: int | None = None, n_test: int | None = None, test_fraction: float = 0.1,
             seed: int = 0, root: str | os.PathLike | None = None) -> Dataset:
    """Byte-level language modelling on Debian's fortune files (~2.6 MB of English text, vocabulary 256).

    The concatenated bytes (files in sorted order, see :func:`fortune_files`) are cut into non-overlapping chunks
    of ``seq_len + 1`` bytes; input ``x = chunk[:-1]``, next-token target ``y = chunk[1:]`` (both ``int64``,
    shape ``(seq_len,)``). A seeded random ``test_fraction`` of the chunks is the test split; ``n_train`` /
    ``n_test`` take seeded subsets.
    """
    seq_len = _check_int(seq_len, "seq_len", minimum=1)
    _check_int(n_train, "n_train", allow_none=True), _check_int(n_test, "n_test", allow_none=True)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must lie in (0, 1)")
    data, names = _fortunes_bytes(str(Path(root or FORTUNES_DIR)))
    n_chunks = len(data) // (seq_len + 1)
    if n_chunks < 2:
        raise ValueError(f"seq_len={seq_len} is too long for a corpus of {len(data)} bytes")
    chunks = torch.as_tensor(data[: n_chunks * (seq_len + 1)].astype(np.int64)).reshape(n_chunks, seq_len + 1)
    tr, te = _split_indices(n_chunks, max(1, int(round(test_fraction * n_chunks))), seed)
    tr = tr[_subset(len(tr), n_train, seed + 1, "n_train")]
    te = te[_subset(len(te), n_test, seed + 2, "n_test")]
    tr_t, te_t = torch.as_tensor(tr), torch.as_tensor(te)
    return Dataset("fortunes", (chunks[tr_t, :-1], chunks[tr_t, 1:]), (chunks[te_t, :-1], chunks[te_t, 1:]),
                   256, (seq_len,), "lm", {"files": names, "n_bytes": len(data), "seq_len": seq_len})


# --------------------------------------------------------------------------------------------- synthetic
def random_labels(dataset: Dataset | str = "digits", seed: int = 0, n_classes: int | None = None,
                  **base_kwargs: Any) -> Dataset:
    """The same inputs with i.i.d. uniformly random integer targets (Jiang et al. 2023, §4.2, "random dataset").

    ``dataset`` is a :class:`Dataset` or a name/spec passed to :func:`load_dataset` (with ``seed`` and
    ``base_kwargs``). Targets are drawn from ``{0, ..., n_classes - 1}`` (default: the base's ``n_classes``;
    the base must be a classification or LM task) with a generator seeded by ``seed``; the shapes of the targets
    are those of the base (one per sample, or one per position for LM).
    """
    base = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, seed=seed, **base_kwargs)
    if base_kwargs and isinstance(dataset, Dataset):
        raise ValueError(f"random_labels got loader arguments {sorted(base_kwargs)} with an already loaded Dataset")
    k = n_classes if n_classes is not None else base.n_classes
    if base.task == "regression" and n_classes is None:
        raise ValueError(f"random_labels: base dataset {base.name!r} is a regression task; pass n_classes")
    k = _check_int(k, "n_classes", minimum=2)
    gen = torch.Generator().manual_seed(10_007 * seed + 17)
    ytr = torch.randint(0, k, tuple(base.train[1].shape) if base.task != "regression" else (len(base.train[0]),),
                        generator=gen)
    yte = torch.randint(0, k, tuple(base.test[1].shape) if base.task != "regression" else (len(base.test[0]),),
                        generator=gen)
    task = "lm" if base.task == "lm" else "classification"
    return Dataset(f"random_labels({base.name})", (base.train[0], ytr), (base.test[0], yte), k, base.input_shape,
                   task, {**base.meta, "base": base.name})


def teacher_regression(d: int = 20, n: int = 512, n_test: int = 512, k: int = 1, noise: float = 0.0,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """Whitened Gaussian inputs with a linear teacher: the setting of Jiang et al. 2023's Theorem 1 (Assumption 1).

    ``x ~ N(0, I_d)`` (so ``E[x x^T] = I``), teacher ``A`` with i.i.d. ``N(0, 1/d)`` entries (``k x d``),
    ``y = A x + noise * N(0, I_k)``. Targets have shape ``(n, k)``. ``meta["teacher"]`` holds ``A``.
    """
    d, n, n_test, k = (_check_int(d, "d"), _check_int(n, "n"), _check_int(n_test, "n_test"), _check_int(k, "k"))
    if not noise >= 0:
        raise ValueError(f"noise={noise!r} must be >= 0")
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    X = torch.randn(n + n_test, d, generator=gen, dtype=torch.float64)
    Y = X @ A.T + noise * torch.randn(n + n_test, k, generator=gen, dtype=torch.float64)
    return Dataset("teacher_regression", (X[:n].to(dtype), Y[:n].to(dtype)), (X[n:].to(dtype), Y[n:].to(dtype)),
                   None, (d,), "regression", {"teacher": A.to(dtype), "noise": noise})


def powerlaw_features(nu: float = 1.5, kappa: float = 1.0, d: int = 256, n: int = 1024, n_test: int = 1024,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> Dataset:
    """Gaussian features with a power-law spectrum and power-law target (Velikanov et al. 2023 eq. (25), its generator).

    Population feature covariance ``Sigma = Q diag(lambda) Q^T`` with ``lambda_k = k^(-nu)`` (``Lambda = 1``) and a
    random orthogonal ``Q`` (``k = 1..d``); the target is linear, ``y = x . w*``, with per-mode moments
    ``c_k = lambda_k (q_k . w*)^2 = k^(-(kappa+1)) / sum_l l^(-(kappa+1))`` (so ``sum_{l>=k} c_l ~ K k^(-kappa)``,
    ``sum c = 1``). Inputs ``x = Q diag(sqrt(lambda)) z``, ``z ~ N(0, I_d)``; targets of shape ``(n, 1)``.
    ``meta`` holds ``eigenvalues``, ``c`` (numpy) and ``teacher`` ``w*``. Needs ``nu > 0`` and ``kappa > 0``.
    """
    if not (isinstance(nu, (int, float)) and nu > 0):
        raise ValueError(f"nu={nu!r} must be > 0 (eigenvalue decay exponent)")
    if not (isinstance(kappa, (int, float)) and kappa > 0):
        raise ValueError(f"kappa={kappa!r} must be > 0: otherwise the target norm sum_k c_k diverges")
    d, n, n_test = _check_int(d, "d"), _check_int(n, "n"), _check_int(n_test, "n_test")
    rng = np.random.default_rng(seed)
    k = np.arange(1, d + 1, dtype=np.float64)
    lam = k ** (-float(nu))
    c = k ** (-(float(kappa) + 1.0))
    c /= c.sum()
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    Q *= np.sign(np.diag(R))
    signs = rng.choice([-1.0, 1.0], size=d)
    w = Q @ (signs * np.sqrt(c / lam))
    Z = rng.standard_normal((n + n_test, d))
    X = (Z * np.sqrt(lam)) @ Q.T
    y = X @ w
    Xt, yt = torch.as_tensor(X, dtype=dtype), torch.as_tensor(y[:, None], dtype=dtype)
    return Dataset("powerlaw_features", (Xt[:n], yt[:n]), (Xt[n:], yt[n:]), None, (d,), "regression",
                   {"eigenvalues": lam, "c": c, "nu": float(nu), "kappa": float(kappa),
                    "teacher": torch.as_tensor(w, dtype=dtype), "eigenvectors": Q})


# ---------------------------------------------------------------------------------------------- registry
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "fortunes": fortunes,
    "random_labels": random_labels,
    "teacher_regression": teacher_regression,
    "powerlaw_features": powerlaw_features,
}


def load_dataset(spec_or_name: str | tuple[str, dict[str, Any]], **kw: Any) -> Dataset:
    """Load by name or spec: ``load_dataset("digits")``, ``load_dataset("fashion_mnist:n_train=2000", seed=1)``.

    Keyword arguments override the spec's. For ``random_labels`` the key ``base`` names the base dataset
    (``"random_labels:base=fashion_mnist,n_train=1000"``). Unknown names or arguments raise ``ValueError``.
    """
    if isinstance(spec_or_name, tuple):
        name, kwargs = spec_or_name[0], dict(spec_or_name[1])
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    else:
        name, kwargs = parse_spec(spec_or_name, DATASETS, "dataset")
    kwargs.update(kw)
    from optiscope.utils.config import reject_non_finite

    reject_non_finite(kwargs, f"dataset {name!r}")
    if name == "random_labels" and "base" in kwargs:
        kwargs["dataset"] = kwargs.pop("base")
    try:
        return DATASETS[name](**kwargs)
    except TypeError as e:
        import inspect

        valid = [p for p in inspect.signature(DATASETS[name]).parameters if p != "base_kwargs"]
        raise ValueError(f"bad arguments for dataset {name!r}: {e}; valid: {valid}") from None


# ------------------------------------------------------------------------------------------------ batches
def batch_iterator(X: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                   drop_last: bool = False, epochs: int | None = 1, steps: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic mini-batches ``(X[idx], y[idx])``: each epoch is a fresh seeded permutation (without
    replacement within an epoch, as Velikanov et al. 2023's sampling).

    The permutation of epoch ``e`` comes from ``torch.Generator().manual_seed(seed)`` drawn ``e`` times, so the
    sequence depends only on ``(len(X), batch_size, seed)``. ``steps`` (if given) stops after that many batches,
    running as many epochs as needed (``epochs`` is then ignored); otherwise ``epochs`` full passes.
    ``batch_size`` larger than the data is clipped to one full batch.
    """
    n = len(X)
    if len(y) != n:
        raise ValueError(f"X has {n} samples but y has {len(y)}")
    if n == 0:
        raise ValueError("cannot iterate over an empty dataset")
    batch_size = min(_check_int(batch_size, "batch_size"), n)
    if steps is not None:
        steps = _check_int(steps, "steps", minimum=0)
    elif epochs is not None:
        _check_int(epochs, "epochs", minimum=0)
    gen = torch.Generator().manual_seed(int(seed))
    produced, epoch = 0, 0
    while True:
        if steps is None and epochs is not None and epoch >= epochs:
            return
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            if steps is not None and produced >= steps:
                return
            idx = order[start:start + batch_size]
            yield X[idx], y[idx]
            produced += 1
        epoch += 1
        if steps is not None and produced >= steps:
            return


# -------------------------------------------------------------------------------------------------- losses
class HalfMSELoss(nn.Module):
    """``0.5 * mean_i ||f(x_i) - y_i||^2``: the square loss of Jiang et al. 2023 / Velikanov et al. 2023 (sum over outputs, mean over
    samples). A 1-D target is compared with a ``(n, 1)`` output column-wise."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1 and outputs.ndim == 2 and outputs.shape[1] == 1:
            targets = targets[:, None]
        if outputs.shape != targets.shape:
            raise ValueError(f"HalfMSELoss: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ")
        return 0.5 * (outputs - targets).pow(2).reshape(len(outputs), -1).sum(1).mean()


class SequenceCrossEntropy(nn.Module):
    """Mean next-token cross-entropy over all positions: logits ``(B, T, V)``, targets ``(B, T)``."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 3 or targets.shape != logits.shape[:2]:
            raise ValueError(f"SequenceCrossEntropy: expected logits (B, T, V) and targets (B, T), got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def default_loss(dataset: Dataset | str) -> nn.Module:
    """The loss a dataset is trained with: cross-entropy (classification), :class:`SequenceCrossEntropy` (lm),
    :class:`HalfMSELoss` (regression). Each returns the mean over samples, as the curvature layer expects."""
    task = dataset.task if isinstance(dataset, Dataset) else load_dataset(dataset).task
    if task == "classification":
        return nn.CrossEntropyLoss()
    if task == "lm":
        return SequenceCrossEntropy()
    return HalfMSELoss()
