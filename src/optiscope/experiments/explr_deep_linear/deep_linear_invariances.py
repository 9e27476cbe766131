"""Two invariances the research notes lean on (after Li & Arora 2020, Arora et al. 2018/2019; "The Unreasonable
Effectiveness of Adam" and "Adam + Ratio"), measured on deep matrix completion.

**Adam is invariant to rescaling the gradients** ("if you multiply all the gradients by some constant, it won't
change the gradient/movement"). With the loss scaled by ``c > 0`` Adam's moments scale as ``m -> c m`` and
``v -> c^2 v``, so the update ``m_hat / (sqrt(v_hat) + eps)`` (Kingma & Ba 2015 and PyTorch, eps outside the root:
the default here) equals the update of the unscaled loss with ``eps / c``; with eps inside the root
(``m_hat / sqrt(v_hat + eps)``, Cattaneo et al. 2024) it is ``eps / c^2``: :func:`adam_equivalent_eps`. The trajectory is therefore identical up to the effect of eps. Measured on a depth-N
factorization of a low-rank matrix (the setup of Arora et al. 2019): the relative deviation of the end-to-end
trajectory from the ``c = 1`` run against c; the exact identity with ``eps -> eps_c``; and a linear-response
prediction of the deviation, ``|eps_c - eps| ||d W_t / d eps||`` (finite difference in eps), where it is small.
Control: GD is not invariant (a rescaled loss is a rescaled learning rate).

**The ratio penalty's gradient lies in the span of W** ("in both our penalty and the standard nuclear norm penalty,
the gradients lie in the span of W, which highly restricts the movement direction"). For a spectral penalty such as
``R(W) = ||W||_* / ||W||_F`` (:func:`optiscope.experiments.explr_deep_linear.matrix_completion.ratio_penalty`) the
gradient ``U V^T / ||W||_F - ||W||_* W / ||W||_F^3`` (:func:`ratio_penalty_gradient`) has the singular vectors of
W: in W's singular bases it is diagonal, and it has no component outside the row and column spans of a
rank-deficient W. Measured: the misaligned fraction of the gradient (:func:`misaligned_fraction`) at every iterate
of GD on the penalised completion loss; and the drift of W away from its initial singular bases
(:func:`singular_basis_drift`) under GD on the penalty alone, from a full-rank and from a rank-deficient start
(which then stays in its spans). Controls that leave the span: the entrywise analogue ``||W||_1 / ||W||_F``
(not spectral), Adam on the ratio penalty (per-coordinate steps: the notes' conjecture that the adaptive step
"relaxes the column space invariance"), and depth-2 GD from an unbalanced start (the notes: overparameterizing
"frees gradient descent from the span of W"; from a balanced start the span is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from optiscope.experiments.base import Claim, Result, experiment_device, register, require_device
from optiscope.experiments.explr_deep_linear.matrix_completion import (
    end_to_end,
    gd_step_size,
    ground_truth,
    init_factors,
    observation_mask,
)
from optiscope.lab.store import RunStore
from optiscope.metrics.verdicts import all_of, direction_claim, negative_control_claim, tolerance_claim
from optiscope.optim import make_optimizer
from optiscope.utils.config import Config, require
from optiscope.utils.plotting import plt
from optiscope.utils.progress import progress_task
from optiscope.utils.threads import limit_threads


@dataclass(frozen=True)
class DeepLinearInvariancesConfig(Config):
    """Configuration of ``deep_linear_invariances`` (research notes after Li & Arora 2020 and Arora et al. 2019): a
    ``size`` x ``size`` matrix of ``rank`` observed at ``n_observed`` entries. Adam study: a depth-``depth``
    factorization from ``init_scale`` trained ``steps`` steps by Adam (``adam_lr``, ``adam_eps``,
    ``eps_inside_sqrt``; default eps outside the root as in Kingma & Ba 2015) on the loss times each of ``scales``;
    ``fd_rel`` the relative eps step of the linear-response prediction, judged for the scales whose equivalent eps
    is at most ``response_eps_factor`` x eps (within ``response_tolerance`` in log); ``invariance_tol`` the
    deviation allowed when eps shrinks (c >= 1); GD control at ``gd_lr_factor`` / lambda_max over
    ``control_scales``. Span study: GD on the completion loss plus ``penalty_weight`` x ratio penalty for
    ``penalty_steps`` steps, and GD / Adam on the penalty alone (step ``penalty_lr`` x ||W||_F^2 for GD,
    ``adam_penalty_lr`` x rms(W) for Adam), from the zero-filled observations and from their rank-``span_rank``
    truncation; ``align_tol`` the misalignment allowed, ``leave_threshold`` the drift that counts as leaving;
    ``control_margin`` how much worse a control must be; ``device`` where the Adam study trains."""
    seed: int = 0
    size: int = 20
    rank: int = 2
    n_observed: int = 150
    depth: int = 2
    init_scale: float = 0.1
    steps: int = 300
    adam_lr: float = 1e-2
    adam_eps: float = 1e-8
    eps_inside_sqrt: bool = False          # Kingma & Ba 2015 (and torch.optim.Adam): eps outside the root
    scales: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 10.0, 100.0, 1e4)
    fd_rel: float = 1e-3
    response_eps_factor: float = 10.0
    response_tolerance: float = 0.25
    equivalence_tol: float = 1e-9
    invariance_tol: float = 1e-3
    gd_lr_factor: float = 0.5
    control_scales: tuple[float, ...] = (0.5, 2.0)
    penalty_weight: float = 1e-2
    penalty_steps: int = 200
    penalty_lr: float = 0.01
    adam_penalty_lr: float = 1e-3
    span_rank: int = 4
    align_tol: float = 1e-9
    leave_threshold: float = 1e-3
    control_margin: float = 100.0
    device: str = "cpu"

    def validate(self) -> None:
        require(self.size >= 4, "size", self.size, ">= 4")
        require(1 <= self.rank < self.size, "rank", self.rank, f"in [1, size={self.size})")
        require(1 <= self.n_observed <= self.size ** 2, "n_observed", self.n_observed, f"in [1, {self.size ** 2}]")
        require(self.depth >= 1, "depth", self.depth, ">= 1")
        for f in ("init_scale", "adam_lr", "fd_rel", "response_eps_factor", "response_tolerance",
                  "equivalence_tol", "invariance_tol", "gd_lr_factor", "penalty_weight", "penalty_lr",
                  "adam_penalty_lr", "align_tol", "leave_threshold"):
            v = getattr(self, f)
            require(math.isfinite(v) and v > 0, f, v, "a finite number > 0")
        require(self.adam_eps > 0, "adam_eps", self.adam_eps, "> 0 (the experiment measures its effect)")
        require(self.steps >= 2 and self.penalty_steps >= 2, "steps", self.steps, ">= 2 (and penalty_steps >= 2)")
        require(len(self.scales) >= 2 and all(c > 0 and c != 1 for c in self.scales), "scales", self.scales,
                "at least two scales, each > 0 and != 1")
        require(len(self.control_scales) >= 1 and all(c > 0 and c != 1 for c in self.control_scales),
                "control_scales", self.control_scales, "non-empty, each > 0 and != 1")
        require(1 <= self.span_rank < self.size, "span_rank", self.span_rank, f"in [1, size={self.size})")
        require(self.control_margin >= 1, "control_margin", self.control_margin, ">= 1")
        require_device(self.device)


QUICK = DeepLinearInvariancesConfig()
# full: the setup of Arora et al. 2019 (100 x 100, rank 5, 2000 entries, depth 3, init 1e-3); ten times the penalty
# steps on a 25x larger matrix accumulate float64 rounding in the drift (1e-11 after 200 steps at 20 x 20), hence
# the looser align_tol
FULL = DeepLinearInvariancesConfig(size=100, rank=5, n_observed=2000, depth=3, init_scale=1e-3, steps=3000,
                                   adam_lr=1e-3, penalty_steps=2000, span_rank=10, align_tol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# formulas
# ------------------------------------------------------------------------------------------------------------------
def adam_equivalent_eps(eps: float, scale: float, eps_inside_sqrt: bool = True) -> float:
    """The eps for which Adam on ``L`` takes the same steps as Adam with ``eps`` on ``c L`` (research notes after
    Li & Arora 2020, "Adam is scale-invariant"; update rule of Cattaneo et al. 2024, Def. 1.1):

    with ``g -> c g``, ``m -> c m``, ``v -> c^2 v``: ``c m / sqrt(c^2 v + eps) = m / sqrt(v + eps / c^2)``
    (eps inside the root) and ``c m / (c sqrt(v) + eps) = m / (sqrt(v) + eps / c)`` (PyTorch, eps outside).
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return eps / scale ** 2 if eps_inside_sqrt else eps / scale


