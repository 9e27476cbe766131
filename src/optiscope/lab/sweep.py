"""Sweeps: a grid over optimizer specs, learning rates, momenta and seeds for :func:`~optiscope.lab.config.run_compare`,
one comparison store per cell, run on the Ray pool of :mod:`optiscope.lab.pool`, plus one combined tidy table.

Layout of a sweep directory ``DIR``::

    sweep.json          the base CompareConfig, the grid, per-cell status and seconds
    cells/CELL/         one comparison run directory per cell (config.yaml, manifest.json, metrics.parquet, ...)
    sweep.parquet       every cell's metrics in tidy long form with the cell's coordinates as extra columns:
                        cell, spec, optimizer, lr, momentum, seed, run, step, metric, layer, value
    summary.csv         one row per cell: its coordinates, status and the last value of each global metric

A cell is the base config with ``optimizers = (spec,)``, where ``spec`` is the grid's optimizer spec with ``lr`` and
the momentum set, and ``seed`` set. "Momentum" is the ``momentum`` hyperparameter of optimizers that have one
(SGD, heavy ball) and ``beta1`` (the first entry of ``betas``) of Adam-type optimizers; an optimizer with neither
is a ``ValueError``. Resuming: finished cells are kept, a killed cell continues from its last checkpoint
(``run_compare(resume=True)``), a failed cell runs again.

``sweep(...)`` is the Python API (experiments use it to tune learning rates); ``optiscope sweep`` the command.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from optiscope.lab.config import CompareConfig, load_compare_config, run_compare
from optiscope.lab.pool import check_workers, run_jobs, start_pool, stop_pool
from optiscope.lab.store import METRIC_COLUMNS, RunStore, StoreError
from optiscope.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from optiscope.utils.spec import parse_spec

MARKER = "sweep.json"
CELL_COLUMNS = ["cell", "spec", "optimizer", "lr", "momentum", "seed"]
"""Coordinates of a cell, the first columns of ``sweep.parquet`` and ``summary.csv``."""


@dataclass(frozen=True)
class Cell:
    """One grid point: a single-optimizer comparison config and its coordinates."""

    id: str
    spec: str
    optimizer: str
    lr: float | None
    momentum: float | None
    seed: int
    config: CompareConfig

    def coordinates(self) -> dict[str, Any]:
        """``{cell, spec, optimizer, lr, momentum, seed}`` (NaN for an unset lr or momentum)."""
        return {"cell": self.id, "spec": self.spec, "optimizer": self.optimizer,
                "lr": math.nan if self.lr is None else float(self.lr),
                "momentum": math.nan if self.momentum is None else float(self.momentum), "seed": int(self.seed)}


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value_text(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def format_spec(name: str, kwargs: Mapping[str, Any]) -> str:
    """``("adam", {"lr": 0.001})`` -> ``"adam:lr=0.001"`` (the inverse of :func:`optiscope.utils.spec.parse_spec`)."""
    return name if not kwargs else name + ":" + ",".join(f"{k}={_value_text(v)}" for k, v in kwargs.items())


def _accepts(name: str, kwargs: Mapping[str, Any]) -> bool:
    import torch

    from optiscope.optim import make_optimizer

    try:
        make_optimizer((name, dict(kwargs)), [torch.nn.Parameter(torch.zeros(1))])
    except ValueError:
        return False
    return True


def cell_spec(spec: str, lr: float | None = None, momentum: float | None = None) -> str:
    """The optimizer spec ``spec`` with ``lr`` and the momentum (``momentum``, else ``betas[0]``) replaced."""
    from optiscope.optim import OPTIMIZERS

    name, kw = parse_spec(spec, OPTIMIZERS, "optimizer")
    if lr is not None:
        kw["lr"] = float(lr)
    if momentum is not None:
        if _accepts(name, {**kw, "momentum": float(momentum)}):
            kw["momentum"] = float(momentum)
        elif _accepts(name, {**kw, "betas": [float(momentum), 0.999]}):
            betas = list(kw.get("betas") or [0.9, 0.999])
            kw["betas"] = [float(momentum), float(betas[1])]
        else:
            raise ValueError(f"optimizer {spec!r} has neither a momentum nor betas; drop the momenta or this spec")
    if not _accepts(name, kw):
        import torch

        from optiscope.optim import make_optimizer

        make_optimizer((name, dict(kw)), [torch.nn.Parameter(torch.zeros(1))])  # raises the precise ValueError
    return format_spec(name, kw)


def _cell_id(spec: str, lr: float | None, momentum: float | None, seed: int) -> str:
    name = spec.split(":", 1)[0]
    parts = [name]
    if lr is not None:
        parts.append(f"lr{lr:g}")
    if momentum is not None:
        parts.append(f"m{momentum:g}")
    parts.append(f"s{seed}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "_".join(parts))


def grid(base: CompareConfig, optimizers: Sequence[str] | None = None, lrs: Sequence[float] = (),
         momenta: Sequence[float] = (), seeds: Sequence[int] = ()) -> list[Cell]:
    """The cells of the grid ``optimizers x lrs x momenta x seeds`` (an empty axis keeps the base value);
    ``ValueError`` for an empty grid, duplicate cells or a spec that cannot take the lr or momentum."""
    specs = list(optimizers or base.optimizers)
    if not specs:
        raise ValueError("sweep needs at least one optimizer spec")
    for what, xs in (("learning rates", lrs), ("momenta", momenta)):
        for x in xs:
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(float(x)):
                raise ValueError(f"{what} must be finite numbers, got {x!r}")
    if any(float(x) <= 0 for x in lrs):
        raise ValueError(f"learning rates must be > 0, got {list(lrs)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"seeds must be integers, got {s!r}")
    cells: list[Cell] = []
    seen: set[str] = set()
    for spec, lr, m, seed in itertools.product(specs, list(lrs) or [None], list(momenta) or [None],
                                               list(seeds) or [base.seed]):
        full = cell_spec(spec, lr, m)
        cid = _cell_id(spec, lr, m, seed)
        if cid in seen:
            k = 2
            while f"{cid}-{k}" in seen:
                k += 1
            cid = f"{cid}-{k}"
        seen.add(cid)
        label = spec.split(":", 1)[0]
        cfg = base.replace(optimizers=(full,), names=(label,), seed=int(seed))
        cells.append(Cell(cid, full, label, None if lr is None else float(lr), None if m is None else float(m),
                          int(seed), cfg))
    return cells


def run_cell(config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Run (or resume) one cell into ``out_dir``; a status dict, never raises (runs in a Ray worker or inline)."""
    t0 = time.perf_counter()
    try:
        cfg = CompareConfig.from_dict(config)
        store = RunStore(out_dir)
        resume = False
        if store.path("config.yaml").exists():
            if load_compare_config(store) != cfg:
                raise ValueError(f"{out_dir} holds a different comparison")
            resume = bool(store.read_manifest().get("runs"))
        res = run_compare(cfg, store, resume=resume)
        status = str(store.read_manifest().get("status", "finished"))
        return {"status": "finished", "run_status": status, "resumed": resume,
                "seconds": time.perf_counter() - t0,
                "diverged_at": {n: r.diverged_at for n, r in res.runs.items() if r.diverged}}
    except Exception as exc:  # noqa: BLE001 - a failed cell is recorded; the other cells continue
        import traceback

        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=20)[-4000:], "seconds": time.perf_counter() - t0}


