"""Ops the token-pruning pass puts into the graph: explicit attention probabilities, CP-ViT's patch score, the
per-image top-k selection of tokens (``"cascade"``), ToMe's bipartite merge (``"merge"``) and the size-weighted
mean that replaces a model's average over its tokens once they merge. Plain torch, so torch.fx, torch.export and
the ONNX exporter trace them (Softmax, ReduceMax, TopK, Gather, GatherElements, ScatterElements in ONNX).

TokenMerge splits its work in two, ``decide`` (which patches merge where) and ``reduce``, so the
reconstruction can merge its dense stream with the pruned stream's decision.

Shapes: B images, H heads, N tokens (P prefix tokens — class, distillation, registers — then the patches),
C channels.
"""

from __future__ import annotations

import torch
from torch import nn


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float,
                            key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ key_bias]) over the keys: [B, H, N, N] from q, k [B, H, N, D] (what SDPA computes
    inside); ``key_bias`` [B, N] is added to every query's logit of key j (ToMe's log token size)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    return add_key_bias(logits, key_bias).softmax(dim=-1)


def add_key_bias(logits: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """logits [B, H, N, N] + key_bias [B, N] broadcast over heads and queries (None: unchanged)."""
    return logits if key_bias is None else logits + key_bias[:, None, None, :]


def patch_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """CP-ViT's per-layer score of every key token j: sum over heads of max over queries i of A[b, h, i, j].

    [B, H, N, N] -> [B, N]. A token scores high when some query attends to it strongly in some head.
    """
    return probabilities.amax(dim=-2).sum(dim=1)


def weighted_token_mean(x: torch.Tensor, size: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The mean over tokens of a model that averages its tokens, after merging: each token weighted by the patches
    it stands for. x [B, n, C] holds the last n tokens of the stream that ``size`` [B, N] describes (the patches,
    where the model pools only those) -> [B, C] ([B, 1, C] with ``keepdim``). With every size 1 it is x.mean(1);
    right after a merge it equals the mean over the patches before it, since a merged token is their
    size-weighted average."""
    weights = size[:, size.shape[1] - x.shape[1]:, None].to(x.dtype)
    return (x * weights).sum(dim=1, keepdim=keepdim) / weights.sum(dim=1, keepdim=keepdim)


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
        top = score[:, self.prefix:].topk(self.keep, dim=1).indices.sort(dim=1).values + self.prefix
        prefix = torch.arange(self.prefix, device=score.device).expand(score.shape[0], self.prefix)
        index = torch.cat([prefix, top], dim=1)
        # whole rows of the flattened [B * N, C] tokens (ONNX Gather): no index expanded to [B, n, C]
        batch, tokens, channels = x.shape
        rows = (index + torch.arange(batch, device=index.device)[:, None] * tokens).reshape(-1)
        kept = x.reshape(batch * tokens, channels).index_select(0, rows).reshape(batch, index.shape[1], channels)
        return kept, score.gather(1, index), index


class TokenMerge(nn.Module):
    """ToMe's bipartite soft matching (arXiv 2210.09461) on the patches; the ``prefix`` tokens are never merged.

    forward(x [B, N, C], size [B, N] or None) -> (x [B, N - remove, C], size [B, N - remove]). Patches alternate
    into sets A (even) and B (odd); each A patch links to its most similar B patch (cosine of the tokens), the
    ``remove`` best-linked A patches are merged into their B partners by size-weighted average, and size counts
    the patches a token now stands for (1 before the first merge). Attention after a merge adds log(size) to
    the keys' logits (proportional attention), so a merged token weighs as the patches it replaced.
    """

    def __init__(self, prefix: int, remove: int):
        super().__init__()
        self.prefix, self.remove = int(prefix), int(remove)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, remove={self.remove}"

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reduce(x, size, self.decide(x, size))

    def decide(self, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(order [B, |A|, 1]: A patches, best-linked first; partner [B, |A|, 1]: each one's B patch); None when
        nothing is merged."""
        if self.remove == 0:
            return None
        patches = x[:, self.prefix:]
        metric = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
        best, partner = similarity.max(dim=-1)
        return best.argsort(dim=-1, descending=True)[..., None], partner[..., None]

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None, decision: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        size = torch.ones_like(x[..., 0]) if size is None else size
        if decision is None:
            return x, size
        order, partner = decision
        channels = x.shape[-1]
        weighted = torch.cat([x * size[..., None], size[..., None]], dim=-1)  # sums of x * size, and of size
        head, patches = weighted[:, :self.prefix], weighted[:, self.prefix:]
        a, b = patches[:, ::2], patches[:, 1::2]
        merged_src, kept_src = order[:, :self.remove], order[:, self.remove:]
        src = a.gather(1, merged_src.expand(-1, -1, channels + 1))
        b = b.scatter_reduce(1, partner.gather(1, merged_src).expand(-1, -1, channels + 1), src, reduce="sum")
        kept = torch.cat([head, a.gather(1, kept_src.expand(-1, -1, channels + 1)), b], dim=1)
        size = kept[..., -1]
        return kept[..., :-1] / size[..., None], size

