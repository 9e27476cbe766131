"""Empirical neural tangent kernel (NTK) of a model on data, via ``torch.func`` (Velikanov et al. 2023, §2 and App. F: the
kernel whose spectrum feeds the SGD theory).

``K[i, j] = sum_theta (d f(x_i) / d theta) (d f(x_j) / d theta)`` at the current parameters. For a network
trained with the square loss ``(1/2N) sum_i (f(x_i) - y_i)^2`` the linearised model's output-space Hessian is
``K / N`` (same nonzero eigenvalues as the parameter-space Gauss-Newton matrix).

* :func:`empirical_ntk`: any ``nn.Module`` (per-sample Jacobians with ``vmap(jacrev)``, in chunks of samples so
  that the Jacobian block stays under a memory budget; for multi-output models the trace over outputs or one
  output).
* :class:`NTKOneHiddenLayer`: the paper's one-hidden-layer ReLU network in NTK parameterisation (authors' code
  ``NTKTwoLayerMLP``: weights N(0, 1) scaled by ``1/sqrt(fan_in)`` in the forward pass, bias N(0, 1) on the hidden
  layer, no output bias) with a closed-form empirical NTK (:meth:`NTKOneHiddenLayer.ntk`) that is O(N^2 m)
  instead of O(N^2 P); a test checks it against :func:`empirical_ntk`.

Pure: parameters, buffers and the global RNG are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["NTKOneHiddenLayer", "empirical_ntk"]


def empirical_ntk(model: nn.Module, inputs: Tensor, params: Iterable[str] | None = None, chunk_size: int | None = None,
                  output: str | int = "trace", memory_budget_mb: float = 512.0) -> Tensor:
    """Empirical NTK ``K = J J^T`` (N x N) of ``model`` on ``inputs`` (N, ...).

    ``params``: names of the parameters to differentiate (default: all requiring grad). ``output``: for a model
    with several outputs per sample, ``"trace"`` sums the per-output kernels (``sum_o J_o J_o^T``) and an int picks
    one output; a scalar-output model ignores it. Per-sample Jacobians are computed in chunks of ``chunk_size``
    samples (default: as many as fit ``memory_budget_mb``); if all Jacobians fit the budget they are kept,
    otherwise off-diagonal blocks recompute them.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a tensor with a leading, non-empty sample dimension")
    named = dict(model.named_parameters())
    names = list(params) if params is not None else [k for k, p in named.items() if p.requires_grad]
    unknown = [k for k in names if k not in named]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; valid: {list(named)}")
    if not names:
        raise ValueError("no parameters to differentiate")
    theta = {k: named[k].detach() for k in names}
    frozen = {k: v.detach() for k, v in named.items() if k not in theta}
    buffers = {k: v for k, v in model.named_buffers()}
    n = inputs.shape[0]
    n_params = sum(v.numel() for v in theta.values())
    with torch.no_grad():
        probe = functional_call(model, ({**theta, **frozen}, buffers), (inputs[:1],))
    n_out = probe[0].numel()
    if not isinstance(output, str):
        if not 0 <= int(output) < n_out:
            raise ValueError(f"output index {output} out of range for a model with {n_out} outputs")
    elif output != "trace":
        raise ValueError(f"output must be 'trace' or an output index, got {output!r}")
    rows_out = n_out if (output == "trace" and n_out > 1) else 1
    bytes_per_row = rows_out * n_params * inputs.element_size()
    if chunk_size is None:
        chunk_size = max(1, int(memory_budget_mb * 2 ** 20 / 4 // bytes_per_row))
    chunk_size = int(min(chunk_size, n))

    def f_single(th: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, ({**th, **frozen}, buffers), (x.unsqueeze(0),)).reshape(-1)
        if n_out == 1:
            return out
        return out if output == "trace" else out[int(output)].reshape(1)

    jac = vmap(jacrev(f_single), in_dims=(None, 0))

    def jac_rows(lo: int, hi: int) -> Tensor:
        J = jac(theta, inputs[lo:hi])  # dict name -> (b, o, *shape)
        return torch.cat([J[k].reshape(hi - lo, J[k].shape[1], -1) for k in names], dim=2)  # (b, o, P)

    bounds = [(i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)]
    keep_all = n * bytes_per_row <= memory_budget_mb * 2 ** 20
    K = torch.empty(n, n, dtype=inputs.dtype)
    cache: dict[int, Tensor] = {}
    for bi, (lo, hi) in enumerate(bounds):
        Ji = cache.get(bi) if keep_all else None
        if Ji is None:
            Ji = jac_rows(lo, hi)
            if keep_all:
                cache[bi] = Ji
        for bj in range(bi + 1):
            lo2, hi2 = bounds[bj]
            Jj = Ji if bj == bi else (cache[bj] if keep_all else jac_rows(lo2, hi2))
            blk = torch.einsum("aop,bop->ab", Ji, Jj)
            K[lo:hi, lo2:hi2] = blk
            K[lo2:hi2, lo:hi] = blk.T
    return K


class NTKOneHiddenLayer(nn.Module):
    """``f(x) = (1/sqrt(m)) sum_j a_j relu(w_j . x / sqrt(d) + b_j)``, NTK parameterisation (Velikanov et al. 2023, App. F;
    authors' ``NTKTwoLayerMLP``): ``w_j ~ N(0, I_d)``, ``b_j ~ N(0, 1)``, ``a_j ~ N(0, 1)``, width m, scalar output.
    Initialised from an explicit ``torch.Generator`` seeded with ``seed``."""

    def __init__(self, in_features: int, width: int = 1000, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features < 1 or width < 1:
            raise ValueError(f"in_features and width must be >= 1, got {in_features}, {width}")
        g = torch.Generator().manual_seed(int(seed))
        self.in_features, self.width = int(in_features), int(width)
        self.weight = nn.Parameter(torch.randn(width, in_features, generator=g, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(width, generator=g, dtype=dtype))
        self.readout = nn.Parameter(torch.randn(width, generator=g, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        h = x @ self.weight.T / math.sqrt(self.in_features) + self.bias
        return torch.relu(h) @ self.readout / math.sqrt(self.width)

    @torch.no_grad()
    def ntk(self, x: Tensor, chunk_size: int = 512) -> Tensor:
        """Closed-form empirical NTK: with ``h = W x / sqrt(d) + b``, ``phi = relu(h)``, ``D = 1[h > 0]``::

            K(x, x') = (1/m) [ phi(x) . phi(x') + sum_j a_j^2 D_j(x) D_j(x') (x . x' / d + 1) ]

        (readout, hidden-weight and hidden-bias gradients), computed in row chunks."""
        x = x.reshape(x.shape[0], -1).to(self.weight.dtype)
        h = x @ self.weight.T / math.sqrt(self.in_features) + self.bias
        phi = torch.relu(h)
        D = (h > 0).to(x.dtype)
        Da = D * self.readout ** 2
        n = x.shape[0]
        K = torch.empty(n, n, dtype=x.dtype)
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            gram = x[lo:hi] @ x.T / self.in_features + 1.0
            K[lo:hi] = (phi[lo:hi] @ phi.T + (Da[lo:hi] @ D.T) * gram) / self.width
        return K