def _cell_done(store_dir: Path) -> bool:
    try:
        m = RunStore.open(store_dir).read_manifest()
    except StoreError:
        return False
    return str(m.get("status", "")).startswith("finished")


@dataclass
class SweepResult:
    """Per-cell status, the combined tidy metrics (``sweep.parquet``) and the per-cell summary (``summary.csv``)."""

    out: Path
    cells: list[Cell]
    status: dict[str, dict[str, Any]]
    metrics: pd.DataFrame
    summary: pd.DataFrame
    wall_seconds: float

    def best(self, metric: str = "loss", minimize: bool = True) -> Cell:
        """The finished cell with the smallest (or largest) last value of ``metric``; non-finite values lose."""
        s = self.summary
        if metric not in s.columns:
            raise ValueError(f"metric {metric!r} is not in the sweep summary; have: {', '.join(s.columns)}")
        vals = pd.to_numeric(s[metric], errors="coerce")
        vals = vals.where(vals.map(lambda v: not pd.isna(v) and math.isfinite(v)))
        if vals.isna().all():
            raise ValueError(f"no cell has a finite {metric!r}")
        i = vals.idxmin() if minimize else vals.idxmax()
        cid = s.loc[i, "cell"]
        return next(c for c in self.cells if c.id == cid)


def combined_metrics(out: Path, cells: Sequence[Cell]) -> pd.DataFrame:
    """Every cell's metrics with its coordinates as extra columns (tidy long form)."""
    frames = []
    for c in cells:
        try:
            df = RunStore.open(Path(out) / "cells" / c.id).read_metrics()
        except StoreError:
            continue
        if df.empty:
            continue
        df = df.copy()
        for k, v in c.coordinates().items():
            df[k] = v
        frames.append(df)
    cols = CELL_COLUMNS + [c for c in METRIC_COLUMNS if c != "optimizer"]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    out_df = pd.concat(frames, ignore_index=True)
    return out_df[cols]


