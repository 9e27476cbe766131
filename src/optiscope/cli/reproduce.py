"""``optiscope reproduce`` (many experiments in parallel on Ray, resumable, one HTML report) and ``optiscope sweep``
(an optimizer x lr x momentum x seed grid of comparisons on the same pool)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from optiscope.cli import _output
from optiscope.cli._common import check_device, fail

console = Console(soft_wrap=True)


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in str(v).split(",") if x.strip()]
    return out


def _floats(values: list[str] | None, what: str) -> list[float]:
    out = []
    for x in _split(values):
        try:
            out.append(float(x))
        except ValueError:
            raise ValueError(f"{what} {x!r} is not a number") from None
    return out


def _ints(values: list[str] | None, what: str) -> list[int]:
    out = []
    for x in _split(values):
        try:
            out.append(int(x))
        except ValueError:
            raise ValueError(f"{what} {x!r} is not an integer") from None
    return out


class JobsView:
    """One progress view across jobs: an overall bar with ETA and one row per job (status, elapsed); plain text
    lines when stderr is not a terminal; nothing with ``quiet``."""

    def __init__(self, what: str, quiet: bool = False):
        self.what = what
        self.quiet = quiet
        self.err = Console(stderr=True, soft_wrap=True)
        self.live = not quiet and self.err.is_terminal
        self.progress = None
        self.rows: dict[str, Any] = {}
        self.total = None
        self.t0 = time.time()

    def plan(self, names: list[str], kept: list[str], pool: Any) -> None:
        """Called once the pool is up: all job names, those kept from an earlier run, the pool."""
        desc = pool.describe() if pool is not None else "in process"
        if self.quiet:
            return
        if not self.live:
            self.err.print(f"{self.what}: {len(names)} jobs ({len(kept)} kept) on {desc}", highlight=False)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}", justify="left"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=self.err, transient=False)
        self.progress.start()
        self.total = self.progress.add_task(f"[bold]{self.what} ({desc})", total=len(names),
                                            completed=0, status="")
        for n in names:
            self.rows[n] = self.progress.add_task(f"  {n}", total=1, start=False, status="queued")

    def event(self, name: str, ev: str, info: Mapping[str, Any]) -> None:
        """A job was kept, started or is done."""
        if self.quiet:
            return
        status = str(info.get("status", ev))
        secs = info.get("seconds")
        if ev == "done" and status == "failed":
            status = f"[red]failed[/]: {str(info.get('error', ''))[:60]}"
        elif ev == "kept":
            status = "kept (finished earlier)"
        if not self.live or self.progress is None:
            line = f"{name}: {ev}" + (f" {info.get('status', '')}" if ev == "done" else "")
            if ev == "done" and secs is not None:
                line += f" in {float(secs):.1f}s"
            if info.get("error") and ev == "done":
                line += f" ({info['error']})"
            self.err.print(line, highlight=False, markup=False)
            return
        tid = self.rows.get(name)
        if tid is None:
            return
        if ev == "started":
            self.progress.start_task(tid)
            self.progress.update(tid, status="running")
        else:
            self.progress.update(tid, completed=1, status=status)
            self.progress.stop_task(tid)
            self.progress.advance(self.total, 1)

    def close(self) -> None:
        """Stop the live view."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _claims_summary(rows: list[dict[str, Any]]) -> Table:
    from optiscope.report.markdown import format_value, verdict_label

    marks = {True: "[green]holds[/]", False: "[red]does not hold[/]", None: "untestable"}
    table = Table("experiment", "claim", "ours", "verdict", title="claims")
    for r in rows:
        table.add_row(str(r["experiment"]), str(r.get("claim"))[:60], format_value(r.get("measured"), 40),
                      marks.get(r.get("holds"), verdict_label(r.get("holds"))))
    return table


