"""``report.md`` (and ``report.html``) for a run directory: status, verdicts table, headline metrics, figures."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from optiscope.lab.store import RunStore, StoreError


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (dict, list)):
        s = json.dumps(x, default=str)
        return s if len(s) <= 120 else s[:117] + "..."
    return str(x)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and len(v) <= 40:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def final_values(df, metrics=("loss", "eval_loss", "accuracy", "eval_accuracy", "sharpness", "precond_sharpness",
                                "one_norm", "grad_norm", "trace")):
    """Per run: the last recorded value of each global metric (a DataFrame indexed by run)."""
    import pandas as pd

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
        return [f"> {e}\n"]
    if not runs and df.empty:
        return lines
    if runs:
        lines.append("## Runs\n")
        lines.append("| run | optimizer | status | seconds (train / probes) |")
        lines.append("|---|---|---|---|")
        for name, r in runs.items():
            secs = f"{_fmt(r.get('seconds'))} ({_fmt(r.get('train_seconds'))} / {_fmt(r.get('probe_seconds'))})"
            lines.append(f"| {name} | {r.get('optimizer', '')} | {r.get('status', '')} | {secs} |")
        lines.append("")
    if not df.empty:
        fv = final_values(df)
        if not fv.empty:
            lines.append("## Final values\n")
            lines.append("| run | " + " | ".join(fv.columns) + " |")
            lines.append("|---" * (len(fv.columns) + 1) + "|")
            for run, row in fv.iterrows():
                lines.append(f"| {run} | " + " | ".join(_fmt(float(v)) if not pd.isna(v) else "" for v in row) + " |")
            lines.append("")
        fl = final_layer_values(df, "r_med")
        if fl is not None:
            lines.append("## R_med per layer (last checkpoint)\n")
            lines.append("| layer | " + " | ".join(fl.columns) + " |")
            lines.append("|---" * (len(fl.columns) + 1) + "|")
            for layer, row in fl.iterrows():
                lines.append(f"| {layer} | " + " | ".join(_fmt(float(v)) if not pd.isna(v) else "" for v in row) + " |")
            lines.append("")
    return lines


def render_markdown(store: RunStore) -> str:
    lines: list[str] = []
    try:
        manifest = store.read_manifest()
    except StoreError as e:
        manifest = {"status": f"unreadable ({e})"}
    try:
        results = store.read_results() if store.path("results.json").exists() else None
    except StoreError as e:
        results = None
        lines.append(f"> results.json unreadable: {e}\n")
    title = (results or {}).get("experiment") or manifest.get("experiment") or store.root.name
    lines.append(f"# {title}\n")
    lines.append(f"- status: **{manifest.get('status', 'unknown')}**")
    for k in ("preset", "seed", "paper", "seconds"):
        if k in manifest:
            lines.append(f"- {k}: {_fmt(manifest[k])}")
    env = manifest.get("environment", {})
    if env:
        lines.append(f"- torch {env.get('torch')}, python {env.get('python')}, git {env.get('git')}")
    lines.append("")
    if results and results.get("claims"):
        lines.append("## Claims\n")
        lines.append("| id | claim | paper | measured | holds |")
        lines.append("|---|---|---|---|---|")
        for c in results["claims"]:
            holds = {True: "yes", False: "**no**", None: "n/a"}[c.get("holds")]
            cells = [c.get("id", ""), c.get("claim", ""), _fmt(c.get("paper")), _fmt(c.get("measured")), holds]
            lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
        lines.append("")
    if results and results.get("metrics"):
        lines.append("## Metrics\n")
        for k, v in _flatten(results["metrics"])[:200]:
            lines.append(f"- `{k}`: {_fmt(v)}")
        lines.append("")
    lines.extend(lab_summary(store, manifest))
    figs = sorted(store.path("figures").glob("*.png")) if store.path("figures").is_dir() else []
    if figs:
        lines.append("## Figures\n")
        for f in figs:
            lines.append(f"![{f.stem}](figures/{f.name})\n")
    return "\n".join(lines) + "\n"


def write_report(store: RunStore | str | Path) -> Path:
    """Write ``report.md`` and a minimal ``report.html`` into the run directory; return the Markdown path."""
    if not isinstance(store, RunStore):
        store = RunStore.open(store)
    md = render_markdown(store)
    path = store.write_text("report.md", md)
    body = []
    for line in md.splitlines():
        if line.startswith("![") and "](" in line:
            src = line.split("](", 1)[1].rstrip(")")
            body.append(f'<p><img src="{html.escape(src)}" style="max-width:900px"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        else:
            body.append(f"<div>{html.escape(line)}</div>" if line.strip() else "")
    store.write_text("report.html", "<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>"
                     + "\n".join(body) + "</body>")
    return path