def summarize(metrics: pd.DataFrame, cells: Sequence[Cell], status: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per cell: coordinates, status, last step and the last value of each global metric."""
    rows = []
    for c in cells:
        row: dict[str, Any] = {**c.coordinates(), "status": (status.get(c.id) or {}).get("run_status")
                               or (status.get(c.id) or {}).get("status", "")}
        d = metrics[(metrics["cell"] == c.id) & (metrics["layer"] == "")] if len(metrics) else metrics
        if len(d):
            row["step"] = int(d["step"].max())
            last = d.sort_values("step").groupby("metric").tail(1)
            for m, v in zip(last["metric"], last["value"]):
                row[str(m)] = float(v)
        rows.append(row)
    return pd.DataFrame(rows)


def _inside_ray_task() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        return False


def sweep(base: CompareConfig, out: str | Path, optimizers: Sequence[str] | None = None, lrs: Sequence[float] = (),
          momenta: Sequence[float] = (), seeds: Sequence[int] = (), workers: int | None = None,
          ray_address: str | None = None, parallel: bool | None = None, connect_timeout: float = 20.0,
          on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
          on_plan: Callable[[list[Cell], list[str], Any], None] | None = None) -> SweepResult:
    """Run the grid (see :func:`grid`) into ``out`` and return a :class:`SweepResult`.

    ``parallel=None`` uses the Ray pool (``workers`` jobs, each pinned to its share of threads; ``ray_address`` for
    an existing cluster) unless this already runs inside a Ray task, where cells run one after another in
    process; ``parallel=False`` always runs in process (the sequential baseline). ``on_event(cell, "kept" |
    "started" | "done", info)`` and ``on_plan(cells, kept, pool)`` drive a progress view."""
    out = Path(out)
    check_workers(workers)
    cells = grid(base, optimizers, lrs, momenta, seeds)
    base_dict = base.replace(optimizers=tuple(optimizers or base.optimizers), names=()).to_dict()
    if out.exists() and not out.is_dir():
        raise ValueError(f"sweep output {out} is a file, not a directory")
    marker_path = out / MARKER
    if out.is_dir() and any(out.iterdir()) and not marker_path.exists():
        raise ValueError(f"sweep output {out} already holds something else and no {MARKER}; choose another")
    marker: dict[str, Any] = {"kind": "optiscope-sweep", "cells": {}}
    if marker_path.exists():
        import json

        try:
            marker = json.loads(marker_path.read_text())
        except ValueError as e:
            raise ValueError(f"{marker_path} is corrupt ({e}); remove it or choose another output") from None
        old = {k: v for k, v in (marker.get("base") or {}).items() if k not in ("optimizers", "names", "seed")}
        new = {k: v for k, v in base_dict.items() if k not in ("optimizers", "names", "seed")}
        if old and old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"sweep output {out} holds a sweep with another base config (differs in {diff}); "
                             "choose another output")
    marker["base"] = base_dict
    marker["grid"] = {"optimizers": list(optimizers or base.optimizers), "lrs": list(lrs), "momenta": list(momenta),
                      "seeds": list(seeds)}
    status: dict[str, dict[str, Any]] = dict(marker.get("cells") or {})
    t0 = time.time()
    kept, todo = [], []
    for c in cells:
        entry = dict(status.get(c.id) or {})
        entry.update({k: v for k, v in c.coordinates().items() if k != "cell"})
        if _cell_done(out / "cells" / c.id) and entry.get("status") == "finished":
            kept.append(c.id)
        else:
            entry["status"] = "queued"
            todo.append(c)
        status[c.id] = entry
    marker["cells"] = status
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker_path, marker)

    def event(cid: str, ev: str, info: Mapping[str, Any]) -> None:
        e = status[cid]
        if ev == "started":
            e.update(status="running")
        else:
            e.update(info)
        atomic_write_json(marker_path, marker)
        if on_event is not None:
            on_event(cid, ev, e)

    use_ray = parallel if parallel is not None else not _inside_ray_task()
    jobs = [(c.id, (c.config.to_dict(), str(out / "cells" / c.id)), {}) for c in todo]
    if todo and use_ray:
        pool = start_pool(workers, ray_address, connect_timeout)
        try:
            marker["pool"] = pool.describe()
            if on_plan is not None:
                on_plan(cells, kept, pool)
            for k in kept:
                if on_event is not None:
                    on_event(k, "kept", status[k])
            run_jobs(pool, run_cell, jobs, on_event=event, fresh_process=False)  # cells share no global state
        finally:
            stop_pool(pool)
    else:
        if on_plan is not None:
            on_plan(cells, kept, None)
        for k in kept:
            if on_event is not None:
                on_event(k, "kept", status[k])
        for cid, args, _ in jobs:
            event(cid, "started", {})
            event(cid, "done", run_cell(*args))
    metrics = combined_metrics(out, cells)
    summary = summarize(metrics, cells, status)
    import io

    buf = io.BytesIO()
    metrics.to_parquet(buf, index=False)
    atomic_write_bytes(out / "sweep.parquet", buf.getvalue())
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    wall = time.time() - t0
    marker["wall_seconds_last"] = wall
    atomic_write_json(marker_path, marker)
    return SweepResult(out=out, cells=cells, status={c.id: status[c.id] for c in cells}, metrics=metrics,
                       summary=summary, wall_seconds=wall)


__all__ = [
    "CELL_COLUMNS",
    "Cell",
    "SweepResult",
    "cell_spec",
    "combined_metrics",
    "format_spec",
    "grid",
    "run_cell",
    "summarize",
    "sweep",
]
