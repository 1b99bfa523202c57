"""Ops the token-pruning pass puts into the graph: explicit attention probabilities, CP-ViT's patch score and
the per-image top-k selection of tokens. Plain torch, so torch.fx, torch.export and the ONNX exporter trace
them (Softmax, ReduceMax, TopK and GatherElements in ONNX).

Shapes: B images, H heads, N tokens (P prefix tokens — class, distillation, registers — then the patches),
C channels.
"""

from __future__ import annotations

import torch
from torch import nn


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys: [B, H, N, N] from q, k [B, H, N, D] (what SDPA computes inside)."""
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def patch_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """CP-ViT's per-layer score of every key token j: sum over heads of max over queries i of A[b, h, i, j].

    [B, H, N, N] -> [B, N]. A token scores high when some query attends to it strongly in some head.
    """
    return probabilities.amax(dim=-2).sum(dim=1)


class TokenSelect(nn.Module):
    """Keep the ``prefix`` first tokens and each image's ``keep`` highest-scoring other tokens.

    forward(x [B, N, C], score [B, N]) -> (x [B, prefix + keep, C], score [B, prefix + keep],
    index [B, prefix + keep] int64: the kept tokens' positions in the input). Kept patches stay in their input
    order (sorted indices), so the kept set — not the order — is what the scores decide. ``keep`` is static, so
    exported shapes are too.
    """

    def __init__(self, prefix: int, keep: int):
        super().__init__()
        self.prefix, self.keep = int(prefix), int(keep)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, keep={self.keep}"

    def forward(self, x: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gather(x, score, self.indices(score))

    def indices(self, score: torch.Tensor) -> torch.Tensor:
        """[B, prefix + keep]: the prefix positions, then the top-``keep`` patches of each image in input order."""
        top = score[:, self.prefix:].topk(self.keep, dim=1).indices.sort(dim=1).values + self.prefix
        prefix = torch.arange(self.prefix, device=score.device).expand(score.shape[0], self.prefix)
        return torch.cat([prefix, top], dim=1)

    @staticmethod
    def gather(x: torch.Tensor, score: torch.Tensor, index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # whole rows of the flattened [B * N, C] tokens (ONNX Gather): no index expanded to [B, n, C]
        batch, tokens, channels = x.shape
        rows = (index + torch.arange(batch, device=index.device)[:, None] * tokens).reshape(-1)
        kept = x.reshape(batch * tokens, channels).index_select(0, rows).reshape(batch, index.shape[1], channels)
        return kept, score.gather(1, index), index
