"""The ridge normal equations that reconstruction and GPTQ share: H = A^T A + lambda I restricted, per block
row, to the columns the row keeps (rows of one block row share their kept columns)."""

from __future__ import annotations

import torch

SOLVE_BYTES = 256 * 2**20  # memory for one batch of float64 [K+1, K+1] systems


def damped(h: torch.Tensor, k: int, damping: float) -> tuple[torch.Tensor, float]:
    """H + lambda I on the first k (weight) entries, lambda = damping * mean(diag H[:k, :k]); returns (H, lambda)."""
    lam = damping * float(torch.diagonal(h)[:k].mean().clamp_min(1e-12))
    h = h.clone()
    h.diagonal()[:k] += lam
    return h, lam


def block_row_systems(h: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[R, K', K']: H restricted to each block row's kept columns ``kept`` [R, K'] (float 0/1), identity elsewhere."""
    return kept[:, :, None] * h * kept[:, None, :] + torch.diag_embed(1 - kept)


def cholesky(system: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factors of a batch of systems; where rounding leaves one not positive definite (rank-deficient
    inputs with tiny damping), add damping tenfold until it is."""
    extra = max(lam, 1e-12)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(system)
        if not bool(info.any()):
            return factor
        system = system + extra * torch.eye(system.shape[-1], dtype=system.dtype)
        extra *= 10
    raise RuntimeError("normal equations stay singular after damping")
