"""``optiscope init-check``: gradients and curvature at initialization vs depth and width (Orvieto et al. 2022).

Example (Orvieto et al. 2022, Fig. 1)::

    optiscope init-check --model mlp:width=32 --depths 2,4,...,64 --init he_uniform --seeds 20

prints a table of medians (and quartiles) per depth, writes figures and the tidy records under ``--out``, and flags
vanishing: a median gradient norm that falls exponentially in depth.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from optiscope.cli import _output
from optiscope.cli._common import check_device, fail
from optiscope.utils.progress import set_quiet

console = Console()


def parse_int_list(text: str, what: str = "depths") -> tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)``; ``"a,b,...,c"`` -> arithmetic progression ``a, b, ..., <= c`` (step ``b - a``);
    ``"a,b,c,...,d"`` with a constant ratio and non-constant step -> geometric progression (``2,4,8,...,64``);
    ``"a:b"`` or ``"a:b:s"`` -> ``range(a, b + 1, s)``."""
    t = text.replace(" ", "")
    if not t:
        raise ValueError(f"empty {what}")
    try:
        if ":" in t:
            parts = [int(x) for x in t.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
                raise ValueError
            return tuple(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        tokens = t.split(",")
        if "..." in tokens:
            i = tokens.index("...")
            head = [int(x) for x in tokens[:i]]
            tail = [int(x) for x in tokens[i + 1:]]
            if len(head) < 2 or len(tail) != 1:
                raise ValueError
            end = tail[0]
            steps = {b - a for a, b in zip(head, head[1:])}
            ratios = {b / a for a, b in zip(head, head[1:])} if all(h != 0 for h in head) else set()
            if len(head) >= 3 and len(steps) > 1 and len(ratios) == 1 and next(iter(ratios)) > 1:
                r = next(iter(ratios))
                out = list(head)
                while out[-1] * r <= end + 1e-9:
                    out.append(int(round(out[-1] * r)))
                return tuple(out)
            if len(steps) != 1 or next(iter(steps)) <= 0:
                raise ValueError
            step = next(iter(steps))
            return tuple(range(head[0], end + 1, step))
        return tuple(int(x) for x in tokens)
    except ValueError:
        raise ValueError(f"cannot parse {what} {text!r}: use '2,4,8', '2,4,...,64' (arithmetic), "
                         f"'2,4,8,...,64' (geometric) or '2:64:2'") from None


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def register(app: typer.Typer) -> None:
    """Add ``init-check`` to the typer ``app``."""
    @app.command("init-check")
    def init_check_cmd(
        model: str = typer.Option("mlp:width=32", "--model", help="zoo model spec (mlp, deep_linear, fcn, "
                                  "neural_chain); width/channels in the spec is the default width"),
        depths: str = typer.Option("2,4,8,16,32", "--depths", help="'2,4,8', '2,4,...,64' (arithmetic), "
                                   "'2,4,8,...,64' (geometric) or '2:64:2'"),
        widths: str | None = typer.Option(None, "--widths", help="comma list; default: the spec's width"),
        init: str | None = typer.Option(None, "--init", help="lecun|xavier|he _ uniform|normal, or torch"),
        seeds: int = typer.Option(20, "--seeds", help="number of random initializations per (depth, width)"),
        seed: int = typer.Option(0, "--seed", help="first seed"),
        hessian: str = typer.Option("full", "--hessian", help="none | blocks | full (adds extreme eigenvalues)"),
        samples: int = typer.Option(64, "--samples", help="data points (teacher data, Orvieto et al. 2022, App. A.1)"),
        n_probes: int = typer.Option(4, "--probes", help="probes per layer for large Hessians"),
        exact_max_dim: int = typer.Option(1500, "--exact-max-dim", help="dense Hessian up to this many params"),
        threshold: float = typer.Option(1e-3, "--threshold", help="report the depth where the median gradient "
                                        "norm falls below threshold x its value at the reference depth"),
        reference_depth: int | None = typer.Option(None, "--reference-depth", help="default: smallest depth"),
        out: Path | None = typer.Option(None, "--out", help="directory for records, summary and figures"),
        device: str | None = typer.Option(None, "--device", help="cpu | auto (init statistics are measured on "
                                          "the CPU)"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    ) -> None:
        """Gradient / Hessian statistics at init vs depth and width; flags vanishing (Orvieto et al. 2022)."""
        from optiscope.lab.init_check import WIDTH_KEYS, InitCheckConfig, init_check, model_factory
        from optiscope.lab.store import RunStore
        from optiscope.utils.spec import parse_spec

        set_quiet(quiet)
        check_device(device, cpu_only="init-check")
        if not math.isfinite(threshold) or threshold <= 0:
            fail(f"--threshold = {threshold} must be a finite number > 0")
        try:
            name, kw = parse_spec(model, None, "model")
            depth_list = parse_int_list(depths, "depths")
            width_key = WIDTH_KEYS.get(name)
            if widths is not None:
                width_list = parse_int_list(widths, "widths")
            elif name == "neural_chain":
                width_list = (1,)
            else:
                width_list = (int(kw.pop(width_key, 32)),) if width_key else (1,)
            kw.pop(width_key, None) if width_key else None
            spec = name + (":" + ",".join(f"{k}={v}" for k, v in kw.items()) if kw else "")
            cfg = InitCheckConfig(seed=seed, depths=depth_list, widths=width_list, n_seeds=seeds, n_samples=samples,
                                  hessian=hessian, n_probes=n_probes, exact_max_dim=exact_max_dim)
            factory = model_factory(spec, init=init)
            factory(depth_list[0], width_list[0], seed)  # validate the spec before the long loop
            result = init_check(factory, cfg, label=f"{spec}:{init or 'default'}", description="init check")
            van = result.vanishing("grad_norm")
            vdepth = {int(w): result.vanishing_depth("grad_norm", int(w), threshold, reference_depth)
                      for w in width_list}
        except ValueError as e:
            fail(str(e))
        summ = result.summary()
        shown = [q for q in ("output_norm", "grad_norm", "hess_diag_norm", "hess_offdiag_norm", "eig_max", "eig_min",
                             "trace") if q in set(summ["quantity"])]
        for w in width_list:
            table = Table("depth", *[f"{q}\nmedian [q25, q75]" for q in shown],
                          title=f"{spec} init={init or 'default'} width={w}: medians over {seeds} seeds")
            sw = summ[summ["width"] == w]
            for d in depth_list:
                row = [str(d)]
                for q in shown:
                    r = sw[(sw["depth"] == d) & (sw["quantity"] == q)]
                    row.append("" if r.empty else f"{_fmt(float(r['median'].iloc[0]))} "
                                                  f"[{_fmt(float(r['q25'].iloc[0]))}, {_fmt(float(r['q75'].iloc[0]))}]")
                table.add_row(*row)
            _output.print_table(table, file=console.file)  # boxed on a terminal, plain text when piped
            v = van[van["width"] == w].iloc[0]
            verdict = "[bold red]VANISHING[/]" if v["vanishing"] else "[green]no exponential vanishing[/]"
            console.print(f"width {w}: median gradient norm changes by x{v['ratio_deepest_to_shallowest']:.3g} from "
                          f"depth {depth_list[0]} to {depth_list[-1]} (log10 slope {v['log10_slope_per_layer']:.3g}"
                          f"/layer) -> {verdict}; falls below {threshold:g} x reference at depth "
                          f"{'not reached' if vdepth[w] is None else f'{vdepth[w]:.1f}'}")
        if out is not None:
            from optiscope.lab.store import StoreError

            store = RunStore(out)
            try:
                store.acquire_lock()
            except StoreError as e:
                fail(str(e))
            store.write_config(cfg)
            store.write_metrics(result.to_metrics())
            store.write_text("summary.csv", summ.to_csv(index=False))
            store.write_json("vanishing.json", {"vanishing": van.to_dict(orient="records"),
                                                "vanishing_depth": vdepth, "threshold": threshold})
            store.save_figure(result.plot(title=f"{spec} init={init or 'default'}"), "init_check")
            if "eig_min" in shown:
                store.save_figure(result.plot(("eig_max", "eig_min", "trace", "hess_gershgorin")), "init_spectrum")
            store.release_lock()
            console.print(f"written: {store.root}/ (metrics.parquet, summary.csv, vanishing.json, figures/)")
