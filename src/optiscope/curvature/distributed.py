"""A data-parallel Hessian on ``torch.distributed``: each rank holds a shard of the data, the operator is one.

With ``R`` ranks, rank ``r`` holding ``n_r`` samples and ``N = sum_r n_r``, the loss is the exact mean over all
samples

    L(theta) = sum_r (n_r / N) L_r(theta),      L_r = the mean loss over rank r's samples,

so its gradient, its Hessian-vector products and its diagonal are the same weighted sums of the local ones:
``H v = sum_r (n_r / N) H_r v``. :class:`DistributedHessian` computes the local result exactly as
:class:`~optiscope.curvature.hessian.Hessian` does on one process (kept gradient graphs, chunking by measured
speed, the structured exact diagonal), multiplies it by ``n_r / N`` and all-reduces it (SUM): **one collective
per HVP batch** (and one per loss, gradient or exact diagonal). Everything built on those primitives (Lanczos and
power iteration, Hutchinson, Hutch++, XTrace, SLQ densities, exact sampled diagonals, diagonal blocks, block
norms, preconditioned eigenvalues) then runs identically on every rank: random probes come from the estimator's
seed, the same on every rank, and the all-reduced vectors are bit-identical across ranks (a reduction computes
each entry once and broadcasts it), so every rank gets the same result to the last bit, equal (to rounding) to a
single process that holds all the data.

Construction is collective (every rank of the group must construct it, with the same arguments apart from the
data) and checks, with a timeout on every collective so that nothing hangs:

* every shard is non-empty (a ``ValueError`` on every rank names the empty ones);
* the parameters are identical on every rank: a CRC32 checksum per parameter tensor is all-gathered, and a
  ``ValueError`` names the first parameter that differs and the ranks;
* the local construction succeeded everywhere (an error on one rank is re-raised there and reported on the
  others, instead of leaving them waiting in the next collective; a non-finite loss on any rank raises
  :class:`~optiscope.curvature._problem.NonFiniteLossError` on every rank, so training code sees divergence).

A :class:`torch.nn.parallel.DistributedDataParallel` model is accepted: the wrapped ``model.module`` is used (its
parameter names, without the ``module.`` prefix). The Hessian evaluates detached copies of the parameters through
:func:`torch.func.functional_call`, so DDP's gradient hooks never fire and its reducer and ``.grad`` are untouched.

Typical use under ``torchrun`` (``docs/distributed.md``)::

    dist.init_process_group("gloo")          # or "nccl" with one GPU per rank
    H = DistributedHessian(ddp_model, loss_fn, my_shard)
    top = H.eigenvalues(k=1).values[0]       # the same number on every rank
"""

from __future__ import annotations

import datetime
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from optiscope.curvature._problem import NonFiniteLossError, _batch_size, normalize_data
from optiscope.curvature.diagonal import DiagonalResult, exact_diagonal
from optiscope.curvature.hessian import Hessian

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedHessian", "unwrap_ddp"]

#: seconds every collective of :class:`DistributedHessian` waits for the other ranks before raising
DEFAULT_TIMEOUT_S = 120.0


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module wrapped by ``DistributedDataParallel`` (or ``DataParallel``), else ``model`` itself."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _local_samples(data: Any) -> tuple[int, str | None]:
    """``(number of samples, None)`` for a valid shard; ``(0, reason)`` for an empty one; the data's own
    ValueError text as ``(-1, message)`` for malformed data."""
    try:
        batches = normalize_data(data)
    except ValueError as e:
        msg = str(e)
        return (0, msg) if "empty" in msg else (-1, msg)
    return sum(_batch_size(x) for x, _ in batches), None


def _checksums(model: nn.Module, names: list[str]) -> list[int]:
    """CRC32 of the bytes of each named parameter (CPU copy), in order."""
    named = dict(model.named_parameters())
    out = []
    for n in names:
        t = named[n].detach().to("cpu").contiguous()
        out.append(zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes()))
    return out


