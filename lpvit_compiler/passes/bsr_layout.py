"""Layout rewrite to BSR: pruned nn.Linear layers become BlockSparseLinear calling torch.ops.lpvit.bsr_linear.

Input: graph with nn.Linear modules (possibly shrunk by dead-block elimination) and each layer's live element
mask. Output: the same graph with those modules swapped for :class:`~lpvit_compiler.modules.BlockSparseLinear`
holding ``row_ptr``, ``col_idx``, ``values [nnz_blocks, bh, bw]`` and ``bias``: a block is stored when any of its
elements is kept, masked elements inside it are zero, and edge blocks of dims that do not divide by the
block are zero-padded (never skipped). y = x (W (.) M)^T + b exactly.

With ``dense_fallback``, a layer the hardware pass found too dense for the block-sparse kernel to win
(``sparse_faster[k]`` false) stays an nn.Linear on its masked weight W (.) M: the same numbers, a faster GEMM.

Also records the FLOPs the compiled model really executes (after elimination; dense layers count in full):
    flops_keep_executed = sum_l 2 * tokens_l * |executed elements_l| / sum_l 2 * tokens_l * |W_l|
"""

from __future__ import annotations

import torch
from torch import fx

from ..state import CompileContext
from ..runtime.modules import BlockSparseLinear
from ..pass_manager import PassResult


def bsr_layout(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    per_layer = {}
    executed = dense = 0.0
    for name, layer in ctx.layers.items():
        linear = gm.get_submodule(name)
        live_mask = layer.live_mask()
        bsr = BlockSparseLinear.from_masked_weight(linear.weight, linear.bias, live_mask, layer.grid.block_shape)
        layer.nnz_blocks = bsr.nnz_blocks
        dense += 2.0 * layer.tokens * layer.out_features * layer.in_features
        if ctx.options.dense_fallback and not layer.sparse_faster[layer.pruned_blocks]:
            layer.layout = "dense"
            with torch.no_grad():
                linear.weight.mul_(live_mask)
            executed += 2.0 * layer.tokens * linear.weight.numel()
        else:
            layer.layout = "bsr"
            gm.set_submodule(name, bsr)
            executed += 2.0 * layer.tokens * float(live_mask.sum())
        per_layer[name] = {
            "layout": layer.layout,
            "shape": [bsr.out_features, bsr.in_features],
            "block_shape": list(bsr.block_shape),
            "nnz_blocks": bsr.nnz_blocks,
            "block_rows": bsr.row_ptr.numel() - 1,
            "padded": bsr.out_features % bsr.block_shape[0] != 0 or bsr.in_features % bsr.block_shape[1] != 0,
            "bytes_dense": 4 * linear.weight.numel(),
            "bytes_bsr": 4 * bsr.values.numel() + 8 * (bsr.row_ptr.numel() + bsr.col_idx.numel()),
        }
    gm.recompile()
    ctx.summary["flops_keep_executed"] = executed / dense
    decisions = {"flops_keep_executed": ctx.summary["flops_keep_executed"], "layers": per_layer}
    return PassResult(gm, True, decisions)
