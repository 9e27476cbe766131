"""Init check (seed 002) speed: per-model cost of `measure_at_init` vs a torch.func baseline, and thread settings.

Ratios against baselines measured in the same process:
1. exact path of ``measure_at_init`` (dense Hessian from the curvature engine, block norms, eigvalsh, trace) vs
   ``torch.func.hessian`` on the flattened parameters + ``eigvalsh`` (target: within 2x of the baseline);
2. gradient-only check (``hessian="none"``) vs the exact path (what ``--hessian none`` saves);
3. one thread (``limit_threads(1)``, the experiments' setting) vs two threads for the exact path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import timeit, write_section  # noqa: E402

from optiscope.lab.init_check import half_mse, limit_threads, measure_at_init, model_factory, teacher_batch  # noqa: E402


def main() -> None:
    model = model_factory("mlp:activation=relu,bias=false", init="he_uniform")(12, 6, 0).double()
    batch = teacher_batch(32, 6, seed=0)
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_flat(flat):
        d, i = {}, 0
        for n in names:
            k = shapes[n].numel()
            d[n] = flat[i:i + k].reshape(shapes[n])
            i += k
        return half_mse(torch.func.functional_call(model, d, (batch[0],)), batch[1])

    def baseline():
        H = torch.func.hessian(loss_flat)(flat0)
        return torch.linalg.eigvalsh(H), torch.trace(H)

    rows = []
    with limit_threads(1):
        t_base = timeit(baseline, repeat=3)
        t_exact = timeit(lambda: measure_at_init(model, half_mse, batch, hessian="full"), repeat=3)
        t_grad = timeit(lambda: measure_at_init(model, half_mse, batch, hessian="none"), repeat=5)
    with limit_threads(2):
        t_two = timeit(lambda: measure_at_init(model, half_mse, batch, hessian="full"), repeat=3)
    n = flat0.numel()
    rows.append(("measure_at_init exact (blocks, eigvalsh, trace)", t_exact, "torch.func.hessian + eigvalsh",
                 t_base, t_exact / t_base, "<= 2"))
    rows.append(("measure_at_init hessian=none", t_grad, "measure_at_init exact", t_exact, t_grad / t_exact, "< 0.1"))
    rows.append(("exact path, 1 thread", t_exact, "exact path, 2 threads", t_two, t_exact / t_two, "<= 1"))
    md = [f"ReLU MLP depth 12, width 6, {n} parameters, 32 samples, float64.", "",
          "| measured | seconds | baseline | seconds | ratio | target |", "|---|---|---|---|---|---|"]
    md += [f"| {a} | {ta:.4f} | {b} | {tb:.4f} | {r:.3f} | {tgt} |" for a, ta, b, tb, r, tgt in rows]
    text = "## Init check (seed 002)\n\n" + "\n".join(md)
    print(text)
    write_section("init", text)


if __name__ == "__main__":
    main()
