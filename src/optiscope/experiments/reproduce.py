"""Reproduce many registered experiments at once: one Ray job per experiment, one run directory each, resumable.

Layout of a reproduction directory ``DIR``::

    reproduce.json     what was asked (preset, selection), per-experiment status, error, seconds, the pool
    claims.json        the combined claims table: one row per claim of every finished experiment
    NAME/              the experiment's run directory (config.yaml, manifest.json, results.json, figures/, ...)
    index.html         written by the report layer (``optiscope.report.html.write_site``)

Resuming: running the same selection into the same ``DIR`` again keeps every experiment whose run directory says
``finished`` with a readable ``results.json`` for the same preset; one that was killed (status still ``running``)
or failed is deleted and run again from scratch. A failed experiment is recorded with its error and traceback and
never stops the others. A lock file (``DIR/.reproduce.lock``) refuses a second ``reproduce`` writing the same
``DIR`` at the same time. A ``DIR`` that exists, is not empty and has no ``reproduce.json`` is refused (it holds
something else).
"""

from __future__ import annotations

import fcntl
import importlib
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optiscope.experiments.base import TIERS, ExperimentSpec, device_support, registry
from optiscope.lab.pool import Pool, check_workers, run_jobs, run_jobs_inline, start_pool, stop_pool
from optiscope.lab.store import RunStore, StoreError
from optiscope.utils.atomic import atomic_write_json

MARKER = "reproduce.json"
CLAIMS = "claims.json"
LOCK = ".reproduce.lock"
DURATIONS = Path(__file__).with_name("durations.json")
"""Measured seconds per experiment and preset (one thread, one worker each), shipped with the package and
refreshed from a finished reproduction by :func:`update_duration_hints`; used only to order the jobs."""


# ----------------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------------
def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(s).lower())


def paper_short_name(key: str) -> str | None:
    """The short name ("Jiang et al. 2023") of a registry paper key from :mod:`optiscope.papers`, if it has one."""
    try:
        papers = importlib.import_module("optiscope.papers")
    except ImportError:
        return None
    for fn_name in ("short_name", "short"):
        fn = getattr(papers, fn_name, None)
        if callable(fn):
            try:
                out = fn(key)
            except (KeyError, ValueError, LookupError):
                out = None
            if out:
                return str(out)
    for table_name in ("PAPERS", "REFERENCES", "papers"):
        table = getattr(papers, table_name, None)
        if isinstance(table, Mapping) and key in table:
            entry = table[key]
            for attr in ("short", "short_name", "cite"):
                v = entry.get(attr) if isinstance(entry, Mapping) else getattr(entry, attr, None)
                if v:
                    return str(v)
    return None


def _based_on_names(key: str) -> list[str]:
    """Short names of the papers a reference is based on (research notes after several papers)."""
    try:
        from optiscope.papers import PAPERS
    except ImportError:
        return []
    ref = PAPERS.get(key)
    return [r.short for r in getattr(ref, "based_on", ()) if getattr(r, "short", "")]


def paper_names(specs: Iterable[ExperimentSpec]) -> dict[str, str]:
    """``{paper key: short name or the key}`` over the registered experiments, in key order."""
    keys = sorted({s.paper for s in specs})
    return {k: paper_short_name(k) or k for k in keys}


def select_experiments(papers: Sequence[str] | None = None, only: Sequence[str] | None = None,
                       reg: Mapping[str, ExperimentSpec] | None = None) -> list[ExperimentSpec]:
    """The experiments of the given papers (registry key, e.g. ``"000"``, or short name, e.g.
    ``"Jiang et al. 2023"``, case and punctuation ignored) and/or names (``only``); all when both are empty.
    Unknown names raise ``ValueError`` listing the valid ones."""
    reg = dict(reg if reg is not None else registry())
    chosen = list(reg.values())
    if papers:
        names = paper_names(reg.values())
        alias = {}
        for key, short in names.items():
            for a in (key, short, *_based_on_names(key)):
                alias[_norm(a)] = key
        wanted = set()
        bad = []
        for p in papers:
            k = alias.get(_norm(p))
            if k is None:
                bad.append(p)
            else:
                wanted.add(k)
        if bad:
            valid = "; ".join(f"{k} ({v})" if v != k else k for k, v in names.items())
            raise ValueError(f"unknown paper {', '.join(map(repr, bad))}; valid: {valid}")
        chosen = [s for s in chosen if s.paper in wanted]
    if only:
        bad = [n for n in only if n not in reg]
        if bad:
            raise ValueError(f"unknown experiment {', '.join(map(repr, bad))}; valid: {', '.join(reg)}")
        keep = set(only)
        chosen = [s for s in chosen if s.name in keep]
        if papers and not chosen:
            raise ValueError(f"none of {', '.join(only)} belongs to the papers {', '.join(papers)}")
    return sorted(chosen, key=lambda s: s.name)


