"""Runs: optimizers on a Problem with probes at checkpoints, stored so that nothing is lost (Jiang et al. 2023, §4 method).

- :class:`Run` trains one optimizer (or a sequence of optimizers, for :func:`switch`) for ``steps`` updates.
  Step ``t`` means "after t updates"; probes run at step 0, every ``probe_every`` steps, at ``probe_steps`` and at
  the last step. Batch ``t`` is a pure function of ``(data_seed, t)``, so a run resumed from a checkpoint sees the
  same batches as an uninterrupted one.
- :func:`compare`: several optimizers from deep copies of one initial model, with identical batch order.
- :func:`switch`: optimizer A until ``switch_step``, then B (Jiang et al. 2023, App. A.4).
- :func:`repeat`: R runs from one initial model with different data orders, mean/std per layer (Jiang et al. 2023, §4.1).
- :func:`match_by_loss`: for each checkpoint of A the checkpoint of B with the nearest training loss (App. A.3).

Divergence. A non-finite loss, gradient or parameter, or a loss above ``divergence_factor`` times the initial
loss (default :data:`DIVERGENCE_FACTOR` = 1e4; ``None``: only non-finite values), ends a run with status
``"diverged at step t"``; nothing raises, the last good checkpoint stays on disk, the other optimizers of a
comparison continue, and no probe is measured at or after step t (a diverged model's curvature is not a
measurement). The initial loss is the probe-batch loss at step 0.

Integrity (see :mod:`optiscope.lab.store`). A Run holds its store's writer lock while it executes; each checkpoint
records the run's name, the store's config hash and the run's *fingerprint* (a hash of everything that determines
its numbers: optimizer, steps, batches, probes, seeds, schedule, parameter shapes); ``resume=True`` refuses a run
whose fingerprint differs from the one recorded (naming the settings), skips a checkpoint that is corrupt or
belongs to another run and falls back to the previous valid one (saying so), and re-measures from an earlier
checkpoint when a metrics part or array file is damaged. ``resume=False`` starts the run over: its earlier rows,
arrays and checkpoints in the store are removed first.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from optiscope.lab.conventions import state_convention
from optiscope.lab.probes import ProbeState, make_probes, probe_guard, probe_name, pure_forward
from optiscope.lab.problem import Problem, forward, select
from optiscope.lab.store import METRIC_COLUMNS, RunStore, StoreError, config_hash, empty_metrics
from optiscope.utils.progress import progress_task
from optiscope.utils.spec import SpecError, parse_spec

OptimizerLike = Any  # "adam:lr=1e-3" | ("adam", {"lr": 1e-3}) | Callable[[params], torch.optim.Optimizer]

DIVERGENCE_FACTOR = 1e4
"""Default ``divergence_factor``: a loss above 1e4 x the initial loss counts as divergence. Loss spikes of stable
training (edge of stability, catapults) stay within a factor of about 10-100, while a runaway step size gives factors
of 1e5 and more (Adam at lr = 1e6 on digits: 2.4e5 after one update)."""


def count_arg(name: str, value: Any, minimum: int | None = 0, allow_none: bool = False) -> int | None:
    """``value`` as an int, refusing fractions, bools, NaN/inf and values below ``minimum`` with a ValueError that
    names the argument (``steps = 2.7 must be an integer``). Integral floats (``3.0``) are accepted."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} = {value!r} must be an integer")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)) or not float(value).is_integer():
            raise ValueError(f"{name} = {value!r} must be an integer")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} = {value!r} must be >= {minimum}")
    return v


