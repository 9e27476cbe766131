"""R_med of Adam and SGD+M at iterates with the same training loss (Jiang, Malik, Li 2023, App. A.3, Table 7).

Adam converges faster, so comparing at equal steps could merely reflect "Adam is closer to a minimum with a uniform
Hessian". Under the paper's tuning protocol (``diagonal_uniformity.common.run_pair``), each SGD+M checkpoint ``t2`` whose training
loss is well below the unigram plateau is matched with the Adam step ``t1`` of nearest training loss (whole training
set, recorded every ``loss_every`` steps); a second, identical Adam run measures R_med exactly there (training is
deterministic given seed and data order). Per layer we compare ``R_med^Adam(t1)`` with ``R_med^SGD(t2)`` averaged
over the matched pairs, over ``repeats`` data orders. This experiment uses more SGD+M checkpoints than ``rmed_lm``
(whose primary number is the same comparison) so that more pairs lie below the plateau.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from optiscope.experiments.base import Result, register
from optiscope.experiments.diagonal_uniformity import common as rc


@dataclass(frozen=True)
class SameLossConfig(rc.LMConfig):
    """:class:`LMConfig` with more checkpoints (each SGD+M checkpoint below the plateau yields one matched pair)."""

    n_checkpoints: int = 6


QUICK = SameLossConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                       batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), adam_lrs=(3e-3,), repeats=2, n_checkpoints=3,
                       per_layer=200, max_widen=1)
MEDIUM = dataclasses.replace(QUICK, steps=600, adam_lrs=(3e-3, 1e-2), repeats=3, n_checkpoints=6, max_widen=2)
FULL = SameLossConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                      batch_size=512, sgdm_lrs=(0.01, 0.03, 0.1, 0.3, 1.0), adam_lrs=(1e-4, 3e-4, 1e-3, 3e-3),
                      repeats=8, n_checkpoints=10)


@register("rmed_same_loss", paper="000", title="R_med of Adam vs SGD+M at equal training loss, App. A.3",
          config=SameLossConfig, presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: SameLossConfig, store) -> Result:
    """Jiang et al. 2023, Table 7 analogue: R_med^Adam(t1) vs R_med^SGD(t2) where L_Adam(t1) = L_SGD(t2)."""
    cfg = config
    problem = rc.lm_problem(cfg)
    out = rc.run_pair(cfg, problem)
    premises = rc.protocol_premises(out) + [
        (out.equal_loss is not None, "no SGD+M checkpoint below the plateau that Adam reaches (no equal-loss pairs)")]
    claims = rc.gap_claims(out.equal_loss, "same_loss", "adam", "sgdm",
                           paper_frac="R_med^Adam(t1) < R_med^SGD(t2) for most layers (Table 7)",
                           paper_ratio="ratio > 1 in most layers (Table 7; no size stated)", band=None,
                           premises=premises, what="at equal training loss")
    rc.store_metrics(store, out.metrics)
    rc.plot_loss(store, out.metrics, title="training loss (repeat 0)")
    if out.equal_loss is not None:
        store.write_text("layer_table.md", rc.layer_table_markdown(out.equal_loss))
    _figure(store, out.pairs, out.layers)
    return Result(claims=claims, metrics=rc.pair_metrics(out))


def _figure(store, pairs, layers) -> None:
    from optiscope.utils.plotting import plt

    if not pairs:
        return
    rows = [(p["r_med_sgdm"][j], p["r_med_adam"][j]) for p in pairs for j in range(len(layers))]
    df = pd.DataFrame(rows, columns=["sgdm", "adam"]).replace([np.inf, -np.inf], np.nan).dropna()
    if df.empty:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(df["sgdm"], df["adam"], "o", ms=4)
    lim = [float(df.to_numpy().min()), float(df.to_numpy().max())]
    ax.plot(lim, lim, "k--", lw=1, label="equal")
    ax.set_xlabel("R_med SGD+M at t2")
    ax.set_ylabel("R_med Adam at t1 (same loss)")
    ax.set_title("every layer, every matched pair")
    ax.legend()
    store.save_figure(fig, "same_loss_r_med")
