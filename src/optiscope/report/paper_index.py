"""``docs/papers.md``: for each paper its full reference, the coverage table of its claims, and the theory, metric and
optimizer functions whose docstrings cite it. Generated, never typed by hand: ``make papers`` (or
``python -m optiscope.report.paper_index PATH [--results DIR ...]``) rewrites it.

The coverage table has one row per claim of the paper (every figure, table, theorem, proposition, lemma or stated
observation with a measurable statement) from the inventory in ``optiscope/coverage/*.toml``
(:mod:`optiscope.report.coverage`): where it stands in the paper, what it says, the experiment and claim ids that
test it, and the latest verdict with the tier that decided it and the measured value, read from the results under
``--results`` (:func:`optiscope.report.results_table.claims_rows`: per experiment the highest tier, then the newest
file; default ``docs/results/data``, the committed copies). Claims left out say why.

Claim ids are read from the experiment modules' source (:func:`experiment_claim_ids`): the first argument of
``Claim(...)`` and ``Claim.judged(...)`` and the ids the optiscope helpers they call build; an id built at run time
shows its variable parts as ``{...}`` (every run's ``results.json`` lists all of them).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from optiscope.papers import PAPERS, Reference

__all__ = ["CITATION_PATTERNS", "DEFAULT_RESULTS", "citing_functions", "experiment_claim_ids", "main",
           "render_papers_markdown"]

CITATION_PATTERNS: dict[str, tuple[str, ...]] = {
    "000": ("Jiang et al.",),
    "001": ("Cattaneo et al.",),
    "002": ("Orvieto et al.",),
    "003": ("Li & Arora", "Arora et al.", "Arora, Cohen"),
    "004": ("Velikanov et al.",),
}
"""Text that marks a docstring as citing a paper, by paper key."""

_CITING_PACKAGES = ("optiscope.theory", "optiscope.metrics", "optiscope.optim")


def _public_members(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    out = []
    for n in names:
        obj = getattr(module, n, None)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == module.__name__:
            out.append((n, obj))
    return out


def _modules(package: str) -> list:
    pkg = importlib.import_module(package)
    mods = [pkg]
    for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):  # subpackages too (e.g. theory.sgd)
        if not any(part.startswith("_") for part in info.name.split(".")):
            mods.append(importlib.import_module(info.name))
    return mods


def citing_functions(key: str) -> list[str]:
    """Dotted names of the public functions and classes in ``theory``, ``metrics`` and ``optim`` whose own
    docstring cites the paper ``key`` (by the patterns in :data:`CITATION_PATTERNS`), sorted."""
    patterns = CITATION_PATTERNS[key]
    found = set()
    for package in _CITING_PACKAGES:
        for mod in _modules(package):
            for name, obj in _public_members(mod):
                doc = inspect.getdoc(obj) or ""
                if any(p in doc for p in patterns):
                    found.add(f"{mod.__name__}.{name}")
    return sorted(found)


def _claim_id_node(node: ast.AST) -> ast.AST | None:
    """The id argument of a ``Claim(...)`` / ``Claim.judged(...)`` call (first positional or ``id=``), else None."""
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    is_claim = (isinstance(f, ast.Name) and f.id == "Claim") or (
        isinstance(f, ast.Attribute) and f.attr == "judged" and isinstance(f.value, ast.Name)
        and f.value.id == "Claim")
    if not is_claim:
        return None
    return node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "id"), None)


def _literal_id(node: ast.AST, env: dict[str, str | None] | None = None) -> str | None:
    """The text of a claim id written as a string or f-string; a part that is not known at import time shows as
    ``{...}``. ``env`` maps a helper's parameter names to the text of the caller's arguments (None: unknown)."""
    env = env or {}
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id] if env[node.id] is not None else "{...}"
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif (isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.format_spec is None
                  and v.conversion == -1 and env.get(v.value.id) is not None):
                parts.append(env[v.value.id])
            else:
                parts.append("{...}")
        return "".join(parts)
    return None


def _helper_function(call: ast.Call, module) -> object | None:
    """The optiscope function a call in ``module`` refers to (``helper(...)`` or ``mod.helper(...)``), if any."""
    f = call.func
    obj = None
    if isinstance(f, ast.Name):
        obj = getattr(module, f.id, None)
    elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        owner = getattr(module, f.value.id, None)
        if inspect.ismodule(owner):
            obj = getattr(owner, f.attr, None)
    if inspect.isfunction(obj) and str(getattr(obj, "__module__", "")).startswith("optiscope."):
        return obj
    return None


def _helper_claim_ids(call: ast.Call, fn) -> list[str]:
    """Claim ids a helper ``fn`` builds when called as ``call``: its own ``Claim`` ids with the caller's string
    arguments substituted for its parameters (one level deep)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        params = list(inspect.signature(fn).parameters.values())
    except (OSError, TypeError, ValueError, SyntaxError):
        return []
    id_nodes = [n for n in (_claim_id_node(c) for c in ast.walk(tree)) if n is not None]
    if not id_nodes:
        return []
    env: dict[str, str | None] = {}
    for p in params:
        if isinstance(p.default, str):
            env[p.name] = p.default
        else:
            env[p.name] = None
    for p, arg in zip(params, call.args):
        if isinstance(arg, ast.Starred):
            break
        env[p.name] = _literal_id(arg)
    for kw in call.keywords:
        if kw.arg is not None and kw.arg in env:
            env[kw.arg] = _literal_id(kw.value)
    out = []
    for node in id_nodes:
        cid = _literal_id(node, env)
        if cid is not None:
            out.append(cid)
    return out


