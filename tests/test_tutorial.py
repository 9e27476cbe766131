"""docs/tutorial.md runs as written: its Python blocks, in order, in one namespace (slow: trains and runs a
reproduction, about a minute on one CPU thread)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import test_lab_common  # noqa: F401  (single-threaded torch)

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def test_tutorial_blocks_are_python():
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), re.DOTALL)
    assert len(blocks) >= 4
    for b in blocks:
        compile(b, "tutorial", "exec")


@pytest.mark.slow
def test_tutorial_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tutorial writes runs/ under the working directory
    ns: dict = {}
    for block in re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), re.DOTALL):
        exec(compile(block, str(TUTORIAL), "exec"), ns)  # noqa: S102  (the point: run the documented code)
    assert set(ns["result"].runs) == {"sgdm", "adam"}
    assert (tmp_path / "runs" / "tutorial" / "figures" / "sharpness.png").exists()
    assert {c["id"] for c in ns["results"]["claims"]} >= {"medians"}
