"""The claims inventory of the five papers: every claim, where it stands in the paper, and what tests it.

The inventory is data: TOML files in the package folder ``optiscope/coverage/`` (shipped with the package). Each
file starts with ``paper = "<key>"`` (the key an experiment registers with ``paper=``, see :mod:`optiscope.papers`)
and lists rows::

    [[claim]]
    location = "Fig. 2"                          # where in the paper, as the paper numbers it
    statement = "one sentence: what the paper claims"
    experiment = "adam_bilinear"                 # the registered experiment that tests it
    claims = ["ordering_beta*"]                  # its claim ids (fnmatch patterns allowed)
    gpu = false                                  # true when only the full preset (GPU) tests it honestly

or, for a claim deliberately left out, ``excluded = "why"`` instead of ``experiment``/``claims``/``gpu``.

:func:`load_inventory` reads and validates the files (unknown keys, missing fields and rows with neither an
experiment nor a reason are errors); :func:`coverage_problems` checks them against the experiment registry and the
claim ids the experiments can produce; :func:`coverage_rows` joins each row with the latest verdicts
(:func:`optiscope.report.results_table.claims_rows`), and :func:`coverage_markdown` renders one paper's table for
``docs/papers.md`` (:mod:`optiscope.report.paper_index`).
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "FILE_KEYS",
    "ROW_KEYS",
    "CoverageRow",
    "RowVerdict",
    "coverage_markdown",
    "coverage_problems",
    "coverage_rows",
    "forbidden_words",
    "inventory_files",
    "inventory_folder",
    "known_claim_ids",
    "load_file",
    "load_inventory",
    "pattern_matches",
    "patterns_intersect",
    "row_verdict",
    "summary_line",
]

FILE_KEYS = frozenset({"paper", "claim"})
"""The top-level keys a coverage file may have."""

ROW_KEYS = frozenset({"location", "statement", "experiment", "claims", "gpu", "excluded"})
"""The keys a ``[[claim]]`` row may have."""

_TEMPLATE = "{...}"
_VERDICT_ORDER = ("does not hold", "untestable", "holds")


@dataclass(frozen=True)
class CoverageRow:
    """One claim of a paper: ``location`` and ``statement``; either the ``experiment`` with its claim-id
    ``claims`` patterns (``gpu``: only the full preset decides it honestly) or the ``excluded`` reason. ``source``
    is the file name the row comes from and ``index`` its position there (1-based)."""

    paper: str
    location: str
    statement: str
    experiment: str | None = None
    claims: tuple[str, ...] = ()
    gpu: bool = False
    excluded: str | None = None
    source: str = ""
    index: int = 0

    @property
    def tested(self) -> bool:
        """Whether an experiment tests the claim (else it is left out, with a reason)."""
        return self.experiment is not None

    def where(self) -> str:
        """``file.toml, row N`` (for error messages)."""
        return f"{self.source}, row {self.index}"


@dataclass(frozen=True)
class RowVerdict:
    """The latest verdict of a tested row: ``label`` (holds / does not hold / untestable / no results),
    ``counts`` of the per-claim verdicts, ``tier`` (the presets that decided them), ``reason`` (why, for a claim
    that did not hold or could not be tested), ``measured`` (short text of the measured values) and ``ids`` (the
    claim ids of the results that the row's patterns matched)."""

    label: str
    counts: Mapping[str, int] = field(default_factory=dict)
    tier: str = ""
    reason: str = ""
    measured: str = ""
    ids: tuple[str, ...] = ()


def inventory_folder() -> Path:
    """The folder of the coverage TOML files shipped in the package (``optiscope/coverage``)."""
    return Path(str(resources.files("optiscope") / "coverage"))


def inventory_files(folder: str | Path | None = None) -> list[Path]:
    """The ``*.toml`` files of the inventory in ``folder`` (default :func:`inventory_folder`), sorted by name."""
    root = Path(folder) if folder is not None else inventory_folder()
    if not root.is_dir():
        raise ValueError(f"coverage folder {str(root)!r} does not exist")
    return sorted(root.glob("*.toml"))


def _text(row: Mapping[str, Any], key: str, where: str, errors: list[str], required: bool = True) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            errors.append(f"{where}: missing {key!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        errors.append(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        return None
    return " ".join(value.split())


def load_file(path: str | Path, known_papers: Iterable[str] | None = None) -> list[CoverageRow]:
    """The rows of one coverage file, validated. ``ValueError`` lists every problem: a TOML syntax error, unknown
    keys, a missing or unknown ``paper``, a row without ``location``/``statement``, a row with neither
    ``experiment`` nor ``excluded`` (or both), ``claims`` that is not a non-empty list of strings, ``gpu`` that is
    not a boolean. ``known_papers`` defaults to the keys of :data:`optiscope.papers.PAPERS`."""
    from optiscope.papers import PAPERS

    path = Path(path)
    papers = set(PAPERS if known_papers is None else known_papers)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path.name}: cannot read coverage file: {e}") from None
    errors: list[str] = []
    unknown = sorted(set(data) - FILE_KEYS)
    if unknown:
        errors.append(f"{path.name}: unknown top-level keys {unknown} (allowed: {sorted(FILE_KEYS)})")
    key = data.get("paper")
    if not isinstance(key, str) or key not in papers:
        errors.append(f"{path.name}: 'paper' must be one of {sorted(papers)}, got {key!r}")
    raw = data.get("claim", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        errors.append(f"{path.name}: 'claim' must be an array of tables ([[claim]] rows)")
        raw = []
    rows = []
    for i, r in enumerate(raw, start=1):
        where = f"{path.name}, row {i}"
        bad = sorted(set(r) - ROW_KEYS)
        if bad:
            errors.append(f"{where}: unknown keys {bad} (allowed: {sorted(ROW_KEYS)})")
        location = _text(r, "location", where, errors)
        statement = _text(r, "statement", where, errors)
        experiment = _text(r, "experiment", where, errors, required=False)
        excluded = _text(r, "excluded", where, errors, required=False)
        if (experiment is None) == (excluded is None) and not any(
                e.startswith(where) and ("'experiment'" in e or "'excluded'" in e) for e in errors):
            errors.append(f"{where}: needs exactly one of 'experiment' (with 'claims') or 'excluded' (the reason)")
        claims = r.get("claims")
        if experiment is not None:
            if (not isinstance(claims, list) or not claims
                    or not all(isinstance(c, str) and c.strip() for c in claims)):
                errors.append(f"{where}: 'claims' must be a non-empty list of claim-id patterns, got {claims!r}")
                claims = []
        elif claims is not None or "gpu" in r:
            errors.append(f"{where}: 'claims' and 'gpu' belong to a tested row (with 'experiment'), not to a "
                          "row with 'excluded'")
        gpu = r.get("gpu", False)
        if not isinstance(gpu, bool):
            errors.append(f"{where}: 'gpu' must be true or false, got {gpu!r}")
            gpu = False
        rows.append(CoverageRow(paper=str(key), location=location or "", statement=statement or "",
                                experiment=experiment, claims=tuple(c.strip() for c in claims or ()) if experiment
                                else (), gpu=bool(gpu), excluded=excluded, source=path.name, index=i))
    if errors:
        raise ValueError("invalid coverage file:\n  " + "\n  ".join(errors))
    return rows


def load_inventory(folder: str | Path | None = None, skip: Iterable[str] = ()) -> list[CoverageRow]:
    """All rows of the inventory (files in name order, rows in file order), validated by :func:`load_file`;
    ``skip`` names files to leave out. ``ValueError`` collects the problems of every file."""
    skip = set(skip)
    rows: list[CoverageRow] = []
    errors: list[str] = []
    for f in inventory_files(folder):
        if f.name in skip:
            continue
        try:
            rows += load_file(f)
        except ValueError as e:
            errors.append(str(e).replace("invalid coverage file:\n  ", ""))
    if errors:
        raise ValueError("invalid coverage inventory:\n  " + "\n  ".join(errors))
    return rows


def _glob_chars(pattern: str) -> list[str]:
    return list(pattern.replace(_TEMPLATE, "\0"))


def patterns_intersect(a: str, b: str) -> bool:
    """Whether some claim id matches both patterns. Patterns use ``*`` (any text) and ``?`` (one character), and
    ``{...}`` (a part known only at run time) counts as ``*``; other characters are literal."""
    x, y = [c if c != "\0" else "*" for c in _glob_chars(a)], [c if c != "\0" else "*" for c in _glob_chars(b)]

    @cache
    def match(i: int, j: int) -> bool:
        if i == len(x) and j == len(y):
            return True
        if i < len(x) and x[i] == "*":
            return match(i + 1, j) or (j < len(y) and match(i, j + 1))
        if j < len(y) and y[j] == "*":
            return match(i, j + 1) or (i < len(x) and match(i + 1, j))
        if i < len(x) and j < len(y) and (x[i] == y[j] or "?" in (x[i], y[j])):
            return match(i + 1, j + 1)
        return False

    return match(0, 0)


def pattern_matches(pattern: str, claim_id: str) -> bool:
    """Whether an inventory pattern covers a claim id: ``fnmatch`` for a literal id; for an id template from the
    source (with ``{...}`` parts, :func:`optiscope.report.claim_ids.experiment_claim_ids`), whether some id could
    match both (:func:`patterns_intersect`)."""
    if _TEMPLATE in claim_id:
        return patterns_intersect(pattern, claim_id)
    return fnmatch.fnmatchcase(claim_id, pattern)


def _results_claim_ids(results_paths: Sequence[str | Path]) -> dict[str, set[str]]:
    """Claim ids per experiment in every results file under ``results_paths`` (all tiers, not only the latest)."""
    import json

    from optiscope.report.results_table import _result_files

    out: dict[str, set[str]] = {}
    for f in _result_files(results_paths):
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, Mapping) and "experiment" in res and isinstance(res.get("claims"), list):
            out.setdefault(str(res["experiment"]), set()).update(
                str(c.get("id")) for c in res["claims"] if isinstance(c, Mapping) and c.get("id"))
    return out


def known_claim_ids(results_paths: Sequence[str | Path] = ()) -> dict[str, list[str]]:
    """The claim ids each registered experiment can produce: the ids in its source
    (:func:`optiscope.report.claim_ids.experiment_claim_ids`, possibly with ``{...}`` parts) and the ids in any
    results file under ``results_paths`` (e.g. ``docs/results/data``)."""
    from optiscope.experiments.base import registry
    from optiscope.report.claim_ids import experiment_claim_ids

    data = _results_claim_ids(results_paths) if results_paths else {}
    out = {}
    for name, spec in registry().items():
        module = getattr(spec.fn, "__module__", "")
        ids = list(experiment_claim_ids(module)) if module else []
        ids += sorted(i for i in data.get(name, ()) if i not in ids)
        out[name] = ids
    return out


def coverage_problems(rows: Sequence[CoverageRow], results_paths: Sequence[str | Path] = ()) -> list[str]:
    """Disagreements between the inventory and the registry, one sentence each (empty: none):

    * a registered experiment's claim id (from its source or from results under ``results_paths``) that no row of
      that experiment covers;
    * a row naming an experiment that is not registered, or registered for another paper;
    * a row pattern that matches no claim id of its experiment.
    """
    from optiscope.experiments.base import registry

    specs = registry()
    ids = known_claim_ids(results_paths)
    problems = []
    for r in rows:
        if not r.tested:
            continue
        spec = specs.get(r.experiment)
        if spec is None:
            problems.append(f"{r.where()}: experiment {r.experiment!r} is not registered")
            continue
        if spec.paper != r.paper:
            problems.append(f"{r.where()}: experiment {r.experiment!r} is registered for paper {spec.paper!r}, "
                            f"not {r.paper!r}")
        for p in r.claims:
            if not any(pattern_matches(p, c) for c in ids.get(r.experiment, ())):
                problems.append(f"{r.where()}: pattern {p!r} matches no claim id of {r.experiment!r} "
                                f"(known: {', '.join(ids.get(r.experiment, ())) or 'none'})")
    by_experiment: dict[str, list[CoverageRow]] = {}
    for r in rows:
        if r.tested:
            by_experiment.setdefault(r.experiment, []).append(r)
    for name, cids in sorted(ids.items()):
        for c in cids:
            if not any(pattern_matches(p, c) for r in by_experiment.get(name, ()) for p in r.claims):
                problems.append(f"experiment {name!r}: claim id {c!r} matches no inventory row")
    return problems


def _short(text: Any, n: int) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def row_verdict(row: CoverageRow, claim_rows: Sequence[Mapping[str, Any]], max_measured: int = 3) -> RowVerdict:
    """The latest verdict of a tested row from ``claim_rows`` (:func:`optiscope.report.results_table.claims_rows`
    of the chosen results): the claims of ``row.experiment`` whose ids match the row's patterns.

    ``label`` is the most serious per-claim verdict (does not hold > untestable > holds); ``no results`` when the
    experiment has no results, ``not in the results`` when its results have no claim the patterns match."""
    mine = [c for c in claim_rows if c.get("experiment") == row.experiment]
    if not mine:
        return RowVerdict("no results")
    hit = [c for c in mine if any(fnmatch.fnmatchcase(str(c.get("id")), p) for p in row.claims)]
    if not hit:
        return RowVerdict("not in the results", tier="/".join(sorted({str(c.get("tier")) for c in mine})))
    counts = Counter(str(c.get("verdict")) for c in hit)
    label = next(v for v in _VERDICT_ORDER if counts.get(v)) if counts else "untestable"
    tiers = []
    for c in hit:
        t = str(c.get("tier") or c.get("preset") or "")
        if t and t not in tiers:
            tiers.append(t)
    reason = ""
    if label != "holds":
        first = next(c for c in hit if c.get("verdict") == label)
        text = str(first.get("reason") or "")
        for prefix in ("untestable here: ", "undecided here: "):
            text = text.removeprefix(prefix)
        reason = (f"`{first.get('id')}`: " if len(hit) > 1 else "") + _short(text, 170) if text else ""
    parts = []
    for c in hit[:max_measured]:
        ours = _short(c.get("ours", ""), 110 if len(hit) == 1 else 70)
        parts.append(f"`{c.get('id')}`: {ours}" if len(hit) > 1 else ours)
    if len(hit) > max_measured:
        parts.append(f"… (+{len(hit) - max_measured} more)")
    return RowVerdict(label, dict(counts), "/".join(tiers), reason, "; ".join(parts),
                      tuple(str(c.get("id")) for c in hit))


def coverage_rows(rows: Sequence[CoverageRow], results_paths: Sequence[str | Path] = ()) \
        -> list[tuple[CoverageRow, RowVerdict | None]]:
    """Each row with its latest verdict (None for a left-out row), read from the results under
    ``results_paths`` (highest tier, then newest file, per experiment: :func:`results_table.load_results`)."""
    from optiscope.report.results_table import claims_rows

    claims = claims_rows(results_paths) if results_paths else []
    return [(r, row_verdict(r, claims) if r.tested else None) for r in rows]


def summary_line(joined: Sequence[tuple[CoverageRow, RowVerdict | None]]) -> str:
    """``N claims: k tested (a hold, b do not hold, c untestable, d without results), m left out.``"""
    tested = [v for r, v in joined if r.tested]
    n_left = sum(1 for r, _ in joined if not r.tested)
    c = Counter(v.label for v in tested if v is not None)
    parts = [f"{c.get('holds', 0)} hold", f"{c.get('does not hold', 0)} do not hold",
             f"{c.get('untestable', 0)} untestable"]
    missing = c.get("no results", 0) + c.get("not in the results", 0)
    if missing:
        parts.append(f"{missing} without results")
    return (f"**{len(joined)} claims**: {len(tested)} tested ({', '.join(parts)}), {n_left} left out "
            "(each with its reason).")


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def coverage_markdown(joined: Sequence[tuple[CoverageRow, RowVerdict | None]]) -> str:
    """One paper's coverage table: location, statement, experiment, claim ids, tier, verdict (why), measured. The
    tested rows come first, then the left-out ones, each group in inventory order."""
    lines = ["| location | statement | experiment | claim ids | tier | verdict (why) | measured |",
             "|---|---|---|---|---|---|---|"]
    ordered = [x for x in joined if x[0].tested] + [x for x in joined if not x[0].tested]
    for r, v in ordered:
        if r.tested and v is not None:
            ids = ", ".join(f"`{p}`" for p in r.claims)
            tier = v.tier or "—"
            if r.gpu and "full" not in v.tier.split("/"):
                tier += " (full preset on GPU decides)"
            counts = ""
            if sum(v.counts.values()) > 1 and len(v.counts) > 1:
                plural = {"holds": "hold", "does not hold": "do not hold"}
                counts = f" (of {sum(v.counts.values())}: " + ", ".join(
                    f"{v.counts[k]} {k if v.counts[k] == 1 else plural.get(k, k)}"
                    for k in _VERDICT_ORDER if v.counts.get(k)) + ")"
            verdict = f"**{v.label}**{counts}" + (f": {v.reason}" if v.reason else "")
            lines.append(f"| {_cell(r.location)} | {_cell(r.statement)} | `{_cell(r.experiment)}` | {_cell(ids)} | "
                         f"{_cell(tier)} | {_cell(verdict)} | {_cell(v.measured or '—')} |")
        else:
            lines.append(f"| {_cell(r.location)} | {_cell(r.statement)} | — | — | — | "
                         f"**left out**: {_cell(r.excluded)} | — |")
    return "\n".join(lines)


_FORBIDDEN = re.compile(r"\b(seeds?|issues?|specs?|tasks?)\b|/work/|workspace", re.IGNORECASE)


def forbidden_words(text: str) -> list[str]:
    """Words the product page must not contain (working names of the papers and of this project's
    infrastructure), as found in ``text``."""
    return sorted({m.group(0) for m in _FORBIDDEN.finditer(text)})
