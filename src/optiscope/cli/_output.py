"""How the CLI writes to stdout: rich tables on a terminal, plain aligned text when piped, JSON with ``--json``.

* :func:`print_table` prints a :class:`rich.table.Table`. On a terminal every column wraps (``overflow="fold"``),
  so no cell or header is ever cut; when stdout is not a terminal the same table is written as plain text, one row
  per line, columns separated by two spaces, no box drawing and no colour.
* :func:`begin_json` / :func:`emit_json`: with ``--json`` everything a command would print (messages, tables)
  goes to stderr and stdout receives exactly one JSON document (``NaN`` and infinities become ``null``).
* The JSON shapes (documented in ``docs/cli.md``; keys are only ever added, never renamed or removed) are built
  by :func:`experiments_json`, :func:`store_json` and :func:`run_json`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = [
    "begin_json", "claims_table", "emit_json", "experiments_json", "experiments_table", "jsonable", "print_table",
    "run_json", "stdout_is_terminal", "store_json", "table_to_text",
]

_REAL_STDOUT: list[TextIO] = []


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal (rich's test: honours ``FORCE_COLOR`` and ``TTY_COMPATIBLE``)."""
    return Console(file=sys.stdout).is_terminal


def _plain(cell: Any) -> str:
    if isinstance(cell, Text):
        s = cell.plain
    elif isinstance(cell, str):
        s = Text.from_markup(cell).plain
    else:
        s = str(cell)
    return " ".join(s.split())  # one line per row: newlines and runs of spaces collapse


def table_to_text(table: Table) -> str:
    """The table as plain text: an optional title line, a header line, one line per row; columns padded to their
    widest cell and separated by two spaces; right-justified columns stay right-justified; nothing is cut."""
    headers = [_plain(c.header) for c in table.columns]
    cols = [[_plain(x) for x in c.cells] for c in table.columns]
    n_rows = max((len(c) for c in cols), default=0)
    cols = [c + [""] * (n_rows - len(c)) for c in cols]
    widths = [max([len(h)] + [len(x) for x in c]) for h, c in zip(headers, cols)]
    right = [c.justify == "right" for c in table.columns]

    def line(cells: Sequence[str]) -> str:
        parts = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(cells, widths, right)]
        return "  ".join(parts).rstrip()

    out = []
    if table.title:
        out.append(_plain(table.title))
    out.append(line(headers))
    out.extend(line([c[i] for c in cols]) for i in range(n_rows))
    return "\n".join(out) + "\n"


def _fits(console: Console, table: Table) -> bool:
    wide = console.options.update(width=1_000_000, max_width=1_000_000)
    return Measurement.get(console, wide, table).maximum <= console.width


def _has_prose(table: Table) -> bool:
    """Whether some cell is running text (then wrapping it inside its column reads best)."""
    return any(len(_plain(c).split()) >= 6 for col in table.columns for c in col.cells)


def _print_records(console: Console, table: Table) -> None:
    headers = [_plain(c.header) for c in table.columns]
    cols = [[_plain(x) for x in c.cells] for c in table.columns]
    if table.title:
        console.print(Text(_plain(table.title), style="bold"))
    for i in range(max((len(c) for c in cols), default=0)):
        cells = [c[i] if i < len(c) else "" for c in cols]
        console.print(Text(f"{headers[0]}: {cells[0]}", style="bold"))
        for h, v in zip(headers[1:], cells[1:]):
            console.print(Text(f"  {h}: {v}"))


def print_table(table: Table, file: TextIO | None = None) -> None:
    """Print ``table`` to ``file`` (default stdout): boxed and wrapped on a terminal, plain text otherwise."""
    f = file if file is not None else sys.stdout
    console = Console(file=f)
    if console.is_terminal:
        for col in table.columns:
            col.overflow = "fold"
            col.no_wrap = False
        if not _fits(console, table):
            table.box = box.SIMPLE_HEAD  # no vertical rules: one character a column less
            if not _fits(console, table) and not _has_prose(table):
                _print_records(console, table)  # many short cells: one block per row, nothing folded or cut
                return
        console.print(table)
    else:
        f.write(table_to_text(table))
        f.flush()


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars and arrays, tuples, sets, paths and dates made JSON-native and non-finite floats
    replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (Path, _dt.date)):
        return str(x)
    if hasattr(x, "tolist"):  # numpy scalars and arrays, torch tensors
        return jsonable(x.tolist())
    if hasattr(x, "item"):
        return jsonable(x.item())
    return str(x)


def begin_json(enabled: bool) -> None:
    """With ``enabled``, send everything the command prints to stderr until :func:`emit_json` writes the result."""
    if enabled and not _REAL_STDOUT:
        _REAL_STDOUT.append(sys.stdout)
        sys.stdout = sys.stderr


