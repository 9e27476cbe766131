"""Velikanov et al. 2023, Fig. 6, Prop. 5: when is negative momentum better?

Two exact power-law problems, b = 1 on an infinite dataset (gamma = 1), SE with tau = 1:

* noise-dominated (default nu = 2, kappa = 4.25, the tie-break case): fix alpha at the minimiser of C_noise for beta = 0; Prop. 5 II
  predicts the sign of ``d ln C_noise / d beta`` at beta = 0 (criterion S of Eq. 30 in output space, spec
  "Discrepancy"); S > 0 means the optimal momentum is negative. We scan beta at that alpha with the SE recursion
  and run a joint (alpha, beta) grid search of the SE loss at the horizon.
* signal-dominated (default nu = 1.5, kappa = 0.75): Prop. 5 I predicts ``d C_signal / d beta < 0`` (positive
  momentum helps); the grid-search optimum should have beta > 0.

The spec warns that the effect in the noise phase is small (loss gains of order 0.05%-1%); the numbers are
reported with their size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optiscope.experiments.base import Claim, Result, register
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import all_of, direction_claim
from optiscope.theory.sgd import (
    Spectrum,
    critical_learning_rate,
    log_constant_momentum_derivative,
    negative_momentum_criterion,
    optimal_lr_noise_dominated,
    optimal_lr_signal_dominated,
    power_law_phase,
    se_loss_grid,
)
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task


@dataclass(frozen=True)
class NegativeMomentumConfig(Config):
    """Configuration of ``sgd_negative_momentum`` (Velikanov et al. 2023, §6, Prop. 5, Fig. 6): a noise-dominated
    power-law problem (``noise_nu``, ``noise_kappa``, ``noise_modes``, ``noise_steps``) and a signal-dominated one
    (``signal_*``), each searched over momenta (``*_betas``) and learning rates; ``batch_size`` of SGD; ``fd_beta`` the
    finite-difference step of Prop. 5's derivative."""
    seed: int = 0
    noise_nu: float = 2.0
    noise_kappa: float = 4.25
    noise_modes: int = 2000
    noise_steps: int = 20_000
    noise_betas: tuple[float, ...] = (-0.2, -0.15, -0.1, -0.06, -0.03, -0.01, 0.0, 0.01, 0.03, 0.06, 0.1, 0.15)
    noise_lr_factors: tuple[float, ...] = (0.7, 0.85, 1.0, 1.15, 1.3)
    signal_nu: float = 1.5
    signal_kappa: float = 0.75
    signal_modes: int = 5000
    signal_steps: int = 5000
    signal_betas: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    signal_lr_fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.95)
    batch_size: int = 1
    fd_beta: float = 0.01

    def validate(self) -> None:
        for pre in ("noise", "signal"):
            nu, k = getattr(self, f"{pre}_nu"), getattr(self, f"{pre}_kappa")
            require(nu > 1 and k > 0, f"{pre}_nu", nu, "nu > 1 and kappa > 0")
            require(getattr(self, f"{pre}_modes") >= 100, f"{pre}_modes", getattr(self, f"{pre}_modes"), ">= 100")
            require(getattr(self, f"{pre}_steps") >= 100, f"{pre}_steps", getattr(self, f"{pre}_steps"), ">= 100")
            betas = getattr(self, f"{pre}_betas")
            require(len(betas) >= 3 and 0.0 in betas and all(-1 < b < 1 for b in betas), f"{pre}_betas", betas,
                    ">= 3 momenta in (-1, 1) including 0")
        ph_n = power_law_phase(self.noise_nu, self.noise_kappa)["phase"]
        ph_s = power_law_phase(self.signal_nu, self.signal_kappa)["phase"]
        require(ph_n == "noise-dominated", "noise_kappa", self.noise_kappa, f"kappa > 2 nu - 1 (got {ph_n})")
        require(ph_s == "signal-dominated", "signal_kappa", self.signal_kappa, f"kappa < 2 nu - 1 (got {ph_s})")
        require(len(self.noise_lr_factors) >= 1 and all(f > 0 for f in self.noise_lr_factors), "noise_lr_factors",
                self.noise_lr_factors, "positive factors")
        require(all(0 < f < 1 for f in self.signal_lr_fractions), "signal_lr_fractions", self.signal_lr_fractions,
                "fractions in (0, 1)")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(0 < self.fd_beta < 0.2, "fd_beta", self.fd_beta, "in (0, 0.2)")


