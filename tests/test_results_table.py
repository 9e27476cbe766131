"""report.results_table: rows from results.json files, tier choice, formatting and the README section rewrite."""

import json
import os

import pytest

from optiscope.report.results_table import (
    BEGIN_MARKER,
    END_MARKER,
    claims_rows,
    format_measured,
    load_results,
    main,
    markdown_table,
    update_readme,
)


def _write(path, experiment, preset, claims, mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"experiment": experiment, "preset": preset, "seed": 0, "claims": claims,
                                "metrics": {}}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


CLAIM = {"id": "ratio", "claim": "median ratio in band", "paper": "1.4-2x",
         "measured": {"median_ratio": 3.9, "ci95": [3.25, 4.61], "repeats": 3}, "holds": False,
         "reason": "CI entirely above the widened band", "tier": "medium"}


def test_rows_pick_highest_tier_and_format(tmp_path):
    _write(tmp_path / "a" / "results.json", "rmed_lm", "quick", [dict(CLAIM, holds=True, tier="quick")], 2e9)
    _write(tmp_path / "b" / "results.json", "rmed_lm", "medium", [CLAIM], 1e9)        # older but higher tier
    _write(tmp_path / "c" / "results.json", "rmed_cnn", "quick",
           [{"id": "x", "claim": "c", "paper": "p", "measured": 1.5, "holds": None, "reason": "untestable here: y"}])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.json").write_text("{not json")
    chosen = load_results([tmp_path])
    assert [r["experiment"] for _, r in chosen] == ["rmed_cnn", "rmed_lm"]
    rows = claims_rows([tmp_path])
    lm = [r for r in rows if r["experiment"] == "rmed_lm"][0]
    assert lm["tier"] == "medium" and lm["verdict"] == "does not hold" and lm["paper_ref"] == "Jiang et al. 2023"
    assert lm["ours"].startswith("median ratio 3.9 [3.25, 4.61]")
    cnn = [r for r in rows if r["experiment"] == "rmed_cnn"][0]
    assert cnn["verdict"] == "untestable" and cnn["tier"] == "quick"      # no tier in the claim: the preset
    md = markdown_table(rows)
    assert md.count("\n") == 3 and "**does not hold**: CI entirely above" in md and "(medium)" in md
    with pytest.raises(ValueError, match="does not exist"):
        claims_rows([tmp_path / "missing"])


def test_format_measured():
    assert format_measured({"layers_a_smaller": 4, "n_layers": 5, "fraction": 0.8}) == "4/5 layers"
    assert format_measured({"slope": 2.0, "ci95": [1.0, 3.0]}) == "slope 2 [1, 3]"
    assert format_measured({"gap_mean": 0.19, "gap_ci95": [-0.03, 0.41]}) == "gap mean 0.19 [-0.03, 0.41]"
    assert format_measured(0.5) == "0.5" and format_measured([1.0, 2.0]) == "[1, 2]"


def test_update_readme_only_between_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\nbefore\n{BEGIN_MARKER}\nold table\n{END_MARKER}\nafter\n")
    assert update_readme(readme, "| new |") is True
    text = readme.read_text()
    assert text == f"# t\nbefore\n{BEGIN_MARKER}\n| new |\n{END_MARKER}\nafter\n"
    assert update_readme(readme, "| new |") is False
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(tmp_path / "plain.md", "x")
    run = _write(tmp_path / "r" / "results.json", "rmed_lm", "quick", [CLAIM])
    assert main([str(run.parent), "--readme", str(readme), "--collect", str(tmp_path / "data")]) == 0
    assert (tmp_path / "data" / "rmed_lm-quick.json").exists() and "3.25" in readme.read_text()
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
