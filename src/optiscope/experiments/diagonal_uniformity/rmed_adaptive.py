"""Other adaptive methods (Jiang, Malik, Li 2023, App. A.1-A.2, Tables 3-6).

Adagrad vs plain SGD (App. A.1: "we tuned and chose the best learning rate of SGD"), and RMSprop and AMSGrad vs
SGD+M (App. A.2), all from the same initialisation and batch order on the fortunes transformer. RMSprop "used
momentum parameter 0.9", i.e. ``optim.RMSProp(momentum=0.9)`` (PyTorch's momentum form, eps inside the root).
Protocol as in ``rmed_lm``: the baselines' lrs are tuned over the whole horizon on grids widened until the best lies
strictly inside; each adaptive method's lr is one of its grid under which it converges faster than its tuned
baseline (reported when there is none); the comparison is judged only when the baseline is well below the unigram
plateau. The paper gives no size for these gaps, so the ratio claims are direction claims (CI above 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optiscope.experiments.base import Result, register
from optiscope.experiments.diagonal_uniformity import common as rc
from optiscope.lab.probes import weight_matrix_params
from optiscope.utils.config import require


@dataclass(frozen=True)
class AdaptiveConfig(rc.LMConfig):
    """:class:`LMConfig` plus plain SGD's grid and the adaptive methods' lr grids (empty grid: the single lr)."""

    sgd_lrs: tuple[float, ...] = (0.3, 1.0, 3.0)
    adagrad_lr: float = 1e-2
    adagrad_lrs: tuple[float, ...] = ()
    rmsprop_lr: float = 3e-4
    rmsprop_lrs: tuple[float, ...] = ()
    rmsprop_momentum: float = 0.9
    rmsprop_beta: float = 0.99
    amsgrad_lr: float = 3e-3
    amsgrad_lrs: tuple[float, ...] = ()
    n_checkpoints: int = 2

    def validate(self) -> None:
        super().validate()
        require(len(self.sgd_lrs) >= 1 and all(x > 0 for x in self.sgd_lrs), "sgd_lrs", self.sgd_lrs,
                "a non-empty list of positive learning rates")
        for f in ("adagrad_lr", "rmsprop_lr", "amsgrad_lr"):
            require(getattr(self, f) > 0, f, getattr(self, f), "> 0")
            require(all(x > 0 for x in getattr(self, f + "s")), f + "s", getattr(self, f + "s"), "positive lrs")
        require(0 <= self.rmsprop_beta < 1, "rmsprop_beta", self.rmsprop_beta, "in [0, 1)")
        require(0 <= self.rmsprop_momentum < 1, "rmsprop_momentum", self.rmsprop_momentum, "in [0, 1)")

    def grid(self, method: str) -> tuple[float, ...]:
        """The lr grid of an adaptive method: ``<method>_lrs``, or ``(<method>_lr,)`` when empty."""
        return tuple(getattr(self, f"{method}_lrs")) or (getattr(self, f"{method}_lr"),)


QUICK = AdaptiveConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                       batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), sgd_lrs=(0.3, 1.0, 3.0), repeats=2, n_checkpoints=1,
                       per_layer=200, max_widen=1)
MEDIUM = AdaptiveConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=600,
                        batch_size=256, sgdm_lrs=(0.03, 0.1, 0.3), sgd_lrs=(0.3, 1.0, 3.0), repeats=3,
                        n_checkpoints=4, per_layer=200, max_widen=2)
FULL = AdaptiveConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                      batch_size=512, sgdm_lrs=(0.03, 0.1, 0.3, 1.0), sgd_lrs=(0.1, 0.3, 1.0, 3.0),
                      adagrad_lrs=(3e-3, 1e-2, 3e-2), rmsprop_lrs=(1e-4, 2.5e-4, 1e-3), amsgrad_lrs=(1.5e-4, 5e-4, 1.5e-3),
                      repeats=8, n_checkpoints=10)

PAIRS = (("adagrad", "sgd", "App. A.1, Tables 3-5"), ("rmsprop", "sgdm", "App. A.2, Table 6"),
         ("amsgrad", "sgdm", "App. A.2, Table 6"))


@register("rmed_adaptive", paper="000", title="R_med of Adagrad vs SGD, RMSprop and AMSGrad vs SGD+M, App. A.1-A.2",
          config=AdaptiveConfig, presets={"quick": QUICK, "medium": MEDIUM, "full": FULL})
def run(config: AdaptiveConfig, store) -> Result:
    """Jiang et al. 2023, Tables 3-6 analogue: every adaptive method against its tuned non-adaptive baseline."""
    cfg = config
    problem = rc.lm_problem(cfg)
    layers = weight_matrix_params(problem.model)
    H = rc.unigram_entropy(problem.train[1])
    kw = dict(batch_size=cfg.batch_size, checkpoint=False)
    specs = {"sgd": lambda lr: ("sgd", {"lr": float(lr)}), "sgdm": lambda lr: rc.sgdm_spec(cfg, lr),
             "adagrad": lambda lr: ("adagrad", {"lr": float(lr)}),
             "rmsprop": lambda lr: ("rmsprop", {"lr": float(lr), "beta": cfg.rmsprop_beta,
                                                "momentum": cfg.rmsprop_momentum}),
             "amsgrad": lambda lr: ("amsgrad", {"lr": float(lr), "betas": (cfg.beta1, cfg.beta2)})}
    tuning = {"sgd": rc.tune_lr(problem, specs["sgd"], cfg.sgd_lrs, cfg.horizon, cfg.seed, max_widen=cfg.max_widen,
                                **kw),
              "sgdm": rc.tune_lr(problem, specs["sgdm"], cfg.sgdm_lrs, cfg.horizon, cfg.seed,
                                 max_widen=cfg.max_widen, **kw)}
    picks = {a: rc.pick_adaptive_lr(problem, specs[a], cfg.grid(a), cfg.horizon, cfg.seed,
                                    tuning[b].losses[tuning[b].best], **kw) for a, b, _ in PAIRS}
    opts = {"sgd": specs["sgd"](tuning["sgd"].best), "sgdm": specs["sgdm"](tuning["sgdm"].best),
            **{a: specs[a](picks[a].lr) for a, _, _ in PAIRS}}
    ck = rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints)
    probes = ["loss:on=train", rc.ScheduledProbe(rc.rmed_probe(layers, cfg.per_layer, cfg.delta), (0, *ck))]
    out = rc.compare_repeats(problem, opts, cfg.steps, cfg.repeats, cfg.seed, probes, probe_every=cfg.loss_every,
                             probe_steps=ck, **kw)
    rc.store_metrics(store, out.metrics)
    finals = {o: [rc.final_loss(out.metrics[out.metrics["repeat"] == r], o) for r in range(cfg.repeats)]
              for o in opts}
    claims, summaries = [], {}
    rmed = probes[1].probe
    for a, b, where in PAIRS:
        s = rc.pair_gap_summary(out.metrics, a, b, layers, cfg)
        equal, pairs = rc.equal_loss_comparison(problem, cfg, out.metrics, a, b, opts[a], layers, ck, rmed,
                                                cfg.plateau_fraction * H)
        premises = rc.premises_for(tuning[b], picks[a], finals[a], finals[b], float(np.nanmean(finals[b])), H,
                                   cfg.plateau_fraction, a_label=a, b_label=b)
        summaries[f"{a}_vs_{b}"] = {"summary": s, "summary_equal_loss": equal, "equal_loss_pairs": pairs, "speed": rc.faster(out.metrics, a, b), "adaptive_lr": picks[a].to_dict(),
                                    "baseline_relative_to_unigram": float(np.nanmean(finals[b]) / H)}
        claims.append(rc.faster_claim(finals[a], finals[b], a, b, paper=f"faster ({where})",
                                      extra={f"{a}_lr": picks[a].lr, f"{b}_lr": tuning[b].best}))
        claims += rc.gap_claims(equal, f"{a}_vs_{b}_equal_loss", a, b,
                                paper_ratio=f"smaller R_med ({where}; no size stated)", band=None,
                                premises=premises + [(equal is not None, f"no {b} checkpoint below the plateau that "
                                                                         f"{a} reaches (no equal-loss pairs)")],
                                what="at equal training loss")
        claims += rc.gap_claims(s, f"{a}_vs_{b}", a, b, paper_ratio=f"smaller R_med ({where}; no size stated)",
                                band=None, premises=premises, what="at equal steps")
        store.write_text(f"layer_table_{a}_vs_{b}.md", rc.layer_table_markdown(s, a, b))
    rc.plot_loss(store, out.metrics, title="training loss (repeat 0)")
    rc.plot_rmed_over_time(store, out.metrics, layers)
    return Result(claims=claims, metrics={"pairs": summaries, "lrs": {k: v for k, v in opts.items()},
                                          "lr_tuning": {k: v.to_dict() for k, v in tuning.items()},
                                          "unigram_entropy": H, "final_losses": finals,
                                          "status": out.status, "hvp_cost": rc.hvp_cost(out.metrics)})
