r"""The forward signal of deep i.i.d.-initialised MLPs at init against width and depth: the median under the
Xavier / He variance, the variance that keeps the median at one, orthogonal init, and linear against ReLU
(Orvieto et al. 2022, §4, Prop. 8, Thm. 9, Eq. (6), Fig. 14, 20, 22; App. A.1 on linear vs ReLU).

For a bias-free MLP of constant width ``m`` and depth ``L`` with ``x_l = phi(W_l x_{l-1})`` (``phi`` = identity or
ReLU, applied after every layer), the forward factor :math:`X_L = \|x_L\|^2 / \|x_0\|^2` is a product of ``L``
i.i.d. per-layer factors for Gaussian weights (rotation invariance). Its mean is :math:`(c m \sigma^2)^L` (1 at the
Xavier / He variance) but its median is not: Prop. 8 (:func:`optiscope.theory.init.mlp_norm_moments`) gives the
exact first two moments, and the log-normal that matches them (:func:`optiscope.theory.init.lognormal_median`) has
median :math:`(1 + c'/m)^{-L/2}` with :math:`c' = 2` (linear) and :math:`5` (ReLU), about :math:`e^{-L/m}` and
:math:`e^{-5L/(2m)}`.

Measured by Monte Carlo over ``n_nets`` networks per width (one pass records every depth):

1. **Median at the critical variance.** Given :math:`x_{l-1}`, the factor :math:`Y_l = \|x_l\|^2/\|x_{l-1}\|^2`
   has a law that does not depend on :math:`x_{l-1}` (:func:`log_factor_cumulants`), so :math:`\log X_L` is a sum
   of ``L`` i.i.d. terms and its median follows from their cumulants (:func:`predicted_log_median`). Measured
   log-medians (bootstrap CI) are judged against it; the mean (the Xavier / He design rule: median 1) is the
   negative control. The two-moment log-normal of Prop. 8 (:func:`lognormal_log_median`) is reported beside it:
   it captures the decay but underestimates it by about 30% at ``m = 16`` (the third and higher cumulants of the
   layer factor, which the two moments do not see).
2. **The variance that keeps the median at one.** Both nonlinearities are positively homogeneous, so scaling
   :math:`\sigma^2` by a gain ``g`` multiplies :math:`X_L` by :math:`g^L`: the "optimal" gain is exactly
   :math:`g^* = \operatorname{median}(X_L)^{-1/L}` at ``g = 1``, and the theory's is
   :math:`\exp(-\text{predicted log-median} / L) \approx \sqrt{1 + 5/m}`. Orvieto et al. 2022 (§4, Fig. 20)
   state that the optimal variance "is a function of the width to depth ratio"; the figure is not in the text, and
   its definition of the optimum is not recoverable. Our reading (median of the forward factor equal to one) gives a
   function of the width alone to leading order; the claim ``optimal_gain_function_of_width_to_depth`` tests the
   paper's statement on this reading and reports what it finds.
3. **Orthogonal init** (Saxe et al. 2013; Orvieto et al. 2022, §1, Fig. 14: "restricted to linear networks"): with
   Haar-orthogonal square layers a linear net is an exact isometry (:math:`X_L = 1`), while with ReLU (gain
   :math:`\sqrt 2`) each layer's factor is :math:`2\sum_j s_j u_j^2` with ``u`` uniform on the sphere and fair signs
   ``s``: mean 1, variance :math:`3/(m+2)` (:math:`2\,\mathrm{Beta}(K/2, (m-K)/2)` given ``K`` active units), so
   the median still decays with depth, more slowly than with i.i.d. weights.
4. **Linear against ReLU** (Orvieto et al. 2022, App. A.1: "vanishing happens just a bit slower" in linear nets): at
   the critical variance the linear median decays more slowly than the ReLU median. ``tanh`` at the Xavier variance
   is measured and reported (no claim: its moments have no closed form here).

The backward factor :math:`\|J^\top u\|^2` (``J = dx_L/dx_0``, ``u`` a random unit vector), the quantity behind
the gradient norms, is recorded alongside the forward one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import (
    Verdict,
    all_of,
    direction_claim,
    negative_control_claim,
    tolerance_claim,
)
from optiscope.theory.init import lognormal_median, mlp_norm_moments
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task

FAMILIES = ("linear", "relu", "linear_orthogonal", "relu_orthogonal", "tanh")


@dataclass(frozen=True)
class InitVarianceConfig(Config):
    """Configuration of ``init_variance`` (Orvieto et al. 2022, §4, Fig. 14, 20, 22): constant-width bias-free MLPs of
    every width in ``widths``, forward factors recorded at every depth in ``depths``, ``n_nets`` networks per width
    with ``dist`` weights (``normal`` or ``uniform``) at the Xavier (linear, tanh) / He (ReLU) variance; ``n_boot``
    bootstrap resamples (over networks) for the CIs. ``log_tol`` is the tolerance on the ratio of summed measured to
    predicted log-medians, ``gain_tol`` the bound on the mean absolute log-gain error; the negative control must be
    ``control_margin`` times worse."""

    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (8, 16, 32, 64)
    n_nets: int = 1500
    dist: str = "normal"
    n_boot: int = 200
    log_tol: float = 0.1
    gain_tol: float = 0.01
    control_margin: float = 3.0
    device: str = "cpu"

    def validate(self) -> None:
        require(len(self.widths) >= 2 and all(w >= 8 for w in self.widths) and len(set(self.widths)) == len(self.widths),
                "widths", self.widths, ">= 2 distinct widths, each >= 8 (narrower ReLU nets die with probability 2^-m per layer)")
        require(len(self.depths) >= 2 and all(d >= 1 for d in self.depths) and list(self.depths) == sorted(set(self.depths)),
                "depths", self.depths, ">= 2 increasing depths >= 1")
        require(self.n_nets >= 20, "n_nets", self.n_nets, ">= 20")
        require(self.dist in ("normal", "uniform"), "dist", self.dist, "normal or uniform")
        require(self.n_boot >= 50, "n_boot", self.n_boot, ">= 50")
        require(0 < self.log_tol < 1, "log_tol", self.log_tol, "in (0, 1)")
        require(self.gain_tol > 0, "gain_tol", self.gain_tol, "> 0")
        require(self.control_margin >= 1, "control_margin", self.control_margin, ">= 1")
        require_device(self.device)


def critical_variance(family: str, width: int) -> float:
    """The weight variance of the experiment's families (Orvieto et al. 2022, §2): Xavier ``1/m`` for square linear
    and tanh layers, He ``2/m`` for ReLU; orthogonal layers are scaled to the same variance (gain 1 or sqrt(2))."""
    return (2.0 if family.startswith("relu") else 1.0) / width


def _weights(family: str, dist: str, n: int, m: int, gen: torch.Generator, device) -> torch.Tensor:
    """``n`` square weight matrices of one layer: i.i.d. (``dist``) or Haar-orthogonal, at the critical variance."""
    var = critical_variance(family, m)
    if family.endswith("orthogonal"):
        a = torch.randn(n, m, m, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar measure (Mezzadri 2007)
        w = q * math.sqrt(var * m)
    elif dist == "normal":
        w = torch.randn(n, m, m, generator=gen, dtype=torch.float64) * math.sqrt(var)
    else:
        w = (torch.rand(n, m, m, generator=gen, dtype=torch.float64) * 2 - 1) * math.sqrt(3 * var)
    return w.to(device)


def forward_backward_factors(family: str, dist: str, width: int, depths, n_nets: int, seed: int,
                             device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    r"""Monte Carlo of :math:`\log X_l = \log(\|x_l\|^2/\|x_0\|^2)` and of the backward factor
    :math:`\log(\|J_l^\top u\|^2)` (``J_l = dx_l/dx_0``, unit ``u``) for ``n_nets`` networks, at each depth in
    ``depths`` (one pass through the deepest net records them all). Returns arrays ``[len(depths), n_nets]``."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    act = {"linear": lambda z: z, "relu": torch.relu, "tanh": torch.tanh}[family.split("_")[0]]
    x0 = torch.randn(n_nets, width, generator=gen, dtype=torch.float64).to(dev)
    x0 = x0 / x0.norm(dim=1, keepdim=True)
    x0.requires_grad_(True)
    u = torch.randn(n_nets, width, generator=gen, dtype=torch.float64).to(dev)
    u = u / u.norm(dim=1, keepdim=True)
    want = {int(d) for d in depths}
    fwd, bwd = {}, {}
    x = x0
    for layer in range(1, max(want) + 1):
        w = _weights(family, dist, n_nets, width, gen, dev)
        x = act(torch.einsum("nij,nj->ni", w, x))
        if layer in want:
            fwd[layer] = torch.log((x.detach() ** 2).sum(1)).cpu().numpy()  # ||x_0|| = 1
            (gx,) = torch.autograd.grad((x * u).sum(), x0, retain_graph=True)
            bwd[layer] = torch.log((gx ** 2).sum(1)).cpu().numpy()
    return {"forward": np.stack([fwd[d] for d in depths]), "backward": np.stack([bwd[d] for d in depths])}


