"""Side-by-side timing for noisy shared machines: candidates take turns in every repeat, results are medians,
so a burst of load from another process hits all candidates alike; compare them by ratio, not absolute time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                progress: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each candidate, the candidates taking turns in every repeat."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return {name: statistics.median(ts) for name, ts in times.items()}