QUICK = NegativeMomentumConfig(noise_modes=1000, noise_steps=100_000,
                               noise_betas=(-0.15, -0.08, -0.04, -0.02, 0.0, 0.02, 0.04, 0.08, 0.15),
                               noise_lr_factors=(0.8, 1.0, 1.2), signal_modes=2000, signal_steps=3000,
                               signal_betas=(-0.5, 0.0, 0.5, 0.8, 0.9, 0.95, 0.98), signal_lr_fractions=(0.3, 0.6, 0.9))
FULL = NegativeMomentumConfig(noise_modes=10_000, noise_steps=200_000, signal_modes=50_000, signal_steps=20_000)


@register("sgd_negative_momentum", paper="004", title="Negative momentum in the noise-dominated phase (Prop. 5, Fig. 6)",
          config=NegativeMomentumConfig, presets={"quick": QUICK, "full": FULL},
          cpu_only="generating-function theory on a power-law spectrum (numpy/scipy and the SE recursion of "
                   "theory.sgd on the CPU): no torch model or data")
def run(config: NegativeMomentumConfig, store: RunStore) -> Result:
    """Velikanov et al. 2023, §6 Prop. 5 / Fig. 6: Prop. 5's sign vs the SE grid-search optimum of the momentum."""
    b = config.batch_size
    claims: list[Claim] = []
    metrics: dict = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    with progress_task("negative momentum", 3) as task:
        # ---------------- noise-dominated --------------------------------------------------------------------
        nu, kappa = config.noise_nu, config.noise_kappa
        spec = Spectrum.power_law(nu, kappa, config.noise_modes)
        a_star = optimal_lr_noise_dominated(spec, nu, b)
        S = negative_momentum_criterion(spec, nu)
        dpred = log_constant_momentum_derivative(spec, nu, a_star, b, which="noise")
        betas = np.asarray(config.noise_betas, dtype=float)
        fd = config.fd_beta
        scan_b = np.concatenate([betas, [-fd, fd]])
        final, _ = se_loss_grid(spec, np.full(scan_b.size, a_star), scan_b, b, config.noise_steps)
        scan, (lm, lp) = final[:betas.size], final[betas.size:]
        dmeas = float((np.log(lp) - np.log(lm)) / (2 * fd))
        i0 = int(np.argmin(np.where(np.isfinite(scan), scan, np.inf)))
        best_beta_fixed = float(betas[i0])
        gain = float(scan[i0] / scan[list(betas).index(0.0)])
        task.advance()
        lr_grid = a_star * np.asarray(config.noise_lr_factors)
        Lg, Bg = np.meshgrid(lr_grid, betas)
        g2, _ = se_loss_grid(spec, Lg.ravel(), Bg.ravel(), b, config.noise_steps)
        g2 = g2.reshape(Lg.shape)
        j = np.unravel_index(int(np.argmin(np.where(np.isfinite(g2), g2, np.inf))), g2.shape)
        best_joint = {"lr": float(Lg[j]), "momentum": float(Bg[j]), "loss": float(g2[j])}
        metrics["noise_dominated"] = {
            "nu": nu, "kappa": kappa, "modes": config.noise_modes, "steps": config.noise_steps,
            "alpha_opt_beta0": a_star, "prop5_criterion_S": S, "predicted_dlnC_dbeta": dpred,
            "measured_dlnL_dbeta": dmeas, "betas": betas.tolist(), "loss_vs_beta": scan.tolist(),
            "best_beta_fixed_alpha": best_beta_fixed, "loss_ratio_best_vs_beta0": gain,
            "joint_grid_optimum": best_joint}
        store.write_arrays("noise_scan", betas=betas, loss=scan, lr_grid=lr_grid, joint=g2)
        claims.append(Claim(
            "noise_phase_negative_momentum",
            f"noise-dominated (nu={nu:g}, kappa={kappa:g}): at the beta=0-optimal lr, Prop. 5 criterion S>0 "
            "predicts a negative optimal momentum",
            paper="optimal beta < 0 when S > 0 (Fig. 6)",
            measured=(f"S={S:.3g}; SE best beta at fixed lr = {best_beta_fixed:g} (loss x{gain:.4f} vs beta=0); "
                      f"joint grid optimum beta={best_joint['momentum']:g}"),
            **_v(direction_claim((best_beta_fixed,) * 2, null=0.0, direction="less" if S > 0 else "greater",
                                 estimate=best_beta_fixed))))
        claims.append(Claim(
            "noise_phase_derivative",
            "the sign of d ln L / d beta at beta=0 (SE loss at the horizon) is the sign of d ln C_noise / d beta "
            "(Eq. 28b) and of S (Eq. 30)",
            paper="sign of Eq. 30", measured=f"measured {dmeas:.4g}, predicted {dpred:.4g} (S={S:.3g})",
            **_v(all_of([direction_claim((d,) * 2, null=0.0, direction="greater" if S > 0 else "less")
                         for d in (dmeas, dpred)], ["measured d ln L/d beta", "predicted d ln C_noise/d beta"]))))
        axes[0].plot(betas, scan / scan[list(betas).index(0.0)], "o-")
        axes[0].axvline(0, color="k", lw=0.5)
        axes[0].set_xlabel("momentum beta (lr fixed at beta=0 optimum)")
        axes[0].set_ylabel(f"L(T={config.noise_steps}) / L at beta=0")
        axes[0].set_title(f"noise-dominated nu={nu:g}, kappa={kappa:g}; S={S:.2g}")
        task.advance()
        # ---------------- signal-dominated -------------------------------------------------------------------
        nu_s, ka_s = config.signal_nu, config.signal_kappa
        spec_s = Spectrum.power_law(nu_s, ka_s, config.signal_modes)
        a_s = optimal_lr_signal_dominated(spec_s, ka_s, nu_s, b)
        dsig = log_constant_momentum_derivative(spec_s, nu_s, a_s, b, which="signal", kappa=ka_s)
        sb = np.asarray(config.signal_betas, dtype=float)
        fr = np.asarray(config.signal_lr_fractions, dtype=float)
        crit = np.array([critical_learning_rate(spec_s, m, b) for m in sb])
        Ls = crit[:, None] * fr[None, :]
        Bs = np.broadcast_to(sb[:, None], Ls.shape)
        g3, _ = se_loss_grid(spec_s, Ls.ravel(), Bs.ravel(), b, config.signal_steps)
        g3 = g3.reshape(Ls.shape)
        k = np.unravel_index(int(np.argmin(np.where(np.isfinite(g3), g3, np.inf))), g3.shape)
        best_s = {"lr": float(Ls[k]), "momentum": float(Bs[k]), "loss": float(g3[k])}
        best_by_beta = np.min(np.where(np.isfinite(g3), g3, np.inf), axis=1)
        metrics["signal_dominated"] = {
            "nu": nu_s, "kappa": ka_s, "modes": config.signal_modes, "steps": config.signal_steps,
            "alpha_opt_beta0": a_s, "predicted_dlnC_signal_dbeta": dsig, "betas": sb.tolist(),
            "best_loss_by_beta": best_by_beta.tolist(), "grid_optimum": best_s}
        store.write_arrays("signal_grid", betas=sb, lr=Ls, loss=g3)
        claims.append(Claim(
            "signal_phase_positive_momentum",
            f"signal-dominated (nu={nu_s:g}, kappa={ka_s:g}): positive momentum helps (Prop. 5 I: dC/dbeta < 0)",
            paper="optimal beta > 0, close to 1 (Fig. 2 a, b)",
            measured=f"predicted d ln C_sig/d beta = {dsig:.3g}; SE grid optimum beta = {best_s['momentum']:g}",
            **_v(all_of([direction_claim((dsig,) * 2, null=0.0, direction="less"),
                         direction_claim((best_s["momentum"],) * 2, null=0.0, direction="greater")],
                        ["predicted d ln C_signal/d beta", "SE grid-optimal beta"]))))
        axes[1].semilogy(sb, best_by_beta, "o-")
        axes[1].set_xlabel("momentum beta")
        axes[1].set_ylabel(f"best L(T={config.signal_steps}) over lr")
        axes[1].set_title(f"signal-dominated nu={nu_s:g}, kappa={ka_s:g}")
        task.advance()
    store.save_figure(fig, "negative_momentum")
    return Result(claims=claims, metrics=metrics)


def _v(verdict) -> dict:
    """A verdict as the ``holds``/``reason`` keyword arguments of :class:`Claim`."""
    return {"holds": verdict.holds, "reason": verdict.reason}