def log_factor_cumulants(family: str, width: int) -> tuple[float, float, float]:
    r"""First three cumulants of the per-layer log factor :math:`\log Y`, :math:`Y = \|x_l\|^2 / \|x_{l-1}\|^2`,
    of a square layer of width ``m`` at the critical variance (Gaussian or Haar weights; the law of ``Y`` does not
    depend on :math:`x_{l-1}`, so the layers' factors are i.i.d. and :math:`\log X_L` is a sum of ``L`` of them).

    * linear, i.i.d. :math:`N(0, 1/m)`: :math:`Y = \chi^2_m / m`, cumulants
      :math:`(\psi(m/2) + \log(2/m),\ \psi'(m/2),\ \psi''(m/2))`;
    * ReLU, i.i.d. :math:`N(0, 2/m)`: with ``K ~ Bin(m, 1/2)`` active units, :math:`Y = (2/m)\chi^2_K`;
    * ReLU, Haar-orthogonal times :math:`\sqrt 2`: :math:`Y = 2 B`, :math:`B \sim \mathrm{Beta}(K/2, (m-K)/2)` (the
      squared mass of ``K`` coordinates of a uniform unit vector), ``Y = 2`` when ``K = m``;
    * linear, orthogonal: :math:`Y = 1`.

    For ReLU the cumulants are those of the mixture over ``K`` (exact finite sums of digamma / polygamma values),
    conditioned on ``K >= 1`` (a dead layer has probability :math:`2^{-m}`). These are the laws behind the moment
    recursion of Orvieto et al. 2022, Prop. 8 (App. B.2), whose first two moments they reproduce.
    """
    from scipy import special, stats

    m = int(width)
    if family == "linear_orthogonal":
        return 0.0, 0.0, 0.0
    if family == "linear":
        a = m / 2.0
        return (float(special.digamma(a) + math.log(2.0 / m)), float(special.polygamma(1, a)),
                float(special.polygamma(2, a)))
    if family not in ("relu", "relu_orthogonal"):
        raise ValueError(f"no exact law for family {family!r}")
    ks = np.arange(1, m + 1)
    pk = stats.binom.pmf(ks, m, 0.5)
    pk = pk / pk.sum()
    if family == "relu":
        a = ks / 2.0
        k1 = special.digamma(a) + math.log(4.0 / m)
        k2 = special.polygamma(1, a)
        k3 = special.polygamma(2, a)
    else:
        a, b = ks / 2.0, (m - ks) / 2.0
        full = ks == m
        b = np.where(full, 1.0, b)
        k1 = np.where(full, math.log(2.0), math.log(2.0) + special.digamma(a) - special.digamma(a + b))
        k2 = np.where(full, 0.0, special.polygamma(1, a) - special.polygamma(1, a + b))
        k3 = np.where(full, 0.0, special.polygamma(2, a) - special.polygamma(2, a + b))
    r1 = np.sum(pk * k1)
    r2 = np.sum(pk * (k2 + k1 ** 2))
    r3 = np.sum(pk * (k3 + 3 * k2 * k1 + k1 ** 3))
    return float(r1), float(r2 - r1 ** 2), float(r3 - 3 * r1 * r2 + 2 * r1 ** 3)


