"""The block-sparse linear operators ``torch.ops.lpvit.bsr_linear`` and ``bsr_linear_int8`` — the boundary
kernels plug in behind.

    Y[..., N] = activation(X[..., K] @ W^T + bias) + residual[..., N],   W [N, K] in BSR:
      row_ptr [ceil(N/bh) + 1] int64   block-row r holds blocks row_ptr[r] .. row_ptr[r+1]-1
      col_idx [nnz_blocks] int64       block-column of each block
      values  [nnz_blocks, bh, bw]     each block in W's [out, in] orientation, zero-padded at the edges
      activation                        one of ACTIVATIONS (the fused epilogue; "none" by default)
      residual                          Y's shape, or None

Both also read and write the head-major layout of an attention (:func:`from_heads`, :func:`to_heads`):
``input_heads`` = H takes X as [B, H, T, K/H], ``output_heads`` = H gives Y as [B, H, T, N/H] (no activation, no
residual), so q, k, v and the input of ``proj`` need no transposes in onnxruntime; 0 (the default) is row-major.

``bsr_linear_int8`` takes int8 ``values`` and ``scales`` [N] float32 (W = scales[n] * values) and quantizes
each row of X to int8 with its own scale at run time (:func:`quantize_rows`); the products are summed exactly
in integers, then dequantised: Y[m, n] = activation(s_m * scales[n] * (xq_m . values_n) + bias[n]) + residual.

These are the contracts of the ONNX ops ``ai.lpvit::BlockSparseLinear`` and ``BlockSparseLinearInt8``. On CPU float32 the op runs the native
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


def check_bsr(row_ptr: Tensor, col_idx: Tensor, values: Tensor, out_features: int, in_features: int) -> None:
    """Raise :class:`KernelLibraryError` for BSR buffers the native kernel would reject (same rules, same words)."""
    def fail(message: str):
        raise kernels.KernelLibraryError(f"malformed block-sparse weight: {message}")

    if values.dim() != 3 or min(values.shape[1:]) < 1:
        fail(f"values must be [nnz_blocks, bh, bw], got {list(values.shape)}")
    bh, bw = values.shape[1], values.shape[2]
    block_rows, block_cols = math.ceil(out_features / bh), math.ceil(in_features / bw)
    nnz = values.shape[0]
    if row_ptr.dim() != 1 or row_ptr.numel() != block_rows + 1:
        fail(f"row_ptr length is {row_ptr.numel()}, expected {block_rows + 1}")
    if col_idx.dim() != 1 or col_idx.numel() != nnz:
        fail(f"col_idx length is {col_idx.numel()}, expected {nnz} (values' first dimension)")
    if int(row_ptr[0]) != 0:
        fail(f"row_ptr[0] is {int(row_ptr[0])}, expected 0")
    steps = row_ptr.diff()
    if bool((steps < 0).any()) or int(row_ptr[-1]) != nnz:
        fail(f"row_ptr must be non-decreasing and end at nnz_blocks = {nnz}")
    if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= block_cols):
        bad = int(((col_idx < 0) | (col_idx >= block_cols)).nonzero()[0])
        fail(f"col_idx[{bad}] = {int(col_idx[bad])} is out of range [0, {block_cols})")
    row_of = torch.repeat_interleave(torch.arange(block_rows), steps)
    same_row = row_of[1:] == row_of[:-1]
    if bool((same_row & (col_idx[1:] <= col_idx[:-1])).any()):
        bad = int((same_row & (col_idx[1:] <= col_idx[:-1])).nonzero()[0]) + 1
        fail(f"col_idx must increase within a block row: col_idx[{bad}] = {int(col_idx[bad])} after "
             f"{int(col_idx[bad - 1])}")


def bsr_to_dense(row_ptr: Tensor, col_idx: Tensor, values: Tensor, out_features: int, in_features: int) -> Tensor:
    """The dense W [out_features, in_features] that a BSR triple stores (validated by :func:`check_bsr`)."""
    check_bsr(row_ptr, col_idx, values, out_features, in_features)
    bh, bw = values.shape[1], values.shape[2]
    block_rows, block_cols = row_ptr.numel() - 1, math.ceil(in_features / bw)
    block_row_of = torch.repeat_interleave(torch.arange(block_rows), row_ptr.diff())
    blocks = values.new_zeros(block_rows, block_cols, bh, bw)
    blocks[block_row_of, col_idx] = values
    dense = blocks.permute(0, 2, 1, 3).reshape(block_rows * bh, block_cols * bw)
    return dense[:out_features, :in_features]


# The fused activations, as torch computes them unfused (names shared with the native kernel and the ONNX op).
ACTIVATIONS = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}


def apply_epilogue(y: Tensor, activation: str, residual: Optional[Tensor]) -> Tensor:
    """``activation(y) + residual``: the op's epilogue unfused, for every torch-side stand-in of a fused layer."""
    y = ACTIVATIONS[activation](y)
    return y + residual if residual is not None else y


