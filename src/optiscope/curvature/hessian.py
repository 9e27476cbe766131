"""The Hessian of a loss as a linear operator on parameter dicts.

``H = nabla^2 L(theta)`` with ``L(theta) = (1/N) sum_i loss_i(theta)`` the exact mean over all samples of the data
(each batch weighted by its size), or of any scalar function of a parameter dict (:meth:`Hessian.from_function`).
Every estimator is built on one primitive, the Hessian-vector product ``v -> H v``:

* default: autograd double backward. The gradient graph ``g = dL/dtheta`` (``create_graph=True``) is built once
  and kept between calls while it fits the memory budget; each HVP is one second backward pass
  ``H v = d<g, v>/dtheta`` (PyHessian's scheme, with the graph owned by the operator: see :class:`Hessian` for
  when it is dropped);
* where autograd cannot differentiate the loss twice, forward-over-reverse ``jvp(grad L)(theta; v)`` through
  :mod:`torch.func`, falling back to reverse-over-reverse ``vjp(grad L)(theta)(v)``; ``Hessian.hvp_mode``;
* batches of vectors in chunks whose size is chosen by timing (``Hessian.chunk_size``), never above a memory bound.

Estimators that work on any operator live in their own modules (:mod:`optiscope.curvature.trace`); the methods of
:class:`Hessian` are the front door. Every result reports ``n_hvp``, the number of Hessian-vector products (over
the full data) it used, so estimators are comparable by cost. ``Hessian.n_hvp`` counts all of them since
construction.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from optiscope.curvature._problem import LossFunction, NonFiniteLossError
from optiscope.curvature.diagonal import (
    DiagonalBlockResult,
    DiagonalResult,
    exact_diagonal,
    exact_diagonal_block,
    unit_columns,
)
from optiscope.curvature.trace import DEFAULT_TRACE_METHOD, TraceResult, trace_estimate
from optiscope.curvature.spectrum import lanczos as _lanczos
from optiscope.curvature.spectrum import lanczos_quadrature as _batched_lanczos_quadrature
from optiscope.curvature.spectrum import power_iteration as _power

__all__ = [
    "BlockNormResult",
    "DensityResult",
    "DiagonalBlockResult",
    "DiagonalEstimate",
    "DiagonalResult",
    "EigenResult",
    "Hessian",
    "TraceResult",
]

DEFAULT_DENSE_MAX_DIM = 6000


# ------------------------------------------------------------------------------------------------------------------
# results
# DiagonalResult and DiagonalBlockResult live in curvature.diagonal (imported above).
@dataclass
class DiagonalEstimate:
    """Hutchinson estimate of the full diagonal with per-entry standard errors."""
    mean: dict[str, Tensor]
    stderr: dict[str, Tensor]
    n_probes: int
    n_hvp: int


@dataclass
class EigenResult:
    """Extreme eigenpairs. ``values`` sorted by ``which``; ``residuals[i] = ||A y_i - lambda_i y_i||``."""
    values: np.ndarray
    vectors: list[dict[str, Tensor]]
    n_hvp: int
    converged: bool
    residuals: np.ndarray
    method: str
    which: str
    history: list[float] = field(default_factory=list)
    #: Lanczos only: the ``k`` wanted Ritz values after each step (the oracle stopping point can be read off it)
    ritz_history: list[np.ndarray] = field(default_factory=list)


@dataclass
class DensityResult:
    """Stochastic Lanczos quadrature. ``nodes``/``weights``: [n_probes, n_lanczos]; ``density`` on ``grid``."""
    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    n_hvp: int

    def moment(self, j: int) -> float:
        """SLQ estimate of ``tr(H^j) / n``: ``mean_probes sum_k weights_k nodes_k^j``."""
        return float(np.mean(np.sum(self.weights * self.nodes ** j, axis=1)))


@dataclass
class BlockNormResult:
    """Per pair of layers ``(a, b)`` the Frobenius norm ``||H_ab||_F`` (Orvieto et al. 2022, §4, Theorem 10)."""
    layers: list[str]
    frobenius: np.ndarray
    diagonal_total: float
    offdiagonal_total: float
    gershgorin: float
    exact: bool
    n_hvp: int
    gershgorin_entrywise: float | None = None
    frobenius_sq_stderr: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------------------------
def _rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    return (torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1).to(device)


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


_FWD_AD_HINTS = ("forward ad", "forward-mode", "forward mode", "jvp", "_fw_", "not implemented", "derivative for")


class Hessian:
    """Hessian of the mean loss of ``model`` on ``data`` as a linear operator on parameter dicts.

    Parameters
    ----------
    model : nn.Module
        Evaluated with :func:`torch.func.functional_call`; never modified (parameters, BatchNorm running statistics,
        global RNG are left exactly as they were). The Hessian is taken at a snapshot of the parameters made here.
    loss_fn : callable ``(outputs, targets) -> scalar Tensor``
        A mean loss over the batch (e.g. ``nn.CrossEntropyLoss()``).
    data : ``(inputs, targets)`` or an iterable of such batches
        ``L = sum_b (n_b / N) L_b``: the exact mean over all samples.
    params : list of parameter names, optional
        The subset to differentiate (the rest are held fixed). Default: all parameters that require grad.
    chunk_size : int, optional
        Fixed number of vectors per batched second backward in :meth:`hvp_batch`. Default (None): chosen by
        measured speed (see below), never above the memory bound.
    memory_budget_mb : float
        Memory allowed for the kept gradient graphs, and (separately) for one batched second backward.
    batch_mode : ``"double-backward"`` (default), ``"forward-over-reverse"`` or ``"reverse-over-reverse"``
        ``"double-backward"``: autograd builds the gradient graph ``g = dL/dtheta`` (``create_graph=True``) and each
        HVP is one second backward pass ``H v = d<g, v>/dtheta`` through it (batched over vectors with
        ``is_grads_batched``, or one vector at a time where an op has no batching rule). If autograd cannot
        differentiate the loss twice (a cut graph), it falls back to the torch.func modes for good
        (``graph_fallback_reason``). The torch.func modes rebuild the computation inside ``vmap`` for every chunk
        (forward-over-reverse: ``jvp`` of ``grad``; reverse-over-reverse: ``vjp`` of ``grad``). All are exact.
    keep_graph : bool or None
        ``None`` (default): keep the gradient graph of each batch of data between HVP calls while the graphs fit
        ``memory_budget_mb``; ``True``: keep all; ``False``: rebuild per call.
    device : str, int, torch.device or None
        ``None`` (default): the model's device, and the data must be on it. Otherwise a device that exists and
        holds the model; the data are moved to it. Vectors passed to :meth:`hvp` are moved to it.

    Graph reuse: when the graph is kept and when it is dropped
    ----------------------------------------------------------
    The gradient graph is built at the first HVP (:meth:`hvp`, :meth:`hvp_batch` or any estimator) for the
    batches of data, in data order, whose measured graph size (saved tensors of the forward pass and the first
    backward pass) fits in ``memory_budget_mb`` together with the batches before them; those graphs are kept, so
    every later HVP costs one second backward pass. Batches that do not fit are rebuilt for every call (a call of
    :meth:`hvp_batch` builds each once for all its vectors). The parameters are a snapshot, so a kept graph never
    goes stale. It is dropped by :meth:`release`, at the end of a ``with Hessian(...) as H:`` block, when autograd
    turns out unable to differentiate it twice (fallback to torch.func), or when the ``Hessian`` is garbage
    collected. After :meth:`release` the Hessian still works: the next HVP rebuilds the graph.

    Chunk size by measured speed
    ----------------------------
    With ``chunk_size=None`` the first :meth:`hvp_batch` calls time their own work: chunks of 1, 1, 2, 4, 8, ...
    vectors (up to the memory bound), each a real part of the requested product, until the time per vector stops
    improving (at least up to 8); the fastest size is then used and cached per model class, parameter shapes,
    data shapes, dtype, device and mode (``CHUNK_CACHE``), so the batched HVP is never slower per vector than the
    one-vector loop (size 1) by more than timing noise, and no HVP is spent on the measurement.
    """

    def __new__(cls, *args: Any, distributed: bool = False, process_group: Any = None, **kwargs: Any):
        """``Hessian(..., distributed=True)`` or ``Hessian(..., process_group=group)`` constructs a
        :class:`optiscope.curvature.distributed.DistributedHessian` (each rank's ``data`` is a shard of the whole);
        otherwise a single-process Hessian."""
        if cls is Hessian and (distributed or process_group is not None):
            from optiscope.curvature.distributed import DistributedHessian

            return super().__new__(DistributedHessian)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                 params: Iterable[str] | None = None, chunk_size: int | None = None,
                 memory_budget_mb: float = 512.0, batch_mode: str = "double-backward", *,
                 keep_graph: bool | None = None, device: Any = None, distributed: bool = False,
                 process_group: Any = None, _problem: LossFunction | None = None):
        if distributed or process_group is not None:  # a subclass other than DistributedHessian asked for it
            raise ValueError(f"{type(self).__name__} cannot be distributed; use Hessian(..., distributed=True)")
        problem = (_problem if _problem is not None
                   else LossFunction.from_model(model, loss_fn, data, params, device=device))
        self._init(problem, chunk_size, memory_budget_mb, batch_mode, keep_graph)
        self._name_model(model, problem, batch_mode)

    def _name_model(self, model: nn.Module | None, problem: LossFunction, batch_mode: str) -> None:
        self._module_of = {n: n.rsplit(".", 1)[0] if "." in n else n for n in self.param_names}
        if model is not None:
            self._cache_key = (type(model).__qualname__, tuple(tuple(s) for s in self.shapes.values()),
                               tuple(_shape_signature(b) for b in (problem.batches or [])), str(self.dtype),
                               str(self.device), batch_mode)

    @classmethod
    def _prevalidated(cls, model: nn.Module, problem: LossFunction) -> Hessian:
        """``Hessian(model, loss_fn, data)`` (default settings) for ``problem = LossFunction.from_model(model,
        loss_fn, data)``, without the validating forward pass: for a caller that has validated this model, loss and
        data before (a training loop's earlier checkpoint, with the same parameter names, shapes, dtypes, device
        and module modes) and knows that only the parameter values changed.

        What new values can change is only whether the loss is finite. The loss value, and that check (raising
        :class:`NonFiniteLossError`), come from the first gradient-graph build of a one-batch problem, which runs
        the same forward pass anyway; any other first use (``loss``, ``gradient``, the diagonal, the torch.func
        modes, several batches) evaluates :meth:`LossFunction.value` first, so failures are reported as by the
        constructor."""
        if cls is not Hessian:
            raise TypeError(f"{cls.__name__} has no unvalidated constructor")
        H = super().__new__(cls)
        H._init(problem, None, 512.0, "double-backward", None, validate=False)
        H._name_model(model, problem, "double-backward")
        return H

    @classmethod
    def from_function(cls, f: Callable[[dict[str, Tensor]], Tensor], params: Mapping[str, Tensor],
                      chunk_size: int | None = None, memory_budget_mb: float = 512.0,
                      batch_mode: str = "double-backward", keep_graph: bool | None = None) -> Hessian:
        """Hessian of an arbitrary scalar function ``f(params_dict) -> Tensor`` at ``params`` (a dict of tensors)."""
        problem = LossFunction.from_function(f, params)
        H = cls(None, None, None, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb,
                batch_mode=batch_mode, keep_graph=keep_graph, _problem=problem)
        H._cache_key = (getattr(f, "__qualname__", type(f).__name__),
                        tuple(tuple(s) for s in H.shapes.values()), str(H.dtype), str(H.device), batch_mode)
        return H

    @classmethod
    def distributed(cls, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                    process_group: Any = None, **kwargs: Any) -> Hessian:
        """Data-parallel Hessian under ``torch.distributed``: ``data`` is this rank's shard and the operator is the
        Hessian of the mean loss over all ranks' samples (one all-reduce per HVP batch; collective: every rank
        calls it). See :class:`optiscope.curvature.distributed.DistributedHessian` for the options and checks."""
        from optiscope.curvature.distributed import DistributedHessian

        return DistributedHessian(model, loss_fn, data, process_group=process_group, **kwargs)

    def _init(self, problem: LossFunction, chunk_size: int | None, memory_budget_mb: float,
              batch_mode: str, keep_graph: bool | None = None, validate: bool = True) -> None:
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        if keep_graph not in (None, True, False):
            raise ValueError(f"keep_graph must be None, True or False, got {keep_graph!r}")
        self.batch_mode = batch_mode
        self.keep_graph = keep_graph
        if chunk_size is not None:
            _check_int("chunk_size", chunk_size, 1)
        if not (isinstance(memory_budget_mb, (int, float)) and not isinstance(memory_budget_mb, bool)
                and memory_budget_mb > 0):
            raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb!r}")
        self._problem = problem
        self.param_names: list[str] = list(problem.names)
        self.params: dict[str, Tensor] = problem.params
        self.shapes: dict[str, torch.Size] = {n: p.shape for n, p in self.params.items()}
        self.sizes: dict[str, int] = {n: p.numel() for n, p in self.params.items()}
        self.numel: int = sum(self.sizes.values())
        if self.numel == 0:
            raise ValueError("no trainable parameters: the selected parameters have 0 elements")
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        self.device = first.device
        offsets = np.cumsum([0] + [self.sizes[n] for n in self.param_names])
        self.offsets: dict[str, int] = {n: int(o) for n, o in zip(self.param_names, offsets[:-1])}
        self.n_hvp = 0
        self.hvp_mode: str | None = None  # torch.func mode once resolved: "forward-over-reverse" | ...
        self._vmap_ok = True
        self._graph_ok = batch_mode == "double-backward"
        self._graph_batched_ok = True
        self._memory_budget = float(memory_budget_mb) * 2 ** 20
        self._chunk_size = chunk_size
        self._max_chunk: int | None = None
        self._kept: _Graph | None = None  # the kept gradient graph (weighted sum over the kept batches)
        self._kept_terms: list[int] | None = None  # which batches are kept; the rest are rebuilt per call
        self.graph_bytes: int | None = None  # measured saved-tensor bytes of the kept graph
        self._once = None  # a graph built while planning that is too large to keep: used by one call
        self.n_graph_builds = 0
        self._cache_key: tuple = ("function", id(problem))
        # validates: scalar and finite, data accepted by the model; without ``validate`` (``_prevalidated``) the
        # value is taken from the first gradient-graph build, or evaluated by ``_validate`` when first needed
        self._loss_value: float | None = problem.value() if validate else None
        self._module_of: dict[str, str] = {n: n for n in self.param_names}

    def _validate(self) -> None:
        """Evaluate (and validate) the loss if :meth:`_prevalidated` deferred it."""
        if self._loss_value is None:
            self._loss_value = self._problem.value()

    # ---------------------------------------------------------------------------------------------- lifetime
    def release(self) -> None:
        """Drop the kept gradient graph now (its memory is freed); the next HVP rebuilds it."""
        self._kept = None
        self._kept_terms = None
        self._once = None

    def __enter__(self) -> Hessian:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def graph_kept(self) -> bool:
        """Whether a gradient graph is currently kept between HVP calls."""
        return self._kept is not None

    # ---------------------------------------------------------------------------------------------- basics
    def loss(self) -> float:
        """``L(theta)`` (the exact mean over all batches)."""
        self._validate()
        return self._loss_value

    def gradient(self) -> dict[str, Tensor]:
        """``nabla L(theta)`` as a parameter dict."""
        self._validate()
        out = {n: torch.zeros_like(p) for n, p in self.params.items()}
        with self._problem.context():
            for i, (w, term) in enumerate(self._problem.terms):
                g = grad(lambda p, i=i, term=term: self._problem.check_term(i, term(p)))(self.params)
                for n in out:
                    out[n] += w * g[n]
        return out

    @property
    def chunk_size(self) -> int:
        """Vectors per batched second backward: given; else the size chosen by measured speed once known; else
        the memory bound (``memory_budget / bytes per vector``, from the measured graph size)."""
        if self._chunk_size is not None:
            return self._chunk_size
        chosen = CHUNK_CACHE.get(self._cache_key, {}).get("chosen")
        return min(chosen, self.max_chunk_size) if chosen else self.max_chunk_size

    @property
    def max_chunk_size(self) -> int:
        """The memory bound on vectors per batched call: ``memory_budget // (graph bytes + 4 x parameter bytes)``."""
        if self._chunk_size is not None:
            return self._chunk_size
        if self._max_chunk is None:
            single = len(self._problem.terms) == 1 and self.graph_bytes
            nbytes = self.graph_bytes if single else self._measure_graph_bytes(0)
            per_vector = nbytes + 4 * self.numel * first_element_size(self.params) + 1
            self._max_chunk = int(max(1, min(1024, self._memory_budget // per_vector)))
        return self._max_chunk

    def _measure_graph_bytes(self, index: int) -> int:
        """Bytes saved for backward by the forward pass and the ``create_graph`` first backward of batch ``index``."""
        saved = [0]

        def pack(t: Tensor) -> Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        w, term = self._problem.terms[index]
        try:
            with self._problem.context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = term(params)
                if loss.requires_grad:
                    torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        except (RuntimeError, NotImplementedError):
            pass
        return saved[0]

    # ---------------------------------------------------------------------------------------------- flat helpers
    def flatten(self, v: Mapping[str, Tensor]) -> Tensor:
        """Parameter dict -> flat vector in ``param_names`` order (also accepts a leading batch dimension)."""
        lead = v[self.param_names[0]].shape[: v[self.param_names[0]].dim() - len(self.shapes[self.param_names[0]])]
        return torch.cat([v[n].reshape(*lead, -1) for n in self.param_names], dim=-1)

    def unflatten(self, x: Tensor) -> dict[str, Tensor]:
        """Flat vector ``[n]`` or ``[B, n]`` -> parameter dict."""
        lead = x.shape[:-1]
        return {n: x[..., self.offsets[n]: self.offsets[n] + self.sizes[n]].reshape(*lead, *self.shapes[n])
                for n in self.param_names}

    def _check_vector(self, v: Mapping[str, Tensor], batched: bool) -> dict[str, Tensor]:
        if not isinstance(v, Mapping):
            raise ValueError(f"v must be a dict name -> Tensor, got {type(v).__name__}")
        missing = [n for n in self.param_names if n not in v]
        extra = [n for n in v if n not in self.shapes]
        if missing or extra:
            raise ValueError(f"v does not match the parameters: missing {missing}, unknown {extra}")
        out = {}
        B = None
        for n in self.param_names:
            t = torch.as_tensor(v[n])
            shape = tuple(t.shape[1:]) if batched else tuple(t.shape)
            if shape != tuple(self.shapes[n]):
                what = "[B, *shape]" if batched else "shape"
                raise ValueError(f"v[{n!r}] has shape {tuple(t.shape)}; expected {what} with shape "
                                 f"{tuple(self.shapes[n])}")
            if batched:
                if B is None:
                    B = t.shape[0]
                elif t.shape[0] != B:
                    raise ValueError(f"V[{n!r}] has batch size {t.shape[0]}, others have {B}")
            if t.is_complex():
                raise ValueError(f"v[{n!r}] is complex ({t.dtype}); the Hessian acts on real vectors")
            out[n] = t.to(dtype=self.dtype, device=self.device)
        # one reduction and one synchronisation for all tensors: a NaN or inf entry makes the sum non-finite (as
        # does a sum that overflows, whose H v would overflow too); then name the tensor
        total = sum(t.sum(dtype=torch.float64) for t in out.values())
        if not math.isfinite(float(total)):
            for n, t in out.items():
                if t.numel() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"v[{n!r}] contains NaN or infinite entries; H v is defined for finite "
                                     "vectors")
            raise ValueError("v is too large: the sum of its entries overflows float64")
        return out

    # ---------------------------------------------------------------------------------------------- HVP core
    def _hvp_term(self, index: int, term, v: dict[str, Tensor], mode: str) -> dict[str, Tensor]:
        def f(p):
            return self._problem.check_term(index, term(p))

        g = grad(f)
        if mode == "forward-over-reverse":
            return jvp(g, (self.params,), (v,))[1]
        _, pullback = vjp(g, self.params)
        return pullback(v)[0]

    def _hvp_all(self, v: dict[str, Tensor], mode: str, batched: bool) -> dict[str, Tensor]:
        out: dict[str, Tensor] | None = None
        for i, (w, term) in enumerate(self._problem.terms):
            if batched:
                fn = vmap(lambda u, i=i, term=term: self._hvp_term(i, term, u, mode), randomness="same")
                hv = fn(v)
            else:
                hv = self._hvp_term(i, term, v, mode)
            if out is None:
                out = {n: w * hv[n] for n in self.param_names}
            else:
                for n in self.param_names:
                    out[n] = out[n] + w * hv[n]
        return {n: t.detach() for n, t in out.items()}

    def _resolve_mode(self) -> None:
        if self.hvp_mode is not None:
            return
        probe = {n: torch.zeros_like(p) for n, p in self.params.items()}
        with self._problem.context():
            try:
                self._hvp_all(probe, "forward-over-reverse", batched=False)
                self.hvp_mode = "forward-over-reverse"
                return
            except (RuntimeError, NotImplementedError) as e:
                first = e
            try:
                self._hvp_all(probe, "reverse-over-reverse", batched=False)
            except Exception as e2:
                raise RuntimeError(f"Hessian-vector product failed in both modes: forward-over-reverse: {first}; "
                                   f"reverse-over-reverse: {e2}") from e2
        self.hvp_mode = "reverse-over-reverse"
        self.fallback_reason = str(first).splitlines()[0] if str(first) else type(first).__name__

    def hvp(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``H v`` for a parameter dict ``v`` (one HVP; NaN/inf entries are a ValueError).

        Default: one second backward pass through the kept gradient graph (autograd double backward, see the class
        docstring for when the graph is kept); where autograd cannot differentiate the loss twice, forward-over-
        reverse via torch.func, falling back to reverse-over-reverse (``hvp_mode``)."""
        v = self._check_vector(v, batched=False)
        out = self._apply(v, batched=False)
        self.n_hvp += 1
        return out

    def hvp_batch(self, V: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``[H v_1, ..., H v_B]`` for ``V[name]`` of shape ``[B, *shape]``: batched second backward passes through
        the kept gradient graph in chunks whose size is chosen by measured speed (class docstring)."""
        V = self._check_vector(V, batched=True)
        B = V[self.param_names[0]].shape[0]
        if B == 0:
            return {n: torch.empty(0, *self.shapes[n], dtype=self.dtype, device=self.device)
                    for n in self.param_names}
        out = self._apply(V, batched=True)
        self.n_hvp += B
        return out

    def _apply(self, V: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
        """``H V`` (``V`` one vector, or ``[B, ...]`` when ``batched``) by double backward, else torch.func."""
        if self._graph_ok:
            if len(self._problem.terms) > 1:
                self._validate()  # a one-batch graph build validates the loss itself (_build_graph)
            out = self._apply_graphs(V, batched)
            if out is not None:
                return out
        self._validate()
        self._resolve_mode()
        with self._problem.context():
            if not batched:
                return self._hvp_all(V, self.hvp_mode, batched=False)
            return self._run_chunks(self._hvp_chunk, V)

    # ------------------------------------------------------------------------------ gradient graphs
    def _build_graph(self, terms: list[int], measure: list[int] | None = None) -> _Graph:
        """The gradient graph of ``sum_{b in terms} w_b L_b`` (``create_graph=True``); RuntimeError if it is cut.
        With ``measure`` (a one-element list), the bytes saved for backward are added to ``measure[0]`` (the same
        count as :meth:`_measure_graph_bytes`, without a separate pass)."""
        names = self.param_names
        counting = contextlib.nullcontext()
        if measure is not None:
            def pack(t: Tensor) -> Tensor:
                measure[0] += t.numel() * t.element_size()
                return t

            counting = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with self._problem.context(), counting:
            leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
            loss = None
            for i in terms:
                w, term = self._problem.terms[i]
                li = self._problem.check_term(i, term(leaves))
                li = li if len(self._problem.terms) == 1 else w * li
                loss = li if loss is None else loss + li
            if self._loss_value is None and len(self._problem.terms) == 1:  # deferred by _prevalidated
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"the loss is not finite ({value}) at the given parameters (batch 0)")
                self._loss_value = value
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True, allow_unused=True)
        self.n_graph_builds += 1
        if any(g is not None and not g.requires_grad for g in grads):
            # the gradient graph is cut (an op whose backward is not differentiable by autograd, or a loss with a
            # constant gradient): let the torch.func modes decide, never return silent zeros
            raise RuntimeError("the gradient does not require grad: autograd cannot differentiate it again")
        grads = [g if g is not None else torch.zeros_like(leaves[n]).requires_grad_(True)
                 for g, n in zip(grads, names)]  # parameters the loss does not use: their rows of H are zero
        return _Graph(grads, [leaves[n] for n in names])

    def _plan_graphs(self) -> None:
        """Decide which batches keep their graph (in data order, while the measured sizes fit the budget)."""
        n_terms = len(self._problem.terms)
        if self.keep_graph is False:
            self._kept_terms = []
            return
        if n_terms == 1:
            # one batch: build the graph once, measuring it on the way (no separate sizing pass); keep it unless it
            # exceeds the budget (then this call uses it and later calls rebuild)
            nbytes = [0]
            graph = self._build_graph([0], measure=nbytes)
            self.graph_bytes = nbytes[0]
            if self.keep_graph is None and nbytes[0] > self._memory_budget:
                self._kept_terms = []
                self._once = graph
                return
            self._kept_terms = [0]
            self._kept = graph
            return
        if self.keep_graph is True:
            self.graph_bytes = None
            self._kept_terms = list(range(n_terms))
            return
        kept, total = [], 0
        for i in range(n_terms):
            b = self._measure_graph_bytes(i)
            if total + b > self._memory_budget:
                break
            kept.append(i)
            total += b
        self.graph_bytes = total
        self._kept_terms = kept

    def _apply_graphs(self, V: dict[str, Tensor], batched: bool) -> dict[str, Tensor] | None:
        """``H V`` through the kept graph plus, for batches that do not fit, graphs rebuilt for this call.
        Returns None (and disables this path) if autograd cannot differentiate the loss twice."""
        try:
            if self._kept_terms is None:
                self._plan_graphs()
            if self._kept_terms and self._kept is None:
                self._kept = self._build_graph(self._kept_terms)
            out = None
            if self._kept is not None:
                out = self._through(self._kept, V, batched)
            for i in range(len(self._problem.terms)):
                if i in self._kept_terms:
                    continue
                once, self._once = self._once, None  # a graph built while planning: use it once
                graph = once if once is not None else self._build_graph([i])
                part = self._through(graph, V, batched)  # weighted by w_i; dropped after this call
                out = part if out is None else {n: out[n] + part[n] for n in out}
            return out
        except (RuntimeError, NotImplementedError) as e:
            self._graph_ok = False
            self.release()
            self.graph_fallback_reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return None

    def _through(self, graph: _Graph, V: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
        names = self.param_names
        if not batched:
            hv = torch.autograd.grad(graph.grads, graph.inputs, grad_outputs=[V[n] for n in names],
                                     retain_graph=True, allow_unused=True, materialize_grads=True)
            return {n: h.detach() for n, h in zip(names, hv)}
        return self._run_chunks(lambda chunk: self._second_backward(graph, chunk), V)

    def _second_backward(self, graph: _Graph, V: dict[str, Tensor]) -> dict[str, Tensor]:
        names = self.param_names
        chunk = [V[n] for n in names]
        b = chunk[0].shape[0]
        if self._graph_batched_ok and b > 1:
            try:
                hv = torch.autograd.grad(graph.grads, graph.inputs, grad_outputs=chunk, retain_graph=True,
                                         is_grads_batched=True, allow_unused=True, materialize_grads=True)
                return {n: h.detach() for n, h in zip(names, hv)}
            except (RuntimeError, NotImplementedError) as e:
                self._graph_batched_ok = False
                self.vmap_fallback_reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if b == 1:  # one vector: no stacking copy
            hv = torch.autograd.grad(graph.grads, graph.inputs, grad_outputs=[t[0] for t in chunk],
                                     retain_graph=True, allow_unused=True, materialize_grads=True)
            return {n: h.detach()[None] for n, h in zip(names, hv)}
        cols = []
        for k in range(b):
            hv = torch.autograd.grad(graph.grads, graph.inputs, grad_outputs=[t[k] for t in chunk],
                                     retain_graph=True, allow_unused=True, materialize_grads=True)
            cols.append([h.detach() for h in hv])
        return {n: torch.stack([col[j] for col in cols]) for j, n in enumerate(names)}

    def _hvp_chunk(self, V: dict[str, Tensor]) -> dict[str, Tensor]:
        mode = "reverse-over-reverse" if self.batch_mode == "reverse-over-reverse" else self.hvp_mode
        if self._vmap_ok:
            try:
                return self._hvp_all(V, mode, batched=True)
            except (RuntimeError, NotImplementedError) as e:
                self._vmap_ok = False
                self.vmap_fallback_reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        B = V[self.param_names[0]].shape[0]
        cols = [self._hvp_all({n: t[b] for n, t in V.items()}, mode, batched=False) for b in range(B)]
        return {n: torch.stack([c[n] for c in cols]) for n in self.param_names}

    # ------------------------------------------------------------------------------ chunking by measured speed
    def _run_chunks(self, fn: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                    V: dict[str, Tensor]) -> dict[str, Tensor]:
        """``fn`` over consecutive chunks of the ``B`` vectors of ``V``; sizes from :class:`_ChunkChooser`."""
        B = V[self.param_names[0]].shape[0]
        if self._chunk_size is not None:
            chooser = None
        else:
            chooser = _ChunkChooser(CHUNK_CACHE.setdefault(self._cache_key, {}), self.max_chunk_size,
                                    self.device, request=B)
        out: dict[str, Tensor] | None = None
        s = 0
        while s < B:
            if chooser is None:
                c, timed = min(self._chunk_size, B - s), False
            else:
                c, timed = chooser.next(B - s)
            chunk = {n: t[s:s + c] for n, t in V.items()}
            if timed:
                t0 = chooser.clock()
                part = fn(chunk)
                chooser.record(c, chooser.clock() - t0)
            else:
                part = fn(chunk)
            if c == B:
                return part
            if out is None:  # results are written in place: no list of parts and no concatenation copy
                out = {n: torch.empty((B, *self.shapes[n]), dtype=part[n].dtype, device=part[n].device)
                       for n in self.param_names}
            for n in self.param_names:
                out[n][s:s + c] = part[n]
            s += c
        return out

    def _matmat(self, X: Tensor) -> Tensor:
        """Flat ``[B, n] -> [B, n]``: ``H X^T`` row by row (internal vectors: no validation)."""
        B = X.shape[0]
        if B == 0:
            return X.clone()
        out = self.flatten(self._apply(self.unflatten(X.to(dtype=self.dtype, device=self.device)), batched=True))
        self.n_hvp += B
        return out

    def _matvec(self, x: Tensor) -> Tensor:
        out = self.flatten(self._apply(self.unflatten(x.to(dtype=self.dtype, device=self.device)), batched=False))
        self.n_hvp += 1
        return out

    # ---------------------------------------------------------------------------------------------- coordinates
    def layers(self, by: str = "param") -> dict[str, list[str]]:
        """Layer name -> parameter names. ``by="param"``: one tensor per layer; ``"module"``: one module per layer."""
        if by == "param":
            return {n: [n] for n in self.param_names}
        if by == "module":
            out: dict[str, list[str]] = {}
            for n in self.param_names:
                out.setdefault(self._module_of[n], []).append(n)
            return out
        raise ValueError(f"by must be 'param' or 'module', got {by!r}")

    def sample_coordinates(self, per_layer: int = 200, seed: int = 0,
                           layers: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Uniformly random flat indices (without replacement, sorted) per parameter tensor.

        A parameter with at most ``per_layer`` entries contributes all of them. Each parameter's sample depends only
        on ``(seed, name)``, so selecting other layers does not change it (Jiang et al. 2023, §3, Eq. (1): 200
        coordinates).
        """
        per_layer = _check_int("per_layer", per_layer, 1)
        _check_int("seed", seed, 0)
        names = self._check_names(layers, "layers")
        out = {}
        for n in names:
            size = self.sizes[n]
            if size <= per_layer:
                out[n] = torch.arange(size)
            else:
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(n.encode()))
                out[n] = torch.sort(torch.randperm(size, generator=g)[:per_layer]).values
        return out

    def _check_names(self, names: Iterable[str] | None, what: str) -> list[str]:
        if names is None:
            return list(self.param_names)
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.shapes]
        if unknown:
            raise ValueError(f"unknown parameter name(s) in {what}: {unknown}; known: {self.param_names}")
        return [n for n in self.param_names if n in set(names)]

    def _check_coords(self, coords: Mapping[str, Any]) -> dict[str, Tensor]:
        if not isinstance(coords, Mapping) or not coords:
            raise ValueError("coords must be a non-empty dict name -> flat indices (see sample_coordinates)")
        self._check_names(list(coords), "coords")
        out = {}
        for n in self.param_names:
            if n not in coords:
                continue
            idx = torch.as_tensor(np.asarray(coords[n]) if not isinstance(coords[n], Tensor) else coords[n])
            if idx.dtype.is_floating_point or idx.dtype == torch.bool:
                raise ValueError(f"coords[{n!r}] must hold integer flat indices, got dtype {idx.dtype}")
            idx = idx.reshape(-1).long()
            if idx.numel() == 0:
                raise ValueError(f"coords[{n!r}] is empty")
            bad = idx[(idx < 0) | (idx >= self.sizes[n])]
            if bad.numel():
                raise ValueError(f"coords[{n!r}] has out-of-range flat indices {bad[:5].tolist()}; "
                                 f"valid range is [0, {self.sizes[n]})")
            out[n] = idx
        return out

    def _unit_columns(self, flat_idx: Tensor, reduce: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
        """Apply ``reduce(H[:, chunk]^T as [c, n], chunk)`` over memory-bounded chunks of columns ``flat_idx``
        (:func:`optiscope.curvature.diagonal.unit_columns`)."""
        return unit_columns(self, flat_idx, reduce)

    def diagonal(self, coords: Mapping[str, Any], method: str = "auto") -> DiagonalResult:
        """Exact ``H_ii = e_i^T H e_i`` at the given flat indices per parameter.

        ``method``: ``"auto"`` (second-order backpropagation for the layers it covers when cheaper, restricted HVP
        columns for the rest), ``"structured"`` (ValueError naming a parameter it cannot handle), ``"layer-hvp"``
        or ``"hvp"`` (one full HVP column per index). ``result.method[name]`` says which produced each parameter;
        see :mod:`optiscope.curvature.diagonal`."""
        self._validate()
        return exact_diagonal(self, self._check_coords(coords), method=method)

    def diagonal_block(self, coords: Mapping[str, Any]) -> DiagonalBlockResult:
        """The sampled principal sub-block ``H[I, I]`` (``I`` = all given coordinates, parameter order), exact,
        from HVP columns (:func:`optiscope.curvature.diagonal.exact_diagonal_block`).

        Needed for the diagonal-domination ratio of Jiang et al. 2023, App. E (see ``metrics.diagonal_dominance``).
        """
        self._validate()
        return exact_diagonal_block(self, self._check_coords(coords))

    def diagonal_estimate(self, n_probes: int = 100, seed: int = 0) -> DiagonalEstimate:
        """Hutchinson diagonal: ``diag(H) ~ mean_k z_k * (H z_k)`` with Rademacher ``z_k``, per-entry stderr.

        Unbiased since ``E[z_i z_j] = delta_ij``; ``stderr_i = std_k(z_ki (H z_k)_i) / sqrt(n_probes)``.
        """
        n_probes = _check_int("n_probes", n_probes, 2)
        g = _generator(seed)
        before = self.n_hvp
        s1 = torch.zeros(self.numel, dtype=torch.float64, device=self.device)
        s2 = torch.zeros_like(s1)
        c = self.max_chunk_size
        for s in range(0, n_probes, c):
            b = min(c, n_probes - s)
            Z = _rademacher((b, self.numel), g, self.dtype, self.device)
            D = (Z * self._matmat(Z)).double()
            s1 += D.sum(0)
            s2 += (D * D).sum(0)
        mean = s1 / n_probes
        var = (s2 - n_probes * mean * mean).clamp_min(0) / (n_probes - 1)
        stderr = (var / n_probes).sqrt()
        to = lambda x: {n: t.to(self.dtype) for n, t in self.unflatten(x).items()}
        return DiagonalEstimate(to(mean), to(stderr), n_probes, self.n_hvp - before)

    # ---------------------------------------------------------------------------------------------- spectrum
    def _operator(self, preconditioner: Mapping[str, Tensor] | None) -> Callable[[Tensor], Tensor]:
        if preconditioner is None:
            return self._matvec
        if not isinstance(preconditioner, Mapping):
            raise ValueError("preconditioner must be a dict name -> positive Tensor (the diagonal of P)")
        missing = [n for n in self.param_names if n not in preconditioner]
        if missing:
            raise ValueError(f"preconditioner is missing parameter(s) {missing}")
        s = []
        for n in self.param_names:
            p = torch.as_tensor(preconditioner[n]).to(dtype=self.dtype, device=self.device)
            if tuple(p.shape) != tuple(self.shapes[n]):
                raise ValueError(f"preconditioner[{n!r}] has shape {tuple(p.shape)}, expected {tuple(self.shapes[n])}")
            if not bool(torch.isfinite(p).all()) or not bool((p > 0).all()):
                raise ValueError(f"preconditioner[{n!r}] must be finite and > 0 everywhere")
            s.append(p.reshape(-1).rsqrt())
        scale = torch.cat(s)
        return lambda x: scale * self._matvec(scale * x)

    def eigenvalues(self, k: int = 1, which: str = "LA", tol: float = 1e-6, max_iter: int | None = None,
                    v0: Mapping[str, Tensor] | Tensor | None = None, method: str = "lanczos",
                    preconditioner: Mapping[str, Tensor] | None = None, seed: int = 0,
                    stop: str = "eigenvalue") -> EigenResult:
        """``k`` extreme eigenpairs of ``H`` (or of ``P^{-1/2} H P^{-1/2}`` with ``preconditioner=P``).

        ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
        ``method="lanczos"``: Lanczos with full reorthogonalisation (classical Gram-Schmidt applied twice); on
        breakdown (an invariant subspace) it continues from a fresh random vector, so repeated eigenvalues are found.
        It stops, for ``stop="eigenvalue"`` (default), when every wanted Ritz value ``theta`` has the eigenvalue
        error bound ``min(r, r^2 / delta) <= tol * |theta|`` (``r = ||A y - theta y|| = beta_m |s_m|``, ``delta``
        the distance to the nearest other Ritz value: the Kato-Temple / Saad 2011 Thm. 3.8 bound ``r^2 / gap``) and
        moved by at most ``tol * |theta|`` in the last step (a guard against an unconverged neighbour making the
        gap look larger than it is); for ``stop="residual"`` when ``r <= tol * |theta|`` (also accurate
        eigenvectors, more HVPs).
        ``method="power"``: power iteration with deflation as in PyHessian (``which="LM"`` only); stops when the
        Rayleigh quotient changes by less than ``tol`` relatively. ``max_iter`` bounds the HVPs per run (default
        ``min(n, 300)`` for Lanczos, 1000 for power). ``v0``: start vector (warm start), default random (``seed``).
        """
        k = _check_int("k", k, 1)
        if k > self.numel:
            raise ValueError(f"k = {k} is larger than the dimension {self.numel} of the Hessian")
        if which not in ("LA", "SA", "LM"):
            raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
        if method not in ("lanczos", "power"):
            raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
        if stop not in ("eigenvalue", "residual"):
            raise ValueError(f"stop must be 'eigenvalue' or 'residual', got {stop!r}")
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if max_iter is not None:
            max_iter = _check_int("max_iter", max_iter, 1)
        A = self._operator(preconditioner)
        g = _generator(seed)
        if v0 is None:
            start = torch.randn(self.numel, generator=g, dtype=torch.float64).to(self.dtype).to(self.device)
        else:
            start = (self.flatten(self._check_vector(v0, batched=False)) if isinstance(v0, Mapping)
                     else torch.as_tensor(v0).to(dtype=self.dtype, device=self.device).reshape(-1))
            if start.numel() != self.numel:
                raise ValueError(f"v0 has {start.numel()} entries, expected {self.numel}")
            if not bool(torch.isfinite(start).all()) or float(start.norm()) == 0:
                raise ValueError("v0 must be finite and nonzero")
        before = self.n_hvp
        if method == "power":
            if which != "LM":
                raise ValueError("method='power' finds largest-magnitude eigenvalues only; use which='LM'")
            vals, vecs, res, conv, hist = _power(A, start, k, tol, max_iter or 1000, g)
            ritz = []
        else:
            vals, vecs, res, conv, hist, ritz = _lanczos(A, start, self.numel, k, which, tol,
                                                         max_iter or min(self.numel, 300), g, stop)
        if not conv:
            warnings.warn(f"eigenvalues: {method} did not converge to tol={tol} within max_iter "
                          f"(residuals {np.array2string(res, precision=2)})", RuntimeWarning, stacklevel=2)
        return EigenResult(vals, [self.unflatten(v) for v in vecs], self.n_hvp - before, conv, res, method, which,
                           hist, ritz)

    def trace(self, n_probes: int = 30, method: str = DEFAULT_TRACE_METHOD, seed: int = 0) -> TraceResult:
        """Stochastic trace estimate using ``n_probes`` HVPs in total (:mod:`optiscope.curvature.trace`).

        ``"adaptive"`` (default): Hutchinson or XTrace, chosen by a variance test on the first half of the
        probes (which serve both), never worse than the better of Hutchinson and Hutch++ on flat or low-rank
        spectra in our measurements.
        ``"hutchinson"``: ``tr H ~ mean_k z_k^T H z_k`` (Rademacher ``z``), stderr = sample std / sqrt(n_probes).
        ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021): ``Q = orth(H S)`` with ``S`` of ``m/3`` Rademacher
        columns, ``tr H ~ tr(Q^T H Q) + mean_k g_k'^T H g_k'`` with ``g_k' = (I - Q Q^T) g_k``.
        ``"xtrace"`` (Epperly, Tropp, Webber 2024): ``m/2`` test vectors, each left out of the sketch once.
        ``docs/benchmarks.md`` compares them at 30 and 99 HVPs.
        """
        g = _generator(seed)
        before = self.n_hvp
        r = trace_estimate(self._matmat, self.numel, n_probes, method, g, self.dtype, self.device)
        r.n_hvp = self.n_hvp - before
        return r

    def density(self, n_probes: int = 10, n_lanczos: int = 80, seed: int = 0, grid_size: int = 1000,
                sigma: float | None = None) -> DensityResult:
        """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin, Saad, Yang 2016).

        For each Rademacher probe ``v`` (normalised), ``m = n_lanczos`` Lanczos steps give ``T = S diag(theta) S^T``;
        nodes ``theta_j`` and weights ``tau_j = S_{1j}^2`` satisfy ``sum_j tau_j theta_j^p = v^T H^p v / ||v||^2`` for
        ``p < 2m``, so ``mean_probes sum_j tau_j theta_j^p`` is unbiased for ``tr(H^p) / n``. The density is
        ``phi(t) = mean_probes sum_j tau_j N(t; theta_j, sigma^2)`` on ``grid`` (``sigma`` default: 1% of the node range).
        """
        n_probes = _check_int("n_probes", n_probes, 1)
        n_lanczos = _check_int("n_lanczos", n_lanczos, 1)
        grid_size = _check_int("grid_size", grid_size, 2)
        m = min(n_lanczos, self.numel)
        g = _generator(seed)
        before = self.n_hvp
        V = _rademacher((n_probes, self.numel), g, self.dtype, self.device)
        basis_bytes = m * self.numel * first_element_size(self.params)
        group = int(max(1, min(n_probes, self.max_chunk_size, self._memory_budget // max(basis_bytes, 1))))
        parts = [_batched_lanczos_quadrature(self._matmat, V[s:s + group], m, g) for s in range(0, n_probes, group)]
        nodes = np.concatenate([p[0] for p in parts])
        weights = np.concatenate([p[1] for p in parts])
        lo, hi = float(nodes.min()), float(nodes.max())
        span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
        if sigma is None:
            sigma = 0.01 * span
        if not (isinstance(sigma, (int, float)) and sigma > 0):
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size)
        kern = np.exp(-0.5 * ((grid[None, None, :] - nodes[:, :, None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        dens = (weights[:, :, None] * kern).sum(1).mean(0)
        return DensityResult(nodes, weights, grid, dens, float(sigma), self.n_hvp - before)

    # ---------------------------------------------------------------------------------------------- blocks, dense
    def block_norms(self, exact: bool | None = None, n_probes: int = 20, seed: int = 0, by: str = "param",
                    max_dim: int = 3000) -> BlockNormResult:
        """Frobenius norms ``F_ab = ||H_ab||_F`` of the Hessian blocks per pair of layers (Orvieto et al. 2022, §4,
        Thm. 10).

        ``exact=True`` (default when ``numel <= max_dim``): from the dense Hessian. Otherwise
        ``F_ab^2 = E ||H_ab z_b||^2`` with Rademacher ``z_b`` supported on layer ``b``: ``n_probes`` HVPs per layer,
        each giving one sample for every ``a`` at once. Totals: ``diagonal_total = sqrt(sum_a F_aa^2)``,
        ``offdiagonal_total = sqrt(sum_{a != b} F_ab^2)``. ``gershgorin = max_a sum_b F_ab`` bounds ``|lambda|`` for
        every eigenvalue (block Gershgorin, Feingold-Varga, with ``||.||_2 <= ||.||_F``); when exact,
        ``gershgorin_entrywise = max_i sum_j |H_ij|`` (Orvieto et al. 2022, §4, Gershgorin corollary).
        """
        groups = self.layers(by)
        names = list(groups)
        L = len(names)
        idx = {a: torch.cat([torch.arange(self.offsets[n], self.offsets[n] + self.sizes[n]) for n in groups[a]])
               for a in names}
        if exact is None:
            exact = self.numel <= max_dim
        before = self.n_hvp
        F2 = np.zeros((L, L))
        se = None
        ent = None
        if exact:
            H = self.dense(max_dim=max(max_dim, self.numel) if exact is True else max_dim).double()
            for i, a in enumerate(names):
                for j, b in enumerate(names):
                    F2[i, j] = float((H[idx[a]][:, idx[b]] ** 2).sum())
            ent = float(H.abs().sum(1).max())
        else:
            n_probes = _check_int("n_probes", n_probes, 2)
            g = _generator(seed)
            se = np.zeros((L, L))
            for j, b in enumerate(names):
                Z = torch.zeros(n_probes, self.numel, dtype=self.dtype, device=self.device)
                ib = idx[b].to(self.device)
                Z[:, ib] = _rademacher((n_probes, ib.numel()), g, self.dtype, self.device)
                HZ = self._matmat(Z).double()
                for i, a in enumerate(names):
                    s = (HZ[:, idx[a].to(self.device)] ** 2).sum(1).cpu().numpy()
                    F2[i, j] = s.mean()
                    se[i, j] = s.std(ddof=1) / math.sqrt(n_probes)
        F = np.sqrt(F2)
        diag = float(np.sqrt(np.trace(F2)))
        off = float(np.sqrt(max(F2.sum() - np.trace(F2), 0.0)))
        gersh = float(F.sum(1).max())
        return BlockNormResult(names, F, diag, off, gersh, bool(exact), self.n_hvp - before, ent, se)

    def dense(self, max_dim: int = DEFAULT_DENSE_MAX_DIM) -> Tensor:
        """The full ``n x n`` Hessian built from HVP columns (``H[:, i] = H e_i``); small models only.

        Built once per ``Hessian`` (the parameters are a fixed snapshot) and returned as a copy afterwards, so
        ``block_norms(exact=True)``, spectra and traces of one point share the ``n`` HVPs."""
        max_dim = _check_int("max_dim", max_dim, 1)
        if self.numel > max_dim:
            raise ValueError(f"dense(): the Hessian has dimension {self.numel} > max_dim = {max_dim} "
                             f"({self.numel ** 2 * first_element_size(self.params) / 2 ** 30:.2f} GiB); use the "
                             "estimators (diagonal, eigenvalues, trace, density, block_norms) or raise max_dim")
        if getattr(self, "_dense", None) is None:
            cols = torch.cat(self._unit_columns(torch.arange(self.numel), lambda c, chunk: c))
            self._dense = cols.T.contiguous()
        return self._dense.clone()

    def to_scipy(self):
        """``scipy.sparse.linalg.LinearOperator`` (float64, flat vectors in ``param_names`` order) applying ``H``."""
        from scipy.sparse.linalg import LinearOperator

        def matvec(x):
            x = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1)).to(self.dtype).to(self.device)
            return self._matvec(x).double().cpu().numpy()

        def matmat(X):
            X = torch.as_tensor(np.asarray(X, dtype=np.float64)).to(self.dtype).to(self.device)
            return self._matmat(X.T.contiguous()).double().cpu().numpy().T

        return LinearOperator((self.numel, self.numel), matvec=matvec, rmatvec=matvec, matmat=matmat,
                              dtype=np.float64)

    def __repr__(self) -> str:
        return (f"Hessian(numel={self.numel}, params={len(self.param_names)}, dtype={self.dtype}, "
                f"hvp_mode={self.hvp_mode}, n_hvp={self.n_hvp})")


BATCH_MODES = ("double-backward", "forward-over-reverse", "reverse-over-reverse")

#: Measured chunk sizes per problem signature (model class, parameter and data shapes, dtype, device, mode):
#: ``{"times": {size: best seconds per vector}, "chosen": size or None}``. Filled by the first batched HVPs.
CHUNK_CACHE: dict[tuple, dict] = {}


@dataclass
class _Graph:
    """A gradient graph ``grads = dL/d inputs`` built with ``create_graph=True`` (kept alive by ``grads``)."""
    grads: list[Tensor]
    inputs: list[Tensor]


def _shape_signature(batch: tuple[Any, Tensor]) -> tuple:
    def sig(obj):
        if isinstance(obj, Tensor):
            return (tuple(obj.shape), str(obj.dtype))
        if isinstance(obj, Mapping):
            return tuple((k, sig(v)) for k, v in obj.items())
        if isinstance(obj, (tuple, list)):
            return tuple(sig(v) for v in obj)
        return type(obj).__name__
    return sig(batch)


class _ChunkChooser:
    """Chooses vectors per batched second backward by timing real chunks (no extra HVPs).

    Exploration sizes ``1, 2, 4, 8, ...`` up to the memory bound, each timed on two chunks (the time per vector of a
    size is the minimum of its two). After a size ``>= 8`` (or the bound) that is not faster than the best smaller
    size by 3%, or once the next size exceeds every request seen, the best size is chosen for good; a size above 1
    is chosen only if it is at least 10% faster per vector than single vectors (on a loaded machine one timing can
    mislead; the loop is the safe default). The state is shared through :data:`CHUNK_CACHE`."""

    REPEATS = 2

    def __init__(self, state: dict, bound: int, device: torch.device, request: int = 0):
        self.state = state
        state["max_request"] = max(state.get("max_request", 0), int(request))
        state.setdefault("times", {})
        state.setdefault("counts", {})
        state.setdefault("chosen", None)
        self.bound = max(1, int(bound))
        self.sync = device.type == "cuda"

    def clock(self) -> float:
        """Wall time in seconds (synchronising CUDA first)."""
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _best(self) -> int:
        times = {s: t for s, t in self.state["times"].items() if s <= self.bound}
        return min(times, key=times.get) if times else 1

    def next(self, remaining: int) -> tuple[int, bool]:
        """``(chunk size, whether to time it)`` for the next chunk of ``remaining`` vectors."""
        chosen = self.state["chosen"]
        if chosen is not None:
            return min(chosen, self.bound, remaining), False
        counts = self.state["counts"]
        size = 1
        while counts.get(size, 0) >= self.REPEATS and size < self.bound:
            size = min(2 * size, self.bound)
        if counts.get(size, 0) >= self.REPEATS:  # explored everything up to the bound
            self._decide()
            return min(self.state["chosen"], remaining), False
        if size > remaining:
            if size > self.state.get("max_request", 0):  # no call has asked for that many vectors: stop here
                self._decide()
                return min(self.state["chosen"], remaining), False
            return min(self._best(), remaining), False
        return size, True

    def record(self, size: int, seconds: float) -> None:
        """Record one timed chunk and decide once the time per vector stops improving."""
        per = seconds / size
        times, counts = self.state["times"], self.state["counts"]
        times[size] = min(times.get(size, math.inf), per)
        counts[size] = counts.get(size, 0) + 1
        if counts[size] < self.REPEATS:
            return
        smaller = [t for s, t in times.items() if s < size]
        if size >= self.bound or (size >= 8 and smaller and times[size] > 0.97 * min(smaller)):
            self._decide()

    def _decide(self) -> None:
        best = self._best()
        times = self.state["times"]
        if best != 1 and 1 in times and times[best] > 0.9 * times[1]:
            best = 1
        self.state["chosen"] = best


def first_element_size(params: Mapping[str, Tensor]) -> int:
    return next(iter(params.values())).element_size()
