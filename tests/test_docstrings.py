"""Every public module, function, class and method of optiscope has a docstring.

Public: modules whose dotted name has no component starting with ``_``; in each, the names in ``__all__`` (or,
without ``__all__``, every name not starting with ``_``) that are functions or classes defined in that module; in
each such class, the methods, properties, classmethods and staticmethods defined in its body whose names do not
start with ``_``. A method that overrides a documented base-class method inherits its docstring (as ``help`` and
the API reference show it). The auto-generated ``Name(field: type, ...)`` docstring of a dataclass does not count.

Run ``python tests/test_docstrings.py`` to list what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import optiscope


def _modules():
    yield optiscope
    for info in pkgutil.walk_packages(optiscope.__path__, "optiscope."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        yield importlib.import_module(info.name)


def _has_doc(obj) -> bool:
    doc = inspect.getdoc(obj)
    if not doc or not doc.strip():
        return False
    # the signature that dataclasses write when the class has no docstring does not count
    return not (inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__doc__ is not None
                and obj.__doc__.startswith(f"{obj.__name__}("))


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


def _class_members(cls):
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            fn = raw.__func__
        elif isinstance(raw, property) or inspect.isfunction(raw):
            fn = raw
        else:
            continue
        yield name, fn


def _inherited_doc(cls, name) -> bool:
    for base in cls.__mro__[1:]:
        member = base.__dict__.get(name)
        if member is not None and _has_doc(member.__func__ if isinstance(member, (staticmethod, classmethod))
                                           else member):
            return True
    return False


def audit() -> tuple[int, list[str]]:
    """``(number of public objects, dotted names of those without a docstring)``."""
    total, missing, seen = 0, [], set()
    for module in _modules():
        total += 1
        if not _has_doc(module):
            missing.append(module.__name__)
        for name in _public_names(module):
            obj = getattr(module, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__ or id(obj) in seen:
                continue  # re-exported: counted where it is defined
            seen.add(id(obj))
            total += 1
            qual = f"{module.__name__}.{name}"
            if not _has_doc(obj):
                missing.append(qual)
            if inspect.isclass(obj):
                for mname, member in _class_members(obj):
                    total += 1
                    if not (_has_doc(member) or _inherited_doc(obj, mname)):
                        missing.append(f"{qual}.{mname}")
    return total, sorted(missing)


def test_every_public_object_has_a_docstring():
    total, missing = audit()
    coverage = 1 - len(missing) / total
    assert not missing, f"docstring coverage {coverage:.1%} of {total} public objects; missing: {missing}"


def test_the_audit_can_fail():
    import types

    mod = types.ModuleType("optiscope_fake")

    @dataclasses.dataclass
    class NoDoc:
        x: int = 0

        def method(self):
            return self.x

    assert not _has_doc(NoDoc) and not _has_doc(NoDoc.method)
    assert _has_doc(audit)
    assert not _has_doc(mod)


if __name__ == "__main__":  # pragma: no cover
    n, miss = audit()
    print(f"{n - len(miss)}/{n} documented ({1 - len(miss) / n:.1%}); missing {len(miss)}:")
    print("\n".join(miss))