def preset_for(spec: ExperimentSpec, preset: str) -> str:
    """``preset`` if the experiment has it, else the largest smaller tier it has (``medium`` -> ``quick``)."""
    if preset not in TIERS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(TIERS)}")
    if preset in spec.presets:
        return preset
    for t in reversed(TIERS[:TIERS.index(preset)]):
        if t in spec.presets:
            return t
    return "quick"


# ----------------------------------------------------------------------------------------------------------------
# the directory
# ----------------------------------------------------------------------------------------------------------------
def read_marker(out: Path) -> dict[str, Any] | None:
    """``DIR/reproduce.json`` or None when absent; a corrupt one is a ``ValueError``."""
    p = Path(out) / MARKER
    if not p.exists():
        return None
    try:
        import json

        return json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is corrupt ({e}); remove it or choose another --out") from None


def check_out_dir(out: Path, preset: str) -> dict[str, Any] | None:
    """Refuse a directory that holds something else, or a reproduction at another preset; return its marker."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    marker = read_marker(out) if out.is_dir() else None
    if out.is_dir() and marker is None:
        others = [p.name for p in out.iterdir() if p.name != LOCK]
        if others:
            shown = ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else "")
            raise ValueError(f"--out {out} already holds something else ({shown}) and no {MARKER}; "
                             "choose an empty or new directory")
    if marker is not None and marker.get("preset") != preset:
        raise ValueError(f"--out {out} holds a --preset {marker.get('preset')} reproduction; "
                         f"use --preset {marker.get('preset')} to resume it or choose another --out")
    return marker


def experiment_state(run_dir: Path, preset: str) -> str:
    """``"finished"`` (kept), ``"absent"``, ``"killed"`` (status still running), ``"failed"``, ``"stale"``
    (another preset, or unreadable files) or ``"live"`` (a live process holds its writer lock) of one
    experiment's run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "absent"
    try:
        store = RunStore.open(run_dir)
        m = store.read_manifest()
    except StoreError:
        return "stale"
    status = str(m.get("status", ""))
    if store.is_locked():
        return "live"
    if status == "finished":
        if m.get("preset") != preset:
            return "stale"
        try:
            res = store.read_results()
        except StoreError:
            return "stale"
        return "finished" if isinstance(res, dict) and "claims" in res else "stale"
    if status == "running":
        return "killed"
    if status == "failed":
        return "failed"
    return "stale" if m or any(run_dir.iterdir()) else "absent"


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``DIR/.reproduce.lock`` for the lifetime of a reproduction."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fh = None

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise ValueError(f"another `optiscope reproduce` is writing {self.path.parent}; "
                             "wait for it or choose another --out") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()


# ----------------------------------------------------------------------------------------------------------------
# scheduling: longest job first
# ----------------------------------------------------------------------------------------------------------------
def _user_durations_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optiscope" / "durations.json"


def _read_durations(path: Path) -> dict[str, dict[str, float]]:
    import json

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, float]] = {}
    for preset, table in (d.get("seconds") or {}).items() if isinstance(d, dict) else ():
        if isinstance(table, dict):
            out[str(preset)] = {str(k): float(v) for k, v in table.items() if isinstance(v, (int, float)) and v > 0}
    return out


def expected_seconds(names: Iterable[str], preset: str) -> dict[str, float | None]:
    """Expected run time of each experiment at ``preset``: its time in this user's cache of measured times
    (``~/.cache/optiscope/durations.json``, written after every finished job), else the measured hints shipped with
    the package (:data:`DURATIONS`); None when unknown."""
    cache, shipped = _read_durations(_user_durations_path()), _read_durations(DURATIONS)
    return {n: cache.get(preset, {}).get(n) or shipped.get(preset, {}).get(n) for n in names}


