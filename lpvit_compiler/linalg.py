"""The ridge normal equations that reconstruction and GPTQ share: H = A^T A + lambda I restricted, per block
row, to the columns the row keeps (rows of one block row share their kept columns); and the Gram product x^T x
that importance (input moments) and reconstruction (A^T A) accumulate over calibration tokens; and the
Cholesky factorisation they (and the OBS curves) run on.

Also the GEMM those passes run on (:func:`gemm_products`): torch's float32 products go to MKL, which takes its
fast code paths on Intel CPUs only. On an AMD EPYC (AVX-512, 2 threads) MKL runs DeiT-S's linear products at
158-176 GFLOP/s where oneDNN, which torch ships too, runs them at 226-360 (benchmarks/linalg_bench.py), and
linear layers' products are most of a default compile's time. So on other vendors' CPUs the compile's linear
layers (forward and backward) and Gram products run through oneDNN."""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .errors import ConfigError
from .runtime.sessions import cpu_field

SOLVE_BYTES = 256 * 2**20  # memory for one batch of float64 [K+1, K+1] systems
GRAM_TILE = 256  # column tile of gram(): best overall of 192, 256, 384, 512 (benchmarks/linalg_bench.py, AVX2)
ALIASED_COLUMNS = 512  # float64 rows a multiple of 4 KiB apart: unaliased_width() widens those systems


GEMM_BACKENDS = ("auto", "onednn", "blas")


@functools.cache
def gemm_backend() -> str:
    """``"onednn"`` or ``"blas"`` (torch's own, MKL): what :func:`gemm_products` routes float32 products to.

    ``LPVIT_GEMM=onednn|blas`` forces one; ``auto`` (the default) takes oneDNN on CPUs that are not Intel's, where
    MKL is slow, and where torch was built with it."""
    choice = os.environ.get("LPVIT_GEMM", "auto")
    if choice not in GEMM_BACKENDS:
        raise ConfigError(f"LPVIT_GEMM={choice!r} is not one of {', '.join(GEMM_BACKENDS)}: unset it, or pick one")
    if choice == "onednn" and not onednn_available():
        raise ConfigError("LPVIT_GEMM=onednn, but this torch build has no oneDNN: unset it or use blas")
    if choice == "auto":
        return "onednn" if onednn_available() and _cpu_vendor() not in ("GenuineIntel", "") else "blas"
    return choice


def onednn_available() -> bool:
    """torch was built with oneDNN and has the product op :func:`onednn_product` calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), or "" where there is none."""
    return cpu_field("vendor_id")


def onednn_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T (+ bias) through oneDNN, for float32 a [M, K] and b [N, K]."""
    return torch.ops.mkldnn._linear_pointwise(_dense(a), _dense(b), bias, "none", [], "")


def _dense(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix, or a row-major copy unless it is row-major or a transposed row-major one already.

    Why: oneDNN takes any strides, but others (a column slice, an expanded gradient) send it to its reference GEMM,
    ~2,500x slower (a 256-column slice of a [1576, 1536] matrix against the rest: 6.7 s, not 2.6 ms)."""
    return matrix if matrix.is_contiguous() or matrix.T.is_contiguous() else matrix.contiguous()


