"""``hw="native"``: the CPU profile with its coefficients fitted to measurements on this machine.

A few seconds of micro-benchmark in onnxruntime, on this machine's threads: dense MatMul+Add (how exported
dense linears run) and the built ai.lpvit::BlockSparseLinear kernel at 16×16 blocks, densities 0.25 and 0.5,
on ViT-like shapes. Least-squares fits of the roofline model's compute term

    dense:  t = c_dense  + flops / peak_flops
    sparse: t = c_sparse + flops_kept / (peak_flops * sparse_efficiency)

give ``peak_flops``, ``sparse_efficiency`` and ``call_overhead_s`` (mean of the two intercepts). Memory
bandwidth and the energy figures stay those of the ``cpu`` profile (these shapes are compute-bound; energy is
not measurable here). Fitted once per process.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from ..runtime.sessions import default_threads, ort_session
from ..tools.timing import interleaved
from ..blocks import BlockGrid
from ..lowering.onnx_export import dense_layer_model, single_layer_model
from .profiles import HardwareProfile, this_cpu
from ..runtime.modules import BlockSparseLinear

SHAPES = ((64, 384, 384), (394, 384, 1152), (1576, 384, 1536), (1576, 1536, 384))  # (rows, in, out)
DENSITIES = (0.25, 0.5)
BLOCK = (16, 16)
REPEATS = 5


def _fit(flops: list[float], seconds: list[float]) -> tuple[float, float]:
    """(intercept s, slope s/FLOP) of seconds ≈ intercept + slope * flops, intercept clamped at 0."""
    design = np.stack([np.ones(len(flops)), np.asarray(flops)], axis=1)
    intercept, slope = np.linalg.lstsq(design, np.asarray(seconds), rcond=None)[0]
    if intercept < 0:  # noise can tip a tiny intercept negative: refit through the origin
        intercept, slope = 0.0, float(np.dot(flops, seconds) / np.dot(flops, flops))
    return float(intercept), float(slope)


@functools.lru_cache(maxsize=1)
def native_profile(threads: int | None = None) -> HardwareProfile:
    threads = threads or default_threads()
    generator = torch.Generator().manual_seed(0)
    dense_points, sparse_points = ([], []), ([], [])
    for rows, in_features, out_features in SHAPES:
        weight, bias = torch.randn(out_features, in_features, generator=generator), torch.zeros(out_features)
        x = {"X": torch.randn(rows, in_features, generator=generator).numpy()}
        grid = BlockGrid(out_features, in_features, BLOCK)
        candidates = {"dense": ort_session(dense_layer_model(weight, bias).SerializeToString(), threads, False)}
        kept = {}
        for density in DENSITIES:
            block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=generator) < density
            layer = BlockSparseLinear.from_masked_weight(weight, bias, grid.expand(block_mask), BLOCK)
            candidates[density] = ort_session(single_layer_model(layer).SerializeToString(), threads, True)
            kept[density] = int(block_mask.sum())
        times = interleaved({name: functools.partial(s.run, None, x) for name, s in candidates.items()}, REPEATS)
        dense_points[0].append(2.0 * rows * in_features * out_features)
        dense_points[1].append(times["dense"])
        for density in DENSITIES:
            sparse_points[0].append(2.0 * rows * kept[density] * BLOCK[0] * BLOCK[1])
            sparse_points[1].append(times[density])
    dense_overhead, dense_slope = _fit(*dense_points)
    sparse_overhead, sparse_slope = _fit(*sparse_points)
    peak = 1.0 / dense_slope
    efficiency = float(np.clip(dense_slope / sparse_slope, 0.05, 2.0))
    overhead = (dense_overhead + sparse_overhead) / 2
    base = this_cpu()
    return dataclasses.replace(
        base, name="native", peak_flops=peak, sparse_efficiency=efficiency, call_overhead_s=overhead,
        min_efficient_block=BLOCK[0],
        calibration=(f"measured on this machine ({threads} threads, onnxruntime): dense GEMM {peak / 1e9:.1f} "
                     f"GFLOP/s, block-sparse kernel {efficiency:.2f}x dense per kept FLOP at {BLOCK[0]}x{BLOCK[1]} "
                     f"blocks, {overhead * 1e6:.0f} µs per layer call"),
    )