def predicted_log_median(family: str, width: int, depth: int) -> float:
    r"""Log-median of the forward factor :math:`X_L` from the exact per-layer law (:func:`log_factor_cumulants`):
    :math:`\log X_L` is a sum of ``L`` i.i.d. terms with cumulants :math:`(c_1, c_2, c_3)`, whose median is, to the
    first Cornish-Fisher correction, :math:`L c_1 - c_3 / (6 c_2)`."""
    c1, c2, c3 = log_factor_cumulants(family, width)
    return float(depth * c1 - (c3 / (6.0 * c2) if c2 > 0 else 0.0))


def lognormal_log_median(family: str, width: int, depth: int) -> float:
    r"""The coarser prediction from the first two moments only (Orvieto et al. 2022, Prop. 8 with Eq. (6): mean 1,
    second moment :math:`(1 + c'/m)^L`) through the moment-matched log-normal
    (:func:`optiscope.theory.init.lognormal_median`): :math:`-(L/2)\log(1 + c'/m)`, ``c' = 2`` (linear), ``5``
    (ReLU); orthogonal ReLU: :math:`c'/m \to 3/(m+2)` (the variance of its per-layer factor)."""
    if family == "linear_orthogonal":
        return 0.0
    if family == "relu_orthogonal":
        return math.log(lognormal_median(1.0, (1.0 + 3.0 / (width + 2)) ** depth))
    var = critical_variance(family, width)
    x = np.full(width, 1.0 / math.sqrt(width))
    m2, m4 = mlp_norm_moments([width] * (depth + 1), [var] * depth, [3.0 * var ** 2] * depth, family, x,
                              activate_last=True)
    return math.log(lognormal_median(m2[-1] / m2[0], m4[-1] / m2[0] ** 2))