def ratio_penalty_gradient(W: np.ndarray, rank_tol: float = 1e-10) -> np.ndarray:
    """Gradient of the research notes' ratio penalty ``R(W) = ||W||_* / ||W||_F`` (research notes after Arora et al.
    2019, "Adam + Ratio"; :func:`optiscope.experiments.explr_deep_linear.matrix_completion.ratio_penalty`)::

        grad R(W) = U_r V_r^T / ||W||_F - ||W||_* W / ||W||_F^3

    with the thin SVD ``W = U_r S_r V_r^T`` over the ``r`` singular values above ``rank_tol * sigma_1``. At a
    rank-deficient W the nuclear norm is not differentiable; ``U_r V_r^T`` is its minimal-norm subgradient (the
    one in the span of W; autograd through ``svdvals`` returns another one, ``U V^T`` over all singular vectors).
    """
    W = np.asarray(W, dtype=np.float64)
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    r = int(np.sum(s > rank_tol * s[0]))
    fro = math.sqrt(float(np.sum(s ** 2)))
    nuc = float(np.sum(s[:r]))
    return U[:, :r] @ Vt[:r] / fro - nuc * W / fro ** 3


def nuclear_norm_gradient(W: np.ndarray, rank_tol: float = 1e-10) -> np.ndarray:
    """``U_r V_r^T``: the gradient of ``||W||_*`` at full rank, its minimal-norm subgradient otherwise (Arora et al. 2019
    baseline penalty; singular values above ``rank_tol * sigma_1``)."""
    U, s, Vt = np.linalg.svd(np.asarray(W, dtype=np.float64), full_matrices=False)
    r = int(np.sum(s > rank_tol * s[0]))
    return U[:, :r] @ Vt[:r]


