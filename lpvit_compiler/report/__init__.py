"""The compile report (``compile_report.py``: per-layer records, summary, JSON) and its HTML rendering."""

from .compile_report import LayerRow, Report

__all__ = ["LayerRow", "Report"]