@register("init_variance", paper="002", title="Forward signal at init vs width and depth: medians at the Xavier/He "
          "variance, the variance that keeps the median at one, orthogonal init, linear vs ReLU (Prop. 8, Thm. 9, "
          "Fig. 14, 20, 22)", config=InitVarianceConfig,
          presets={"quick": InitVarianceConfig(),
                   "full": InitVarianceConfig(widths=(16, 32, 64, 128, 256), depths=(8, 16, 32, 64, 128, 256),
                                              n_nets=2000, n_boot=1000)})
def run(cfg: InitVarianceConfig, store: RunStore) -> Result:
    """Monte Carlo medians of the forward factor against the exact layer law, the optimal gain, orthogonal init and
    linear vs ReLU (Orvieto et al. 2022, §4)."""
    rng = np.random.default_rng(cfg.seed)
    data: dict[str, dict[int, dict[str, np.ndarray]]] = {f: {} for f in FAMILIES}
    dev = experiment_device(cfg)
    with progress_task("init_variance", len(FAMILIES) * len(cfg.widths)) as task:
        for i, fam in enumerate(FAMILIES):
            for j, m in enumerate(cfg.widths):
                data[fam][m] = forward_backward_factors(fam, cfg.dist, m, cfg.depths, cfg.n_nets,
                                                        cfg.seed + 1000 * i + j, dev)
                task.advance()
    # bootstrap over networks (per family and width, nested over depths): medians of every resample at every depth
    boot: dict[str, dict[int, np.ndarray]] = {f: {} for f in FAMILIES}
    for fam in FAMILIES:
        for m in cfg.widths:
            fw = np.where(np.isnan(data[fam][m]["forward"]), -np.inf, data[fam][m]["forward"])
            idx = rng.integers(0, cfg.n_nets, size=(cfg.n_boot, cfg.n_nets))
            boot[fam][m] = np.stack([np.median(fw[k][idx], axis=1) for k in range(len(cfg.depths))], axis=1)
    cells: dict[str, list[dict]] = {f: [] for f in FAMILIES}
    for fam in FAMILIES:
        for m in cfg.widths:
            for k, L in enumerate(cfg.depths):
                fw = data[fam][m]["forward"][k]
                med = float(np.median(np.where(np.isnan(fw), -np.inf, fw)))
                lo, hi = np.percentile(boot[fam][m][:, k], [2.5, 97.5])
                bw = data[fam][m]["backward"][k]
                row = {"width": m, "depth": L, "log_median": med, "log_median_ci": [float(lo), float(hi)],
                       "backward_log_median": float(np.median(bw)),
                       "mean_forward_factor": float(np.mean(np.exp(fw))),
                       "dead_fraction": float(np.mean(~np.isfinite(fw)))}
                if fam != "tanh":
                    row["predicted_log_median"] = predicted_log_median(fam, m, L)
                    row["lognormal_log_median"] = lognormal_log_median(fam, m, L)
                    row["gain"] = math.exp(-med / L)
                    row["gain_ci"] = [math.exp(-hi / L), math.exp(-lo / L)]
                    row["predicted_gain"] = math.exp(-row["predicted_log_median"] / L)
                cells[fam].append(row)

    def pooled(fam: str, stat) -> tuple[float, tuple[float, float]]:
        """``stat(medians)`` on the measured medians (dict width -> array over depths) and its bootstrap 95% CI."""
        est = stat({m: np.array([r["log_median"] for r in cells[fam] if r["width"] == m]) for m in cfg.widths})
        reps = [stat({m: boot[fam][m][b] for m in cfg.widths}) for b in range(cfg.n_boot)]
        lo, hi = np.nanpercentile(reps, [2.5, 97.5])
        return float(est), (float(lo), float(hi))

    pred = {fam: {m: np.array([predicted_log_median(fam, m, L) for L in cfg.depths]) for m in cfg.widths}
            for fam in ("linear", "relu", "relu_orthogonal")}

    def ratio_to_theory(fam):
        return lambda med: sum(float(np.sum(med[m])) for m in cfg.widths) / sum(float(np.sum(pred[fam][m]))
                                                                              for m in cfg.widths)

    claims: list[Claim] = []
    gauss = (cfg.dist == "normal", "the exact per-layer law is derived for Gaussian weights")
    dead = max(r["dead_fraction"] for fam in ("relu", "relu_orthogonal") for r in cells[fam])
    alive = (dead < 0.05, f"{dead:.0%} of the ReLU nets died (a layer with no active unit)")

    # 1. medians at the critical variance vs the exact law; control: the mean rule (median 1)
    parts, labels, measured = [], [], {}
    for fam in ("linear", "relu"):
        r_est, r_ci = pooled(fam, ratio_to_theory(fam))
        parts.append(tolerance_claim(r_est, 1.0, abs_tol=cfg.log_tol, ci=r_ci, premises=[gauss, alive]))
        labels.append(f"{fam}: sum of measured / predicted log-medians")
        measured[fam] = {"ratio_to_theory": round(r_est, 4), "ratio_ci": [round(x, 4) for x in r_ci],
                         "ratio_to_prop8_lognormal": round(
                             sum(r["log_median"] for r in cells[fam]) / sum(r["lognormal_log_median"]
                                                                            for r in cells[fam]), 4)}
    t_err = [abs(r["log_median"] - r["predicted_log_median"]) for f in ("linear", "relu") for r in cells[f]]
    c_err = [abs(r["log_median"]) for f in ("linear", "relu") for r in cells[f]]
    claims.append(Claim.judged(
        "median_matches_exact_law",
        f"at the Xavier (linear) / He (ReLU) variance the median of ||x_L||^2/||x_0||^2 falls with depth as the "
        f"law of a product of i.i.d. layer factors predicts (summed log-medians over all widths and depths within "
        f"{cfg.log_tol:.0%}), although its mean stays 1",
        paper="Prop. 8, Eq. (6), Thm. 9 / Fig. 22: the mean is preserved, the median is not",
        measured=measured, verdict=all_of(parts, labels)))
    claims.append(Claim.judged(
        "control_mean_rule",
        f"negative control: the mean rule (median = mean = 1, the design rule of Xavier / He) misses the measured "
        f"log-medians by more than {cfg.control_margin:g}x the exact law's error",
        paper="§3-4: the expected value is an atypical event in deep narrow nets",
        measured={"theory_mean_abs_error": float(np.mean(t_err)), "control_mean_abs_error": float(np.mean(c_err))},
        verdict=negative_control_claim(float(np.mean(t_err)), float(np.mean(c_err)), margin=cfg.control_margin,
                                       premises=[gauss])))

    # 2. optimal gain: above He for narrow deep nets; equal to the exact law's; width vs width-to-depth ratio
    narrow, deep = min(cfg.widths), max(cfg.depths)
    rn = next(r for r in cells["relu"] if r["width"] == narrow and r["depth"] == deep)
    v_dir = direction_claim(rn["gain_ci"], null=1.0, direction="greater", estimate=rn["gain"])
    depths = np.asarray(cfg.depths, float)

    def gain_error(med):
        return float(np.mean([np.mean(np.abs(-(med[m] - pred["relu"][m]) / depths)) for m in cfg.widths]))

    g_est, g_ci = pooled("relu", gain_error)
    v_gain = direction_claim(g_ci, null=cfg.gain_tol, direction="less", estimate=g_est, premises=[gauss, alive])
    claims.append(Claim.judged(
        "optimal_gain_above_he",
        f"ReLU: the variance that keeps the median forward factor at one is larger than He's 2/m for narrow nets "
        f"(m = {narrow}, L = {deep}: gain CI above 1) and equals the exact law's (about sqrt(1 + 5/m)): mean "
        f"|log g*_measured - log g*_predicted| over all cells below {cfg.gain_tol:g}",
        paper="§4: sigma^2 = 2/m is not an optimal choice for narrow networks (Fig. 1, 20)",
        measured={"gain_narrow_deep": round(rn["gain"], 4), "gain_ci": [round(x, 4) for x in rn["gain_ci"]],
                  "mean_abs_log_gain_error": round(g_est, 5), "error_ci": [round(x, 5) for x in g_ci],
                  "gain_by_cell [measured, predicted]": {f"m={r['width']} L={r['depth']}":
                                                         [round(r["gain"], 4), round(r["predicted_gain"], 4)]
                                                         for r in cells["relu"]}},
        verdict=all_of([v_dir, v_gain], ["narrow deep gain > 1", "gain vs theory"])))
    claims.append(_ratio_claim(cells["relu"], cfg, boot))

    # 3. orthogonal init: isometry for linear nets; ReLU still decays (the Gaussian linear net is the control)
    iso = max(max(abs(r["log_median_ci"][0]), abs(r["log_median_ci"][1])) for r in cells["linear_orthogonal"])
    lin_g = next(r for r in cells["linear"] if r["width"] == narrow and r["depth"] == deep)
    claims.append(Claim.judged(
        "orthogonal_linear_isometry",
        "orthogonal init makes a deep linear net an isometry (median forward factor 1 at every width and depth), "
        f"while Gaussian Xavier init (control, m = {narrow}, L = {deep}) loses the median",
        paper="§1, Fig. 14: orthogonal init (Saxe et al. 2013) avoids vanishing in linear networks",
        measured={"max_abs_log_median_orthogonal": iso, "gaussian_log_median": round(lin_g["log_median"], 3)},
        verdict=all_of([tolerance_claim(iso, 0.0, abs_tol=1e-9),
                        negative_control_claim(iso, abs(lin_g["log_median"]), margin=cfg.control_margin)],
                       ["orthogonal linear |log median|", "control: Gaussian linear"])))
    ro = next(r for r in cells["relu_orthogonal"] if r["width"] == narrow and r["depth"] == deep)
    o_est, o_ci = pooled("relu_orthogonal", ratio_to_theory("relu_orthogonal"))
    claims.append(Claim.judged(
        "orthogonal_relu_still_vanishes",
        f"with ReLU, orthogonal init (gain sqrt 2) does not prevent the median decay: at m = {narrow}, L = {deep} "
        "the log-median is below -0.5, and the summed log-medians match the exact law of the layer factor "
        f"2 Beta(K/2, (m-K)/2) within {cfg.log_tol:.0%}",
        paper="§1, Fig. 14: orthogonal init is restricted to linear networks",
        measured={"log_median_narrow_deep": round(ro["log_median"], 3), "ratio_to_theory": round(o_est, 4),
                  "ratio_ci": [round(x, 4) for x in o_ci],
                  "cells [measured, predicted]": {f"m={r['width']} L={r['depth']}":
                                                  [round(r["log_median"], 3), round(r["predicted_log_median"], 3)]
                                                  for r in cells["relu_orthogonal"]}},
        verdict=all_of([direction_claim(ro["log_median_ci"], null=-0.5, direction="less", estimate=ro["log_median"]),
                        tolerance_claim(o_est, 1.0, abs_tol=cfg.log_tol, ci=o_ci, premises=[alive])],
                       ["narrow deep log-median < -0.5", "summed log-medians vs theory"])))

    # 4. linear vanishes more slowly than ReLU at the critical variance
    parts, labels = [], []
    for m in cfg.widths:
        d = boot["linear"][m][:, -1] - boot["relu"][m][:, -1]
        lin = next(r for r in cells["linear"] if r["width"] == m and r["depth"] == deep)
        rel = next(r for r in cells["relu"] if r["width"] == m and r["depth"] == deep)
        lo, hi = np.percentile(d, [2.5, 97.5])
        parts.append(direction_claim((float(lo), float(hi)), null=0.0, direction="greater",
                                     estimate=lin["log_median"] - rel["log_median"]))
        labels.append(f"m={m} L={deep}")
    claims.append(Claim.judged(
        "linear_decays_slower_than_relu",
        f"at the critical variance the median forward factor of linear nets decays more slowly in depth than that of "
        f"ReLU nets (log-median difference at L = {deep} above 0 for every width)",
        paper="App. A.1 (Fig. 6): for linear networks vanishing happens just a bit slower",
        measured={f"m={m} [linear, relu, tanh]": [
            round(next(r["log_median"] for r in cells[f] if r["width"] == m and r["depth"] == deep), 3)
            for f in ("linear", "relu", "tanh")] for m in cfg.widths},
        verdict=all_of(parts, labels)))
    _figure(cfg, cells, store)
    store.write_arrays("factors", **{f"{fam}_m{m}_{kind}": data[fam][m][kind] for fam in FAMILIES
                                     for m in cfg.widths for kind in ("forward", "backward")})
    return Result(claims=claims, metrics={"cells": cells})