def entrywise_ratio_gradient(W: np.ndarray) -> np.ndarray:
    """Gradient of the entrywise analogue ``||vec W||_1 / ||W||_F`` of the ratio penalty (a scale-invariant penalty that
    is not spectral; the control): ``sign(W) / ||W||_F - ||vec W||_1 W / ||W||_F^3``."""
    W = np.asarray(W, dtype=np.float64)
    fro = float(np.linalg.norm(W))
    return np.sign(W) / fro - float(np.abs(W).sum()) * W / fro ** 3


def misaligned_fraction(W: np.ndarray, G: np.ndarray, rank_tol: float = 1e-10) -> float:
    """How far ``G`` is from sharing W's singular vectors (research notes: "the gradients lie in the span of W"):
    with the full SVD ``W = U S V^T`` of numerical rank r (``sigma > rank_tol sigma_1``) and ``A = U^T G V``,

    ``||A - D_r(A)||_F / ||A||_F``,  ``D_r(A)`` = the diagonal entries ``A_ii``, ``i < r``.

    Zero iff ``G = U_r diag(a) V_r^T``: diagonal in W's singular bases and zero outside the row and column spans
    of W (its null-space blocks count as misaligned); ``nan`` for ``G = 0``. For W with repeated singular values
    the bases inside a repeated block are arbitrary; the measure assumes distinct nonzero singular values (true for
    generic W)."""
    W = np.asarray(W, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    U, s, Vt = np.linalg.svd(W)
    r = int(np.sum(s > rank_tol * s[0]))
    A = U.T @ G @ Vt.T
    D = np.zeros_like(A)
    idx = np.arange(r)
    D[idx, idx] = A[idx, idx]
    norm = float(np.linalg.norm(A))
    return float(np.linalg.norm(A - D)) / norm if norm > 0 else float("nan")


def singular_basis_drift(W: np.ndarray, U0: np.ndarray, V0: np.ndarray, rank: int) -> float:
    """How far ``W`` has moved away from the singular bases ``U0, V0`` (full, orthogonal) of a starting point of rank
    ``rank``: ``||B - D_rank(B)||_F / ||B||_F`` with ``B = U0^T W V0`` (the diagonal entries ``i < rank`` kept). Zero
    iff ``W = U0_r diag(b) V0_r^T``: the same singular vectors as the start and inside its row/column spans."""
    B = U0.T @ np.asarray(W, dtype=np.float64) @ V0
    D = np.zeros_like(B)
    idx = np.arange(rank)
    D[idx, idx] = B[idx, idx]
    norm = float(np.linalg.norm(B))
    return float(np.linalg.norm(B - D)) / norm if norm > 0 else 0.0


def trajectory_deviation(traj: np.ndarray, ref: np.ndarray) -> float:
    """``max_t ||W_t - W_t^ref||_F / max_t ||W_t^ref||_F`` over two trajectories of equal length (inf if non-finite)."""
    if not (np.all(np.isfinite(traj)) and np.all(np.isfinite(ref))):
        return math.inf
    d = np.sqrt(((traj - ref) ** 2).sum(axis=(-2, -1))).max()
    return float(d / np.sqrt((ref ** 2).sum(axis=(-2, -1))).max())


# ------------------------------------------------------------------------------------------------------------------
# the problem and the runs
# ------------------------------------------------------------------------------------------------------------------
def _problem(config: DeepLinearInvariancesConfig):
    g = torch.Generator().manual_seed(config.seed)
    W_star = ground_truth(config.size, config.rank, g)
    mask = observation_mask(config.size, config.n_observed, g)
    factors = init_factors(config.depth, config.size, config.init_scale, 1, g, torch.float64)
    return W_star, mask, [f[0] for f in factors]


def adam_trajectory(factors0: list[torch.Tensor], W_star: torch.Tensor, mask: torch.Tensor, scale: float,
                    optimizer: tuple[str, dict], steps: int, device: torch.device) -> np.ndarray:
    """End-to-end matrices ``W_e(t)``, t = 0..steps, of a factorization trained by ``optimizer`` on
    ``scale * (1/|Omega|) sum_Omega ((W_e)_ij - W*_ij)^2`` (float64). Returns an array (steps + 1, n, n)."""
    params = [f.detach().clone().to(device).requires_grad_(True) for f in factors0]
    target = W_star.to(device)
    m = mask.to(device)
    n_obs = float(mask.sum())
    opt = make_optimizer(optimizer, params)
    out = np.empty((steps + 1, *W_star.shape))

    def e2e() -> torch.Tensor:
        return end_to_end([p[None] for p in params])[0]

    with torch.no_grad():
        out[0] = e2e().cpu().numpy()
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        W = e2e()
        loss = scale * (((W - target) * m) ** 2).sum() / n_obs
        loss.backward()
        opt.step()
        with torch.no_grad():
            out[t] = e2e().cpu().numpy()
    return out


def _adam_spec(config: DeepLinearInvariancesConfig, eps: float) -> tuple[str, dict]:
    return ("adam", {"lr": config.adam_lr, "eps": eps, "eps_inside_sqrt": config.eps_inside_sqrt})


def adam_study(config: DeepLinearInvariancesConfig, task) -> dict:
    """Adam on the loss times c vs c = 1, vs the eps-equivalent run, and the linear-response prediction; GD control."""
    W_star, mask, f0 = _problem(config)
    dev = experiment_device(config)
    eps = config.adam_eps
    ref = adam_trajectory(f0, W_star, mask, 1.0, _adam_spec(config, eps), config.steps, dev)
    h = config.fd_rel * eps
    fd = adam_trajectory(f0, W_star, mask, 1.0, _adam_spec(config, eps + h), config.steps, dev)
    sens = (fd - ref) / h                                           # d W_t / d eps
    ref_norm = float(np.sqrt((ref ** 2).sum(axis=(-2, -1))).max())
    sens_norm = float(np.sqrt((sens ** 2).sum(axis=(-2, -1))).max())
    task.advance()
    rows = []
    for c in config.scales:
        eps_c = adam_equivalent_eps(eps, c, config.eps_inside_sqrt)
        scaled = adam_trajectory(f0, W_star, mask, c, _adam_spec(config, eps), config.steps, dev)
        equiv = adam_trajectory(f0, W_star, mask, 1.0, _adam_spec(config, eps_c), config.steps, dev)
        rows.append({"scale": c, "equivalent_eps": eps_c, "deviation": trajectory_deviation(scaled, ref),
                     "deviation_from_equivalent": trajectory_deviation(scaled, equiv),
                     "predicted_deviation": abs(eps_c - eps) * sens_norm / ref_norm})
        task.advance()
    lr_gd = gd_step_size(W_star, mask, config.depth, config.gd_lr_factor)
    gd_ref = adam_trajectory(f0, W_star, mask, 1.0, ("sgd", {"lr": lr_gd}), config.steps, dev)
    gd_rows = []
    for c in config.control_scales:
        gd = adam_trajectory(f0, W_star, mask, c, ("sgd", {"lr": lr_gd}), config.steps, dev)
        sc = adam_trajectory(f0, W_star, mask, c, _adam_spec(config, eps), config.steps, dev)
        gd_rows.append({"scale": c, "gd_deviation": trajectory_deviation(gd, gd_ref),
                        "adam_deviation": trajectory_deviation(sc, ref)})
    task.advance()
    loss_ref = float((((torch.as_tensor(ref[-1]) - W_star) * mask) ** 2).sum() / mask.sum())
    loss_0 = float((((torch.as_tensor(ref[0]) - W_star) * mask) ** 2).sum() / mask.sum())
    return {"rows": rows, "gd_control": gd_rows, "gd_lr": lr_gd, "train_loss_start": loss_0,
            "train_loss_end_adam": loss_ref, "eps_sensitivity": sens_norm / ref_norm}


def _gd(W0: np.ndarray, grad, lr: float, steps: int) -> list[np.ndarray]:
    W = np.array(W0, dtype=np.float64)
    out = [W.copy()]
    for _ in range(steps):
        W = W - lr * grad(W)
        out.append(W.copy())
    return out


def _adam_numpy(W0: np.ndarray, grad, lr: float, steps: int, betas=(0.9, 0.999), eps: float = 1e-16
                ) -> list[np.ndarray]:
    """Adam (Cattaneo et al. 2024, Def. 1.1, eps inside the root, bias-corrected) on a numpy matrix."""
    W = np.array(W0, dtype=np.float64)
    m = np.zeros_like(W)
    v = np.zeros_like(W)
    out = [W.copy()]
    for n in range(steps):
        g = grad(W)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        W = W - lr * (m / (1 - betas[0] ** (n + 1))) / np.sqrt(v / (1 - betas[1] ** (n + 1)) + eps)
        out.append(W.copy())
    return out


def _depth2_gd(A0: np.ndarray, B0: np.ndarray, lr: float, steps: int) -> list[np.ndarray]:
    """GD on ``R(A B)`` over the factors (``grad_A = G B^T``, ``grad_B = A^T G``, G the ratio gradient)."""
    A, B = np.array(A0, dtype=np.float64), np.array(B0, dtype=np.float64)
    out = [A @ B]
    for _ in range(steps):
        G = ratio_penalty_gradient(A @ B)
        A, B = A - lr * G @ B.T, B - lr * A.T @ G
        out.append(A @ B)
    return out


def span_study(config: DeepLinearInvariancesConfig, task) -> dict:
    """Alignment of the penalty gradients along GD on the penalised completion loss, and basis drift of GD / Adam /
    depth-2 GD on the penalty alone from a full-rank and a rank-deficient start."""
    g = torch.Generator().manual_seed(config.seed)
    W_star = ground_truth(config.size, config.rank, g).numpy()
    mask = observation_mask(config.size, config.n_observed, g).numpy().astype(np.float64)
    n_obs = float(mask.sum())
    W_obs = W_star * mask                                   # the notes' start: the observed entries, zeros elsewhere
    lam = config.penalty_weight

    def data_grad(W):
        return 2.0 * (W - W_star) * mask / n_obs

    # GD on the penalised completion loss; the penalty's gradients at its iterates
    lr_data = 0.5 * n_obs / 2.0
    traj = _gd(W_obs, lambda W: data_grad(W) + lam * ratio_penalty_gradient(W), lr_data, config.penalty_steps)
    mis_ratio = [misaligned_fraction(W, ratio_penalty_gradient(W)) for W in traj]
    mis_nuc = [misaligned_fraction(W, nuclear_norm_gradient(W)) for W in traj]
    mis_l1 = [misaligned_fraction(W, entrywise_ratio_gradient(W)) for W in traj]
    mis_data = [misaligned_fraction(W, data_grad(W)) for W in traj]
    task.advance()
    out: dict = {"completion_gd": {"lr": lr_data, "penalty_weight": lam,
                                   "max_misaligned_ratio": float(np.nanmax(mis_ratio)),
                                   "max_misaligned_nuclear": float(np.nanmax(mis_nuc)),
                                   "min_misaligned_entrywise": float(np.nanmin(mis_l1)),
                                   "min_misaligned_data": float(np.nanmin(mis_data)),
                                   "final_reconstruction_error": float(np.mean((traj[-1] - W_star) ** 2))}}
    arrays = {"misaligned_ratio": mis_ratio, "misaligned_nuclear": mis_nuc, "misaligned_entrywise": mis_l1,
              "misaligned_data": mis_data}
    # penalty alone, from the full-rank start and from its rank-k truncation
    U, s, Vt = np.linalg.svd(W_obs)
    k = config.span_rank
    starts = {"full_rank": (W_obs, int(np.sum(s > 1e-10 * s[0]))),
              "rank_deficient": (U[:, :k] * s[:k] @ Vt[:k], k)}
    runs: dict = {}
    for name, (W0, r0) in starts.items():
        U0, _, V0t = np.linalg.svd(W0)
        fro2 = float(np.sum(W0 ** 2))
        rms = math.sqrt(fro2 / W0.size)
        gd = _gd(W0, ratio_penalty_gradient, config.penalty_lr * fro2, config.penalty_steps)
        l1 = _gd(W0, entrywise_ratio_gradient, config.penalty_lr * fro2, config.penalty_steps)
        ad = _adam_numpy(W0, ratio_penalty_gradient, config.adam_penalty_lr * rms, config.penalty_steps)

        def drift(tr, U0=U0, V0t=V0t, r0=r0):
            return [singular_basis_drift(W, U0, V0t.T, r0) for W in tr]

        runs[name] = {"rank": r0, "gd_ratio": drift(gd), "gd_entrywise": drift(l1), "adam_ratio": drift(ad),
                      "penalty_start": float(_ratio(W0)), "penalty_end_gd": float(_ratio(gd[-1])),
                      "penalty_end_adam": float(_ratio(ad[-1]))}
        task.advance()
    # depth 2 on the penalty alone from the full-rank start: balanced factors vs unbalanced ones (same W_e(0))
    W0 = W_obs
    U0, s0, V0t = np.linalg.svd(W0)
    r0 = int(np.sum(s0 > 1e-10 * s0[0]))
    fro = float(np.linalg.norm(W0))
    A_bal, B_bal = U0 * np.sqrt(s0), np.sqrt(s0)[:, None] * V0t
    rng = np.random.default_rng(config.seed + 1)
    Q = np.linalg.qr(rng.standard_normal((config.size, config.size)))[0]
    D = np.exp(rng.uniform(-1.0, 1.0, config.size))                 # unbalanced: A = A_bal Q D, B = D^-1 Q^T B_bal
    A_unb, B_unb = A_bal @ Q * D, (Q / D).T @ B_bal
    lr2 = config.penalty_lr * fro
    bal = _depth2_gd(A_bal, B_bal, lr2, config.penalty_steps)
    unb = _depth2_gd(A_unb, B_unb, lr2, config.penalty_steps)
    runs["depth2"] = {"balanced": [singular_basis_drift(W, U0, V0t.T, r0) for W in bal],
                      "unbalanced": [singular_basis_drift(W, U0, V0t.T, r0) for W in unb],
                      "start_difference": float(np.linalg.norm(A_unb @ B_unb - W0) / fro)}
    task.advance()
    out["penalty_only"] = runs
    out["_arrays"] = arrays
    return out


def _ratio(W: np.ndarray) -> float:
    s = np.linalg.svd(W, compute_uv=False)
    return float(s.sum() / math.sqrt(float(np.sum(s ** 2))))


# ------------------------------------------------------------------------------------------------------------------
# claims
# ------------------------------------------------------------------------------------------------------------------
def _adam_claims(config: DeepLinearInvariancesConfig, a: dict) -> list[Claim]:
    rows = a["rows"]
    conv = "inside" if config.eps_inside_sqrt else "outside"
    worst_eq = max(r["deviation_from_equivalent"] for r in rows)
    claims = [Claim.judged(
        "adam_rescaling_equals_eps_change",
        f"Adam on the loss times c takes the same steps as Adam on the loss with eps / c^{2 if config.eps_inside_sqrt else 1} "
        f"(eps {conv} the root), for every c (max relative trajectory deviation)",
        paper="Adam is invariant to multiplying the gradients by a constant (up to eps)",
        measured=f"{worst_eq:.3g} over c in {list(config.scales)}",
        verdict=tolerance_claim(worst_eq, 0.0, abs_tol=config.equivalence_tol))]
    big = [r for r in rows if r["scale"] >= 1]
    worst_inv = max((r["deviation"] for r in big), default=float("nan"))
    claims.append(Claim.judged(
        "adam_trajectory_invariant",
        f"Adam's trajectory on the loss times c >= 1 is the c = 1 trajectory up to {config.invariance_tol:g} "
        f"(relative; eps shrinks to eps_c <= eps)",
        paper="rescaling the gradients does not change Adam's movement",
        measured={f"c={r['scale']:g}": f"{r['deviation']:.3g}" for r in big},
        verdict=tolerance_claim(worst_inv, 0.0, abs_tol=config.invariance_tol,
                                premises=[(len(big) > 0, "no scale c > 1 in the sweep")])))
    lin = [r for r in rows if r["equivalent_eps"] <= config.response_eps_factor * config.adam_eps]
    errs = [abs(math.log(r["deviation"] / r["predicted_deviation"])) if r["deviation"] > 0 else math.inf
            for r in lin]
    worst = max(errs, default=float("nan"))
    claims.append(Claim.judged(
        "adam_deviation_is_the_eps_effect",
        f"the deviation from the c = 1 trajectory is the eps effect |eps_c - eps| ||dW/d eps|| (linear response, "
        f"judged where eps_c <= {config.response_eps_factor:g} eps; max |log(measured / predicted)|)",
        paper="identical up to eps",
        measured={f"c={r['scale']:g}": f"{r['deviation']:.3g} vs {r['predicted_deviation']:.3g}" for r in rows},
        verdict=tolerance_claim(worst, 0.0, abs_tol=config.response_tolerance, premises=[(
            len(lin) >= 2, f"only {len(lin)} scales have eps_c <= {config.response_eps_factor:g} eps")])))
    ctrl = a["gd_control"]
    e_adam = max(r["adam_deviation"] for r in ctrl)
    e_gd = min(r["gd_deviation"] for r in ctrl)
    claims.append(Claim.judged(
        "control_gd_not_invariant",
        f"negative control: GD on the loss times c (c in {list(config.control_scales)}) departs from its c = 1 "
        f"trajectory at least {config.control_margin:g}x more than Adam does",
        paper="the invariance is Adam's (GD's step scales with c)",
        measured=f"GD min deviation {e_gd:.3g} vs Adam max {e_adam:.3g}",
        verdict=negative_control_claim(e_adam, e_gd, margin=config.control_margin)))
    return claims


def _span_claims(config: DeepLinearInvariancesConfig, s: dict) -> list[Claim]:
    cg = s["completion_gd"]
    tol, leave = config.align_tol, config.leave_threshold
    claims = [Claim.judged(
        "ratio_gradient_in_span_along_gd",
        f"at every iterate of GD on the completion loss + {cg['penalty_weight']:g} x ratio penalty, the ratio "
        f"penalty's gradient (and the nuclear norm's) has W's singular vectors: diagonal in W's singular bases, no "
        f"component outside its spans (max misaligned fraction over {config.penalty_steps + 1} iterates)",
        paper="the gradients of our penalty and of the nuclear norm lie in the span of W",
        measured=f"ratio {cg['max_misaligned_ratio']:.3g}, nuclear {cg['max_misaligned_nuclear']:.3g}",
        verdict=all_of([tolerance_claim(cg["max_misaligned_ratio"], 0.0, abs_tol=tol),
                        tolerance_claim(cg["max_misaligned_nuclear"], 0.0, abs_tol=tol)], ["ratio", "nuclear"]))]
    po = s["penalty_only"]
    fr, rd = po["full_rank"], po["rank_deficient"]
    claims.append(Claim.judged(
        "gd_on_penalty_keeps_singular_vectors",
        f"GD on the ratio penalty alone never leaves the singular bases of its start: from the zero-filled "
        f"observations (rank {fr['rank']}) and from their rank-{rd['rank']} truncation, which stays inside its "
        f"row/column spans (max drift over {config.penalty_steps} steps)",
        paper="movement restricted to the span of W",
        measured=f"full rank {max(fr['gd_ratio']):.3g}, rank {rd['rank']} {max(rd['gd_ratio']):.3g} (penalty "
                 f"{fr['penalty_start']:.3g} -> {fr['penalty_end_gd']:.3g})",
        verdict=all_of([tolerance_claim(max(fr["gd_ratio"]), 0.0, abs_tol=tol),
                        tolerance_claim(max(rd["gd_ratio"]), 0.0, abs_tol=tol)], ["full rank", "rank deficient"])))
    claims.append(Claim.judged(
        "control_entrywise_penalty_leaves_span",
        f"negative control: the entrywise ratio ||W||_1 / ||W||_F (not spectral) has gradients at least "
        f"{config.control_margin:g}x more misaligned than the ratio penalty at the same iterates, and GD on it "
        f"leaves the start's singular bases (drift > {leave:g})",
        paper="the span property is the spectral penalty's (a control that must leave)",
        measured=f"misaligned {cg['min_misaligned_entrywise']:.3g} (data-fit gradient {cg['min_misaligned_data']:.3g});"
                 f" drift {fr['gd_entrywise'][-1]:.3g} / {rd['gd_entrywise'][-1]:.3g}",
        verdict=all_of([negative_control_claim(cg["max_misaligned_ratio"], cg["min_misaligned_entrywise"],
                                               margin=config.control_margin),
                        direction_claim((min(fr["gd_entrywise"][-1], rd["gd_entrywise"][-1]),) * 2, null=leave)],
                       ["gradients", "trajectory"])))
    ad = min(fr["adam_ratio"][-1], rd["adam_ratio"][-1])
    claims.append(Claim.judged(
        "adam_leaves_span",
        f"Adam on the same ratio penalty leaves the singular bases of its start (drift after {config.penalty_steps} "
        f"steps > {leave:g}, from both starts)",
        paper="conjecture: the adaptive step relaxes the column-space invariance (why Adam + penalty can recover)",
        measured=f"full rank {fr['adam_ratio'][-1]:.3g}, rank {rd['rank']} {rd['adam_ratio'][-1]:.3g}",
        verdict=direction_claim((ad, ad), null=leave)))
    d2 = po["depth2"]
    claims.append(Claim.judged(
        "depth_frees_gd_from_span",
        f"depth-2 GD on the ratio penalty leaves the singular bases of W_e(0) from unbalanced factors (drift > "
        f"{leave:g}) and keeps them from balanced factors (drift <= {tol:g})",
        paper="overparameterizing breaks the linearity, freeing gradient descent from the span of W",
        measured=f"unbalanced {d2['unbalanced'][-1]:.3g}, balanced {max(d2['balanced']):.3g}",
        verdict=all_of([direction_claim((d2["unbalanced"][-1],) * 2, null=leave),
                        tolerance_claim(max(d2["balanced"]), 0.0, abs_tol=tol)], ["unbalanced", "balanced"])))
    return claims


@register("deep_linear_invariances", paper="003",
          title="Adam's invariance to gradient rescaling; the ratio penalty's gradients stay in span(W) under GD",
          config=DeepLinearInvariancesConfig, presets={"quick": QUICK, "full": FULL})
def run(config: DeepLinearInvariancesConfig, store: RunStore) -> Result:
    """Research notes after Li & Arora 2020 / Arora et al. 2019: Adam's rescaling invariance and the span property."""
    with limit_threads(1), progress_task("deep_linear_invariances", len(config.scales) + 6) as task:
        a = adam_study(config, task)
        s = span_study(config, task)
    arrays = s.pop("_arrays")
    metrics = {"adam": a, "span": {"completion_gd": s["completion_gd"],
                                   "penalty_only": {k: {kk: (vv[-1] if isinstance(vv, list) else vv)
                                                        for kk, vv in v.items()}
                                                    for k, v in s["penalty_only"].items()}}}
    claims = _adam_claims(config, a) + _span_claims(config, s)
    po = s["penalty_only"]
    store.write_arrays("span", **{k: np.asarray(v) for k, v in arrays.items()},
                       drift_gd_full=po["full_rank"]["gd_ratio"], drift_adam_full=po["full_rank"]["adam_ratio"],
                       drift_entrywise_full=po["full_rank"]["gd_entrywise"],
                       drift_gd_deficient=po["rank_deficient"]["gd_ratio"],
                       drift_adam_deficient=po["rank_deficient"]["adam_ratio"],
                       drift_depth2_balanced=po["depth2"]["balanced"],
                       drift_depth2_unbalanced=po["depth2"]["unbalanced"])
    _figure(store, config, a, s, arrays)
    return Result(claims=claims, metrics=metrics)


def _figure(store: RunStore, config: DeepLinearInvariancesConfig, a: dict, s: dict, arrays: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), layout="constrained")
    ax = axes[0]
    c = np.array([r["scale"] for r in a["rows"]])
    floor = 1e-17
    ax.loglog(c, [max(r["deviation"], floor) for r in a["rows"]], "ko-", label="Adam: loss x c vs c = 1")
    ax.loglog(c, [max(r["predicted_deviation"], floor) for r in a["rows"]], "r--", label="eps effect (linear response)")
    ax.loglog(c, [max(r["deviation_from_equivalent"], floor) for r in a["rows"]], "g^:",
              label="Adam: loss x c vs eps_c")
    cc = [r["scale"] for r in a["gd_control"]]
    ax.loglog(cc, [max(r["gd_deviation"], floor) for r in a["gd_control"]], "bs", label="GD: loss x c (control)")
    ax.set_xlabel("loss scale c")
    ax.set_ylabel("relative trajectory deviation")
    ax.set_title(f"depth {config.depth}, {config.size}x{config.size}, rank {config.rank}")
    ax.legend(fontsize=7)
    ax = axes[1]
    t = np.arange(len(arrays["misaligned_ratio"]))
    for key, label in (("misaligned_ratio", "ratio penalty"), ("misaligned_nuclear", "nuclear norm"),
                       ("misaligned_entrywise", "entrywise ratio (control)"), ("misaligned_data", "data fit")):
        ax.semilogy(t, np.maximum(arrays[key], floor), label=label)
    ax.set_xlabel("GD step (completion loss + penalty)")
    ax.set_ylabel("misaligned fraction of the gradient")
    ax.legend(fontsize=7)
    ax = axes[2]
    po = s["penalty_only"]
    for series, label in ((po["full_rank"]["gd_ratio"], "GD, full-rank start"),
                          (po["rank_deficient"]["gd_ratio"], f"GD, rank-{config.span_rank} start"),
                          (po["full_rank"]["adam_ratio"], "Adam, full-rank start"),
                          (po["rank_deficient"]["adam_ratio"], f"Adam, rank-{config.span_rank} start"),
                          (po["full_rank"]["gd_entrywise"], "GD on entrywise ratio"),
                          (po["depth2"]["balanced"], "depth-2 GD, balanced"),
                          (po["depth2"]["unbalanced"], "depth-2 GD, unbalanced")):
        ax.semilogy(np.arange(len(series)), np.maximum(series, floor), label=label)
    ax.set_xlabel("step (penalty alone)")
    ax.set_ylabel("drift from the start's singular bases")
    ax.legend(fontsize=7)
    store.save_figure(fig, "invariances")
