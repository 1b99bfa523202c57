"""What the commands write: ONNX files (atomically), Triton repositories, timing tables."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rich.table import Table

from ..errors import ConfigError
from .ui import Ui


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise ConfigError(f"--batch must be comma-separated positive integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch must be comma-separated positive integers, got {text!r}")
    return batches


def check_writable(path: Path) -> None:
    """Make ``path``'s folder if needed and prove a file can be created there; else a one-line ConfigError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e} ({path.parent}); choose an output path in a "
                          "folder you can write") from None
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory; give a file name")


def write_onnx(compiled, path: Path, target: str, ui: Ui) -> Path:
    """Export atomically (temp file, then rename), so a failed export never leaves a half-written file."""
    check_writable(path)
    with ui.status(f"exporting ONNX ({target}) to {path}"):
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            os.replace(compiled.export(Path(tmp) / path.name, target=target), path)
    return path


def bench_table(title: str, results: dict, threads: int) -> Table:
    table = Table(title=f"{title} — onnxruntime, {threads} threads, median of {results['repeats']} interleaved runs")
    for column in ("batch", "dense ms", "compiled ms", "compiled images/s", "speedup"):
        table.add_column(column, justify="right")
    for batch, r in results["batches"].items():
        table.add_row(batch, f"{r['dense_ms']:.2f}", f"{r['compiled_ms']:.2f}",
                      f"{int(batch) / r['compiled_ms'] * 1e3:.1f}", f"{r['speedup']:.2f}x")
    return table


def write_triton(onnx_path: Path, args, ui: Ui) -> None:
    from ..lowering.triton import write_triton_repo

    config = write_triton_repo(onnx_path, args.triton_repo, args.triton_name, mount=args.triton_mount)
    ui.note(f"Triton model repository: {config.parent} (config {config})")