def _ratio_claim(relu_cells: list[dict], cfg: InitVarianceConfig, boot: dict) -> Claim:
    """Is the optimal gain a function of m / L (the paper's reading of Fig. 20) or of m alone?

    For every pair of cells with the same ratio m / L (different m) and every pair with the same width m (different
    L) the gap |log g*_1 - log g*_2| is measured; the paper's statement predicts small gaps at equal ratio and, as
    the ratio then varies, large gaps at equal width. Holds iff the mean equal-ratio gap is below the mean
    equal-width gap (bootstrap CI of the difference below 0)."""
    by = {(r["width"], r["depth"]): r for r in relu_cells}
    k_of = {L: k for k, L in enumerate(cfg.depths)}
    same_ratio = [(a, b) for a in by for b in by if a < b and a[0] != b[0] and a[0] * b[1] == b[0] * a[1]]
    same_width = [(a, b) for a in by for b in by if a < b and a[0] == b[0]]
    text = ("the gain that keeps the median forward factor at one is a function of the width-to-depth ratio: cells "
            "with equal m / L have closer optimal gains than cells with equal width (ReLU, Gaussian weights; our "
            "reading of 'optimal')")
    paper = "§4, Fig. 20: the optimal initialization variance is a function of the width to depth ratio"
    if not same_ratio or not same_width:
        return Claim.judged("optimal_gain_function_of_width_to_depth", text, paper=paper, measured=None,
                            verdict=Verdict(None, "untestable here: the grid has no two cells with equal m / L"))

    def log_gain(c, b=None):
        med = by[c]["log_median"] if b is None else boot["relu"][c[0]][b, k_of[c[1]]]
        return -med / c[1]

    def diff(b=None):
        gr = np.mean([abs(log_gain(a, b) - log_gain(c, b)) for a, c in same_ratio])
        gw = np.mean([abs(log_gain(a, b) - log_gain(c, b)) for a, c in same_width])
        return float(gr - gw), float(gr), float(gw)

    est, gr, gw = diff()
    lo, hi = np.percentile([diff(b)[0] for b in range(cfg.n_boot)], [2.5, 97.5])
    return Claim.judged(
        "optimal_gain_function_of_width_to_depth", text, paper=paper,
        measured={"mean_gap_equal_ratio": round(gr, 5), "mean_gap_equal_width": round(gw, 5),
                  "equal_ratio_pairs": [[list(a), list(b)] for a, b in same_ratio],
                  "log_gain_by_cell": {f"m={r['width']} L={r['depth']}": round(math.log(r["gain"]), 5)
                                       for r in relu_cells}},
        verdict=direction_claim((float(lo), float(hi)), null=0.0, direction="less", estimate=est))


