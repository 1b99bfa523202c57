"""Ops the token-pruning pass puts into the graph: explicit attention probabilities, CP-ViT's patch score, the
per-image top-k selection of tokens (``"cascade"``), ToMe's bipartite merge (``"merge"``) and the size-weighted
mean that replaces a model's average over its tokens once they merge. Plain torch, so torch.fx, torch.export and
the ONNX exporter trace them (Softmax, ReduceMax, TopK, Gather, GatherElements, MatMul in ONNX).

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


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] at each image's own token positions ``index`` [B, n] -> [B, n, ...]. Gathers whole rows of the
    flattened [B * N, ...] tokens (ONNX Gather): an index expanded to x's shape for GatherElements, or a scatter,
    cost several times more in onnxruntime."""
    batch, tokens = x.shape[:2]
    rows = (index + torch.arange(batch, device=index.device)[:, None] * tokens).reshape(-1)
    return x.reshape(batch * tokens, *x.shape[2:]).index_select(0, rows).reshape(*index.shape, *x.shape[2:])


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
        return take_tokens(x, index), score.gather(1, index), index


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
        """(order [B, |A|]: the A patches, best-linked first, as indices into A; partner [B, |A|]: each A patch's
        most similar B patch, an index into B); None when nothing is merged."""
        if self.remove == 0:
            return None
        a, b = x[:, self.prefix::2], x[:, self.prefix + 1::2]
        # |x| as sqrt(sum x^2), which onnxruntime runs faster than its ReduceL2 (Mul + ReduceSum over the
        # contiguous tokens). cos(a_i, b_j) = a_i.b_j / (|a_i| |b_j|): |a_i| does not change which b_j is most
        # similar, so it divides the |A| best values only, and no normalised copy of the tokens is made
        norm = (x * x).sum(dim=-1).sqrt().clamp_min(1e-12)  # [B, N]
        similarity = (a @ b.transpose(-1, -2)) / norm[:, None, self.prefix + 1::2]  # [B, |A|, |B|]
        best, partner = similarity.max(dim=-1)
        best = best / norm[:, self.prefix::2]
        return best.argsort(dim=-1, descending=True), partner

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None, decision: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, C] and size [B, N] (None: 1 each) merged as ``decision`` (:meth:`decide`) says: the prefix
        tokens, then the A patches left unmerged (best-linked first), then the B patches, each the size-weighted
        average of itself and the A patches merged into it."""
        size = torch.ones_like(x[..., 0]) if size is None else size
        if decision is None:
            return x, size
        order, partner = decision
        merged_a, kept_a = self.prefix + 2 * order[:, :self.remove], self.prefix + 2 * order[:, self.remove:]
        src_size = take_tokens(size, merged_a)  # A patch i is token prefix + 2i
        src = take_tokens(x, merged_a) * src_size[..., None]
        # into[b, j, i]: merged A patch i joins B patch j. A 0/1 product sums what each B patch receives (one
        # MatMul, where a scatter-add ran serially in onnxruntime)
        b, b_size = x[:, self.prefix + 1::2], size[:, self.prefix + 1::2]
        target = partner.gather(1, order[:, :self.remove])
        into = target[:, None, :] == torch.arange(b.shape[1], device=x.device)[:, None]
        merged_size = b_size + (into.to(size.dtype) @ src_size[..., None])[..., 0]
        merged = (b * b_size[..., None] + into.to(x.dtype) @ src) / merged_size[..., None]
        return (torch.cat([x[:, :self.prefix], take_tokens(x, kept_a), merged], dim=1),
                torch.cat([size[:, :self.prefix], take_tokens(size, kept_a), merged_size], dim=1))

