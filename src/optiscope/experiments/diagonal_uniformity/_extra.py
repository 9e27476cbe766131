"""Helpers of the R_med experiments ``rmed_restart``, ``rmed_init_gain``, ``rmed_adagrad_init``, ``rmed_lm_large_wd``
and ``rmed_hessian_structure`` (Jiang, Malik, Li 2023, Fig. 1(a), §3.1, App. A.1, A.5, A.7, E), on top of
:mod:`optiscope.experiments.diagonal_uniformity.common` (imported, not copied):

* :func:`reinit_weights_`: PyTorch's Xavier initialisation with a ``gain`` (Jiang et al. 2023, §3.1, App. A.1);
* :class:`SnapshotProbe` and :func:`match_loss`: the iterate of a trajectory whose whole-training-set loss is
  nearest to a target, found step by step (the equal-loss pairing of App. A.3, to one step instead of one
  recording interval), with its parameters;
* :func:`restart`: a fresh optimizer from given parameters (Fig. 1(a));
* :class:`BlockDominanceProbe`: diagonal dominance of the exact Hessian block ``H[I, I]`` over sampled coordinates
  of a few chosen layers (App. E, Fig. 14);
* :class:`SingularVectorProbe`: R_u of the leading left and right singular vectors and the effective rank of every
  weight matrix (§6, App. A.5);
* :func:`layer_block_spectrum`: the exact eigenvalues of the Hessian block of one parameter tensor, its top
  eigenvalue (smoothness) and condition number (§3.1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

# ----------------------------------------------------------------------------------------------------------------
# initialisation with a gain (§3.1, App. A.1)
# ----------------------------------------------------------------------------------------------------------------
INIT_DISTS = ("uniform", "normal")


@torch.no_grad()
def reinit_weights_(model: torch.nn.Module, dist: str, gain: float, seed: int,
                    names: Sequence[str] | None = None) -> list[str]:
    r"""Re-draw the weight matrices of ``model`` with PyTorch's Xavier initialisation times ``gain`` (Jiang et al.
    2023, §3.1: "default initialization in Pytorch but chose a large gain", the gain of e.g.
    ``torch.nn.init.xavier_uniform_``; App. A.1: "normal and uniform ... different gains"):

    .. math:: \text{uniform: } W_{ij} \sim U[-a, a],\ a = g\sqrt{6/(n_\text{in} + n_\text{out})};\qquad
              \text{normal: } W_{ij} \sim N(0, g^2 \cdot 2/(n_\text{in} + n_\text{out})).

    ``names``: the parameters to re-draw (default: every 2-D weight of a ``Linear`` layer and the attention input
    projection, i.e. every trainable 2-D parameter except embeddings and positional embeddings, which keep the
    model's own init). Biases and LayerNorm parameters are unchanged. Draws come from a generator seeded by
    ``seed`` (the global RNG is untouched). Returns the re-drawn names.
    """
    if dist not in INIT_DISTS:
        raise ValueError(f"dist must be one of {INIT_DISTS}, got {dist!r}")
    if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be a finite number > 0, got {gain!r}")
    params = dict(model.named_parameters())
    if names is None:
        skip = {f"{m_name}.weight" if m_name else "weight" for m_name, m in model.named_modules()
                if isinstance(m, torch.nn.Embedding)}
        names = [n for n, p in params.items() if p.ndim == 2 and p.requires_grad and n not in skip and n != "pos"]
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    for n in names:
        p = params[n]
        w = torch.empty(p.shape, dtype=torch.float64)
        (torch.nn.init.xavier_uniform_ if dist == "uniform" else torch.nn.init.xavier_normal_)(
            w, gain=float(gain), generator=g)
        p.copy_(w.to(dtype=p.dtype, device=p.device))
    return list(names)


# ----------------------------------------------------------------------------------------------------------------
# snapshots, equal-loss matching to one step, restarts (Fig. 1(a), App. A.3)
# ----------------------------------------------------------------------------------------------------------------
class SnapshotProbe:
    """A probe that records nothing and keeps a copy of the model's ``state_dict`` at the given steps
    (``snapshots[step]``), so that an iterate found by its loss can be restarted from."""

    name = "snapshot"

    def __init__(self, steps: Sequence[int]):
        self.steps = frozenset(int(s) for s in steps)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, problem, state) -> dict:
        if state.step in self.steps:
            self.snapshots[state.step] = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        return {}


def loss_series(metrics: pd.DataFrame, metric: str = "loss") -> pd.Series:
    """``step -> value`` of a global metric of one run's tidy metrics (finite values only, sorted by step)."""
    d = metrics[(metrics["metric"] == metric) & (metrics["layer"] == "")]
    s = d.groupby("step")["value"].mean().sort_index()
    return s[np.isfinite(s.to_numpy())]


@dataclass
class Iterate:
    """One iterate of a trajectory: its step, whole-training-set loss and parameters (``state_dict``)."""

    step: int
    loss: float
    state: dict[str, torch.Tensor]


def train(problem, spec: Any, init: torch.nn.Module, steps: int, *, data_seed: int, seed: int, batch_size: int,
          loss_every: int = 0, snapshot_steps: Sequence[int] = (), probe_steps: Sequence[int] = (),
          extra_probes: Sequence[Any] = ()) -> tuple[Any, SnapshotProbe]:
    """One :class:`optiscope.lab.Run` of ``spec`` from a deep copy of ``init``: training loss on the whole training
    set every ``loss_every`` steps and at ``probe_steps``, parameter snapshots at ``snapshot_steps``. Returns the
    :class:`~optiscope.lab.RunResult` and the snapshot probe."""
    from optiscope.lab import Run

    snap = SnapshotProbe(snapshot_steps)
    steps_probed = sorted({int(s) for s in (*probe_steps, *snapshot_steps) if 0 <= int(s) <= steps})
    res = Run(problem, spec, int(steps), batch_size=batch_size, probe_every=int(loss_every),
              probe_steps=steps_probed, probes=["loss:on=train", snap, *extra_probes], seed=seed,
              data_seed=data_seed, checkpoint=False, model=copy.deepcopy(init)).execute()
    return res, snap


def match_loss(problem, spec: Any, init: torch.nn.Module, curve: pd.Series, target: float, *, data_seed: int,
               seed: int, batch_size: int) -> Iterate | None:
    """The iterate of the trajectory of ``spec`` from ``init`` (data order ``data_seed``) whose whole-training-set
    loss is nearest to ``target``, around the first recorded step at which ``curve`` (that trajectory's recorded
    loss) reaches ``target`` (Jiang et al. 2023, App. A.3: iterates "that have the same training loss").

    The trajectory is re-run (training is deterministic given the seeds) with the loss measured at every step
    between the last recorded step above ``target`` and the first at or below it, so the mismatch is bounded by one
    step's loss change rather than one recording interval's. ``None`` when ``curve`` never reaches ``target``.
    """
    steps, vals = curve.index.to_numpy(), curve.to_numpy()
    hit = np.nonzero(vals <= target)[0]
    if hit.size == 0 or not math.isfinite(float(target)):
        return None
    j = int(hit[0])
    hi = int(steps[j])
    lo = int(steps[j - 1]) if j > 0 else hi
    window = list(range(lo, hi + 1))
    res, snap = train(problem, spec, init, hi, data_seed=data_seed, seed=seed, batch_size=batch_size,
                      snapshot_steps=window, probe_steps=window)
    s = loss_series(res.metrics)
    s = s[s.index.isin(window)]
    if s.empty:
        return None
    t = int((s - target).abs().idxmin())
    return Iterate(t, float(s[t]), snap.snapshots[t])


def restart(problem, spec: Any, init: torch.nn.Module, state: Mapping[str, torch.Tensor], steps: int, *,
            data_seed: int, seed: int, batch_size: int, loss_every: int) -> tuple[pd.Series, str]:
    """Train a fresh optimizer ``spec`` for ``steps`` steps from the parameters ``state`` (loaded into a copy of
    ``init``'s architecture); returns the whole-training-set loss curve and the run's status (Jiang et al. 2023,
    Fig. 1(a): "We then run SGD+M twice, once from [the Adam iterate] and once from [the SGD+M iterate]")."""
    model = copy.deepcopy(init)
    model.load_state_dict(dict(state))
    res, _ = train(problem, spec, model, steps, data_seed=data_seed, seed=seed, batch_size=batch_size,
                   loss_every=loss_every)
    return loss_series(res.metrics), res.status


# ----------------------------------------------------------------------------------------------------------------
# Hessian structure (App. E) and singular vectors (§6, App. A.5)
# ----------------------------------------------------------------------------------------------------------------
def spread_layers(names: Sequence[str], k: int = 4) -> list[str]:
    """``k`` names spread evenly over ``names`` (first and last included; all of them when there are at most
    ``k``), as the paper chose "4 layers (Layer #6, 12, 17 and 22)" of a deep model (App. E)."""
    names = list(names)
    if len(names) <= k:
        return names
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


class BlockDominanceProbe:
    """``block_dominance``: :func:`optiscope.metrics.diagonal_dominance` of the exact Hessian block ``H[I, I]`` whose
    coordinates ``I`` are ``per_layer`` sampled entries of each parameter in ``params`` together (Jiang et al. 2023,
    App. E, Fig. 14: "we chose 4 layers ... and computed the Hessians across these 4 layers ... by random
    sampling"). The coordinates are drawn once per run and reused. Records the mean and the median over i of
    ``sum_{j != i} |H_ij| / |H_ii|`` (``block_dominance_mean`` / ``_median``), the mass and Frobenius ratios and
    the HVPs spent (one per sampled coordinate)."""

    name = "block_dominance"

    def __init__(self, params: Sequence[str], per_layer: int = 50):
        if int(per_layer) < 1 or not params:
            raise ValueError(f"block_dominance: need per_layer >= 1 and at least one parameter, got "
                             f"{per_layer!r}, {params!r}")
        self.params, self.per_layer = list(params), int(per_layer)

    def __call__(self, problem, state) -> dict:
        from optiscope.metrics import diagonal_dominance

        block = state.hessian().diagonal_block(state.coordinates(self.per_layer, self.params))
        dd = diagonal_dominance(block.matrix.double().cpu().numpy())
        return {"block_dominance_mean": dd.mean, "block_dominance_median": dd.median,
                "block_dominance_mass": dd.mass, "block_dominance_frobenius": dd.frobenius,
                "block_dominance_n_hvp": float(block.n_hvp)}


class SingularVectorProbe:
    """``r_u_left`` / ``r_u_right`` / ``erank`` per weight matrix (2-D parameters; higher ones flattened to
    ``[out, -1]``): R_u of the leading left and right singular vectors
    (:func:`optiscope.metrics.singular_vector_uniformity`, Jiang et al. 2023, §6 (B), App. A.5) and the effective rank
    (:func:`optiscope.metrics.effective_rank`). For ``nn.Linear`` weights (``out x in``) the left side indexes the
    output units, as the hidden units of ``W1`` in the paper's two-layer network."""

    name = "singular_vectors"

    def __call__(self, problem, state) -> dict:
        from optiscope.metrics import effective_rank, singular_vector_uniformity

        left, right, er = {}, {}, {}
        for n, p in state.params().items():
            if p.ndim < 2:
                continue
            W = p.detach().double().cpu().reshape(p.shape[0], -1).numpy()
            left[n] = float(singular_vector_uniformity(W, "left"))
            right[n] = float(singular_vector_uniformity(W, "right"))
            er[n] = float(effective_rank(W))
        return {"r_u_left": left, "r_u_right": right, "erank": er}


@dataclass
class BlockSpectrum:
    """Exact spectrum of one parameter tensor's Hessian block: ``top`` (the smoothness of the block, largest
    eigenvalue), ``min_positive`` (smallest eigenvalue above ``tol * top``), ``condition`` (``top / min_positive``),
    ``n_below`` (eigenvalues at or below ``tol * top``, negative ones included), ``bottom`` (smallest eigenvalue)."""

    top: float
    min_positive: float
    condition: float
    n_below: int
    bottom: float
    n: int


def layer_block_spectrum(model: torch.nn.Module, loss_fn: Any, data: Any, name: str, tol: float = 1e-9,
                         max_dim: int = 4096) -> BlockSpectrum:
    r"""Exact eigenvalues of :math:`H_{\ell\ell} = \partial^2 L / \partial W_\ell^2`, the Hessian block of parameter
    ``name`` (all other parameters fixed), from its dense form (``Hessian(params=[name]).dense()``: one HVP per
    entry) in the model's dtype (use float64), and ``numpy.linalg.eigvalsh``.

    The smoothness of the block is :math:`\lambda_{\max}`; its condition number is
    :math:`\kappa = \lambda_{\max} / \lambda_{\min}^{+}` with :math:`\lambda_{\min}^{+}` the smallest eigenvalue
    above ``tol`` :math:`\cdot \lambda_{\max}` (eigenvalues at or below are zero up to round-off or negative: a
    non-convex block has no finite condition number otherwise), Jiang et al. 2023, §3.1 ("the smoothness parameter
    ... and the condition number ... of loss Hessian on one layer").
    """
    from optiscope.curvature import Hessian

    H = Hessian(model, loss_fn, data, params=[name])
    M = H.dense(max_dim=max_dim).double().cpu().numpy()
    H.release()
    ev = np.linalg.eigvalsh(0.5 * (M + M.T))
    top = float(ev[-1])
    pos = ev[ev > tol * top] if top > 0 else ev[:0]
    mn = float(pos[0]) if pos.size else float("nan")
    return BlockSpectrum(top, mn, top / mn if pos.size else float("nan"), int(ev.size - pos.size), float(ev[0]),
                         int(ev.size))


def log_ratio_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval over pairs of ``log10(a_k / b_k)`` (:func:`optiscope.metrics.verdicts.mean_ci`;
    pairs with a non-positive or non-finite member are left out)."""
    from optiscope.metrics.verdicts import mean_ci

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    return mean_ci(np.log10(a[ok] / b[ok]))


def jsonable(x: Any) -> float | None:
    """A float for results.json: ``None`` for NaN or infinity."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
