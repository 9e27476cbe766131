"""R_med of Adagrad vs SGD under uniform and normal initialisations with different gains (Jiang, Malik, Li 2023,
App. A.1, Tables 3-4).

"We tried different initialization (normal and uniform) by using different gains of the Pytorch initialization
schedule ... Table 3 (resp. Table 4) shows the R_med for Adagrad and SGD under uniform (resp. normal)
initialization with different gains." The gains themselves are not in the recoverable text; the default here is
``(1.0,)`` at the quick tier and ``(0.5, 1.0, 2.0)`` above, every weight matrix except the embeddings re-drawn by
Xavier uniform or normal with that gain (``_extra.reinit_weights_``).

For every (distribution, gain): ``rmed_lm``'s protocol (:func:`common.run_pair`) with plain SGD as the baseline (App.
A.1: "we tuned and chose the best learning rate of SGD") and Adagrad as the adaptive method (an lr under which it
converges faster than tuned SGD): equal-step and equal-loss (App. A.3) comparisons over ``repeats`` data orders
from that initialisation. The paper gives no size, so the ratio claims are direction claims (CI above 1). The
pooled claim counts every compared layer of every initialisation (one-sided binomial bound > 1/2), untestable when
the premises of any initialisation fail (SGD not tuned or on the unigram plateau, Adagrad not faster).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from optiscope.experiments.base import Claim, Result, register
from optiscope.experiments.diagonal_uniformity import _extra as x
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.metrics.verdicts import fraction_claim
from optiscope.utils.config import require


@dataclass(frozen=True)
class AdagradInitConfig(rc.LMConfig):
    """:class:`LMConfig` plus the initialisations (distributions x gains) and SGD's and Adagrad's lr grids."""

    dists: tuple[str, ...] = ("uniform", "normal")
    gains: tuple[float, ...] = (0.5, 1.0, 2.0)
    sgd_lrs: tuple[float, ...] = (0.1, 0.3, 1.0)
    adagrad_lrs: tuple[float, ...] = (1e-2,)

    def validate(self) -> None:
        super().validate()
        require(len(self.dists) >= 1 and all(d in x.INIT_DISTS for d in self.dists), "dists", self.dists,
                f"a non-empty subset of {x.INIT_DISTS}")
        require(len(self.gains) >= 1 and all(g > 0 for g in self.gains), "gains", self.gains, "positive gains")
        require(len(self.sgd_lrs) >= 1 and all(v > 0 for v in self.sgd_lrs), "sgd_lrs", self.sgd_lrs,
                "a non-empty list of positive learning rates")
        require(len(self.adagrad_lrs) >= 1 and all(v > 0 for v in self.adagrad_lrs), "adagrad_lrs",
                self.adagrad_lrs, "a non-empty list of positive learning rates")

    def inits(self) -> list[tuple[str, float]]:
        """Every (distribution, gain) pair, in order."""
        return [(d, float(g)) for d in self.dists for g in self.gains]


QUICK = AdagradInitConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=150,
                          batch_size=256, gains=(1.0,), sgd_lrs=(0.1, 0.3, 1.0), adagrad_lrs=(1e-2,), repeats=2,
                          n_checkpoints=1, per_layer=100, max_widen=1)
MEDIUM = dataclasses.replace(QUICK, steps=400, gains=(0.5, 1.0, 2.0), adagrad_lrs=(3e-3, 1e-2, 3e-2), repeats=3,
                             n_checkpoints=2, per_layer=200, max_widen=2)
FULL = AdagradInitConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                         batch_size=512, gains=(0.5, 1.0, 2.0), sgd_lrs=(0.03, 0.1, 0.3, 1.0, 3.0),
                         adagrad_lrs=(3e-3, 1e-2, 3e-2), repeats=8, n_checkpoints=10, device="auto")


def tag(dist: str, gain: float) -> str:
    """Claim-id prefix of one initialisation, e.g. ``uniform_g1``, ``normal_g0.5``."""
    return f"{dist}_g{gain:g}"


@register("rmed_adagrad_init", paper="000", title="R_med of Adagrad vs SGD under uniform/normal inits with different "
          "gains, App. A.1", config=AdagradInitConfig, presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: AdagradInitConfig, store) -> Result:
    """Jiang et al. 2023, Tables 3-4 analogue: Adagrad vs tuned SGD from re-drawn inits of several gains."""
    cfg = config
    t0 = time.perf_counter()
    pcfg = dataclasses.replace(cfg, sgdm_lrs=cfg.sgd_lrs, adam_lrs=cfg.adagrad_lrs)
    make_a = lambda lr: ("adagrad", {"lr": float(lr)})
    make_b = lambda lr: ("sgd", {"lr": float(lr), "weight_decay": cfg.weight_decay})
    claims, per_init, frames = [], {}, []
    pooled_k = pooled_n = 0
    pooled_premises = []
    for dist, gain in cfg.inits():
        problem = rc.lm_problem(cfg)
        x.reinit_weights_(problem.model, dist, gain, seed=cfg.seed)
        out = rc.run_pair(pcfg, problem, a="adagrad", b="sgd", make_a=make_a, make_b=make_b)
        premises = rc.protocol_premises(out, "adagrad", "sgd", a_label="Adagrad", b_label="SGD")
        t = tag(dist, gain)
        where = f"{dist} init, gain {gain:g} (App. A.1, Tables 3-4)"
        fc = rc.faster_claim(out.final_losses["adagrad"], out.final_losses["sgd"], "adagrad", "sgd",
                             paper=f"Adagrad converged faster than tuned SGD ({where})",
                             extra={"adagrad_lr": out.adaptive.lr, "sgd_lr": out.sgdm_lr})
        claims.append(Claim.judged(f"{t}_adagrad_faster", fc.claim, fc.paper, fc.measured, (fc.holds, fc.reason)))
        claims += rc.gap_claims(out.equal_loss, f"{t}_equal_loss", "adagrad", "sgd",
                                paper_frac=f"R_med(Adagrad) < R_med(SGD) in most layers ({where})",
                                paper_ratio="smaller R_med (no size stated)", band=None,
                                premises=premises + [(out.equal_loss is not None, "no equal-loss pairs")],
                                what=f"at equal training loss, {dist} init gain {gain:g}")
        claims += rc.gap_claims(out.summary, f"{t}_equal_step", "adagrad", "sgd",
                                paper_frac=f"R_med(Adagrad) < R_med(SGD) in most layers ({where})",
                                paper_ratio="smaller R_med (no size stated)", band=None, premises=premises,
                                what=f"at equal steps, {dist} init gain {gain:g}")
        pooled_k += out.summary["n_layers_a_smaller"]
        pooled_n += out.summary["n_layers_compared"]
        pooled_premises += [(ok, f"{t}: {why}") for ok, why in premises]
        per_init[t] = {"dist": dist, "gain": gain, **rc.pair_metrics(out, "adagrad", "sgd")}
        df = out.metrics.copy()
        df["optimizer"] = df["optimizer"].astype(str) + f"/{t}"
        frames.append(df)
    claims.append(Claim.judged(
        "all_inits_equal_step_most_layers", "R_med(Adagrad) < R_med(SGD) at equal steps in most compared layers of "
        f"all {len(cfg.inits())} initialisations together (one-sided 95% binomial bound > 1/2)",
        "smaller R_med for Adagrad under every initialisation tried (Tables 3-4)",
        {"layers_adagrad_smaller": pooled_k, "layers_compared": pooled_n}, fraction_claim(
            pooled_k, pooled_n, premises=pooled_premises)))
    import pandas as pd

    metrics = pd.concat(frames, ignore_index=True)
    rc.store_metrics(store, metrics)
    rc.plot_loss(store, metrics, title="training loss (repeat 0), every initialisation")
    return Result(claims=claims, metrics={"per_init": per_init, "seconds": time.perf_counter() - t0,
                                          "pooled": {"k": pooled_k, "n": pooled_n,
                                                     "fraction": x.jsonable(pooled_k / pooled_n) if pooled_n
                                                     else None}})

