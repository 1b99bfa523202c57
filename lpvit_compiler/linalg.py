"""The ridge normal equations that reconstruction and GPTQ share: H = A^T A + lambda I restricted, per block
row, to the columns the row keeps (rows of one block row share their kept columns); and the Gram product x^T x
that importance (input moments) and reconstruction (A^T A) accumulate over calibration tokens; and the
Cholesky factorisation they (and the OBS curves) run on."""

from __future__ import annotations

import torch

SOLVE_BYTES = 256 * 2**20  # memory for one batch of float64 [K+1, K+1] systems
GRAM_TILE = 256  # column tile of gram(): best overall of 192, 256, 384, 512 (benchmarks/linalg_bench.py, AVX2)
ALIASED_COLUMNS = 512  # float64 rows a multiple of 4 KiB apart: unaliased_width() widens those systems


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [K, K] for x [T, K], as products of column tiles with the tiles at and right of them, each mirrored
    below the diagonal: (n + 1) / 2n of one GEMM's multiply-adds for n equal tiles (fc2's K = 1536, six tiles:
    7/12; K = 384: 7/9)."""
    k = x.shape[1]
    if k <= GRAM_TILE:
        return x.T @ x
    result = x.new_empty(k, k)
    for first in range(0, k, GRAM_TILE):
        tile = slice(first, min(first + GRAM_TILE, k))
        upper = x[:, tile].T @ x[:, first:]  # [tile, K - first]
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
