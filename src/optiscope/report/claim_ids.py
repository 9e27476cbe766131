"""Claim ids of an experiment, read from its module's source: the first argument of every ``Claim(...)`` /
``Claim.judged(...)`` call, also inside helper functions one level deep (ids built with f-strings keep their
``{...}`` parts). Used by the papers page (:mod:`optiscope.report.paper_index`) and the coverage checks
(:mod:`optiscope.report.coverage`)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap

__all__ = ["experiment_claim_ids"]


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
