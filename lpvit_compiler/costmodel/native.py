"""``hw="native"``: the CPU profile with its coefficients fitted to measurements on this machine.

A few seconds of micro-benchmark in onnxruntime, on this machine's threads, of ViT-shaped layers at the row
count the predictions are for (8 images of 197 tokens, and the 8 rows of a classifier head): dense MatMul+Add
(how exported dense linears run) and the built ai.lpvit::BlockSparseLinear kernel at the compile's block shape,
densities 0.25, 0.5 and 0.9. Least-squares fits of the roofline model's compute term

    dense:  t = call_overhead + flops / peak_flops
    sparse: t = call_overhead + flops_kept / (peak_flops * sparse_efficiency)
                + rows * (sparse_output_s * out + sparse_input_s * in)
            (call_overhead measured on a 16x16 layer; the other terms by non-negative least squares)

give ``peak_flops``, ``call_overhead_s``, ``sparse_efficiency``, ``sparse_output_s`` and ``sparse_input_s``;
``int8_throughput`` is the median over the shapes of the float32 kernel's time over the int8 kernel's
(ai.lpvit::BlockSparseLinearInt8) at density 0.5, call overhead subtracted
(``min_efficient_block`` is the measured block edge, so smaller blocks are scaled down from it).

``elementwise_bandwidth`` is measured in the same minutes, so the memory-bound ops are priced against the linears
at this machine's present speed (a shared host's speed drifts, and the two drift apart): one transformer block's
memory-bound ops as onnxruntime runs them on the same 8 images — two LayerNorms, the attention's softmax, GELU,
two residual adds — timed in one session run,

    elementwise_bandwidth = bytes / (t - call_overhead),     bytes = each op's tensor inputs and outputs once

(costmodel.flops counts a model's memory-bound ops by the same rule). The sessions do not spin-wait
(``ort_session``), so interleaved candidates do not slow each other down. Memory bandwidth and the energy
figures stay those of the ``cpu`` profile (these shapes are compute-bound; energy is not measurable here).
Fitted once per process and block shape.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import scipy.optimize
import torch

from ..runtime.kernels import kernel_int8_isa, kernel_isa
from ..runtime.sessions import default_threads, ort_session
from ..tools.timing import interleaved
from ..blocks import BlockGrid
from ..lowering.layer_models import dense_layer_model, single_layer_model
from .profiles import HardwareProfile, this_cpu
from ..runtime.modules import BlockSparseLinear, BlockSparseLinearInt8

# (rows, in, out): a classifier head on 8 images, and DeiT-S's block linears on 8 images of 197 tokens
SHAPES = ((8, 384, 1000), (1576, 384, 384), (1576, 384, 1152), (1576, 384, 1536), (1576, 1536, 384))
# one DeiT-S block's memory-bound ops on those 8 images: (op type, its input shapes; the output is the first's)
_IMAGES, _TOKENS, _HEADS, _WIDTH, _HIDDEN = 8, 197, 6, 384, 1536
_ROWS = _IMAGES * _TOKENS
BLOCK_MEMORY_OPS = (("LayerNormalization", [(_ROWS, _WIDTH)]), ("LayerNormalization", [(_ROWS, _WIDTH)]),
                    ("Softmax", [(_IMAGES, _HEADS, _TOKENS, _TOKENS)]), ("Gelu", [(_ROWS, _HIDDEN)]),
                    ("Add", [(_ROWS, _WIDTH), (_ROWS, _WIDTH)]), ("Add", [(_ROWS, _WIDTH), (_ROWS, _WIDTH)]))
DENSITIES = (0.25, 0.5, 0.9)
REPEATS = 7


def _call_overhead(threads: int) -> float:
    """Seconds of one session run of a layer too small to cost anything but the call (8 x 16 x 16)."""
    session = ort_session(dense_layer_model(torch.zeros(16, 16)).SerializeToString(), threads, False)
    x = {"X": np.zeros((8, 16), np.float32)}
    return interleaved({"call": functools.partial(session.run, None, x)}, 5 * REPEATS)["call"]


def block_memory_model() -> tuple[bytes, dict[str, np.ndarray], int]:
    """(serialized ONNX model of BLOCK_MEMORY_OPS, each op on its own graph inputs; its feed; the bytes the ops
    move by costmodel.flops' rule)."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inputs, outputs, feed, moved = [], [], [], {}, 0
    rng = np.random.default_rng(0)
    for i, (op, shapes) in enumerate(BLOCK_MEMORY_OPS):
        names = [f"x{i}_{j}" for j in range(len(shapes))]
        for name, shape in zip(names, shapes):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
            feed[name] = rng.standard_normal(shape, dtype=np.float32)
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, list(shapes[0])))
        if op == "LayerNormalization":  # its scale and shift: read too
            names += [f"gamma{i}", f"beta{i}"]
            shapes = [*shapes, (shapes[0][-1],), (shapes[0][-1],)]
            feed[f"gamma{i}"], feed[f"beta{i}"] = (np.ones(shapes[0][-1], np.float32),
                                                  np.zeros(shapes[0][-1], np.float32))
            inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [shapes[0][-1]]) for n in names[-2:]]
        nodes.append(helper.make_node(op, names, [f"y{i}"], domain="com.microsoft" if op == "Gelu" else "",
                                      **({"axis": -1} if op in ("LayerNormalization", "Softmax") else {})))
        moved += 4 * (sum(int(np.prod(s)) for s in shapes) + int(np.prod(shapes[0])))
    model = helper.make_model(helper.make_graph(nodes, "block_memory_ops", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model.SerializeToString(), feed, moved


def fit_terms(dense_points, sparse_points, overhead: float) -> tuple[float, float, float, float]:
    """(peak_flops, sparse_efficiency, sparse_output_s, sparse_input_s) by non-negative least squares.

    dense_points: ([flops], [seconds]); sparse_points: ([(flops_kept, rows * out, rows * in)], [seconds])."""
    (dense_slope,), _ = scipy.optimize.nnls(np.asarray(dense_points[0], float)[:, None],
                                            np.asarray(dense_points[1]) - overhead)
    (sparse_slope, per_output, per_input), _ = scipy.optimize.nnls(np.asarray(sparse_points[0], float),
                                                                   np.asarray(sparse_points[1]) - overhead)
    efficiency = float(np.clip(dense_slope / max(sparse_slope, 1e-30), 0.05, 2.0))
    return 1.0 / dense_slope, efficiency, float(per_output), float(per_input)


@functools.lru_cache(maxsize=4)
def native_profile(threads: int | None = None, block_shape: tuple[int, int] = (16, 16)) -> HardwareProfile:
    threads = threads or default_threads()
    block_shape = tuple(block_shape)
    generator = torch.Generator().manual_seed(0)
    dense_points, sparse_points, int8_pairs = ([], []), ([], []), []
    for rows, in_features, out_features in SHAPES:
        weight, bias = torch.randn(out_features, in_features, generator=generator), torch.zeros(out_features)
        x = {"X": torch.randn(rows, in_features, generator=generator).numpy()}
        grid = BlockGrid(out_features, in_features, block_shape)
        candidates = {"dense": ort_session(dense_layer_model(weight, bias).SerializeToString(), threads, False)}
        kept = {}
        for density in DENSITIES:
            block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=generator) < density
            layer = BlockSparseLinear.from_masked_weight(weight, bias, grid.expand(block_mask), block_shape)
            candidates[density] = ort_session(single_layer_model(layer).SerializeToString(), threads, True)
            kept[density] = int(block_mask.sum())
            if density == 0.5:
                int8_layer = BlockSparseLinearInt8.from_quantized(torch.randint(-127, 128, weight.shape,
                                                                                generator=generator),
                                                                  torch.full((out_features,), 1e-3), bias,
                                                                  grid.expand(block_mask), block_shape)
                candidates["int8"] = ort_session(single_layer_model(int8_layer).SerializeToString(), threads, True)
        times = interleaved({name: functools.partial(s.run, None, x) for name, s in candidates.items()}, REPEATS)
        dense_points[0].append(2.0 * rows * in_features * out_features)
        dense_points[1].append(times["dense"])
        for density in DENSITIES:
            sparse_points[0].append((2.0 * rows * kept[density] * block_shape[0] * block_shape[1],
                                     float(rows * out_features), float(rows * in_features)))
            sparse_points[1].append(times[density])
        int8_pairs.append((times[0.5], times["int8"]))
    overhead = _call_overhead(threads)  # measured, not an intercept: five shapes cannot pin one down
    memory_model, memory_feed, moved = block_memory_model()
    memory_session = ort_session(memory_model, threads, False)
    memory_s = interleaved({"ops": functools.partial(memory_session.run, None, memory_feed)}, 5 * REPEATS)["ops"]
    bandwidth = moved / max(memory_s - overhead, 1e-9)
    peak, efficiency, per_output, per_input = fit_terms(dense_points, sparse_points, overhead)
    int8 = float(np.median([max(f - overhead, 1e-9) / max(q - overhead, 1e-9) for f, q in int8_pairs]))
    return dataclasses.replace(
        this_cpu(), name="native", peak_flops=peak, sparse_efficiency=efficiency, call_overhead_s=overhead,
        sparse_output_s=per_output, sparse_input_s=per_input, block_shape=block_shape,
        min_efficient_block=min(block_shape), int8_throughput=int8, elementwise_bandwidth=bandwidth,
        calibration=(f"measured on this machine ({threads} threads, onnxruntime, kernel ISA {kernel_isa()}): dense "
                     f"GEMM {peak / 1e9:.1f} GFLOP/s, block-sparse kernel {efficiency:.2f}x dense per kept FLOP at "
                     f"{block_shape[0]}x{block_shape[1]} blocks plus {per_output * 1e9:.2f} / {per_input * 1e9:.2f} "
                     f"ns per output / input element, {overhead * 1e6:.0f} µs per layer call; int8 kernel "
                     f"({kernel_int8_isa()}) {int8:.2f}x the float32 kernel's rate; memory-bound ops "
                     f"{bandwidth / 1e9:.1f} GB/s"),
    )
