import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.runtime.ops import bsr_linear_reference
from lpvit_compiler.runtime.modules import BlockSparseLinear


@settings(max_examples=60, deadline=None)
@given(
    out_features=st.integers(1, 70), in_features=st.integers(1, 70), rows=st.integers(1, 9),
    bh=st.sampled_from([1, 4, 16, 32]), bw=st.sampled_from([1, 8, 16, 64]),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), with_bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_bsr_linear_matches_masked_dense(out_features, in_features, rows, bh, bw, density, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    grid = BlockGrid(out_features, in_features, (bh, bw))
    block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=g) < density
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    mask = grid.expand(block_mask)
    layer = BlockSparseLinear.from_masked_weight(weight, bias, mask, (bh, bw))
    assert layer.nnz_blocks == int(block_mask.sum())
    assert layer.row_ptr[-1] == layer.nnz_blocks and layer.row_ptr.numel() == grid.block_rows + 1
    x = torch.randn(rows, 3, in_features, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, weight * mask, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense(), weight * mask)


def test_empty_block_rows_give_bias():
    weight = torch.randn(32, 32)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[16:, :16] = True
    layer = BlockSparseLinear.from_masked_weight(weight, torch.arange(32.0), mask, (16, 16))
    y = layer(torch.randn(5, 32))
    assert torch.equal(y[:, :16], torch.arange(16.0).expand(5, 16))


def test_malformed_indices_raise_instead_of_reading_out_of_bounds():
    layer = BlockSparseLinear.from_masked_weight(torch.randn(32, 32), None, torch.ones(32, 32, dtype=torch.bool), (16, 16))
    layer.col_idx[0] = 7
    x = torch.randn(2, 32)
    with pytest.raises(lpvit.KernelLibraryError, match=r"col_idx\[0\] = 7 is out of range \[0, 2\)"):
        bsr_linear_reference(x, layer.row_ptr, layer.col_idx, layer.values, None, 32, 32)
    with pytest.raises(lpvit.KernelLibraryError, match=r"col_idx\[0\] = 7 is out of range \[0, 2\)"):
        layer(x)


@pytest.mark.parametrize("field,value,message", [
    ("col_idx", [-1, 1, 0, 1], r"col_idx\[0\] = -1 is out of range"),
    ("col_idx", [0, 0, 0, 1], r"col_idx must increase within a block row: col_idx\[1\] = 0 after 0"),
    ("row_ptr", [1, 2, 4], r"row_ptr\[0\] is 1, expected 0"),
    ("row_ptr", [0, 3, 2], r"row_ptr must be non-decreasing"),
    ("row_ptr", [0, 2], r"row_ptr length is 2, expected 3"),
])
def test_reference_rejects_what_the_native_kernel_rejects(field, value, message):
    """The pure-torch path (no library, other devices) refuses the same malformed buffers as the kernel."""
    layer = BlockSparseLinear.from_masked_weight(torch.randn(32, 32), None, torch.ones(32, 32, dtype=torch.bool), (16, 16))
    buffers = {"row_ptr": layer.row_ptr, "col_idx": layer.col_idx}
    buffers[field] = torch.tensor(value, dtype=torch.int64)
    for run in (bsr_linear_reference, torch.ops.lpvit.bsr_linear):
        with pytest.raises(lpvit.KernelLibraryError, match=message):
            run(torch.randn(2, 32), buffers["row_ptr"], buffers["col_idx"], layer.values, None, 32, 32)


def test_op_exports_with_fake_impl():
    layer = BlockSparseLinear.from_masked_weight(torch.randn(48, 32), torch.randn(48),
                                                 torch.ones(48, 32, dtype=torch.bool), (16, 16))
    exported = torch.export.export(layer, (torch.randn(2, 5, 32),))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.lpvit.bsr_linear.default in targets
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(exported.module()(x), layer(x))
