"""The block-sparse linear operator ``torch.ops.lpvit.bsr_linear`` — the boundary kernels plug in behind.

    Y[..., N] = X[..., K] @ W^T + bias,   W [N, K] in BSR:
      row_ptr [ceil(N/bh) + 1] int64   block-row r holds blocks row_ptr[r] .. row_ptr[r+1]-1
      col_idx [nnz_blocks] int64       block-column of each block
      values  [nnz_blocks, bh, bw]     each block in W's [out, in] orientation, zero-padded at the edges

This is the same contract as the ONNX op ``ai.lpvit::BlockSparseLinear``. On CPU float32 the op runs the native
kernel (kernels/, through :mod:`lpvit_compiler.kernels`); elsewhere, or when the library is not built (with a
one-time warning), it runs the pure-torch reference: scatter the blocks into a dense W, then one GEMM. Both
validate the buffers, so malformed ones raise instead of reading out of bounds. The fake implementation gives
shapes to torch.export and the ONNX exporter.
"""

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels


def bsr_to_dense(row_ptr: Tensor, col_idx: Tensor, values: Tensor, out_features: int, in_features: int) -> Tensor:
    """The dense W [out_features, in_features] that a BSR triple stores."""
    bh, bw = values.shape[1], values.shape[2]
    block_rows, block_cols = row_ptr.numel() - 1, math.ceil(in_features / bw)
    block_row_of = torch.repeat_interleave(torch.arange(block_rows), row_ptr.diff())
    blocks = values.new_zeros(block_rows, block_cols, bh, bw)
    blocks[block_row_of, col_idx] = values
    dense = blocks.permute(0, 2, 1, 3).reshape(block_rows * bh, block_cols * bw)
    return dense[:out_features, :in_features]


def bsr_linear_reference(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
                         out_features: int, in_features: int) -> Tensor:
    weight = bsr_to_dense(row_ptr, col_idx, values, out_features, in_features)
    return F.linear(x, weight.to(x.dtype), bias)


@torch.library.custom_op("lpvit::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
               out_features: int, in_features: int) -> Tensor:
    y = kernels.native_bsr_linear(x, row_ptr, col_idx, values, bias, out_features, in_features)
    if y is None:
        if not kernels.native_available():
            warnings.warn("lpvit: the native kernel library is not built; block-sparse layers run the slow "
                          "pure-torch reference (reinstall with `pip install .` to build it)", stacklevel=2)
        y = bsr_linear_reference(x, row_ptr, col_idx, values, bias, out_features, in_features)
    return y


@bsr_linear.register_fake
def _bsr_linear_fake(x, row_ptr, col_idx, values, bias, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))
