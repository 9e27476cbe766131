"""Worker for tests/test_distributed.py, launched by ``torchrun --nproc_per_node=2`` (gloo, CPU, 1 thread).

Every rank holds an uneven shard of one float64 data set and builds a ``DistributedHessian``; every rank also
builds the single-process ``Hessian`` on all the data (in the same batch order) as the reference. Checks:

* hvp, hvp_batch, gradient, loss, eigenvalues (Lanczos, power, preconditioned), trace (Hutchinson, Hutch++,
  XTrace, adaptive), SLQ density, Hutchinson diagonal, exact diagonal (structured, layer-hvp, hvp), diagonal
  block, block norms (exact and sampled), dense: equal to the reference within 1e-10 (relative), and to the dense
  ``torch.func.hessian`` where it applies;
* every number is bit-identical on both ranks (all-gathered and compared with ==);
* a DistributedDataParallel model: same results, no ``.grad`` written, DDP's reducer still averages gradients;
* mismatched parameters and an empty shard: ValueError on every rank naming the problem, no hang; a non-finite
  loss on one rank: NonFiniteLossError on every rank;
* a rank that never joins: RuntimeError after the collective timeout, no hang.

Prints ``WORKER OK rank=R`` at the end; any failed check raises (non-zero exit).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from optiscope.curvature import Hessian
from optiscope.curvature.distributed import DistributedHessian

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
TOL = 1e-10


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: {what}")


def close(a, b, what: str, tol: float = TOL) -> None:
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    check(a.shape == b.shape and err <= tol * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})")


def flat(d, names) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Sigmoid(), nn.Linear(4, 3))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    check(world == 2, "the test expects 2 ranks")
    g = torch.Generator().manual_seed(123)
    X = torch.randn(23, 5, generator=g)
    Y = torch.randint(0, 3, (23,), generator=g)
    # rank 0: two batches (6 + 4 samples); rank 1: one batch of 13 samples
    shards = [[(X[:6], Y[:6]), (X[6:10], Y[6:10])], [(X[10:], Y[10:])]]
    everything = shards[0] + shards[1]
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    H = DistributedHessian(model, loss_fn, shards[rank])
    R = Hessian(model, loss_fn, everything)
    names = R.param_names
    check(H.n_total == 23 and H.n_local == (10 if rank == 0 else 13), f"sample counts {H.n_local}/{H.n_total}")
    dense = torch.func.hessian(lambda p: sum(len(y) / 23 * loss_fn(torch.func.functional_call(model, p, (x,)), y)
                                             for x, y in everything))(dict(R.params))
    D = torch.cat([torch.cat([dense[a][b].reshape(R.sizes[a], R.sizes[b]) for b in names], 1) for a in names], 0)
    results: list[float] = []  # every number, all-gathered at the end to check bit-identity across ranks

    def record(x) -> None:
        results.extend(torch.as_tensor(x, dtype=torch.float64).reshape(-1).tolist())

    close(H.loss(), R.loss(), "loss")
    record(H.loss())
    close(flat(H.gradient(), names), flat(R.gradient(), names), "gradient")
    record(flat(H.gradient(), names))
    v = {n: torch.randn(p.shape, generator=g) for n, p in R.params.items()}
    hv = flat(H.hvp(v), names)
    close(hv, flat(R.hvp(v), names), "hvp")
    close(hv, D @ flat(v, names), "hvp vs dense")
    record(hv)
    V = {n: torch.randn((5, *p.shape), generator=g) for n, p in R.params.items()}
    close(H.flatten(H.hvp_batch(V)), R.flatten(R.hvp_batch(V)), "hvp_batch")
    record(H.flatten(H.hvp_batch(V)))

    ev = H.eigenvalues(k=2, which="LA", tol=1e-10)
    close(ev.values, R.eigenvalues(k=2, which="LA", tol=1e-10).values, "lanczos eigenvalues")
    close(ev.values, torch.linalg.eigvalsh(D).flip(0)[:2], "lanczos vs dense", tol=1e-8)
    record(ev.values)
    record(flat(ev.vectors[0], names))
    ev = H.eigenvalues(k=1, which="SA", tol=1e-10)
    close(ev.values, R.eigenvalues(k=1, which="SA", tol=1e-10).values, "lanczos SA")
    record(ev.values)
    pw = H.eigenvalues(k=1, which="LM", method="power", tol=1e-8, max_iter=300)
    close(pw.values, R.eigenvalues(k=1, which="LM", method="power", tol=1e-8, max_iter=300).values, "power")
    record(pw.values)
    P = {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in R.params.items()}
    pe = H.eigenvalues(k=1, preconditioner=P, tol=1e-10)
    close(pe.values, R.eigenvalues(k=1, preconditioner=P, tol=1e-10).values, "preconditioned eigenvalue")
    record(pe.values)

    for method in ("hutchinson", "hutch++", "xtrace", "adaptive"):
        t = H.trace(n_probes=30, method=method, seed=3)
        close(t.value, R.trace(n_probes=30, method=method, seed=3).value, f"trace {method}")
        record(t.value)
    dens = H.density(n_probes=3, n_lanczos=20, seed=1)
    rdens = R.density(n_probes=3, n_lanczos=20, seed=1)
    close(dens.nodes, rdens.nodes, "SLQ nodes", tol=1e-8)
    close(dens.weights, rdens.weights, "SLQ weights", tol=1e-8)
    record(dens.nodes)
    de = H.diagonal_estimate(n_probes=8, seed=2)
    close(flat(de.mean, names), flat(R.diagonal_estimate(n_probes=8, seed=2).mean, names), "Hutchinson diagonal")
    record(flat(de.mean, names))

    coords = H.sample_coordinates(per_layer=6, seed=0)
    truth = torch.diagonal(D)
    for method in ("structured", "layer-hvp", "hvp", "auto"):
        d = H.diagonal(coords, method=method)
        rd = R.diagonal(coords, method=method)
        check(set(d.method.values()) <= {method} or method == "auto", f"diagonal method {d.method}")
        for n in names:
            close(d.values[n], rd.values[n], f"diagonal {method} {n}")
            close(d.values[n], truth[R.offsets[n] + coords[n]], f"diagonal {method} {n} vs dense")
            record(d.values[n])
    blk = H.diagonal_block(coords)
    close(blk.matrix, R.diagonal_block(coords).matrix, "diagonal block")
    record(blk.matrix)
    for exact in (True, False):
        b = H.block_norms(exact=exact, n_probes=4, seed=5)
        close(b.frobenius, R.block_norms(exact=exact, n_probes=4, seed=5).frobenius, f"block norms exact={exact}")
        record(b.frobenius)
    close(H.dense(), D, "dense", tol=1e-9)
    check(H.n_allreduce > 10, f"collectives counted: {H.n_allreduce}")

    # a DistributedDataParallel model: the wrapped module is used, no gradient hook fires during the probes
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(make_model())
    HD = Hessian.distributed(ddp, loss_fn, shards[rank])  # the factory on Hessian
    check(isinstance(HD, DistributedHessian), "Hessian.distributed returns a DistributedHessian")
    HC = Hessian(ddp, loss_fn, shards[rank], distributed=True)  # the constructor form
    check(isinstance(HC, DistributedHessian), "Hessian(..., distributed=True) returns a DistributedHessian")
    close(flat(HC.hvp(v), names), flat(R.hvp(v), names), "Hessian(distributed=True) hvp")
    check(HD.param_names == names, f"DDP parameter names {HD.param_names}")
    close(flat(HD.hvp(v), names), flat(R.hvp(v), names), "DDP hvp")
    close(HD.eigenvalues(k=1, tol=1e-10).values, R.eigenvalues(k=1, tol=1e-10).values, "DDP eigenvalue")
    HD.diagonal(coords)
    check(all(p.grad is None for p in ddp.parameters()), "a probe wrote .grad of the DDP model")
    x, y = shards[rank][0]
    loss_fn(ddp(x), y).backward()  # DDP's reducer must still average the gradients across ranks
    local = torch.autograd.grad(loss_fn(ddp.module(x), y), list(ddp.module.parameters()))
    mine = torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])
    allg = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(allg, mine)
    close(allg[0], allg[1], "DDP gradients after a probe (averaged by the reducer)")
    locs = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(locs, torch.cat([t.reshape(-1) for t in local]))
    close(mine, (locs[0] + locs[1]) / 2, "DDP gradient is the average of the local ones")

    # bit-identical across ranks
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    check(gathered[0] == gathered[1], "results differ across ranks in the last bit: "
          f"{sum(a != b for a, b in zip(gathered[0], gathered[1]))} of {len(results)}")

    # errors: mismatched parameters (rank 1 perturbs one entry), empty shard; both ranks must raise
    bad = make_model()
    if rank == 1:
        with torch.no_grad():
            bad[2].bias[1] += 1e-12
    try:
        DistributedHessian(bad, loss_fn, shards[rank], timeout_s=30)
    except ValueError as e:
        check("'2.bias'" in str(e) and "differs across ranks" in str(e), f"mismatch message: {e}")
        print(f"rank {rank} mismatch error: {e}", flush=True)
    else:
        check(False, "mismatched parameters were accepted")
    try:
        DistributedHessian(model, loss_fn, shards[0] if rank == 0 else [], timeout_s=30)
    except ValueError as e:
        check("rank(s) [1]" in str(e) and "empty" in str(e), f"empty-shard message: {e}")
        print(f"rank {rank} empty-shard error: {e}", flush=True)
    else:
        check(False, "an empty shard was accepted")
    try:
        DistributedHessian(model, loss_fn, (X[:0], Y[:0]) if rank == 0 else shards[1], timeout_s=30)
    except ValueError as e:
        check("rank(s) [0]" in str(e) and "empty" in str(e), f"empty-batch message: {e}")
    else:
        check(False, "a 0-sample batch was accepted")

    from optiscope.curvature import NonFiniteLossError

    nan_x = X[10:].clone()
    nan_x[0, 0] = float("nan")
    try:
        DistributedHessian(model, loss_fn, shards[0] if rank == 0 else (nan_x, Y[10:]), timeout_s=30)
    except NonFiniteLossError as e:
        check(rank == 1 or "rank(s) [1]" in str(e), f"non-finite message: {e}")
    else:
        check(False, "a non-finite loss on one rank was accepted")

    # a rank that never joins: the collective times out instead of hanging (last: the group is unusable after)
    dist.barrier()
    if rank == 0:
        t0 = time.perf_counter()
        try:
            DistributedHessian(model, loss_fn, shards[0], timeout_s=3)
        except RuntimeError as e:
            took = time.perf_counter() - t0
            check("did not complete within 3 s" in str(e) and took < 30, f"timeout after {took:.1f} s: {e}")
            print(f"rank 0 timeout error after {took:.1f} s: {str(e)[:120]}", flush=True)
        else:
            check(False, "a missing rank did not time out")
    else:
        time.sleep(6)
    print(f"WORKER OK rank={rank}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip destroy_process_group: the timed-out collective left the group unusable


def tracker_main(store: str) -> None:
    """``Tracker(distributed=True)`` in a DDP training loop: each rank trains on its own batches; the probes are
    over both ranks' probe data; only rank 0 writes ``store``; resume continues the run."""
    import numpy as np
    from torch.nn.parallel import DistributedDataParallel

    from optiscope.lab.store import RunStore
    from optiscope.lab.tracker import Tracker

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7)
    X = torch.randn(40, 5, generator=g)
    Y = torch.randint(0, 3, (40,), generator=g)
    probe = [(X[:9], Y[:9]), (X[9:20], Y[9:20])]  # rank 0: 9 samples, rank 1: 11
    train = [(X[20 + 10 * rank + 2 * k: 22 + 10 * rank + 2 * k], Y[20 + 10 * rank + 2 * k: 22 + 10 * rank + 2 * k])
             for k in range(5)]
    ddp = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    tr = Tracker(ddp, loss_fn, probe[rank], probes=["loss", "sharpness", "grad_norm"], every=2, store=store,
                 distributed=True, name="ddp")
    check((tr.store is None) == (rank != 0), f"rank {rank} store {tr.store}")
    seen = {}
    for t in range(5):
        flat_metrics = tr.step(t, optimizer=opt)
        if flat_metrics is not None:
            R = Hessian(ddp.module, loss_fn, probe)
            D = R.dense()
            close(flat_metrics["sharpness"], torch.linalg.eigvalsh(D)[-1], f"sharpness at step {t}", tol=1e-6)
            close(flat_metrics["loss"], R.loss(), f"loss at step {t}")
            close(flat_metrics["grad_norm"], float(R.flatten(R.gradient()).norm()), f"grad_norm at step {t}")
            seen[t] = flat_metrics
        x, y = train[t]
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        opt.step()
    tr.close()
    gathered = [None] * 2
    dist.all_gather_object(gathered, seen)
    check(gathered[0] == gathered[1], "tracker metrics differ across ranks")
    # resume from step 2 (a restarted loop): rank 0's store drops steps >= 2 and measures them again
    tr2 = Tracker(ddp, loss_fn, probe[rank], probes=["loss", "sharpness", "grad_norm"], every=2, store=store,
                  distributed=True, name="ddp", resume=True)
    tr2.step(2)
    tr2.close()
    dist.barrier()
    if rank == 0:
        df = RunStore(store).read_metrics()
        steps = sorted(set(df[df["metric"] == "sharpness"]["step"].tolist()))
        check(steps == [0, 2], f"steps in the store after resume: {steps}")
        check(int((df["metric"] == "sharpness").sum()) == 2, "duplicate rows after resume")
        check(bool(np.isclose(df[(df.metric == "loss") & (df.step == 0)]["value"].iloc[0], seen[0]["loss"],
                              rtol=1e-6)), "stored loss")
    print(f"TRACKER OK rank={rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "tracker":
        tracker_main(sys.argv[2])
    else:
        main()
