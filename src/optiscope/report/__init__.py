"""Figures and one Markdown/HTML report per run directory."""

from optiscope.report.figures import plot_loss, plot_one_norm, plot_r_med, plot_run, plot_sharpness
from optiscope.report.markdown import write_report

__all__ = ["plot_loss", "plot_one_norm", "plot_r_med", "plot_run", "plot_sharpness", "write_report"]