def _template_regex(cid: str) -> re.Pattern:
    return re.compile("^" + ".+".join(re.escape(part) for part in cid.split("{...}")) + "$")


def experiment_claim_ids(module_name: str) -> list[str]:
    """Claim ids written in the source of an experiment module, in order of appearance, without repeats: the
    first argument (or ``id=``) of each ``Claim(...)`` / ``Claim.judged(...)``, and the ids built by the
    optiscope helpers it calls (``rc.faster_claim(..., "adam", "sgdm")`` gives ``adam_faster``), one level deep.

    A part known only at run time shows as ``{...}``; a template of which a literal id is an instance is dropped
    (a local helper's ``f"{a}_faster"`` once its call sites give ``adam_faster``), and so is an id that is
    nothing but ``{...}``."""
    module = importlib.import_module(module_name)
    tree = ast.parse(inspect.getsource(module))
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        id_node = _claim_id_node(node)
        if id_node is not None:
            cid = _literal_id(id_node)
            if cid is not None:
                found.append((node.lineno, node.col_offset, cid))
            continue
        fn = _helper_function(node, module)
        if fn is not None:
            found += [(node.lineno, node.col_offset, cid) for cid in _helper_claim_ids(node, fn)]
    ids: list[str] = []
    for _, _, cid in sorted(found):
        if cid not in ids and cid.replace("{...}", "").strip("_"):
            ids.append(cid)
    ids = [c for c in ids if "{...}" not in c
           or not any("{...}" not in o and _template_regex(c).match(o) for o in ids)]
    return sorted(ids, key=lambda s: (s.startswith("{"), ids.index(s)))


def _reference_lines(ref: Reference) -> list[str]:
    lines = [f"- **Reference:** {ref.citation()}"]
    if ref.url:
        lines.append(f"- **arXiv:** <{ref.url}>")
    for base in ref.based_on:
        lines.append(f"- **Based on:** {base.citation()} <{base.url}>")
    return lines


DEFAULT_RESULTS = ("docs/results/data",)
"""Where ``make papers`` reads the latest verdicts by default: the committed copies of the results files."""


def render_papers_markdown(results: Sequence[str | Path] | None = None, inventory: str | Path | None = None) -> str:
    """The text of ``docs/papers.md`` (see the module docstring): the coverage rows of :mod:`optiscope.report.coverage`
    (from ``inventory``, default the packaged folder) with the latest verdicts from ``results`` (run directories,
    ``results.json`` files or folders of them; default :data:`DEFAULT_RESULTS` where it exists; ``()``: none)."""
    from optiscope.experiments.base import registry
    from optiscope.report.coverage import coverage_markdown, coverage_rows, load_inventory, summary_line

    specs = registry()
    unknown = sorted({s.paper for s in specs.values()} - set(PAPERS))
    if unknown:
        raise ValueError(f"experiments registered with unknown paper keys: {unknown}")
    if results is None:
        results = [p for p in DEFAULT_RESULTS if Path(p).exists()]
    rows = load_inventory(inventory)
    joined = coverage_rows(rows, list(results))
    lines = ["# The papers", "",
             ("Generated by `make papers` from the claims inventory (`src/optiscope/coverage/*.toml`), the "
              "experiment registry, the latest results and the docstrings; do not edit by hand."),
             "",
             ("Each paper lists every claim with a measurable statement: where it stands in the paper, what it says, "
              "the experiment and claim ids that test it, the tier that decided the latest verdict (`quick`, `medium`, "
              "`full`), the verdict (holds / does not hold / untestable, with the reason) and the measured value. "
              "Verdicts come from the newest highest-tier results (`make papers RESULTS=\"DIR ...\"`; by default the "
              "committed copies in `docs/results/data`). A row with several claim ids shows the most serious verdict "
              "(does not hold > untestable > holds) and the counts. Claims left out say why."),
             "",
             ("Each experiment runs with `optiscope run NAME` (`--preset quick|medium|full`); `optiscope list` names "
              "them all."), ""]
    for key, ref in PAPERS.items():
        lines += [f"## {ref.short}", "", f"*{ref.title}*", ""]
        lines += _reference_lines(ref)
        lines.append("")
        mine = [(r, v) for r, v in joined if r.paper == key]
        lines += [summary_line(mine), ""]
        lines += [coverage_markdown(mine), ""]
        funcs = citing_functions(key)
        if funcs:
            lines += ["Theory, metrics and optimizers citing it:", ""]
            lines += [f"- `{name}`" for name in funcs]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m optiscope.report.paper_index [PATH] [--results DIR ...]``: write the page to PATH (default
    ``docs/papers.md``), verdicts from the results under each DIR (default :data:`DEFAULT_RESULTS`). Disagreements
    between the inventory and the registry (:func:`optiscope.report.coverage.coverage_problems`) are printed as
    warnings; an invalid inventory file is an error (exit status 2)."""
    import argparse

    from optiscope.report.coverage import coverage_problems, load_inventory

    ap = argparse.ArgumentParser(prog="python -m optiscope.report.paper_index", description=main.__doc__.split("\n")[0])
    ap.add_argument("path", nargs="?", default="docs/papers.md", help="the Markdown file to write")
    ap.add_argument("--results", nargs="*", default=None, help="run directories or results files to read verdicts from")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    path = Path(args.path)
    results = None if args.results is None else [r for r in args.results if r]
    try:
        text = render_papers_markdown(results)
        problems = coverage_problems(load_inventory(), list(results if results is not None else
                                                            [p for p in DEFAULT_RESULTS if Path(p).exists()]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
