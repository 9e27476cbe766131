"""optiscope.lab: same-init trajectories of several optimizers with geometry probes, stored so nothing is lost.

``Problem``, ``Run``, ``compare``, ``switch``, ``repeat``, ``match_by_loss`` (``lab.run``), probes (``lab.probes``),
``RunStore`` (``lab.store``), ``Tracker`` (probes in your own loop, ``lab.tracker``), CLI-level configs (``lab.config``). See docs/architecture.md, section "lab".
"""

from optiscope.lab.probes import PROBES, ProbeState, make_probe, make_probes, probe_guard
from optiscope.lab.problem import Problem
from optiscope.lab.run import (
    CompareResult,
    RepeatResult,
    Run,
    RunResult,
    batch_indices,
    compare,
    match_by_loss,
    matched_values,
    repeat,
    summarize_repeats,
    switch,
)
from optiscope.lab.store import RunStore, StoreError
from optiscope.lab.tracker import MetricsLogger, Tracker

__all__ = [
    "PROBES",
    "CompareResult",
    "ProbeState",
    "Problem",
    "RepeatResult",
    "Run",
    "RunResult",
    "RunStore",
    "StoreError",
    "batch_indices",
    "compare",
    "make_probe",
    "make_probes",
    "match_by_loss",
    "matched_values",
    "probe_guard",
    "repeat",
    "summarize_repeats",
    "switch",
    "MetricsLogger",
    "Tracker",
]
