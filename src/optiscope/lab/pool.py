"""A Ray worker pool for independent jobs (experiments of ``optiscope reproduce``, cells of ``optiscope sweep``).

- Local by default: ``ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)``; every job gets
  ``threads = max(1, cpu_count // workers)`` torch/BLAS threads (its share of the machine), runs in a fresh worker
  process (``max_calls=1``: no state leaks between jobs) and at most ``workers`` jobs run at once.
- ``address="host:port"`` (or ``ray://host:port``, or ``auto``) joins an existing cluster; the address is probed with
  a TCP connection first and ``ray.init`` runs under a timeout, so an unreachable cluster is a clear
  :class:`PoolError` after ``connect_timeout`` seconds, never a hang.
- A Ray session that is already initialised in this process is reused (and left running).
- Ray's own memory monitor is off for a local pool (``RAY_memory_monitor_refresh_ms=0`` unless set): it kills jobs
  when the machine as a whole runs short of memory, also for memory other users' processes hold. Workers run at
  the caller's priority (``RAY_worker_niceness=0``; Ray's default, nice 15, starves them on a shared machine) and
  are ordinary OOM candidates (``RAY_worker_oom_score_adjustment=0``).

:func:`run_jobs` submits jobs, keeps ``workers`` of them in flight and calls ``on_event(key, event, info)`` with
``"started"`` and ``"done"`` events, so a caller can draw one progress view across all jobs. A job that raises is
returned as ``{"status": "failed", "error": ...}``; the other jobs continue.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


class PoolError(ValueError):
    """The Ray pool cannot be started or reached; the message says what to do."""


@dataclass(frozen=True)
class Pool:
    """A started Ray pool: ``workers`` jobs at once, each with ``threads`` threads; ``address`` None = local."""

    workers: int
    threads: int
    address: str | None
    owned: bool
    gpus_per_job: float = 0.0

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``"local Ray, 2 workers x 1 thread"``."""
        where = "local Ray" if self.address is None else f"Ray cluster at {self.address}"
        return f"{where}, {self.workers} workers x {self.threads} thread{'s' if self.threads != 1 else ''}"


