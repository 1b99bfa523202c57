"""Timing models and layers in onnxruntime, side by side (timing.py), for ``lpvit bench``/``compile --bench``
and benchmarks/."""

from __future__ import annotations

import argparse
import json

import numpy as np

from ..errors import ModelFileError
from ..runtime.sessions import ort_session
from .timing import interleaved


def image_feed(session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float input for a session's single image input, [batch, C, H, W] from the model's input shape."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelFileError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "lpvit bench times models with a single image input")
    shape = inputs[0].shape
    if any(not isinstance(d, int) for d in shape[1:]):
        raise ModelFileError(f"input '{inputs[0].name}' has shape {shape}: every dimension but the batch must be "
                             "fixed to time it")
    return {inputs[0].name: np.random.default_rng(seed).standard_normal((batch, *shape[1:]), dtype=np.float32)}


def compile_options_argument(text: str) -> dict:
    """The argparse type of the benchmarks' ``--options``: a JSON object of ``lpvit.compile`` options."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({error})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of compile options, e.g. "
                                         '\'{"recovery_tflops": 8}\'')
    return parsed


def ort_dynamic_int8(model) -> bytes:
    """onnxruntime's own one-line int8: ``quantize_dynamic(model, out, weight_type=QInt8)`` of a float ONNX model
    (a ModelProto, bytes or a path) — the baseline a user would pick instead of lpvit. Returns the model bytes."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        if isinstance(model, (str, Path)):
            source = Path(model)
        else:
            onnx.save(model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model), source)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        return target.read_bytes()


def compare_sessions(dense, compiled, batches, repeats: int, progress=None) -> dict:
    """End-to-end timing of two sessions of the same model side by side: {"batches": {batch: dense_ms,
    compiled_ms, speedup (dense / compiled)}, "repeats"}; each batch's candidates run interleaved."""
    result = {}
    for batch in batches:
        feed = image_feed(compiled, batch)
        times = interleaved({"dense": lambda: dense.run(None, feed), "compiled": lambda: compiled.run(None, feed)},
                            repeats, progress=progress)
        result[str(batch)] = {"dense_ms": times["dense"] * 1e3, "compiled_ms": times["compiled"] * 1e3,
                              "speedup": times["dense"] / times["compiled"]}
    return {"batches": result, "repeats": repeats}


def measure_layers(compiled, threads: int | None = None, repeats: int = 5, progress=None) -> dict:
    """Time every pruned layer of ``compiled`` in onnxruntime as it runs after export (our op, or MatMul+Add
    where the layout is dense) next to a dense layer of its original shape, on hw.batch_size * tokens rows —
    the workload the report's predictions are for. Returns {layer: LayerMeasurement} for
    ``Report.with_measurements(layers=...)``."""
    import copy

    import torch

    from ..lowering.layer_models import dense_layer_model, single_layer_model
    from ..report import LayerMeasurement
    from ..runtime.modules import BlockSparseLinear

    measured = {}

    batch_size = compiled.report.summary["hw_batch_size"]
    generator = torch.Generator().manual_seed(0)
    for row in compiled.report.layers:
        module = compiled.graph_module.get_submodule(row.name)
        if isinstance(module, BlockSparseLinear):  # without its fused epilogue: the predictions are for the GEMM
            bare = copy.copy(module)  # the same buffers (float or int8), its own attributes
            bare.activation = "none"
            ours = ort_session(single_layer_model(bare).SerializeToString(), threads, True)
        else:
            ours = ort_session(dense_layer_model(module.weight, module.bias).SerializeToString(), threads, False)
        out_features, in_features = row.weight_shape
        dense_weight = torch.randn(out_features, in_features, generator=generator)
        dense = ort_session(dense_layer_model(dense_weight).SerializeToString(), threads, False)
        rows = batch_size * row.tokens
        x_ours = {"X": torch.randn(rows, module.in_features, generator=generator).numpy()}
        x_dense = {"X": torch.randn(rows, in_features, generator=generator).numpy()}
        times = interleaved({"ours": lambda: ours.run(None, x_ours), "dense": lambda: dense.run(None, x_dense)},
                            repeats)
        measured[row.name] = LayerMeasurement(latency_us=times["ours"] * 1e6, dense_latency_us=times["dense"] * 1e6)
        if progress is not None:
            progress()
    return measured


def op_type_profile(model, feed: dict, threads: int | None = None, custom_ops: bool = True, runs: int = 5
                    ) -> dict[str, float]:
    """Milliseconds per run spent in each ONNX op type (onnxruntime's own profiler, summed kernel time over
    ``runs`` runs after a warm-up), largest first: where the time of an end-to-end run goes."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        session = ort_session(model, threads, custom_ops, enable_profiling=True,
                              profile_file_prefix=os.path.join(folder, "profile"))
        for _ in range(runs + 1):
            session.run(None, feed)
        with open(session.end_profiling()) as trace:
            events = json.load(trace)
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    warm = run_starts[1] if len(run_starts) > 1 else 0  # the first run warms caches and is left out
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= warm:
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
