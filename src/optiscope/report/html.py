"""HTML pages: the per-run ``report.html`` and the static site of a reproduction (``DIR/index.html``).

Both are rendered from jinja2 templates (``report/templates/``, autoescaped) and Markdown goes through
markdown-it-py (CommonMark plus tables, raw HTML disabled), never through string concatenation. The site needs no
server: every link is a relative path to a file in ``DIR`` (``NAME/report.html``, ``NAME/figures/*.png``), and the
pages load no script and nothing from the network.

``DIR/index.html`` holds the table of every claim (paper, experiment, claim, the paper's number, ours with its
interval, verdict true / false / untestable and why, tier), one row per experiment (status, error, claim counts,
seconds, git hash), the papers' references and the environment (versions, the Ray pool, wall time and load average
of each ``reproduce`` session). Each experiment's page is its own ``NAME/report.html``
(:func:`optiscope.report.markdown.write_report`): figures, layer tables, config, timings, versions and git hash.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from optiscope.lab.store import RunStore, StoreError
from optiscope.report.markdown import format_value, verdict_label, write_report
from optiscope.utils.atomic import atomic_write_text

TEMPLATES = Path(__file__).with_name("templates")
"""Directory of the jinja2 templates (``base.html``, ``run.html``, ``index.html``)."""


@lru_cache(maxsize=1)
def _env():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


@lru_cache(maxsize=1)
def _md():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")


def markdown_to_html(text: str) -> str:
    """CommonMark (with tables) to HTML; raw HTML in the input is escaped, not passed through."""
    return _md().render(text)


def markdown_inline(text: str) -> str:
    """One line of Markdown (emphasis, code) to inline HTML."""
    return _md().renderInline(text)


def render_run_page(markdown: str, title: str) -> str:
    """The ``report.html`` of a run directory: its Markdown report rendered inside the page template."""
    return _env().get_template("run.html").render(title=title, body=markdown_to_html(markdown))


def _claims_rows(out: Path, exps: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per claim of every experiment directory under ``out`` that has a results.json, through the
    results table's :func:`~optiscope.report.results_table.claims_rows` (the README's table uses the same rows)."""
    from optiscope.report.results_table import claims_rows

    dirs = [out / n for n in sorted(exps) if (out / n / "results.json").is_file()]
    rows = []
    for r in claims_rows(dirs) if dirs else []:
        info = exps.get(r["experiment"]) or {}
        rows.append({**r, "paper_name": r.get("paper_ref") or info.get("paper_name") or info.get("paper") or "",
                     "paper_text": format_value(r.get("paper")), "measured_text": r.get("ours", "")})
    return rows


def _verdict_class(holds: Any) -> str:
    return {True: "true", False: "false"}.get(holds, "none")


def _seconds(v: Any) -> str:
    try:
        return f"{float(v):.1f}"
    except (TypeError, ValueError):
        return ""


def _references(keys: Sequence[str]) -> list[dict[str, str]]:
    try:
        from optiscope.papers import paper
    except ImportError:
        return []
    out = []
    for k in keys:
        try:
            ref = paper(k)
        except ValueError:
            continue
        out.append({"short": ref.short, "citation": markdown_inline(ref.citation())})
    return out


def site_context(out: str | Path) -> dict[str, Any]:
    """Everything ``index.html`` shows, as plain data (also handy for tests and ``--json`` output)."""
    from optiscope.experiments.reproduce import read_marker

    out = Path(out)
    marker = read_marker(out)
    if marker is None:
        raise ValueError(f"{out} is not a reproduction directory (no reproduce.json)")
    exps: Mapping[str, Mapping[str, Any]] = marker.get("experiments") or {}
    claims = []
    for r in _claims_rows(out, exps):
        claims.append({**r, "verdict": verdict_label(r.get("holds")), "verdict_class": _verdict_class(r.get("holds")),
                       "reason": r.get("reason") or "", "tier": r.get("tier") or ""})
    counts = {"true": 0, "false": 0, "none": 0}
    for c in claims:
        counts[c["verdict_class"]] += 1
    rows, env, n_failed, n_finished, n_missing = [], {}, 0, 0, 0
    for name in sorted(exps):
        e = exps[name]
        d = out / name
        manifest: dict[str, Any] = {}
        if d.is_dir():
            try:
                manifest = RunStore.open(d).read_manifest()
            except StoreError:
                manifest = {}
        status = str(manifest.get("status") or e.get("status") or "not run")
        if status == "running":  # the index is written after reproduce returns: a running one was interrupted
            status = "interrupted"
        env = env or dict(manifest.get("environment") or {})
        mine = [c for c in claims if c["experiment"] == name]
        n_failed += status == "failed"
        n_finished += status == "finished"
        n_missing += not d.is_dir()
        page = f"{name}/report.html" if (d / "report.html").exists() else None
        rows.append({"name": name, "paper_name": e.get("paper_name") or e.get("paper") or "",
                     "title": e.get("title") or "", "status": status,
                     "error": (manifest.get("error") or e.get("error") or "") if status != "finished" else "",
                     "n_true": sum(c["verdict_class"] == "true" for c in mine),
                     "n_false": sum(c["verdict_class"] == "false" for c in mine),
                     "n_none": sum(c["verdict_class"] == "none" for c in mine),
                     "seconds": _seconds(manifest.get("seconds", e.get("seconds"))),
                     "git": str((manifest.get("environment") or {}).get("git") or "")[:10], "page": page})
    environment = [(k, "" if v is None else str(v)) for k, v in env.items()]
    if marker.get("pool"):
        environment.append(("Ray pool (last session)", str(marker["pool"])))
    sessions = []
    for s in marker.get("sessions") or []:
        started = s.get("started")
        when = _dt.datetime.fromtimestamp(started, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if started else ""
        sessions.append({"started": when, "wall": _seconds(s.get("wall_seconds")), "ran": len(s.get("ran") or []),
                         "kept": len(s.get("kept") or []), "pool": s.get("pool") or "",
                         "load": " / ".join(f"{x:.2f}" for x in s.get("load_average") or [])})
    keys = sorted({str(e.get("paper")) for e in exps.values() if e.get("paper")})
    return {"title": "optiscope: reproduced claims", "preset": marker.get("preset", ""), "claims": claims,
            "counts": counts, "experiments": rows, "n_failed": n_failed, "n_finished": n_finished,
            "n_missing": n_missing, "environment": environment, "sessions": sessions,
            "references": _references(keys), "pool": marker.get("pool", ""),
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def finish_run(store: RunStore) -> None:
    """After an experiment (in its worker): figures from its metrics (:func:`~optiscope.report.figures.plot_run`)
    and its report (Markdown + HTML)."""
    from optiscope.report.figures import plot_run

    plot_run(store)
    write_report(store)


def write_site(out: str | Path, pages: bool = True) -> Path:
    """Write ``DIR/index.html`` (and, with ``pages``, refresh every experiment's ``report.html`` so that it links
    back to the index); return the index path."""
    out = Path(out)
    ctx = site_context(out)
    if pages:
        for e in ctx["experiments"]:
            d = out / e["name"]
            if d.is_dir() and (d / "manifest.json").exists():
                write_report(RunStore.open(d))
                e["page"] = f"{e['name']}/report.html"
    html = _env().get_template("index.html").render(**ctx)
    return atomic_write_text(out / "index.html", html)


__all__ = ["TEMPLATES", "finish_run", "markdown_inline", "markdown_to_html", "render_run_page", "site_context", "write_site"]