def _figure(cfg: InitVarianceConfig, cells: dict, store: RunStore) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), layout="constrained")
    for i, fam in enumerate(("linear", "relu", "relu_orthogonal", "linear_orthogonal", "tanh")):
        for j, m in enumerate(cfg.widths):
            rs = [r for r in cells[fam] if r["width"] == m]
            x = [r["depth"] / m for r in rs]
            axes[0].plot(x, [r["log_median"] for r in rs], "o-", color=f"C{i}", alpha=0.4 + 0.6 * j / len(cfg.widths),
                         ms=3, label=f"{fam} m={m}")
            if "predicted_log_median" in rs[0]:
                axes[0].plot(x, [r["predicted_log_median"] for r in rs], ":", color=f"C{i}", lw=1)
    axes[0].set_xlabel("depth / width")
    axes[0].set_ylabel("log median ||x_L||^2 / ||x_0||^2 (dotted: theory)")
    axes[0].set_title("median forward factor at the critical variance", fontsize=10)
    axes[0].legend(fontsize=5, ncol=2)
    for j, m in enumerate(cfg.widths):
        rs = [r for r in cells["relu"] if r["width"] == m]
        axes[1].errorbar([r["depth"] for r in rs], [r["gain"] for r in rs],
                         yerr=[[r["gain"] - r["gain_ci"][0] for r in rs], [r["gain_ci"][1] - r["gain"] for r in rs]],
                         fmt="o-", ms=3, color=f"C{j}", label=f"m={m} measured")
        axes[1].plot([r["depth"] for r in rs], [r["predicted_gain"] for r in rs], "--", color=f"C{j}", lw=1)
    axes[1].axhline(1.0, color="k", lw=0.8, label="He (gain 1)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("depth L")
    axes[1].set_ylabel("optimal gain g* (sigma^2 = g* 2/m)")
    axes[1].set_title("ReLU: variance keeping the median at one (dashed: theory)", fontsize=10)
    axes[1].legend(fontsize=6)
    for j, m in enumerate(cfg.widths):
        rs = [r for r in cells["relu"] if r["width"] == m]
        axes[2].plot([r["depth"] for r in rs], [r["backward_log_median"] for r in rs], "o-", color=f"C{j}", ms=3,
                     label=f"relu m={m} backward")
        rs = [r for r in cells["relu"] if r["width"] == m]
        axes[2].plot([r["depth"] for r in rs], [r["log_median"] for r in rs], "x--", color=f"C{j}", ms=3,
                     label=f"relu m={m} forward")
    axes[2].set_xlabel("depth L")
    axes[2].set_ylabel("log median factor")
    axes[2].set_title("forward vs backward (gradient) factor, He", fontsize=10)
    axes[2].legend(fontsize=6)
    store.save_figure(fig, "init_variance")
