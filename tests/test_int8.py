"""int8 block sparsity: the kernel against an integer reference on every ISA, saturation extremes, the fused
dequantisation epilogue, malformed int8 models, concurrency, GPTQ against a direct OBQ computation, and
``quantize="int8"`` end to end."""

import math
import re
import threading

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpvit_compiler as lpvit
from lpvit_compiler import quantization
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.lowering.layer_models import single_layer_model
from lpvit_compiler.runtime import ops
from lpvit_compiler.runtime.modules import BlockSparseLinearInt8
from test_kernels import ISA_CPU_FLAGS, _cpu_flags

INT8_ISAS = [isa for isa in sorted(ISA_CPU_FLAGS) if not ISA_CPU_FLAGS[isa] - _cpu_flags()]
BLOCKS = [(16, 16), (32, 32), (8, 4), (3, 5), (1, 1), (16, 7)]


def _layer(n, k, block, density, codes=None, scales=None, bias=True, seed=0, activation="none"):
    g = torch.Generator().manual_seed(seed)
    grid = BlockGrid(n, k, block)
    mask = grid.expand(torch.rand(grid.block_rows, grid.block_cols, generator=g) < density)
    codes = codes if codes is not None else torch.randint(-128, 128, (n, k), generator=g)
    scales = scales if scales is not None else torch.rand(n, generator=g) * 0.02 + 1e-3
    return BlockSparseLinearInt8.from_quantized(codes, scales, torch.randn(n, generator=g) if bias else None, mask,
                                                block, activation)


def _integer_rows(m, k, rng):
    """X whose rows are integers in [-127, 127] with max |x| = 127: quantization keeps them and scale 1."""
    x = rng.integers(-127, 128, (m, k)).astype(np.float32)
    x[np.arange(m), rng.integers(0, k, m)] = rng.choice([-127.0, 127.0], m)
    return x


def _exact_sums(layer, x):
    codes = ops.bsr_to_dense(layer.row_ptr, layer.col_idx, layer.values.long(), layer.out_features,
                             layer.in_features).numpy()
    return (x.astype(np.int64) @ codes.T).astype(np.float32)  # float32(exact int), as the kernel converts


@pytest.mark.parametrize("isa", INT8_ISAS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 80), k=st.integers(1, 90), block=st.sampled_from(BLOCKS), density=st.floats(0, 1),
       m=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_integer_sums_are_exact_on_every_isa(isa, n, k, block, density, m, seed, monkeypatch_isa):
    """Integer X with row max 127 and unit scales: the op must return the exact integer sums, in torch and in
    onnxruntime, whatever path (VNNI quads, AVX2 pairs, scalar) the CPU runs."""
    monkeypatch_isa(isa)
    rng = np.random.default_rng(seed)
    layer = _layer(n, k, block, density, scales=torch.ones(n), bias=False, seed=seed)
    x = _integer_rows(m, k, rng)
    expected = _exact_sums(layer, x)
    np.testing.assert_array_equal(layer(torch.from_numpy(x)).numpy(), expected)
    session = lpvit.InferenceSession(single_layer_model(layer).SerializeToString(), intra_op_num_threads=2)
    np.testing.assert_array_equal(session.run(None, {"X": x})[0], expected)


@pytest.fixture
def monkeypatch_isa(monkeypatch):
    """Force the kernel path for weights created after the call (the library reads LPVIT_KERNEL_ISA then)."""
    def force(isa):
        monkeypatch.setenv("LPVIT_KERNEL_ISA", isa)
        expected = {"scalar": "scalar", "avx2": "avx2"}.get(isa, "avx512_vnni" if {"avx512_vnni", "avx512bw"} <=
                                                             _cpu_flags() else "avx2")
        assert lpvit.kernel_int8_isa() == expected
    return force


@pytest.mark.parametrize("isa", INT8_ISAS)
def test_saturation_extremes(isa, monkeypatch_isa):
    """Every product at its extreme (|x| = 127 against -128 and 127 weights) over a long K: no int16 saturation
    (AVX2's vpmaddubsw would saturate here) and no int32 overflow."""
    monkeypatch_isa(isa)
    n, k = 48, 4096
    for weight in (-128, 127):
        codes = torch.full((n, k), weight)
        codes[1::2] = -128 if weight == 127 else 127  # mixed signs between rows
        layer = _layer(n, k, (16, 16), 1.0, codes=codes, scales=torch.ones(n), bias=False)
        x = np.full((6, k), 127.0, np.float32)
        x[1] = -127.0
        x[2, ::2] = -127.0
        np.testing.assert_array_equal(layer(torch.from_numpy(x)).numpy(), _exact_sums(layer, x))