def check_epilogue(activation: str, residual: Optional[Tensor], output_shape: tuple[int, ...]) -> None:
    """Raise :class:`KernelLibraryError` for an activation or residual the native kernel would reject."""
    if activation not in ACTIVATIONS:
        raise kernels.KernelLibraryError(f"unknown activation '{activation}', expected one of "
                                         f"{', '.join(ACTIVATIONS)}")
    if residual is not None and tuple(residual.shape) != tuple(output_shape):
        raise kernels.KernelLibraryError(f"residual has shape {list(residual.shape)}, the layer's output has "
                                         f"{list(output_shape)}")


def from_heads(x: Tensor, heads: int) -> Tensor:
    """Head-major [B, H, T, D] as the row-major [B, T, H * D] it stands for (``heads`` = 0: x unchanged)."""
    return x if heads == 0 else x.transpose(1, 2).reshape(x.shape[0], x.shape[2], heads * x.shape[3])


def to_heads(y: Tensor, heads: int) -> Tensor:
    """Row-major [B, T, N] as head-major [B, heads, T, N / heads], contiguous (``heads`` = 0: y unchanged)."""
    return y if heads == 0 else y.reshape(y.shape[0], y.shape[1], heads, -1).transpose(1, 2).contiguous()


def check_heads(x: Tensor, in_features: int, out_features: int, activation: str, residual: Optional[Tensor],
                input_heads: int, output_heads: int) -> None:
    """Raise :class:`KernelLibraryError` for head layouts whose shapes the native op would reject for this X (its
    other rule, a block within one head, is about the native kernel's addressing; torch rearranges X instead)."""
    def fail(message: str):
        raise kernels.KernelLibraryError(f"head-major layout: {message}")

    if input_heads < 0 or output_heads < 0:
        fail(f"input_heads and output_heads must be >= 0, got {input_heads} and {output_heads}")
    if input_heads and (x.dim() != 4 or x.shape[1] != input_heads or x.shape[3] * input_heads != in_features):
        fail(f"with input_heads={input_heads}, X must be [B, {input_heads}, T, {in_features // input_heads}], got "
             f"{list(x.shape)}")
    if output_heads and (out_features % output_heads or activation != "none" or residual is not None or
                         (not input_heads and x.dim() != 3)):
        fail(f"output_heads={output_heads} needs N={out_features} divisible by it, X [B, T, K] and no activation "
             "or residual")


def bsr_linear_reference(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
                         out_features: int, in_features: int, activation: str = "none",
                         residual: Optional[Tensor] = None) -> Tensor:
    """The unfused statement of the op: densify W, F.linear, the activation, then + residual."""
    check_epilogue(activation, residual, (*x.shape[:-1], out_features))
    weight = bsr_to_dense(row_ptr, col_idx, values, out_features, in_features)
    return apply_epilogue(F.linear(x, weight.to(x.dtype), bias), activation, residual)


def check_scales(values: Tensor, scales: Tensor, out_features: int) -> None:
    """Raise :class:`KernelLibraryError` for int8 weights the native kernel would reject."""
    if values.dtype != torch.int8:
        raise kernels.KernelLibraryError(f"malformed block-sparse weight: int8 values expected, got {values.dtype}")
    if scales.dim() != 1 or scales.numel() != out_features or not bool(torch.isfinite(scales).all()):
        raise kernels.KernelLibraryError(f"malformed block-sparse weight: scales must be {out_features} finite "
                                         f"floats (one per output), got shape {list(scales.shape)}")


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of ``x`` [M, K] (float32) as int8 values with its own scale, exactly as the native kernel does:
    s = max|x| / 127, xq = rint(clamp(x * (127 / max|x|), -127, 127)) in float32; a row with max|x| < 1e-30
    gives zeros and scale 0, a row holding NaN or inf zeros and scale NaN. Returns (xq [M, K] float, s [M])."""
    x = x.float()
    amax = x.abs().amax(1)
    finite = torch.isfinite(x).all(1)
    usable = finite & (amax >= 1e-30)
    inv = torch.where(usable, torch.tensor(127.0) / amax, torch.zeros(()))
    xq = torch.round((x * inv[:, None]).clamp(-127, 127))  # round half to even, as the kernel's rint
    xq = torch.where(usable[:, None], xq, torch.zeros(()))
    scale = torch.where(usable, amax / 127.0, torch.where(finite, 0.0, float("nan")))
    return xq, scale


def fake_quantize_rows(x: Tensor) -> Tensor:
    """``x`` [..., K] as the int8 kernel sees it: quantized per row and dequantised (for calibration)."""
    xq, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    return (xq * scale[:, None]).reshape(x.shape).to(x.dtype)


def bsr_linear_int8_reference(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Tensor,
                              bias: Optional[Tensor], out_features: int, in_features: int, activation: str = "none",
                              residual: Optional[Tensor] = None) -> Tensor:
    """The int8 op stated directly: rows quantized, integer products summed in float64 (exact below 2^53),
    dequantised in float32 in the kernel's order, then the epilogue."""
    check_epilogue(activation, residual, (*x.shape[:-1], out_features))
    check_scales(values, scales, out_features)
    weight = bsr_to_dense(row_ptr, col_idx, values.double(), out_features, in_features)
    xq, sx = quantize_rows(x.reshape(-1, in_features))
    acc = (xq.double() @ weight.T).float()
    y = acc * (sx[:, None] * scales[None, :])
    if bias is not None:
        y = y + bias
    return apply_epilogue(y.reshape(*x.shape[:-1], out_features), activation, residual)