def check_finite_spec(spec: Any, what: str = "optimizer") -> None:
    """ValueError if a spec string (``"adam:lr=nan"``) or ``(name, kwargs)`` pair holds a non-finite number."""
    if isinstance(spec, str):
        try:
            _, kw = parse_spec(spec, None, what)
        except SpecError:
            return
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
        kw = dict(spec[1])
    else:
        return

    def bad(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return any(bad(x) for x in v)
        return isinstance(v, float) and not math.isfinite(v)

    wrong = {k: v for k, v in kw.items() if bad(v)}
    if wrong:
        raise ValueError(f"{what} {spec!r}: {', '.join(f'{k} = {v!r}' for k, v in wrong.items())} is not a finite "
                         "number")


# ----------------------------------------------------------------------------------------------------------------
# optimizers and schedules
# ----------------------------------------------------------------------------------------------------------------
def optimizer_label(opt: OptimizerLike) -> str:
    """Short name of an optimizer spec: ``"adam:lr=1e-3"`` -> ``"adam"``; a factory -> its ``__name__``."""
    if isinstance(opt, str):
        return opt.split(":", 1)[0].strip()
    if isinstance(opt, tuple) and len(opt) == 2 and isinstance(opt[0], str):
        return opt[0]
    return getattr(opt, "__name__", None) or getattr(opt, "name", None) or type(opt).__name__


def build_optimizer(opt: OptimizerLike, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """A ``torch.optim.Optimizer`` from a spec string, ``(name, kwargs)`` or a factory ``params -> Optimizer``."""
    if isinstance(opt, (str, tuple)):
        from optiscope.optim import make_optimizer

        check_finite_spec(opt)
        try:
            return make_optimizer(opt, params)
        except SpecError:
            raise
        except TypeError as e:
            raise ValueError(f"optimizer {opt!r}: {e}") from None
    if callable(opt):
        out = opt(params)
        if not isinstance(out, torch.optim.Optimizer):
            raise ValueError(f"optimizer factory {opt!r} returned {type(out).__name__}, not a torch.optim.Optimizer")
        return out
    raise ValueError(f"optimizer {opt!r} is neither a spec string, a (name, kwargs) pair nor a factory")


def lr_factor_fn(schedule: Any, steps: int) -> Callable[[int], float] | None:
    """``step -> factor`` multiplying each parameter group's initial lr.

    ``None`` (constant), a callable, or a spec: ``"constant"``, ``"cosine"`` (``0.5(1+cos(pi t/T))``),
    ``"linear"`` (``1 - t/T``), ``"step:every=100,gamma=0.5"`` (``gamma^(t // every)``), ``"warmup:steps=50"``
    (``min(1, (t+1)/steps)``)."""
    if schedule is None:
        return None
    if callable(schedule):
        return schedule
    name, kw = parse_spec(str(schedule), ["constant", "cosine", "linear", "step", "warmup"], "lr schedule")
    T = max(int(steps), 1)
    try:
        if name == "constant":
            return lambda t: 1.0
        if name == "cosine":
            floor = float(kw.pop("min", 0.0))
            return lambda t: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
        if name == "linear":
            floor = float(kw.pop("min", 0.0))
            return lambda t: floor + (1 - floor) * (1 - min(t, T) / T)
        if name == "step":
            every, gamma = int(kw.pop("every")), float(kw.pop("gamma", 0.1))
            if every < 1:
                raise ValueError("every must be >= 1")
            return lambda t: gamma ** (t // every)
        if name == "warmup":
            w = int(kw.pop("steps"))
            if w < 1:
                raise ValueError("steps must be >= 1")
            return lambda t: min(1.0, (t + 1) / w)
    except KeyError as e:
        raise ValueError(f"lr schedule {schedule!r} needs option {e.args[0]!r}") from None
    finally:
        if kw:
            raise ValueError(f"lr schedule {schedule!r}: unknown options {sorted(kw)}")
    raise ValueError(f"unknown lr schedule {schedule!r}")  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------------
def batch_indices(step: int, n: int, batch_size: int, data_seed: int) -> torch.Tensor:
    """Indices of the batch used by update ``step``: batch ``step % nb`` of epoch ``step // nb``, where epoch ``e``
    is ``torch.randperm(n)`` from a ``torch.Generator`` seeded with ``(data_seed, e)`` and ``nb = n // batch_size``
    (the ragged tail of each epoch is dropped). A pure function of its arguments, hence resume-safe."""
    if batch_size >= n:
        return torch.arange(n)
    nb = n // batch_size
    epoch, j = divmod(int(step), nb)
    g = torch.Generator().manual_seed(int(data_seed) * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[j * batch_size:(j + 1) * batch_size]


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One run's outcome: its tidy metrics, status (``finished`` / ``diverged at step t``), final model and
    optimizer, timings and arrays (``{metric: {step: array}}``)."""

    name: str
    metrics: pd.DataFrame
    status: str
    diverged_at: int | None
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    seconds: float = 0.0
    probe_seconds: float = 0.0
    train_seconds: float = 0.0
    arrays: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        """Whether the run ended with ``diverged at step t``."""
        return self.diverged_at is not None

    def series(self, metric: str, layer: str = "") -> pd.Series:
        """``step -> value`` of one metric (and layer)."""
        df = self.metrics
        df = df[(df["metric"] == metric) & (df["layer"] == layer)]
        return pd.Series(df["value"].to_numpy(), index=df["step"].to_numpy(), name=metric)


@dataclass
class CompareResult:
    """:func:`compare`'s outcome: ``runs[name]`` per optimizer and all their metrics in one frame."""

    runs: dict[str, RunResult]
    metrics: pd.DataFrame

    def __getitem__(self, name: str) -> RunResult:
        """The result of run ``name``."""
        return self.runs[name]


@dataclass
class RepeatResult:
    """:func:`repeat`'s outcome: the runs, their metrics and the per-step mean/std summary."""

    runs: list[RunResult]
    metrics: pd.DataFrame
    summary: pd.DataFrame


def _rows_from(result: Mapping[str, Any], run: str, optimizer: str, step: int,
               arrays: dict[str, dict[int, np.ndarray]]) -> list[dict]:
    rows = []
    for metric, v in result.items():
        if isinstance(v, Mapping):
            for layer, x in v.items():
                rows.append({"run": run, "optimizer": optimizer, "step": step, "metric": metric,
                             "layer": str(layer), "value": float(x)})
        elif isinstance(v, (torch.Tensor, np.ndarray)) and np.asarray(v.detach().cpu() if isinstance(
                v, torch.Tensor) else v).ndim > 0:
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            arrays.setdefault(metric, {})[step] = arr
        else:
            x = float(v.item() if hasattr(v, "item") else v)
            rows.append({"run": run, "optimizer": optimizer, "step": step, "metric": metric, "layer": "",
                         "value": x})
    return rows


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ----------------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------------
class Run:
    """One optimizer (or a sequence, see :func:`switch`) on a :class:`Problem`; see ``docs/architecture.md``."""

    def __init__(self, problem: Problem, optimizer: OptimizerLike | Sequence[tuple[int, OptimizerLike]], steps: int,
                 batch_size: int = 128, probe_every: int = 0, probe_steps: Iterable[int] = (),
                 probes: Any = ("loss",), seed: int = 0, data_seed: int | None = None, lr_schedule: Any = None,
                 full_batch: bool = False, accumulation_chunks: int | None = None, name: str | None = None,
                 checkpoint: bool = True, model: nn.Module | None = None, label: str | None = None,
                 keep_checkpoints: int | None = None, divergence_factor: float | None = DIVERGENCE_FACTOR):
        if not isinstance(problem, Problem):
            raise ValueError(f"problem must be an optiscope.lab.Problem, got {type(problem).__name__}")
        steps = count_arg("steps", steps, 0)
        batch_size = count_arg("batch_size", batch_size, None if full_batch else 1)
        try:
            probe_every = count_arg("probe_every", probe_every, 0)
        except ValueError as e:
            raise ValueError(f"{e} (0: only probe_steps, first and last)") from None
        accumulation_chunks = count_arg("accumulation_chunks", accumulation_chunks, 1, allow_none=True)
        keep_checkpoints = count_arg("keep_checkpoints", keep_checkpoints, 1, allow_none=True)
        seed = count_arg("seed", seed, None)
        data_seed = count_arg("data_seed", data_seed, None, allow_none=True)
        if isinstance(probe_steps, (str, bytes)) or not isinstance(probe_steps, Iterable):
            raise ValueError(f"probe_steps = {probe_steps!r} must be a sequence of integers")
        probe_steps = [count_arg("probe_steps entry", s, None) for s in probe_steps]
        if divergence_factor is not None:
            if isinstance(divergence_factor, bool) or not isinstance(divergence_factor, (int, float)) \
                    or not math.isfinite(float(divergence_factor)) or float(divergence_factor) <= 1:
                raise ValueError(f"divergence_factor = {divergence_factor!r} must be a finite number > 1, or None")
        self.divergence_factor = None if divergence_factor is None else float(divergence_factor)
        bad = [s for s in probe_steps if not 0 <= int(s) <= int(steps)]
        if bad:
            raise ValueError(f"probe_steps {bad} lie outside [0, steps={steps}]")
        self.problem = problem
        if isinstance(optimizer, list) and optimizer and isinstance(optimizer[0], tuple) \
                and isinstance(optimizer[0][0], int):
            self.phases = [(int(s), o) for s, o in optimizer]
            if self.phases[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(self.phases, self.phases[1:])):
                raise ValueError("optimizer phases must start at step 0 and have increasing start steps")
        else:
            self.phases = [(0, optimizer)]
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.probe_every = int(probe_every)
        self.probe_steps = sorted({int(s) for s in probe_steps})
        self.probes = make_probes(probes)
        self.seed = int(seed)
        self.data_seed = self.seed if data_seed is None else int(data_seed)
        self.lr_factor = lr_factor_fn(lr_schedule, self.steps)
        self.full_batch = bool(full_batch)
        self.accumulation_chunks = None if accumulation_chunks is None else int(accumulation_chunks)
        self.label = label or "->".join(optimizer_label(o) for _, o in self.phases)
        self.name = name or self.label
        self.checkpoint = bool(checkpoint)
        self.model = model if model is not None else problem.model
        self.keep_checkpoints = keep_checkpoints
        self._lr_schedule = lr_schedule
        self._reference_loss: float | None = None

    # -- schedule ---------------------------------------------------------------------------------------
    def is_probe_step(self, step: int) -> bool:
        """Whether probes run after ``step`` updates: step 0, the last step, ``probe_steps``, multiples of
        ``probe_every``."""
        return (step == 0 or step == self.steps or step in self.probe_steps
                or (self.probe_every > 0 and step % self.probe_every == 0))

    def _phase_at(self, step: int) -> int:
        return max(i for i, (s, _) in enumerate(self.phases) if s <= step)

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _new_optimizer(self, phase: int) -> torch.optim.Optimizer:
        opt = build_optimizer(self.phases[phase][1], [p for _, p in self._trainable()])
        for g in opt.param_groups:
            g.setdefault("initial_lr", g.get("lr", 0.0))
        return opt

    # -- one update ---------------------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = self.problem.train
        if self.full_batch:
            return X, y
        idx = batch_indices(step, len(y), self.batch_size, self.data_seed)
        return select(X, idx), select(y, idx)

    def _loss_and_grad(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Accumulate into ``.grad`` the exact gradient of the mean loss over (X, y), in chunks; return the loss."""
        n = len(y)
        k = min(self.accumulation_chunks or 1, n)
        bounds = np.linspace(0, n, k + 1).astype(int)
        total = 0.0
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b <= a:
                continue
            loss = self.problem.loss_fn(forward(self.model, select(X, slice(a, b))), y[a:b])
            w = (b - a) / n
            (loss * w).backward()
            total += float(loss.detach()) * w
        return total

    # -- identity -------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that determines this run's numbers (JSON-able): the basis of :meth:`fingerprint`."""
        def spec(o: Any) -> Any:
            if isinstance(o, str):
                return o.replace(" ", "")
            if isinstance(o, tuple) and len(o) == 2:
                return [o[0], {str(k): repr(v) for k, v in dict(o[1] or {}).items()}]
            return getattr(o, "__qualname__", None) or type(o).__qualname__

        sched = self._lr_schedule
        return {"name": self.name, "optimizer": [[s, spec(o)] for s, o in self.phases], "steps": self.steps,
                "batch_size": None if self.full_batch else self.batch_size, "full_batch": self.full_batch,
                "probe_every": self.probe_every, "probe_steps": list(self.probe_steps),
                "probes": [probe_name(p) for p in self.probes], "seed": self.seed, "data_seed": self.data_seed,
                "lr_schedule": sched if sched is None or isinstance(sched, str) else spec(sched),
                "accumulation_chunks": self.accumulation_chunks, "divergence_factor": self.divergence_factor,
                "parameters": [[n, list(p.shape), str(p.dtype).replace("torch.", "")] for n, p in self._trainable()]}

    def fingerprint(self) -> str:
        """Hash of :meth:`settings`; recorded in the manifest and in every checkpoint, checked on resume."""
        return config_hash(self.settings())

    # -- storage helpers -----------------------------------------------------------------------------------
    def _flush(self, store: RunStore | None, rows: list[dict], arrays: dict, new_arrays: set, step: int = 0) -> None:
        self._memory.extend(rows)
        if store is None:
            return
        try:
            if rows:
                store.append_metrics(rows, part=f"{_safe_name(self.name)}@{int(step):08d}")
                self._rows_written += len(rows)
            for metric in new_arrays:
                store.write_arrays(_safe_name(f"{self.name}_{metric}"),
                                   **{f"step_{s:08d}": a for s, a in sorted(arrays[metric].items())})
        except OSError as e:
            raise StoreError(f"could not write run data in {store.root}: {e}; data written before is intact") from e

    def _identity(self, store: RunStore) -> dict[str, Any]:
        return {"run": self.name, "config_hash": store.config_hash(), "fingerprint": self.fingerprint()}

    def _save_checkpoint(self, store: RunStore | None, step: int, opt, phase: int, cache: dict,
                         last_update, rng_state) -> None:
        if store is None or not self.checkpoint:
            return
        state = {"step": step, "phase": phase, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                 "probe_cache": cache, "last_update": last_update, "torch_rng": rng_state, "run": self.name,
                 "reference_loss": self._reference_loss}
        try:
            meta = {**self._identity(store), "rows": self._rows_written,
                    "arrays": {m: sum(1 for s in v if s <= step) for m, v in self._arrays.items()}}
            store.save_checkpoint(step, state, tag=_safe_name(self.name), meta=meta)
        except OSError as e:
            raise StoreError(f"could not write checkpoint in {store.root}: {e}; earlier checkpoints are intact") from e
        if self.keep_checkpoints:
            for _, p in store.list_checkpoints(_safe_name(self.name))[:-int(self.keep_checkpoints)]:
                store.delete_checkpoint(p)

    def _prepare_fresh(self, store: RunStore) -> None:
        """``resume=False`` (or nothing valid to resume from): remove this run's earlier rows, arrays and
        checkpoints so nothing is duplicated."""
        store.drop_metrics(self.name, -1)
        for _, p in store.list_checkpoints(_safe_name(self.name)):
            store.delete_checkpoint(p)
        prefix = _safe_name(f"{self.name}_")
        for p in store.path("arrays").glob(f"{prefix}*.npz") if store.path("arrays").is_dir() else []:
            p.unlink(missing_ok=True)

    def _restore(self, store: RunStore, warnings: list[str], arrays: dict) -> tuple[dict | None, dict]:
        """Resume: check the recorded fingerprint, then take the newest checkpoint that is valid (its record, hash,
        run, config hash and fingerprint check out) and whose metrics rows and arrays are all still there (counts
        recorded in the checkpoint); drop what was measured after it. Every checkpoint skipped is named in
        ``warnings``; damaged files are moved aside. Returns ``(checkpoint or None, manifest entry)``."""
        try:
            info = (store.read_manifest().get("runs") or {}).get(self.name, {})
        except StoreError as e:
            warnings.append(f"{e}; relying on the checkpoint records")
            info = {}
        recorded = info.get("settings")
        if info.get("fingerprint") not in (None, self.fingerprint()):
            from optiscope.lab.store import config_differences

            diffs = config_differences(recorded, self.settings()) if isinstance(recorded, Mapping) else []
            raise ValueError(f"run {self.name!r} in {store.root} was started with other settings"
                             + (": " + "; ".join(diffs) if diffs else "") + "; refusing to resume it")
        df, problems = store.read_metrics_tolerant()
        for path, msg in problems:
            store.quarantine(path, "is corrupt or partial")
            warnings.append(f"{msg}; moved aside, the rows it held are re-measured")
        own = df[df["run"] == self.name]
        loaded_arrays: dict[str, dict[int, np.ndarray] | None] = {}

        def array_steps(metric: str) -> dict[int, np.ndarray] | None:
            if metric not in loaded_arrays:
                name = _safe_name(f"{self.name}_{metric}")
                try:
                    z = store.read_arrays(name)
                    loaded_arrays[metric] = {int(k[5:]): v for k, v in z.items()}
                except StoreError as e:
                    if "missing" not in str(e):
                        store.quarantine(store.path("arrays", f"{name}.npz"), "is corrupt")
                    warnings.append(str(e))
                    loaded_arrays[metric] = None
            return loaded_arrays[metric]

        expect = self._identity(store)
        ck = None
        for step, path in reversed(store.list_checkpoints(_safe_name(self.name))):
            try:
                state = store.load_checkpoint(path, expect=expect)
                meta = store.checkpoint_meta(path)
            except StoreError as e:
                warnings.append(f"{e}; falling back to an earlier checkpoint")
                if path.exists():
                    store.quarantine(path, "failed verification")
                    store.quarantine(path.with_suffix(".json"), "belongs to a checkpoint that failed verification")
                continue
            n_rows = int(((own["step"] < step) | ((own["step"] == step) & (own["metric"] != "batch_loss"))).sum())
            if n_rows != meta.get("rows", n_rows):
                warnings.append(f"metrics of run {self.name!r} up to step {step} are incomplete ({n_rows} of "
                                f"{meta.get('rows')} rows); falling back to an earlier checkpoint")
                continue
            short = []
            for metric, n in (meta.get("arrays") or {}).items():
                got = array_steps(metric)
                if got is None or sum(1 for s in got if s <= step) != n:
                    short.append(metric)
            if short:
                warnings.append(f"arrays {short} of run {self.name!r} up to step {step} are incomplete; falling "
                                "back to an earlier checkpoint")
                continue
            ck = state
            self._rows_written = int(meta.get("rows", n_rows))
            for metric in meta.get("arrays") or {}:
                arrays[metric] = {s: a for s, a in (array_steps(metric) or {}).items() if s <= step}
            break
        if ck is None:
            if store.list_checkpoints(_safe_name(self.name)) or not own.empty:
                warnings.append(f"no valid checkpoint of run {self.name!r} with complete metrics: re-running it "
                                "from step 0")
            self._prepare_fresh(store)
            return None, info
        c = int(ck["step"])
        diverged_here = str(info.get("status", "")).startswith("diverged") and int(info.get("last_step", c)) == c
        if not diverged_here:
            store.drop_metrics(self.name, c)
        return ck, info

    # -- main loop -----------------------------------------------------------------------------------------
    def execute(self, store: RunStore | str | Path | None = None, resume: bool = False) -> RunResult:
        """Train, probe and store; return a :class:`RunResult` (see module docstring). Holds the store's writer
        lock throughout (``RunLockedError`` if another process writes it)."""
        if store is not None and not isinstance(store, RunStore):
            store = RunStore(store)
        if store is None:
            return self._execute(None, resume)
        store.acquire_lock()
        try:
            return self._execute(store, resume)
        finally:
            store.release_lock()

    def _announce_probe_budget(self, start: int) -> None:
        """Before training: print the probes' HVPs per checkpoint and their ETA from one timed HVP
        (:func:`optiscope.lab.probes.probe_budget`), and warn (``UserWarning``) when they would cost more than 3x
        the training time. Skipped when no probe needs the Hessian; a failed estimate never stops the run."""
        import warnings as pywarnings

        from optiscope.lab.probes import probe_budget, probe_hvps
        from optiscope.utils import progress

        if not any(probe_hvps(p, self.problem, self.model) for p in self.probes):
            return
        n_checkpoints = sum(1 for s in range(start, self.steps + 1) if self.is_probe_step(s))
        batch = self.problem.n_train if self.full_batch else self.batch_size
        try:
            budget = probe_budget(self.probes, self.problem, n_checkpoints, steps=self.steps - start,
                                  batch_size=batch, model=self.model)
        except Exception as e:  # noqa: BLE001 - an estimate only
            print(f"warning: {self.name}: probe budget not estimated ({type(e).__name__}: {e})", file=sys.stderr)
            return
        if not progress.quiet_requested():
            print(f"{self.name}: {budget.summary()}", file=sys.stderr)  # also when piped (not a progress bar)
        if budget.warning():
            pywarnings.warn(f"{self.name}: {budget.warning()}", UserWarning, stacklevel=3)

    def _execute(self, store: RunStore | None, resume: bool) -> RunResult:
        t_start = time.perf_counter()
        warnings: list[str] = []
        arrays: dict[str, dict[int, np.ndarray]] = {}
        cache: dict = {}
        last_update: dict[str, torch.Tensor] | None = None
        step, phase, ck = 0, 0, None
        self._memory: list[dict] = []
        self._pending_rows: list[dict] = []
        self._reference_loss: float | None = None
        self._warned_nonfinite: set[str] = set()
        self._rows_written = 0
        self._arrays = arrays

        if store is not None and resume:
            ck, info = self._restore(store, warnings, arrays)
            if ck is not None:
                self.model.load_state_dict(ck["model"])
                step, phase = int(ck["step"]), int(ck["phase"])
                cache = _to_model_device(ck.get("probe_cache") or {}, self.model)
                last_update = _to_model_device(ck.get("last_update"), self.model)
                self._reference_loss = ck.get("reference_loss")
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr)
            if ck is not None and str(info.get("status", "")).startswith("diverged") \
                    and int(info.get("last_step", step)) == step:
                return self._finish(store, step, info["status"], info.get("diverged_at"), None, arrays,
                                    t_start, 0.0, 0.0, warnings)
        elif store is not None:
            self._prepare_fresh(store)

        opt = self._new_optimizer(phase)
        if ck is not None:
            opt.load_state_dict(ck["optimizer"])
        notes = [n for n in [state_convention(opt)] if n]  # e.g. optiscope adam: eps inside the square root
        self._announce_probe_budget(step)
        if store is not None:
            store.update_run(self.name, status="running", optimizer=self.label, steps=self.steps,
                             fingerprint=self.fingerprint(), settings=self.settings(),
                             **({"warnings": warnings} if warnings else {}), **({"notes": notes} if notes else {}))

        status, diverged_at = "finished", None
        probe_seconds = train_seconds = 0.0
        with torch.random.fork_rng(devices=[]):
            if ck is not None:
                torch.set_rng_state(ck["torch_rng"])
            else:
                torch.manual_seed(self.seed)
            probed_at = step if ck is not None else -1
            with progress_task(f"{self.name}", total=self.steps) as bar:
                bar.advance(step)
                while True:
                    if self.is_probe_step(step) and probed_at != step:
                        t0 = time.perf_counter()
                        rows, new_arrays, bad = self._probe(step, opt, cache, last_update, arrays, bar, warnings)
                        probe_seconds += time.perf_counter() - t0
                        self._flush(store, rows, arrays, new_arrays, step)
                        if bad is not None:
                            status, diverged_at = f"diverged at step {step}", step
                            break
                        self._save_checkpoint(store, step, opt, phase, cache, last_update, torch.get_rng_state())
                        if store is not None:
                            store.update_run(self.name, last_step=step, arrays=sorted(arrays))
                        probed_at = step
                    if step >= self.steps:
                        break
                    # -- one update: step -> step + 1
                    t0 = time.perf_counter()
                    new_phase = self._phase_at(step)
                    if new_phase != phase:
                        phase, opt = new_phase, self._new_optimizer(new_phase)
                        state_convention(opt)
                    if self.lr_factor is not None:
                        f = float(self.lr_factor(step))
                        for g in opt.param_groups:
                            g["lr"] = g["initial_lr"] * f
                    X, y = self._batch(step)
                    self.model.train()
                    opt.zero_grad(set_to_none=True)
                    loss = self._loss_and_grad(X, y)
                    grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for _, p in self._trainable())
                    if not (math.isfinite(loss) and grads_ok) or self._too_large(loss):
                        status, diverged_at = f"diverged at step {step}", step
                        self._flush(store, self._take_pending() + [
                            self._diverged_row(step)], arrays, set(), step)
                        break
                    before = [p.detach().clone() for _, p in self._trainable()]
                    opt.step()
                    params_ok = all(bool(torch.isfinite(p).all()) for _, p in self._trainable())
                    last_update = {n: (p.detach() - b) for (n, p), b in zip(self._trainable(), before)}
                    step += 1
                    train_seconds += time.perf_counter() - t0
                    self._pending_rows.append({"run": self.name, "optimizer": self.label, "step": step - 1,
                                               "metric": "batch_loss", "layer": "", "value": loss})
                    if not params_ok:
                        status, diverged_at = f"diverged at step {step}", step
                        self._flush(store, self._take_pending() + [
                            self._diverged_row(step)], arrays, set(), step)
                        break
                    bar.advance(1)
        return self._finish(store, step, status, diverged_at, opt, arrays, t_start, probe_seconds, train_seconds,
                            warnings)

    def _too_large(self, loss: float) -> bool:
        """Loss above ``divergence_factor`` x the initial (step-0 probe) loss."""
        ref = self._reference_loss
        return (self.divergence_factor is not None and ref is not None and ref > 0
                and loss > self.divergence_factor * ref)

    def _diverged_row(self, step: int) -> dict:
        """The tidy row that records ``diverged at step t`` (value = t)."""
        return {"run": self.name, "optimizer": self.label, "step": step, "metric": "diverged", "layer": "",
                "value": float(step)}

    def _take_pending(self) -> list[dict]:
        rows, self._pending_rows = getattr(self, "_pending_rows", []), []
        return rows

    def _probe(self, step, opt, cache, last_update, arrays, bar, warnings=None):
        """Run all probes at ``step``; return (rows, names of arrays updated, the loss that shows divergence or
        None). A diverged model is not probed: only the pending minibatch losses and the ``diverged`` row."""
        state = ProbeState(step=step, model=self.model, optimizer=opt, problem=self.problem, run_name=self.name,
                           seed=self.seed, cache=cache, last_update=last_update)
        rows = self._take_pending()
        new_arrays: set[str] = set()
        with probe_guard(self.model), torch.no_grad():
            batches = self.problem.probe_batches
            total = sum(len(y) for _, y in batches)
            probe_loss = sum(float(self.problem.loss_fn(pure_forward(self.model, X), y)) * len(y) / total
                             for X, y in batches)
        if step == 0 and self._reference_loss is None and math.isfinite(probe_loss):
            self._reference_loss = probe_loss
        if not math.isfinite(probe_loss) or self._too_large(probe_loss) \
                or not all(bool(torch.isfinite(p).all()) for _, p in self._trainable()):
            rows.append(self._diverged_row(step))
            return rows, new_arrays, probe_loss
        bad = None
        probe_rows: list[dict] = []
        with probe_guard(self.model):
            for pr in self.probes:
                pname = probe_name(pr)
                bar.update(description=f"{self.name} [probe {pname} @ {step}]")
                result = pr(self.problem, state)
                if not isinstance(result, Mapping):
                    raise ValueError(f"probe {pname!r} returned {type(result).__name__}; a probe must return a dict")
                before = {m: len(v) for m, v in arrays.items()}
                probe_rows.extend(_rows_from(result, self.name, self.label, step, arrays))
                new_arrays |= {m for m, v in arrays.items() if len(v) != before.get(m, 0)}
        bar.update(description=f"{self.name}")
        for r in probe_rows:
            if r["metric"] == "loss" and r["step"] == step and (not math.isfinite(r["value"])
                                                               or self._too_large(r["value"])):
                bad = r["value"]
                for m in new_arrays:
                    arrays[m].pop(step, None)
                return rows + [self._diverged_row(step)], set(), bad
        for r in probe_rows:
            if not math.isfinite(r["value"]) and r["metric"] not in self._warned_nonfinite:
                self._warned_nonfinite.add(r["metric"])
                msg = (f"run {self.name!r}: probe metric {r['metric']!r} is {r['value']} at step {step}"
                       + (f" (layer {r['layer']})" if r["layer"] else "") + " although the loss is finite")
                print(f"warning: {msg}", file=sys.stderr)
                if warnings is not None:
                    warnings.append(msg)
        return rows + probe_rows, new_arrays, bad

    def _finish(self, store, step, status, diverged_at, opt, arrays, t_start, probe_seconds, train_seconds,
                warnings) -> RunResult:
        pending = self._take_pending()
        seconds = time.perf_counter() - t_start
        if store is not None:
            self._flush(store, pending, arrays, set(), step)
            store.update_run(self.name, status=status, diverged_at=diverged_at, seconds=seconds,
                             probe_seconds=probe_seconds, train_seconds=train_seconds,
                             **({"warnings": warnings} if warnings else {}))
            try:
                store.compact_metrics()
            except (StoreError, OSError) as e:
                warnings.append(f"metrics not compacted: {e}")
            df = store.read_metrics()
            metrics = df[df["run"] == self.name].reset_index(drop=True)
        else:
            self._memory.extend(pending)
            metrics = pd.DataFrame(self._memory, columns=METRIC_COLUMNS) if self._memory else empty_metrics()
        return RunResult(self.name, metrics, status, diverged_at, self.model, opt, seconds, probe_seconds,
                         train_seconds, arrays)


def _to_model_device(obj: Any, model: nn.Module) -> Any:
    """Tensors of a loaded checkpoint (read onto the CPU) moved to the model's device."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type == "cpu" or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to_model_device(v, model) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_model_device(v, model) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# compare / switch / repeat
# ----------------------------------------------------------------------------------------------------------------
def _open(store) -> RunStore | None:
    if store is None or isinstance(store, RunStore):
        return store
    return RunStore(store)


def compare(problem: Problem, optimizers: Mapping[str, OptimizerLike], steps: int, store: Any = None,
            resume: bool = False, **run_kwargs: Any) -> CompareResult:
    """Train every optimizer in ``optimizers`` (``{name: spec}``) from a deep copy of the same initial model with the
    same batch order (Jiang et al. 2023, §4: "we started from the same initial weights"). ``problem.model`` is not changed.
    A diverging optimizer is recorded (``"diverged at step t"``) and the others continue. ``run_kwargs`` go to
    :class:`Run`."""
    if not isinstance(optimizers, Mapping) or not optimizers:
        raise ValueError("compare needs a non-empty mapping {name: optimizer spec}")
    steps = count_arg("steps", steps, 0)
    store = _open(store)
    init = copy.deepcopy(problem.model)
    plan = []
    for name, opt in optimizers.items():
        label = optimizer_label(opt)
        plan.append(Run(problem, opt, steps, name=name, model=copy.deepcopy(init),
                        label=name if label.startswith("<") else label, **run_kwargs))
    if store is None:
        runs = {r.name: r.execute(store=None) for r in plan}
        return CompareResult(runs, pd.concat([r.metrics for r in runs.values()], ignore_index=True))
    with store.lock():
        try:
            kind = store.read_manifest().get("kind", "compare")
        except StoreError:
            kind = "compare"
        store.set_status("running", kind=kind, runs_order=list(optimizers))
        runs: dict[str, RunResult] = {}
        try:
            for run in plan:
                runs[run.name] = run.execute(store=store, resume=resume)
        except BaseException as exc:
            store.set_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        metrics = pd.concat([r.metrics for r in runs.values()], ignore_index=True)
        n_div = sum(r.diverged for r in runs.values())
        store.set_status("finished" if n_div == 0 else f"finished ({n_div} of {len(runs)} diverged)",
                         seconds=sum(r.seconds for r in runs.values()))
    return CompareResult(runs, metrics)


def switch(problem: Problem, first: OptimizerLike, second: OptimizerLike, switch_step: int, steps: int,
           store: Any = None, resume: bool = False, name: str | None = None, **run_kwargs: Any) -> RunResult:
    """Optimizer ``first`` for updates ``[0, switch_step)``, then a freshly initialised ``second`` (Jiang et al. 2023, App. A.4,
    "Adam after SGD"). Trains a deep copy of ``problem.model``; rows carry optimizer ``"first->second"``."""
    steps = count_arg("steps", steps, 0)
    switch_step = count_arg("switch_step", switch_step, None)
    if not 0 < int(switch_step) < int(steps):
        raise ValueError(f"switch_step = {switch_step!r} must lie strictly between 0 and steps = {steps}")
    run = Run(problem, [(0, first), (int(switch_step), second)], steps, name=name,
              model=copy.deepcopy(problem.model), **run_kwargs)
    return run.execute(store=_open(store), resume=resume)


def repeat(problem: Problem, optimizer: OptimizerLike, n_repeats: int, steps: int, store: Any = None,
           resume: bool = False, name: str | None = None, seed: int = 0, **run_kwargs: Any) -> RepeatResult:
    """``n_repeats`` runs from the same initial model with data orders ``data_seed = seed + r`` (Jiang et al. 2023, §4.1:
    "repeated 12 times starting from the same initialization"); ``summary`` has the mean and sample standard
    deviation of every metric and layer at every step over the runs that reached it."""
    n_repeats = count_arg("n_repeats", n_repeats, 1)
    store = _open(store)
    base = name or optimizer_label(optimizer)
    init = copy.deepcopy(problem.model)
    runs = [Run(problem, optimizer, steps, name=f"{base}/r{r}", label=optimizer_label(optimizer), seed=seed,
                data_seed=seed + r, model=copy.deepcopy(init), **run_kwargs).execute(store=store, resume=resume)
            for r in range(int(n_repeats))]
    metrics = pd.concat([r.metrics for r in runs], ignore_index=True)
    return RepeatResult(runs, metrics, summarize_repeats(metrics))


def summarize_repeats(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; 0 for a single run) and count per ``(metric, layer, step)``."""
    g = metrics.groupby(["metric", "layer", "step"])["value"]
    out = g.agg(mean="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0, n="count").reset_index()
    return out


# ----------------------------------------------------------------------------------------------------------------
# match by loss
# ----------------------------------------------------------------------------------------------------------------
def _curve(metrics: Any, metric: str, layer: str) -> pd.Series:
    df = metrics.metrics if isinstance(metrics, RunResult) else metrics
    df = df[(df["metric"] == metric) & (df["layer"] == layer)]
    if df.empty:
        raise ValueError(f"no rows for metric {metric!r} (layer {layer!r}); present: {sorted(set(metrics['metric']) if not isinstance(metrics, RunResult) else set(metrics.metrics['metric']))}")
    if df["run"].nunique() > 1:
        raise ValueError(f"metrics hold several runs {sorted(df['run'].unique())}; pass one run's rows")
    s = df.groupby("step")["value"].mean().sort_index()
    return s[np.isfinite(s.to_numpy())]


def match_by_loss(metrics_a: Any, metrics_b: Any, metric: str = "loss", layer: str = "") -> pd.DataFrame:
    """For each checkpoint ``t1`` of run A, the checkpoint ``t2`` of run B whose ``metric`` (training loss) is nearest
    to A's (Jiang et al. 2023, App. A.3: compare R_med^Adam(t1) with R_med^SGD(t2) where the losses are equal).

    Columns: ``step_a, value_a, step_b, value_b, step_b_interp``; ``step_b_interp`` is the (fractional) step at
    which B's piecewise-linear curve first reaches ``value_a`` (NaN if it never does)."""
    a, b = _curve(metrics_a, metric, layer), _curve(metrics_b, metric, layer)
    sb, vb = b.index.to_numpy(dtype=float), b.to_numpy(dtype=float)
    rows = []
    for t1, v1 in a.items():
        j = int(np.argmin(np.abs(vb - v1)))
        interp = float("nan")
        for k in range(len(vb)):
            if vb[k] == v1:
                interp = sb[k]
                break
            if k + 1 < len(vb) and (vb[k] - v1) * (vb[k + 1] - v1) < 0:
                interp = sb[k] + (v1 - vb[k]) / (vb[k + 1] - vb[k]) * (sb[k + 1] - sb[k])
                break
        rows.append({"step_a": int(t1), "value_a": float(v1), "step_b": int(sb[j]), "value_b": float(vb[j]),
                     "step_b_interp": interp})
    return pd.DataFrame(rows, columns=["step_a", "value_a", "step_b", "value_b", "step_b_interp"])


def matched_values(metrics_a: Any, metrics_b: Any, matches: pd.DataFrame, metric: str = "r_med") -> pd.DataFrame:
    """Per layer, ``metric`` of A at ``step_a`` next to ``metric`` of B at the matched ``step_b`` (App. A.3 tables)."""
    da = metrics_a.metrics if isinstance(metrics_a, RunResult) else metrics_a
    db = metrics_b.metrics if isinstance(metrics_b, RunResult) else metrics_b
    da, db = da[da["metric"] == metric], db[db["metric"] == metric]
    rows = []
    for _, m in matches.iterrows():
        xa = da[da["step"] == m["step_a"]].set_index("layer")["value"]
        xb = db[db["step"] == m["step_b"]].set_index("layer")["value"]
        for layer in xa.index.intersection(xb.index):
            rows.append({"layer": layer, "step_a": int(m["step_a"]), "value_a": float(xa[layer]),
                         "step_b": int(m["step_b"]), "value_b": float(xb[layer])})
    return pd.DataFrame(rows, columns=["layer", "step_a", "value_a", "step_b", "value_b"])
