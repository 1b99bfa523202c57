"""Block geometry of a weight matrix W [out_features, in_features] tiled into bh x bw blocks.

Edge blocks are partial when a dimension does not divide by the block (like LPViT's
``AvgPool2d(ceil_mode=True)``); every reduction here counts only the real elements of a block.
Block (r, c) covers rows ``r*bh : min((r+1)*bh, out)`` and columns ``c*bw : min((c+1)*bw, in)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import torch


@dataclass(frozen=True)
class BlockGrid:
    out_features: int
    in_features: int
    block_shape: tuple[int, int]

    @property
    def block_rows(self) -> int:
        return ceil(self.out_features / self.block_shape[0])

    @property
    def block_cols(self) -> int:
        return ceil(self.in_features / self.block_shape[1])

    @property
    def num_blocks(self) -> int:
        return self.block_rows * self.block_cols

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.block_rows * self.block_shape[0], self.block_cols * self.block_shape[1]

    def pad(self, matrix: torch.Tensor) -> torch.Tensor:
        """Zero-pad [out, in] to [block_rows*bh, block_cols*bw]."""
        pad_rows = self.padded_shape[0] - self.out_features
        pad_cols = self.padded_shape[1] - self.in_features
        return torch.nn.functional.pad(matrix, (0, pad_cols, 0, pad_rows))

    def as_blocks(self, matrix: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [block_rows, block_cols, bh, bw] (zero padded)."""
        bh, bw = self.block_shape
        padded = self.pad(matrix)
        return padded.reshape(self.block_rows, bh, self.block_cols, bw).permute(0, 2, 1, 3)

    def block_sum(self, matrix: torch.Tensor) -> torch.Tensor:
        """Sum of each block: [out, in] -> [block_rows, block_cols]."""
        return self.as_blocks(matrix).sum(dim=(2, 3))

    def element_counts(self) -> torch.Tensor:
        """Number of real (unpadded) elements in each block, [block_rows, block_cols] int64."""
        return self.block_sum(torch.ones(self.out_features, self.in_features)).to(torch.int64)

    def block_mean(self, matrix: torch.Tensor) -> torch.Tensor:
        """Mean over the real elements of each block."""
        return self.block_sum(matrix) / self.element_counts().to(matrix.dtype)

    def expand(self, block_mask: torch.Tensor) -> torch.Tensor:
        """Block mask [block_rows, block_cols] -> element mask [out, in]."""
        bh, bw = self.block_shape
        full = block_mask.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)
        return full[: self.out_features, : self.in_features]

    def reduce_any(self, element_mask: torch.Tensor) -> torch.Tensor:
        """Element mask [out, in] -> block mask: a block is kept if any of its elements is."""
        return self.block_sum(element_mask.to(torch.float32)) > 0


def pack_mask(block_mask: torch.Tensor) -> str:
    """A bool block mask as base64 of its row-major bits (for JSON files)."""
    import base64

    import numpy as np

    return base64.b64encode(np.packbits(block_mask.numpy().ravel()).tobytes()).decode()


def unpack_mask(bits: str, block_rows: int, block_cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`; ValueError when ``bits`` holds fewer than block_rows*block_cols bits."""
    import base64

    import numpy as np

    flat = np.unpackbits(np.frombuffer(base64.b64decode(bits), np.uint8))[: block_rows * block_cols]
    if flat.size != block_rows * block_cols:
        raise ValueError(f"mask holds {flat.size} bits, expected {block_rows * block_cols}")
    return torch.from_numpy(flat.astype(bool)).reshape(block_rows, block_cols)
