"""Exact Hessian diagonals: second-order backpropagation where the layers allow it, HVP columns elsewhere.

``H_ii = e_i^T H e_i`` of the mean loss ``L = sum_b (n_b / N) L_b`` at sampled (or all) flat coordinates, by three
exact methods; :func:`exact_diagonal` picks one per parameter tensor and says which (``DiagonalResult.method``).

``"structured"`` -- second-order backpropagation (the method behind BackPACK's DiagHessian: Dangel, Kunstner,
Hennig 2020, "BackPACK: Packing more into backprop", ICLR, §2 and App. A.3; the Hessian backpropagation of
Mizutani and Dreyfus 2008 and Dangel, Harmeling, Hennig 2020, "Modular block-diagonal curvature approximations for
feedforward architectures", AISTATS). For a chain of modules ``z_l = f_l(z_{l-1}; theta_l)`` the Hessian of ``L``
with respect to an intermediate output obeys

    H_{z_{l-1}} = J_l^T H_{z_l} J_l + sum_j (dL/dz_{l,j}) nabla^2_{z_{l-1}} z_{l,j},

(the second term is the *residual* of a nonlinearity: ``diag(g * sigma'')`` for an elementwise activation, a
per-sample block for LayerNorm, zero for Linear/Conv/pooling/Flatten/eval-mode BatchNorm), and for a module that is
affine in its parameters ``H_{theta_l theta_l} = J_theta^T H_{z_l} J_theta``. ``H_{z_L}`` at the output is the loss
Hessian, obtained for *any* per-sample loss from ``F`` Hessian-vector products of the loss alone (``F`` = outputs per
sample; block-diagonal across samples, checked) and factorised per sample, ``H = U diag(lambda) U^T``. Each source of
curvature (the loss, each residual) is kept as a factor ``sum_k w_k s_k s_k^T`` (dense columns ``s_k`` with signed
weights) or as a diagonal ``diag(d)``, pushed down the chain by ``J^T`` only, and contributes
``diag(J_theta^T s s^T J_theta) = (J_theta^T s)^2`` at every parameter module below it. The per-layer rules use the
structure: for a Linear layer on ``[N, in]`` inputs ``sum_k w_k (J^T s_k)^2 = (sum_k w_k s_k^2)^T x^2`` (one matrix
product whatever the number of columns), a diagonal source needs the *squared* input only, and Conv2d uses the
unfolded input. Exact; ``H_ii`` of every coordinate of a parameter at once, on :mod:`torch.autograd` alone.
Supported: chains (found by tracing one forward pass: each module's input must be the previous module's output,
up to reshapes) of Linear, Conv2d, elementwise activations, pooling, Flatten, BatchNorm (the parameters of a
train-mode BatchNorm are handled; the chain stops below it, because batch statistics couple the samples),
LayerNorm (2-D inputs; on token inputs only its own parameters), Embedding, Identity/eval-mode Dropout. The chain is
followed from the output down to the first node it cannot handle (a residual add, attention, a parameter used
twice): the parameters above that point are structured, the others fall back per parameter tensor.

``"layer-hvp"`` -- exact HVP columns restricted to one parameter tensor: one forward pass and one gradient graph
(``create_graph=True``) per batch for all such tensors, then for tensor ``p`` the second backward starts from
``dL/dp`` only and ends at ``p`` (``torch.autograd.grad(g_p, p, E, is_grads_batched=True)``), so it skips the
layers below ``p`` and every other parameter's gradient; unit vectors go in chunks. It gives ``H_pp e_i``, the
column of the diagonal block, which is all that ``H_ii`` needs. Forward-over-forward second directional
derivatives ``d^2/dt^2 L(theta + t e_i)`` (``jvp`` of ``jvp``, no backward pass) were rejected by measurement: on
an FFN weight of the 4-layer benchmark transformer (float64, vmapped in chunks of 8) 4.0x slower per entry than
this path, and 4e-3 off relatively, because torch 2.13's second-order forward rule of ``layer_norm`` is wrong
(docs/benchmarks.md).

Why not BackPACK as the backend: measured side by side (1 thread, batch 512, float32) the structured rule here takes
0.53x BackPACK's DiagHessian time on a 20-50-10 tanh MLP and 0.034x on a 64-256-10 one (the Linear rule needs one
matrix product however many factor columns there are; a residual read only as a diagonal below is pushed as
``d @ W^2``), agrees with it to float32 accuracy, and unlike it serves sampled coordinates, a model that is only
partly a chain, several batches and any per-sample loss, without ``extend`` hooks on the user's modules.

``"hvp"`` -- full HVP columns ``H e_i`` through the operator's batched product (any model the operator handles).

``method="auto"`` (default) uses the structured rule for every parameter it covers when its estimated cost is below
that of restricted HVP columns for the requested coordinates, ``"layer-hvp"`` for the rest, and ``"hvp"`` where
autograd cannot differentiate a parameter's gradient again. ``method="structured"`` raises ``ValueError`` naming the
first parameter it cannot handle and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

__all__ = [
    "METHODS",
    "DiagonalBlockResult",
    "DiagonalResult",
    "exact_diagonal",
    "exact_diagonal_block",
    "structured_plan",
    "unit_columns",
]

METHODS = ("auto", "structured", "layer-hvp", "hvp")

#: Bytes one intermediate factor chunk may take (columns are processed in chunks below this).
FACTOR_BUDGET_BYTES = 256 * 2 ** 20
#: Outputs per sample above which the loss Hessian is not factorised (the structured path is not used).
MAX_OUTPUT_FEATURES = 512
#: Per-sample features above which a LayerNorm residual block is not factorised.
MAX_BLOCK_FEATURES = 1024


# ------------------------------------------------------------------------------------------------------------------
# results
@dataclass
class DiagonalResult:
    """Exact diagonal entries ``H_ii = e_i^T H e_i`` at sampled flat indices, per parameter.

    ``method[name]`` is the method that produced ``values[name]`` (``"structured"``, ``"layer-hvp"`` or ``"hvp"``)
    and ``reason[name]``, for a parameter that was not structured, why not. ``n_hvp`` counts Hessian-vector
    products: full ones (``"hvp"``) and ones restricted to one parameter tensor (``"layer-hvp"``); the structured
    method uses none."""
    values: dict[str, Tensor]
    coords: dict[str, Tensor]
    n_hvp: int
    method: dict[str, str] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)


@dataclass
class DiagonalBlockResult:
    """The sampled principal sub-block ``H[I, I]``; ``index[name]`` is the slice of ``I`` belonging to ``name``."""
    matrix: Tensor
    index: dict[str, slice]
    coords: dict[str, Tensor]
    n_hvp: int


# ------------------------------------------------------------------------------------------------------------------
# HVP columns (any operator with param_names / numel / offsets / _matmat / chunk_size)
def unit_columns(H, flat_idx: Tensor, reduce: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
    """Apply ``reduce(H[:, chunk]^T as [c, n], chunk)`` over chunks (``H.chunk_size``) of the columns ``flat_idx``."""
    out = []
    c = getattr(H, "max_chunk_size", None) or H.chunk_size
    for s in range(0, flat_idx.numel(), c):
        chunk = flat_idx[s:s + c]
        E = torch.zeros(chunk.numel(), H.numel, dtype=H.dtype, device=H.device)
        E[torch.arange(chunk.numel(), device=H.device), chunk.to(H.device)] = 1
        out.append(reduce(H._matmat(E), chunk))
    return out


def _global(H, coords: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, slice]]:
    parts, index, pos = [], {}, 0
    for n, idx in coords.items():
        parts.append(idx + H.offsets[n])
        index[n] = slice(pos, pos + idx.numel())
        pos += idx.numel()
    return torch.cat(parts), index


def _hvp_columns_diagonal(H, coords: Mapping[str, Tensor]) -> dict[str, Tensor]:
    flat, index = _global(H, coords)
    vals = torch.cat(unit_columns(
        H, flat, lambda cols, chunk: cols[torch.arange(chunk.numel(), device=H.device), chunk.to(H.device)]))
    return {n: vals[sl] for n, sl in index.items()}


def exact_diagonal_block(H, coords: Mapping[str, Tensor]) -> DiagonalBlockResult:
    """``H[I, I]`` for ``I`` = all given (validated) coordinates in parameter order, from full HVP columns
    ``H e_i`` (the off-diagonal entries couple layers, so no per-layer shortcut applies)."""
    flat, index = _global(H, coords)
    before = H.n_hvp
    rows = flat.to(H.device)
    cols = torch.cat(unit_columns(H, flat, lambda c, chunk: c[:, rows]))  # row j = (H e_{I_j})[I]
    return DiagonalBlockResult(cols.T.contiguous(), index, dict(coords), H.n_hvp - before)


# ------------------------------------------------------------------------------------------------------------------
# restricted HVP columns ("layer-hvp")
#: Unit vectors per second backward of the restricted path, by device type. On CPU one vector at a time was
#: fastest (benchmark transformer, 1 thread: chunks of 4 / 8 / 16 / 32 took 1.6x / 1.8x / 1.8x / 2.3x the time of
#: chunks of 1 per entry); the CUDA value is a default that was not measured here.
LAYER_HVP_CHUNK = {"cpu": 1, "cuda": 16}


def _layer_hvp_diagonal(H, coords: Mapping[str, Tensor], chunk: int | None = None
                        ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``H_ii`` for the coordinates of each parameter tensor ``p`` from restricted columns ``H_pp e_i``.

    Returns the values and, for tensors whose gradient autograd cannot differentiate again, a reason (those are
    left out of the values)."""
    if chunk is None:
        chunk = LAYER_HVP_CHUNK.get(torch.device(H.device).type, 1)
    problem = H._problem
    names = [n for n in H.param_names if n in coords]
    out = {n: torch.zeros(coords[n].numel(), dtype=H.dtype, device=H.device) for n in names}
    failed: dict[str, str] = {}
    with problem.context():
        for b, (w, term) in enumerate(problem.terms):
            todo = [n for n in names if n not in failed]
            if not todo:
                break
            leaves = {n: p.detach().requires_grad_(n in set(todo)) for n, p in H.params.items()}
            loss = problem.check_term(b, term(leaves))
            grads = torch.autograd.grad(loss, [leaves[n] for n in todo], create_graph=True, allow_unused=True)
            for n, g in zip(todo, grads):
                if g is None:  # the loss does not depend on p: its block is zero
                    continue
                if not g.requires_grad:
                    failed[n] = "autograd cannot differentiate this parameter's gradient again"
                    continue
                idx = coords[n].to(H.device)
                p = leaves[n]
                size = p.numel()
                for s in range(0, idx.numel(), chunk):
                    sub = idx[s:s + chunk]
                    c = sub.numel()
                    E = torch.zeros(c, size, dtype=H.dtype, device=H.device)
                    ar = torch.arange(c, device=H.device)
                    E[ar, sub] = 1
                    try:
                        (hv,) = torch.autograd.grad(g, p, grad_outputs=E.reshape(c, *p.shape), retain_graph=True,
                                                    is_grads_batched=c > 1, materialize_grads=True)
                        vals = hv.reshape(c, size)[ar, sub] if c > 1 else hv.reshape(-1)[sub]
                    except (RuntimeError, NotImplementedError):  # no batching rule: one vector at a time
                        vals = torch.stack([torch.autograd.grad(g, p, grad_outputs=E[k].reshape(p.shape),
                                                                retain_graph=True, materialize_grads=True)[0]
                                            .reshape(-1)[sub[k]] for k in range(c)])
                    out[n][s:s + c] += w * vals.detach()
            del grads, loss
    return {n: v for n, v in out.items() if n not in failed}, failed


