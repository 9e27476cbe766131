"""Atomic file writes: write to a temporary file in the same directory, fsync, then ``os.replace``.

A reader (or a resumed run) therefore sees either the old complete file or the new complete file, never a
partial one. Errors such as a full disk or a missing permission are re-raised as ``OSError`` naming the path;
the previous version of the file is left untouched.

Files get the permissions of an ordinary ``open()``: ``0o666`` minus the process umask (``0o644`` with the usual
umask 022), not the ``0o600`` of :func:`tempfile.mkstemp`, so group-shared run directories stay readable. A kill
between the temporary write and the rename leaves a ``.NAME.XXXXXXXX.tmp`` file; :func:`remove_stale_temp_files`
removes those (the run store calls it whenever it opens a directory that no live process is writing).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

TEMP_FILE_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
"""Names of the temporary files :func:`atomic_write` creates (``.NAME.`` + 8 random characters + ``.tmp``)."""


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (thread-safe), else via ``os.umask``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~current_umask()


def remove_stale_temp_files(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``directory`` (and below);
    return their paths. Only call this while no other process writes into ``directory``."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")
    removed = []
    for p in found:
        if TEMP_FILE_RE.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def atomic_write(path: str | os.PathLike, writer: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``writer(fileobj)`` on a temporary binary file and move it over ``path`` atomically.

    The file gets mode ``0o666 & ~umask`` (see :func:`default_file_mode`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}") from exc
    try:
        with contextlib.suppress(OSError):
            os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}") from exc
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def to_jsonable(obj: Any) -> Any:
    """Round-trip through JSON so numpy scalars/arrays and paths become plain Python; NaN/inf become None."""
    import math

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(json.loads(json.dumps(obj, default=_json_default)))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf as null, see :func:`to_jsonable`) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")
