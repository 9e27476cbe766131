"""Runs: optimizers on a Problem with probes at checkpoints, stored so that nothing is lost (seed 000 §4 method).

- :class:`Run` trains one optimizer (or a sequence of optimizers, for :func:`switch`) for ``steps`` updates.
  Step ``t`` means "after t updates"; probes run at step 0, every ``probe_every`` steps, at ``probe_steps`` and at
  the last step. Batch ``t`` is a pure function of ``(data_seed, t)``, so a run resumed from a checkpoint sees the
  same batches as an uninterrupted one.
- :func:`compare`: several optimizers from deep copies of one initial model, with identical batch order.
- :func:`switch`: optimizer A until ``switch_step``, then B (seed 000 App. A.4).
- :func:`repeat`: R runs from one initial model with different data orders, mean/std per layer (seed 000 §4.1).
- :func:`match_by_loss`: for each checkpoint of A the checkpoint of B with the nearest training loss (App. A.3).

Non-finite loss, gradient or parameters end a run with status ``"diverged at step t"``; nothing raises, the last
good checkpoint stays on disk, and the other optimizers of a comparison continue.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from optiscope.lab.probes import ProbeState, make_probes, probe_guard, probe_name, pure_forward
from optiscope.lab.problem import Problem
from optiscope.lab.store import METRIC_COLUMNS, RunStore, StoreError, empty_metrics
from optiscope.utils.progress import progress_task
from optiscope.utils.spec import SpecError, parse_spec

OptimizerLike = Any  # "adam:lr=1e-3" | ("adam", {"lr": 1e-3}) | Callable[[params], torch.optim.Optimizer]


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
        return self.diverged_at is not None

    def series(self, metric: str, layer: str = "") -> pd.Series:
        """``step -> value`` of one metric (and layer)."""
        df = self.metrics
        df = df[(df["metric"] == metric) & (df["layer"] == layer)]
        return pd.Series(df["value"].to_numpy(), index=df["step"].to_numpy(), name=metric)


@dataclass
class CompareResult:
    runs: dict[str, RunResult]
    metrics: pd.DataFrame

    def __getitem__(self, name: str) -> RunResult:
        return self.runs[name]


@dataclass
class RepeatResult:
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
                 keep_checkpoints: int | None = None):
        if not isinstance(problem, Problem):
            raise ValueError(f"problem must be an optiscope.lab.Problem, got {type(problem).__name__}")
        if int(steps) < 0:
            raise ValueError(f"steps = {steps!r} must be >= 0")
        if not full_batch and int(batch_size) < 1:
            raise ValueError(f"batch_size = {batch_size!r} must be >= 1")
        if int(probe_every) < 0:
            raise ValueError(f"probe_every = {probe_every!r} must be >= 0 (0: only probe_steps, first and last)")
        if accumulation_chunks is not None and int(accumulation_chunks) < 1:
            raise ValueError(f"accumulation_chunks = {accumulation_chunks!r} must be >= 1")
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

    # -- schedule ---------------------------------------------------------------------------------------
    def is_probe_step(self, step: int) -> bool:
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
        idx = batch_indices(step, len(X), self.batch_size, self.data_seed)
        return X[idx], y[idx]

    def _loss_and_grad(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Accumulate into ``.grad`` the exact gradient of the mean loss over (X, y), in chunks; return the loss."""
        n = len(X)
        k = min(self.accumulation_chunks or 1, n)
        bounds = np.linspace(0, n, k + 1).astype(int)
        total = 0.0
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b <= a:
                continue
            loss = self.problem.loss_fn(self.model(X[a:b]), y[a:b])
            w = (b - a) / n
            (loss * w).backward()
            total += float(loss.detach()) * w
        return total

    # -- storage helpers -----------------------------------------------------------------------------------
    def _flush(self, store: RunStore | None, rows: list[dict], arrays: dict, new_arrays: set) -> None:
        self._memory.extend(rows)
        if store is None:
            return
        try:
            if rows:
                store.append_metrics(rows)
            for metric in new_arrays:
                store.write_arrays(_safe_name(f"{self.name}_{metric}"),
                                   **{f"step_{s:08d}": a for s, a in sorted(arrays[metric].items())})
        except OSError as e:
            raise StoreError(f"could not write run data in {store.root}: {e}; data written before is intact") from e

    def _save_checkpoint(self, store: RunStore | None, step: int, opt, phase: int, cache: dict,
                         last_update, rng_state) -> None:
        if store is None or not self.checkpoint:
            return
        state = {"step": step, "phase": phase, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                 "probe_cache": cache, "last_update": last_update, "torch_rng": rng_state, "run": self.name}
        try:
            store.save_checkpoint(step, state, tag=_safe_name(self.name))
        except OSError as e:
            raise StoreError(f"could not write checkpoint in {store.root}: {e}; earlier checkpoints are intact") from e
        if self.keep_checkpoints:
            for _, p in store.list_checkpoints(_safe_name(self.name))[:-int(self.keep_checkpoints)]:
                p.unlink(missing_ok=True)

    def _load_last_checkpoint(self, store: RunStore, warnings: list[str]) -> dict | None:
        for step, path in reversed(store.list_checkpoints(_safe_name(self.name))):
            try:
                ck = store.load_checkpoint(path)
                if ck.get("step") != step:
                    raise StoreError(f"checkpoint {path} is inconsistent (step {ck.get('step')} != {step})")
                return ck
            except StoreError as e:
                warnings.append(f"{e}; falling back to an earlier checkpoint")
        return None

    # -- main loop -----------------------------------------------------------------------------------------
    def execute(self, store: RunStore | str | Path | None = None, resume: bool = False) -> RunResult:
        """Train, probe and store; return a :class:`RunResult` (see module docstring)."""
        if store is not None and not isinstance(store, RunStore):
            store = RunStore(store)
        t_start = time.perf_counter()
        warnings: list[str] = []
        arrays: dict[str, dict[int, np.ndarray]] = {}
        cache: dict = {}
        last_update: dict[str, torch.Tensor] | None = None
        step, phase, ck = 0, 0, None
        self._memory: list[dict] = []
        self._pending_rows: list[dict] = []

        if store is not None and resume:
            info = (store.read_manifest().get("runs") or {}).get(self.name, {})
            ck = self._load_last_checkpoint(store, warnings)
            if ck is not None:
                self.model.load_state_dict(ck["model"])
                step, phase = int(ck["step"]), int(ck["phase"])
                cache = ck.get("probe_cache") or {}
                last_update = ck.get("last_update")
            df = store.read_metrics()
            s0 = step if ck is not None else -1
            # rows measured after the checkpoint: later steps, and the minibatch loss of update s0 -> s0 + 1
            after = (df["step"] > s0) | ((df["step"] == s0) & (df["metric"] == "batch_loss"))
            keep = ~((df["run"] == self.name) & after)
            if not bool(keep.all()):
                store.write_metrics(df[keep])
            for metric in (info.get("arrays") or []):
                try:
                    z = store.read_arrays(_safe_name(f"{self.name}_{metric}"))
                    arrays[metric] = {int(k[5:]): v for k, v in z.items() if int(k[5:]) <= step}
                except StoreError as e:
                    warnings.append(str(e))
            if ck is not None and str(info.get("status", "")).startswith("diverged") \
                    and int(info.get("last_step", step)) == step:
                return self._finish(store, step, info["status"], info.get("diverged_at"), None, arrays,
                                    t_start, 0.0, 0.0, warnings)

        opt = self._new_optimizer(phase)
        if ck is not None:
            opt.load_state_dict(ck["optimizer"])
        if store is not None:
            store.update_run(self.name, status="running", optimizer=self.label, steps=self.steps,
                             **({"warnings": warnings} if warnings else {}))

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
                        rows, new_arrays, bad = self._probe(step, opt, cache, last_update, arrays, bar)
                        probe_seconds += time.perf_counter() - t0
                        self._flush(store, rows, arrays, new_arrays)
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
                    if self.lr_factor is not None:
                        f = float(self.lr_factor(step))
                        for g in opt.param_groups:
                            g["lr"] = g["initial_lr"] * f
                    X, y = self._batch(step)
                    self.model.train()
                    opt.zero_grad(set_to_none=True)
                    loss = self._loss_and_grad(X, y)
                    grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for _, p in self._trainable())
                    if not (math.isfinite(loss) and grads_ok):
                        status, diverged_at = f"diverged at step {step}", step
                        self._flush(store, self._take_pending() + [
                            self._diverged_row(step)], arrays, set())
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
                            self._diverged_row(step)], arrays, set())
                        break
                    bar.advance(1)
        return self._finish(store, step, status, diverged_at, opt, arrays, t_start, probe_seconds, train_seconds,
                            warnings)

    def _diverged_row(self, step: int) -> dict:
        """The tidy row that records ``diverged at step t`` (value = t)."""
        return {"run": self.name, "optimizer": self.label, "step": step, "metric": "diverged", "layer": "",
                "value": float(step)}

    def _take_pending(self) -> list[dict]:
        rows, self._pending_rows = getattr(self, "_pending_rows", []), []
        return rows

    def _probe(self, step, opt, cache, last_update, arrays, bar):
        """Run all probes at ``step``; return (rows, names of arrays updated, first non-finite loss or None)."""
        state = ProbeState(step=step, model=self.model, optimizer=opt, problem=self.problem, run_name=self.name,
                           seed=self.seed, cache=cache, last_update=last_update)
        rows = self._take_pending()
        new_arrays: set[str] = set()
        with probe_guard(self.model), torch.no_grad():
            X, y = self.problem.probe_batch
            probe_loss = float(self.problem.loss_fn(pure_forward(self.model, X), y))
        if not math.isfinite(probe_loss) or not all(bool(torch.isfinite(p).all()) for _, p in self._trainable()):
            rows.append(self._diverged_row(step))
            return rows, new_arrays, probe_loss
        bad = None
        with probe_guard(self.model):
            for pr in self.probes:
                pname = probe_name(pr)
                bar.update(description=f"{self.name} [probe {pname} @ {step}]")
                result = pr(self.problem, state)
                if not isinstance(result, Mapping):
                    raise ValueError(f"probe {pname!r} returned {type(result).__name__}; a probe must return a dict")
                before = {m: len(v) for m, v in arrays.items()}
                rows.extend(_rows_from(result, self.name, self.label, step, arrays))
                new_arrays |= {m for m, v in arrays.items() if len(v) != before.get(m, 0)}
        bar.update(description=f"{self.name}")
        for r in rows:
            if r["metric"] == "loss" and r["step"] == step and not math.isfinite(r["value"]):
                bad = r["value"]
                rows.append(self._diverged_row(step))
                break
        return rows, new_arrays, bad

    def _finish(self, store, step, status, diverged_at, opt, arrays, t_start, probe_seconds, train_seconds,
                warnings) -> RunResult:
        pending = self._take_pending()
        seconds = time.perf_counter() - t_start
        if store is not None:
            self._flush(store, pending, arrays, set())
            store.update_run(self.name, status=status, diverged_at=diverged_at, seconds=seconds,
                             probe_seconds=probe_seconds, train_seconds=train_seconds,
                             **({"warnings": warnings} if warnings else {}))
            df = store.read_metrics()
            metrics = df[df["run"] == self.name].reset_index(drop=True)
        else:
            self._memory.extend(pending)
            metrics = pd.DataFrame(self._memory, columns=METRIC_COLUMNS) if self._memory else empty_metrics()
        return RunResult(self.name, metrics, status, diverged_at, self.model, opt, seconds, probe_seconds,
                         train_seconds, arrays)


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
    same batch order (seed 000 §4: "we started from the same initial weights"). ``problem.model`` is not changed.
    A diverging optimizer is recorded (``"diverged at step t"``) and the others continue. ``run_kwargs`` go to
    :class:`Run`."""
    if not optimizers:
        raise ValueError("compare needs at least one optimizer")
    store = _open(store)
    init = copy.deepcopy(problem.model)
    if store is not None:
        store.set_status("running", kind=store.read_manifest().get("kind", "compare"), runs_order=list(optimizers))
    runs: dict[str, RunResult] = {}
    try:
        for name, opt in optimizers.items():
            label = optimizer_label(opt)
            run = Run(problem, opt, steps, name=name, model=copy.deepcopy(init),
                      label=name if label.startswith("<") else label, **run_kwargs)
            runs[name] = run.execute(store=store, resume=resume)
    except BaseException as exc:
        if store is not None:
            store.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    metrics = pd.concat([r.metrics for r in runs.values()], ignore_index=True)
    if store is not None:
        n_div = sum(r.diverged for r in runs.values())
        store.set_status("finished" if n_div == 0 else f"finished ({n_div} of {len(runs)} diverged)",
                         seconds=sum(r.seconds for r in runs.values()))
    return CompareResult(runs, metrics)


def switch(problem: Problem, first: OptimizerLike, second: OptimizerLike, switch_step: int, steps: int,
           store: Any = None, resume: bool = False, name: str | None = None, **run_kwargs: Any) -> RunResult:
    """Optimizer ``first`` for updates ``[0, switch_step)``, then a freshly initialised ``second`` (seed 000 App. A.4,
    "Adam after SGD"). Trains a deep copy of ``problem.model``; rows carry optimizer ``"first->second"``."""
    if not 0 < int(switch_step) < int(steps):
        raise ValueError(f"switch_step = {switch_step!r} must lie strictly between 0 and steps = {steps}")
    run = Run(problem, [(0, first), (int(switch_step), second)], steps, name=name,
              model=copy.deepcopy(problem.model), **run_kwargs)
    return run.execute(store=_open(store), resume=resume)


def repeat(problem: Problem, optimizer: OptimizerLike, n_repeats: int, steps: int, store: Any = None,
           resume: bool = False, name: str | None = None, seed: int = 0, **run_kwargs: Any) -> RepeatResult:
    """``n_repeats`` runs from the same initial model with data orders ``data_seed = seed + r`` (seed 000 §4.1:
    "repeated 12 times starting from the same initialization"); ``summary`` has the mean and sample standard
    deviation of every metric and layer at every step over the runs that reached it."""
    if int(n_repeats) < 1:
        raise ValueError(f"n_repeats = {n_repeats!r} must be >= 1")
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
    to A's (seed 000 App. A.3: compare R_med^Adam(t1) with R_med^SGD(t2) where the losses are equal).

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
