"""RunStore: one run directory (docs/architecture.md).

Layout::

    config.yaml        the resolved configuration (its hash is recorded in the manifest)
    manifest.json      versions, seed, git hash, status (running / finished / diverged at step t / failed), timings,
                       config_hash, heartbeat and holder (pid, host) of the writing process
    .lock              the writer's exclusive advisory lock (holder pid and host inside; see utils.lock)
    metrics.parquet    tidy long form: run, optimizer, step, metric, layer, value (compacted)
    metrics.parts/     one Parquet part per append (the lab: one per checkpoint), folded into metrics.parquet
                       when a run ends
    arrays/NAME.npz    arrays
    checkpoints/       <run>_step_00000100.pt (tensors only, loaded with ``torch.load(weights_only=True)``) and
                       <run>_step_00000100.json (everything that is not a tensor, the run's name, config hash and
                       fingerprint, and the SHA-256 of the .pt file)
    figures/NAME.png
    report.md          written by the report layer
    results.json       headline numbers and verdicts (experiments)

Integrity. Every write is atomic (temp file + rename), with the permissions of an ordinary ``open()`` (the umask).
One process writes a directory at a time: :meth:`RunStore.acquire_lock` takes the directory's exclusive lock for the
whole run; a second writer gets :class:`RunLockedError` naming the holder; the lock of a killed process is taken
over with a message. Metrics are appended as one small Parquet part per checkpoint, so a torn or damaged file costs
at most the rows of one checkpoint, and ``metrics.parquet`` can be rebuilt from the parts (or by re-running from a
checkpoint). A checkpoint is valid only when its JSON record exists, its SHA-256 matches and it names the expected
run, config hash and fingerprint. A damaged file is never deleted: it is moved aside as ``NAME.corrupt-TIMESTAMP``.
``RunStore.check()`` reports each corrupt or partial file by name. Temporary files left by a kill are removed when a
writer takes the lock or a reader opens a directory that nobody writes.

Public API (kept stable for the lab's Run and the Tracker): ``path``, ``figure_path``, ``write_config``,
``read_config``, ``read_manifest``, ``update_manifest``, ``set_status``, ``update_run``, ``read_metrics``,
``write_metrics``, ``append_metrics``, ``write_arrays``, ``read_arrays``, ``write_json``, ``read_json``,
``write_results``, ``read_results``, ``write_text``, ``save_figure``, ``checkpoint_path``, ``save_checkpoint``,
``list_checkpoints``, ``load_checkpoint``, ``check``; added for integrity: ``acquire_lock``, ``release_lock``,
``lock``, ``is_locked``, ``lock_holder``, ``liveness``, ``config_hash``, ``verify_config``, ``holds_run``,
``move_aside``, ``read_metrics_tolerant``, ``metric_parts``, ``drop_metrics``, ``compact_metrics``,
``checkpoint_meta``, ``delete_checkpoint``, ``check_checkpoints``, ``quarantine``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from optiscope.utils.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temp_files,
)
from optiscope.utils.lock import (
    LockHeldError,
    acquire_directory_lock,
    held_lock,
    is_locked,
    move_held_lock,
    pid_alive,
    read_holder,
    release_directory_lock,
)

METRIC_COLUMNS = ["run", "optimizer", "step", "metric", "layer", "value"]
PARTS_DIR = "metrics.parts"
CHECKPOINT_FORMAT = 2
HEARTBEAT_SECONDS = 30.0
"""How often a writer refreshes ``manifest["heartbeat"]`` while it holds the lock (besides every manifest write)."""
_ABSORBED_KEY = b"optiscope.absorbed_parts"


def empty_metrics() -> pd.DataFrame:
    """A tidy metrics frame with no rows and the column types of ``metrics.parquet``."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                         zip(METRIC_COLUMNS, ["str", "str", "int64", "str", "str", "float64"])})


