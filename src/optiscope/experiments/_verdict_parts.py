"""Conjunction of verdicts for claims made of several parts (used by the Velikanov, Arora, Orvieto, Cattaneo and
Li & Arora reproductions). It judges nothing itself: every part is a verdict of :mod:`optiscope.metrics.verdicts`.
"""

from __future__ import annotations

from collections.abc import Sequence

from optiscope.metrics.verdicts import Verdict

__all__ = ["all_of"]


def all_of(verdicts: Sequence[Verdict], labels: Sequence[str] | None = None) -> Verdict:
    """``holds`` of a claim that needs every part: ``None`` (untestable) if any part is untestable or there are no
    parts, else ``True`` iff every part holds. The reason lists each part's reason (prefixed by its label)."""
    if not verdicts:
        return Verdict(None, "untestable here: nothing to compare")
    labels = list(labels) if labels is not None else [f"part {i + 1}" for i in range(len(verdicts))]
    if len(labels) != len(verdicts):
        raise ValueError(f"{len(labels)} labels for {len(verdicts)} verdicts")
    reason = "; ".join(f"{lab}: {v.reason}" for lab, v in zip(labels, verdicts))
    if any(v.holds is None for v in verdicts):
        return Verdict(None, reason)
    return Verdict(all(bool(v.holds) for v in verdicts), reason)
