"""The compile report (``compile_report.py``: per-layer records, measurements, JSON), its summary lines
(``summary.py``) and its HTML rendering (``html.py``)."""

from .compile_report import LayerMeasurement, LayerRow, Measurements, Report
from .summary import summary_items

__all__ = ["LayerMeasurement", "LayerRow", "Measurements", "Report", "summary_items"]
