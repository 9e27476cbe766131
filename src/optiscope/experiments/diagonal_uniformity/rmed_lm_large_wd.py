"""R_med of Adam and SGD+M under large weight decay (Jiang, Malik, Li 2023, §4.4 and App. A.7).

The paper compares both optimizers with weight decay 0.001 (App. A.7, Table 9: Adam faster, R_med smaller; that is
``rmed_lm_wd``) and adds: "under large weight decay parameters, we observed cases where Adam still converged faster
but R_med^Adam values were larger rather than smaller." Which values are large is not stated. The default here is
``weight_decay = 0.01``, ten times the small value, applied as L2 added to the gradient for both optimizers (the
PyTorch convention the small-value experiment uses): with 0.1 neither optimizer leaves the unigram plateau on this
model (training loss 1.02 and 1.00 x the unigram entropy after 200 steps at SGD+M lr 0.1 and Adam lr 3e-3, against
0.83 and 0.80 with 0.01), so nothing could be compared.

Protocol: ``rmed_lm``'s (:func:`optiscope.experiments.diagonal_uniformity.common.run_pair`): SGD+M's lr tuned over
the whole horizon on a grid widened until its best point lies strictly inside, Adam's lr one under which it is
faster, ``repeats`` data orders from one initialisation, R_med at ``n_checkpoints`` checkpoints, equal-step and
equal-loss (App. A.3) comparisons. The claims are the paper's observation: Adam faster, and R_med(Adam) *larger* than
R_med(SGD+M) in most layers (direction claims; the paper gives no size). Untestable when tuned SGD+M stays on the
unigram plateau or Adam is not faster.

Control (``control = true``): the same protocol at the small weight decay ``control_weight_decay`` (0.001, App.
A.7), where the paper finds the usual direction (Adam's R_med smaller); the pair of results shows whether the
direction depends on the weight decay in this setting.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from optiscope.experiments.base import Result, register
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.utils.config import require


@dataclass(frozen=True)
class LargeWDConfig(rc.LMConfig):
    """:class:`LMConfig` with a large default weight decay and the optional small-weight-decay control."""

    weight_decay: float = 0.01
    control: bool = False
    control_weight_decay: float = 1e-3

    def validate(self) -> None:
        super().validate()
        require(self.weight_decay > 0, "weight_decay", self.weight_decay, "> 0")
        require(0 <= self.control_weight_decay < self.weight_decay, "control_weight_decay",
                self.control_weight_decay, f"in [0, weight_decay = {self.weight_decay})")


QUICK = LargeWDConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                      batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), adam_lrs=(3e-3,), repeats=2, n_checkpoints=1,
                      per_layer=100, max_widen=1)
MEDIUM = dataclasses.replace(QUICK, steps=600, adam_lrs=(3e-3, 1e-2), repeats=3, n_checkpoints=3, per_layer=200,
                             max_widen=2, control=True)
FULL = LargeWDConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                     batch_size=512, sgdm_lrs=(0.01, 0.03, 0.1, 0.3, 1.0), adam_lrs=(1e-4, 3e-4, 1e-3, 3e-3),
                     repeats=8, n_checkpoints=10, control=True, device="auto")


def swapped_equal_loss(pairs: Sequence[dict], layers: Sequence[str], cfg: Any) -> dict | None:
    """:func:`common.gap_summary` of the equal-loss pairs (App. A.3) with the roles swapped: A = SGD+M, B = Adam
    (``frac_layers_a_smaller`` = fraction of layers where SGD+M's R_med is below Adam's, ``median_ratio`` = median of
    ``R_Adam / R_SGD``). Per repeat, the mean over its pairs of each layer's R_med; ``None`` without pairs."""
    reps = sorted({p["repeat"] for p in pairs})
    if not reps:
        return None
    va = np.array([np.nanmean([p["r_med_sgdm"] for p in pairs if p["repeat"] == r], axis=0) for r in reps], float)
    vb = np.array([np.nanmean([p["r_med_adam"] for p in pairs if p["repeat"] == r], axis=0) for r in reps], float)
    return rc.gap_summary(va, vb, layers, cfg.exclude_first, cfg.n_bootstrap, cfg.seed, name_a="sgdm", name_b="adam")