class DistributedHessian(Hessian):
    """Hessian of the mean loss over the samples of **all ranks** of ``process_group`` (module docstring).

    Parameters
    ----------
    model, loss_fn, params, chunk_size, memory_budget_mb, batch_mode, keep_graph, device
        As for :class:`~optiscope.curvature.hessian.Hessian`; ``model`` may be a ``DistributedDataParallel``
        (its ``.module`` is used). Every rank must pass the same model parameters and options.
    data : this rank's shard: one ``(inputs, targets)`` batch or an iterable of batches (non-empty on every rank).
    process_group : a ``torch.distributed`` process group, default the global (WORLD) group.
    timeout_s : float
        Seconds every collective waits for the other ranks before raising ``RuntimeError`` (a rank that died or
        took another code path), instead of hanging.

    Attributes: ``rank``, ``world_size``, ``n_local`` (this rank's samples), ``n_total`` (all ranks'),
    ``weight = n_local / n_total``, ``n_allreduce`` (collectives on results so far), ``allreduce_seconds``
    (wall time spent in them, including waiting for slower ranks).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any,
                 params: Iterable[str] | None = None, chunk_size: int | None = None,
                 memory_budget_mb: float = 512.0, batch_mode: str = "double-backward", *,
                 keep_graph: bool | None = None, device: Any = None, process_group: Any = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, distributed: bool = True):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DistributedHessian needs torch.distributed initialised (dist.init_process_group, e.g. "
                             "under torchrun); for one process use Hessian")
        if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.group = process_group
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.backend = dist.get_backend(process_group)
        self.n_allreduce = 0
        self.allreduce_seconds = 0.0
        self._local_only = False
        model = unwrap_ddp(model) if isinstance(model, nn.Module) else model
        # CPU tensors for gloo, the model's GPU for NCCL
        self._comm_device = torch.device("cpu")
        if self.backend == "nccl":
            self._comm_device = torch.device("cuda", torch.cuda.current_device())

        # 1. shards: sizes (and empty or malformed ones), all-gathered before any local work
        n_local, why = _local_samples(data)
        sizes = self._gather_ints([n_local])[:, 0]
        bad = [r for r in range(self.world_size) if sizes[r] < 0]
        if bad:
            raise ValueError(f"data on rank {self.rank}: {why}" if self.rank in bad else
                             f"the data shard of rank(s) {bad} is malformed (see the error on that rank)")
        empty = [r for r in range(self.world_size) if sizes[r] == 0]
        if empty:
            raise ValueError(f"DistributedHessian: the data shard of rank(s) {empty} is empty (0 samples); every rank "
                             f"needs at least one sample (shard sizes {sizes.tolist()})")
        self.n_local = int(n_local)
        self.n_total = int(sizes.sum())
        self.shard_sizes = [int(s) for s in sizes]
        self.weight = self.n_local / self.n_total

        # 2. parameters: the same names, shapes, dtypes and values on every rank
        if isinstance(model, nn.Module):
            named = dict(model.named_parameters())
            names = ([n for n, p in named.items() if p.requires_grad] if params is None else
                     [n for n in named if n in set([params] if isinstance(params, str) else params)])
            layout = zlib.crc32(repr([(n, tuple(named[n].shape), str(named[n].dtype)) for n in names]).encode())
            heads = self._gather_ints([len(names), layout])
            if len({tuple(h) for h in heads.tolist()}) > 1:
                raise ValueError(f"DistributedHessian: the ranks differ in their parameters' names, shapes or dtypes "
                                 f"(number of parameters per rank: {heads[:, 0].tolist()}); every rank must hold the "
                                 "same model")
            sums = self._gather_ints(_checksums(model, names))
            for j, n in enumerate(names):
                col = sums[:, j]
                if bool((col != col[0]).any()):
                    other = [r for r in range(self.world_size) if col[r] != col[0]]
                    raise ValueError(f"DistributedHessian: parameter {n!r} differs across ranks (rank(s) {other} "
                                     "differ from rank 0, CRC32 checksum); every rank must hold identical parameters "
                                     "(broadcast them, or wrap the model in DistributedDataParallel)")

        # 3. the local operator; a failure on one rank is reported on all
        error: BaseException | None = None
        try:
            super().__init__(model, loss_fn, data, params, chunk_size, memory_budget_mb, batch_mode,
                             keep_graph=keep_graph, device=device)
            local_chunk = self.max_chunk_size if chunk_size is None else int(chunk_size)
        except Exception as e:  # noqa: BLE001 - re-raised below on this rank, reported on the others
            error, local_chunk = e, 1
        code = 0 if error is None else (2 if isinstance(error, NonFiniteLossError) else 1)
        status = self._gather_ints([code, local_chunk])
        failed = [r for r in range(self.world_size) if status[r, 0]]
        if failed:
            if error is not None:
                raise error
            if all(status[r, 0] == 2 for r in failed):  # divergence is an outcome: the same exception everywhere
                raise NonFiniteLossError(f"the loss is not finite on rank(s) {failed} (their data shard)")
            raise ValueError(f"DistributedHessian: construction failed on rank(s) {failed} (see the error there)")
        # loops outside the HVP (chunks of unit columns, Hutchinson diagonal, SLQ groups) must run the same number
        # of iterations on every rank: the smallest memory bound of all ranks
        if chunk_size is None:
            self._max_chunk = int(status[:, 1].min())
        self._loss_value = float(self._reduce(torch.tensor([self._loss_value], dtype=torch.float64))[0])

    # ------------------------------------------------------------------------------------------ collectives
    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise RuntimeError(f"DistributedHessian: {what} did not complete within {self.timeout.total_seconds():g} "
                               f"s on rank {self.rank} of {self.world_size} (another rank died, or took another code "
                               f"path): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    def _gather_ints(self, values: list[int]) -> np.ndarray:
        """All-gather a short list of integers (the same length on every rank): ``[world_size, len]``."""
        t = torch.tensor(values, dtype=torch.int64, device=self._comm_device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), "all_gather at construction")
        return torch.stack(out).cpu().numpy()

    def _reduce(self, local: Tensor) -> Tensor:
        """``sum_r (n_r / N) local_r`` (one all-reduce), on the operator's device."""
        import time

        buf = (local * self.weight).to(self._comm_device).contiguous()
        t0 = time.perf_counter()
        self._wait(dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True), "all_reduce")
        self.allreduce_seconds += time.perf_counter() - t0
        self.n_allreduce += 1
        return buf.to(self.device)

    def _reduce_dict(self, d: dict[str, Tensor], names: list[str], lead_dims: int) -> dict[str, Tensor]:
        """A dict of tensors with ``lead_dims`` leading (batch) dimensions, reduced in one collective."""
        lead = d[names[0]].shape[:lead_dims]
        flat = torch.cat([d[n].reshape(*lead, -1) for n in names], dim=-1)
        red = self._reduce(flat)
        out, pos = {}, 0
        for n in names:
            k = int(np.prod(d[n].shape[lead_dims:], dtype=np.int64))
            out[n] = red[..., pos:pos + k].reshape(d[n].shape)
            pos += k
        return out

    # ------------------------------------------------------------------------------------------ the primitives
    def _apply(self, V: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
        """``H V = sum_r (n_r / N) H_r V``: the local product (graph reuse and chunking as in ``Hessian``), then one
        all-reduce for the whole batch of vectors."""
        local = super()._apply(V, batched)
        if self._local_only:
            return local
        return self._reduce_dict(local, self.param_names, 1 if batched else 0)

    def gradient(self) -> dict[str, Tensor]:
        """``nabla L = sum_r (n_r / N) nabla L_r`` (one all-reduce)."""
        return self._reduce_dict(super().gradient(), self.param_names, 0)

    def diagonal(self, coords: Mapping[str, Any], method: str = "auto") -> DiagonalResult:
        """Exact ``H_ii`` at the given flat indices: each rank computes its local diagonal with ``method``
        (structured second-order backpropagation, restricted or full HVP columns, chosen locally as in
        ``Hessian.diagonal``), then one all-reduce of all the values. ``n_hvp`` counts this rank's local products."""
        checked = self._check_coords(coords)
        self._local_only = True
        try:
            r = exact_diagonal(self, checked, method=method)
        finally:
            self._local_only = False
        names = list(r.values)
        r.values = self._reduce_dict(r.values, names, 0) if names else r.values
        return r

    def __repr__(self) -> str:
        return (f"DistributedHessian(numel={self.numel}, rank={self.rank}/{self.world_size}, "
                f"samples={self.n_local}/{self.n_total}, backend={self.backend}, n_hvp={self.n_hvp})")