def longest_first(names: Sequence[str], expected: Mapping[str, float | None]) -> list[str]:
    """Order jobs for a pool of identical workers by the longest-processing-time rule (Graham 1969): longest
    expected time first, unknown times before all known ones (an unknown job may be the longest), ties by name.
    With ``m`` workers the makespan is at most ``4/3 - 1/(3m)`` times the optimum, and never below the longest
    job, so a reproduction is only as fast as its longest experiment allows."""
    return sorted(names, key=lambda n: (expected.get(n) is not None, -(expected.get(n) or 0.0), n))


def _remember_duration(name: str, preset: str, seconds: float) -> None:
    """Add one measured time to the user's cache (best effort: an unwritable cache is ignored)."""

    path = _user_durations_path()
    try:
        d = {"seconds": _read_durations(path)}
        d["seconds"].setdefault(preset, {})[name] = round(float(seconds), 1)
        atomic_write_json(path, d)
    except (OSError, ValueError, TypeError):
        pass


def update_duration_hints(reproduce_dir: str | Path, path: str | Path = DURATIONS) -> dict[str, dict[str, float]]:
    """Merge the measured seconds of the finished experiments of a reproduction directory into the hints file
    ``path`` (default: the one shipped with the package) and return the merged table."""
    marker = read_marker(Path(reproduce_dir)) or {}
    table = _read_durations(Path(path))
    for name, e in (marker.get("experiments") or {}).items():
        sec = e.get("seconds")
        if e.get("status") == "finished" and isinstance(sec, (int, float)) and sec > 0 and e.get("preset"):
            table.setdefault(str(e["preset"]), {})[name] = round(float(sec), 1)
    table = {p: dict(sorted(t.items())) for p, t in sorted(table.items())}
    atomic_write_json(Path(path), {"about": "seconds per experiment and preset, 1 thread, measured by "
                                            "`optiscope reproduce`; used to run the longest experiments first",
                                   "seconds": table})
    return table


# ----------------------------------------------------------------------------------------------------------------
# one job (runs inside a Ray worker)
# ----------------------------------------------------------------------------------------------------------------
def run_one(name: str, module: str, module_dir: str | None, preset: str, out_dir: str,
            overrides: Sequence[str] = (), postprocess: Callable[[RunStore], Any] | None = None) -> dict[str, Any]:
    """Run experiment ``name`` (registered by ``module``, importable from ``module_dir`` if given) into
    ``out_dir``; then ``postprocess(store)`` (figures and report). Returns a status dict, never raises."""
    t0 = time.perf_counter()
    try:
        if module_dir and module_dir not in sys.path:
            sys.path.insert(0, module_dir)
        importlib.import_module(module)
        from optiscope.experiments.base import resolve_config, run_experiment

        cfg = resolve_config(name, preset, overrides)
        holder = RunStore(out_dir)
        holder.acquire_lock()  # the writer lock: readers leave our temporary files alone; liveness for resumes
        try:
            store = run_experiment(name, preset=preset, out=out_dir, config=cfg)
            report_error = None
            if postprocess is not None:
                t1 = time.perf_counter()
                try:
                    postprocess(store)
                except Exception as exc:  # noqa: BLE001 - the numbers are written; a broken figure is reported
                    report_error = f"{type(exc).__name__}: {exc}"
                report_seconds = time.perf_counter() - t1
        finally:
            holder.release_lock()
    except BaseException as exc:  # noqa: BLE001 - a failed experiment is recorded, the others continue
        err = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc(limit=30)
        try:
            store = RunStore(out_dir)
            if store.read_manifest().get("status") != "failed":
                store.set_status("failed", experiment=name, preset=preset, error=err, traceback=tb)
        except Exception as write_error:  # noqa: BLE001 - the error is still returned to the driver
            err += f" (and the manifest could not be written: {write_error})"
        return {"status": "failed", "error": err, "traceback": tb[-4000:], "seconds": time.perf_counter() - t0}
    out: dict[str, Any] = {"status": "finished", "seconds": time.perf_counter() - t0}
    if postprocess is not None:
        out["report_seconds"] = report_seconds
        if report_error:
            out["report_error"] = report_error
    out["n_claims"] = len(store.read_results().get("claims", []))
    return out


def _module_location(spec: ExperimentSpec) -> tuple[str, str | None]:
    mod_name = spec.fn.__module__
    if mod_name.startswith("optiscope."):
        return mod_name, None
    mod = sys.modules.get(mod_name)
    f = getattr(mod, "__file__", None)
    return mod_name, (str(Path(f).resolve().parent) if f else None)


