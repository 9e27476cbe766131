"""The claims inventory (``src/optiscope/coverage/*.toml``) against the experiment registry, its loader and checks,
and ``docs/papers.md`` against its generator."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optiscope.report import coverage as cov
from optiscope.report.coverage import CoverageRow

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "results" / "data"
DOCS = ROOT / "docs" / "papers.md"


@pytest.fixture(scope="module")
def inventory() -> list[CoverageRow]:
    return cov.load_inventory()


# --- the shipped inventory -------------------------------------------------------------------------------------


def test_inventory_loads_and_covers_every_paper(inventory):
    from optiscope.papers import PAPERS

    assert cov.inventory_files(), "no coverage files shipped in optiscope/coverage"
    assert {r.paper for r in inventory} == set(PAPERS)
    for r in inventory:
        assert r.location and r.statement, r.where()
        assert r.tested != (r.excluded is not None), r.where()
        if r.tested:
            assert r.claims, r.where()


def test_every_claim_id_has_a_row_and_every_row_matches_a_registered_claim(inventory):
    """Fails when a registered experiment's claim id (from its source or from docs/results/data) matches no row, when
    a row names an unregistered experiment (or one of another paper), or when a row's pattern matches no claim id."""
    problems = cov.coverage_problems(inventory, [DATA])
    assert not problems, "coverage inventory out of date:\n  " + "\n  ".join(problems)


def test_inventory_text_is_product_text(inventory):
    for r in inventory:
        for text in (r.location, r.statement, r.excluded or ""):
            assert not cov.forbidden_words(text), (r.where(), cov.forbidden_words(text))


def test_coverage_files_ship_with_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"coverage/*.toml"' in block
    assert cov.inventory_folder() == ROOT / "src" / "optiscope" / "coverage" or cov.inventory_files()


# --- docs/papers.md ---------------------------------------------------------------------------------------------


def test_papers_page_is_up_to_date():
    """``docs/papers.md`` is what the generator writes from the inventory, the registry and the committed results
    (``make papers``)."""
    from optiscope.report.paper_index import render_papers_markdown

    expected = render_papers_markdown([DATA])
    assert DOCS.read_text() == expected, "docs/papers.md is out of date: run `make papers`"


def test_papers_page_has_every_row_and_no_working_names(inventory):
    text = DOCS.read_text()
    assert not cov.forbidden_words(text), cov.forbidden_words(text)
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| location")]
    assert len(table_rows) == len(inventory)
    assert len(re.findall(r"^\*\*\d+ claims\*\*: \d+ tested \(", text, flags=re.MULTILINE)) == 5


# --- the loader ----------------------------------------------------------------------------------------------------