# ------------------------------------------------------------------------------------------------------------------
# tracing the model into a chain of modules
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
                nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
                nn.LogSigmoid)
_PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)  # second derivative 0 almost everywhere
_LINEAR_NOPARAM = (nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_VIEW_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0")


@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: Tensor
    out: Tensor


@dataclass
class _Step:
    """One module of the chain (top = closest to the output): kind, tensors of the traced pass, params."""
    call: _Call
    kind: str  # "linear" | "conv2d" | "batchnorm" | "layernorm" | "embedding" | "elementwise" | "noparam"
    params: dict[str, str]  # local name ("weight") -> full parameter name
    propagate: bool  # whether curvature can be pushed to the module's input
    stop_reason: str = ""


def _kind(m: nn.Module) -> tuple[str | None, str]:
    """(kind, reason if unsupported)."""
    if isinstance(m, nn.Linear):
        return "linear", ""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return None, f"Conv2d with padding_mode={m.padding_mode!r}"
        if isinstance(m.padding, str):
            return "conv2d", ""
        return "conv2d", ""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", ""
    if isinstance(m, nn.LayerNorm):
        return "layernorm", ""
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            return None, "Embedding with max_norm (renormalises its weight in the forward pass)"
        return "embedding", ""
    if isinstance(m, _ELEMENTWISE):
        return "elementwise", ""
    if isinstance(m, _LINEAR_NOPARAM):
        return "noparam", ""
    if isinstance(m, _IDENTITY):
        if isinstance(m, nn.Identity) or not m.training or m.p == 0:
            return "noparam", ""
        return None, f"{type(m).__name__} in training mode"
    return None, f"module type {type(m).__name__} has no second-order backpropagation rule"


def _bn_uses_batch_stats(m: nn.Module) -> bool:
    return m.training or m.running_mean is None


class _Trace:
    """One traced forward pass: the chain of supported modules from the output down, and where it stops."""

    def __init__(self, steps: list[_Step], out: Tensor, stop: str, covered: dict[str, str]):
        self.steps, self.out, self.stop, self.covered = steps, out, stop, covered


def _trace(module: nn.Module, params: dict[str, Tensor], args: tuple, kwargs: dict) -> _Trace:
    """Run ``module`` once with hooks on its leaf modules and follow the autograd graph from the output down.

    ``covered`` maps each parameter name the structured rule handles to its module name; every other parameter
    must fall back. ``stop`` says why the chain ended (empty when it reached the input)."""
    calls: list[_Call] = []
    count: dict[int, int] = {}
    names = {id(m): n for n, m in module.named_modules()}
    hooks = []

    def hook(m, inp, out):
        count[id(m)] = count.get(id(m), 0) + 1
        if len(inp) == 1 and isinstance(inp[0], Tensor) and isinstance(out, Tensor):
            calls.append(_Call(names[id(m)], m, inp[0], out))

    for m in module.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    try:
        out = functional_call(module, params, args, kwargs, tie_weights=True, strict=False)
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(out, Tensor):
        return _Trace([], None, "the model output is not a single Tensor", {})
    by_node: dict[Any, _Call] = {}
    for c in calls:
        if c.out is c.inp or c.out.grad_fn is None:
            continue
        by_node[c.out.grad_fn] = c
    # parameter uses: each structured parameter must enter the graph exactly once (no tying, no functional reuse)
    uses: dict[Any, int] = {}
    seen = set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if type(nxt).__name__ == "AccumulateGrad":
                uses[id(nxt.variable)] = uses.get(id(nxt.variable), 0) + 1
            elif nxt not in seen:
                stack.append(nxt)
    by_param = {id(t): n for n, t in params.items()}
    steps: list[_Step] = []
    covered: dict[str, str] = {}
    node = out.grad_fn
    stop = ""
    while node is not None:
        c = by_node.get(node)
        if c is None:
            if type(node).__name__ in _VIEW_NODES:
                node = node.next_functions[0][0]
                continue
            stop = f"the graph below module {steps[-1].call.name!r} is not a chain of supported modules " \
                   f"(autograd node {type(node).__name__})" if steps else \
                f"the model output comes from autograd node {type(node).__name__}, not from a supported module"
            break
        kind, why = _kind(c.module)
        if kind is None:
            stop = f"module {c.name!r}: {why}"
            break
        if count.get(id(c.module), 0) != 1 and any(True for _ in c.module.parameters(recurse=False)):
            stop = f"module {c.name!r} is called {count[id(c.module)]} times in one forward pass"
            break
        local = {}
        bad = ""
        for pn, p in c.module.named_parameters(recurse=False):
            full = f"{c.name}.{pn}" if c.name else pn
            if full not in params:
                continue
            t = params[full]
            if not t.requires_grad:
                local[pn] = full
                continue
            if uses.get(id(t), 0) != 1 or by_param.get(id(t)) != full:
                bad = f"parameter {full!r} is used {uses.get(id(t), 0)} times in the graph (tied or reused)"
                break
            local[pn] = full
        if bad:
            stop = bad
            break
        propagate, reason = True, ""
        if kind == "batchnorm" and _bn_uses_batch_stats(c.module):
            propagate, reason = False, f"BatchNorm {c.name!r} normalises with batch statistics (couples samples)"
        elif kind == "layernorm" and c.inp.dim() != 2:
            propagate, reason = False, f"LayerNorm {c.name!r} on a {c.inp.dim()}-d input (only 2-d inputs)"
        elif kind == "embedding":
            propagate, reason = False, ""
        if not c.out.shape or c.out.shape[0] != out.shape[0] or c.inp.dim() == 0 or \
                (kind != "embedding" and c.inp.shape[0] != out.shape[0]):
            stop = f"module {c.name!r} does not keep the batch dimension first"
            break
        steps.append(_Step(c, kind, local, propagate, reason))
        for full in local.values():
            covered[full] = c.name
        if not propagate:
            stop = reason
            break
        node = c.inp.grad_fn
    return _Trace(steps, out, stop, covered)


# ------------------------------------------------------------------------------------------------------------------
# the loss Hessian with respect to the model output, per sample
def _output_curvature(loss_of: Callable[[Tensor], Tensor], out: Tensor, weight: float
                      ) -> tuple[Tensor, Tensor, Tensor] | str:
    """``(g, S, w)``: ``g = weight * dL/dout`` and a factor ``H_out = sum_k w[k, n] S[k, n] S[k, n]^T`` per sample
    (from ``F`` batched HVPs of the loss alone, checked block-diagonal across samples), or a reason string."""
    N = out.shape[0]
    F = out[0].numel()
    if F > MAX_OUTPUT_FEATURES:
        return f"the model has {F} outputs per sample (> {MAX_OUTPUT_FEATURES}): the loss Hessian is not factorised"
    o = out.detach().requires_grad_(True)
    loss = loss_of(o)
    (g,) = torch.autograd.grad(loss, o, create_graph=True)
    if not g.requires_grad:
        blocks = torch.zeros(N, F, F, dtype=o.dtype, device=o.device)
    else:
        V = torch.eye(F, dtype=o.dtype, device=o.device).reshape(F, 1, *out.shape[1:]).expand(F, *out.shape)
        try:
            (HV,) = torch.autograd.grad(g, o, grad_outputs=V.contiguous(), retain_graph=True, is_grads_batched=True)
        except (RuntimeError, NotImplementedError):
            HV = torch.stack([torch.autograd.grad(g, o, grad_outputs=V[j].contiguous(), retain_graph=True)[0]
                              for j in range(F)])
        blocks = HV.reshape(F, N, F).permute(1, 2, 0)  # [n, i, j] = H_n[i, j]
        u = torch.randn(out.shape, dtype=o.dtype, device=o.device, generator=torch.Generator(o.device).manual_seed(0))
        (Hu,) = torch.autograd.grad(g, o, grad_outputs=u)
        pred = torch.einsum("nij,nj->ni", blocks, u.reshape(N, F))
        err = float((pred - Hu.reshape(N, F)).norm())
        tol = 1e3 * torch.finfo(o.dtype).eps
        if not err <= tol * (float(Hu.norm()) + 1e-300) + 1e-300:
            return "the loss couples samples (its Hessian is not block-diagonal across the batch)"
    blocks = 0.5 * (blocks + blocks.transpose(1, 2))
    lam, U = torch.linalg.eigh(blocks)  # [N, F], [N, F, F]
    S = (U * lam.abs().sqrt().unsqueeze(1)).permute(2, 0, 1).reshape(F, *out.shape)  # column k = U[:, :, k]
    w = lam.sign().T * weight  # [K, N]
    return (g.detach() * weight, S * 1.0, w)


# ------------------------------------------------------------------------------------------------------------------
# per-module rules
def _mod_params(step: _Step, params: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for pn, _ in step.call.module.named_parameters(recurse=False):
        full = step.params.get(pn)
        out[pn] = params[full].detach() if full is not None else getattr(step.call.module, pn).detach()
    return out


def _bn_hat(step: _Step) -> tuple[Tensor, Tensor]:
    """(x_hat, scale per channel) of a BatchNorm on the traced input."""
    m, a = step.call.module, step.call.inp.detach()
    if _bn_uses_batch_stats(m):
        xh = nn.functional.batch_norm(a, None, None, None, None, True, 0.0, m.eps)
        scale = None
    else:
        xh = nn.functional.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        scale = (m.running_var + m.eps).rsqrt()
    return xh, scale


def _ln_hat(step: _Step) -> Tensor:
    m = step.call.module
    return nn.functional.layer_norm(step.call.inp.detach(), m.normalized_shape, None, None, m.eps)


def _conv_unfold(step: _Step) -> Tensor:
    m, a = step.call.module, step.call.inp.detach()
    if a.dim() == 3:
        a = a.unsqueeze(0)
    pad = m.padding
    if isinstance(pad, str):  # "same" / "valid"
        if pad == "valid":
            pad = (0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            lo = [t // 2 for t in total]
            hi = [t - l for t, l in zip(total, lo)]
            a = nn.functional.pad(a, (lo[1], hi[1], lo[0], hi[0]))
            pad = (0, 0)
    return nn.functional.unfold(a, m.kernel_size, m.dilation, pad, m.stride)  # [N, C*kh*kw, P]


class _Rules:
    """Contributions ``diag(J_theta^T (.) J_theta)`` and pull-backs ``J^T`` for the module kinds."""

    def __init__(self, params: dict[str, Tensor], acc: dict[str, Tensor]):
        self.params = params
        self.acc = acc  # full parameter name -> accumulated full diagonal (flat), only for requested ones

    def _add(self, step: _Step, pn: str, value: Tensor) -> None:
        full = step.params.get(pn)
        if full is not None and full in self.acc:
            self.acc[full] += value.reshape(-1)

    def wants(self, step: _Step) -> bool:
        return any(f in self.acc for f in step.params.values())

    # -------------------------------------------------------------- dense factor S [K, N, *out], w [K, N]
    def contrib_dense(self, step: _Step, S: Tensor, w: Tensor) -> None:
        if not self.wants(step):
            return
        kind, m = step.kind, step.call.module
        K, N = S.shape[:2]
        if kind == "linear":
            a = step.call.inp.detach()
            if a.dim() == 2:
                sig = torch.einsum("kn,kno->no", w, S * S)
                self._add(step, "weight", sig.T @ (a * a))
                self._add(step, "bias", sig.sum(0))
            else:
                Sm = S.reshape(K, N, -1, S.shape[-1])
                am = a.reshape(N, -1, a.shape[-1])
                if "weight" in step.params and step.params["weight"] in self.acc:
                    G = torch.einsum("knmo,nmi->knoi", Sm, am)
                    self._add(step, "weight", torch.einsum("kn,knoi->oi", w, G * G))
                gb = Sm.sum(2)
                self._add(step, "bias", torch.einsum("kn,kno->o", w, gb * gb))
        elif kind == "conv2d":
            if m.groups != 1:
                raise _Unsupported(f"Conv2d {step.call.name!r} with groups={m.groups}")
            unf = _conv_unfold(step)  # [N, CKK, P]
            Sm = S.reshape(K, N, S.shape[2], -1)  # [K, N, O, P]
            if "weight" in step.params and step.params["weight"] in self.acc:
                G = torch.einsum("knop,ncp->knoc", Sm, unf)
                self._add(step, "weight", torch.einsum("kn,knoc->oc", w, G * G))
            gb = Sm.sum(3)
            self._add(step, "bias", torch.einsum("kn,kno->o", w, gb * gb))
        elif kind == "batchnorm":
            xh, _ = _bn_hat(step)
            C = xh.shape[1]
            Sm = S.reshape(K, N, C, -1)
            gg = (Sm * xh.reshape(1, N, C, -1)).sum(3)
            self._add(step, "weight", torch.einsum("kn,knc->c", w, gg * gg))
            gb = Sm.sum(3)
            self._add(step, "bias", torch.einsum("kn,knc->c", w, gb * gb))
        elif kind == "layernorm":
            xh = _ln_hat(step)
            shp = tuple(m.normalized_shape)
            D = math.prod(shp)
            Sm = S.reshape(K, N, -1, D)
            gg = (Sm * xh.reshape(1, N, -1, D)).sum(2)
            self._add(step, "weight", torch.einsum("kn,knd->d", w, gg * gg))
            gb = Sm.sum(2)
            self._add(step, "bias", torch.einsum("kn,knd->d", w, gb * gb))
        elif kind == "embedding":
            idx = step.call.inp.reshape(N, -1)
            V, D = m.weight.shape
            Sm = S.reshape(K, N, -1, D)
            T = idx.shape[1]
            rows = (torch.arange(N, device=idx.device)[:, None] * V + idx).reshape(-1)  # [N*T]
            G = torch.zeros(K, N * V, D, dtype=S.dtype, device=S.device)
            G.index_add_(1, rows, Sm.reshape(K, N * T, D))
            G = G.reshape(K, N, V, D)
            val = torch.einsum("kn,knvd->vd", w, G * G)
            if m.padding_idx is not None:
                val[m.padding_idx] = 0
            self._add(step, "weight", val)

    # -------------------------------------------------------------- diagonal source diag(d), d [N, *out]
    def contrib_diag(self, step: _Step, d: Tensor) -> None:
        if not self.wants(step):
            return
        kind, m = step.kind, step.call.module
        N = d.shape[0]
        if kind == "linear":
            a = step.call.inp.detach()
            dm = d.reshape(-1, d.shape[-1])
            am = a.reshape(-1, a.shape[-1])
            self._add(step, "weight", dm.T @ (am * am))
            self._add(step, "bias", dm.sum(0))
        elif kind == "conv2d":
            if m.groups != 1:
                raise _Unsupported(f"Conv2d {step.call.name!r} with groups={m.groups}")
            unf = _conv_unfold(step)
            dm = d.reshape(N, d.shape[1], -1)
            self._add(step, "weight", torch.einsum("nop,ncp->oc", dm, unf * unf))
            self._add(step, "bias", dm.sum((0, 2)))
        elif kind == "batchnorm":
            xh, _ = _bn_hat(step)
            C = xh.shape[1]
            dm = d.reshape(N, C, -1)
            self._add(step, "weight", (dm * xh.reshape(N, C, -1) ** 2).sum((0, 2)))
            self._add(step, "bias", dm.sum((0, 2)))
        elif kind == "layernorm":
            xh = _ln_hat(step)
            D = math.prod(tuple(m.normalized_shape))
            self._add(step, "weight", (d.reshape(-1, D) * xh.reshape(-1, D) ** 2).sum(0))
            self._add(step, "bias", d.reshape(-1, D).sum(0))
        elif kind == "embedding":
            V, D = m.weight.shape
            val = torch.zeros(V, D, dtype=d.dtype, device=d.device)
            val.index_add_(0, step.call.inp.reshape(-1), d.reshape(-1, D))
            if m.padding_idx is not None:
                val[m.padding_idx] = 0
            self._add(step, "weight", val)

    # -------------------------------------------------------------- pull-backs
    def _fn(self, step: _Step) -> Callable[[Tensor], Tensor]:
        m = step.call.module
        p = _mod_params(step, self.params)
        return lambda a: functional_call(m, p, (a,))

    def pull_dense(self, step: _Step, S: Tensor) -> Tensor:
        """``J^T S`` column by column: ``[K, N, *out] -> [K, N, *in]``."""
        kind, m = step.kind, step.call.module
        a = step.call.inp.detach()
        K = S.shape[0]
        if kind == "linear":
            return S @ _mod_params(step, self.params)["weight"]
        if kind == "conv2d":
            Wt = _mod_params(step, self.params)["weight"]
            batched = a.dim() == 4
            a4 = a if batched else a.unsqueeze(0)
            S4 = S.reshape(K * a4.shape[0], *S.shape[-3:])
            shape = (K * a4.shape[0], *a4.shape[1:])
            if isinstance(m.padding, str):
                fn = lambda x: nn.functional.conv2d(x, Wt, None, m.stride, m.padding, m.dilation, m.groups)
                _, pb = vjp(fn, torch.zeros(shape, dtype=S.dtype, device=S.device))
                r = pb(S4)[0]
            else:
                r = torch.nn.grad.conv2d_input(shape, Wt, S4, m.stride, m.padding, m.dilation, m.groups)
            return r.reshape(K, *a.shape)
        if kind == "batchnorm":  # eval mode only (propagate is False otherwise)
            return S * self.bn_scale(step).reshape(1, 1, -1, *([1] * (a.dim() - 2)))
        if kind == "elementwise":
            d1, _ = self.derivatives(step)
            return S * d1.unsqueeze(0)
        if isinstance(m, _IDENTITY):
            return S
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return S.reshape(K, *a.shape)
        _, pb = vjp(self._fn(step), a)
        return vmap(lambda s: pb(s)[0])(S)

    def bn_scale(self, step: _Step) -> Tensor:
        """``dz/da`` per channel of an eval-mode BatchNorm: ``weight / sqrt(running_var + eps)``."""
        _, scale = _bn_hat(step)
        wt = _mod_params(step, self.params).get("weight")
        return scale if wt is None else scale * wt

    def derivatives(self, step: _Step) -> tuple[Tensor, Tensor]:
        """``(sigma'(a), sigma''(a))`` of an elementwise module at its traced input (reverse-over-reverse)."""
        if getattr(step, "_d", None) is None:
            m = step.call.module
            a = step.call.inp.detach().requires_grad_(True)
            with torch.enable_grad():
                y = m(a)
                (d1,) = torch.autograd.grad(y.sum(), a, create_graph=True)
                if isinstance(m, _PIECEWISE_LINEAR) or not d1.requires_grad:
                    d2 = torch.zeros_like(a)
                else:
                    (d2,) = torch.autograd.grad(d1.sum(), a)
            step._d = (d1.detach(), d2.detach())
        return step._d

    def materialize(self, step: _Step, d: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """The diagonal source ``diag(d)`` at the module's output restricted to the flat output positions ``cols``,
        pulled to the module's input: ``(S [c, N, *in], w [c, N])`` with ``S_k = J^T (sqrt|d_k| e_k)``."""
        N = d.shape[0]
        dm = d.reshape(N, -1)[:, cols].T  # [c, N]
        root = dm.abs().sqrt()
        w = dm.sign()
        if step.kind == "linear" and step.call.inp.dim() == 2:
            W = _mod_params(step, self.params)["weight"]
            return root.unsqueeze(2) * W[cols].unsqueeze(1), w
        c = cols.numel()
        E = torch.zeros(c, N, d[0].numel(), dtype=d.dtype, device=d.device)
        E[torch.arange(c, device=d.device), :, cols] = root
        return self.pull_dense(step, E.reshape(c, *d.shape)), w

    def layernorm_residual(self, step: _Step, g: Tensor, weight_scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """Per-sample ``nabla^2_a <g_n, LN(a_n)>`` (2-d input) factorised: ``(S [D, N, D], w [D, N])``."""
        fn = self._fn(step)
        a = step.call.inp.detach()

        def inner(an, gn):
            return (gn * fn(an.unsqueeze(0)).squeeze(0)).sum()

        Hn = vmap(torch.func.jacrev(torch.func.grad(inner)))(a, g)  # reverse-over-reverse  # [N, D, D]
        Hn = 0.5 * (Hn + Hn.transpose(1, 2))
        lam, U = torch.linalg.eigh(Hn)
        S = (U * lam.abs().sqrt().unsqueeze(1)).permute(2, 0, 1)
        return S.contiguous(), lam.sign().T * weight_scale


class _Unsupported(Exception):
    pass


# ------------------------------------------------------------------------------------------------------------------
def _trace_batch(H, module: nn.Module, frozen: dict[str, Tensor], x: Any) -> tuple[_Trace, dict[str, Tensor]]:
    args, kwargs = _inputs(x)
    leaves = {**frozen, **{n: p.detach().requires_grad_(True) for n, p in H.params.items()}}
    return _trace(module, leaves, args, kwargs), leaves


def _plan(H) -> tuple[tuple[_Trace, dict] | None, dict[str, str], dict[str, str]]:
    src = getattr(H._problem, "source", None)
    if src is None or not H._problem.batches:
        return None, {}, {n: "the Hessian is of a function, not of a model" for n in H.param_names}
    module, _, frozen = src
    with H._problem.context(), torch.enable_grad():
        traced = _trace_batch(H, module, frozen, H._problem.batches[0][0])
    tr = traced[0]
    covered = {n: m for n, m in tr.covered.items() if n in H.params}
    why = tr.stop or "not reached by the chain"
    return traced, covered, {n: why for n in H.param_names if n not in covered}


def structured_plan(H) -> tuple[dict[str, str], dict[str, str]]:
    """Which parameters the structured rule covers on the operator's data: ``(covered: name -> module,
    reasons: name -> why not)`` (traced on the first batch; every batch must give the same chain)."""
    _, covered, why = _plan(H)
    return covered, why


def _inputs(x: Any) -> tuple[tuple, dict]:
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, Mapping):
        return (), dict(x)
    return tuple(x), {}


def _structured_batch(H, module, loss_fn, x, y, weight: float, names: set[str], acc: dict[str, Tensor],
                      frozen: dict[str, Tensor], traced: tuple[_Trace, dict] | None = None) -> None:
    """Add ``weight * diag(H_b)`` of one batch to ``acc`` for the parameters ``names`` (all covered)."""
    if traced is None:
        traced = _trace_batch(H, module, frozen, x)
    tr, leaves = traced
    missing = names - set(tr.covered)
    if missing:
        raise _Unsupported(f"parameter(s) {sorted(missing)} not structured on this batch: {tr.stop}")
    steps = tr.steps
    # deepest step we need to reach
    last = max(i for i, s in enumerate(steps) if any(f in names for f in s.params.values()))
    steps = steps[: last + 1]
    res = _output_curvature(lambda o: loss_fn(o, y), tr.out, weight)
    if isinstance(res, str):
        raise _Unsupported(res)
    g_out, S, w = res
    # gradients at every module's output (weighted), for the residual terms
    need_g = [i for i, s in enumerate(steps[:last]) if s.kind in ("elementwise", "layernorm")]
    zs = [steps[i].call.out for i in need_g]
    gz = torch.autograd.grad(tr.out, zs, grad_outputs=g_out, allow_unused=True) if zs else []
    gmap = {i: (g.detach() if g is not None else torch.zeros_like(steps[i].call.out)) for i, g in zip(need_g, gz)}
    rules = _Rules(leaves, acc)
    del tr

    def to_input_shape(i: int, T: Tensor, lead: int) -> Tensor:
        """A factor at the input of step i, reshaped to the output of step i+1 (the gap is reshapes only)."""
        nxt = steps[i + 1].call.out
        return T.reshape(*T.shape[:lead], *nxt.shape)

    # diag_only[i]: below the input of step i only per-sample diagonals of the curvature are needed (the steps
    # down to the deepest one keep diagonals diagonal and the deepest one's rule reads the diagonal alone)
    diag_only = [_diag_sufficient(steps[last]) and all(_diag_preserving(steps[k]) and
                                                       (not steps[k].params or _diag_sufficient(steps[k]))
                                                       for k in range(i + 1, last))
                 for i in range(last + 1)]

    def push_dense(i: int, S: Tensor, w: Tensor) -> None:
        """Dense factor at the output of step i: contribute at i and below."""
        while True:
            st = steps[i]
            S = S.reshape(S.shape[0], *st.call.out.shape)
            rules.contrib_dense(st, S, w)
            if i == last:
                return
            S = rules.pull_dense(st, S)
            if diag_only[i]:  # from here on the diagonal sum_k w_k s_k^2 is all that is needed
                d = torch.einsum("kn,knf->nf", w, (S * S).reshape(*w.shape, -1))
                push_diag(i + 1, to_input_shape(i, d, 0))
                return
            S = to_input_shape(i, S, 1)
            i += 1

    def push_diag(i: int, d: Tensor) -> None:
        """Diagonal source diag(d) at the output of step i."""
        while True:
            st = steps[i]
            d = d.reshape(st.call.out.shape)
            rules.contrib_diag(st, d)
            if i == last:
                return
            if st.kind == "elementwise":
                d1, _ = rules.derivatives(st)
                d = to_input_shape(i, d * d1 * d1, 0)
                i += 1
                continue
            if isinstance(st.call.module, _IDENTITY + (nn.Flatten, nn.Unflatten)):
                d = to_input_shape(i, d, 0)
                i += 1
                continue
            if st.kind == "batchnorm":  # eval mode: J = diag(scale)
                sc = rules.bn_scale(st)
                d = to_input_shape(i, d * (sc * sc).reshape(-1, *([1] * (d.dim() - 2))), 0)
                i += 1
                continue
            if diag_only[i] and st.kind == "linear" and st.call.inp.dim() == 2:
                W = _mod_params(st, rules.params)["weight"]  # diag(W^T diag(d_n) W) = d_n @ W^2
                d = to_input_shape(i, d @ (W * W), 0)
                i += 1
                continue
            flat = d.reshape(d.shape[0], -1)
            cols = torch.nonzero((flat != 0).any(0)).reshape(-1)
            per_col = d.shape[0] * max(st.call.inp[0].numel(), st.call.out[0].numel()) * d.element_size() * 3
            c = int(max(1, min(cols.numel(), FACTOR_BUDGET_BYTES // max(per_col, 1))))
            for s in range(0, cols.numel(), c):
                Sc, wc = rules.materialize(st, d, cols[s:s + c])
                push_dense(i + 1, to_input_shape(i, Sc, 1), wc)
            return

    # the loss factor, in column chunks
    K = S.shape[0]
    per_col = max(s.call.out.numel() for s in steps) * S.element_size() * 3
    c = int(max(1, min(K, FACTOR_BUDGET_BYTES // max(per_col, 1))))
    for s in range(0, K, c):
        push_dense(0, S[s:s + c].reshape(-1, *steps[0].call.out.shape), w[s:s + c])
    # residual sources of the nonlinear modules above the deepest requested parameter
    for i in need_g:
        st = steps[i]
        g = gmap[i]
        if st.kind == "elementwise":
            if isinstance(st.call.module, _PIECEWISE_LINEAR):
                continue
            _, d2 = rules.derivatives(st)
            d = g * d2
            if bool((d != 0).any()):
                push_diag(i + 1, to_input_shape(i, d, 0))
        else:  # layernorm on a 2-d input
            Sr, wr = rules.layernorm_residual(st, g)
            push_dense(i + 1, to_input_shape(i, Sr, 1), wr)


def _structured_diagonal(H, names: list[str], first: tuple[_Trace, dict] | None = None) -> dict[str, Tensor]:
    """Full diagonals of the (covered) parameters ``names`` by second-order backpropagation, exact mean over the
    batches (``first``: the trace of the first batch, if already made)."""
    module, loss_fn, frozen = H._problem.source
    batches = H._problem.batches
    acc = {n: torch.zeros(H.sizes[n], dtype=H.dtype, device=H.device) for n in names}
    total = sum(_batch_len(x) for x, _ in batches)
    with H._problem.context(), torch.enable_grad():
        for b, (x, y) in enumerate(batches):
            _structured_batch(H, module, loss_fn, x, y, _batch_len(x) / total, set(names), acc, frozen,
                              first if b == 0 else None)
    return acc


def _batch_len(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        return _batch_len(next(iter(x.values())))
    return _batch_len(x[0])


# ------------------------------------------------------------------------------------------------------------------
#: Cost of one restricted HVP column in forward-pass flops of the layers it traverses (forward, backward and the
#: second backward through the part of the chain above and including the parameter's module; calibrated on the
#: benchmark MLP/CNN, docs/benchmarks.md).
HVP_COST_FACTOR = 4.0


def _flops(step: _Step) -> float:
    """Forward flops of one module on the traced batch (multiply-adds of Linear/Conv2d, else output size)."""
    m, a, z = step.call.module, step.call.inp, step.call.out
    if step.kind == "linear":
        return float(a.numel()) * m.out_features
    if step.kind == "conv2d":
        return float(z.numel()) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return float(z.numel())


def _diag_preserving(step: _Step) -> bool:
    """``J`` is diagonal (up to a reshape): ``J^T diag(d) J`` stays diagonal."""
    return (step.kind == "elementwise" or isinstance(step.call.module, _IDENTITY + (nn.Flatten, nn.Unflatten))
            or (step.kind == "batchnorm" and step.propagate))


def _diag_sufficient(step: _Step) -> bool:
    """The module's parameter rule reads only the per-sample diagonal of the curvature at its output (each
    parameter entry touches one output entry per sample): Linear, BatchNorm, LayerNorm on 2-d inputs."""
    return step.kind in ("linear", "batchnorm", "layernorm") and step.call.inp.dim() == 2


def _structured_cost(steps: list[_Step], j: int, n_out: int) -> float:
    """Estimated flops of the structured pass down to step ``j``: ``n_out`` loss columns through every step, plus
    each nonlinearity's residual, which is free down to the next module that mixes features and costs one column
    per feature of that module's output below it (``docs``: module docstring)."""
    f = [_flops(s) for s in steps[: j + 1]]
    mixing = [s.kind in ("conv2d",) or (s.kind == "linear" and s.call.inp.dim() != 2) for s in steps[: j + 1]]
    below = [0.0] * (j + 2)  # below[i] = per-column cost of pushing a factor from the output of step i to j
    for i in range(j, -1, -1):
        below[i] = below[i + 1] + f[i] * (2.0 if mixing[i] else 1.0)
    cost = n_out * below[0]
    for i in range(j):
        st = steps[i]
        if not ((st.kind == "elementwise" and not isinstance(st.call.module, _PIECEWISE_LINEAR))
                or st.kind == "layernorm"):
            continue
        m = i + 1
        while m <= j and _diag_preserving(steps[m]):
            m += 1
        if m >= j:
            continue
        direct = steps[m].kind == "linear" and steps[m].call.inp.dim() == 2
        if direct and _diag_sufficient(steps[j]) and all(
                _diag_preserving(steps[k]) and (not steps[k].params or _diag_sufficient(steps[k]))
                for k in range(m + 1, j)):
            cost += 2 * f[m]  # diag(W^T diag(d) W) = d @ W^2, then diagonal only
            continue
        feats = steps[m].call.out[0].numel()
        cost += f[m] + feats * (below[m + 1] + (0.0 if direct else f[m]))
    return cost


def _choose_structured(traced: tuple[_Trace, dict], covered: list[str], coords: Mapping[str, Tensor]
                       ) -> tuple[list[str], float, float]:
    """Cost rule of ``method="auto"``: structure the chain down to the depth ``j`` minimising
    ``structured(j) + sum_{requested p below j} entries(p) * HVP_COST_FACTOR * flops(above and at p)``."""
    tr = traced[0]
    steps = tr.steps
    depth_of = {f: i for i, s in enumerate(steps) for f in s.params.values()}
    req = [n for n in covered if n in depth_of]
    if not req:
        return [], 0.0, 0.0
    last = max(depth_of[n] for n in req)
    f = [_flops(s) for s in steps[: last + 1]]
    above = [sum(f[: i + 1]) for i in range(last + 1)]
    n_out = tr.out[0].numel()
    best = (math.inf, -1, 0.0, 0.0)
    for j in [-1] + sorted({depth_of[n] for n in req}):
        sc = _structured_cost(steps, j, n_out) if j >= 0 else 0.0
        hc = sum(int(coords[n].numel()) * HVP_COST_FACTOR * above[depth_of[n]] for n in req if depth_of[n] > j)
        if sc + hc < best[0]:
            best = (sc + hc, j, sc, hc)
    _, j, sc, hc = best
    return [n for n in req if depth_of[n] <= j], sc, hc


def exact_diagonal(H, coords: Mapping[str, Tensor], method: str = "auto") -> DiagonalResult:
    """Exact ``H_ii`` at validated flat coordinates ``coords`` (name -> indices), see the module docstring."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    before = H.n_hvp
    values: dict[str, Tensor] = {}
    used: dict[str, str] = {}
    reason: dict[str, str] = {}
    names = [n for n in H.param_names if n in coords]
    todo = list(names)
    if method in ("auto", "structured"):
        traced, covered, why = _plan(H)
        sel = [n for n in names if n in covered]
        if method == "structured":
            bad = [n for n in names if n not in covered]
            if bad:
                raise ValueError(f"method='structured' cannot handle parameter {bad[0]!r}: {why[bad[0]]}; "
                                 "use method='auto' (falls back to HVP columns there)")
        elif sel:
            chosen, _, _ = _choose_structured(traced, sel, coords)
            for n in sel:
                if n not in chosen:
                    reason[n] = "restricted HVP columns are cheaper for these coordinates (cost rule)"
            sel = chosen
        for n in names:
            if n not in covered:
                reason[n] = why[n]
        if sel:
            try:
                full = _structured_diagonal(H, sel, traced)
            except _Unsupported as e:
                if method == "structured":
                    raise ValueError(f"method='structured': {e}") from None
                for n in sel:
                    reason[n] = str(e)
            else:
                for n in sel:
                    values[n] = full[n][coords[n].to(H.device)]
                    used[n] = "structured"
                todo = [n for n in names if n not in values]
        del traced
    if todo and method in ("auto", "layer-hvp"):
        vals, failed = _layer_hvp_diagonal(H, {n: coords[n] for n in todo})
        H.n_hvp += sum(int(coords[n].numel()) for n in vals)
        for n, v in vals.items():
            values[n] = v
            used[n] = "layer-hvp"
        reason.update(failed)
        todo = [n for n in todo if n not in values]
    if todo:
        vals = _hvp_columns_diagonal(H, {n: coords[n] for n in todo})
        for n, v in vals.items():
            values[n] = v
            used[n] = "hvp"
    ordered = {n: values[n] for n in names}
    return DiagonalResult(ordered, {n: coords[n] for n in names}, H.n_hvp - before, {n: used[n] for n in names},
                          {n: reason[n] for n in names if n in reason and used[n] != "structured"})
