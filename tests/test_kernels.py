"""The native kernel through onnxruntime: numerics against a reference, and malformed models rejected."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.lowering.layer_models import single_layer_model
from lpvit_compiler.runtime.modules import BlockSparseLinear


def _session(model: onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(lpvit.kernels_library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _layer(out_features, in_features, block_shape, density, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = BlockGrid(out_features, in_features, block_shape)
    block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=g) < density
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    return BlockSparseLinear.from_masked_weight(weight, bias, grid.expand(block_mask), block_shape), weight, bias


def test_kernel_library_is_built_and_uses_simd():
    assert lpvit.kernels_library_path().endswith("liblpvit_kernels.so")
    assert lpvit.kernel_isa() in ("avx2", "avx512")


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 140), in_features=st.integers(1, 140), rows=st.sampled_from([1, 2, 7, 13, 64, 197]),
    block_shape=st.sampled_from([(16, 16), (32, 32), (64, 64), (32, 64), (8, 4), (1, 1), (20, 12)]),
    density=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), with_bias=st.booleans(), seed=st.integers(0, 2**16),
    threads=st.sampled_from([1, 2]),
)
def test_onnxruntime_op_matches_numpy(out_features, in_features, rows, block_shape, density, with_bias, seed, threads):
    layer, _, _ = _layer(out_features, in_features, block_shape, density, with_bias, seed)
    x = np.random.default_rng(seed).standard_normal((rows, in_features), dtype=np.float32)
    expected = x @ layer.to_dense().numpy().T + (layer.bias.numpy() if with_bias else 0)
    got = _session(single_layer_model(layer), threads).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


ISA_CPU_FLAGS = {"scalar": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f"}}


def skip_unless_cpu_runs(isa: str) -> None:
    """Skip, saying why, when this CPU lacks what the ``isa`` kernel path needs."""
    missing = ISA_CPU_FLAGS[isa] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}, so the {isa} kernel cannot run here")


# (32, 16): AVX-512 runs 32-output panels; 16 and 32 wide are unrolled micro-kernels, (20, 12) the generic width
@pytest.mark.parametrize("block", [(16, 32), (32, 16), (20, 12)])
@pytest.mark.parametrize("isa", sorted(ISA_CPU_FLAGS))
def test_every_instruction_set_path_matches(isa, block, tmp_path):
    """Each kernel path this CPU can run, forced with LPVIT_KERNEL_ISA, gives the masked dense numbers."""
    skip_unless_cpu_runs(isa)
    code = (
        "import numpy as np, torch, lpvit_compiler as lpvit\n"
        "from lpvit_compiler.blocks import BlockGrid\n"
        "from lpvit_compiler.runtime.modules import BlockSparseLinear\n"
        "torch.manual_seed(0); g = BlockGrid(100, 72, %r)\n"
        "m = g.expand(torch.rand(g.block_rows, g.block_cols) < 0.6)\n"
        "w, b = torch.randn(100, 72), torch.randn(100)\n"
        "layer = BlockSparseLinear.from_masked_weight(w, b, m, %r)\n"
        "x = torch.randn(3, 29, 72)\n"
        "assert lpvit.kernel_isa() == '%s', lpvit.kernel_isa()\n"
        "torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w * m, b), rtol=1e-4, atol=1e-4)\n"
    ) % (block, block, isa)
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "LPVIT_KERNEL_ISA": isa})


def test_empty_rows_zero_blocks_and_single_row():
    layer, _, bias = _layer(48, 40, (16, 16), 0.0)
    assert layer.nnz_blocks == 0
    got = _session(single_layer_model(layer)).run(None, {"X": np.ones((1, 40), np.float32)})[0]
    np.testing.assert_array_equal(got, bias.numpy()[None])


def test_edge_block_padding_past_k_is_ignored():
    """Whatever an edge block holds past K (here NaN and inf) never reaches Y: the kernel multiplies X's zero
    padding by packed weights that are zero there."""
    layer, weight, bias = _layer(40, 40, (16, 16), 1.0, seed=5)  # K = 40: the last block column is 8 wide
    values = layer.values.numpy().copy()
    last_column = layer.col_idx.numpy() == 2
    values[last_column, :, 8:] = np.nan
    values[last_column, 0, 8:] = np.inf
    x = np.random.default_rng(5).standard_normal((29, 40), dtype=np.float32)
    got = _session(_malformed(layer, values=values)).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, x @ weight.numpy().T + bias.numpy(), rtol=1e-4, atol=1e-4)


def _malformed(layer: BlockSparseLinear, **replace) -> onnx.ModelProto:
    model = single_layer_model(layer)
    for init in model.graph.initializer:
        if init.name in replace:
            init.CopyFrom(numpy_helper.from_array(np.asarray(replace[init.name]), init.name))
    for name in ("N", "K", "block_shape"):
        if name in replace:
            attribute = next(a for a in model.graph.node[0].attribute if a.name == name)
            attribute.CopyFrom(onnx.helper.make_attribute(name, replace[name]))
    return model


@pytest.mark.parametrize("change,message", [
    (lambda l: dict(col_idx=np.array([0, 9] + [1] * (l.nnz_blocks - 2), np.int64)), r"col_idx\[1\] = 9 is out of range"),
    (lambda l: dict(col_idx=np.full(l.nnz_blocks, -1, np.int64)), r"col_idx\[0\] = -1 is out of range"),
    (lambda l: dict(row_ptr=np.array([0, 5, 2, 6, 6], np.int64)), r"row_ptr must be non-decreasing"),
    (lambda l: dict(row_ptr=np.array([0, 1, 2, 3, 99], np.int64)), r"row_ptr must be non-decreasing and within"),
    (lambda l: dict(row_ptr=np.array([0, 1, 2], np.int64)), r"row_ptr length is 3, expected 5"),
    (lambda l: dict(values=np.zeros((l.nnz_blocks, 16, 8), np.float32)), r"values must be \[nnz_blocks, 16, 16\]"),
    (lambda l: dict(values=np.zeros((l.nnz_blocks - 1, 16, 16), np.float32)), r"col_idx .*as long as values"),
    (lambda l: dict(N=-64), r"N and K must be in \[1, 2\^31\)"),
    (lambda l: dict(K=-1), r"X's last dimension must be K=-1"),
    (lambda l: dict(block_shape=[-16, 16]), r"values must be \[nnz_blocks, -16, 16\]"),
    (lambda l: dict(block_shape=[16]), r"block_shape must have 2 entries"),
    (lambda l: dict(bias=np.zeros(7, np.float32)), r"bias length is 7, expected 64"),
    (lambda l: dict(col_idx=np.zeros(2**22, np.int64), values=np.zeros((2**22, 16, 16), np.float32)[:0].reshape(0, 16, 16)),
     r"col_idx .*as long as values"),
])
def test_malformed_models_are_rejected_without_crashing(change, message):
    layer, _, _ = _layer(64, 48, (16, 16), 0.6, seed=3)
    assert layer.nnz_blocks >= 4
    session = _session(_malformed(layer, **change(layer)))
    with pytest.raises(Exception, match=message):
        session.run(None, {"X": np.ones((3, 48), np.float32)})


def test_huge_nnz_blocks_is_rejected():
    layer, _, _ = _layer(64, 48, (16, 16), 1.0)
    nnz = 13  # more blocks than a 4 x 3 block grid holds
    model = _malformed(layer, col_idx=np.zeros(nnz, np.int64), values=np.zeros((nnz, 16, 16), np.float32),
                       row_ptr=np.array([0, 3, 6, 9, nnz], np.int64))
    with pytest.raises(Exception, match=r"nnz_blocks is 13, must be in \[0, 12\]"):
        _session(model).run(None, {"X": np.ones((3, 48), np.float32)})


def test_torch_falls_back_to_the_reference_with_a_warning_when_the_library_is_missing(tmp_path):
    code = (
        "import warnings, torch\n"
        "from lpvit_compiler.runtime.modules import BlockSparseLinear\n"
        "layer = BlockSparseLinear.from_masked_weight(torch.randn(32, 32), None, torch.ones(32, 32, dtype=torch.bool), (16, 16))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    y = layer(torch.randn(2, 32))\n"
        "assert any('native kernel library is not built' in str(w.message) for w in caught), caught\n"
        "x = torch.randn(2, 32)\n"
        "torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.to_dense()), rtol=1e-5, atol=1e-5)\n"
        "dense = torch.zeros(32, 32)\n"
        "for r in range(2):\n"
        "    for i in range(int(layer.row_ptr[r]), int(layer.row_ptr[r + 1])):\n"
        "        c = int(layer.col_idx[i]); dense[16 * r:16 * r + 16, 16 * c:16 * c + 16] = layer.values[i]\n"
        "torch.testing.assert_close(layer.to_dense(), dense)\n"
    )
    env = {**__import__("os").environ, "LPVIT_KERNELS_LIBRARY": str(tmp_path / "missing.so")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