@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("activation", list(ops.ACTIVATIONS))
def test_fused_dequantisation_and_epilogue(isa, activation, monkeypatch_isa):
    """Real-valued X: rows quantized per token, dequantised with both scales, bias, activation and residual in
    the write-back — against the unfused statement (ops.bsr_linear_int8_reference), in torch and onnxruntime."""
    monkeypatch_isa(isa)
    layer = _layer(100, 72, (16, 16), 0.6, activation=activation)
    x = torch.randn(37, 72) * torch.logspace(-3, 2, 37)[:, None]  # row scales spanning five decades
    residual = torch.randn(37, 100)
    expected = ops.bsr_linear_int8_reference(x, layer.row_ptr, layer.col_idx, layer.values, layer.scales,
                                             layer.bias, 100, 72, activation, residual)
    torch.testing.assert_close(layer(x, residual), expected, rtol=1e-5, atol=1e-5)
    session = lpvit.InferenceSession(single_layer_model(layer, residual=True).SerializeToString())
    got = session.run(None, {"X": x.numpy(), "R": residual.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_row_quantization_edge_cases():
    """Zero rows give bias only; a NaN or inf in a row makes that row's outputs NaN, other rows unaffected."""
    layer = _layer(20, 16, (4, 4), 1.0)
    x = torch.randn(4, 16)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = layer(x)
    torch.testing.assert_close(y[0], layer.bias)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[3]).all()
    torch.testing.assert_close(y[3], ops.bsr_linear_int8_reference(x[3:], layer.row_ptr, layer.col_idx,
                                                                   layer.values, layer.scales, layer.bias, 20, 16)[0])


def _int8_model(layer, **replace):
    model = single_layer_model(layer)
    for init in model.graph.initializer:
        if init.name in replace:
            init.CopyFrom(onnx.numpy_helper.from_array(replace[init.name], init.name))
    return model.SerializeToString()


@pytest.mark.parametrize("replace, message", [
    ({"scales": np.ones(7, np.float32)}, "scales length is 7, expected 20"),
    ({"scales": np.array([1.0] * 19 + [np.nan], np.float32)}, "scales[19] is not finite"),
    ({"scales": np.ones((4, 5), np.float32)}, "scales must be 1-D"),
    ({"scales": np.ones(20, np.float64)}, "scales"),
    ({"values": np.zeros((5, 4, 4), np.float32)}, "values"),
    ({"col_idx": None}, "col_idx[3] = 9 is out of range"),
])
def test_malformed_int8_models_are_rejected(replace, message):
    """Bad scales or dtypes in an int8 model give an error naming the problem, never a crash or a result."""
    layer = _layer(20, 16, (4, 4), 1.0)
    if "col_idx" in replace:  # four blocks in the first block row; only the index is wrong
        mask = torch.zeros(20, 16)
        mask[:4] = 1
        layer = BlockSparseLinearInt8.from_quantized(torch.randint(-5, 5, (20, 16)), torch.ones(20), None, mask,
                                                     (4, 4))
        replace = {"col_idx": np.array([0, 1, 2, 9], np.int64)}
    with pytest.raises(Exception, match=re.escape(message)):
        session = lpvit.InferenceSession(_int8_model(layer, **replace))
        session.run(None, {"X": np.ones((2, 16), np.float32)})


def test_int8_kernel_rejects_k_beyond_exact_int32_sums():
    grid_k = 70000
    layer = BlockSparseLinearInt8(grid_k, 16, torch.tensor([0, 0]), torch.zeros(0, dtype=torch.int64),
                                  torch.zeros(0, 16, 16, dtype=torch.int8), torch.ones(16), None)
    with pytest.raises(lpvit.KernelLibraryError, match="K <= 65536"):
        layer(torch.zeros(1, grid_k))


def test_concurrent_runs_of_one_int8_session():
    """One session run from many threads at once: each caller gets its own correct answer."""
    layer = _layer(96, 80, (16, 16), 0.5)
    session = lpvit.InferenceSession(single_layer_model(layer).SerializeToString(), intra_op_num_threads=2)
    failures = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(40):
            x = rng.standard_normal((int(rng.integers(1, 70)), 80), dtype=np.float32)
            expected = ops.bsr_linear_int8_reference(torch.from_numpy(x), layer.row_ptr, layer.col_idx,
                                                     layer.values, layer.scales, layer.bias, 96, 80).numpy()
            if not np.allclose(session.run(None, {"X": x})[0], expected, rtol=1e-5, atol=1e-5):
                failures.append(seed)
                return

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def _obq_direct(weight, bias, mask, bh, h, damping):
    """OBQ stated directly: per block row, quantize kept columns in order; after each, update the rest by
    -e / [H^-1]_jj * [H^-1]_j,: and remove j from H^-1 (Gaussian elimination). Float64 throughout."""
    n, k = weight.shape
    h = h.clone()
    lam = damping * float(torch.diagonal(h)[:k].mean())
    h.diagonal()[:k] += lam
    scales = quantization.channel_scales(weight, mask).double()
    out_w, out_b = torch.zeros(n, k, dtype=torch.float64), bias.double().clone()
    for r in range(math.ceil(n / bh)):
        rows = slice(r * bh, min((r + 1) * bh, n))
        kept = torch.cat([mask[r * bh].bool(), torch.tensor([True])]).nonzero()[:, 0]
        hinv = torch.linalg.inv(h[kept][:, kept])
        w = torch.cat([weight[rows].double(), bias[rows].double()[:, None]], 1)[:, kept]
        for j in range(len(kept) - 1):  # the last kept index is the bias: never quantized
            q = torch.round(w[:, j] / scales[rows]).clamp(-127, 127) * scales[rows]
            error = (w[:, j] - q) / hinv[j, j]
            w[:, j:] -= error[:, None] * hinv[j, j:][None, :]
            w[:, j] = q
            hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
        out_w[rows, kept[:-1]] = w[:, :-1]
        out_b[rows] = w[:, -1]
    return out_w, out_b


def test_gptq_matches_direct_obq_and_beats_rounding():
    torch.manual_seed(0)
    n, k, bh = 24, 40, 8
    x = torch.randn(400, k) @ torch.randn(k, k) * 0.3
    weight, bias = torch.randn(n, k), torch.randn(n)
    mask = BlockGrid(n, k, (bh, 8)).expand(torch.rand(3, 5) < 0.6)
    a = torch.cat([x, torch.ones(400, 1)], 1).double()
    h = a.T @ a
    got_w, got_b, scales = quantization.quantize_gptq(weight, bias, mask, bh, h, 0.01)
    want_w, want_b = _obq_direct(weight, bias, mask, bh, h, 0.01)
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_b.double(), want_b, rtol=1e-4, atol=1e-5)
    assert bool((got_w[mask == 0] == 0).all())
    codes = got_w / scales[:, None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)  # on the int8 grid
    rounded, _ = quantization.quantize_nearest(weight, mask)
    target = x @ (weight * mask).T + bias
    assert float((x @ got_w.T + got_b - target).pow(2).mean()) < 0.7 * float((x @ rounded.T + bias - target)
                                                                              .pow(2).mean())


