"""Test-only experiments for ``optiscope reproduce`` and the HTML report (imported by the tests, and by Ray workers
through the module path that ``reproduce`` ships with each job). Importing registers them; :func:`unregister`
removes them again so that other test modules see only the real registry.

Each fake draws a number from ``numpy.random.default_rng(seed + offset)`` (deterministic), writes a figure and a
small tidy metrics table with per-layer values, sleeps ``TFAKE_SLEEP`` seconds (environment, default 0) and
returns two claims: one decided by the sign of the number, one untestable. ``tfake_fail`` raises.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from optiscope.experiments import base
from optiscope.experiments.base import Claim, Result, register
from optiscope.utils.config import Config

NAMES = ["tfake_alpha", "tfake_beta", "tfake_gamma", "tfake_delta", "tfake_eps", "tfake_zeta"]
FAIL = "tfake_fail"
PAPER_OF = {"tfake_alpha": "000", "tfake_beta": "000", "tfake_gamma": "004", "tfake_delta": "004",
            "tfake_eps": "001", "tfake_zeta": "001", FAIL: "002"}


@dataclass(frozen=True)
class FakeConfig(Config):
    """Config of a fake experiment."""

    seed: int = 0
    offset: float = 0.0
    fail: bool = False


def _make(name: str, offset: float, fail: bool = False) -> None:
    quick = FakeConfig(offset=offset, fail=fail)

    @register(name, paper=PAPER_OF[name], title=f"fake experiment {name}", config=FakeConfig,
              presets={"quick": quick, "full": quick.replace(seed=1)})
    def run(cfg: FakeConfig, store) -> Result:
        """A fake experiment (tests only)."""
        time.sleep(float(os.environ.get("TFAKE_SLEEP", "0")))
        if cfg.fail:
            raise RuntimeError(f"{name} failed on purpose")
        x = float(np.random.default_rng(cfg.seed).normal() + cfg.offset)
        from optiscope.utils.plotting import plt

        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1, 2], [0, x, 2 * x])
        store.save_figure(fig, "line")
        plt.close(fig)
        rows = [{"run": r, "optimizer": r, "step": s, "metric": "r_med", "layer": layer, "value": (s + 1) * k}
                for r, k in (("sgdm", 2.0), ("adam", 1.0)) for s in (0, 10) for layer in ("fc1.weight", "fc2.weight")]
        rows += [{"run": r, "optimizer": r, "step": s, "metric": "loss", "layer": "", "value": 1.0 / (s + 1)}
                 for r in ("sgdm", "adam") for s in (0, 10)]
        store.append_metrics(rows)
        return Result(claims=[
            Claim("sign", f"{name}: the value is positive <b>not bold</b> & | pipe", paper="> 0",
                  measured={"value": round(x, 6), "ci95": [round(x - 0.5, 6), round(x + 0.5, 6)]},
                  holds=bool(x - 0.5 > 0) if abs(x) > 0.5 else None,
                  reason="CI excludes 0" if abs(x) > 0.5 else "CI contains 0"),
            Claim("untestable", "a claim whose premise did not occur", paper=1.0, measured=None, holds=None,
                  reason="premise absent"),
        ], metrics={"x": x})


for _i, _n in enumerate(NAMES):
    _make(_n, offset=float(_i) - 2.0)
_make(FAIL, 0.0, fail=True)


def unregister() -> None:
    """Remove the fakes from the registry (the module stays imported; ``importlib.reload`` registers again)."""
    for n in [*NAMES, FAIL]:
        base._REGISTRY.pop(n, None)
