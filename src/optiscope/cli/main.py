"""``optiscope`` console script. Command groups live in sibling modules, each exposing ``register(app)``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from optiscope.cli import _output
from optiscope.cli._common import fail
from optiscope.utils.progress import set_quiet

app = typer.Typer(add_completion=True, no_args_is_help=True,
                  help="optiscope: optimizers vs the geometry of the loss, checked against theory.")
console = Console()

# Modules under optiscope.cli that add commands; each defines register(app).
COMMAND_MODULES = ["lab_cmds", "sgd_theory", "init_check", "reproduce"]


def _version_callback(value: bool) -> None:
    if value:
        from optiscope import __version__

        typer.echo(f"optiscope {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """optiscope: optimizers vs the geometry of the loss, checked against theory."""




@app.command("list")
def list_experiments(
    json_: bool = typer.Option(False, "--json", help="print JSON (shape in docs/cli.md) instead of a table"),
) -> None:
    """List the registered experiments, each with the paper it reproduces and its presets."""
    if json_:
        _output.emit_json(_output.experiments_json())
    else:
        _output.print_table(_output.experiments_table())


@app.command("run")
def run(
    name: str = typer.Argument(..., help="experiment name (see `optiscope list`)"),
    preset: str = typer.Option("quick", "--preset", help="quick (CPU, minutes), medium (<= 20 min on 2 CPU cores, "
                               "where listed by `optiscope list`) or full (paper scale, GPU)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/NAME-PRESET)"),
    set_: List[str] = typer.Option([], "--set", help="override a config field: key=value (repeatable)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML file of config fields"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    json_: bool = typer.Option(False, "--json", help="print results.json and the paths as JSON (docs/cli.md)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:N | auto (experiments without "
                                         "torch work run on the CPU, with a note saying why)"),
    resume: bool = typer.Option(False, "--resume", help="re-run into --out holding this experiment, same config"),
    force: bool = typer.Option(False, "--force", help="move a run already in --out aside (DIR.old-TIME)"),
) -> None:
    """Run one registered experiment and write results.json, figures and report.md."""
    from optiscope.cli._common import prepare_experiment
    from optiscope.experiments.base import get, run_experiment
    from optiscope.report import write_report

    set_quiet(quiet)
    _output.begin_json(json_)
    try:
        get(name)
    except KeyError as e:
        fail(str(e.args[0]))
    cfg, locked = prepare_experiment(name, preset, out, set_, config, device, resume, force)
    try:
        store = run_experiment(name, preset=preset, out=locked.root, config=cfg)
    except (KeyError, ValueError) as e:
        fail(str(e.args[0] if isinstance(e, KeyError) else e))
    finally:
        locked.release_lock()
    report = write_report(store)
    if json_:
        _output.emit_json(_output.run_json(store, report))
        return
    results = store.read_results()
    _output.print_table(_output.claims_table(results["claims"], title=f"{name} ({preset})"))
    console.print(f"results: {store.path('results.json')}\nreport:  {report}")


def _register_all() -> None:
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(f"optiscope.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"optiscope.cli.{mod}":
                continue
            raise
        m.register(app)


_register_all()

if __name__ == "__main__":  # pragma: no cover
    app()