class StoreError(RuntimeError):
    """A run directory cannot be used; the message names the file."""


class RunLockedError(StoreError):
    """Another live process is writing the run directory; the message names it (pid, host, since)."""


def _git_hash() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict[str, Any]:
    """Versions and machine facts recorded in every manifest."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "git": _git_hash(),
    }
    for mod in ("optiscope", "torch", "numpy", "scipy", "pandas"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            info[mod] = None
    return info


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _stamp() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S-%f")


def config_hash(data: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of a resolved config: canonical JSON, keys sorted, tuples as lists."""
    text = json.dumps(_plain(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def config_differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """One line per field that differs between two resolved configs, is missing, or is extra."""
    a, b = _plain(stored), _plain(given)
    out = []
    for k in a:
        if k not in b:
            out.append(f"field {k!r} is missing (recorded value {a[k]!r})")
        elif a[k] != b[k]:
            out.append(f"field {k!r} = {b[k]!r} differs from the recorded {a[k]!r}")
    out += [f"field {k!r} = {b[k]!r} was not in the recorded config" for k in b if k not in a]
    return out


def _read_text(p: Path) -> str:
    """UTF-8 text of ``p``; StoreError naming ``p`` when it is missing, unreadable or not UTF-8."""
    try:
        return p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise StoreError(f"{p} is missing") from None
    except IsADirectoryError:
        raise StoreError(f"{p} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise StoreError(f"{p} is corrupt: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise StoreError(f"cannot read {p}: {e.strerror or e}") from None


def _normalise_metrics(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"metrics frame lacks columns {missing}; need {METRIC_COLUMNS}")
    df = df[METRIC_COLUMNS].copy()
    df["step"] = df["step"].astype("int64")
    df["value"] = df["value"].astype("float64")
    for c in ("run", "optimizer", "metric", "layer"):
        df[c] = df[c].astype("string")
    return df.reset_index(drop=True)


def _parquet_bytes(df: pd.DataFrame, metadata: Mapping[bytes, bytes] | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _read_parquet(p: Path) -> tuple[pd.DataFrame, dict[bytes, bytes]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
        df = table.to_pandas()
    except FileNotFoundError:
        raise StoreError(f"{p} is missing") from None
    except Exception as e:
        raise StoreError(f"{p} is corrupt or partial: {e}") from e
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        raise StoreError(f"{p} is not a metrics table: it lacks columns {missing}")
    return df, dict(table.schema.metadata or {})


def part_label(name: str) -> tuple[str, int] | None:
    """``(run, step)`` of a metrics part written for one checkpoint (label ``RUN@STEP``), else ``None``."""
    stem = name.removesuffix(".parquet")
    label = stem.split("-", 2)[2] if stem.count("-") >= 2 else ""
    run, sep, step = label.rpartition("@")
    if not sep or not step.isdigit():
        return None
    return run, int(step)


# -- checkpoint encoding: tensors in the .pt file, everything else as JSON beside it -------------------------------
def _encode(obj: Any, tensors: dict[str, Any], where: str) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise StoreError(f"checkpoint state {where} is a {type(obj).__name__}: a checkpoint holds tensors and JSON "
                     "values (dict, list, tuple, str, number, bool, None) only")


def _decode(obj: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise KeyError(key)
            return tensors[key]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"unknown record {sorted(obj)}")
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


_MANIFEST_LOCKS: dict[str, threading.RLock] = {}
_MANIFEST_GUARD = threading.Lock()


def _manifest_lock(root: Path) -> threading.RLock:
    key = os.path.realpath(root)
    with _MANIFEST_GUARD:
        return _MANIFEST_LOCKS.setdefault(key, threading.RLock())


class RunStore:
    """A run directory. ``RunStore(path)`` creates it if needed; ``RunStore.open(path)`` requires it to exist.

    ``notices`` collects messages meant for the user (temporary files removed, a stale lock taken over, a corrupt
    file moved aside); the CLI prints them."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        self.notices: list[str] = []
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create run directory {self.root}: {e.strerror or e}") from e
        elif not self.root.is_dir():
            raise StoreError(f"run directory {self.root} does not exist")
        self._metrics_cache: pd.DataFrame | None = None
        if not is_locked(self.root):
            self._remove_temp_files()

    @classmethod
    def open(cls, root: str | os.PathLike) -> RunStore:
        """An existing run directory (``StoreError`` if it does not exist)."""
        return cls(root, create=False)

    # -- paths --------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """``root / parts``."""
        return self.root.joinpath(*parts)

    @property
    def figures_dir(self) -> Path:
        """``figures/`` (created on first use)."""
        d = self.path("figures")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def figure_path(self, name: str) -> Path:
        """``figures/NAME.png``."""
        return self.figures_dir / (name if name.endswith(".png") else f"{name}.png")

    def _remove_temp_files(self) -> None:
        removed = []
        with contextlib.suppress(OSError):
            removed += remove_stale_temp_files(self.root, recursive=False)
            for sub in ("checkpoints", "arrays", PARTS_DIR, "figures"):
                removed += remove_stale_temp_files(self.path(sub), recursive=False)
        if removed:
            self.notices.append(f"removed {len(removed)} temporary file(s) left by an interrupted write in "
                                f"{self.root}: {', '.join(p.name for p in removed[:5])}"
                                + (" ..." if len(removed) > 5 else ""))

    def quarantine(self, p: Path, why: str) -> Path | None:
        """Move a damaged file aside as ``NAME.corrupt-TIMESTAMP`` (never delete data); note it; return the new path."""
        if not p.exists():
            return None
        dest = p.with_name(f"{p.name}.corrupt-{_stamp()}")
        try:
            os.replace(p, dest)
        except OSError as e:
            self.notices.append(f"could not move the damaged {p} aside: {e}")
            return None
        self.notices.append(f"{p} {why}; moved aside to {dest.name}")
        return dest

    # -- lock and liveness --------------------------------------------------------------------------
    def acquire_lock(self, wait: float = 1.0) -> None:
        """Take this directory's exclusive writer lock (re-entrant within a process) for the whole run.

        A live holder -> :class:`RunLockedError` naming it; a stale lock of a dead process is taken over and a
        notice says so. The first acquisition removes temporary files of interrupted writes and starts the
        heartbeat (``manifest["heartbeat"]``, every :data:`HEARTBEAT_SECONDS` and on every manifest write)."""
        first = held_lock(self.root) is None
        try:
            lock = acquire_directory_lock(self.root, wait=wait)
        except LockHeldError as e:
            raise RunLockedError(str(e)) from None
        except OSError as e:
            raise StoreError(str(e)) from None
        if first:
            if lock.takeover:
                self.notices.append(lock.takeover)
                print(f"note: {lock.takeover}", file=sys.stderr)
            self._remove_temp_files()
            lock.heartbeat_stop = self._start_heartbeat()

    def release_lock(self) -> None:
        """Leave one level of the writer lock; the last level stops the heartbeat and releases it."""
        lock = held_lock(self.root)
        if lock is not None and lock.count == 1 and getattr(lock, "heartbeat_stop", None) is not None:
            lock.heartbeat_stop.set()
        release_directory_lock(self.root)

    @contextlib.contextmanager
    def lock(self, wait: float = 1.0) -> Iterator[RunStore]:
        """``with store.lock(): ...`` holds the writer lock (see :meth:`acquire_lock`)."""
        self.acquire_lock(wait)
        try:
            yield self
        finally:
            self.release_lock()

    def is_locked(self) -> bool:
        """Whether a live process (this one included) holds the writer lock."""
        return is_locked(self.root)

    def lock_holder(self) -> dict[str, Any] | None:
        """``{"pid", "host", "started", "command"}`` of the current or last holder, if recorded."""
        return read_holder(self.root)

    def _start_heartbeat(self) -> threading.Event:
        """A daemon thread refreshing ``manifest["heartbeat"]`` while this process holds the lock; returns the
        event that stops it (kept on the lock, so whichever RunStore releases the last level stops it)."""
        stop = threading.Event()
        root = self.root

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                if held_lock(root) is None:
                    return
                with contextlib.suppress(Exception):
                    if self.path("manifest.json").exists():
                        self.update_manifest()

        threading.Thread(target=beat, name=f"heartbeat {root}", daemon=True).start()
        return stop

    def liveness(self, status: str | None = None) -> str:
        """``status`` (default: the manifest's), or ``"stopped (process gone)"`` when it says running but no live
        process holds the lock (and, on this host, the recorded writer pid is dead)."""
        if status is None:
            try:
                status = str(self.read_manifest().get("status", "unknown"))
            except StoreError:
                status = "unknown"
        if not str(status).startswith("running"):
            return str(status)
        if self.is_locked():
            return str(status)
        try:
            m = self.read_manifest()
        except StoreError:
            m = {}
        holder = m.get("holder") or {}
        if holder.get("host") == socket.gethostname() and pid_alive(holder.get("pid")) is True \
                and not self.path(".lock").exists():
            return str(status)  # written without a lock file (an old version): trust a live pid
        return "stopped (process gone)"

    # -- config and manifest ------------------------------------------------------------------------
    def write_config(self, config: Any) -> Path:
        """Write ``config.yaml`` (a Config's ``to_dict()`` or a mapping) and record its hash and values in the
        manifest (``config_hash``, ``config``), against which ``resume`` checks the file."""
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        p = atomic_write_text(self.path("config.yaml"), yaml.safe_dump(data, sort_keys=False))
        self.update_manifest(config_hash=config_hash(data), config=_plain(data))
        return p

    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` as a dict; ``StoreError`` naming the file if missing, not UTF-8, not YAML or no mapping."""
        p = self.path("config.yaml")
        text = _read_text(p)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise StoreError(f"{p} is corrupt: {' '.join(str(e).split())}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise StoreError(f"{p} is corrupt: it holds a {type(data).__name__}, not a mapping of field: value")
        return data

    def config_hash(self) -> str | None:
        """The config hash recorded in the manifest (``None`` if none was recorded or the manifest is unreadable)."""
        try:
            return self.read_manifest().get("config_hash")
        except StoreError:
            return None

    def verify_config(self, fields: Iterable[str] | None = None) -> dict[str, Any]:
        """Read ``config.yaml`` and check it against the manifest's record: ``StoreError`` naming every field that
        is missing (of ``fields``, the config class's fields) or differs. Returns the config dict."""
        data = self.read_config()
        p = self.path("config.yaml")
        if fields is not None:
            missing = [f for f in fields if f not in data]
            if missing:
                raise StoreError(f"{p} lacks field(s) {missing}; refusing to resume with defaults for them "
                                 "(restore the file or start a new run)")
        try:
            m = self.read_manifest()
        except StoreError:
            m = {}
        recorded, h = m.get("config"), m.get("config_hash")
        if h is not None and config_hash(data) != h:
            diffs = config_differences(recorded, data) if isinstance(recorded, Mapping) else []
            raise StoreError(f"{p} was changed after the run started (config hash {config_hash(data)} != recorded "
                             f"{h})" + (": " + "; ".join(diffs) if diffs else "")
                             + "; restore it or start a new run in another directory")
        return data

    def holds_run(self) -> bool:
        """Whether the directory already holds (part of) a run: a config, manifest, metrics or checkpoints."""
        return any(self.path(n).exists() for n in ("config.yaml", "manifest.json", "metrics.parquet")) or \
            bool(self.metric_parts()) or bool(list(self.path("checkpoints").glob("*.pt"))
                                              if self.path("checkpoints").is_dir() else [])

    def move_aside(self) -> Path:
        """Rename the directory to ``NAME.old-TIMESTAMP`` (nothing deleted) and recreate it empty; return the
        new location of the old run. Refused while another process writes it. If this process holds the lock, it
        holds the new (empty) directory's lock afterwards, at the same nesting depth."""
        held = held_lock(self.root)
        if held is None and self.is_locked():
            raise RunLockedError(f"{self.root} is in use by {read_holder(self.root)}; cannot move it aside")
        depth = held.count if held is not None else 0
        dest = self.root.with_name(f"{self.root.name}.old-{_stamp()}")
        try:
            os.replace(self.root, dest)
        except OSError as e:
            raise StoreError(f"cannot move {self.root} aside to {dest}: {e.strerror or e}") from e
        if held is not None:
            move_held_lock(self.root, dest)
            if getattr(held, "heartbeat_stop", None) is not None:
                held.heartbeat_stop.set()
            for _ in range(depth):
                release_directory_lock(dest)
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(depth):
            self.acquire_lock()
        self.notices.append(f"moved the previous run in {self.root} aside to {dest}")
        return dest

    def read_manifest(self) -> dict[str, Any]:
        """``manifest.json`` ({} if absent); ``StoreError`` naming the file if it is not UTF-8 JSON of an object."""
        p = self.path("manifest.json")
        if not p.exists():
            return {}
        try:
            m = json.loads(_read_text(p))
        except json.JSONDecodeError as e:
            raise StoreError(f"{p} is corrupt: {e}") from e
        if not isinstance(m, dict):
            raise StoreError(f"{p} is corrupt: it holds a {type(m).__name__}, not a JSON object")
        return m

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into manifest.json (creating it with environment info on first use). A corrupt
        manifest is moved aside (never silently overwritten) and a new one started. The lock holder also stamps
        ``heartbeat`` and ``holder``."""
        with _manifest_lock(self.root):
            try:
                m = self.read_manifest()
            except StoreError:
                self.quarantine(self.path("manifest.json"), "was corrupt")
                m = {}
            if not m:
                m = {"created": _now(), "environment": environment_info()}
            m.update(fields)
            m["updated"] = _now()
            if held_lock(self.root) is not None:
                m["heartbeat"] = _now()
                m["holder"] = {"pid": os.getpid(), "host": socket.gethostname()}
            atomic_write_json(self.path("manifest.json"), m)
            return m

    def set_status(self, status: str, **fields: Any) -> dict[str, Any]:
        """Set ``manifest["status"]``; ``finished...`` also compacts the metrics parts (a failed or killed run keeps
        them, so that resuming it re-measures at most one checkpoint)."""
        if str(status).startswith("finished"):
            with contextlib.suppress(StoreError, OSError, ValueError):
                self.compact_metrics()
        return self.update_manifest(status=status, **fields)

    def update_run(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``manifest["runs"][name]`` (per-run status of a comparison)."""
        with _manifest_lock(self.root):
            try:
                m = self.read_manifest()
            except StoreError:
                m = {}
            runs = dict(m.get("runs") or {})
            entry = dict(runs.get(name) or {})
            entry.update(fields)
            runs[name] = entry
            return self.update_manifest(runs=runs)

    # -- metrics ------------------------------------------------------------------------------------
    def metric_parts(self) -> list[Path]:
        """Metrics parts not yet folded into ``metrics.parquet``, oldest first."""
        d = self.path(PARTS_DIR)
        if not d.is_dir():
            return []
        parts = sorted(d.glob("*.parquet"))
        absorbed = self._absorbed()
        return [p for p in parts if p.name not in absorbed]

    def _absorbed(self) -> set[str]:
        p = self.path("metrics.parquet")
        if not p.exists():
            return set()
        try:
            import pyarrow.parquet as pq

            meta = pq.read_schema(p).metadata or {}
            return set(json.loads(meta.get(_ABSORBED_KEY, b"[]")))
        except Exception:
            return set()

    def read_metrics_tolerant(self) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
        """All readable metrics rows, and ``(path, message)`` for every file that could not be read."""
        frames, problems = [], []
        base = self.path("metrics.parquet")
        if base.exists():
            try:
                frames.append(_read_parquet(base)[0])
            except StoreError as e:
                problems.append((base, str(e)))
        for p in self.metric_parts():
            try:
                frames.append(_read_parquet(p)[0])
            except StoreError as e:
                problems.append((p, str(e)))
        frames = [f for f in frames if not f.empty]
        if not frames:
            return empty_metrics(), problems
        df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        return _normalise_metrics(df), problems

    def read_metrics(self) -> pd.DataFrame:
        """``metrics.parquet`` plus the parts not yet compacted; ``StoreError`` naming the first unreadable file."""
        df, problems = self.read_metrics_tolerant()
        if problems:
            raise StoreError(problems[0][1])
        return df

    def _write_base(self, df: pd.DataFrame, absorbed: Iterable[str]) -> Path:
        meta = {_ABSORBED_KEY: json.dumps(sorted(set(absorbed))).encode()}
        return atomic_write_bytes(self.path("metrics.parquet"), _parquet_bytes(_normalise_metrics(df), meta))

    def _delete_parts(self, names: Iterable[str]) -> None:
        for n in names:
            with contextlib.suppress(OSError):
                self.path(PARTS_DIR, n).unlink()

    def write_metrics(self, df: pd.DataFrame) -> Path:
        """Replace all metrics by ``df`` (``metrics.parquet``; parts not yet compacted are superseded)."""
        df = _normalise_metrics(df)
        parts = [p.name for p in sorted(self.path(PARTS_DIR).glob("*.parquet"))] \
            if self.path(PARTS_DIR).is_dir() else []
        out = self._write_base(df, parts)
        self._delete_parts(parts)
        return out

    def append_metrics(self, rows: Iterable[Mapping[str, Any]] | pd.DataFrame, part: str | None = None) -> Path | None:
        """Append tidy rows (dicts with the METRIC_COLUMNS; ``layer`` may be None) as one new Parquet part
        (atomic; earlier data is never rewritten). ``part`` labels it; the lab uses ``RUN@STEP`` per checkpoint."""
        new = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=METRIC_COLUMNS)
        if new.empty:
            return None
        new = _normalise_metrics(new)
        label = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in (part or "rows"))
        name = f"{time.time_ns():020d}-{os.getpid()}-{label}.parquet"
        return atomic_write_bytes(self.path(PARTS_DIR, name), _parquet_bytes(new))

    def drop_metrics(self, run: str, after_step: int) -> int:
        """Remove run ``run``'s rows measured after checkpoint ``after_step`` (later steps, and the minibatch loss
        of update ``after_step -> after_step + 1``); return how many rows were removed."""
        def after(df: pd.DataFrame) -> pd.Series:
            late = (df["step"] > after_step) | ((df["step"] == after_step) & (df["metric"] == "batch_loss"))
            return (df["run"] == run) & late

        removed = 0
        base = self.path("metrics.parquet")
        if base.exists():
            df, _ = _read_parquet(base)
            df = _normalise_metrics(df)
            mask = after(df)
            if bool(mask.any()):
                removed += int(mask.sum())
                self._write_base(df[~mask], self._absorbed())
        for p in self.metric_parts():
            df, _ = _read_parquet(p)
            df = _normalise_metrics(df)
            mask = after(df)
            if bool(mask.all()):
                removed += len(df)
                p.unlink()
            elif bool(mask.any()):
                removed += int(mask.sum())
                atomic_write_bytes(p, _parquet_bytes(df[~mask]))
        return removed

    def compact_metrics(self) -> Path | None:
        """Fold the parts into ``metrics.parquet`` (crash-safe: the new file lists the parts it absorbed, so a kill
        before their deletion does not duplicate rows). Unreadable files are left in place and raise StoreError."""
        parts = self.metric_parts()
        if not parts:
            return None
        df = self.read_metrics()
        out = self._write_base(df, self._absorbed() | {p.name for p in parts})
        self._delete_parts(p.name for p in parts)
        self._delete_parts(self._absorbed() & {p.name for p in self.path(PARTS_DIR).glob("*.parquet")})
        return out

    # -- arrays, results, text -----------------------------------------------------------------------
    def write_arrays(self, name: str, **arrays: Any) -> Path:
        """``arrays/NAME.npz`` from keyword arrays (atomic)."""
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        return atomic_write_bytes(self.path("arrays", f"{name}.npz"), buf.getvalue())

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        """``arrays/NAME.npz`` as a dict (no pickled objects); ``StoreError`` naming the file."""
        p = self.path("arrays", f"{name}.npz")
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise StoreError(f"{p} is missing") from None
        except Exception as e:
            why = "not a NumPy .npz archive" if "pickle" in str(e) else str(e)
            raise StoreError(f"{p} is corrupt or partial: {why}") from e

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``NAME`` as JSON (atomic)."""
        return atomic_write_json(self.path(name), obj)

    def read_json(self, name: str) -> Any:
        """Read ``NAME`` as JSON; ``StoreError`` naming the file if missing, not UTF-8 or not JSON."""
        p = self.path(name)
        try:
            return json.loads(_read_text(p))
        except json.JSONDecodeError as e:
            raise StoreError(f"{p} is corrupt or partial: {e}") from e

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """``results.json``."""
        return self.write_json("results.json", dict(results))

    def read_results(self) -> dict[str, Any]:
        """``results.json`` (must hold a JSON object)."""
        r = self.read_json("results.json")
        if not isinstance(r, dict):
            raise StoreError(f"{self.path('results.json')} is corrupt: it holds a {type(r).__name__}, not an object")
        return r

    def write_text(self, name: str, text: str) -> Path:
        """Write a UTF-8 text file (atomic)."""
        return atomic_write_text(self.path(name), text)

    def save_figure(self, fig, name: str) -> Path:
        """``figures/NAME.png``."""
        from optiscope.utils.plotting import save_figure

        return save_figure(fig, self.figure_path(name))

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_path(self, step: int, tag: str = "") -> Path:
        """``checkpoints/[TAG_]step_XXXXXXXX.pt``."""
        return self.path("checkpoints", f"{tag + '_' if tag else ''}step_{int(step):08d}.pt")

    def save_checkpoint(self, step: int, state: Mapping[str, Any], tag: str = "",
                        meta: Mapping[str, Any] | None = None) -> Path:
        """Write a checkpoint: the tensors of ``state`` to the .pt file (a flat dict of tensors, loadable with
        ``weights_only=True``), the rest of ``state``, ``meta`` (run, config hash, fingerprint) and the .pt's
        SHA-256 to the .json beside it. The .json is written last: it is the commit record."""
        import torch

        tensors: dict[str, Any] = {}
        skeleton = _encode(dict(state), tensors, "state")
        buf = io.BytesIO()
        torch.save(tensors, buf)
        data = buf.getvalue()
        pt = self.checkpoint_path(step, tag)
        record = {"format": CHECKPOINT_FORMAT, "step": int(step), "tag": tag, "created": _now(),
                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **dict(meta or {}),
                  "state": skeleton}
        atomic_write_bytes(pt, data)
        atomic_write_text(pt.with_suffix(".json"), json.dumps(record, allow_nan=True) + "\n")
        return pt

    def list_checkpoints(self, tag: str = "") -> list[tuple[int, Path]]:
        """``[(step, path_of_pt)]`` sorted by step (valid or not; see :meth:`load_checkpoint`)."""
        d = self.path("checkpoints")
        if not d.is_dir():
            return []
        prefix = f"{tag}_step_" if tag else "step_"
        out = []
        for p in d.glob(f"{prefix}*.pt"):
            try:
                out.append((int(p.stem[len(prefix):]), p))
            except ValueError:
                continue
        return sorted(out)

    def checkpoint_meta(self, path: Path) -> dict[str, Any]:
        """The JSON record of a checkpoint (``StoreError`` naming it if missing or corrupt)."""
        rec = Path(path).with_suffix(".json")
        if not rec.exists():
            raise StoreError(f"checkpoint {path} has no record {rec.name} (cut by a kill, or written by an older "
                             "version); it is not trusted")
        try:
            meta = json.loads(_read_text(rec))
        except json.JSONDecodeError as e:
            raise StoreError(f"checkpoint record {rec} is corrupt: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or "state" not in meta:
            raise StoreError(f"checkpoint record {rec} is corrupt or of an unknown format")
        return meta

    def load_checkpoint(self, path: Path, expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Verify and load a checkpoint: its record must exist, its SHA-256 match, its tensors load with
        ``torch.load(weights_only=True)`` (no code runs) and every ``expect`` item (``None`` values are skipped)
        equal the record's. ``StoreError`` naming the file and what is wrong otherwise."""
        import torch

        path = Path(path)
        meta = self.checkpoint_meta(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"checkpoint {path} is unreadable: {e.strerror or e}") from None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise StoreError(f"checkpoint {path} is corrupt or partial (SHA-256 differs from its record; "
                             f"{len(data)} bytes, recorded {meta.get('bytes')})")
        name_step = path.stem.rsplit("_step_", 1)[-1] if "_step_" in path.stem else path.stem[len("step_"):]
        if not name_step.isdigit() or int(name_step) != meta.get("step"):
            raise StoreError(f"checkpoint {path} is inconsistent: its record is for step {meta.get('step')}")
        for k, v in (expect or {}).items():
            if v is not None and meta.get(k) != v:
                raise StoreError(f"checkpoint {path} belongs to another run: its {k} is {meta.get(k)!r}, "
                                 f"expected {v!r}")
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict):
                raise ValueError(f"it holds a {type(tensors).__name__}, not a dict of tensors")
            return _decode(meta["state"], tensors)
        except Exception as e:
            raise StoreError(f"checkpoint {path} is corrupt or partial: {e}") from e

    def delete_checkpoint(self, path: Path) -> None:
        """Remove a checkpoint and its record."""
        path = Path(path)
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def check_checkpoints(self) -> list[str]:
        """One message per checkpoint that is corrupt, partial, unrecorded or inconsistent."""
        d = self.path("checkpoints")
        if not d.is_dir():
            return []
        problems = []
        for p in sorted(d.glob("*.pt")):
            try:
                self.load_checkpoint(p)
            except StoreError as e:
                problems.append(str(e))
        for rec in sorted(d.glob("*.json")):
            if not rec.with_suffix(".pt").exists():
                problems.append(f"checkpoint record {rec} has no checkpoint {rec.with_suffix('.pt').name}")
        return problems

    # -- integrity ------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Try to read every file (checkpoints verified too); return one message per corrupt or partial file
        (empty list: all good)."""
        problems: list[str] = []
        for name, fn in (("config.yaml", self.read_config), ("manifest.json", self.read_manifest),
                         ("results.json", self.read_results)):
            if self.path(name).exists():
                try:
                    fn()
                except StoreError as e:
                    problems.append(str(e))
        problems += [msg for _, msg in self.read_metrics_tolerant()[1]]
        for p in sorted(self.path("arrays").glob("*.npz")) if self.path("arrays").is_dir() else []:
            try:
                self.read_arrays(p.stem)
            except StoreError as e:
                problems.append(str(e))
        problems += self.check_checkpoints()
        return problems
