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
