"""An exclusive advisory lock on a directory, held by one writer process (POSIX ``flock``).

The lock is the file ``DIR/.lock``. Its holder writes ``{"pid", "host", "started", "command"}`` into it, so a
second writer is refused with an error that names the holder. The kernel releases a ``flock`` when its process dies
(``SIGKILL`` included), so a lock file whose content names a process but that can be locked again is *stale*: the
new writer takes it over and says so (:attr:`DirectoryLock.takeover`). The lock file is never deleted (deleting it
would let two processes lock two different files of the same name); a clean release empties it.

Within one process the lock is re-entrant: nested ``acquire_directory_lock`` calls on the same directory share one
file descriptor and are counted, so a comparison can hold the lock around the runs that also take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"

try:  # pragma: no cover - platform dependent
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, writers are not serialized
    fcntl = None  # type: ignore[assignment]


class LockHeldError(RuntimeError):
    """Another live process holds the directory's lock; the message names it (pid, host, since, command)."""


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (no holder recorded)"
    cmd = holder.get("command")
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
            + (f" ({cmd})" if cmd else ""))


def read_holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in ``DIR/.lock`` (``None`` when empty, absent or unreadable)."""
    p = Path(directory) / LOCK_NAME
    try:
        text = p.read_text(errors="replace").strip()
        data = json.loads(text) if text else None
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def pid_alive(pid: Any) -> bool | None:
    """Whether process ``pid`` exists on this host (``None`` when unknown)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (TypeError, ValueError, OSError):
        return None
    return True


def is_locked(directory: str | os.PathLike) -> bool:
    """Whether a live process holds the lock of ``directory`` (tested with a shared, non-blocking ``flock`` that
    is released at once; never creates the lock file). Always ``False`` without ``fcntl``."""
    p = Path(directory) / LOCK_NAME
    if fcntl is None or not p.exists():
        return False
    if _HELD.get(_key(directory)) is not None:
        return True
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _key(directory: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(directory))


class DirectoryLock:
    """The exclusive lock of one directory (see module docstring). Use :func:`acquire_directory_lock`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None
        self.count = 0
        self.takeover: str | None = None
        self.holder: dict[str, Any] = {}
        self.heartbeat_stop: threading.Event | None = None  # set by the owner's heartbeat (RunStore)

    def acquire(self, wait: float = 1.0) -> None:
        """Take the lock (polling up to ``wait`` seconds); ``LockHeldError`` naming the holder if it stays held."""
        if fcntl is None:  # pragma: no cover
            self.fd = -1
            return
        from optiscope.utils.atomic import default_file_mode

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_file_mode())
        except OSError as e:
            raise OSError(e.errno, f"cannot create the lock file {self.path}: {e.strerror or e}") from e
        deadline = time.monotonic() + max(float(wait), 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockHeldError(f"{self.directory} is in use by {_describe(read_holder(self.directory))}; "
                                        f"wait for it to finish (or stop it) before writing here") from None
                time.sleep(0.05)
        old = read_holder(self.directory)
        if old:
            alive = pid_alive(old.get("pid")) if old.get("host") == socket.gethostname() else None
            state = "process gone" if alive is False else "lock released without cleanup"
            self.takeover = f"took over the stale lock of {self.directory} left by {_describe(old)} ({state})"
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.holder) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Empty the lock file and release the lock."""
        if self.fd is None:
            return
        if fcntl is not None and self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None


_HELD: dict[str, DirectoryLock] = {}
_GUARD = threading.Lock()


def acquire_directory_lock(directory: str | os.PathLike, wait: float = 1.0) -> DirectoryLock:
    """Take (or re-enter) the exclusive lock of ``directory``; pair with :func:`release_directory_lock`."""
    key = _key(directory)
    with _GUARD:
        lock = _HELD.get(key)
        if lock is None:
            lock = DirectoryLock(directory)
            lock.acquire(wait)
            _HELD[key] = lock
        lock.count += 1
        return lock


def release_directory_lock(directory: str | os.PathLike) -> None:
    """Leave one level of the lock of ``directory``; the last level releases it."""
    key = _key(directory)
    with _GUARD:
        lock = _HELD.get(key)
        if lock is None:
            return
        lock.count -= 1
        if lock.count <= 0:
            lock.release()
            del _HELD[key]


def held_lock(directory: str | os.PathLike) -> DirectoryLock | None:
    """This process's lock of ``directory``, or ``None``."""
    return _HELD.get(_key(directory))


def move_held_lock(old: str | os.PathLike, new: str | os.PathLike) -> None:
    """Re-key a lock this process holds after its directory was renamed from ``old`` to ``new``."""
    with _GUARD:
        lock = _HELD.pop(_key(old), None)
        if lock is not None:
            lock.directory = Path(new)
            lock.path = lock.directory / LOCK_NAME
            _HELD[_key(new)] = lock