def _write(tmp_path, body: str, name: str = "000.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


GOOD = '''paper = "000"
[[claim]]
location = "Fig. 1"
statement = "a claim"
experiment = "rmed_switch"
claims = ["loss_gap_closes"]

[[claim]]
location = "App. B"
statement = "another"
excluded = "a proof"
'''


def test_loader_reads_a_good_file(tmp_path):
    rows = cov.load_file(_write(tmp_path, GOOD))
    assert [r.tested for r in rows] == [True, False]
    assert rows[0].claims == ("loss_gap_closes",) and rows[0].gpu is False and rows[0].index == 1
    assert rows[1].excluded == "a proof" and rows[1].source == "000.toml"


@pytest.mark.parametrize("body, message", [
    (GOOD.replace('statement = "a claim"', 'statement = "a claim"\nnote = "x"'), r"unknown keys \['note'\]"),
    ("extra = 1\n" + GOOD, r"unknown top-level keys \['extra'\]"),
    (GOOD.replace('paper = "000"', 'paper = "007"'), r"'paper' must be one of"),
    (GOOD.replace('excluded = "a proof"', ""), r"row 2: needs exactly one of 'experiment'"),
    (GOOD.replace('excluded = "a proof"', 'excluded = "a proof"\nexperiment = "rmed_lm"'),
     r"row 2: needs exactly one of"),
    (GOOD.replace('claims = ["loss_gap_closes"]', ""), r"row 1: 'claims' must be a non-empty list"),
    (GOOD.replace('claims = ["loss_gap_closes"]', "claims = []"), r"'claims' must be a non-empty list"),
    (GOOD.replace('claims = ["loss_gap_closes"]', 'claims = ["loss_gap_closes"]\ngpu = "yes"'),
     r"'gpu' must be true or false"),
    (GOOD.replace('excluded = "a proof"', 'excluded = "a proof"\ngpu = true'), r"belong to a tested row"),
    (GOOD.replace('location = "App. B"\n', ""), r"row 2: missing 'location'"),
    (GOOD.replace('statement = "another"', 'statement = ""'), r"'statement' must be a non-empty string"),
    ("paper = \"000\"\n[[claim]\n", r"cannot read coverage file"),
])
def test_loader_rejects_bad_files(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        cov.load_file(_write(tmp_path, body))


def test_load_inventory_collects_errors_of_every_file(tmp_path):
    _write(tmp_path, GOOD, "000.toml")
    _write(tmp_path, GOOD.replace('location = "Fig. 1"', 'location = "Fig. 1"\nwhere = 2'), "001.toml")
    _write(tmp_path, GOOD.replace('paper = "000"', 'paper = "x"'), "002.toml")
    with pytest.raises(ValueError) as e:
        cov.load_inventory(tmp_path)
    assert "001.toml, row 1: unknown keys ['where']" in str(e.value) and "002.toml" in str(e.value)
    assert len(cov.load_inventory(tmp_path, skip={"001.toml", "002.toml"})) == 2
    with pytest.raises(ValueError, match="does not exist"):
        cov.load_inventory(tmp_path / "missing")


# --- the checks against the registry ---------------------------------------------------------------------------------


def test_problems_name_unregistered_experiments_wrong_papers_and_dead_patterns(inventory):
    rows = [CoverageRow("000", "Fig. 9", "s", "no_such_experiment", ("x",), source="t.toml", index=1),
            CoverageRow("001", "Fig. 9", "s", "rmed_switch", ("loss_gap_closes",), source="t.toml", index=2),
            CoverageRow("000", "Fig. 9", "s", "rmed_switch", ("no_such_claim_*",), source="t.toml", index=3)]
    problems = cov.coverage_problems(inventory + rows, [DATA])
    assert any("row 1: experiment 'no_such_experiment' is not registered" in p for p in problems)
    assert any("row 2: experiment 'rmed_switch' is registered for paper '000', not '001'" in p for p in problems)
    assert any("row 3: pattern 'no_such_claim_*' matches no claim id of 'rmed_switch'" in p for p in problems)


def test_problems_name_uncovered_claim_ids(inventory):
    without = [r for r in inventory if r.experiment != "rmed_switch"]
    problems = cov.coverage_problems(without, [DATA])
    for cid in ("loss_gap_closes", "r_med_gap_closes", "sgd_slower_before_switch"):
        assert f"experiment 'rmed_switch': claim id '{cid}' matches no inventory row" in problems
    # a run-time id seen only in results counts too: drop the pattern that covers the committed step-decay ids
    narrowed = [r if r.experiment != "explr_equivalence" or "function_equivalence_step_decay" not in r.claims
                else CoverageRow(r.paper, r.location, r.statement, r.experiment, ("control_no_schedule_step_decay",),
                                 source=r.source, index=r.index) for r in inventory]
    problems = cov.coverage_problems(narrowed, [DATA])
    assert ("experiment 'explr_equivalence': claim id 'function_equivalence_step_decay' matches no inventory row"
            in problems)


def test_patterns_against_ids_and_templates():
    assert cov.pattern_matches("flows_track_adam_*", "flows_track_adam_eps1e-08")
    assert not cov.pattern_matches("flows_track_adam_*", "second_order_closer_bilinear")
    assert cov.pattern_matches("adagrad_faster", "{...}_faster")
    assert cov.pattern_matches("rmsprop_vs_sgdm_*", "{...}_vs_{...}_most_layers")
    assert not cov.pattern_matches("adagrad_faster", "{...}_slower")
    assert not cov.pattern_matches("exponent_*", "asymptotic_constants_nu{...}_kappa{...}")
    assert cov.patterns_intersect("a*c", "ab*")
    assert not cov.patterns_intersect("a*c", "b*")
    assert cov.patterns_intersect("a?c", "abc") and not cov.patterns_intersect("a?c", "ac")


def test_helper_claim_ids_are_found_in_the_source():
    from optiscope.report.paper_index import experiment_claim_ids

    lm = experiment_claim_ids("optiscope.experiments.diagonal_uniformity.rmed_lm")
    assert {"adam_faster", "equal_loss_ratio", "equal_step_most_layers"} <= set(lm)
    adaptive = experiment_claim_ids("optiscope.experiments.diagonal_uniformity.rmed_adaptive")
    assert "{...}_faster" in adaptive and "{...}_vs_{...}_most_layers" in adaptive
    assert all(c.replace("{...}", "").strip("_") for c in adaptive)


# --- verdicts of a row -------------------------------------------------------------------------------------------------


def _claim(cid, verdict, tier="quick", reason="", ours="x 1"):
    return {"experiment": "e", "id": cid, "verdict": verdict, "tier": tier, "reason": reason, "ours": ours}


def test_row_verdict_takes_the_most_serious_and_counts():
    row = CoverageRow("000", "Fig. 1", "s", "e", ("a_*",))
    claims = [_claim("a_1", "holds"), _claim("a_2", "untestable", "medium", "untestable here: too few layers"),
              _claim("a_3", "holds"), _claim("b_1", "does not hold")]
    v = cov.row_verdict(row, claims)
    assert v.label == "untestable" and v.counts == {"holds": 2, "untestable": 1}
    assert v.tier == "quick/medium" and v.reason == "`a_2`: too few layers" and v.ids == ("a_1", "a_2", "a_3")
    assert cov.row_verdict(CoverageRow("000", "F", "s", "e", ("a_*", "b_*")), claims).label == "does not hold"
    assert cov.row_verdict(CoverageRow("000", "F", "s", "e", ("a_1",)), claims).label == "holds"
    assert cov.row_verdict(CoverageRow("000", "F", "s", "e", ("c_*",)), claims).label == "not in the results"
    assert cov.row_verdict(CoverageRow("000", "F", "s", "other", ("a_*",)), claims).label == "no results"


def test_table_and_summary_render_tested_rows_first():
    tested = CoverageRow("000", "Fig. 1", "a | b", "e", ("a_*",), gpu=True)
    left = CoverageRow("000", "App. B", "c", excluded="a proof")
    joined = [(left, None), (tested, cov.row_verdict(tested, [_claim("a_1", "holds"),
                                                               _claim("a_2", "does not hold", reason="too far")]))]
    table = cov.coverage_markdown(joined).splitlines()
    assert table[2].startswith("| Fig. 1 | a \\| b | `e` | `a_*` | quick (full preset on GPU decides) | "
                               "**does not hold** (of 2: 1 does not hold, 1 holds): `a_2`: too far |")
    assert table[3] == "| App. B | c | — | — | — | **left out**: a proof | — |"
    assert cov.summary_line(joined) == ("**2 claims**: 1 tested (0 hold, 1 do not hold, 0 untestable), 1 left out "
                                        "(each with its reason).")