def test_compile_int8_end_to_end(model, calib, tmp_path):
    """quantize='int8': every pruned layer runs the int8 op, the invariants hold (verify), and the exported
    model computes in onnxruntime what the torch model computes; the portable export runs on stock
    onnxruntime with the dequantised weights."""
    images = calib
    compiled = lpvit.compile(model, calib=images, flops_keep=0.5, quantize="int8", progress=False, verify=True)
    layers = [m for m in compiled.graph_module.modules() if isinstance(m, BlockSparseLinearInt8)]
    assert len(layers) == len(compiled.report.layers) > 0
    assert compiled.report.summary["quantize"].startswith("int8 (GPTQ")
    assert all(row.layout == "bsr-int8" for row in compiled.report.layers)
    from lpvit_compiler.tools.bench import measure_layers  # --bench times each int8 layer as the int8 op
    assert set(measure_layers(compiled, threads=1, repeats=1)) == {row.name for row in compiled.report.layers}
    with torch.no_grad():
        expected = compiled(images[:4]).numpy()
        dense = model(images[:4]).numpy()
    path = compiled.export(tmp_path / "int8.onnx")
    ops_used = {node.op_type for node in onnx.load(path).graph.node}
    assert "BlockSparseLinearInt8" in ops_used and "BlockSparseLinear" not in ops_used
    session = lpvit.InferenceSession(str(path))
    got = session.run(None, {"pixel_values": images[:4].numpy()})[0]
    # onnxruntime's float ops round differently from torch's and can move an activation across an int8 rounding
    # step; the layers themselves agree exactly (test_integer_sums_are_exact_on_every_isa)
    assert np.linalg.norm(got - expected) <= 5e-2 * np.linalg.norm(expected)
    assert np.linalg.norm(expected - dense) <= 0.5 * np.linalg.norm(dense)  # still the model, not noise
    portable = compiled.export(tmp_path / "portable.onnx", target="portable")
    import onnxruntime as ort
    stock = ort.InferenceSession(str(portable), providers=["CPUExecutionProvider"])
    assert np.linalg.norm(stock.run(None, {"pixel_values": images[:4].numpy()})[0] - expected) <= \
        0.1 * np.linalg.norm(expected)


def test_unknown_quantize_mode_is_named():
    with pytest.raises(lpvit.ConfigError, match="unknown quantize 'int4'; choose one of None, int8"):
        lpvit.compile(torch.nn.Linear(4, 4), quantize="int4")


def test_finetune_keeps_int8_layers(model, calib):
    """Fine-tuning an int8 model trains in float and packs every layer back to int8 in the same blocks."""
    compiled = lpvit.compile(model, calib=calib, flops_keep=0.5, quantize="int8", progress=False)
    before = {n: m.col_idx.clone() for n, m in compiled.graph_module.named_modules()
              if isinstance(m, BlockSparseLinearInt8)}
    tuned = lpvit.finetune(compiled, [(calib[:8], torch.randint(0, 10, (8,)))], epochs=1, progress=False)
    after = {n: m for n, m in tuned.graph_module.named_modules() if isinstance(m, BlockSparseLinearInt8)}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n].col_idx, before[n]) and after[n].values.dtype == torch.int8 for n in after)
