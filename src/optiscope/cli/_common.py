"""Output helpers shared by the command modules (kept apart from ``cli.main``, which imports those modules)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import typer
from rich.console import Console
from rich.table import Table


def fail(message: str, code: int = 2) -> None:
    """Print a clean error (no traceback) on stderr and exit with ``code``."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def warn_problems(store) -> list[str]:
    """Print one warning per corrupt or partial file of a run directory (``RunStore.check``); return them."""
    problems = store.check()
    for p in problems:
        Console(stderr=True, soft_wrap=True).print(f"[yellow]warning:[/] {p}", highlight=False)
    return problems


def claims_table(claims: Iterable[Mapping[str, Any]], title: str, colored: bool = True) -> Table:
    """A results.json ``claims`` list as a rich table (claim, paper, measured, holds)."""
    marks = {True: "[green]yes[/]", False: "[red]no[/]", None: "n/a"} if colored else \
        {True: "yes", False: "no", None: "n/a"}
    table = Table("claim", "paper", "measured", "holds", title=title)
    for c in claims:
        table.add_row(str(c.get("claim"))[:70], str(c.get("paper"))[:30], str(c.get("measured"))[:40],
                      marks.get(c.get("holds"), "?"))
    return table


DEVICE_HELP = "cpu | cuda | cuda:N | auto (cuda when available, else cpu)"


def check_device(device: str | None, cpu_only: str | None = None) -> str | None:
    """Validate a ``--device`` value and resolve ``auto``; exit 2 with a clear message when it is malformed or the
    device is absent. ``cpu_only`` (a command name): that command measures on the CPU only, so any other resolved
    device is refused. ``None`` stays ``None`` (the command's default)."""
    if device is None:
        return None
    import re

    d = device.strip().lower()
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", d):
        fail(f"unknown device {device!r}; use {DEVICE_HELP}")
    from optiscope.lab.config import resolve_device_name

    try:
        d = resolve_device_name(d)
    except ValueError as e:
        fail(str(e))
    if cpu_only and d != "cpu":
        fail(f"{cpu_only} measures on the CPU only; --device {device} is not supported by it")
    return d


def print_notices(store) -> None:
    """Print a run store's notices (temporary files removed, stale lock taken over, damaged files moved aside)."""
    for n in getattr(store, "notices", []):
        if n.startswith("took over the stale lock"):  # already printed by RunStore.acquire_lock
            continue
        Console(stderr=True, soft_wrap=True).print(f"[yellow]note:[/] {n}", highlight=False)
    if hasattr(store, "notices"):
        store.notices.clear()


def prepare_experiment(name: str, preset: str, out, overrides, config_file, device: str | None, resume: bool,
                       force: bool):
    """``optiscope run``: resolve the experiment's config (``--device`` becomes ``--set device=...`` for
    experiments whose config has a ``device`` field; a CPU-only experiment runs on the CPU with a note saying why)
    and take the output directory's writer lock. A directory that
    already holds a run is refused unless ``--resume`` (same experiment, config equal field by field: it is
    re-run into the directory) or ``--force`` (the old run is moved aside). Returns ``(config, locked RunStore)``;
    the caller releases the lock. Exits 2 with a message on any refusal."""
    from pathlib import Path

    from optiscope.experiments.base import get, resolve_config
    from optiscope.lab.store import RunStore, StoreError, config_differences

    if resume and force:
        fail("--resume and --force exclude each other")
    spec = get(name)
    overrides = list(overrides)
    device = check_device(device)
    if device is not None:
        from optiscope.experiments.base import device_support

        supported, why = device_support(spec)
        if supported:
            overrides.append(f"device={device}")
        elif device != "cpu":
            Console(stderr=True, soft_wrap=True).print(
                f"[yellow]note:[/] experiment {name} runs on the CPU ({why}); --device {device} does not apply",
                highlight=False)
    try:
        cfg = resolve_config(name, preset, overrides, config_file)
        store = RunStore(out or Path("runs") / f"{name}-{preset}")
        store.acquire_lock()
    except (KeyError, ValueError, StoreError) as e:
        fail(str(e.args[0] if isinstance(e, KeyError) else e))
    try:
        if store.holds_run():
            try:
                m = store.read_manifest()
            except StoreError:
                m = {}
            if resume:
                if m.get("experiment") not in (None, name):
                    raise StoreError(f"{store.root} holds experiment {m.get('experiment')!r}, not {name!r}")
                diffs = config_differences(store.verify_config(fields=spec.config.field_names()), cfg.to_dict())
                if diffs:
                    raise StoreError(f"{store.root} holds {name} with another config: " + "; ".join(diffs))
            elif force:
                store.move_aside()
            else:
                what = m.get("experiment") or m.get("kind") or "a run"
                raise StoreError(f"{store.root} already holds {what} (status {m.get('status', 'unknown')}); use "
                                 "--resume to re-run it with the same config, --force to move it aside, or another "
                                 "--out")
    except (ValueError, StoreError) as e:
        store.release_lock()
        fail(str(e))
    print_notices(store)
    return cfg, store
