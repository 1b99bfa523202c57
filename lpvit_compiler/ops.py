"""The block-sparse linear operator ``torch.ops.lpvit.bsr_linear`` — the boundary kernels plug in behind.

    Y[..., N] = X[..., K] @ W^T + bias,   W [N, K] in BSR:
      row_ptr [ceil(N/bh) + 1] int64   block-row r holds blocks row_ptr[r] .. row_ptr[r+1]-1
      col_idx [nnz_blocks] int64       block-column of each block
      values  [nnz_blocks, bh, bw]     each block in W's [out, in] orientation, zero-padded at the edges

This is the same contract as the ONNX op ``ai.lpvit::BlockSparseLinear``. The CPU implementation here is the
pure-torch reference (scatter the blocks into a dense W, then one dense GEMM); indexing is bounds-checked by
torch, so malformed buffers raise instead of reading out of bounds. The fake implementation gives shapes to
torch.export and the ONNX exporter.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def bsr_to_dense(row_ptr: Tensor, col_idx: Tensor, values: Tensor, out_features: int, in_features: int) -> Tensor:
    """The dense W [out_features, in_features] that a BSR triple stores."""
    bh, bw = values.shape[1], values.shape[2]
    block_rows, block_cols = row_ptr.numel() - 1, math.ceil(in_features / bw)
    block_row_of = torch.repeat_interleave(torch.arange(block_rows), row_ptr.diff())
    blocks = values.new_zeros(block_rows, block_cols, bh, bw)
    blocks[block_row_of, col_idx] = values
    dense = blocks.permute(0, 2, 1, 3).reshape(block_rows * bh, block_cols * bw)
    return dense[:out_features, :in_features]


@torch.library.custom_op("lpvit::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
               out_features: int, in_features: int) -> Tensor:
    weight = bsr_to_dense(row_ptr, col_idx, values, out_features, in_features)
    return F.linear(x, weight.to(x.dtype), bias)


@bsr_linear.register_fake
def _bsr_linear_fake(x, row_ptr, col_idx, values, bias, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))
