"""Experiments 1, 2 and 6 of issue 8: R_med along SGD+M and Adam trajectories of a small causal transformer.

* ``rmed_lm`` (seed 000 §4.1, Tables 1-2(a)): byte-level language modelling on ``fortunes``. SGD+M (momentum
  0.9, best lr of a grid) and Adam from the same initialisation and the same batch order, ``repeats`` data orders,
  R_med on 200 exact Hessian-diagonal coordinates per weight matrix at a few checkpoints.
* ``rmed_lm_random`` (§4.2, Table 2(b)): the same inputs with uniformly random next-token targets; ``delta`` is
  the extra denominator term the seed adds there (its value is not in the seed text; option, default 0).
* ``rmed_lm_wd`` (App. A.7, Table 9): both optimizers with weight decay 0.001 (L2 added to the gradient, the
  PyTorch convention for both SGD and Adam).

Each reports a per-layer table (mean R_med (std) of both and their ratio), the fraction of layers (the first
``exclude_first`` excluded) where Adam's R_med is smaller, the median ratio with a bootstrap 95% interval over
repeats, whether Adam trained faster, and the cost of one R_med checkpoint (HVPs, seconds).
"""

from __future__ import annotations

import dataclasses

from optiscope.experiments import _rmed_common as rc
from optiscope.experiments.base import Claim, Result, register

QUICK = rc.LMConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                    batch_size=256, tune_steps=40, repeats=2, n_checkpoints=2, per_layer=200)
FULL = rc.LMConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                   batch_size=512, sgdm_lrs=(0.03, 0.1, 0.3, 1.0), tune_steps=300, adam_lr=1e-3, repeats=8,
                   n_checkpoints=10)


def _lm_result(cfg: rc.LMConfig, store, random_targets: bool, paper_note: str) -> Result:
    problem = rc.lm_problem(cfg, random_targets=random_targets)
    out = rc.run_pair(cfg, problem)
    speed = rc.faster(out.metrics, "adam", "sgdm")
    claims = [Claim("adam_faster", "Adam (at its lr) reaches a lower training loss than SGD+M at its best lr",
                    paper="Adam converges faster", measured=speed, holds=speed["a_faster"])]
    claims += rc.gap_claims(out.summary, "adam_vs_sgdm", "adam", "sgdm", paper_ratio=paper_note)
    rc.store_metrics(store, out.metrics)
    rc.plot_loss(store, out.metrics, title="training loss (repeat 0)")
    rc.plot_rmed_over_time(store, out.metrics, out.layers)
    store.write_text("layer_table.md", rc.layer_table_markdown(out.summary))
    return Result(claims=claims, metrics=rc.pair_metrics(out))


@register("rmed_lm", paper="000", title="R_med of Adam vs SGD+M on a small transformer LM (fortunes), §4.1",
          config=rc.LMConfig, presets={"quick": QUICK, "full": FULL})
def run_lm(config: rc.LMConfig, store) -> Result:
    """Seed 000 Tables 1-2(a) analogue: per-layer R_med of SGD+M and Adam from the same initialisation."""
    return _lm_result(config, store, False, "1.4-2x in most layers (Tables 1, 2(a))")


@register("rmed_lm_random", paper="000", title="R_med of Adam vs SGD+M with random targets, §4.2",
          config=rc.LMConfig, presets={"quick": QUICK, "full": dataclasses.replace(FULL, sgdm_lrs=(0.015, 0.05, 0.15))})
def run_lm_random(config: rc.LMConfig, store) -> Result:
    """Seed 000 Table 2(b) analogue: random next-token targets; the seed finds a larger gap than on real data."""
    return _lm_result(config, store, True, "larger gap than on real targets (Table 2(b))")


@register("rmed_lm_wd", paper="000", title="R_med of Adam vs SGD+M with weight decay 0.001, App. A.7",
          config=rc.LMConfig, presets={"quick": dataclasses.replace(QUICK, weight_decay=1e-3),
                                       "full": dataclasses.replace(FULL, weight_decay=1e-3)})
def run_lm_wd(config: rc.LMConfig, store) -> Result:
    """Seed 000 Table 9 analogue: both optimizers with a small weight decay."""
    return _lm_result(config, store, False, "Adam's R_med smaller in most layers under weight decay 1e-3 (Table 9)")
