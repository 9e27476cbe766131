"""Probes: pure measurements taken by a Run at checkpoints (docs/architecture.md).

A probe is any callable ``probe(problem, state) -> dict``. The dict maps a metric name to

- a float (a global value, stored with ``layer=""``),
- a ``{layer: float}`` dict (per-layer values), or
- a numpy array / tensor (stored in ``arrays/<run>_<metric>.npz``, one entry per checkpoint).

``state`` is a :class:`ProbeState`. Probes never change parameters, optimizer state, the training generator, the
global RNG or BatchNorm running statistics; the Run additionally calls them under :func:`probe_guard`, which
restores all of these, so even a careless user probe cannot perturb training.

Built-in probes (``PROBES``; ``make_probe(name, **kw)``; ``make_probes(["r_med:per_layer=100", ...])``):

============== ==============================================================================================
loss           training loss (full training set, or the probe batch) and eval loss
accuracy       training / eval accuracy (classification and lm tasks)
grad_norm      gradient 2-norm and 1-norm on the probe batch, total and per layer
one_norm       perturbed one-norm ``sum_i sqrt(g_i^2 + eps)`` (Cattaneo et al. 2024, §2, Eq. 3), eps from the optimizer
r_med          per-layer R_med on exact sampled Hessian diagonal entries (Jiang et al. 2023, §3.2, Eq. 1)
diag_dominance diagonal dominance of the sampled Hessian block (Jiang et al. 2023, App. E)
sharpness      top Hessian eigenvalue, Lanczos warm-started from the previous checkpoint's vectors
trace          Hessian trace (adaptive Hutchinson / XTrace)
precond_sharpness  top eigenvalue of P^-1/2 H P^-1/2, P the optimizer's diagonal preconditioner (Cohen et al. 2022)
weight_spectrum    singular values, effective rank and R_u per 2-D layer (Jiang et al. 2023, §6)
adam_alignment Hessian diagonal vs |gradient| and |adaptive update| on the sampled coordinates (Jiang et al. 2023, §4.3)
update_norm    norm of the last update and of the weights, per layer
adam_correction    registered lazily from ``optiscope.lab.adam_correction_probe`` (Cattaneo et al. 2024)
============== ==============================================================================================
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from optiscope.utils.spec import SpecError, parse_spec, split_top_level

ProbeFn = Callable[[Any, "ProbeState"], dict]

#: the r_med probe warns when at least this fraction of a layer's sampled diagonal entries is exactly 0
ZERO_DIAGONAL_WARN_FRACTION = 0.1


class ProbeWarning(UserWarning):
    """A measurement is valid but easy to misread (the message names the trap and what was recorded)."""


# ----------------------------------------------------------------------------------------------------------------
# state and guard
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeState:
    """What a probe sees at a checkpoint.

    ``cache`` is a per-run dict that is saved in checkpoints (sampled coordinates, previous Lanczos vectors);
    ``scratch`` is shared by the probes of one checkpoint only (the Hessian diagonal, the probe-batch gradient).
    ``last_update`` maps parameter names to the change made by the last optimizer step (None at step 0).
    """

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    problem: Any
    run_name: str = "run"
    seed: int = 0
    cache: dict = field(default_factory=dict)
    last_update: dict[str, torch.Tensor] | None = None
    scratch: dict = field(default_factory=dict)

    def hessian(self):
        """The ``curvature.Hessian`` of the problem's loss on ``problem.probe_batch`` at the current parameters."""
        if "hessian" not in self.scratch:
            from optiscope.curvature import Hessian

            self.scratch["hessian"] = Hessian(self.model, self.problem.loss_fn, self.problem.probe_batch)
        return self.scratch["hessian"]

    def gradient(self) -> dict[str, torch.Tensor]:
        """Gradient of the mean loss on the probe batch (``torch.autograd.grad``; ``.grad`` is not touched)."""
        if "gradient" not in self.scratch:
            names = self.problem.param_names
            params = dict(self.model.named_parameters())
            batches = _probe_batches(self.problem)
            total = sum(len(y) for _, y in batches)
            with torch.enable_grad():
                loss = sum(self.problem.loss_fn(pure_forward(self.model, X), y) * (len(y) / total)
                           for X, y in batches)
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            self.scratch["gradient"] = {n: (torch.zeros_like(params[n]) if g is None else g.detach())
                                        for n, g in zip(names, grads)}
            self.scratch["probe_loss"] = float(loss.detach())
        return self.scratch["gradient"]

    def params(self) -> dict[str, torch.Tensor]:
        """The model's current parameters by name, detached (the problem's ``param_names`` only)."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.problem.param_names}

    def coordinates(self, per_layer: int = 200, params: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Sampled flat coordinates per parameter (all of them, or those in ``params``), drawn once per run and
        reused at every checkpoint."""
        key = f"coords_{per_layer}" if params is None else f"coords_{per_layer}_{','.join(params)}"
        if key not in self.cache:
            self.cache[key] = self.hessian().sample_coordinates(per_layer=per_layer, seed=self.seed, layers=params)
        return self.cache[key]

    def hessian_diagonal(self, per_layer: int = 200, params: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Exact Hessian diagonal entries on :meth:`coordinates` (one HVP per coordinate, shared by probes)."""
        key = f"diag_{per_layer}" if params is None else f"diag_{per_layer}_{','.join(params)}"
        if key not in self.scratch:
            res = self.hessian().diagonal(self.coordinates(per_layer, params))
            self.scratch[key] = {n: v.detach() for n, v in res.values.items()}
            self.scratch[key + "_n_hvp"] = int(res.n_hvp)
        return self.scratch[key]

    def preconditioner(self) -> dict[str, torch.Tensor] | None:
        """The optimizer's current diagonal preconditioner P by parameter name, or None (non-adaptive); see
        :func:`optiscope.lab.conventions.diagonal_preconditioner`."""
        from optiscope.lab.conventions import diagonal_preconditioner

        opt = self.optimizer
        pre = diagonal_preconditioner(opt)  # optiscope's exact optimizers and torch.optim's Adam/RMSprop/Adagrad
        if pre is None:
            return None
        plist = [p for g in opt.param_groups for p in g["params"]]
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for p, P in zip(plist, pre):
            if P is not None and id(p) in by_id:
                out[by_id[id(p)]] = P.detach()
        return out or None


@contextlib.contextmanager
def probe_guard(model: nn.Module) -> Iterator[None]:
    """Run probes without side effects: parameters, buffers (BatchNorm running stats), the ``training`` flags,
    ``.grad`` and the global torch RNG are restored on exit."""
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in model.state_dict(keep_vars=True).items():
                    if k in saved and v is not None:
                        v.copy_(saved[k])
            for n, p in model.named_parameters():
                p.grad = grads.get(n)
            for n, m in model.named_modules():
                m.training = modes.get(n, m.training)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def pure_forward(model: nn.Module, X: Any) -> Any:
    """``model(X)`` in the model's current mode without side effects: buffers (BatchNorm running statistics) are
    replaced by copies through ``torch.func.functional_call`` and the global RNG (dropout) is forked. ``X`` may be a
    tensor, a tuple of tensors (``model(*X)``) or a dict of tensors (``model(**X)``)."""
    from optiscope.lab.problem import call_args

    args, kwargs = call_args(X)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        if not buffers:
            return model(*args, **kwargs)
        return torch.func.functional_call(model, buffers, args, kwargs, strict=False)


def _probe_batches(problem) -> list:
    """The problem's probe data as a list of ``(inputs, targets)`` batches."""
    pb = getattr(problem, "probe_batches", None)
    return list(pb) if pb is not None else [problem.probe_batch]


def _logits(out: Any) -> Any:
    """The prediction tensor of a model output: the output itself, or its ``.logits`` (e.g. Hugging Face outputs)."""
    return getattr(out, "logits", out)


def _by_layer(problem, per_param: Mapping[str, float], reduce: str = "sum") -> dict[str, float]:
    out = {}
    for lname, pnames in problem.layers.items():
        vals = [per_param[p] for p in pnames if p in per_param]
        if vals:
            out[lname] = float(sum(vals)) if reduce == "sum" else float(max(vals))
    return out


def _concat_by_layer(problem, per_param: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for lname, pnames in problem.layers.items():
        parts = [per_param[p].reshape(-1) for p in pnames if p in per_param and per_param[p].numel() > 0]
        if parts:
            out[lname] = torch.cat(parts)
    return out


@torch.no_grad()
def _mean_loss_and_acc(problem, model, X, y, chunk: int = 4096, want_acc: bool = False) -> tuple[float, float | None]:
    from optiscope.lab.problem import select

    total, correct, count = 0.0, 0.0, 0
    for i in range(0, len(y), chunk):
        xb, yb = select(X, slice(i, i + chunk)), y[i:i + chunk]
        out = pure_forward(model, xb)
        n = len(xb)
        total += float(problem.loss_fn(out, yb)) * n
        count += n
        if want_acc:
            pred = _logits(out).argmax(dim=-1)
            correct += float((pred == yb).float().mean()) * n
    return total / count, (correct / count if want_acc else None)


def _mean_over(problem, model, batches, want_acc: bool = False) -> tuple[float, float | None]:
    """Sample-weighted mean loss (and accuracy) over several ``(inputs, targets)`` batches."""
    total = sum(len(y) for _, y in batches)
    loss, acc = 0.0, 0.0
    for X, y in batches:
        lo, ac = _mean_loss_and_acc(problem, model, X, y, want_acc=want_acc)
        loss += lo * len(y) / total
        acc += (ac or 0.0) * len(y) / total
    return loss, (acc if want_acc else None)


# ----------------------------------------------------------------------------------------------------------------
# built-in probes
# ----------------------------------------------------------------------------------------------------------------
class Probe(abc.ABC):
    """Base class: ``name`` and ``__call__(problem, state) -> dict`` (subclasses implement the measurement)."""

    name = "probe"

    @abc.abstractmethod
    def __call__(self, problem, state: ProbeState) -> dict:
        """The measurement: metric name -> float, or -> {layer: float}, or an array."""

    def __repr__(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}" + (f":{kw}" if kw else "")


class LossProbe(Probe):
    """``loss``: mean training loss (``on="train"``: the whole training set; ``"probe"``: the probe batch) and the
    mean eval loss when the problem has an eval set."""

    name = "loss"

    def __init__(self, on: str = "train"):
        if on not in ("train", "probe"):
            raise ValueError(f"loss probe: on={on!r} is invalid; valid: train, probe")
        self.on = on

    def __call__(self, problem, state):
        out = {"loss": _mean_over(problem, state.model, [problem.train] if self.on == "train"
                                  else _probe_batches(problem))[0]}
        if problem.eval is not None:
            out["eval_loss"] = _mean_loss_and_acc(problem, state.model, *problem.eval)[0]
        return out


class AccuracyProbe(Probe):
    """``accuracy``: fraction of argmax predictions equal to the target (train and eval)."""

    name = "accuracy"

    def __init__(self, on: str = "train"):
        if on not in ("train", "probe"):
            raise ValueError(f"accuracy probe: on={on!r} is invalid; valid: train, probe")
        self.on = on

    def __call__(self, problem, state):
        if problem.task == "regression":
            return {}
        out = {"accuracy": _mean_over(problem, state.model, [problem.train] if self.on == "train"
                                      else _probe_batches(problem), want_acc=True)[1]}
        if problem.eval is not None:
            out["eval_accuracy"] = _mean_loss_and_acc(problem, state.model, *problem.eval, want_acc=True)[1]
        return out


class GradNormProbe(Probe):
    """``grad_norm``: ``||g||_2`` and ``||g||_1`` of the probe-batch gradient g, total and per layer."""

    name = "grad_norm"

    def __call__(self, problem, state):
        g = state.gradient()
        sq = {n: float(v.double().pow(2).sum()) for n, v in g.items()}
        l1 = {n: float(v.double().abs().sum()) for n, v in g.items()}
        per2 = {k: math.sqrt(v) for k, v in _by_layer(problem, sq).items()}
        return {"grad_norm": math.sqrt(sum(sq.values())), "grad_norm_1": sum(l1.values()),
                "grad_norm_layer": per2, "grad_norm_1_layer": _by_layer(problem, l1)}


class OneNormProbe(Probe):
    """``one_norm``: the perturbed one-norm ``||g||_{1,eps} = sum_i sqrt(g_i^2 + eps)`` of the probe-batch gradient
    (Cattaneo et al. 2024, §2, Eq. 3). ``eps``: the ``eps`` option if given, else ``optimizer.perturbation_eps``, else
    1e-8 (Adam's default with eps inside the square root). The eps used is recorded as ``one_norm_eps``."""

    name = "one_norm"

    def __init__(self, eps: float | None = None):
        if eps is not None and not (eps >= 0):
            raise ValueError(f"one_norm probe: eps={eps!r} must be >= 0")
        self.eps = eps

    def __call__(self, problem, state):
        from optiscope.metrics import perturbed_one_norm

        eps = self.eps
        if eps is None:
            eps = getattr(state.optimizer, "perturbation_eps", None)
        if eps is None:
            eps = 1e-8
        g = state.gradient()
        per = {n: float(perturbed_one_norm(v, eps)) for n, v in g.items()}
        return {"one_norm": sum(per.values()), "one_norm_layer": _by_layer(problem, per), "one_norm_eps": float(eps)}


def weight_matrix_params(model: nn.Module) -> list[str]:
    """Names of trainable parameters with >= 2 dimensions (weight matrices, embeddings, conv kernels), in order."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]


class RMedProbe(Probe):
    """``r_med``: per layer, ``R_med = max_i h_i / (median_i h_i + delta)`` over ``per_layer`` sampled exact
    Hessian diagonal entries ``h_i = e_i^T H e_i`` (Jiang et al. 2023, §3.2, Eq. 1). The coordinates are sampled once
    per run (seed from the run) and reused at every checkpoint. Also records ``r_med_nonpositive`` (count of
    h_i <= 0), ``r_med_zeros`` (exact zeros, left out of max and median: ``metrics.r_med``; a layer with at least
    ``ZERO_DIAGONAL_WARN_FRACTION`` of them, or without a defined ratio (recorded as NaN), gets one
    :class:`ProbeWarning`), the HVPs spent (``r_med_n_hvp``) and, with ``record_seconds=True``, the wall time
    (``r_med_seconds``; off by default since a timing would make a resumed run's metrics differ from an
    uninterrupted one).

    ``params`` restricts the measurement (and its cost) to some parameter tensors: ``"weights"`` (default: tensors
    with >= 2 dimensions: weight matrices, embeddings, conv kernels; Jiang et al. 2023 report R_med of weight
    matrices), ``None`` (all trainable ones) or a list of names. ``delta`` is the paper's extra denominator term for
    random targets (§4.2;
    its value is not in the paper). The shared initialization of compared runs (step 0, identical parameters,
    same probe batch and coordinates) is measured once and reused.
    """

    name = "r_med"

    def __init__(self, per_layer: int = 200, delta: float = 0.0, save_diagonal: bool = False,
                 params: str | Sequence[str] | None = "weights", record_seconds: bool = False):
        if int(per_layer) < 1:
            raise ValueError(f"r_med probe: per_layer={per_layer!r} must be >= 1")
        if not delta >= 0:
            raise ValueError(f"r_med probe: delta={delta!r} must be >= 0")
        if isinstance(params, str) and params != "weights":
            raise ValueError(f"r_med probe: params={params!r}; allowed: None, 'weights' or a list of parameter names")
        self.per_layer, self.delta, self.save_diagonal = int(per_layer), float(delta), bool(save_diagonal)
        self.params = params if params is None or isinstance(params, str) else list(params)
        self.record_seconds = bool(record_seconds)
        self._step0: dict[str, dict[str, Any]] = {}
        self._warned: set[str] = set()

    def _names(self, problem, state) -> list[str] | None:
        if self.params is None:
            return None
        names = weight_matrix_params(state.model) if self.params == "weights" else self.params
        unknown = [n for n in names if n not in problem.param_names]
        if unknown:
            raise ValueError(f"r_med probe: unknown parameter(s) {unknown}; valid: {problem.param_names}")
        return names

    @staticmethod
    def _fingerprint(problem, state, names, per_layer) -> str:
        h = hashlib.sha1()
        for n, p in state.params().items():
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        from optiscope.lab.problem import tensor_leaves

        for t in tensor_leaves(_probe_batches(problem)):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr((names, per_layer, state.seed)).encode())
        return h.hexdigest()

    def __call__(self, problem, state):
        names = self._names(problem, state)
        if state.step != 0:
            return self._measure(problem, state, names)
        key = self._fingerprint(problem, state, names, self.per_layer)
        if key not in self._step0:
            self._step0[key] = self._measure(problem, state, names)
        else:  # same coordinates for the rest of this run as for the run that measured the shared init
            state.coordinates(self.per_layer, names)
        return dict(self._step0[key])

    def _warn_zeros(self, layer: str, res, n: int) -> None:
        """Warn once per layer when many sampled diagonal entries are exactly 0, or R_med is undefined."""
        if layer in self._warned or not (res.n_zero >= ZERO_DIAGONAL_WARN_FRACTION * n or not res.defined):
            return
        self._warned.add(layer)
        what = (f"R_med is undefined ({res.reason}) and recorded as NaN" if not res.defined else
                f"R_med is taken over the {res.n} nonzero entries (r_med_zeros records the count)")
        zeros = ""
        if res.n_zero >= ZERO_DIAGONAL_WARN_FRACTION * n:
            zeros = (f"{res.n_zero} of {n} sampled Hessian diagonal entries are exactly 0 (parameters the loss does "
                     "not depend on here, e.g. embedding rows of tokens absent from the probe data or weights into "
                     "dead units); ")
        warnings.warn(f"r_med: layer {layer!r}: {zeros}{what}", ProbeWarning, stacklevel=3)

    def _measure(self, problem, state, names):
        from optiscope.metrics import r_med

        t0 = time.perf_counter()
        per_param = state.hessian_diagonal(self.per_layer, names)
        diag = _concat_by_layer(problem, per_param)
        vals, nonpos, zeros = {}, {}, {}
        for lname, h in diag.items():
            res = r_med(h, delta=self.delta)
            vals[lname] = float(res.value)
            nonpos[lname] = float(res.n_nonpositive)
            zeros[lname] = float(res.n_zero)
            self._warn_zeros(lname, res, int(h.numel()))
        tag = f"diag_{self.per_layer}" if names is None else f"diag_{self.per_layer}_{','.join(names)}"
        out: dict[str, Any] = {"r_med": vals, "r_med_nonpositive": nonpos, "r_med_zeros": zeros,
                               "r_med_n_hvp": float(state.scratch.get(tag + "_n_hvp", 0))}
        if self.record_seconds:
            out["r_med_seconds"] = time.perf_counter() - t0
        if self.save_diagonal:
            out["hessian_diagonal"] = torch.cat([h.reshape(-1) for h in diag.values()]).double().cpu().numpy()
        return out


class DiagDominanceProbe(Probe):
    """``diag_dominance``: diagonal dominance of the sampled Hessian block ``H[I, I]`` (Jiang et al. 2023, App. E, Eq. 40;
    ``metrics.diagonal_dominance``): the median over sampled coordinates i of ``sum_{j != i} |H_ij| / |H_ii|``
    (smaller = more diagonal), over all layers together (``per_layer`` coordinates per parameter tensor; also the
    mean and the mass ratio) and the median within each layer (``diag_dominance_layer``)."""

    name = "diag_dominance"

    def __init__(self, per_layer: int = 50):
        if int(per_layer) < 2:
            raise ValueError(f"diag_dominance probe: per_layer={per_layer!r} must be >= 2")
        self.per_layer = int(per_layer)

    def __call__(self, problem, state):
        from optiscope.metrics import diagonal_dominance

        coords = state.coordinates(self.per_layer)
        block = state.hessian().diagonal_block(coords)
        M = block.matrix
        dd = diagonal_dominance(M)
        out: dict[str, Any] = {"diag_dominance": float(dd.median), "diag_dominance_mean": float(dd.mean),
                               "diag_dominance_mass": float(dd.mass), "diag_dominance_n_hvp": float(block.n_hvp)}
        per = {}
        for lname, pnames in problem.layers.items():
            parts = [torch.arange(M.shape[0])[block.index[p]] for p in pnames if p in block.index]
            idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            if len(idx) >= 2:
                per[lname] = float(diagonal_dominance(M[idx][:, idx]).median)
        out["diag_dominance_layer"] = per
        return out


def _scalar(x) -> float:
    if hasattr(x, "value"):
        return float(x.value)
    return float(x)


class SharpnessProbe(Probe):
    """``sharpness``: the top ``k`` Hessian eigenvalues (``which="LA"``) by Lanczos, warm-started from the previous
    checkpoint's leading eigenvector (kept in the run's probe cache, so resumed runs warm-start identically)."""

    name = "sharpness"

    def __init__(self, k: int = 1, tol: float = 1e-4, max_iter: int = 100, warm_start: bool = True):
        if int(k) < 1:
            raise ValueError(f"sharpness probe: k={k!r} must be >= 1")
        self.k, self.tol, self.max_iter, self.warm_start = int(k), float(tol), int(max_iter), bool(warm_start)

    def __call__(self, problem, state):
        H = state.hessian()
        v0 = state.cache.get("sharpness_v0") if self.warm_start else None
        res = H.eigenvalues(k=self.k, which="LA", tol=self.tol, max_iter=self.max_iter, v0=v0)
        if self.warm_start and len(res.vectors):
            state.cache["sharpness_v0"] = {n: t.detach().clone() for n, t in res.vectors[0].items()}
        vals = np.asarray(res.values, dtype=float)
        out: dict[str, Any] = {"sharpness": float(vals[0]), "sharpness_n_hvp": float(res.n_hvp)}
        for i in range(1, len(vals)):
            out[f"eigenvalue_{i + 1}"] = float(vals[i])
        return out


class TraceProbe(Probe):
    """``trace``: ``tr H`` with ``n_probes`` Hessian-vector products (seeded from the run) by ``method`` (default:
    ``Hessian.trace``'s, the adaptive Hutchinson-or-XTrace estimator; ``"hutch++"``, ``"hutchinson"``, ``"xtrace"``)."""

    name = "trace"

    def __init__(self, n_probes: int = 30, method: str = "adaptive"):
        if int(n_probes) < 3:
            raise ValueError(f"trace probe: n_probes={n_probes!r} must be >= 3")
        self.n_probes, self.method = int(n_probes), method

    def __call__(self, problem, state):
        res = state.hessian().trace(n_probes=self.n_probes, method=self.method, seed=state.seed + state.step)
        return {"trace": float(res.value), "trace_n_hvp": float(res.n_hvp)}


class PrecondSharpnessProbe(Probe):
    """``precond_sharpness``: ``lambda_max(P^{-1/2} H P^{-1/2})`` with P the optimizer's current diagonal
    preconditioner (``optimizer.diagonal_preconditioner()``; update = lr * m / P). For Adam this is the quantity
    whose value 2(1+beta1)/((1-beta1) lr) marks the adaptive edge of stability (Cohen et al. 2022, cited in seed
    001). Returns nothing for non-adaptive optimizers (or at step 0, before P is defined). Warm-started like
    ``sharpness``; also records ``precond_sharpness_threshold`` = 2(1+beta1)/((1-beta1) lr) when the optimizer has
    ``betas`` (38/lr for beta1 = 0.9)."""

    name = "precond_sharpness"

    def __init__(self, tol: float = 1e-4, max_iter: int = 100):
        self.tol, self.max_iter = float(tol), int(max_iter)

    def __call__(self, problem, state):
        if state.optimizer is None or len(state.optimizer.state) == 0:
            return {}  # before the first update the preconditioner is not defined yet
        P = state.preconditioner()
        if P is None:
            return {}
        H = state.hessian()
        full = {n: P[n] if n in P else torch.ones_like(p) for n, p in state.params().items()}
        if any(bool((v <= 0).any()) for v in full.values()):
            return {}
        v0 = state.cache.get("precond_v0")
        res = H.eigenvalues(k=1, which="LA", tol=self.tol, max_iter=self.max_iter, v0=v0, preconditioner=full)
        if len(res.vectors):
            state.cache["precond_v0"] = {n: t.detach().clone() for n, t in res.vectors[0].items()}
        out = {"precond_sharpness": float(np.asarray(res.values)[0]), "precond_sharpness_n_hvp": float(res.n_hvp)}
        g0 = state.optimizer.param_groups[0]
        if "betas" in g0 and g0.get("lr", 0) > 0:
            from optiscope.theory.adam import adaptive_edge_of_stability

            out["precond_sharpness_threshold"] = adaptive_edge_of_stability(float(g0["lr"]), float(g0["betas"][0]))
        return out


class WeightSpectrumProbe(Probe):
    """``weight_spectrum``: per 2-D (or higher, flattened to ``[out, -1]``) parameter: singular values (saved as an
    array), effective rank ``erank`` (Roy & Vetterli) and singular-vector uniformity ``r_u`` (Jiang et al. 2023, §6 (B))."""

    name = "weight_spectrum"

    def __init__(self, save_singular_values: bool = True):
        self.save_singular_values = bool(save_singular_values)

    def __call__(self, problem, state):
        from optiscope.metrics import effective_rank, singular_vector_uniformity

        er, ru, out = {}, {}, {}
        for n, p in state.params().items():
            if p.ndim < 2:
                continue
            W = p.reshape(p.shape[0], -1)
            er[n] = float(_scalar(effective_rank(W)))
            ru[n] = float(_scalar(singular_vector_uniformity(W)))
            if self.save_singular_values:
                out[f"singular_values.{n}"] = torch.linalg.svdvals(W.double()).cpu().numpy()
        out.update({"erank": er, "r_u": ru})
        return out


class AdamAlignmentProbe(Probe):
    """``adam_alignment`` (Jiang et al. 2023, §4.3 and App. A.6): on the sampled coordinates I of each layer, the Spearman rank
    correlation between the Hessian diagonal ``h_i`` and

    - ``|g_i|`` (the true gradient on the probe batch): ``align_grad``,
    - ``|Delta theta_i| / lr`` (the "adaptive gradient" actually applied by the last step): ``align_update``,
    - ``P_i`` (the optimizer's diagonal preconditioner, adaptive optimizers only): ``align_precond``.

    The paper states that h_i aligns with |g_i| while Adam's adaptive gradient is nearly uniform and does not align;
    the paper does not print the exact statistic, so the default reading is the rank correlation above (Spearman is
    scale-free, so the lr does not matter). Also records ``adaptive_gradient_uniformity`` = max/median of
    ``|Delta theta_i|`` on I (the update's analogue of R_med).
    """

    name = "adam_alignment"

    def __init__(self, per_layer: int = 200):
        self.per_layer = int(per_layer)

    def __call__(self, problem, state):
        from scipy.stats import spearmanr

        coords = state.coordinates(self.per_layer)
        diag = state.hessian_diagonal(self.per_layer)
        g = state.gradient()
        P = state.preconditioner()
        upd = state.last_update

        def pick(src):
            return _concat_by_layer(problem, {n: src[n].reshape(-1)[coords[n]] for n in coords if n in src})

        H = _concat_by_layer(problem, diag)
        G = pick(g)
        out: dict[str, Any] = {}

        def corr(a, b):
            a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
            if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
                return float("nan")
            return float(spearmanr(a, b).statistic)

        out["align_grad"] = {k: corr(H[k], G[k].abs()) for k in H if k in G}
        if upd is not None:
            U = pick(upd)
            out["align_update"] = {k: corr(H[k], U[k].abs()) for k in H if k in U}
            out["adaptive_gradient_uniformity"] = {
                k: float(U[k].abs().max() / U[k].abs().median()) for k in U if float(U[k].abs().median()) > 0}
        if P is not None:
            PP = pick(P)
            out["align_precond"] = {k: corr(H[k], PP[k]) for k in H if k in PP}
        return out


class UpdateNormProbe(Probe):
    """``update_norm``: ``||theta_t - theta_{t-1}||_2`` of the last step and ``||theta_t||_2``, total and per layer."""

    name = "update_norm"

    def __call__(self, problem, state):
        w = {n: float(p.double().pow(2).sum()) for n, p in state.params().items()}
        out: dict[str, Any] = {"weight_norm": math.sqrt(sum(w.values())),
                               "weight_norm_layer": {k: math.sqrt(v) for k, v in _by_layer(problem, w).items()}}
        if state.last_update is not None:
            u = {n: float(d.double().pow(2).sum()) for n, d in state.last_update.items()}
            out["update_norm"] = math.sqrt(sum(u.values()))
            out["update_norm_layer"] = {k: math.sqrt(v) for k, v in _by_layer(problem, u).items()}
        return out


def _adam_correction_factory(**kw):
    """Lazy import: the probe lives in ``optiscope.lab.adam_correction_probe`` (Cattaneo et al. 2024)."""
    try:
        mod = importlib.import_module("optiscope.lab.adam_correction_probe")
    except ModuleNotFoundError as e:
        if e.name == "optiscope.lab.adam_correction_probe":
            raise ValueError("probe 'adam_correction' is not available: optiscope.lab.adam_correction_probe "
                             "is not installed yet") from None
        raise
    for attr in ("make_adam_correction_probe", "make_probe", "AdamCorrectionProbe", "adam_correction_probe"):
        fn = getattr(mod, attr, None)
        if fn is not None:
            return fn(**kw) if (kw or isinstance(fn, type) or attr.startswith("make")) else fn
    raise ValueError("optiscope.lab.adam_correction_probe defines no make_adam_correction_probe/AdamCorrectionProbe")


PROBES: dict[str, Callable[..., ProbeFn]] = {
    "loss": LossProbe,
    "accuracy": AccuracyProbe,
    "grad_norm": GradNormProbe,
    "one_norm": OneNormProbe,
    "r_med": RMedProbe,
    "diag_dominance": DiagDominanceProbe,
    "sharpness": SharpnessProbe,
    "trace": TraceProbe,
    "precond_sharpness": PrecondSharpnessProbe,
    "weight_spectrum": WeightSpectrumProbe,
    "adam_alignment": AdamAlignmentProbe,
    "update_norm": UpdateNormProbe,
    "adam_correction": _adam_correction_factory,
}


def make_probe(name: str, **kw: Any) -> ProbeFn:
    """Build the probe ``name`` with options ``kw``; unknown names or options raise ``ValueError``."""
    if name not in PROBES:
        raise ValueError(f"unknown probe {name!r}; valid: {', '.join(sorted(PROBES))}")
    try:
        return PROBES[name](**kw)
    except TypeError as e:
        raise ValueError(f"probe {name!r}: bad options {kw}: {e}") from None


def make_probes(items: Any) -> list[ProbeFn]:
    """Probes from a list of names, ``"name:key=value"`` specs, callables, or one comma-separated string of names."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [s for s in split_probe_specs(items) if s.strip()]
    out = []
    for it in items:
        if isinstance(it, str):
            try:
                name, kw = parse_spec(it, PROBES, "probe")
            except SpecError as e:
                raise ValueError(str(e)) from None
            out.append(make_probe(name, **kw))
        elif callable(it):
            out.append(it)
        else:
            raise ValueError(f"probe {it!r} is neither a probe name nor a callable probe(problem, state) -> dict")
    return out


def split_probe_specs(text: str) -> list[str]:
    """Split ``"loss,r_med:per_layer=100,delta=0.1,sharpness"`` into probe specs: commas outside ``[...]`` separate
    tokens, and a ``key=value`` token without a name continues the spec before it."""
    parts: list[str] = []
    cur = ""
    for t in split_top_level(text):
        if "=" in t and ":" not in t and cur:
            cur += "," + t
        else:
            if cur:
                parts.append(cur)
            cur = t
    if cur:
        parts.append(cur)
    return [p.strip() for p in parts]


def probe_name(probe: ProbeFn) -> str:
    """The name a probe's metrics are recorded under: its ``name`` attribute, else the function's name, else the
    class name."""
    return getattr(probe, "name", None) or getattr(probe, "__name__", None) or type(probe).__name__


# ----------------------------------------------------------------------------------------------------------------
# probe budget: HVPs per checkpoint and an ETA before a run
# ----------------------------------------------------------------------------------------------------------------
#: a run warns when its probes would take more than this multiple of its training time
PROBE_BUDGET_WARN_RATIO = 3.0


@dataclass
class ProbeBudget:
    """Cost of a run's probes, estimated before the run from one timed Hessian-vector product.

    ``hvps`` maps each probe to its HVPs per checkpoint (an upper bound for iterative probes: their ``max_iter``);
    ``seconds_per_hvp`` is one timed HVP on the probe batch, ``graph_seconds`` the one-time gradient graph per
    checkpoint; ``seconds_per_checkpoint = graph_seconds + total_hvps * seconds_per_hvp`` when any probe needs the
    Hessian. ``training_seconds`` is ``steps`` times one timed training gradient (forward and backward on a batch of
    ``batch_size``), when ``steps`` is given; ``ratio`` = probe time / training time."""
    hvps: dict[str, int]
    n_checkpoints: int
    seconds_per_hvp: float
    graph_seconds: float
    training_seconds: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def total_hvps(self) -> int:
        """HVPs per checkpoint over all probes."""
        return int(sum(self.hvps.values()))

    @property
    def seconds_per_checkpoint(self) -> float:
        """Estimated seconds of Hessian work per checkpoint."""
        return (self.graph_seconds if self.total_hvps else 0.0) + self.total_hvps * self.seconds_per_hvp

    @property
    def total_seconds(self) -> float:
        """Estimated seconds of Hessian work over the run."""
        return self.n_checkpoints * self.seconds_per_checkpoint

    @property
    def ratio(self) -> float | None:
        """Probe time / training time (None without a training estimate)."""
        if not self.training_seconds:
            return None
        return self.total_seconds / self.training_seconds

    @property
    def too_expensive(self) -> bool:
        """True when the probes would cost more than :data:`PROBE_BUDGET_WARN_RATIO` x the training time."""
        return self.ratio is not None and self.ratio > PROBE_BUDGET_WARN_RATIO

    def summary(self) -> str:
        """One line: HVPs per checkpoint (per probe), ETA, and the ratio to training."""
        per = ", ".join(f"{k} {v}" for k, v in self.hvps.items() if v) or "none"
        eta = _fmt_seconds(self.total_seconds)
        line = (f"probe budget: up to {self.total_hvps} HVPs per checkpoint ({per}) x {self.n_checkpoints} checkpoints; "
                f"{self.seconds_per_hvp * 1e3:.1f} ms per HVP -> ETA {eta} for probes")
        if self.ratio is not None:
            line += f" ({self.ratio:.0%} of the estimated training time {_fmt_seconds(self.training_seconds)})"
        if self.notes:
            line += "; " + "; ".join(self.notes)
        return line

    def warning(self) -> str | None:
        """The warning text when :attr:`too_expensive`, else None."""
        if not self.too_expensive:
            return None
        return (f"probes could cost up to {self.ratio:.1f}x the training time (> {PROBE_BUDGET_WARN_RATIO:g}x): "
                f"{self.total_hvps} HVPs per checkpoint at most (iterative probes counted at max_iter; warm-started "
                "Lanczos usually needs far fewer); probe less often (probe_every), sample fewer coordinates "
                "(r_med:per_layer=...), use a smaller probe batch, or lower max_iter")


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _coordinate_hvps(problem, model: nn.Module, per_layer: int, names: Sequence[str] | None,
                     structured: set[str]) -> int:
    """HVP columns for ``per_layer`` sampled coordinates of each parameter in ``names`` (all trainable if None),
    not counting parameters whose exact diagonal comes from second-order backpropagation (``structured``)."""
    named = dict(model.named_parameters())
    chosen = problem.param_names if names is None else [n for n in names if n in named]
    return int(sum(min(per_layer, named[n].numel()) for n in chosen if n not in structured))


def probe_hvps(probe: ProbeFn, problem, model: nn.Module | None = None, structured: set[str] | None = None) -> int:
    """Hessian-vector products one call of ``probe`` spends at a checkpoint (an upper bound for iterative probes).

    Known probes: ``r_med`` and ``adam_alignment`` (one HVP column per sampled coordinate of a parameter outside
    ``structured``), ``diag_dominance`` (one column per sampled coordinate of every parameter), ``sharpness`` and
    ``precond_sharpness`` (``max_iter``), ``trace`` (``n_probes``); other built-in probes use none. A user probe
    may declare ``n_hvp(problem) -> int``; otherwise it counts as 0."""
    model = model if model is not None else problem.model
    structured = structured or set()
    if hasattr(probe, "n_hvp") and callable(probe.n_hvp):
        return int(probe.n_hvp(problem))
    if isinstance(probe, RMedProbe):
        names = probe._names(problem, _BudgetState(model)) if probe.params is not None else None
        return _coordinate_hvps(problem, model, probe.per_layer, names, structured)
    if isinstance(probe, AdamAlignmentProbe):
        return _coordinate_hvps(problem, model, probe.per_layer, None, structured)
    if isinstance(probe, DiagDominanceProbe):
        return _coordinate_hvps(problem, model, probe.per_layer, None, set())
    if isinstance(probe, (SharpnessProbe, PrecondSharpnessProbe)):
        return int(probe.max_iter)
    if isinstance(probe, TraceProbe):
        return int(probe.n_probes)
    return 0


@dataclass
class _BudgetState:
    model: nn.Module


def probe_budget(probes: Any, problem, n_checkpoints: int = 1, steps: int | None = None,
                 batch_size: int | None = None, model: nn.Module | None = None) -> ProbeBudget:
    """Estimate the probes' cost before a run: HVPs per checkpoint (:func:`probe_hvps`), one timed HVP on the
    problem's probe batch (after building the gradient graph, whose time is ``graph_seconds``), and, with
    ``steps``, the training time from one timed gradient on ``batch_size`` samples. Pure: parameters, BatchNorm
    statistics and RNG are untouched (the Hessian is pure; the training gradient runs under :func:`probe_guard`
    with :func:`pure_forward`)."""
    from optiscope.curvature import Hessian

    probes = make_probes(probes)
    model = model if model is not None else problem.model
    with probe_guard(model):
        H = Hessian(model, problem.loss_fn, problem.probe_batch)
        structured: set[str] = set()
        notes = []
        try:
            from optiscope.curvature.diagonal import structured_plan

            structured = set(structured_plan(H)[0])
        except Exception:  # noqa: BLE001 - no structured diagonal for this model: every coordinate is an HVP
            structured = set()
        hvps: dict[str, int] = {}
        for p in probes:
            name = probe_name(p)
            hvps[name] = hvps.get(name, 0) + probe_hvps(p, problem, model, structured)
        if structured and any(isinstance(p, (RMedProbe, AdamAlignmentProbe)) for p in probes):
            notes.append(f"{len(structured)} parameter(s) get their exact diagonal by second-order "
                         "backpropagation (not counted as HVPs)")
        v = {n: torch.randn_like(p) for n, p in H.params.items()}
        t0 = time.perf_counter()
        H.hvp(v)  # builds the gradient graph
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        H.hvp(v)
        t_hvp = time.perf_counter() - t0
        H.release()
        train_s = None
        if steps:
            batches = _probe_batches(problem)
            X, y = batches[0]
            n = len(y)
            b = min(int(batch_size or n), n)
            from optiscope.lab.problem import select

            Xb, yb = select(X, slice(0, b)), y[:b]
            params = [p for p in model.parameters() if p.requires_grad]
            with torch.enable_grad():
                t0 = time.perf_counter()
                loss = problem.loss_fn(pure_forward(model, Xb), yb)
                torch.autograd.grad(loss, params, allow_unused=True)
                t_grad = time.perf_counter() - t0
            scale = (int(batch_size) / b) if batch_size and b < int(batch_size) else 1.0
            train_s = float(steps) * t_grad * scale
    return ProbeBudget(hvps, int(n_checkpoints), t_hvp, max(t_first - t_hvp, 0.0), train_s, notes)