# ----------------------------------------------------------------------------------------------------------------
# the combined claims table
# ----------------------------------------------------------------------------------------------------------------
def claim_rows(out: Path, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per claim of every finished experiment under ``out`` (sorted by experiment name):
    ``experiment, paper, paper_name, id, claim, paper_value, measured, holds, reason, tier``."""
    out = Path(out)
    marker = read_marker(out) or {}
    exps = marker.get("experiments") or {}
    names = sorted(names if names is not None else exps)
    rows: list[dict[str, Any]] = []
    for name in names:
        d = out / name
        try:
            res = RunStore.open(d).read_results()
        except StoreError:
            continue
        info = exps.get(name) or {}
        for c in res.get("claims", []) or []:
            if not isinstance(c, Mapping):
                continue
            rows.append({
                "experiment": name,
                "paper": info.get("paper"),
                "paper_name": info.get("paper_name") or info.get("paper"),
                "id": c.get("id"),
                "claim": c.get("claim"),
                "paper_value": c.get("paper"),
                "measured": c.get("measured"),
                "holds": c.get("holds") if c.get("holds") in (True, False, None) else None,
                "reason": c.get("reason") or "",
                "tier": c.get("tier") or res.get("preset"),
            })
    return rows


# ----------------------------------------------------------------------------------------------------------------
# reproduce
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReproduceResult:
    """What :func:`reproduce` did: per-experiment status (``finished``, ``kept``, ``failed``), the claims table."""

    out: Path
    preset: str
    experiments: dict[str, dict[str, Any]]
    claims: list[dict[str, Any]]
    wall_seconds: float
    pool: str = ""
    kept: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """Names of the experiments that failed."""
        return [n for n, e in self.experiments.items() if e.get("status") == "failed"]


def reproduce(out: str | Path, papers: Sequence[str] | None = None, only: Sequence[str] | None = None,
              preset: str = "quick", device: str | None = None, workers: int | None = None,
              ray_address: str | None = None, overrides: Mapping[str, Sequence[str]] | None = None,
              postprocess: Callable[[RunStore], Any] | None = None,
              on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
              on_plan: Callable[[list[ExperimentSpec], list[str], Pool], None] | None = None,
              connect_timeout: float = 20.0, reg: Mapping[str, ExperimentSpec] | None = None,
              parallel: bool = True, live_wait: float = 15.0) -> ReproduceResult:
    """Run the selected experiments (see :func:`select_experiments`) at ``preset`` into ``out/NAME`` as Ray jobs
    (:mod:`optiscope.lab.pool`), keeping the finished ones of an earlier call; write ``reproduce.json`` and
    ``claims.json``. ``postprocess(store)`` runs in the worker after each experiment (figures, report);
    ``on_event(name, "kept" | "started" | "done", info)`` and ``on_plan(specs, kept, pool)`` drive a progress view.
    ``overrides`` maps an experiment name to ``key=value`` config overrides. ``parallel=False`` runs the jobs one
    after another in this process with one thread (no Ray: the sequential baseline). An experiment directory whose
    writer lock a live process still holds is waited for up to ``live_wait`` seconds. Bad input raises
    ``ValueError``."""
    out = Path(out)
    check_workers(workers)
    specs = select_experiments(papers, only, reg)
    if not specs:
        raise ValueError("no experiment selected")
    for s in specs:
        preset_for(s, preset)
    marker = check_out_dir(out, preset)
    overrides = dict(overrides or {})
    device_note = []
    if device and device != "cpu":
        for s in specs:
            if "device" in s.config.field_names():
                overrides[s.name] = [*overrides.get(s.name, ()), f"device={device}"]
            else:
                device_note.append(s.name)
    t_start = time.time()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        marker = read_marker(out) or {"kind": "optiscope-reproduce", "preset": preset, "experiments": {},
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        exps: dict[str, dict[str, Any]] = dict(marker.get("experiments") or {})
        names = paper_names(specs)
        kept, todo, stale = [], [], []
        for s in specs:
            used = preset_for(s, preset)
            state = experiment_state(out / s.name, used)
            t_wait = time.time()
            while state == "live" and time.time() - t_wait < live_wait:  # a worker of a killed run still exiting
                time.sleep(0.5)
                state = experiment_state(out / s.name, used)
            if state == "live":
                holder = RunStore.open(out / s.name).lock_holder() or {}
                raise ValueError(f"{out / s.name} is still being written by process {holder.get('pid')} on "
                                 f"{holder.get('host')}; wait for it to end (or stop it) and run again")
            entry = dict(exps.get(s.name) or {})
            entry.update(paper=s.paper, paper_name=names.get(s.paper, s.paper), title=s.title, preset=used)
            if s.name in device_note:
                entry["device_note"] = f"{s.name} runs on the CPU: {device_support(s)[1]}"
            if state == "finished":
                entry["status"] = "finished"
                try:
                    entry.setdefault("seconds", RunStore.open(out / s.name).read_manifest().get("seconds"))
                except StoreError:
                    pass
                kept.append(s.name)
            else:
                if state != "absent":
                    entry["previous"] = state
                    stale.append(s.name)
                entry.update(status="queued")
                for k in ("error", "traceback", "report_error"):
                    entry.pop(k, None)
                todo.append(s)
            exps[s.name] = entry
        # the pool first: an unreachable cluster leaves the directory as it was
        try:
            pool = start_pool(workers, ray_address, connect_timeout, device) if todo and parallel else None
        except BaseException:
            if created and not any(p.name != LOCK for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)
            raise
        for n in stale:
            shutil.rmtree(out / n)
        marker.update(preset=preset, experiments=exps, selection={"papers": list(papers or []),
                                                                  "only": list(only or [])})
        atomic_write_json(out / MARKER, marker)
        try:
            if on_plan is not None and todo:
                on_plan(specs, kept, pool)
            for n in kept:
                if on_event is not None:
                    on_event(n, "kept", exps[n])
            if todo:
                marker["pool"] = pool.describe() if pool is not None else "in process, 1 thread (sequential)"

                def event(name: str, ev: str, info: Mapping[str, Any]) -> None:
                    e = exps[name]
                    if ev == "started":
                        e.update(status="running", started=info.get("started"))
                    else:
                        e.update({k: v for k, v in info.items() if k != "traceback"})
                        if info.get("status") == "finished" and info.get("seconds"):
                            _remember_duration(name, str(e.get("preset") or preset), float(info["seconds"]))
                        if info.get("traceback"):
                            e["traceback"] = info["traceback"]
                        e["finished"] = time.time()
                    atomic_write_json(out / MARKER, marker)
                    if on_event is not None:
                        on_event(name, ev, e)

                expected: dict[str, float | None] = {}
                for s in todo:  # per experiment at its own preset (medium falls back to quick)
                    expected[s.name] = expected_seconds([s.name], preset_for(s, preset))[s.name]
                    exps[s.name]["expected_seconds"] = expected[s.name]
                order = {n: i for i, n in enumerate(longest_first([s.name for s in todo], expected))}
                todo = sorted(todo, key=lambda s: order[s.name])
                jobs = []
                for s in todo:
                    mod, mod_dir = _module_location(s)
                    jobs.append((s.name, (s.name, mod, mod_dir, preset_for(s, preset), str(out / s.name),
                                          tuple(overrides.get(s.name, ())), postprocess), {}))
                if pool is not None:
                    run_jobs(pool, run_one, jobs, on_event=event)
                else:
                    run_jobs_inline(run_one, jobs, on_event=event)
        finally:
            if pool is not None:
                stop_pool(pool)
        wall = time.time() - t_start
        marker["wall_seconds_last"] = wall
        marker["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        marker.setdefault("sessions", []).append({"started": t_start, "wall_seconds": wall, "ran": [s.name for s in todo],
                                               "kept": kept, "pool": marker.get("pool"),
                                               "load_average": list(os.getloadavg())})
        atomic_write_json(out / MARKER, marker)
        rows = claim_rows(out)
        atomic_write_json(out / CLAIMS, rows)
    return ReproduceResult(out=out, preset=preset, experiments={s.name: exps[s.name] for s in specs}, claims=rows,
                           wall_seconds=wall, pool=marker.get("pool", ""), kept=kept)


__all__ = [
    "ReproduceResult",
    "check_out_dir",
    "claim_rows",
    "expected_seconds",
    "experiment_state",
    "longest_first",
    "paper_names",
    "paper_short_name",
    "preset_for",
    "read_marker",
    "reproduce",
    "run_one",
    "select_experiments",
    "update_duration_hints",
]