def large_wd_claims(out: rc.PairOutcome, cfg: LargeWDConfig) -> list:
    """Adam faster, and R_med(Adam) > R_med(SGD+M) in most layers at equal loss and at equal steps (direction
    claims through :func:`common.gap_claims` with A = SGD+M, B = Adam), under the protocol premises."""
    premises = rc.protocol_premises(out)
    claims = [rc.faster_claim(out.final_losses["adam"], out.final_losses["sgdm"], "adam", "sgdm",
                              paper=f"Adam still converged faster under large weight decay (§4.4; here "
                                    f"{cfg.weight_decay:g})",
                              extra={"adam_lr": out.adaptive.lr, "sgdm_lr": out.sgdm_lr,
                                     "sgdm_relative_to_unigram": out.plateau["relative_sgdm"]})]
    paper = "R_med^Adam larger rather than smaller under large weight decay (§4.4; no size stated)"
    swapped = swapped_equal_loss(out.pairs, out.layers, cfg)
    claims += rc.gap_claims(swapped, "adam_larger_equal_loss", "sgdm", "adam", paper_frac=paper, paper_ratio=paper,
                            band=None, premises=premises + [(swapped is not None, ("no SGD+M checkpoint below the "
                                                             "plateau that Adam reaches (no equal-loss pairs)"))],
                            what=f"at equal training loss (App. A.3), weight decay {cfg.weight_decay:g}")
    eq_step = rc.gap_summary(rc.rmed_values(out.metrics, "sgdm", out.layers, at=cfg.at),
                             rc.rmed_values(out.metrics, "adam", out.layers, at=cfg.at), out.layers,
                             cfg.exclude_first, cfg.n_bootstrap, cfg.seed, name_a="sgdm", name_b="adam")
    claims += rc.gap_claims(eq_step, "adam_larger_equal_step", "sgdm", "adam", paper_frac=paper, paper_ratio=paper,
                            band=None, premises=premises, what=f"at equal steps, weight decay {cfg.weight_decay:g}")
    return claims


def control_claims(out: rc.PairOutcome | None, cfg: LargeWDConfig) -> list:
    """The small-weight-decay control (App. A.7, Table 9): R_med(Adam) < R_med(SGD+M) in most layers at equal loss
    (direction claims); untestable when the control was not run or its premises fail."""
    wd = cfg.control_weight_decay
    paper = f"R_med^Adam < R_med^SGD in most layers except the first several at weight decay {wd:g} (Table 9)"
    if out is None:
        return rc.gap_claims(None, "control_small_wd_equal_loss", "adam", "sgdm", paper_frac=paper,
                             paper_ratio=paper, band=None, premises=[(False, ("the small-weight-decay control was "
                                                                      "not run (control = false at this tier)"))],
                             what=f"at equal training loss, weight decay {wd:g}")
    return rc.gap_claims(out.equal_loss, "control_small_wd_equal_loss", "adam", "sgdm", paper_frac=paper,
                         paper_ratio=paper, band=None,
                         premises=rc.protocol_premises(out) + [(out.equal_loss is not None, "no equal-loss pairs")],
                         what=f"at equal training loss, weight decay {wd:g}")


@register("rmed_lm_large_wd", paper="000", title="R_med of Adam vs SGD+M under large weight decay (Adam faster, "
          "R_med larger?), §4.4, App. A.7", config=LargeWDConfig,
          presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: LargeWDConfig, store) -> Result:
    """Jiang et al. 2023, §4.4: under large weight decay, Adam faster but its R_med larger; small-wd control."""
    cfg = config
    t0 = time.perf_counter()
    out = rc.run_pair(cfg, rc.lm_problem(cfg))
    claims = large_wd_claims(out, cfg)
    ctrl = None
    if cfg.control:
        ccfg = dataclasses.replace(cfg, weight_decay=cfg.control_weight_decay, control_weight_decay=0.0, control=False)
        ctrl = rc.run_pair(ccfg, rc.lm_problem(ccfg))
    claims += control_claims(ctrl, cfg)
    rc.store_metrics(store, out.metrics)
    rc.plot_loss(store, out.metrics, title=f"training loss, weight decay {cfg.weight_decay:g} (repeat 0)")
    rc.plot_rmed_over_time(store, out.metrics, out.layers)
    store.write_text("layer_table.md", rc.layer_table_markdown(out.summary))
    metrics = {"weight_decay": cfg.weight_decay, **rc.pair_metrics(out)}
    if ctrl is not None:
        metrics["control"] = {"weight_decay": cfg.control_weight_decay, **rc.pair_metrics(ctrl)}
    metrics["seconds"] = time.perf_counter() - t0
    return Result(claims=claims, metrics=metrics)
