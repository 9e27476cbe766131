"""Shared helper for the experiment tests: a tiny quick-preset run whose claims all carry a verdict and a reason
(no tests here)."""

from __future__ import annotations

import json

from optiscope.experiments.base import resolve_config, run_experiment


def run_tiny(name, tmp_path, overrides):
    """Run experiment ``name`` at its quick preset with ``overrides`` into ``tmp_path/name``; check that every claim
    is three-valued with a reason and that figures were written; return the parsed ``results.json``."""
    cfg = resolve_config(name, "quick", overrides)
    run_experiment(name, out=tmp_path / name, config=cfg)
    res = json.loads((tmp_path / name / "results.json").read_text())
    for c in res["claims"]:
        assert c["holds"] in (True, False, None) and c["reason"], c["id"]
    assert list((tmp_path / name / "figures").glob("*.png"))
    return res
