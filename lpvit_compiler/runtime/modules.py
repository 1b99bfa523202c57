"""Modules the compiled graph is made of."""

from __future__ import annotations

import torch
from torch import nn

from . import ops  # also registers torch.ops.lpvit.bsr_linear and bsr_linear_int8
from ..blocks import BlockGrid


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool = False) -> nn.Linear:
    """An nn.Linear holding copies of ``weight`` [out, in] and ``bias`` [out] (or no bias)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return linear


class BlockSparseLinear(nn.Module):
    """y = activation(x W^T + b) + residual with W [out_features, in_features] held in BSR buffers.

    Buffers: ``row_ptr`` [block_rows + 1] int64, ``col_idx`` [nnz_blocks] int64, ``values`` [nnz_blocks, bh, bw]
    (W's [out, in] orientation, edge blocks zero-padded), ``bias`` [out_features] or None.
    ``activation``: the fused epilogue, one of ``ops.ACTIVATIONS`` ("none" unless the fuse_epilogues pass set it).
    Input x [..., in_features] and optional residual [..., out_features] -> output [..., out_features], via
    ``torch.ops.lpvit.bsr_linear``. ``input_heads`` / ``output_heads`` (0 unless the ONNX lowering's attention
    layout set them): x is head-major [B, H, T, in/H], or the output is [B, H, T, out/H] (ops.from_heads, to_heads).
    """

    def __init__(self, in_features: int, out_features: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 values: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ops.ACTIVATIONS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.input_heads = self.output_heads = 0
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @classmethod
    def from_masked_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, element_mask: torch.Tensor,
                           block_shape: tuple[int, int], activation: str = "none") -> "BlockSparseLinear":
        """Store ``weight * element_mask``: every block with a kept element, zero elsewhere in it."""
        grid = BlockGrid(weight.shape[0], weight.shape[1], block_shape)
        block_mask = grid.reduce_any(element_mask)
        values = grid.as_blocks(weight.detach() * element_mask)[block_mask].contiguous()
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), block_mask.sum(1).cumsum(0)])
        col_idx = block_mask.nonzero()[:, 1].contiguous()
        return cls(weight.shape[1], weight.shape[0], row_ptr, col_idx, values,
                   bias.detach().clone() if bias is not None else None, activation)

    @property
    def block_shape(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    def element_mask(self) -> torch.Tensor:
        """Bool [out_features, in_features]: True inside the stored blocks."""
        grid = BlockGrid(self.out_features, self.in_features, self.block_shape)
        block_mask = torch.zeros(grid.block_rows, grid.block_cols, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(grid.block_rows), self.row_ptr.diff())
        block_mask[rows, self.col_idx] = True
        return grid.expand(block_mask)

    def to_dense(self) -> torch.Tensor:
        return ops.bsr_to_dense(self.row_ptr, self.col_idx, self.values, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.lpvit.bsr_linear(x, self.row_ptr, self.col_idx, self.values, self.bias,
                                          self.out_features, self.in_features, self.activation, residual,
                                          self.input_heads, self.output_heads)

    def extra_repr(self) -> str:
        bh, bw = self.block_shape
        heads = "".join(f", {name}={getattr(self, name)}" for name in ("input_heads", "output_heads")
                        if getattr(self, name))
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_shape=({bh}, {bw}), "
                f"nnz_blocks={self.nnz_blocks}, bias={self.bias is not None}, activation={self.activation}{heads}")


class BlockSparseLinearInt8(BlockSparseLinear):
    """A :class:`BlockSparseLinear` whose ``values`` are int8 with one float32 scale per output channel,
    W = scales[:, None] * values; runs ``torch.ops.lpvit.bsr_linear_int8`` (X quantized per row at run time).

    Buffers as BlockSparseLinear's, plus ``scales`` [out_features]."""

    def __init__(self, in_features: int, out_features: int, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
        super().__init__(in_features, out_features, row_ptr, col_idx, values, bias, activation)
        self.register_buffer("scales", scales)

    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                       element_mask: torch.Tensor, block_shape: tuple[int, int],
                       activation: str = "none") -> "BlockSparseLinearInt8":
        """Store ``codes`` [out, in] (integers in [-128, 127]) times ``element_mask`` in the stored blocks."""
        layer = BlockSparseLinear.from_masked_weight(codes.float(), None, element_mask, block_shape)
        return cls(layer.in_features, layer.out_features, layer.row_ptr, layer.col_idx,
                   layer.values.round().to(torch.int8), scales.detach().float().contiguous(),
                   bias.detach().clone() if bias is not None else None, activation)

    def to_dense(self) -> torch.Tensor:
        """The dequantised W [out_features, in_features]."""
        codes = ops.bsr_to_dense(self.row_ptr, self.col_idx, self.values.float(), self.out_features,
                                 self.in_features)
        return codes * self.scales[:, None]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.lpvit.bsr_linear_int8(x, self.row_ptr, self.col_idx, self.values, self.scales, self.bias,
                                               self.out_features, self.in_features, self.activation, residual,
                                               self.input_heads, self.output_heads)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8"


class InputQuantizedLinear(nn.Module):
    """``linear(fake_quantize_rows(x))``: a float layer seeing its input as the int8 kernel does (quantized per
    token), the reference an int8 layer is checked against."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(ops.fake_quantize_rows(x))


class DenseEpilogueLinear(nn.Module):
    """``activation(linear(x)) + residual`` on a dense nn.Linear: a fused BlockSparseLinear written out in
    standard ops (the portable ONNX export and fine-tuning replace fused layers with it)."""

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        self.linear = linear
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return ops.apply_epilogue(self.linear(x), self.activation, residual)
