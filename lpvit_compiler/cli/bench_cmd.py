"""``lpvit bench``: time an ONNX model, side by side with a dense one."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .output import bench_table, parse_batches
from .ui import Ui


def cmd_bench(args, ui: Ui) -> int:
    from ..runtime.sessions import default_threads, ort_session
    from ..tools.bench import compare_sessions, image_feed, interleaved

    threads = args.threads or default_threads()
    batches = parse_batches(args.batch)
    session = ort_session(args.model, threads, True)
    if args.dense:
        dense = ort_session(args.dense, threads, True)
        with ui.bar("bench", len(batches) * args.repeats) as advance:
            results = {**compare_sessions(dense, session, batches, args.repeats, advance), "threads": threads}
        ui.out.print(bench_table(f"{args.model} vs {args.dense}", results, threads))
    else:
        results = {"batches": {}, "repeats": args.repeats, "threads": threads}
        with ui.bar("bench", len(batches) * args.repeats) as advance:
            for batch in batches:
                feed = image_feed(session, batch)
                seconds = interleaved({"model": lambda: session.run(None, feed)}, args.repeats, progress=advance)
                results["batches"][str(batch)] = {"ms": seconds["model"] * 1e3}
        table = Table(title=f"{args.model} — onnxruntime, {threads} threads, median of {args.repeats} runs")
        for column in ("batch", "ms", "images/s"):
            table.add_column(column, justify="right")
        for batch, r in results["batches"].items():
            table.add_row(batch, f"{r['ms']:.2f}", f"{int(batch) / r['ms'] * 1e3:.1f}")
        ui.out.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