def _in_head_layouts(x: Tensor, in_features: int, out_features: int, activation: str, residual: Optional[Tensor],
                     input_heads: int, output_heads: int, row_major) -> Tensor:
    """``row_major(x)`` (the op on row-major X) with X and Y in these head layouts. torch runs the row-major
    kernel on X rearranged: the same products in the same order as the native head-major run."""
    check_heads(x, in_features, out_features, activation, residual, input_heads, output_heads)
    x = from_heads(x, input_heads)
    check_epilogue(activation, residual, (*x.shape[:-1], out_features))
    return to_heads(row_major(x), output_heads)


def _fake_output(x: Tensor, out_features: int, input_heads: int, output_heads: int) -> Tensor:
    shape = (x.shape[0], x.shape[2], out_features) if input_heads else (*x.shape[:-1], out_features)
    if output_heads:
        shape = (shape[0], output_heads, shape[1], out_features // output_heads)
    return x.new_empty(shape)


@torch.library.custom_op("lpvit::bsr_linear_int8", mutates_args=())
def bsr_linear_int8(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, scales: Tensor,
                    bias: Optional[Tensor], out_features: int, in_features: int, activation: str = "none",
                    residual: Optional[Tensor] = None, input_heads: int = 0, output_heads: int = 0) -> Tensor:
    check_scales(values, scales, out_features)

    def row_major(rows: Tensor) -> Tensor:
        y = kernels.native_bsr_linear(rows, row_ptr, col_idx, values, bias, out_features, in_features, activation,
                                      residual, scales)
        if y is None:
            _warn_if_unbuilt()
            y = bsr_linear_int8_reference(rows, row_ptr, col_idx, values, scales, bias, out_features, in_features,
                                          activation, residual)
        return y
    return _in_head_layouts(x, in_features, out_features, activation, residual, input_heads, output_heads, row_major)


@bsr_linear_int8.register_fake
def _bsr_linear_int8_fake(x, row_ptr, col_idx, values, scales, bias, out_features, in_features, activation="none",
                          residual=None, input_heads=0, output_heads=0):
    return _fake_output(x, out_features, input_heads, output_heads)


def _warn_if_unbuilt() -> None:
    if not kernels.native_available():
        warnings.warn("lpvit: the native kernel library is not built; block-sparse layers run the slow "
                      "pure-torch reference (reinstall with `pip install .` to build it)", stacklevel=3)


@torch.library.custom_op("lpvit::bsr_linear", mutates_args=())
def bsr_linear(x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor],
               out_features: int, in_features: int, activation: str = "none",
               residual: Optional[Tensor] = None, input_heads: int = 0, output_heads: int = 0) -> Tensor:
    def row_major(rows: Tensor) -> Tensor:
        y = kernels.native_bsr_linear(rows, row_ptr, col_idx, values, bias, out_features, in_features, activation,
                                      residual)
        if y is None:
            _warn_if_unbuilt()
            y = bsr_linear_reference(rows, row_ptr, col_idx, values, bias, out_features, in_features, activation,
                                     residual)
        return y
    return _in_head_layouts(x, in_features, out_features, activation, residual, input_heads, output_heads, row_major)


@bsr_linear.register_fake
def _bsr_linear_fake(x, row_ptr, col_idx, values, bias, out_features, in_features, activation="none",
                     residual=None, input_heads=0, output_heads=0):
    return _fake_output(x, out_features, input_heads, output_heads)
