"""Experiment 5 of issue 8: other adaptive methods (seed 000 App. A.1-A.2, Tables 3-6).

Adagrad vs plain SGD (App. A.1: "we tuned and chose the best learning rate of SGD"), and RMSprop and AMSGrad vs
SGD+M (App. A.2), all from the same initialisation and batch order on the fortunes transformer. RMSprop "used
momentum parameter 0.9" (seed), i.e. ``optim.RMSProp(momentum=0.9)`` (PyTorch's momentum form, eps inside the root).
The adaptive methods' learning rates are set, not tuned (the seed's rule: an lr at which they converge faster);
whether they were faster is measured and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from optiscope.experiments import _rmed_common as rc
from optiscope.lab.probes import weight_matrix_params
from optiscope.experiments.base import Claim, Result, register
from optiscope.utils.config import require


@dataclass(frozen=True)
class AdaptiveConfig(rc.LMConfig):
    sgd_lrs: tuple[float, ...] = (0.3, 1.0, 3.0)
    adagrad_lr: float = 1e-2
    rmsprop_lr: float = 3e-4
    rmsprop_momentum: float = 0.9
    rmsprop_beta: float = 0.99
    amsgrad_lr: float = 3e-3
    n_checkpoints: int = 1

    def validate(self) -> None:
        super().validate()
        require(len(self.sgd_lrs) >= 1 and all(x > 0 for x in self.sgd_lrs), "sgd_lrs", self.sgd_lrs,
                "a non-empty list of positive learning rates")
        for f in ("adagrad_lr", "rmsprop_lr", "amsgrad_lr"):
            require(getattr(self, f) > 0, f, getattr(self, f), "> 0")
        require(0 <= self.rmsprop_beta < 1, "rmsprop_beta", self.rmsprop_beta, "in [0, 1)")
        require(0 <= self.rmsprop_momentum < 1, "rmsprop_momentum", self.rmsprop_momentum, "in [0, 1)")


QUICK = AdaptiveConfig(seq_len=32, n_train=2048, probe_size=16, d_model=32, n_layers=1, n_heads=4, steps=200,
                       batch_size=256, tune_steps=40, repeats=2, n_checkpoints=1, per_layer=200)
FULL = AdaptiveConfig(seq_len=64, n_train=20000, probe_size=512, d_model=128, n_layers=4, n_heads=4, steps=1800,
                      batch_size=512, sgdm_lrs=(0.03, 0.1, 0.3, 1.0), sgd_lrs=(0.1, 0.3, 1.0, 3.0), tune_steps=300,
                      adam_lr=1e-3, rmsprop_lr=2.5e-4, amsgrad_lr=5e-4, repeats=8, n_checkpoints=10)

PAIRS = (("adagrad", "sgd", "App. A.1, Tables 3-5"), ("rmsprop", "sgdm", "App. A.2, Table 6"),
         ("amsgrad", "sgdm", "App. A.2, Table 6"))


@register("rmed_adaptive", paper="000", title="R_med of Adagrad vs SGD, RMSprop and AMSGrad vs SGD+M, App. A.1-A.2",
          config=AdaptiveConfig, presets={"quick": QUICK, "full": FULL})
def run(config: AdaptiveConfig, store) -> Result:
    """Seed 000 Tables 3-6 analogue: every adaptive method against its non-adaptive baseline."""
    cfg = config
    problem = rc.lm_problem(cfg)
    layers = weight_matrix_params(problem.model)
    kw = dict(batch_size=cfg.batch_size, checkpoint=False)
    tuning = {}
    best_sgd, tuning["sgd"] = rc.tune_lr(problem, lambda lr: ("sgd", {"lr": lr}), cfg.sgd_lrs, cfg.tune_steps,
                                         cfg.seed, **kw)
    best_sgdm, tuning["sgdm"] = rc.tune_lr(problem, lambda lr: rc.sgdm_spec(cfg, lr), cfg.sgdm_lrs, cfg.tune_steps,
                                           cfg.seed, **kw)
    opts = {"sgd": ("sgd", {"lr": best_sgd}), "sgdm": rc.sgdm_spec(cfg, best_sgdm),
            "adagrad": ("adagrad", {"lr": cfg.adagrad_lr}),
            "rmsprop": ("rmsprop", {"lr": cfg.rmsprop_lr, "beta": cfg.rmsprop_beta,
                                    "momentum": cfg.rmsprop_momentum}),
            "amsgrad": ("amsgrad", {"lr": cfg.amsgrad_lr, "betas": (cfg.beta1, cfg.beta2)})}
    probes = ["loss:on=train", rc.rmed_probe(layers, cfg.per_layer, cfg.delta)]
    out = rc.compare_repeats(problem, opts, cfg.steps, cfg.repeats, cfg.seed, probes, checkpoint=False,
                             batch_size=cfg.batch_size, probe_steps=rc.checkpoint_steps(cfg.steps, cfg.n_checkpoints))
    rc.store_metrics(store, out.metrics)
    claims, summaries = [], {}
    for a, b, where in PAIRS:
        s = rc.pair_gap_summary(out.metrics, a, b, layers, cfg)
        summaries[f"{a}_vs_{b}"] = {"summary": s, "speed": rc.faster(out.metrics, a, b)}
        sp = summaries[f"{a}_vs_{b}"]["speed"]
        claims.append(Claim(f"{a}_faster", f"{a} reaches a lower training loss than {b} at its best lr",
                            paper=f"faster ({where})", measured=sp, holds=sp["a_faster"]))
        claims += rc.gap_claims(s, f"{a}_vs_{b}", a, b, paper_ratio=f"smaller R_med ({where})")
        store.write_text(f"layer_table_{a}_vs_{b}.md", rc.layer_table_markdown(s, a, b))
    rc.plot_loss(store, out.metrics, title="training loss (repeat 0)")
    rc.plot_rmed_over_time(store, out.metrics, layers)
    return Result(claims=claims, metrics={"pairs": summaries, "lrs": {k: v for k, v in opts.items()},
                                          "lr_tuning": {k: {str(a): b for a, b in v.items()} for k, v in tuning.items()},
                                          "status": out.status, "hvp_cost": rc.hvp_cost(out.metrics)})
