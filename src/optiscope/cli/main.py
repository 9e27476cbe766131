"""``optiscope`` console script. Command groups live in sibling modules, each exposing ``register(app)``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from optiscope.cli._common import claims_table, fail
from optiscope.utils.progress import set_quiet

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="optiscope: optimizers vs the geometry of the loss, checked against theory.")
console = Console()

# Modules under optiscope.cli that add commands; each defines register(app).
COMMAND_MODULES = ["lab_cmds", "sgd_theory", "init_check"]




@app.command("list")
def list_experiments() -> None:
    """List the registered experiments (one per seed claim)."""
    from optiscope.experiments.base import registry

    table = Table("name", "seed", "title", "presets")
    for name, spec in registry().items():
        table.add_row(name, spec.paper, spec.title, ", ".join(spec.presets))
    console.print(table)


@app.command("run")
def run(
    name: str = typer.Argument(..., help="experiment name (see `optiscope list`)"),
    preset: str = typer.Option("quick", "--preset", help="quick (CPU, minutes), medium (<= 20 min on 2 CPU cores, "
                               "where listed by `optiscope list`) or full (paper scale, GPU)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/NAME-PRESET)"),
    set_: List[str] = typer.Option([], "--set", help="override a config field: key=value (repeatable)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML file of config fields"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run one registered experiment and write results.json, figures and report.md."""
    from optiscope.experiments.base import get, run_experiment
    from optiscope.report import write_report

    set_quiet(quiet)
    try:
        get(name)
        store = run_experiment(name, preset=preset, out=out, overrides=set_, config_file=config)
    except (KeyError, ValueError) as e:
        fail(str(e.args[0] if isinstance(e, KeyError) else e))
    report = write_report(store)
    results = store.read_results()
    console.print(claims_table(results["claims"], title=f"{name} ({preset})"))
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
