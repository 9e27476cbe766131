"""The HTML report: report.html is the run's Markdown rendered by markdown-it (real tables, emphasis, images,
escaped text) inside the jinja2 page; DIR/index.html has one row per claim with verdict, reason and tier and links
that resolve; several run directories side by side (``compare_runs`` and ``optiscope show DIR1 DIR2``)."""

from __future__ import annotations

import importlib
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

TESTS = Path(__file__).resolve().parent


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    return p


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    import reproduce_fakes

    importlib.reload(reproduce_fakes)
    from optiscope.experiments.reproduce import reproduce
    from optiscope.report.html import finish_run, write_site

    out = tmp_path_factory.mktemp("html") / "all"
    try:
        reproduce(out, only=["tfake_alpha", "tfake_delta", "tfake_gamma", reproduce_fakes.FAIL], parallel=False,
                  postprocess=finish_run)
    finally:
        reproduce_fakes.unregister()
    write_site(out)
    return out


def test_markdown_renders_tables_emphasis_and_escapes_html():
    from optiscope.report.html import markdown_to_html

    html = markdown_to_html("# T\n\n| a | b |\n|---|---|\n| **x** | <script>alert(1)</script> |\n\n![f](figures/f.png)\n")
    p = _parse(html)
    tags = [t for t, _ in p.tags]
    assert "table" in tags and "td" in tags and "strong" in tags and "script" not in tags
    assert "&lt;script&gt;" in html and "| a |" not in html and "**" not in html
    assert ("img", {"src": "figures/f.png", "alt": "f"}) in p.tags


def test_format_value_shows_the_interval():
    from optiscope.report.markdown import format_value

    assert format_value({"median_ratio": 33.2, "ci95": [26.2, 42.3], "repeats": 2}) == \
        "median_ratio 33.2 [26.2, 42.3]; repeats 2"
    assert format_value(None) == "—" and format_value(0.123456) == "0.1235"
    assert format_value({"ci": [1, 2]}) == "CI [1, 2]"


def test_run_page_is_rendered_html(site):
    html = (site / "tfake_delta" / "report.html").read_text()
    p = _parse(html)
    assert "**finished**" not in html and "| id |" not in html
    assert ("strong" in [t for t, _ in p.tags]) and html.count("<table>") >= 4  # claims, metrics, layers, env
    text = "".join(p.text)
    assert "<b>not bold</b> & | pipe" in text and "holds" in text and "CI excludes 0" in text
    assert "R_med per layer" in text and "fc1.weight" in text and "Config" in text and "Environment" in text
    imgs = [a["src"] for t, a in p.tags if t == "img"]
    assert "figures/line.png" in imgs and all((site / "tfake_delta" / s).is_file() for s in imgs)
    assert ("a", {"href": "../index.html"}) in p.tags
    # the failed experiment's page shows the error and the traceback
    fail_html = (site / "tfake_fail" / "report.html").read_text()
    assert "failed on purpose" in fail_html and "Traceback" in fail_html


def test_index_has_one_row_per_claim_and_links_resolve(site):
    html = (site / "index.html").read_text()
    p = _parse(html)
    n_claims = sum(len(json.loads((site / n / "results.json").read_text())["claims"])
                   for n in ("tfake_alpha", "tfake_delta", "tfake_gamma"))
    rows = [a for t, a in p.tags if t == "tr" and a.get("class") == "claim"]
    assert len(rows) == n_claims == 6
    for t, a in p.tags:
        if t == "a":
            href = a["href"]
            if href.startswith("#"):
                assert f'id="{href[1:]}"' in html
            else:
                assert (site / href).is_file(), href
    text = "".join(p.text)
    assert "does not hold" in text and "untestable" in text and "premise absent" in text
    assert "Jiang et al. 2023" in text and "Velikanov et al. 2023" in text
    assert "RuntimeError: tfake_fail failed on purpose" in text
    assert "torch" in text and "load average" in text


def test_compare_runs_and_show_side_by_side(site):
    from optiscope.cli.main import app
    from optiscope.report.markdown import compare_runs

    df = compare_runs([site / "tfake_alpha", site / "tfake_delta"])
    assert list(df.columns) == ["tfake_alpha", "tfake_delta"]
    assert df.loc["experiment"].tolist() == ["tfake_alpha", "tfake_delta"]
    assert df.loc["claim sign", "tfake_alpha"].startswith("does not hold")
    assert df.loc["claim sign", "tfake_delta"].startswith("holds")
    r = CliRunner().invoke(app, ["show", str(site / "tfake_alpha"), str(site / "tfake_delta"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tfake_delta"]["claim sign"].startswith("holds") and data["tfake_alpha"]["status"] == "finished"
    r = CliRunner().invoke(app, ["show", str(site / "tfake_alpha"), str(site / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_write_site_refuses_a_non_reproduction(tmp_path):
    from optiscope.report.html import write_site

    with pytest.raises(ValueError, match="not a reproduction directory"):
        write_site(tmp_path)
