"""Scale-invariance diagnostics for a model's parameter groups (Li & Arora 2020, "Exponential Learning Rates", Lemma 1).

A loss is scale-invariant in a parameter group ``theta_g`` if ``L(.., c theta_g, ..) = L(.., theta_g, ..)`` for all
``c > 0`` (weights feeding a BatchNorm/LayerNorm/GroupNorm, up to the normalisation's ``eps``). Li & Arora 2020, Lemma 1
(Li & Arora 2020) then gives, per group::

    <grad_g L(theta), theta_g> = 0              and        grad_g L(c theta_g) = grad_g L(theta) / c.

:func:`scale_invariance_report` *measures* all three numerically for every group of a user's ``nn.Module``: the
relative loss change under rescaling, the inner product (and cosine) of gradient and weights, and the deviation of
``c * grad_g L(c theta_g)`` from ``grad_g L(theta)``. It is a pure probe: parameters, buffers (BatchNorm running
statistics) and the global RNG are left exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class GroupScaleInvariance:
    """Measurements for one parameter group (Li & Arora 2020, Lemma 1).

    ``loss_rel_change``: ``max_c |L(c theta_g) - L(theta)| / max(|L(theta)|, tiny)`` over the tested scales;
    ``inner_product``: ``<grad_g L, theta_g>``; ``cosine``: it divided by ``||grad_g|| ||theta_g||`` (nan if either is
    0); ``grad_ratio_error``: ``max_c ||c grad_g L(c theta_g) - grad_g L(theta)|| / ||grad_g L(theta)||``; both are nan
    for a group the loss does not depend on; ``invariant``: ``loss_rel_change <= tol`` (at every tested point, and the group is not identically zero); ``depends``: the group's gradient norm is above
    ``independence_tol`` times the largest group's (False for e.g. a bias right before a BatchNorm, which the normalisation cancels).
    """

    name: str
    params: list[str]
    numel: int
    norm: float
    grad_norm: float
    inner_product: float
    cosine: float
    loss_rel_change: float
    grad_ratio_error: float
    invariant: bool
    depends: bool


@dataclass
class ScaleInvarianceReport:
    """Result of :func:`scale_invariance_report`: one :class:`GroupScaleInvariance` per parameter group, the loss at the
    unscaled parameters, the scale factors ``c`` tried and the tolerance used to call a group invariant."""
    groups: list[GroupScaleInvariance]
    loss: float
    scales: tuple[float, ...]
    tol: float

    def invariant_groups(self) -> list[str]:
        """Names of the groups measured as scale-invariant (including those the loss does not depend on)."""
        return [g.name for g in self.groups if g.invariant]

    def invariant_params(self, include_independent: bool = False) -> list[str]:
        """Parameter names in scale-invariant groups the loss depends on (``include_independent``: also the rest)."""
        return [p for g in self.groups if g.invariant and (g.depends or include_independent) for p in g.params]

    def __getitem__(self, name: str) -> GroupScaleInvariance:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_rows(self, run: str = "", optimizer: str = "", step: int = 0) -> list[dict[str, Any]]:
        """Tidy rows (``run, optimizer, step, metric, layer, value``) for :meth:`RunStore.append_metrics`."""
        rows = []
        for g in self.groups:
            for metric in ("norm", "grad_norm", "inner_product", "cosine", "loss_rel_change", "grad_ratio_error"):
                rows.append({"run": run, "optimizer": optimizer, "step": step, "metric": f"scale_inv/{metric}",
                             "layer": g.name, "value": float(getattr(g, metric))})
            rows.append({"run": run, "optimizer": optimizer, "step": step, "metric": "scale_inv/invariant",
                         "layer": g.name, "value": float(g.invariant)})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (``loss``, ``scales``, ``tol``, one dict per group)."""
        return {"loss": self.loss, "scales": list(self.scales), "tol": self.tol,
                "groups": [asdict(g) for g in self.groups]}


