"""``lpvit inspect``: the passes and the report of a compile's dump directory."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ..errors import ConfigError, ModelFileError
from .ui import Ui


def cmd_inspect(args, ui: Ui) -> int:
    from ..report import Measurements, Report

    folder = Path(args.dump_dir)
    passes_file = folder / "passes.json"
    if not passes_file.is_file():
        raise ConfigError(f"{folder} is not a compile dump (no passes.json): pass the --dump-dir of a compile")
    try:
        passes = json.loads(passes_file.read_text())
        report = Report.from_dict(json.loads((folder / "report.json").read_text())) \
            if (folder / "report.json").is_file() else None
        if report is not None and (folder / "measurements.json").is_file():
            measured = Measurements.from_dict(json.loads((folder / "measurements.json").read_text()))
            report = report.with_measurements(end_to_end=measured.end_to_end, layers=measured.layers,
                                              accuracy=measured.accuracy)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFileError(f"{folder}: passes.json, report.json or measurements.json is corrupt ({e})") from None
    table = Table(title=f"passes of the compile dumped in {folder}")
    for column in ("#", "pass", "seconds", "modified", "dump"):
        table.add_column(column, justify="left" if column in ("pass", "dump") else "right")
    for index, p in enumerate(passes):
        table.add_row(str(index), p["pass"], f"{p['seconds']:.2f}", str(p["modified"]), str(p.get("dump")))
    ui.out.print(table)
    if report is None:
        ui.out.print(f"no report.json in {folder}: the compile stopped after pass '{passes[-1]['pass']}'")
        return 0
    ui.out.print(report)
    return 0