def emit_json(obj: Any) -> None:
    """Write ``obj`` as one indented JSON document to the real stdout (restored if :func:`begin_json` diverted
    it)."""
    if _REAL_STDOUT:
        sys.stdout = _REAL_STDOUT.pop()
    sys.stdout.write(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def claims_table(claims: Iterable[Mapping[str, Any]], title: str, colored: bool = True) -> Table:
    """A results.json ``claims`` list as a table (id, claim, paper, measured, holds, reason), cells never cut."""
    marks = {True: "[green]yes[/]", False: "[red]no[/]", None: "n/a"} if colored else \
        {True: "yes", False: "no", None: "n/a"}
    table = Table("id", "claim", "paper", "measured", "holds", "reason", title=title)
    for c in claims:
        table.add_row(*(Text(str(c.get(k, "") if c.get(k) is not None else "")) for k in ("id", "claim", "paper",
                                                                                        "measured")),
                      marks.get(c.get("holds"), "?"), Text(str(c.get("reason") or "")))
    return table


def experiments_json() -> dict[str, Any]:
    """``optiscope list --json``: ``{"experiments": [{"name", "paper", "paper_key", "reference", "title",
    "presets"}]}``; ``paper`` is the short citation, ``reference`` the full one."""
    from optiscope.experiments.base import registry
    from optiscope.papers import paper

    out = []
    for name, spec in registry().items():
        ref = paper(spec.paper)
        out.append({"name": name, "paper": ref.short, "paper_key": spec.paper, "reference": ref.citation(),
                    "title": spec.title, "presets": list(spec.presets)})
    return {"experiments": out}


def experiments_table() -> Table:
    """The registered experiments: name, paper (short citation), title, presets."""
    table = Table("name", "paper", "title", "presets")
    for e in experiments_json()["experiments"]:
        table.add_row(e["name"], e["paper"], e["title"], ", ".join(e["presets"]))
    return table


def _num(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


def store_json(store) -> dict[str, Any]:
    """``optiscope show --json`` (and ``compare --json``) for one run directory::

        {"run_dir": str, "status": str, "problems": [str],
         "runs": {run: {"status": str, "optimizer": str, "final": {metric: float | null}}},
         "r_med": {layer: {run: float | null}},
         "claims": [{"id", "claim", "paper", "measured", "holds", "reason", ...}]}

    ``final`` holds the last recorded value of each global metric and its ``step``; ``r_med`` the last per-layer
    R_med; ``claims`` is empty for lab comparisons; ``problems`` names corrupt or partial files."""
    from optiscope.lab.store import StoreError
    from optiscope.report.markdown import final_layer_values, final_values

    unreadable = (StoreError, OSError, ValueError)  # named by store.check(); the rest is still shown
    problems = [str(p) for p in store.check()]
    try:
        manifest = store.read_manifest()
    except unreadable:
        manifest = {}
    runs_meta = manifest.get("runs") or {}
    try:
        df = store.read_metrics()
    except unreadable:
        df = None
    fv = final_values(df) if df is not None and not df.empty else None
    names = list(dict.fromkeys(list(runs_meta) + (list(fv.index) if fv is not None and not fv.empty else [])))
    runs: dict[str, Any] = {}
    for name in names:
        meta = runs_meta.get(name) or {}
        final = {}
        if fv is not None and not fv.empty and name in fv.index:
            final = {str(c): _num(fv.loc[name, c]) for c in fv.columns}
            if final.get("step") is not None:
                final["step"] = int(final["step"])
        runs[name] = {"status": str(meta.get("status", "")), "optimizer": str(meta.get("optimizer", "")),
                      "final": final}
    r_med: dict[str, Any] = {}
    if df is not None and not df.empty:
        fl = final_layer_values(df, "r_med")
        if fl is not None:
            r_med = {str(layer): {str(r): _num(v) for r, v in row.items()} for layer, row in fl.iterrows()}
    claims: list[Any] = []
    if store.path("results.json").exists():
        try:
            claims = list(store.read_results().get("claims", []))
        except unreadable as e:  # a corrupt results.json is a problem to report, not a crash
            problems.append(f"results.json: {e}")
    return {"run_dir": str(store.root), "status": str(manifest.get("status", "unknown")), "problems": problems,
            "runs": runs, "r_med": r_med, "claims": claims}


def run_json(store, report: Path | str | None = None) -> dict[str, Any]:
    """``optiscope run --json``: the run's ``results.json`` (``experiment``, ``preset``, ``seed``, ``claims``,
    ``metrics``) plus ``paths`` = ``{"run_dir", "results", "report"}``."""
    results = dict(store.read_results())
    results["paths"] = {"run_dir": str(store.root), "results": str(store.path("results.json")),
                        "report": str(report) if report is not None else None}
    return results
