"""The one three-valued verdict rule used by every experiment (docs/architecture.md).

Each function judges one kind of claim and returns a :class:`Verdict` ``(holds, reason)``:

* ``holds=True``  - the measurement supports the claim under the rule stated in the function's docstring;
* ``holds=False`` - the premise occurred and the measurement does not support the claim;
* ``holds=None``  - *untestable here*: a premise of the claim did not occur (e.g. the baseline never left a
  plateau, the faster optimizer was not faster, too few layers for a fraction to be decided, a non-finite
  number). The ``reason`` says which premise failed.

Premises are passed as ``(condition, reason)`` pairs: the claim is judged only if every ``condition`` is true,
otherwise the verdict is ``None`` with the first failing premise's ``reason``. The rule is deliberately the same
for every paper: a claim with a size is judged against a (widened) band with a confidence interval, a direction
against a CI that excludes the null value, "most X" by a binomial (Clopper-Pearson) bound, a theory-versus-
measurement comparison by a stated tolerance, and a negative control by requiring the control to do worse.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Verdict", "check_premises", "band_claim", "direction_claim", "fraction_claim", "tolerance_claim",
    "negative_control_claim", "all_of", "mean_ci", "verdict_label",
]

Premises = Iterable[tuple[Any, str]]


class Verdict(NamedTuple):
    """Outcome of one claim: ``holds`` is True, False or None (untestable here), ``reason`` says why."""

    holds: bool | None
    reason: str


def _finite(*xs: Any) -> bool:
    try:
        return all(x is not None and math.isfinite(float(x)) for x in xs)
    except (TypeError, ValueError):
        return False


def _ci(ci: Sequence[float] | None, what: str = "ci") -> tuple[float, float] | None:
    """Validate a ``(low, high)`` interval; ``None`` (or non-finite ends) means no interval is available."""
    if ci is None:
        return None
    if len(ci) != 2:
        raise ValueError(f"{what} must be a (low, high) pair, got {ci!r}")
    lo, hi = ci
    if not _finite(lo, hi):
        return None
    lo, hi = float(lo), float(hi)
    if lo > hi:
        raise ValueError(f"{what} must have low <= high, got ({lo}, {hi})")
    return lo, hi


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def check_premises(premises: Premises = ()) -> Verdict | None:
    """Return ``Verdict(None, reason)`` for the first premise ``(condition, reason)`` whose condition is false.

    Returns ``None`` when every premise holds, i.e. the claim can be judged. ``reason`` should say what did not
    occur ("SGD+M still on the unigram plateau: loss/H_unigram = 0.98").
    """
    for cond, reason in premises:
        if not bool(cond):
            return Verdict(None, f"untestable here: {reason}")
    return None


def _interval_or_verdict(ci: Sequence[float] | None, estimate: float | None,
                         premises: Premises) -> Verdict | tuple[float, float, str]:
    """The common start of the interval claims: a failed premise or a missing CI is the (untestable) verdict;
    otherwise ``(low, high, "estimate ")`` for the description."""
    if (v := check_premises(premises)) is not None:
        return v
    iv = _ci(ci)
    if iv is None:
        return Verdict(None, "untestable here: no finite confidence interval")
    est = f"{_fmt(float(estimate))} " if _finite(estimate) else ""
    return iv[0], iv[1], est


def band_claim(ci: Sequence[float] | None, band: tuple[float, float], *, widen_to: tuple[float, float] | None = None,
               null: float | None = 1.0, estimate: float | None = None, premises: Premises = ()) -> Verdict:
    r"""Claim of a size, e.g. the paper's "1.4-2x": judged by the CI against a widened band.

    With the confidence interval :math:`[l, u]` of the measured quantity, the paper's band :math:`[a, b]` widened to
    :math:`[a', b'] \supseteq [a, b]` (``widen_to``; default the band itself) and the null value :math:`c`
    (``null``, e.g. 1 for a ratio; ``None`` for no direction requirement):

    .. math:: \text{holds} \iff [l, u] \cap [a', b'] \ne \emptyset \;\wedge\; l > c .

    The intersection test says the measured size is compatible with the paper's (up to the widening, which
    absorbs differences of scale between the paper's setup and ours); :math:`l > c` says the direction is
    established. A one-sided rule such as "estimate >= 1.4" would pass a 33x ratio; this one does not.
    ``holds=None`` if a premise fails or the CI is missing/non-finite.
    """
    a, b = map(float, band)
    if not a <= b:
        raise ValueError(f"band must have low <= high, got {band!r}")
    wa, wb = map(float, widen_to) if widen_to is not None else (a, b)
    if not (wa <= a and wb >= b):
        raise ValueError(f"widen_to {widen_to!r} must contain band {band!r}")
    pre = _interval_or_verdict(ci, estimate, premises)
    if isinstance(pre, Verdict):
        return pre
    lo, hi, est = pre
    desc = f"{est}CI [{_fmt(lo)}, {_fmt(hi)}] vs band [{_fmt(a)}, {_fmt(b)}] widened to [{_fmt(wa)}, {_fmt(wb)}]"
    if null is not None and not lo > null:
        return Verdict(False, f"{desc}: CI lower bound {_fmt(lo)} <= {_fmt(null)}, direction not established")
    if hi < wa:
        return Verdict(False, f"{desc}: CI entirely below the widened band")
    if lo > wb:
        return Verdict(False, f"{desc}: CI entirely above the widened band")
    return Verdict(True, f"{desc}: overlaps" + (f", lower bound > {_fmt(null)}" if null is not None else ""))


def direction_claim(ci: Sequence[float] | None, *, null: float = 1.0, direction: str = "greater",
                    estimate: float | None = None, premises: Premises = ()) -> Verdict:
    r"""Claim of a direction ("A is larger than B"): the CI :math:`[l, u]` must exclude the null value :math:`c`.

    .. math:: \text{greater: holds} \iff l > c, \qquad \text{less: holds} \iff u < c .

    Use ``null=1`` for ratios, ``null=0`` for differences, slopes and log-ratios. A CI that contains :math:`c` is
    ``False`` (the direction is not established by this measurement); ``None`` only when a premise fails or the CI
    is missing.
    """
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")
    pre = _interval_or_verdict(ci, estimate, premises)
    if isinstance(pre, Verdict):
        return pre
    lo, hi, est = pre
    desc = f"{est}CI [{_fmt(lo)}, {_fmt(hi)}]"
    if direction == "greater":
        ok = lo > null
        return Verdict(ok, f"{desc} {'excludes' if ok else 'does not exclude'} {_fmt(null)} from above"
                           + ("" if ok else (" (it lies below)" if hi < null else "")))
    ok = hi < null
    return Verdict(ok, f"{desc} {'excludes' if ok else 'does not exclude'} {_fmt(null)} from below"
                       + ("" if ok else (" (it lies above)" if lo > null else "")))


def fraction_claim(successes: int, trials: int, *, threshold: float = 0.5, confidence: float = 0.95,
                   premises: Premises = ()) -> Verdict:
    r"""Claim that "most" units (layers, seeds, ...) show an effect: a one-sided exact binomial bound.

    With :math:`k` successes out of :math:`n`, the one-sided Clopper-Pearson lower bound :math:`p_L` at level
    ``confidence`` (:func:`scipy.stats.binomtest` with ``alternative="greater"``) is compared with the threshold
    :math:`p_0` (``threshold``; 1/2 for "most"):

    .. math:: \text{holds} \iff p_L(k, n) > p_0 .

    If even :math:`k = n` could not pass (:math:`p_L(n, n) = (1-\text{confidence})^{1/n} \le p_0`, e.g. 4 layers at
    95% and :math:`p_0 = 1/2`), the claim is ``None``: too few units to decide. Units are treated as independent
    trials; correlated layers make the bound optimistic. The reason reports :math:`k/n` and the two-sided 95%
    Clopper-Pearson interval for reading.
    """
    from scipy.stats import binomtest

    if int(trials) != trials or int(successes) != successes:
        raise ValueError(f"successes and trials must be integers, got {successes!r}, {trials!r}")
    k, n = int(successes), int(trials)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= trials, got {k} of {n}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if (v := check_premises(premises)) is not None:
        return v
    if n == 0:
        return Verdict(None, "untestable here: no units to count")
    best = (1 - confidence) ** (1 / n)
    two = binomtest(k, n).proportion_ci(0.95, method="exact")
    desc = f"{k}/{n} (95% CI [{_fmt(two.low)}, {_fmt(two.high)}])"
    if best <= threshold:
        return Verdict(None, f"untestable here: too few units ({n}): even {n}/{n} gives a one-sided "
                             f"{confidence:.0%} lower bound {_fmt(best)} <= {_fmt(threshold)}; measured {desc}")
    low = binomtest(k, n, alternative="greater").proportion_ci(confidence, method="exact").low
    ok = bool(low > threshold)
    return Verdict(ok, f"{desc}: one-sided {confidence:.0%} lower bound {_fmt(low)} "
                       f"{'>' if ok else '<='} {_fmt(threshold)}")


def tolerance_claim(measured: float, predicted: float, *, rel_tol: float | None = None, abs_tol: float | None = None,
                    ci: Sequence[float] | None = None, premises: Premises = ()) -> Verdict:
    r"""Theory versus measurement: the measurement must lie within a stated tolerance of the prediction.

    The tolerance interval is :math:`T = [p - \tau, p + \tau]` with :math:`\tau = \max(\text{abs\_tol},
    \text{rel\_tol}\cdot|p|)` (either may be omitted, not both). Without a CI, ``holds`` iff :math:`|m - p| \le
    \tau`. With a CI :math:`[l, u]` of the measurement the rule is an equivalence test:

    .. math:: \text{True} \iff [l, u] \subseteq T, \qquad \text{False} \iff [l, u] \cap T = \emptyset,

    and ``None`` (undecided at this sample size) when the CI straddles an end of :math:`T`: an interval wide
    enough to overlap anything would otherwise pass every theory. A passing theory claim is only informative
    together with a :func:`negative_control_claim` that shows a wrong prediction fails the same test.
    """
    if rel_tol is None and abs_tol is None:
        raise ValueError("tolerance_claim needs rel_tol or abs_tol")
    if (rel_tol is not None and rel_tol < 0) or (abs_tol is not None and abs_tol < 0):
        raise ValueError(f"tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
    if (v := check_premises(premises)) is not None:
        return v
    if not _finite(measured, predicted):
        return Verdict(None, f"untestable here: non-finite measurement {measured!r} or prediction {predicted!r}")
    m, p = float(measured), float(predicted)
    tau = max(abs_tol or 0.0, (rel_tol or 0.0) * abs(p))
    iv = _ci(ci)
    if iv is not None:
        lo, hi = iv
        desc = f"measured {_fmt(m)} CI [{_fmt(lo)}, {_fmt(hi)}] vs predicted {_fmt(p)} +- {_fmt(tau)}"
        if p - tau <= lo and hi <= p + tau:
            return Verdict(True, f"{desc}: CI inside the tolerance")
        if hi < p - tau or lo > p + tau:
            return Verdict(False, f"{desc}: CI outside the tolerance")
        return Verdict(None, f"undecided here: {desc}: the CI straddles the tolerance band (too noisy to decide)")
    err = abs(m - p)
    ok = bool(err <= tau)
    rel = f" ({err / abs(p):.1%})" if p != 0 else ""
    return Verdict(ok, f"|measured {_fmt(m)} - predicted {_fmt(p)}| = {_fmt(err)}{rel} "
                       f"{'<=' if ok else '>'} tolerance {_fmt(tau)}")


def negative_control_claim(theory_error: float, control_error: float, *, margin: float = 1.0,
                           ratio_ci: Sequence[float] | None = None, premises: Premises = ()) -> Verdict:
    r"""Negative control: a baseline that must come out worse than the theory, as its own claim.

    With the theory's error :math:`e_T` and the control's error :math:`e_C` (same metric, same data), and a margin
    :math:`\mu \ge 1`:

    .. math:: \text{holds} \iff e_C > \mu\, e_T \quad\text{(or, with a CI } [l, u] \text{ of } e_C/e_T:\ l > \mu).

    If it fails, the test that the theory passed could not tell the theory from the control, so that pass says
    nothing. ``None`` when an error is non-finite or a premise fails.
    """
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    if (v := check_premises(premises)) is not None:
        return v
    if not _finite(theory_error, control_error):
        return Verdict(None, f"untestable here: non-finite error (theory {theory_error!r}, control {control_error!r})")
    eT, eC = float(theory_error), float(control_error)
    if eT < 0 or eC < 0:
        raise ValueError(f"errors must be >= 0, got theory {eT}, control {eC}")
    iv = _ci(ratio_ci, "ratio_ci")
    if iv is not None:
        ok = bool(iv[0] > margin)
        return Verdict(ok, f"control/theory error ratio CI [{_fmt(iv[0])}, {_fmt(iv[1])}] "
                           f"{'>' if ok else 'not >'} {_fmt(margin)}")
    ok = bool(eC > margin * eT)
    ratio = f" (ratio {_fmt(eC / eT)})" if eT > 0 else ""
    return Verdict(ok, f"control error {_fmt(eC)} {'>' if ok else '<='} {_fmt(margin)} x theory error "
                       f"{_fmt(eT)}{ratio}" + ("" if ok else ": the test cannot tell the theory from the control"))


def all_of(verdicts: Sequence[Verdict], labels: Sequence[str] | None = None) -> Verdict:
    """Conjunction of the verdicts of a claim made of several parts; it judges nothing itself.

    ``holds`` is ``None`` (untestable) if any part is untestable or there are no parts, else ``True`` iff every part
    holds. The reason lists each part's reason, prefixed by its label (default ``part 1``, ``part 2``, ...).
    """
    if not verdicts:
        return Verdict(None, "untestable here: nothing to compare")
    labels = list(labels) if labels is not None else [f"part {i + 1}" for i in range(len(verdicts))]
    if len(labels) != len(verdicts):
        raise ValueError(f"{len(labels)} labels for {len(verdicts)} verdicts")
    reason = "; ".join(f"{lab}: {v.reason}" for lab, v in zip(labels, verdicts))
    if any(v.holds is None for v in verdicts):
        return Verdict(None, reason)
    return Verdict(all(bool(v.holds) for v in verdicts), reason)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    r"""Mean and Student-t confidence interval :math:`\bar x \pm t_{n-1, (1+c)/2}\, s/\sqrt n` of finite values.

    Returns ``(mean, low, high)``; with fewer than two finite values the interval is ``(nan, nan)``.
    """
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half


def verdict_label(holds: bool | None) -> str:
    """The words used in tables: ``holds`` / ``does not hold`` / ``untestable``."""
    return "holds" if holds is True else "does not hold" if holds is False else "untestable"
