"""The reference table, the CLI's short names, and docs/papers.md (the claim-coverage page) against the experiment
registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optiscope.papers import PAPERS, paper, short_name

DOCS = Path(__file__).resolve().parents[1] / "docs" / "papers.md"


def test_every_reference_is_complete():
    for key, ref in PAPERS.items():
        assert ref.key == key
        assert ref.authors and ref.title and ref.venue and 2015 <= ref.year <= 2030
        refs = ref.based_on or (ref,)
        for r in refs:
            assert re.fullmatch(r"\d{4}\.\d{5}", r.arxiv), (key, r.arxiv)
            assert r.url == f"https://arxiv.org/abs/{r.arxiv}"
            assert r.short.split()[0] in r.authors[0], (r.short, r.authors)
            assert str(r.year) in r.short


def test_lookup():
    assert short_name("000") == "Jiang et al. 2023"
    assert short_name("004") == "Velikanov et al. 2023"
    assert paper(1).short == "Cattaneo et al. 2024"
    assert short_name("000,002") == "Jiang et al. 2023; Orvieto et al. 2022"
    assert "arXiv:2211.02254" in paper("000").citation()
    assert "?." not in paper("000").citation()
    with pytest.raises(ValueError, match="unknown paper key '007'"):
        paper("007")
    with pytest.raises(ValueError):
        short_name("")


def _coverage_cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_every_registered_experiment_has_a_known_paper_and_a_row_in_docs():
    """Each registered experiment appears in the experiment column of its paper's coverage table."""
    from optiscope.experiments.base import registry

    text = DOCS.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    rows: dict[str, set[str]] = {}
    for sec in sections:
        title = sec.splitlines()[0].strip()
        for line in sec.splitlines():
            if not line.startswith("| ") or line.startswith(("| location", "|---")):
                continue
            cells = _coverage_cells(line)
            assert len(cells) == 7, line
            m = re.fullmatch(r"`([a-z0-9_]+)`", cells[2])
            if m:
                rows.setdefault(m.group(1), set()).add(title)
    missing = []
    for name, spec in registry().items():
        assert spec.paper in PAPERS, (name, spec.paper)
        if PAPERS[spec.paper].short not in rows.get(name, set()):
            missing.append(name)
    assert not missing, f"docs/papers.md lacks coverage rows for {missing} (add inventory rows, run `make papers`)"


def test_generated_page_lists_every_experiment_and_cites_theory():
    from optiscope.experiments.base import registry
    from optiscope.report.paper_index import citing_functions, experiment_claim_ids, render_papers_markdown

    text = render_papers_markdown(())  # no results needed: the rows, not the verdicts
    for name in registry():
        assert f"| `{name}` |" in text
    assert "optiscope.theory.sgd.critical_learning_rate" in citing_functions("004") or \
        any(f.startswith("optiscope.theory.sgd.") for f in citing_functions("004"))
    assert not any(f.startswith("optiscope.theory.sgd.") for f in citing_functions("000"))
    ids = experiment_claim_ids("optiscope.experiments.diagonal_uniformity.rmed_switch")
    assert "loss_gap_closes" in ids


def test_cli_list_shows_short_names():
    from typer.testing import CliRunner

    from optiscope.cli.main import app

    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    assert "Jiang et al. 2023" in res.output
    assert not re.search(r"(?<![\d.])00[0-4](?![\d.])", res.output)
