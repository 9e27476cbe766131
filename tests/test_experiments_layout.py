"""Layout of ``optiscope.experiments``: one subpackage per paper, discovered by the registry, each documenting its
paper and its experiments; and :func:`optiscope.metrics.verdicts.all_of`, the conjunction the papers share."""

from __future__ import annotations

import importlib

import pytest

from optiscope.metrics.verdicts import Verdict, all_of

SUBPACKAGES = {
    "diagonal_uniformity": ("000", "Jiang"),
    "adam_implicit_bias": ("001", "Cattaneo"),
    "vanishing_curvature": ("002", "Orvieto"),
    "explr_deep_linear": ("003", "Li, S. Arora"),
    "sgd_generating_functions": ("004", "Velikanov"),
}


def test_every_experiment_lives_in_the_subpackage_of_its_paper_and_is_named_in_its_docstring():
    from optiscope.experiments.base import registry

    specs = registry()
    assert len(specs) >= 26
    seen = set()
    for name, spec in specs.items():
        parts = spec.fn.__module__.split(".")
        assert parts[:2] == ["optiscope", "experiments"] and len(parts) == 4, (name, spec.fn.__module__)
        sub = parts[2]
        assert sub in SUBPACKAGES, (name, sub)
        assert SUBPACKAGES[sub][0] == spec.paper, (name, sub, spec.paper)
        doc = importlib.import_module(f"optiscope.experiments.{sub}").__doc__ or ""
        assert f"``{name}``" in doc, f"{sub}/__init__.py does not name {name}"
        seen.add(sub)
    assert seen == set(SUBPACKAGES)


@pytest.mark.parametrize("sub", sorted(SUBPACKAGES))
def test_subpackage_docstring_cites_its_paper(sub):
    doc = importlib.import_module(f"optiscope.experiments.{sub}").__doc__ or ""
    assert SUBPACKAGES[sub][1] in doc
    assert any(str(y) in doc for y in (2018, 2019, 2020, 2022, 2023, 2024))


def test_all_of_is_a_three_valued_conjunction():
    t, f, n = Verdict(True, "a"), Verdict(False, "b"), Verdict(None, "c")
    assert all_of([t, t]).holds is True
    assert all_of([t, f]).holds is False
    assert all_of([f, n]).holds is None  # an untestable part makes the whole untestable
    assert all_of([]).holds is None
    v = all_of([t, f], labels=["left", "right"])
    assert v.reason == "left: a; right: b"
    assert all_of([t, f]).reason == "part 1: a; part 2: b"
    with pytest.raises(ValueError, match="1 labels for 2 verdicts"):
        all_of([t, f], labels=["only"])