def onednn_product_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch.utils.flop_counter's formula for :func:`onednn_product`'s op: 2 M N K for a [M, K] @ b [N, K]^T."""
    return 2 * math.prod(a_shape[:-1]) * b_shape[0] * b_shape[1]


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with its forward and both backward products through oneDNN:
    y = x W^T + b,  dx = dy W,  dW = dy^T x,  db = sum_tokens dy     (x [..., K], W [N, K], dy [..., N])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_product(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = onednn_product(grad, weight.T).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = onednn_product(grad.T, x.reshape(-1, x.shape[-1]).T)
        if ctx.needs_input_grad[2]:
            db = grad.sum(0)
        return dx, dw, db


def _linear_arguments(input, weight, bias=None):  # F.linear's signature
    return input, weight, bias


class _OneDNNLinearMode(TorchFunctionMode):
    """Sends float32 ``F.linear`` calls (every nn.Linear's) to :class:`_OneDNNLinear`, and other calls on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            tensors = [t for t in (x, weight, bias) if t is not None]
            if all(t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided for t in tensors):
                return _OneDNNLinear.apply(x, weight, bias)
        return func(*args, **kwargs)


def gemm_products():
    """A context in which the compile's float32 linear layers run their products on :func:`gemm_backend`'s
    library (forward and backward; the values are the same up to float32 rounding)."""
    return _OneDNNLinearMode() if gemm_backend() == "onednn" else contextlib.nullcontext()


def on_gemm_backend(function):
    """Decorator: ``function`` runs inside :func:`gemm_products` (the passes that compute on calibration data)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with gemm_products():
            return function(*args, **kwargs)
    return run


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [K, K] for x [T, K], as products of column tiles with the tiles at and right of them, each mirrored
    below the diagonal: (n + 1) / 2n of one GEMM's multiply-adds for n equal tiles (fc2's K = 1536, six tiles:
    7/12; K = 384: 7/9)."""
    k = x.shape[1]
    if gemm_backend() == "onednn" and x.dtype == torch.float32:
        xt = x.T.contiguous()  # tiles of columns become row-major row ranges (see _dense)

        def product(columns: slice, rest: slice) -> torch.Tensor:  # x[:, columns]^T x[:, rest]
            return onednn_product(xt[columns], xt[rest])
    else:
        def product(columns: slice, rest: slice) -> torch.Tensor:
            return x[:, columns].T @ x[:, rest]
    if k <= GRAM_TILE:
        return product(slice(None), slice(None))
    result = x.new_empty(k, k)
    for first in range(0, k, GRAM_TILE):
        tile = slice(first, min(first + GRAM_TILE, k))
        upper = product(tile, slice(first, None))  # [tile, K - first]
        result[tile, first:] = upper
        result[first:, tile] = upper.T
    return result


def damped(h: torch.Tensor, k: int, damping: float) -> tuple[torch.Tensor, float]:
    """H + lambda I on the first k (weight) entries, lambda = damping * mean(diag H[:k, :k]); returns (H, lambda)."""
    lam = damping * float(torch.diagonal(h)[:k].mean().clamp_min(1e-12))
    h = h.clone()
    h.diagonal()[:k] += lam
    return h, lam


def block_row_systems(h: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[R, K', K']: H restricted to each block row's kept columns ``kept`` [R, K'] (float 0/1), identity elsewhere."""
    return kept[:, :, None] * h * kept[:, None, :] + torch.diag_embed(1 - kept)


def unaliased_width(n: int) -> int:
    """n, or n + 1 where rows of n float64 are a multiple of 4 KiB (``ALIASED_COLUMNS`` values) apart.

    Why: at such widths MKL's potrf hits cache-set conflicts: a 1536-wide system (fc2's inverse Hessian in the OBS
    curves) takes 45 ms, a 1537-wide one 23 ms (benchmarks/linalg_bench.py). Narrower widths that are merely
    multiples of 64 (384, 768) factor slower widened than as they are, counting the copy. A system widened by an
    identity row and column, diag(A, 1), has the factor diag(L_A, 1)."""
    return n + 1 if n % ALIASED_COLUMNS == 0 else n


def cholesky_ex(system: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.cholesky_ex`` (lower factor L [..., n, n] of each system, and info: 0, or the order of the
    first leading minor that is not positive definite), factored at ``unaliased_width(n)`` (L is then a view of
    the wider factor's leading n x n)."""
    n = system.shape[-1]
    width = unaliased_width(n)
    if width == n:
        return torch.linalg.cholesky_ex(system)
    wide = torch.zeros(*system.shape[:-2], width, width, dtype=system.dtype)
    wide[..., :n, :n] = system
    wide[..., n:, n:] = torch.eye(width - n, dtype=system.dtype)
    factor, info = torch.linalg.cholesky_ex(wide)
    return factor[..., :n, :n], info


def cholesky(system: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factors of a batch of systems; where rounding leaves one not positive definite (rank-deficient
    inputs with tiny damping), add damping tenfold until it is."""
    extra = max(lam, 1e-12)
    for _ in range(12):
        factor, info = cholesky_ex(system)
        if not bool(info.any()):
            return factor
        system = system + extra * torch.eye(system.shape[-1], dtype=system.dtype)
        extra *= 10
    raise RuntimeError("normal equations stay singular after damping")


def solve_kept_columns(h: torch.Tensor, rhs: torch.Tensor, kept: torch.Tensor, bh: int, lam: float) -> torch.Tensor:
    """[N, K']: row n is H[S, S]^-1 rhs_n[S] on its block row's kept columns S, 0 elsewhere.

    ``h`` [K', K'] damped, ``rhs`` [N, K'], ``kept`` [block rows, K'] bool. Each system is gathered at its kept
    columns only (a Cholesky costs |S|^3: at half the columns kept, an eighth of the full system's), and block rows
    with equally many kept columns are factored as one batch."""
    n, size = rhs.shape
    block_rows = kept.shape[0]
    padded = torch.cat([rhs, rhs.new_zeros(block_rows * bh - n, size)]).reshape(block_rows, bh, size)
    solved = torch.zeros_like(padded)
    counts = kept.sum(1)
    for count in counts.unique().tolist():
        if count == 0:  # nothing kept: the row stays 0
            continue
        rows = torch.nonzero(counts == count).flatten()
        columns = torch.nonzero(kept[rows])[:, 1].reshape(len(rows), count)  # [R, |S|], ascending per row
        group = max(1, SOLVE_BYTES // (8 * count * count))
        for first in range(0, len(rows), group):
            r, c = rows[first:first + group], columns[first:first + group]
            factor = cholesky(h[c[:, :, None], c[:, None, :]], lam)  # [R, |S|, |S|]
            at_kept = c[:, None, :].expand(-1, bh, -1)
            x = torch.cholesky_solve(padded[r].gather(2, at_kept).transpose(1, 2), factor)  # [R, |S|, bh]
            solved[r] = torch.zeros(len(r), bh, size, dtype=solved.dtype).scatter_(2, at_kept, x.transpose(1, 2))
    return solved.reshape(-1, size)[:n]
