"""Lab commands: ``compare``, ``show``, ``plot``, ``resume``, ``demo`` (``list`` and ``run`` live in cli.main)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from optiscope.cli import _output
from optiscope.cli._common import DEVICE_HELP, check_device, fail, print_notices, warn_problems
from optiscope.utils.progress import set_quiet

console = Console(soft_wrap=True)




def _errors():
    from optiscope.lab.store import StoreError

    return (ValueError, KeyError, StoreError, OSError)


def _msg(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _finish(store, quiet: bool) -> None:
    from optiscope.report import plot_run, write_report

    figs = plot_run(store)
    report = write_report(store)
    if not quiet:
        show_store(store)
    console.print(f"report:  {report}" + (f"\nfigures: {store.path('figures')}" if figs else ""))


def show_store(store) -> None:
    """Rich tables: per-run status and latest values, per-layer R_med; corrupt files are named, the rest shown."""
    from optiscope.report.markdown import final_layer_values, final_values

    warn_problems(store)
    try:
        manifest = store.read_manifest()
    except Exception:
        manifest = {}
    runs = manifest.get("runs") or {}
    status = store.liveness(str(manifest.get("status", "unknown")))
    holder = manifest.get("holder") or {}
    if status.startswith("running") and holder:
        status += f", pid {holder.get('pid')} on {holder.get('host')}, heartbeat {manifest.get('heartbeat')}"
    title = f"{store.root}  (status: {status})"
    try:
        df = store.read_metrics_tolerant()[0]  # unreadable files are named above; show the rest
    except Exception:
        df = None
    fv = final_values(df) if df is not None and not df.empty else None
    table = Table(title=title)
    table.add_column("run")
    table.add_column("status")
    cols = list(fv.columns) if fv is not None else []
    for c in cols:
        table.add_column(c, justify="right")
    names = list(dict.fromkeys(list(runs) + (list(fv.index) if fv is not None else [])))
    for name in names:
        run_status = str((runs.get(name) or {}).get("status", ""))
        row = [name, store.liveness(run_status) if run_status.startswith("running") else run_status]
        if fv is not None:
            row += [_fmt(float(fv.loc[name, c])) if name in fv.index else "" for c in cols]
        table.add_row(*row)
    _output.print_table(table)
    if df is not None and not df.empty:
        fl = final_layer_values(df, "r_med")
        if fl is not None:
            t2 = Table(title="R_med per layer (last checkpoint)")
            t2.add_column("layer")
            for c in fl.columns:
                t2.add_column(str(c), justify="right")
            for layer, row in fl.iterrows():
                t2.add_row(str(layer), *[_fmt(float(v)) for v in row])
            _output.print_table(t2)
    if "results.json" in {p.name for p in store.root.iterdir()}:
        try:
            res = store.read_results()
            _output.print_table(_output.claims_table(res.get("claims", []), title="claims", colored=False))
        except Exception:
            pass


def register(app: typer.Typer) -> None:
    """Add ``compare``, ``resume``, ``show``, ``plot`` and ``demo`` to the typer ``app``."""
    @app.command("compare")
    def compare_cmd(
        model: str | None = typer.Option(None, "--model", help="zoo model spec, e.g. mlp:depth=3,width=64"),
        data: str | None = typer.Option(None, "--data", help="zoo dataset spec, e.g. digits"),
        opt: list[str] = typer.Option([], "--opt", help="optimizer spec, repeatable: adam:lr=1e-3"),
        name: list[str] = typer.Option([], "--name", help="run name per --opt (default: optimizer name)"),
        steps: int | None = typer.Option(None, "--steps"),
        batch: int | None = typer.Option(None, "--batch", help="batch size"),
        probe_every: int | None = typer.Option(None, "--probe-every"),
        probe_steps: str | None = typer.Option(None, "--probe-steps", help="extra probe steps: 10,20,300"),
        probes: str | None = typer.Option(None, "--probes", help="loss,r_med:per_layer=100,sharpness,..."),
        seed: int | None = typer.Option(None, "--seed"),
        lr_schedule: str | None = typer.Option(None, "--lr-schedule", help="cosine | linear | step:every=..."),
        full_batch: bool | None = typer.Option(None, "--full-batch/--minibatch"),
        chunks: int | None = typer.Option(None, "--accumulation-chunks"),
        config: Path | None = typer.Option(None, "--config", help="YAML/TOML file of CompareConfig fields"),
        set_: list[str] = typer.Option([], "--set", help="override a config field: key=value"),
        out: Path = typer.Option(Path("runs/compare"), "--out", help="run directory"),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        resume: bool = typer.Option(False, "--resume", help="continue the run already in --out (same config)"),
        force: bool = typer.Option(False, "--force", help="move a run already in --out aside (DIR.old-TIME)"),
        keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints", min=1,
                                                    help="keep only each run's newest N checkpoints"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
        json_: bool = typer.Option(False, "--json", help="print the finished directory as JSON (docs/cli.md)"),
    ) -> None:
        """Several optimizers from the same init and batch order, with geometry probes at checkpoints."""
        from optiscope.lab.config import CompareConfig, run_compare
        from optiscope.lab.probes import split_probe_specs

        set_quiet(quiet)
        _output.begin_json(json_)
        if resume and force:
            fail("--resume and --force exclude each other")
        device = check_device(device)
        try:
            cfg = CompareConfig.from_file(config) if config is not None else None
            fields = {}
            for k, v in (("model", model), ("data", data), ("steps", steps), ("batch_size", batch),
                         ("probe_every", probe_every), ("seed", seed), ("lr_schedule", lr_schedule),
                         ("full_batch", full_batch), ("accumulation_chunks", chunks), ("probe_steps", probe_steps),
                         ("device", device)):
                if v is not None:
                    fields[k] = v
            if opt:
                fields["optimizers"] = tuple(opt)
            if name:
                fields["names"] = tuple(name)
            if probes is not None:
                fields["probes"] = tuple(split_probe_specs(probes))
            cfg = CompareConfig.from_dict(fields, base=cfg) if cfg is not None else CompareConfig.from_dict(fields)
            cfg = cfg.with_overrides(set_)
            t0 = time.perf_counter()
            from optiscope.lab.store import RunStore

            target = RunStore(out)
            res = run_compare(cfg, target, resume=resume, force=force, keep_checkpoints=keep_checkpoints)
            print_notices(target)
        except _errors() as e:
            fail(_msg(e))

        for n, r in res.runs.items():
            console.print(f"{n}: {r.status}")
        console.print(f"done in {time.perf_counter() - t0:.1f}s")
        _finish(RunStore.open(out), quiet or json_)
        if json_:
            _output.emit_json(_output.store_json(RunStore.open(out)))

    @app.command("resume")
    def resume_cmd(
        run_dir: Path = typer.Argument(..., help="a run directory written by compare/demo/run"),
        keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints", min=1,
                                                    help="keep only each run's newest N checkpoints"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ) -> None:
        """Continue a killed run from its last checkpoint (on the device it was started on); ends with the metrics
        of an uninterrupted run. Refuses a config.yaml that lacks fields or was changed, and a directory that
        another process is writing."""
        from optiscope.lab.config import load_compare_config, run_compare
        from optiscope.lab.store import RunStore, StoreError

        set_quiet(quiet)
        try:
            store = RunStore.open(run_dir)
            warn_problems(store)
            try:
                manifest = store.read_manifest()
            except StoreError:
                manifest = {}  # named above; the config and checkpoint records stand in for it
            if manifest.get("experiment") and manifest.get("kind") != "compare":
                from optiscope.experiments.base import get, run_experiment

                spec = get(manifest["experiment"])
                with store.lock():
                    cfg = spec.config.from_dict(store.verify_config(fields=spec.config.field_names()))
                    console.print(f"experiment {spec.name}: re-running with the stored config into {run_dir}")
                    run_experiment(spec.name, preset=manifest.get("preset", "quick"), out=run_dir, config=cfg)
            else:
                res = run_compare(load_compare_config(store), store, resume=True, keep_checkpoints=keep_checkpoints)
                for n, r in res.runs.items():
                    console.print(f"{n}: {r.status}")
            print_notices(store)
        except _errors() as e:
            fail(_msg(e))
        _finish(RunStore.open(run_dir), quiet)

    @app.command("show")
    def show_cmd(run_dirs: list[Path] = typer.Argument(..., help="run directory (several: side by side)"),
                 json_: bool = typer.Option(False, "--json", help="print JSON (shape in docs/cli.md)")) -> None:
        """Latest values per run and per-layer R_med; corrupt or partial files are named, valid data shown.
        Several directories: one column each (status, config, final values, claims) side by side."""
        from optiscope.lab.store import RunStore

        if len(run_dirs) > 1:
            from optiscope.cli.reproduce import show_side_by_side

            try:
                show_side_by_side(run_dirs, json_)
            except _errors() as e:
                fail(_msg(e))
            return
        run_dir = run_dirs[0]
        try:
            store = RunStore.open(run_dir)
        except _errors() as e:
            fail(_msg(e))
        if json_:
            _output.emit_json(_output.store_json(store))
            return
        show_store(store)

    @app.command("plot")
    def plot_cmd(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
        """PNG figures (loss curves, R_med per layer over time, sharpness, one-norm) and report.md."""
        from optiscope.lab.store import RunStore
        from optiscope.report import plot_run, write_report

        try:
            store = RunStore.open(run_dir)
            warn_problems(store)
            figs = plot_run(store)
            report = write_report(store)
        except _errors() as e:
            fail(_msg(e))
        for f in figs:
            console.print(str(f))
        console.print(f"report: {report}")

    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
        data: str | None = typer.Option(None, "--data", help="dataset (default fashion_mnist, else digits)"),
        steps: int | None = typer.Option(None, "--steps"),
        device: str | None = typer.Option(None, "--device", help=DEVICE_HELP),
        force: bool = typer.Option(False, "--force", help="move another run already in --out aside"),
        keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints", min=1,
                                                    help="keep only each run's newest N checkpoints"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    ) -> None:
        """SGD+M vs Adam from the same init on Fashion-MNIST: loss, R_med, sharpness, one-norm; figures + report."""
        from optiscope.lab.config import demo_config, load_compare_config, run_compare, with_fields
        from optiscope.lab.store import RunStore

        set_quiet(quiet)
        device = check_device(device)
        try:
            cfg = demo_config(data)
            if steps is not None:
                cfg = with_fields(cfg, steps=steps)
            if device is not None:
                cfg = with_fields(cfg, device=device)
            store = RunStore(out)
            resume = False
            if not force and store.holds_run():
                try:
                    same = load_compare_config(store) == cfg
                except _errors():
                    same = False
                if not same:
                    raise ValueError(f"{out} holds a different run; choose another --out or pass --force to move "
                                     "it aside")
                resume = True
            console.print(f"demo: {cfg.model} on {cfg.data}, {' vs '.join(cfg.optimizers)}, {cfg.steps} steps")
            t0 = time.perf_counter()
            res = run_compare(cfg, store, resume=resume, force=force, keep_checkpoints=keep_checkpoints)
            print_notices(store)
        except _errors() as e:
            fail(_msg(e))
        for n, r in res.runs.items():
            console.print(f"{n}: {r.status} (train {r.train_seconds:.1f}s, probes {r.probe_seconds:.1f}s)")
        console.print(f"done in {time.perf_counter() - t0:.1f}s")
        _finish(store, quiet)
