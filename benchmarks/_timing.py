"""Side-by-side timing for noisy shared machines: candidates run interleaved, medians and median ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
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
    return {name: statistics.median(ts) for name, ts in times.items()}


def ort_session(model_bytes_or_path, threads: int, custom_ops: bool):
    import onnxruntime as ort

    import lpvit_compiler as lpvit

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if custom_ops:
        options.register_custom_ops_library(lpvit.kernels_library_path())
    return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])