def register(app: typer.Typer) -> None:
    """Add ``reproduce`` and ``sweep`` to the app."""

    @app.command("reproduce")
    def reproduce_cmd(
        out: Path = typer.Option(..., "--out", help="reproduction directory (one run directory per experiment)"),
        papers: list[str] = typer.Option([], "--papers", help="paper keys or short names, comma-separated: "
                                         "000,004 or 'Jiang et al. 2023'"),
        only: list[str] = typer.Option([], "--only", help="experiment names, comma-separated"),
        preset: str = typer.Option("quick", "--preset", help="quick | medium | full (medium falls back to quick "
                                   "for experiments without one)"),
        device: str | None = typer.Option(None, "--device", help="cpu (default) or cuda; passed to experiments "
                                          "that take a device"),
        workers: int | None = typer.Option(None, "--workers", help="experiments at once (default: one per CPU)"),
        ray_address: str | None = typer.Option(None, "--ray-address", help="existing Ray cluster, host:port"),
        ray_timeout: float = typer.Option(20.0, "--ray-timeout", help="seconds to wait for --ray-address"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress view"),
        json_out: bool = typer.Option(False, "--json", help="print the claims table as JSON"),
    ) -> None:
        """Run the selected experiments as parallel Ray jobs into DIR/NAME; resumable; writes DIR/index.html."""
        from optiscope.experiments.reproduce import reproduce, select_experiments
        from optiscope.lab.pool import PoolError
        from optiscope.report.html import finish_run, write_site

        if workers is not None and workers < 1:
            fail(f"--workers {workers} is invalid; use an integer >= 1")
        if ray_address is None:  # a local pool: the device must exist here (a cluster's GPUs are checked there)
            device = check_device(device)
        view = JobsView("reproduce", quiet=quiet or json_out)
        try:
            sel_papers, sel_only = _split(papers), _split(only)
            select_experiments(sel_papers, sel_only)
            res = reproduce(out, papers=sel_papers, only=sel_only, preset=preset, device=device, workers=workers,
                            ray_address=ray_address, postprocess=finish_run, connect_timeout=ray_timeout,
                            on_plan=lambda specs, kept, pool: view.plan([s.name for s in specs], kept, pool),
                            on_event=view.event)
        except (ValueError, KeyError, PoolError) as e:
            view.close()
            fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
        except KeyboardInterrupt:
            view.close()
            Console(stderr=True).print(f"interrupted; run the same command again to resume into {out}")
            raise typer.Exit(130)
        finally:
            view.close()
        index = write_site(res.out)
        if json_out:
            import json

            sys.stdout.write(json.dumps(res.claims, default=str, indent=1) + "\n")
        else:
            console.print(_claims_summary(res.claims))
            n_ran = len(res.experiments) - len(res.kept)
            console.print(f"{len(res.experiments)} experiments ({n_ran} ran, {len(res.kept)} kept) in "
                          f"{res.wall_seconds:.1f}s on {res.pool or 'no pool (all kept)'}")
            console.print(f"report: {index}")
        if res.failed:
            Console(stderr=True, soft_wrap=True).print(
                f"[red]failed:[/] {', '.join(res.failed)} (errors in {index} and DIR/NAME/manifest.json)")
            raise typer.Exit(1)

    @app.command("sweep")
    def sweep_cmd(
        out: Path = typer.Option(..., "--out", help="sweep directory (one comparison store per cell)"),
        opt: list[str] = typer.Option([], "--opt", help="optimizer spec, repeatable: sgdm:momentum=0.9"),
        lr: list[str] = typer.Option([], "--lr", help="learning rates, comma-separated: 0.01,0.1"),
        momentum: list[str] = typer.Option([], "--momentum", help="momenta (beta1 for Adam), comma-separated"),
        seed: list[str] = typer.Option([], "--seed", help="seeds, comma-separated: 0,1,2"),
        model: str | None = typer.Option(None, "--model", help="zoo model spec, e.g. mlp:depth=3,width=64"),
        data: str | None = typer.Option(None, "--data", help="zoo dataset spec, e.g. digits"),
        steps: int | None = typer.Option(None, "--steps"),
        batch: int | None = typer.Option(None, "--batch", help="batch size"),
        probe_every: int | None = typer.Option(None, "--probe-every"),
        probes: str | None = typer.Option(None, "--probes", help="loss,r_med:per_layer=100,sharpness,..."),
        config: Path | None = typer.Option(None, "--config", help="YAML/TOML file of CompareConfig fields"),
        set_: list[str] = typer.Option([], "--set", help="override a config field: key=value"),
        workers: int | None = typer.Option(None, "--workers", help="cells at once (default: one per CPU)"),
        ray_address: str | None = typer.Option(None, "--ray-address", help="existing Ray cluster, host:port"),
        ray_timeout: float = typer.Option(20.0, "--ray-timeout", help="seconds to wait for --ray-address"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress view"),
    ) -> None:
        """A grid over optimizer specs, learning rates, momenta and seeds for `compare`, in parallel on Ray."""
        from optiscope.lab.config import CompareConfig
        from optiscope.lab.pool import PoolError
        from optiscope.lab.probes import split_probe_specs
        from optiscope.lab.sweep import sweep

        if workers is not None and workers < 1:
            fail(f"--workers {workers} is invalid; use an integer >= 1")
        view = JobsView("sweep", quiet=quiet)
        try:
            fields: dict[str, Any] = {}
            for k, v in (("model", model), ("data", data), ("steps", steps), ("batch_size", batch),
                         ("probe_every", probe_every)):
                if v is not None:
                    fields[k] = v
            if probes is not None:
                fields["probes"] = tuple(split_probe_specs(probes))
            if opt:
                fields["optimizers"] = tuple(opt)
            base = CompareConfig.from_file(config) if config is not None else None
            base = CompareConfig.from_dict(fields, base=base) if base is not None else CompareConfig.from_dict(fields)
            base = base.with_overrides(set_)
            res = sweep(base, out, optimizers=list(opt) or None, lrs=_floats(lr, "learning rate"),
                        momenta=_floats(momentum, "momentum"), seeds=_ints(seed, "seed"), workers=workers,
                        ray_address=ray_address, connect_timeout=ray_timeout,
                        on_plan=lambda cells, kept, pool: view.plan([c.id for c in cells], kept, pool),
                        on_event=view.event)
        except (ValueError, KeyError, PoolError, OSError) as e:
            view.close()
            fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
        finally:
            view.close()
        s = res.summary
        table = Table(title=f"sweep: {len(res.cells)} cells in {res.wall_seconds:.1f}s")
        show = [c for c in ("cell", "lr", "momentum", "seed", "status", "step", "loss", "eval_loss", "accuracy")
                if c in s.columns]
        for c in show:
            table.add_column(c)
        for _, row in s.iterrows():
            table.add_row(*[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in show])
        _output.print_table(table, file=console.file)
        console.print(f"table: {res.out / 'sweep.parquet'}\nsummary: {res.out / 'summary.csv'}")
        failed = [k for k, v in res.status.items() if v.get("status") == "failed"]
        if failed:
            Console(stderr=True, soft_wrap=True).print(f"[red]failed cells:[/] {', '.join(failed)}")
            raise typer.Exit(1)



def show_side_by_side(run_dirs: list[Path], as_json: bool = False) -> None:
    """``optiscope show DIR1 DIR2 ...``: several run directories in one table, one column each
    (:func:`optiscope.report.markdown.compare_runs`); ``as_json`` prints ``{dir: {field: value}}``."""
    from optiscope.lab.store import RunStore
    from optiscope.report.markdown import compare_runs

    stores = [RunStore.open(d) for d in run_dirs]
    df = compare_runs(stores)
    if as_json:
        import json

        sys.stdout.write(json.dumps({c: {k: v for k, v in df[c].items() if v != ""} for c in df.columns},
                                    indent=1) + "\n")
        return
    table = Table(title="side by side")
    table.add_column("")
    for c in df.columns:
        table.add_column(str(c), overflow="fold")
    for key, row in df.iterrows():
        table.add_row(str(key), *[str(v) for v in row])
    _output.print_table(table, file=console.file)
