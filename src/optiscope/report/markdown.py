"""``report.md`` and ``report.html`` for a run directory: status, claims with verdicts, headline metrics, per-run
and per-layer tables, figures, config, timings and environment.

The Markdown is the one source: ``report.html`` is that Markdown rendered by a real CommonMark renderer
(markdown-it-py, with tables) inside a jinja2 page template (:mod:`optiscope.report.html`), so tables, emphasis and
figures display as such in a browser. :func:`compare_runs` puts several run directories side by side
(``optiscope show DIR1 DIR2 ...`` and the reproduction report use it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from optiscope.lab.store import RunStore, StoreError

CI_KEYS = ("ci95", "ci", "ci_95", "ci90", "interval", "bootstrap_ci")
"""Keys under which a measured value's confidence interval ``[low, high]`` is stored in results.json."""

VERDICT_LABELS = {True: "holds", False: "does not hold", None: "untestable"}
"""How a three-valued ``holds`` reads in reports."""


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.4g}"
    if isinstance(x, (dict, list)):
        s = json.dumps(x, default=str)
        return s if len(s) <= 120 else s[:117] + "..."
    return str(x)


def _is_interval(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


def format_value(v: Any, limit: int = 160) -> str:
    """A claim's ``paper`` or ``measured`` value as short text; a confidence interval stored next to a number
    (keys :data:`CI_KEYS`) is shown as ``value [low, high]``."""
    if isinstance(v, Mapping):
        items = dict(v)
        ci = next((items.pop(k) for k in CI_KEYS if k in items and _is_interval(items[k])), None)
        parts = []
        first = True
        for k, x in items.items():
            text = f"{k} {format_value(x, limit)}"
            if first and ci is not None and isinstance(x, (int, float)) and not isinstance(x, bool):
                text += f" [{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]"
                ci = None
            first = False
            parts.append(text)
        if ci is not None:
            parts.append(f"CI [{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]")
        s = "; ".join(parts)
    elif isinstance(v, (list, tuple)):
        s = "[" + ", ".join(format_value(x, limit) for x in v) + "]"
    else:
        s = _fmt(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def verdict_label(holds: Any) -> str:
    """``True`` -> "holds", ``False`` -> "does not hold", ``None`` -> "untestable"."""
    return VERDICT_LABELS.get(holds if holds in (True, False, None) else None, "untestable")


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and len(v) <= 40:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _cell(x: Any) -> str:
    """Text for a Markdown table cell: pipes escaped, newlines folded."""
    return str(x).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def final_values(df, metrics=("loss", "eval_loss", "accuracy", "eval_accuracy", "sharpness", "precond_sharpness",
                                "one_norm", "grad_norm", "trace")):
    """Per run: the last recorded value of each global metric (a DataFrame indexed by run)."""
    d = df[(df["layer"] == "") & (df["metric"].isin(metrics))]
    if d.empty:
        return pd.DataFrame()
    last = d.sort_values("step").groupby(["run", "metric"]).tail(1)
    out = last.pivot(index="run", columns="metric", values="value")
    out["step"] = d.groupby("run")["step"].max()
    cols = ["step"] + [m for m in metrics if m in out.columns]
    runs = list(dict.fromkeys(df["run"].tolist()))
    return out.reindex(runs)[cols]


def final_layer_values(df, metric="r_med"):
    """Per layer (rows) and run (columns): the last recorded value of a per-layer metric."""
    d = df[(df["metric"] == metric) & (df["layer"] != "")]
    if d.empty:
        return None
    last = d.sort_values("step").groupby(["run", "layer"]).tail(1)
    out = last.pivot(index="layer", columns="run", values="value")
    layers = list(dict.fromkeys(d["layer"].tolist()))
    return out.reindex(layers)[list(dict.fromkeys(d["run"].tolist()))]


def lab_summary(store: RunStore, manifest: dict) -> list[str]:
    """Markdown lines for a lab run directory: per-run status, final values, final R_med per layer."""
    lines: list[str] = []
    runs = manifest.get("runs") or {}
    try:
        df = store.read_metrics()
    except StoreError as e:
        return [f"> {e}", ""]
    if not runs and df.empty:
        return lines
    if runs:
        lines.append("## Runs\n")
        rows = []
        for name, r in runs.items():
            secs = f"{_fmt(r.get('seconds'))} ({_fmt(r.get('train_seconds'))} / {_fmt(r.get('probe_seconds'))})"
            rows.append([name, r.get("optimizer", ""), r.get("status", ""), secs])
        lines += _table(["run", "optimizer", "status", "seconds (train / probes)"], rows)
    if not df.empty:
        fv = final_values(df)
        if not fv.empty:
            lines.append("## Final values\n")
            lines += _table(["run", *fv.columns], [[run, *("" if pd.isna(v) else _fmt(float(v)) for v in row)]
                                                   for run, row in fv.iterrows()])
        fl = final_layer_values(df, "r_med")
        if fl is not None:
            lines.append("## R_med per layer (last checkpoint)\n")
            lines += _table(["layer", *map(str, fl.columns)],
                            [[layer, *("" if pd.isna(v) else _fmt(float(v)) for v in row)]
                             for layer, row in fl.iterrows()])
    return lines


def figure_files(store: RunStore) -> list[Path]:
    """The PNG and SVG figures of a run directory (``figures/``), sorted by name."""
    d = store.path("figures")
    if not d.is_dir():
        return []
    return sorted([p for p in d.iterdir() if p.suffix.lower() in (".png", ".svg") and p.stat().st_size > 0])


def _paper_reference(key: Any) -> str | None:
    if not key:
        return None
    try:
        from optiscope.papers import paper

        ref = paper(str(key))
    except (ImportError, ValueError):
        return None
    return f"{ref.short}: {ref.citation()}"  # arXiv id as text: the report links only to its own files


def render_markdown(store: RunStore, back_link: str | None = None) -> str:
    """The Markdown report of one run directory (``back_link``: a relative link to an index page, shown first)."""
    lines: list[str] = []
    if back_link:
        lines += [f"[← all experiments]({back_link})", ""]
    try:
        manifest = store.read_manifest()
    except StoreError as e:
        manifest = {"status": f"unreadable ({e})"}
    results = None
    if store.path("results.json").exists():
        try:
            results = store.read_results()
        except StoreError as e:
            lines += [f"> results.json unreadable: {e}", ""]
    title = (results or {}).get("experiment") or manifest.get("experiment") or store.root.name
    lines.append(f"# {title}\n")
    lines.append(f"- status: **{manifest.get('status', 'unknown')}**")
    if manifest.get("error"):
        lines.append(f"- error: `{_cell(manifest['error'])[:500]}`")
    for k in ("preset", "seed"):
        if k in manifest:
            lines.append(f"- {k}: {_fmt(manifest[k])}")
    ref = _paper_reference(manifest.get("paper"))
    if ref:
        lines.append(f"- paper: {ref}")
    elif manifest.get("paper"):
        lines.append(f"- paper: {manifest['paper']}")
    lines.append("")
    if results and results.get("claims"):
        lines.append("## Claims\n")
        rows = []
        for c in results["claims"]:
            if not isinstance(c, Mapping):
                continue
            verdict = verdict_label(c.get("holds"))
            rows.append([c.get("id", ""), c.get("claim", ""), format_value(c.get("paper")),
                         format_value(c.get("measured")), f"**{verdict}**" if c.get("holds") is False else verdict,
                         c.get("reason") or "", c.get("tier") or results.get("preset", "")])
        lines += _table(["id", "claim", "paper", "measured", "verdict", "why", "tier"], rows)
    if results and results.get("metrics"):
        lines.append("## Metrics\n")
        lines += _table(["metric", "value"], [[f"`{k}`", _fmt(v)] for k, v in _flatten(results["metrics"])[:200]])
    lines.extend(lab_summary(store, manifest))
    figs = figure_files(store)
    if figs:
        lines.append("## Figures\n")
        for f in figs:
            lines.append(f"![{f.stem}](figures/{f.name})\n")
    if manifest.get("traceback"):
        lines += ["## Traceback\n", "```text", str(manifest["traceback"]).rstrip(), "```", ""]
    if store.path("config.yaml").exists():
        try:
            text = store.path("config.yaml").read_text()
        except OSError as e:
            text = f"unreadable: {e}"
        lines += ["## Config\n", "```yaml", text.rstrip(), "```", ""]
    timing = [(k, manifest[k]) for k in ("created", "updated", "seconds") if k in manifest]
    if isinstance(manifest.get("started"), (int, float)):
        import datetime as _dt

        when = _dt.datetime.fromtimestamp(float(manifest["started"]), _dt.timezone.utc)
        timing.insert(0, ("started", when.isoformat(timespec="seconds")))
    if timing:
        lines.append("## Timings\n")
        lines += _table(["", "value"], [[k, _fmt(v)] for k, v in timing])
    env = manifest.get("environment") or {}
    if env:
        lines.append("## Environment\n")
        lines += _table(["", "version"], [[k, _fmt(v)] for k, v in env.items()])
    return "\n".join(lines) + "\n"


def compare_runs(stores: Sequence[RunStore | str | Path]) -> pd.DataFrame:
    """Several run directories side by side: one column per directory, one row per field (status, experiment,
    preset, seed, seconds, git, the final value of each run and global metric, and each claim's verdict and
    measured value). Unreadable files leave their cells empty."""
    cols: dict[str, dict[str, str]] = {}
    order: list[str] = []

    def put(col: dict[str, str], key: str, value: Any) -> None:
        if key not in order:
            order.append(key)
        col[key] = value if isinstance(value, str) else _fmt(value)

    for s in stores:
        store = s if isinstance(s, RunStore) else RunStore.open(s)
        col: dict[str, str] = {}
        try:
            m = store.read_manifest()
        except StoreError:
            m = {}
        put(col, "status", str(m.get("status", "unknown")))
        for k in ("experiment", "kind", "preset", "seed", "seconds"):
            if k in m:
                put(col, k, m[k])
        env = m.get("environment") or {}
        for k in ("git", "torch"):
            if env.get(k):
                put(col, k, str(env[k])[:12])
        try:
            df = store.read_metrics()
        except StoreError:
            df = None
        if df is not None and not df.empty:
            fv = final_values(df)
            for run, row in fv.iterrows():
                for metric, v in row.items():
                    if not pd.isna(v):
                        put(col, f"{run} / {metric}", float(v))
        if store.path("results.json").exists():
            try:
                res = store.read_results()
            except StoreError:
                res = {}
            for c in res.get("claims", []) or []:
                if isinstance(c, Mapping):
                    put(col, f"claim {c.get('id')}",
                        f"{verdict_label(c.get('holds'))}: {format_value(c.get('measured'), 60)}")
        name = str(store.root)
        while name in cols:
            name += "'"
        cols[name] = col
    short = [Path(k).name for k in cols]
    labels = short if len(set(short)) == len(short) else list(cols)
    return pd.DataFrame({lab: [c.get(r, "") for r in order] for lab, c in zip(labels, cols.values())}, index=order)


def write_report(store: RunStore | str | Path) -> Path:
    """Write ``report.md`` and ``report.html`` (the same Markdown rendered by
    :func:`optiscope.report.html.render_run_page`) into the run directory; return the Markdown path. A run
    directory inside a reproduction (its parent holds ``reproduce.json``) links back to the index page."""
    from optiscope.report.html import render_run_page

    if not isinstance(store, RunStore):
        store = RunStore.open(store)
    in_site = (store.root.parent / "reproduce.json").exists()
    md = render_markdown(store, back_link="../index.html" if in_site else None)
    path = store.write_text("report.md", md)
    store.write_text("report.html", render_run_page(md, title=store.root.name))
    return path


__all__ = [
    "CI_KEYS",
    "VERDICT_LABELS",
    "compare_runs",
    "figure_files",
    "final_layer_values",
    "final_values",
    "format_value",
    "lab_summary",
    "render_markdown",
    "verdict_label",
    "write_report",
]
