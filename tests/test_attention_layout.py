"""Head-major attention: the kernel's head layouts against row-major numbers, the ONNX lowering's rewrite against
the graph it rewrites, and the errors for layouts the op cannot run."""

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.lowering.attention_layout import head_major_attention
from lpvit_compiler.lowering.layer_models import single_layer_model
from lpvit_compiler.runtime import ops
from lpvit_compiler.runtime.kernels import KernelLibraryError
from lpvit_compiler.runtime.modules import BlockSparseLinear, BlockSparseLinearInt8
from lpvit_compiler.runtime.sessions import ort_session

from conftest import tiny_vit
from test_kernels import ISA_CPU_FLAGS, _session, skip_unless_cpu_runs


def _heads_model(layer: BlockSparseLinear, input_heads: int = 0, output_heads: int = 0,
                 residual: bool = False) -> onnx.ModelProto:
    """single_layer_model with the head attributes set and X, Y (and R) of any shape."""
    model = single_layer_model(layer, residual=residual)
    node = model.graph.node[0]
    node.attribute.extend(onnx.helper.make_attribute(name, value) for name, value in
                          (("input_heads", input_heads), ("output_heads", output_heads)) if value)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.ClearField("shape")
    return model


def _layer(out_features, in_features, block_shape, density=0.6, seed=0, activation="none"):
    g = torch.Generator().manual_seed(seed)
    grid = BlockGrid(out_features, in_features, block_shape)
    mask = grid.expand(torch.rand(grid.block_rows, grid.block_cols, generator=g) < density)
    layer = BlockSparseLinear.from_masked_weight(torch.randn(out_features, in_features, generator=g),
                                                 torch.randn(out_features, generator=g), mask, block_shape,
                                                 activation)
    return layer


def _int8_layer(out_features, in_features, block_shape, seed=0) -> BlockSparseLinearInt8:
    g = torch.Generator().manual_seed(seed)
    grid = BlockGrid(out_features, in_features, block_shape)
    mask = grid.expand(torch.rand(grid.block_rows, grid.block_cols, generator=g) < 0.6)
    return BlockSparseLinearInt8.from_quantized(torch.randint(-127, 128, (out_features, in_features), generator=g),
                                                torch.rand(out_features, generator=g) / 50,
                                                torch.randn(out_features, generator=g), mask, block_shape)


def _row_major(layer: BlockSparseLinear, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    y = torch.from_numpy(x) @ layer.to_dense().T + layer.bias
    y = ops.ACTIVATIONS[layer.activation](y)
    return (y + torch.from_numpy(residual) if residual is not None else y).numpy()


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (32, 32), (8, 8)])
def test_output_heads_write_what_row_major_computes_in_head_order(block):
    """Y [B, H, T, D][b, h, t, d] = the row-major Y [B, T, N][b, t, h * D + d], edge rows included (T = 13)."""
    layer = _layer(3 * 64, 96, block, seed=1)
    x = np.random.default_rng(1).standard_normal((3, 13, 96), dtype=np.float32)
    got = _session(_heads_model(layer, output_heads=3)).run(None, {"X": x})[0]
    assert got.shape == (3, 3, 13, 64)
    expected = _row_major(layer, x).reshape(3, 13, 3, 64).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [(16, 16), (16, 32), (32, 32)])
def test_input_heads_read_the_attention_output_as_its_row_major_columns(block):
    """X [B, H, T, D] is read as X [B, T, H * D], with the epilogue (GELU, residual) as in row-major."""
    layer = _layer(48, 4 * 32, block, seed=2, activation="gelu")
    x = np.random.default_rng(2).standard_normal((2, 4, 11, 32), dtype=np.float32)
    residual = np.random.default_rng(3).standard_normal((2, 11, 48), dtype=np.float32)
    got = _session(_heads_model(layer, input_heads=4, residual=True)).run(None, {"X": x, "R": residual})[0]
    assert got.shape == (2, 11, 48)
    expected = _row_major(layer, x.transpose(0, 2, 1, 3).reshape(2, 11, 128), residual)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", sorted(ISA_CPU_FLAGS))
