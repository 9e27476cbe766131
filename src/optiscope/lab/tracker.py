"""``Tracker``: the lab's probes inside a training loop you wrote (or a Hugging Face ``Trainer``, a Lightning module).

::

    from optiscope import Tracker

    with Tracker(model, loss_fn, probe_data, probes=["loss", "sharpness", "r_med"], every=50,
                 store="runs/mine") as tracker:
        for step, (x, y) in enumerate(loader):
            ...                                   # your forward, backward, optimizer.step()
            tracker.step(step, optimizer=opt)     # measures at steps 0, every, 2 every, ... and at ``at``

``tracker.step(t)`` means "after t updates" (call it with t = 1, 2, ... after each ``optimizer.step()``, or start at
t = 0 before the first update to measure the initialization). The tracker measures only on its schedule; between
checkpoints a call costs a comparison (and one parameter copy on the step before a checkpoint, for the
``update_norm``/``adam_alignment`` probes that need the last update).

* **Probe data** (``data``): one ``(inputs, targets)`` batch, a list of batches or a ``DataLoader``; inputs may be
  tensors, tuples or dicts of tensors. A loader is read once, at construction, under a forked RNG: every checkpoint
  measures the same samples, and training's random stream is untouched. Several batches give the exact
  sample-weighted mean (as :class:`optiscope.Hessian` does). ``loss_fn(outputs, targets)`` may read output objects
  (``out.logits``, ``out.loss``); it must return a scalar tensor.
* **Probes** are the lab's (:mod:`optiscope.lab.probes`; ``"loss"`` and ``"accuracy"`` are taken on the probe
  data) or any callable ``probe(problem, state) -> dict``. Optimizer-state probes (``precond_sharpness``,
  ``adam_correction``) read the optimizer passed to :meth:`Tracker.step`: optiscope's optimizers and
  ``torch.optim``'s Adam/AdamW/RMSprop/Adagrad (:mod:`optiscope.lab.conventions`).
* **Purity**: probes run under :func:`optiscope.lab.probes.probe_guard` (plus the CUDA RNG of the model's device):
  parameters, ``.grad``, buffers (BatchNorm running statistics), module modes and the RNG streams are bit-identical
  before and after a measurement; probes only read the optimizer's state.
* **Cost**: a checkpoint's Hessian probes share one :class:`optiscope.Hessian` at the current parameters. Its
  validating forward pass (the data are accepted, the loss is a finite scalar) runs once per model structure
  (parameter names, dtypes, devices, shapes and storage; module modes); later checkpoints take the loss and its
  finiteness check from the gradient-graph build, so a diverged loss is still recorded (``diverged``).
* **Store** (``store="runs/x"``): the lab's run directory (:class:`optiscope.lab.RunStore`): tidy
  ``metrics.parquet`` (``run, optimizer, step, metric, layer, value``), ``manifest.json`` (status, timings, notes),
  ``config.yaml``, arrays; ``optiscope show DIR`` and ``optiscope plot DIR`` work on it. Each checkpoint's rows are
  written (atomically) as soon as they are measured, so a killed process keeps everything measured before the
  kill; the manifest then still says ``running``.
* **Loggers**: ``loggers=[...]`` receive every checkpoint's flat metrics (``"sharpness"``, ``"r_med/<layer>"``): any
  object with ``log_metrics(step, metrics)`` (and optionally ``close()``), or a plain callable
  ``fn(step, metrics)``; see :class:`MetricsLogger` and :mod:`optiscope.integrations` (TensorBoard, Weights &
  Biases and MLflow adapters, a Hugging Face ``TrainerCallback``, a Lightning ``Callback``).
* **Traps stated once** (as warnings and in the manifest's ``notes``): train-mode randomness (dropout) in the
  probed model (the Hessian is then one random sub-network's; ``mode="eval"`` measures the deterministic model),
  and an optimizer whose rule differs from ``torch.optim``'s namesake (optiscope's ``adam``: eps inside the square
  root); and, at the second checkpoint, what the probes cost against the training between calls (a warning above
  :data:`PROBE_COST_WARN_RATIO` times, naming cheaper settings).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from optiscope.lab.conventions import state_convention
from optiscope.lab.probes import (
    AccuracyProbe,
    LossProbe,
    ProbeState,
    make_probe,
    make_probes,
    probe_guard,
    probe_name,
    pure_forward,
    split_probe_specs,
)
from optiscope.lab.problem import Problem, as_batches, check_same_device, model_device
from optiscope.lab.store import METRIC_COLUMNS, RunStore

__all__ = ["MetricsLogger", "Tracker", "flat_metrics"]

MODES = ("as_is", "eval", "train")

#: the tracker warns once when its probes cost more than this multiple of the training time between its calls
PROBE_COST_WARN_RATIO = 3.0


@runtime_checkable
class MetricsLogger(Protocol):
    """What a Tracker logger implements: ``log_metrics(step, metrics)`` with ``metrics`` a flat
    ``{name: float}`` dict (per-layer values as ``"metric/layer"``), called once per checkpoint; ``close()`` is
    optional and called by :meth:`Tracker.close`.

    Example (Weights & Biases; MLflow is the same with ``mlflow.log_metrics(metrics, step=step)``)::

        class WandbLogger:
            def __init__(self, run):
                self.run = run
            def log_metrics(self, step, metrics):
                self.run.log(metrics, step=step)
            def close(self):
                self.run.finish()
    """

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Receive one checkpoint's metrics."""