def parameter_groups(model: nn.Module, by: str | Mapping[str, Sequence[str]] = "parameter") -> dict[str, list[str]]:
    """Named groups of trainable parameters: ``"parameter"`` (one tensor each, the default), ``"module"`` (all
    direct parameters of one module), or an explicit mapping ``{group: [param names]}`` (validated)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(by, Mapping):
        out = {str(k): list(v) for k, v in by.items()}
        unknown = sorted({p for v in out.values() for p in v} - set(names))
        if unknown:
            raise ValueError(f"groups name unknown or frozen parameters {unknown}; trainable: {names}")
        if any(len(v) == 0 for v in out.values()):
            raise ValueError("every group must hold at least one parameter")
        return out
    if by == "parameter":
        return {n: [n] for n in names}
    if by == "module":
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(n)
        return out
    raise ValueError(f"groups must be 'parameter', 'module' or a mapping, got {by!r}")


def _batches(data: Any) -> list[Batch]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [(data[0], data[1])]
    batches = list(data)
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
        raise ValueError("data must be one (inputs, targets) batch or an iterable of such batches")
    return [(b[0], b[1]) for b in batches]


def scale_invariance_report(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            data: Any, groups: str | Mapping[str, Sequence[str]] = "parameter",
                            scales: Iterable[float] = (0.5, 2.0), tol: float = 1e-4,
                            train_mode: bool | None = None, independence_tol: float = 1e-6,
                            perturbations: int = 0, perturbation_scale: float = 0.1, seed: int = 0
                            ) -> ScaleInvarianceReport:
    """Measure Li & Arora 2020, Lemma 1 for every parameter group of ``model`` (see the module docstring).

    ``data`` is one ``(inputs, targets)`` batch or an iterable of batches (the loss is the exact sample-weighted
    mean). ``train_mode`` (default: the model's current mode) selects batch statistics (True) or running statistics
    (False) in normalisation layers; only batch statistics make BN weights scale-invariant. ``tol`` is the relative
    loss change below which a group counts as invariant (normalisation ``eps`` breaks exact invariance slightly).
    A group counts as one the loss ``depends`` on when its gradient norm exceeds ``independence_tol`` times the
    largest group gradient norm (a bias right before a BatchNorm has a gradient at rounding level).

    Invariance measured at one point can be accidental: a BatchNorm ``gamma`` with ``beta = 0`` followed by ReLU
    and another normalisation is invariant at init only, and a zero tensor is unchanged by any rescaling.
    ``perturbations = k > 0`` repeats the loss test at ``k`` random points ``theta + perturbation_scale * rms(p) *
    N(0, I)`` per tensor (``rms = 1`` for a zero tensor; ``torch.Generator`` seeded with ``seed``): a group is
    invariant only if it is at every point. A group that is zero at every tested point is never invariant (the test
    is vacuous). The reported inner products, cosines and gradient ratios are those at ``theta`` itself.
    """
    if isinstance(perturbations, bool) or not isinstance(perturbations, int) or perturbations < 0:
        raise ValueError(f"perturbations must be an integer >= 0, got {perturbations!r}")
    if not (math.isfinite(perturbation_scale) and perturbation_scale > 0):
        raise ValueError(f"perturbation_scale must be a finite number > 0, got {perturbation_scale}")
    scales = tuple(float(c) for c in scales)
    if not scales or any(not math.isfinite(c) or c <= 0 or c == 1.0 for c in scales):
        raise ValueError(f"scales must be finite, > 0 and != 1, got {scales}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    group_map = parameter_groups(model, groups)
    batches = _batches(data)
    total = sum(len(b[0]) for b in batches)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    was_training = model.training
    mode = was_training if train_mode is None else bool(train_mode)
    grad_names = [n for ns in group_map.values() for n in ns]

    def loss_and_grad(values: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        leaves = {n: values[n].clone().requires_grad_(True) for n in grad_names}
        full = {**values, **leaves}
        loss_total = 0.0
        grads = {n: torch.zeros_like(values[n]) for n in grad_names}
        for X, y in batches:
            bufs = {n: b.clone() for n, b in buffers.items()}  # running statistics stay untouched
            loss = loss_fn(functional_call(model, {**full, **bufs}, (X,)), y) * (len(X) / total)
            gs = torch.autograd.grad(loss, [leaves[n] for n in grad_names], allow_unused=True)
            for n, g in zip(grad_names, gs):
                if g is not None:
                    grads[n] += g
            loss_total += float(loss.detach())
        return loss_total, grads

    model.train(mode)
    try:
        with torch.random.fork_rng(devices=[]):
            state = torch.random.get_rng_state()
            base_loss, base_grad = loss_and_grad(params)
            gen = torch.Generator().manual_seed(int(seed))
            points = []
            for _ in range(perturbations):
                pt = {}
                for n, p in params.items():
                    rms = float(p.double().pow(2).mean().sqrt()) if p.numel() else 0.0
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                    pt[n] = p + perturbation_scale * (rms if rms > 0 else 1.0) * noise
                torch.random.set_rng_state(state)
                points.append((pt, loss_and_grad(pt)[0]))
            results = []
            for gname, names in group_map.items():
                theta = torch.cat([params[n].reshape(-1) for n in names])
                g = torch.cat([base_grad[n].reshape(-1) for n in names])
                norm, gnorm = float(theta.norm()), float(g.norm())
                inner = float(g.double() @ theta.double())
                cosine = inner / (norm * gnorm) if norm > 0 and gnorm > 0 else float("nan")
                loss_change, ratio_err = 0.0, 0.0
                for c in scales:
                    torch.random.set_rng_state(state)  # same dropout masks as the base evaluation
                    scaled = dict(params)
                    for n in names:
                        scaled[n] = params[n] * c
                    lc, gc = loss_and_grad(scaled)
                    loss_change = max(loss_change, abs(lc - base_loss) / max(abs(base_loss), 1e-300))
                    if gnorm > 0:
                        gcv = torch.cat([gc[n].reshape(-1) for n in names])
                        ratio_err = max(ratio_err, float((c * gcv - g).norm()) / gnorm)
                testable = norm > 0
                for pt, pt_loss in points:
                    for c in scales:
                        torch.random.set_rng_state(state)
                        scaled = dict(pt)
                        for n in names:
                            scaled[n] = pt[n] * c
                        lc = loss_and_grad(scaled)[0]
                        loss_change = max(loss_change, abs(lc - pt_loss) / max(abs(pt_loss), 1e-300))
                    testable = testable or any(float(pt[n].norm()) > 0 for n in names)
                if gnorm == 0:
                    ratio_err = float("nan")
                results.append(GroupScaleInvariance(
                    name=gname, params=list(names), numel=int(theta.numel()), norm=norm, grad_norm=gnorm,
                    inner_product=inner, cosine=cosine, loss_rel_change=loss_change, grad_ratio_error=ratio_err,
                    invariant=bool(testable and loss_change <= tol), depends=True))
    finally:
        model.train(was_training)
    # a group whose gradient is at rounding level relative to the largest one does not influence the loss
    largest = max((r.grad_norm for r in results), default=0.0)
    for r in results:
        r.depends = bool(r.grad_norm > independence_tol * largest)
        if not r.depends:  # ratios of rounding noise carry no information
            r.cosine = r.grad_ratio_error = float("nan")
    return ScaleInvarianceReport(groups=results, loss=base_loss, scales=scales, tol=tol)


__all__ = ["GroupScaleInvariance", "ScaleInvarianceReport", "parameter_groups", "scale_invariance_report"]
