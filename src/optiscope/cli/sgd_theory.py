"""``optiscope sgd-theory``: predicted loss curve, stability verdict, critical lr, phase and advice for mini-batch
SGD with momentum from a spectrum, a kernel, or a model on data (Velikanov et al. 2023, :mod:`optiscope.theory.sgd`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import typer


def _check_npz(path_text: Any, what: str) -> Path:
    """The path of a readable NumPy ``.npz`` archive, else SpectrumError naming the file and what is wrong (empty
    path, missing, a directory, a ``.npy`` array, YAML/text/pickles or other bytes)."""
    import zipfile

    from optiscope.theory.sgd import SpectrumError

    if path_text is None or not str(path_text).strip():
        raise SpectrumError(f"--{what} is empty: give " + ("powerlaw:nu=..,kappa=..,n=.. or " if what == "spectrum"
                                                           else "") + "the path of a .npz file")
    p = Path(str(path_text))
    if not p.exists():
        raise SpectrumError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise SpectrumError(f"{what} file {p} is not a file")
    try:
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise SpectrumError(f"{what} file {p} is a single .npy array, not a .npz archive of named arrays")
            for k in z.files:  # read every array: a truncated archive fails here, not later
                z[k]
    except SpectrumError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        why = ("its bytes are neither a zip archive nor a .npy array (text, YAML or a pickle?)"
               if "pickle" in str(e) else f"{type(e).__name__}: {' '.join(str(e).split())[:160]}")
        raise SpectrumError(f"{what} file {p} is not a NumPy .npz archive of numeric arrays ({why})") from None
    return p


def _finite(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number, else SpectrumError naming ``name``."""
    from optiscope.theory.sgd import SpectrumError

    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SpectrumError(f"{name} = {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise SpectrumError(f"{name} = {value!r} is not a finite number")
    return v


def _load_spectrum(spectrum: str | None, kernel: Path | None, model: str | None, data: str | None,
                   points: int | None, seed: int) -> tuple[Any, dict[str, Any], int | None]:
    """-> (Spectrum, info, number of points the batch is drawn from or None)."""
    from optiscope.theory.sgd import Spectrum, SpectrumError
    from optiscope.utils.spec import parse_spec

    given = [x is not None for x in (spectrum, kernel, model)]
    if sum(given) != 1:
        raise SpectrumError("give exactly one of --spectrum, --kernel or --model (with --data)")
    if spectrum is not None:
        if spectrum.startswith("powerlaw"):
            _, kw = parse_spec(spectrum, ["powerlaw"], "spectrum")
            allowed = {"nu", "kappa", "n", "scale", "amplitude"}
            bad = set(kw) - allowed
            if bad or not {"nu", "kappa", "n"} <= set(kw):
                raise SpectrumError(f"powerlaw spectrum needs nu, kappa, n (optional scale, amplitude); got {kw}")
            vals = {k: _finite(f"powerlaw {k}", kw[k]) for k in kw}
            if not float(vals["n"]).is_integer() or vals["n"] < 1 or vals["n"] > 10**8:
                raise SpectrumError(f"powerlaw n = {kw['n']!r} must be an integer in [1, 1e8]")
            sp = Spectrum.power_law(vals["nu"], vals["kappa"], int(vals["n"]), vals.get("scale", 1.0),
                                    vals.get("amplitude", 1.0))
            return sp, {"source": spectrum, "nu": vals["nu"], "kappa": vals["kappa"],
                        "Lambda": vals.get("scale", 1.0), "K": vals.get("amplitude", 1.0)}, None
        return Spectrum.from_file(_check_npz(spectrum, "spectrum")), {"source": spectrum}, None
    if kernel is not None:
        kernel = _check_npz(kernel, "kernel")
        with np.load(kernel, allow_pickle=False) as z:
            missing = [k for k in ("kernel", "targets") if k not in z.files]
            if missing:
                raise SpectrumError(f"kernel file {kernel} lacks array(s) {missing}; it has {z.files}")
            f0 = z["initial_outputs"] if "initial_outputs" in z.files else None
            sp = Spectrum.from_kernel(z["kernel"], z["targets"], initial_outputs=f0, name=str(kernel))
        return sp, {"source": str(kernel)}, int(sp.size)
    if data is None:
        raise SpectrumError("--model needs --data (e.g. --data digits)")
    _, kw = parse_spec(model, ["mlp"], "model")
    bad = set(kw) - {"width"}
    if bad:
        raise SpectrumError(f"--model mlp accepts only width=..., got {sorted(bad)}")
    from optiscope.experiments.sgd_generating_functions.common import ntk_problem

    if points is None and data.startswith("fashion"):
        points = 1000
    prob = ntk_problem(data, n_points=points, width=int(kw.get("width", 1000)), seed=seed)
    s = prob.spectrum
    sp = Spectrum(s.eigenvalues * s.scale, s.coefficients, name=f"{data} NTK, one-hidden-layer width "
                  f"{prob.model.width} (N={prob.n})")
    return sp, {"source": f"{model} on {data}", "points": prob.n}, prob.n


def register(app: typer.Typer) -> None:
    """Add ``sgd-theory`` to the typer ``app``."""
    @app.command("sgd-theory")
    def sgd_theory(
        spectrum: str | None = typer.Option(None, "--spectrum", help="powerlaw:nu=..,kappa=..,n=.. or a .npz with "
                                               "eigenvalues and coefficients (L0 = sum c / 2)"),
        kernel: Path | None = typer.Option(None, "--kernel", help=".npz with kernel (N x N) and targets "
                                              "(optional initial_outputs)"),
        model: str | None = typer.Option(None, "--model", help="mlp[:width=1000]: one-hidden-layer NTK network"),
        data: str | None = typer.Option(None, "--data", help="dataset for --model (digits, fashion_mnist)"),
        points: int | None = typer.Option(None, "--points", help="training points for --model (subset)"),
        lr: float = typer.Option(..., "--lr", help="learning rate alpha"),
        momentum: float = typer.Option(0.0, "--momentum", help="heavy-ball momentum beta"),
        batch: int = typer.Option(..., "--batch", help="batch size b"),
        dataset_size: int | None = typer.Option(None, "--dataset-size",
                                                   help="N for gamma=(N-b)/(b(N-1)); default: infinite (1/b)"),
        tau1: float = typer.Option(1.0, "--tau1", help="SE parameter tau1"),
        tau2: float = typer.Option(1.0, "--tau2", help="SE parameter tau2"),
        steps: int = typer.Option(10_000, "--steps", help="number of SGD steps to predict"),
        json_out: Path | None = typer.Option(None, "--json", help="write the prediction as JSON"),
        plot: Path | None = typer.Option(None, "--plot", help="write the predicted loss curve as PNG"),
        advise_: bool = typer.Option(False, "--advise", help="search (lr, momentum) for the lowest predicted loss"),
        seed: int = typer.Option(0, "--seed", help="seed of the network for --model"),
        device: str | None = typer.Option(None, "--device", help="cpu | auto (the NTK for --model is computed on "
                                          "the CPU)"),
        quiet: bool = typer.Option(False, "--quiet", help="print only the verdict line"),
    ) -> None:
        """Predict the noise-averaged loss of mini-batch SGD with momentum from a spectrum (Velikanov et al. 2023)."""
        from rich.console import Console
        from rich.table import Table

        from optiscope.cli._common import check_device
        from optiscope.cli.main import fail
        from optiscope.theory import sgd as th

        check_device(device, cpu_only="sgd-theory")
        try:
            if steps < 0:
                raise th.SpectrumError(f"--steps must be >= 0, got {steps}")
            if batch < 1:
                raise th.SpectrumError(f"--batch must be >= 1, got {batch}")
            if dataset_size is not None and dataset_size < batch:
                raise th.SpectrumError(f"--dataset-size {dataset_size} is smaller than --batch {batch}")
            if points is not None and points < 1:
                raise th.SpectrumError(f"--points must be >= 1, got {points}")
            for opt_name, v in (("--lr", lr), ("--momentum", momentum), ("--tau1", tau1), ("--tau2", tau2)):
                _finite(opt_name, v)
            sp, info, n_points = _load_spectrum(spectrum, kernel, model, data, points, seed)
            if n_points is not None and batch > n_points:
                raise th.SpectrumError(f"batch size {batch} is larger than the dataset ({n_points} points)")
            gamma = th.noise_amplitude(batch, dataset_size)
            curve = th.se_loss_curve(sp, lr, momentum, batch, steps, dataset_size, tau1, tau2)
            st = th.stability(sp, lr, momentum, batch, dataset_size, tau1, tau2)
            if "nu" in info:
                nu, kappa, Lam, K = info["nu"], info["kappa"], info["Lambda"], info["K"]
                fit = None
            else:
                try:
                    fit = th.fit_power_law(sp) if sp.size >= 8 and sp.multiplicities is None else None
                except th.SpectrumError:  # e.g. zero eigenvalues in the fit range: no phase to report
                    fit = None
                nu, kappa = (fit.nu, fit.kappa) if fit else (None, None)
                Lam, K = (fit.Lambda, fit.K) if fit else (None, None)
            phase = th.power_law_phase(nu, kappa) if nu and kappa and nu > 0 and kappa > 0 else None
            asym = None
            if phase and phase["exponent"] is not None and st.converges:
                asym = th.asymptotic_loss(sp, lr, momentum, batch, nu, kappa, Lam, K, dataset_size, tau1, tau2)
            adv = th.advise(sp, batch, steps, dataset_size, tau1, tau2) if advise_ else None
        except ValueError as e:
            fail(str(e))
            return
        out: dict[str, Any] = {
            "spectrum": {"name": sp.name, "modes": sp.size, "lambda_max": sp.lambda_max,
                         "initial_loss": sp.initial_loss, **{k: v for k, v in info.items() if k != "source"},
                         "source": info.get("source")},
            "lr": lr, "momentum": momentum, "batch": batch, "dataset_size": dataset_size, "gamma": gamma,
            "tau1": tau1, "tau2": tau2, "steps": steps,
            "loss": curve.loss_list(), "final_loss": curve.loss_list()[-1], "diverged_at": curve.diverged_at,
            "converges": st.converges, "verdict": st.kind, "stability": st.to_dict(),
            "critical_lr": st.critical_lr, "effective_lr": st.effective_lr,
            "effective_lr_bound_prop4": th.effective_lr_bound(sp, batch, dataset_size, tau1, tau2),
            "phase": phase["phase"] if phase else None,
            "exponent": phase["exponent"] if phase else None,
            "power_law": fit.to_dict() if fit else ({"nu": nu, "kappa": kappa} if nu else None),
            "asymptotics": asym.to_dict() if asym else None,
            "advice": adv.to_dict() if adv else None,
        }
        if json_out is not None:
            from optiscope.utils.atomic import atomic_write_json

            atomic_write_json(json_out, out)
        if plot is not None:
            from optiscope.utils.plotting import plt, save_figure

            fig, ax = plt.subplots(figsize=(6, 4))
            t = np.arange(steps + 1)
            fin = np.isfinite(curve.loss) & (t > 0)
            ax.loglog(t[fin], curve.loss[fin], label=f"SE prediction (tau1={tau1:g}, tau2={tau2:g})")
            if asym is not None:
                ax.loglog(t[1:], asym.loss(t[1:]), "k:", label=f"asymptotics, {asym.phase}")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_title(f"lr={lr:g}, beta={momentum:g}, b={batch}: {st.kind}")
            ax.legend(fontsize=8)
            save_figure(fig, plot)
        con = Console()
        if st.converges:
            verdict = f"converges (U(1) = {st.noise_at_one:.4g})"
        elif st.divergence_time is not None and math.isfinite(st.divergence_time):
            verdict = f"diverges: {st.kind}, time scale {st.divergence_time:.4g} steps"
        else:
            verdict = f"diverges: {st.kind}"
        if quiet:
            con.print(verdict)
            return
        table = Table("quantity", "value", title=f"sgd-theory: {sp.name}")
        table.add_row("verdict", verdict)
        table.add_row("loss at step 0 / final", f"{curve.loss[0]:.5g} / {out['final_loss'] if out['final_loss'] is None else format(out['final_loss'], '.5g')}")
        table.add_row("critical lr at this momentum", f"{st.critical_lr:.5g}")
        table.add_row("effective lr (bound, Prop. 4)", f"{st.effective_lr:.5g} ({out['effective_lr_bound_prop4']:.5g})")
        table.add_row("gamma", f"{gamma:.5g}")
        if phase:
            table.add_row("phase (nu, kappa)", f"{phase['phase']} ({nu:.3g}, {kappa:.3g})")
            if phase["exponent"] is not None:
                table.add_row("asymptotic exponent", f"{phase['exponent']:.4g}")
        if asym and asym.transition_time and asym.phase == "noise-dominated":
            table.add_row("signal->noise transition", f"{asym.transition_time:.4g} steps")
        if adv:
            table.add_row("advice (lr, momentum)", f"{adv.lr:.4g}, {adv.momentum:g} -> loss {adv.loss:.4g}"
                          + (" (coarsened spectrum)" if adv.approximated else ""))
        from optiscope.cli import _output

        _output.print_table(table, file=con.file)  # boxed on a terminal, plain text when piped
