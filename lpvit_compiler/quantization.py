"""int8 weights for a block-masked layer: symmetric per-output-channel scales, rounded to nearest or by GPTQ.

Layer y = x W^T + b, W [N, K], element mask M, codes Q in [-127, 127], scales s [N]:  W_q = s[:, None] * Q.

    s_n = max_k |W_nk M_nk| / 127    (1 for a row with nothing kept, so every scale is finite and nonzero)

Round to nearest: Q = round(W / s). GPTQ (Frantar et al., arXiv 2210.17323; OBQ's update, arXiv 2208.11580)
quantizes the columns one after another and moves each column's rounding error onto the columns not yet
quantized, where the layer's input Hessian H = A^T A (A = [X, 1], damped like the reconstruction: the same ridge
problem) says it costs least. Rows of one block row share their kept columns S, so each block row uses its own
H[S, S] (columns outside S get identity rows and stay 0); with U the upper Cholesky factor of H[S, S]^-1:

    for j in S, in order:   q_j = s * round(w_j / s);   e = (w_j - q_j) / U_jj;   w_{j'} -= e U_{j j'}  (j' > j)

The bias (the last column of A) is never quantized: it absorbs what error remains. Columns are processed in
batches of ``BATCH`` (GPTQ's lazy updates: the rest of the row is updated once per batch, by a matrix product).
"""

from __future__ import annotations

import torch

from .linalg import SOLVE_BYTES, block_row_systems, cholesky, damped

QMAX = 127
BATCH = 128



def channel_scales(weight: torch.Tensor, element_mask: torch.Tensor) -> torch.Tensor:
    """s [N] float32: max |kept weight| / 127 per output row (1 where the row keeps nothing nonzero)."""
    amax = (weight * element_mask).abs().amax(1).float()
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def codes(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 codes of ``weight`` under per-row ``scales``: round(W / s) clamped to [-127, 127]."""
    return torch.round(weight / scales[:, None].to(weight.dtype)).clamp(-QMAX, QMAX)


def quantize_nearest(weight: torch.Tensor, element_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q [N, K] dequantised, scales [N]) by rounding each kept weight to nearest; masked weights are 0."""
    scales = channel_scales(weight, element_mask)
    return (codes(weight * element_mask, scales) * scales[:, None]).to(weight.dtype), scales


def quantize_gptq(weight: torch.Tensor, bias: torch.Tensor | None, element_mask: torch.Tensor, bh: int,
                  h: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """GPTQ on a block-masked layer (module docstring): returns (W_q [N, K] dequantised, new bias, scales [N]).

    ``h`` [K', K'] float64 is A^T A of the layer's input (K' = K + 1 with a bias column last, else K)."""
    n, k = weight.shape
    with_bias = bias is not None
    scales = channel_scales(weight, element_mask).double()
    h, lam = damped(h, k, damping)
    keep = element_mask.bool()
    w = weight.double() * keep
    if with_bias:
        keep = torch.cat([keep, keep.new_ones(n, 1)], dim=1)
        w = torch.cat([w, bias.double()[:, None]], dim=1)
    size = h.shape[0]
    block_rows = (n + bh - 1) // bh
    padding = block_rows * bh - n  # the last block row padded to bh rows (zeros, scale 1)
    w = torch.cat([w, w.new_zeros(padding, size)]).reshape(block_rows, bh, size)
    scales_padded = torch.cat([scales, scales.new_ones(padding)]).reshape(block_rows, bh)
    group = max(1, SOLVE_BYTES // (8 * size * size))
    for first in range(0, block_rows, group):
        rows = slice(first, min(first + group, block_rows))
        kept = keep[rows.start * bh:rows.stop * bh:bh].double()  # [R, K'] kept columns of each block row
        factor = cholesky(block_row_systems(h, kept), lam)
        upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)  # U of H[S, S]^-1, per row
        w[rows] = _gptq_rows(w[rows], scales_padded[rows], upper, k)
    w = w.reshape(-1, size)[:n]
    quantized = (w[:, :k] * element_mask).to(weight.dtype)
    new_bias = w[:, k].to(bias.dtype) if with_bias else None
    return quantized, new_bias, scales.float()


def _gptq_rows(w: torch.Tensor, scales: torch.Tensor, upper: torch.Tensor, k: int) -> torch.Tensor:
    """Block rows ``w`` [R, bh, K'] (``scales`` [R, bh]), each with its factor ``upper`` [R, K', K']: columns
    0..k-1 quantized in order, each one's error spread over the later columns; batches of BATCH columns, the rest
    of the row updated once per batch."""
    w = w.clone()
    for start in range(0, k, BATCH):
        end = min(start + BATCH, k)
        errors = torch.empty(*w.shape[:2], end - start, dtype=w.dtype)
        for j in range(start, end):
            column = w[:, :, j]
            q = torch.round(column / scales).clamp(-QMAX, QMAX) * scales
            error = (column - q) / upper[:, j, j, None]
            errors[:, :, j - start] = error
            w[:, :, j] = q
            w[:, :, j + 1:end] -= error[:, :, None] * upper[:, None, j, j + 1:end]
        w[:, :, end:] -= errors @ upper[:, start:end, end:]
    return w