class _CallableLogger:
    def __init__(self, fn: Callable[[int, Mapping[str, float]], Any]):
        self.fn = fn

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Call the wrapped function."""
        self.fn(step, metrics)


def flat_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Tidy rows -> ``{metric: value}`` with per-layer rows as ``"metric/layer"``."""
    out = {}
    for r in rows:
        key = r["metric"] if not r["layer"] else f"{r['metric']}/{r['layer']}"
        out[key] = float(r["value"])
    return out


def _rows(result: Mapping[str, Any], run: str, optimizer: str, step: int, arrays: dict) -> list[dict]:
    """A probe's dict -> tidy rows; array values go to ``arrays[metric][step]`` (the lab's convention)."""
    from optiscope.lab.run import _rows_from

    return _rows_from(result, run, optimizer, step, arrays)


def _probe_spec(probe: Any) -> str:
    """``name:key=value,...`` from a probe's public options (for config.yaml)."""
    opts = {k: v for k, v in vars(probe).items() if not k.startswith("_")} if hasattr(probe, "__dict__") else {}
    opts = {k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}
    kw = ",".join(f"{k}={v}" for k, v in opts.items())
    return probe_name(probe) + (f":{kw}" if kw else "")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` inside wrappers (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``: their ``.optimizer``); ValueError for anything that is not an optimizer."""
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _loss_problem(value: Any) -> str | None:
    if not isinstance(value, torch.Tensor):
        hint = ""
        if hasattr(value, "loss") or hasattr(value, "logits"):
            hint = " (a model output object: return e.g. out.loss, or a loss of out.logits)"
        return f"loss_fn returned {type(value).__name__}, not a scalar tensor{hint}"
    if value.numel() != 1:
        return (f"loss_fn returned a tensor of shape {tuple(value.shape)}, not a scalar; reduce it (e.g. "
                "reduction='mean')")
    if not value.is_floating_point():
        return f"loss_fn returned a {value.dtype} tensor, not a floating-point scalar"
    return None


class _DistributedProbeState(ProbeState):
    """A checkpoint's state whose Hessian and gradient are over the probe data of all ranks (``Tracker``'s
    ``distributed=True``): :class:`optiscope.curvature.distributed.DistributedHessian`."""

    process_group: Any = None

    def hessian(self):
        """The distributed Hessian of the mean loss over every rank's probe data (collective)."""
        if "hessian" not in self.scratch:
            from optiscope.curvature.distributed import DistributedHessian

            self.scratch["hessian"] = DistributedHessian(self.model, self.problem.loss_fn, self.problem.probe_batch,
                                                         process_group=self.process_group)
        return self.scratch["hessian"]

    def gradient(self) -> dict[str, torch.Tensor]:
        """Gradient of the mean loss over every rank's probe data (one all-reduce)."""
        if "gradient" not in self.scratch:
            H = self.hessian()
            names = self.problem.param_names
            g = H.gradient()
            self.scratch["gradient"] = {n: g[n] if n in g else torch.zeros_like(H.params[n]) for n in names}
            self.scratch["probe_loss"] = H.loss()
        return self.scratch["gradient"]


class _TrackerProbeState(ProbeState):
    """A checkpoint's state whose Hessian comes from the tracker (:meth:`Tracker._checkpoint_hessian`: validated
    once per model structure, not at every checkpoint)."""

    make_hessian: Any = None

    def hessian(self):
        """The Hessian of the loss on the probe data at the current parameters (built once per checkpoint)."""
        if "hessian" not in self.scratch:
            self.scratch["hessian"] = self.make_hessian()
        return self.scratch["hessian"]


class Tracker:
    """Probes on a schedule inside any training loop (module docstring).

    Parameters
    ----------
    model, loss_fn, data
        The model being trained, ``loss_fn(outputs, targets) -> scalar`` and the probe data.
    probes
        Probe names, ``"name:key=value"`` specs or callables (default ``["loss", "sharpness"]``).
    every
        Measure at steps ``0, every, 2 every, ...`` (an int >= 1).
    store
        A run directory (path or :class:`RunStore`), or None to keep the rows in memory only (:attr:`metrics`).
    name, optimizer_name
        The ``run`` and ``optimizer`` columns of the rows (default ``"run"`` and the optimizer's class name).
    at
        Extra steps to measure.
    seed
        Seeds the probes' own randomness (sampled coordinates, trace probes); training's RNG is never used.
    mode
        ``"as_is"`` (default: the model's current mode), ``"eval"`` or ``"train"`` during measurements only.
    layers, task, eval_data
        As for :class:`optiscope.lab.Problem`.
    loggers
        Objects with ``log_metrics(step, metrics)`` or callables ``fn(step, metrics)``.
    estimate_cost
        Estimate the probes' cost at construction (:func:`optiscope.lab.probes.probe_budget`: HVPs per checkpoint,
        an upper bound for iterative probes, and one timed HVP), printed to stderr and recorded in the manifest as
        ``probe_budget``. Either way, the cost actually measured is stated at the second checkpoint.
    resume
        Continue a run of the same ``name`` already in ``store``: the first :meth:`step` drops its rows at and after
        that step (a training loop restarted from its own checkpoint). Without it such a store is refused.
    distributed, process_group
        Under ``torchrun`` (``torch.distributed`` initialised), ``distributed=True`` (or a ``process_group``) makes
        each rank's ``data`` a shard of the probe data: Hessian and gradient probes use
        :class:`optiscope.curvature.distributed.DistributedHessian` (the same numbers on every rank, equal to one
        process holding all shards), ``loss`` and ``accuracy`` are sample-weighted means over all ranks (eval
        metrics stay this rank's), a ``DistributedDataParallel`` model is unwrapped (no gradient hook fires during
        a probe), and only rank 0 writes the store and calls the loggers. Every rank must call :meth:`step` with
        the same steps (a measurement is collective).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], data: Any,
                 probes: Any = ("loss", "sharpness"), every: int = 50, store: Any = None, *, name: str = "run",
                 optimizer_name: str | None = None, at: Iterable[int] = (), seed: int = 0, mode: str = "as_is",
                 layers: Mapping[str, Sequence[str]] | None = None, task: str = "classification",
                 eval_data: Any = None, loggers: Iterable[Any] = (), resume: bool = False,
                 estimate_cost: bool = False, distributed: bool = False, process_group: Any = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.distributed = bool(distributed) or process_group is not None
        self.process_group = process_group
        self.rank = 0
        if self.distributed:
            import torch.distributed as dist

            from optiscope.curvature.distributed import unwrap_ddp

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("distributed=True needs torch.distributed initialised (dist.init_process_group, "
                                 "e.g. under torchrun)")
            self.rank = dist.get_rank(process_group)
            model = unwrap_ddp(model)
            if self.rank != 0:
                store, loggers = None, ()
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(outputs, targets) -> scalar, got "
                             f"{type(loss_fn).__name__}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or int(every) < 1:
            raise ValueError(f"every = {every!r} must be an integer >= 1 (measure at steps 0, every, 2*every, ...)")
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r} is invalid; valid: {', '.join(MODES)}")
        self.at = sorted({self._check_step(s, "at") for s in at})
        self.every = int(every)
        self.mode = mode
        self.name = str(name)
        self.optimizer_name = optimizer_name
        self.seed = int(seed)
        self.model = model
        batches = as_batches(data, "data")
        for i, b in enumerate(batches):
            check_same_device(model, b, f"data batch {i}")
        if eval_data is not None:
            eval_batches = as_batches(eval_data, "eval_data")
            for i, b in enumerate(eval_batches):
                check_same_device(model, b, f"eval_data batch {i}")
            eval_data = eval_batches
        # the tracker has no training set of its own: train is the first probe batch (never concatenated, so
        # batches padded to different lengths are fine); loss and accuracy are taken on all the probe data
        self.problem = Problem(model, loss_fn, train=batches[0], probe_batch=batches if len(batches) > 1
                               else batches[0], eval=eval_data, task=task, layers=layers, name=self.name)
        self._check_loss(batches[0])
        items = split_probe_specs(probes) if isinstance(probes, str) else list(probes)
        self.probes = make_probes([self._on_probe_data(p) for p in items])
        for p in self.probes:
            if isinstance(p, (LossProbe, AccuracyProbe)) and p.on == "train":
                raise ValueError(f"probe {probe_name(p)!r} with on='train': the tracker knows only its probe data; "
                                 f"use {probe_name(p)!r} (measured on all of it)")
        self.loggers = [lg if hasattr(lg, "log_metrics") else _CallableLogger(lg) if callable(lg) else
                        self._bad_logger(lg) for lg in loggers]
        self.notes: list[str] = []
        self._notes_written: set[str] = set()
        self._cache: dict = {}
        self._validated: tuple | None = None  # the model structure the probe loss was last validated for
        self._arrays: dict[str, dict[int, np.ndarray]] = {}
        self._memory: list[dict] = []
        self._last_step: int | None = None
        self._prev: tuple[int, dict[str, torch.Tensor]] | None = None
        self._closed = False
        self._resume_pending = bool(resume)
        self.probe_seconds = 0.0
        self.train_seconds = 0.0  # wall time spent outside the tracker between step() calls (the user's training)
        self.n_measurements = 0
        self._t0 = time.perf_counter()
        self._returned: float | None = None  # when the last step() returned
        self._cost_stated = False
        from optiscope.curvature._problem import random_train_mode_modules

        randomness = random_train_mode_modules(model) if mode != "eval" else []
        if mode == "train":
            with self._measuring_mode():
                randomness = random_train_mode_modules(model)
        if randomness:
            self._note(f"train-mode randomness is active in the probed model ({', '.join(randomness[:4])}"
                       f"{' ...' if len(randomness) > 4 else ''}): each checkpoint's loss and Hessian use one frozen "
                       "dropout mask (one random sub-network); pass mode='eval' to measure the deterministic model")
        self.budget = self._estimate_cost(estimate_cost)
        self.store = self._open_store(store, resume)
        self._n_probe_total = None
        if self.distributed:
            import torch.distributed as dist

            n = torch.tensor([float(sum(len(y) for _, y in self.problem.probe_batches))], dtype=torch.float64)
            dist.all_reduce(n, group=process_group)
            self._n_probe_total = float(n[0])
        if self.store is not None and self.budget is not None:
            self.store.update_run(self.name, probe_budget=self.budget.summary())

    # -- construction helpers
    def _estimate_cost(self, estimate: bool):
        """HVPs per checkpoint and seconds from one timed HVP (``lab.probes.probe_budget``), printed to stderr."""
        if not estimate:
            return None
        try:
            from optiscope.lab.probes import probe_budget
        except ImportError:  # pragma: no cover - an older lab without the estimate
            return None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="train-mode randomness is active")
            with self._rng_guard(), self._measuring_mode():
                budget = probe_budget(self.probes, self.problem, n_checkpoints=1)
        print(f"optiscope Tracker: {budget.summary()}", file=sys.stderr)
        return budget

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _bad_logger(lg: Any):
        raise ValueError(f"logger {lg!r} has no log_metrics(step, metrics) method and is not callable")

    @staticmethod
    def _check_step(step: Any, what: str = "step") -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"{what} = {step!r} must be an integer (the number of updates taken)")
        if int(step) < 0:
            raise ValueError(f"{what} = {step!r} must be >= 0")
        return int(step)

    @staticmethod
    def _on_probe_data(spec: Any) -> Any:
        """``"loss"``/``"accuracy"`` without options are measured on the probe data (the tracker has no other)."""
        if isinstance(spec, str) and spec.strip() in ("loss", "accuracy"):
            return make_probe(spec.strip(), on="probe")
        return spec

    def _check_loss(self, batch) -> None:
        X, y = batch
        with probe_guard(self.model), self._rng_guard(), torch.no_grad():
            value = self.problem.loss_fn(pure_forward(self.model, X), y)
        msg = _loss_problem(value)
        if msg:
            raise ValueError(msg)

    def _open_store(self, store: Any, resume: bool) -> RunStore | None:
        if store is None:
            return None
        st = store if isinstance(store, RunStore) else RunStore(store)
        st.acquire_lock()  # held while the tracker is open: a second writer gets RunLockedError naming us
        try:
            self._init_store(st, resume)
        except BaseException:
            st.release_lock()
            raise
        return st

    def _init_store(self, st: RunStore, resume: bool) -> None:
        df = st.read_metrics()
        mine = df[df["run"] == self.name] if not df.empty else df
        if not mine.empty and not resume:
            raise ValueError(f"{st.root} already holds run {self.name!r} ({len(mine)} rows, last step "
                             f"{int(mine['step'].max())}); pass resume=True to continue it or choose another name")
        manifest = st.read_manifest()
        if not manifest.get("kind"):
            st.update_manifest(kind="tracker")
        if not st.path("config.yaml").exists():
            st.write_config({"kind": "tracker", "run": self.name, "every": self.every, "at": self.at,
                             "probes": [_probe_spec(p) for p in self.probes], "seed": self.seed, "mode": self.mode,
                             "n_probe_samples": int(sum(len(y) for _, y in self.problem.probe_batches))})
        st.set_status("running")
        st.update_run(self.name, status="running", every=self.every,
                      probes=[probe_name(p) for p in self.probes], device=str(model_device(self.model)))
        for n in self.notes:
            self._write_note(st, n)

    def _note(self, text: str, warn: bool = True) -> None:
        if text in self.notes:
            return
        self.notes.append(text)
        if warn:
            warnings.warn(text, UserWarning, stacklevel=3)
        st = getattr(self, "store", None)
        if st is not None:
            self._write_note(st, text)

    def _write_note(self, st: RunStore, text: str) -> None:
        if text in self._notes_written:
            return
        self._notes_written.add(text)
        entry = (st.read_manifest().get("runs") or {}).get(self.name) or {}
        st.update_run(self.name, notes=list(dict.fromkeys(list(entry.get("notes") or []) + [text])))

    # -- schedule ------------------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        """Whether ``step`` is a checkpoint: ``step % every == 0`` or ``step in at``."""
        return step % self.every == 0 or step in self.at

    @property
    def last_step(self) -> int | None:
        """The step of the last :meth:`step` call (None before the first)."""
        return self._last_step

    @property
    def metrics(self):
        """All rows measured by this tracker (a tidy ``pandas.DataFrame``)."""
        import pandas as pd

        from optiscope.lab.store import empty_metrics

        return pd.DataFrame(self._memory, columns=METRIC_COLUMNS) if self._memory else empty_metrics()

    # -- the loop ------------------------------------------------------------------------------------
    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float] | None:
        """Call after each optimizer step with ``step`` = updates taken so far; measures when :meth:`is_due`.

        Returns the checkpoint's flat metrics, or None between checkpoints. ``step`` must increase from call to
        call (ValueError otherwise)."""
        if self._closed:
            raise ValueError("the tracker is closed; create a new Tracker (resume=True to continue its store)")
        step = self._check_step(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} after step {self._last_step}: steps must increase (step t means 'after t "
                             "updates'; a loop restarted from a checkpoint needs a new Tracker with resume=True)")
        optimizer = unwrap_optimizer(optimizer)
        if self._returned is not None:
            self.train_seconds += time.perf_counter() - self._returned
        self._last_step = step
        result = None
        if self.is_due(step):
            result = self.measure(step, optimizer)
            self._state_cost()
        if self._needs_last_update() and self.is_due(step + 1):
            self._prev = (step, {n: p.detach().clone() for n, p in self.model.named_parameters()})
        self._returned = time.perf_counter()
        return result

    def _state_cost(self) -> None:
        """Once, at the first checkpoint after some training: what the probes cost against the training between
        checkpoints (a warning when more than :data:`PROBE_COST_WARN_RATIO` times; recorded in the manifest)."""
        if self._cost_stated or self.train_seconds <= 0 or self.n_measurements < 2:
            return
        self._cost_stated = True
        per_ck = self.probe_seconds / self.n_measurements
        ratio = self.probe_seconds / self.train_seconds
        text = (f"probes cost {per_ck:.3g} s per checkpoint, {ratio:.2g}x the training time so far "
                f"({self.train_seconds:.3g} s outside the tracker)")
        if self.store is not None:
            self.store.update_run(self.name, probe_cost=text)
        if ratio > PROBE_COST_WARN_RATIO:
            self._note(text + f"; to spend less, raise every= (now {self.every}) or use cheaper probe options "
                       "(r_med:per_layer=50, sharpness:tol=1e-3, trace:n_probes=10)")

    def _needs_last_update(self) -> bool:
        return any(probe_name(p) in ("update_norm", "adam_alignment") for p in self.probes)

    @contextlib.contextmanager
    def _rng_guard(self):
        dev = model_device(self.model)
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    @contextlib.contextmanager
    def _measuring_mode(self):
        modes = {n: m.training for n, m in self.model.named_modules()}
        try:
            if self.mode == "eval":
                self.model.eval()
            elif self.mode == "train":
                self.model.train()
            yield
        finally:
            for n, m in self.model.named_modules():
                m.training = modes.get(n, m.training)

    def _structure(self) -> tuple:
        """What the validation of the probe loss depends on besides the parameter values: each parameter's name,
        ``requires_grad``, dtype, device, shape and storage, each buffer's name, dtype, device and shape, and each
        module's identity and mode."""
        m = self.model
        return (tuple((n, p.requires_grad, p.dtype, p.device, tuple(p.shape), p.data_ptr())
                      for n, p in m.named_parameters()),
                tuple((n, b.dtype, b.device, tuple(b.shape)) for n, b in m.named_buffers()),
                tuple((id(mod), mod.training) for mod in m.modules()))

    def _checkpoint_hessian(self):
        """The Hessian of the loss on the probe data at the current parameters.

        Equal to ``Hessian(model, loss_fn, probe_data)``, which validates the problem with one forward pass (the
        data are accepted, the loss is a finite scalar). That validation is run once per model structure
        (:meth:`_structure`); at later checkpoints only the parameter values have changed, and the Hessian takes
        the loss and its finiteness check from its gradient-graph build instead (``Hessian._prevalidated``)."""
        from optiscope.curvature import Hessian
        from optiscope.curvature._problem import LossFunction

        problem = LossFunction.from_model(self.model, self.problem.loss_fn, self.problem.probe_batch)
        structure = self._structure()
        if structure == self._validated:
            return Hessian._prevalidated(self.model, problem)
        H = Hessian(self.model, self.problem.loss_fn, self.problem.probe_batch, _problem=problem)
        self._validated = structure
        return H

    def measure(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Run every probe now (whatever the schedule), store and log the rows; return the flat metrics."""
        if self._closed:
            raise ValueError("the tracker is closed")
        step = self._check_step(step)
        optimizer = unwrap_optimizer(optimizer)
        if self._resume_pending:
            self._drop_from(step)
        label = self.optimizer_name or (type(optimizer).__name__ if optimizer is not None else "")
        note = state_convention(optimizer)  # warns once per process
        if note:
            self._note(note, warn=False)
        last_update = None
        if self._prev is not None and self._prev[0] == step - 1:
            named = dict(self.model.named_parameters())
            last_update = {n: named[n].detach() - old for n, old in self._prev[1].items()
                           if n in self.problem.param_names}
        self._prev = None
        state = (_TrackerProbeState if not self.distributed else _DistributedProbeState)(
            step=step, model=self.model, optimizer=optimizer, problem=self.problem, run_name=self.name,
            seed=self.seed, cache=self._cache, last_update=last_update)
        if self.distributed:
            state.process_group = self.process_group
        else:
            state.make_hessian = self._checkpoint_hessian
        t0 = time.perf_counter()
        rows: list[dict] = []
        arrays_before = {m: len(v) for m, v in self._arrays.items()}
        with probe_guard(self.model), self._rng_guard(), self._measuring_mode(), warnings.catch_warnings():
            # stated once at construction (see notes); the Hessian would repeat it at every checkpoint
            warnings.filterwarnings("ignore", message="train-mode randomness is active")
            from optiscope.curvature._problem import NonFiniteLossError

            for pr in self.probes:
                try:
                    result = pr(self.problem, state)
                except NonFiniteLossError:
                    rows.append({"run": self.name, "optimizer": label, "step": step, "metric": "diverged",
                                 "layer": "", "value": float(step)})
                    break
                if not isinstance(result, Mapping):
                    raise ValueError(f"probe {probe_name(pr)!r} returned {type(result).__name__}; a probe must "
                                     "return a dict")
                rows.extend(_rows(result, self.name, label, step, self._arrays))
        if self.distributed:
            self._reduce_means(rows)
        seconds = time.perf_counter() - t0
        self.probe_seconds += seconds
        self.n_measurements += 1
        self._memory.extend(rows)
        if self.store is not None:
            new_arrays = {m for m, v in self._arrays.items() if len(v) != arrays_before.get(m, 0)}
            self._flush(rows, new_arrays, step)
        flat = flat_metrics(rows)
        for lg in self.loggers:
            lg.log_metrics(step, flat)
        return flat

    def _reduce_means(self, rows: list[dict]) -> None:
        """``loss``/``accuracy`` rows (means over this rank's probe data) -> sample-weighted means over all ranks
        (one all-reduce)."""
        import torch.distributed as dist

        mine = [r for r in rows if r["metric"] in ("loss", "accuracy") and not r["layer"]]
        if not mine:
            return
        w = sum(len(y) for _, y in self.problem.probe_batches) / self._n_probe_total
        t = torch.tensor([float(r["value"]) * w for r in mine], dtype=torch.float64)
        dist.all_reduce(t, group=self.process_group)
        for r, v in zip(mine, t.tolist()):
            r["value"] = v

    def _flush(self, rows: list[dict], new_arrays: set[str], step: int) -> None:
        from optiscope.lab.run import _safe_name

        st = self.store
        if rows:
            st.append_metrics(rows, part=f"{self.name}@{step}")  # one Parquet part per checkpoint
        for metric in new_arrays:
            st.write_arrays(_safe_name(f"{self.name}_{metric}"),
                            **{f"step_{s:08d}": a for s, a in sorted(self._arrays[metric].items())})
        st.update_run(self.name, status="running", last_step=step, probe_seconds=self.probe_seconds,
                      n_measurements=self.n_measurements, arrays=sorted(self._arrays))

    def _drop_from(self, step: int) -> None:
        self._resume_pending = False
        if self.store is None:
            return
        self.store.drop_metrics(self.name, after_step=step - 1)

    # -- end ---------------------------------------------------------------------------------------------
    def close(self, status: str = "finished") -> None:
        """Mark the run ``status`` in the manifest (with timings) and close the loggers; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.store is not None:
            self.store.update_run(self.name, status=status, seconds=time.perf_counter() - self._t0,
                                  probe_seconds=self.probe_seconds, train_seconds=self.train_seconds,
                                  n_measurements=self.n_measurements,
                                  last_step=self._last_step)
            self.store.set_status(status)
            try:
                self.store.compact_metrics()
            finally:
                self.store.release_lock()
        for lg in self.loggers:
            close = getattr(lg, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("finished" if exc_type is None else f"failed: {exc_type.__name__}: {exc}")

    def __repr__(self) -> str:
        where = f", store={str(self.store.root)!r}" if self.store is not None else ""
        return (f"Tracker({self.name!r}, probes={[probe_name(p) for p in self.probes]}, every={self.every}"
                f"{where}, measurements={self.n_measurements})")


