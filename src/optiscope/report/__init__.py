"""Figures and one Markdown/HTML report per run directory."""

from optiscope.report.markdown import write_report

__all__ = ["write_report"]