def check_workers(workers: int | None) -> int | None:
    """``None`` (default: one per CPU) or an integer >= 1; anything else is a :class:`PoolError`."""
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PoolError(f"workers = {workers!r} is invalid; allowed: an integer >= 1")
    return workers


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` / ``ray://host:port``; None for ``auto``/``local``."""
    a = address.strip()
    if a in ("auto", "local"):
        return None
    if "://" in a:
        a = a.split("://", 1)[1]
    a = a.rstrip("/")
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PoolError(f"Ray address {address!r} is invalid; expected host:port, ray://host:port or auto")
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Raise :class:`PoolError` unless a TCP connection to the Ray address opens within ``timeout`` seconds."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        raise PoolError(f"cannot reach a Ray cluster at {address!r} within {timeout:g} s ({e.strerror or e}); "
                        "start one with `ray start --head` or omit --ray-address to run locally") from None


def _init_with_timeout(timeout: float, **kwargs: Any) -> None:
    import ray

    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="ray-init")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise PoolError(f"cannot reach a Ray cluster at {kwargs.get('address')!r}: no answer within {timeout:g} s; "
                        "check the address (`ray status` on the head node) or omit --ray-address to run locally")
    if "error" in box:
        e = box["error"]
        raise PoolError(f"cannot reach a Ray cluster at {kwargs.get('address')!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


def start_pool(workers: int | None = None, address: str | None = None, connect_timeout: float = 20.0,
               device: str | None = None) -> Pool:
    """Start (or join, or reuse) Ray and return the :class:`Pool` description (see the module docstring)."""
    import ray

    workers = check_workers(workers)
    cpus = os.cpu_count() or 1
    owned = False
    if not ray.is_initialized():
        if address:
            probe_address(address, timeout=min(connect_timeout, 5.0))
            _init_with_timeout(connect_timeout, address=address, include_dashboard=False, log_to_driver=False,
                               ignore_reinit_error=True)
        else:
            import logging

            # Ray's memory monitor kills workers when the *node* is short of memory, whoever uses it; on a shared
            # machine that kills our jobs for others' memory and retries them from scratch, again and again. The
            # kernel's OOM killer stays in charge. Set RAY_memory_monitor_refresh_ms yourself to keep Ray's.
            os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
            # Ray also marks its workers as the kernel's first OOM victims (oom_score_adj 1000); on a shared machine
            # that sacrifices our jobs for others' memory. Make them ordinary processes.
            os.environ.setdefault("RAY_worker_oom_score_adjustment", "0")
            # and Ray starts its workers at nice 15: on a machine shared with other (nice 0) work they then get a
            # sliver of the CPU and "parallel" runs slower than one process. Same priority as the caller.
            os.environ.setdefault("RAY_worker_niceness", "0")
            for attempt in (1, 2):  # Ray's start-up can time out on an overloaded machine; try once more
                try:
                    ray.init(num_cpus=workers or cpus, include_dashboard=False, log_to_driver=False,
                             ignore_reinit_error=True, logging_level=logging.ERROR)
                    break
                except Exception as e:  # noqa: BLE001 - Ray raises plain Exception on start-up timeouts
                    ray.shutdown()
                    if attempt == 2:
                        raise PoolError(f"local Ray did not start ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                        f"load average {os.getloadavg()[0]:.1f} on {cpus} CPUs; try again when "
                                        "the machine is less busy") from None
                    time.sleep(5.0)
        owned = True
    total = int(ray.cluster_resources().get("CPU", workers or cpus))
    if workers is None:
        workers = max(1, total if address else min(total, cpus))
    threads = max(1, (total if address else cpus) // workers)
    gpus_per_job = 0.0
    if device and str(device).startswith("cuda"):
        n_gpu = float(ray.cluster_resources().get("GPU", 0.0))
        if n_gpu <= 0:
            raise PoolError(f"device {device!r} requested but the Ray pool has no GPU")
        gpus_per_job = min(1.0, n_gpu / workers)
    return Pool(workers=workers, threads=threads, address=address or None, owned=owned, gpus_per_job=gpus_per_job)


def stop_pool(pool: Pool) -> None:
    """Shut Ray down if this pool started it (a reused session is left running)."""
    import ray

    if pool.owned and ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_pool(workers: int | None = None, address: str | None = None, connect_timeout: float = 20.0,
             device: str | None = None) -> Iterator[Pool]:
    """``with ray_pool(2) as pool: run_jobs(pool, ...)``; shuts down what it started."""
    pool = start_pool(workers, address, connect_timeout, device)
    try:
        yield pool
    finally:
        stop_pool(pool)


def _call_pinned(threads: int, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run ``fn(*args, **kwargs)`` in a worker with ``threads`` torch/BLAS threads and no progress bars."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["OPTISCOPE_QUIET"] = "1"
    import torch

    torch.set_num_threads(threads)
    from optiscope.utils.progress import set_quiet

    set_quiet(True)
    return fn(*args, **kwargs)


def run_jobs(pool: Pool, fn: Callable[..., Mapping[str, Any]], jobs: Iterable[tuple[str, tuple, dict]],
             on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
             poll: float = 0.5, on_poll: Callable[[], None] | None = None,
             fresh_process: bool = True) -> dict[str, dict[str, Any]]:
    """Run ``fn(*args, **kwargs)`` for every ``(key, args, kwargs)`` of ``jobs`` on the pool, ``pool.workers`` at a
    time; return ``{key: result dict}``. ``fn`` must return a dict; an exception (or a lost worker) becomes
    ``{"status": "failed", "error": ...}``. ``on_event(key, "started" | "done", info)`` reports progress;
    ``on_poll()`` is called about every ``poll`` seconds while jobs run. ``fresh_process`` (default) runs every job
    in a new worker process (nothing a job changes in global state reaches the next one); ``False`` lets Ray reuse
    workers, which saves the interpreter and import start-up for many small jobs."""
    import ray

    remote = ray.remote(max_calls=1 if fresh_process else 0)(_call_pinned)
    queue = list(jobs)
    in_flight: dict[Any, tuple[str, float]] = {}
    results: dict[str, dict[str, Any]] = {}

    def emit(key: str, event: str, info: Mapping[str, Any]) -> None:
        if on_event is not None:
            on_event(key, event, info)

    while queue or in_flight:
        while queue and len(in_flight) < pool.workers:
            key, args, kwargs = queue.pop(0)
            opts: dict[str, Any] = {"num_cpus": pool.threads}
            if pool.gpus_per_job:
                opts["num_gpus"] = pool.gpus_per_job
            ref = remote.options(**opts).remote(pool.threads, fn, tuple(args), dict(kwargs))
            in_flight[ref] = (key, time.time())
            emit(key, "started", {"started": time.time()})
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll)
        for ref in ready:
            key, t0 = in_flight.pop(ref)
            try:
                res = dict(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - a job's failure is an outcome, not a crash of the pool
                cause = getattr(e, "cause", None) or e
                res = {"status": "failed", "error": f"{type(cause).__name__}: {cause}",
                       "traceback": "".join(traceback.format_exception_only(type(e), e))[-4000:]}
            res.setdefault("wall_seconds", time.time() - t0)
            results[key] = res
            emit(key, "done", res)
        if on_poll is not None:
            on_poll()
    return results


def run_jobs_inline(fn: Callable[..., Mapping[str, Any]], jobs: Iterable[tuple[str, tuple, dict]],
                    on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
                    threads: int = 1) -> dict[str, dict[str, Any]]:
    """The sequential counterpart of :func:`run_jobs`: the same jobs one after another in this process, with
    ``threads`` torch threads (the previous count is restored), the same events and the same failure handling."""
    import torch

    prev = torch.get_num_threads()
    results: dict[str, dict[str, Any]] = {}
    try:
        torch.set_num_threads(max(1, int(threads)))
        for key, args, kwargs in jobs:
            t0 = time.time()
            if on_event is not None:
                on_event(key, "started", {"started": t0})
            try:
                res = dict(fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - as in run_jobs: a failure is an outcome
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=20)[-4000:]}
            res.setdefault("wall_seconds", time.time() - t0)
            results[key] = res
            if on_event is not None:
                on_event(key, "done", res)
    finally:
        torch.set_num_threads(prev)
    return results


__all__ = ["run_jobs_inline", "Pool", "PoolError", "check_workers", "probe_address", "ray_pool", "run_jobs", "start_pool", "stop_pool"]