def test_head_layouts_on_every_instruction_set_path(isa):
    """Each kernel path this CPU can run (forced with LPVIT_KERNEL_ISA), float and int8, reads and writes both
    layouts, in one layer, bit for bit as its row-major run does."""
    skip_unless_cpu_runs(isa)
    code = (
        "import numpy as np, torch, onnx, lpvit_compiler as lpvit, test_attention_layout as t\n"
        "assert lpvit.kernel_isa() == %r, lpvit.kernel_isa()\n"
        "x = np.random.default_rng(4).standard_normal((3, 2, 17, 32), dtype=np.float32)\n"
        "rows = x.transpose(0, 2, 1, 3).reshape(51, 64)\n"
        "for layer in (t._layer(2 * 64, 2 * 32, (32, 16), seed=4), t._int8_layer(2 * 64, 2 * 32, (32, 16), seed=4)):\n"
        "    got = t._session(t._heads_model(layer, input_heads=2, output_heads=2)).run(None, {'X': x})[0]\n"
        "    row_major = t._session(t.single_layer_model(layer)).run(None, {'X': rows})[0]\n"
        "    np.testing.assert_array_equal(got, row_major.reshape(3, 17, 2, 64).transpose(0, 2, 1, 3))\n"
    ) % isa
    env = {**os.environ, "LPVIT_KERNEL_ISA": isa, "PYTHONPATH": os.path.dirname(__file__)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("heads,x_shape,residual,message", [
    (dict(output_heads=5), (2, 5, 96), False, r"output_heads=5 needs N=192 to split into heads whose width is a "
                                              r"multiple of the block height 16"),
    (dict(input_heads=4), (2, 4, 5, 24), False, r"input_heads=4 needs K=96 to split into heads whose width is a "
                                                r"multiple of the block width 16"),
    (dict(output_heads=-1), (2, 5, 96), False, r"input_heads and output_heads must be >= 0"),
    (dict(output_heads=3), (2, 5, 96), True, r"output_heads takes no residual"),
])
def test_head_layouts_the_kernel_cannot_run_are_errors(heads, x_shape, residual, message):
    layer = _layer(192, 96, (16, 16))
    feeds = {"X": np.ones(x_shape, np.float32), **({"R": np.ones((2, 3, 5, 64), np.float32)} if residual else {})}
    with pytest.raises(Exception, match=message):
        _session(_heads_model(layer, residual=residual, **heads)).run(None, feeds)


def test_head_layout_errors_name_the_shape_and_the_epilogue():
    gelu = _layer(192, 96, (16, 16), activation="gelu")
    with pytest.raises(Exception, match="output_heads takes no activation"):
        _session(_heads_model(gelu, output_heads=3)).run(None, {"X": np.ones((2, 5, 96), np.float32)})
    layer = _layer(48, 96, (16, 16))
    with pytest.raises(Exception, match=r"with input_heads=3, X must be \[B, 3, T, 32\]"):
        _session(_heads_model(layer, input_heads=3)).run(None, {"X": np.ones((2, 5, 96), np.float32)})
    with pytest.raises(Exception, match=r"with output_heads, X must be \[B, T, K\]"):
        _session(_heads_model(_layer(192, 96, (16, 16)), output_heads=3)).run(None, {"X": np.ones((10, 96),
                                                                                              np.float32)})
    with pytest.raises(Exception, match=r"output_heads=2 needs N=96 to split into heads whose width is a multiple "
                                        r"of the block height 32"):  # the int8 op checks the same rules
        _session(_heads_model(_int8_layer(96, 64, (32, 32)), output_heads=2)).run(
            None, {"X": np.ones((2, 5, 64), np.float32)})


def test_the_torch_op_takes_the_same_layouts_and_refuses_the_same_mistakes():
    layer = _layer(128, 64, (16, 16))
    x = torch.randn(2, 7, 64)
    layer.output_heads = 2
    expected = ops.to_heads(torch.from_numpy(_row_major(layer, x.numpy())), 2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.output_heads, layer.input_heads = 0, 2
    heads_in = torch.randn(2, 2, 7, 32)
    expected = torch.from_numpy(_row_major(layer, ops.from_heads(heads_in, 2).numpy()))
    torch.testing.assert_close(layer(heads_in), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(KernelLibraryError, match=r"with input_heads=2, X must be \[B, 2, T, 32\]"):
        layer(x)
    layer.input_heads, layer.output_heads, layer.activation = 0, 2, "relu"
    with pytest.raises(KernelLibraryError, match="output_heads=2 needs N=128 divisible by it, X \\[B, T, K\\] and no "
                                                 "activation"):
        layer(x)


def _layout_ops(path) -> Counter:
    """Split nodes, and Transposes other than a last-two-axes swap (kᵀ, which onnxruntime folds into its MatMul)."""
    count = Counter()
    for node in onnx.load(str(path)).graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        swaps_last_two = perm is not None and perm == [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]
        if node.op_type == "Split" or (node.op_type == "Transpose" and not swaps_last_two):
            count[node.op_type] += 1
    return count


@pytest.mark.parametrize("tokens", [None, "cascade", "merge"])
def test_lowering_writes_q_k_v_head_major_and_proj_reads_them(calib, tokens, tmp_path):
    """Every attention of a timm ViT (qkv pruned or dense, proj with a fused residual) loses its transposes and
    split; torch's outputs are those of the graph before the rewrite, and onnxruntime's are torch's."""
    model = tiny_vit(depth=3)
    options = {"token_pruning": tokens, "patch_keep": 0.5} if tokens else {}
    compiled = lpvit.compile(model, hw="cpu-avx2", flops_keep=0.5, calib=calib, block_shape=16,
                             importance="magnitude", reconstruct=False, progress=False, **options)
    example = torch.zeros(2, 3, 32, 32)
    rewritten, count = head_major_attention(compiled.graph_module, example)
    assert count == 3 * 2  # per block: qkv (as three layers) and proj
    layers = {name: m for name, m in rewritten.named_modules() if isinstance(m, BlockSparseLinear)}
    assert {layers[f"blocks.1.attn.qkv_{part}"].output_heads for part in "qkv"} == {2}
    assert layers["blocks.1.attn.proj"].input_heads == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), compiled(x), rtol=1e-5, atol=1e-5)
    head_major = compiled.export(tmp_path / "heads.onnx")
    transposed = compiled.export(tmp_path / "transposed.onnx", head_major_attention=False)
    # before, two per block: q, k, v's (from [B, T, 3, H, D]) and the attention output's
    assert _layout_ops(head_major) == Counter() and _layout_ops(transposed)["Transpose"] == 2 * 3
    session = ort_session(str(head_major), 2, custom_ops=True)
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        expected = compiled(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_lowering_keeps_the_transposes_where_no_head_layout_fits(calib, tmp_path):
    """A head width no block divides (24 with 16 x 16 blocks): nothing is rewritten, and the export computes what
    torch does."""
    odd = tiny_vit(embed_dim=48, num_heads=2)
    compiled = lpvit.compile(odd, hw="cpu-avx2", flops_keep=0.5, calib=calib, block_shape=16, reconstruct=False,
                             importance="magnitude", progress=False)
    assert head_major_attention(compiled.graph_module, torch.zeros(2, 3, 32, 32))[1] == 0
    x = torch.randn(2, 3, 32, 32)
    session = ort_session(str(compiled.export(tmp_path / "odd.onnx")), 2, custom_ops=True)
    with torch.no_grad():
        expected = compiled(x).numpy()
    assert np.abs(session.run(None, {"pixel_values": x.numpy()})[0] - expected).max() <= 1e-4 * np.abs(expected).max()


def test_lowering_of_an_int8_model_splits_its_int8_qkv(calib, tmp_path):
    """quantize="int8": q, k, v stay int8 layers (rows of qkv's codes and scales; each row of X quantized as
    before), so torch computes what the graph before the rewrite did (to the rounding of the attention, now written
    out), and onnxruntime agrees with torch."""
    int8 = lpvit.compile(tiny_vit(), hw="cpu-avx2", flops_keep=0.5, calib=calib, block_shape=16, quantize="int8",
                         importance="magnitude", progress=False)
    rewritten, count = head_major_attention(int8.graph_module, torch.zeros(2, 3, 32, 32))
    assert count == 2 * 2
    assert all(isinstance(rewritten.get_submodule(f"blocks.0.attn.qkv_{part}"), BlockSparseLinearInt8)
               for part in "qkv")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = int8(x)
        torch.testing.assert_close(rewritten(x), expected, rtol=1e-5, atol=1e-6)
    path = int8.export(tmp_path / "int8.onnx")
    assert "BlockSparseLinear" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    got = ort_session(str(path), 2, custom_ops=True).run(None, {"pixel_values": x.numpy()})[0]
    # as test_int8's end to end: onnxruntime's float ops round differently and can move an int8 rounding step
    assert np.linalg.norm(got - expected.numpy()) <= 5e-2 * np.linalg.norm(expected.numpy())


def test_lowering_of_hugging_face_q_k_v_and_output_projections(calib, tmp_path):
    """transformers' ViT: separate q, k, v layers (viewed [B, T, H, D] and transposed) and o_proj after the
    attention's transpose and reshape, in the aten graph torch.export captures."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, num_labels=10)
    compiled = lpvit.compile(ViTForImageClassification(config).eval(), calib=calib, flops_keep=0.5, block_shape=16,
                             reconstruct=False, importance="magnitude", progress=False)
    rewritten, count = head_major_attention(compiled.graph_module, torch.zeros(2, 3, 32, 32))
    assert count == 2 * 4
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = compiled(x)
        expected = getattr(expected, "logits", expected)
        got = rewritten(x)
        torch.testing.assert_close(getattr(got, "logits", got), expected, rtol=1e-5, atol=1e-5)
    session = ort_session(str(compiled.export(tmp_path / "hf.onnx")), 2, custom_ops=True)
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(onnx_out - expected.numpy()).max() <= 1e-4 * np.abs(expected.numpy()).max()


def test_a_dense_layer_becomes_a_full_block_sparse_layer_only_where_a_block_fits_a_head():
    from lpvit_compiler.lowering.attention_layout import _with_heads

    linear = nn.Linear(64, 96)
    layer = _with_heads(linear, 48, rows=slice(0, 48), output_heads=1)
    assert layer.block_shape == (16, 16) and layer.nnz_blocks == 3 * 4 and layer.output_heads == 1
    torch.testing.assert_close(layer.to_dense(), linear.weight[:48].detach())
    assert _with_heads(linear, 24, input_heads=4) is None
