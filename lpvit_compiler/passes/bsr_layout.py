"""Layout rewrite to BSR: pruned nn.Linear layers become BlockSparseLinear calling torch.ops.lpvit.bsr_linear.

Input: graph with nn.Linear modules (possibly shrunk by dead-block elimination) and each layer's live element
mask. Output: the same graph with those modules swapped for :class:`~lpvit_compiler.modules.BlockSparseLinear`
holding ``row_ptr``, ``col_idx``, ``values [nnz_blocks, bh, bw]`` and ``bias``: a block is stored when any of its
elements is kept, masked elements inside it are zero, and edge blocks of dims that do not divide by the
block are zero-padded (never skipped). y = x (W (.) M)^T + b exactly.

With ``dense_fallback``, a layer the cost model finds too dense for the block-sparse kernel to win stays an
nn.Linear on its masked weight W (.) M: the same numbers, a faster GEMM. The decision reads the layer's
current ``costs`` — its shape after dead-block elimination and its live blocks in that shape.

With ``quantize="int8"`` every pruned layer becomes a :class:`~lpvit_compiler.modules.BlockSparseLinearInt8`
(codes = round(W / s) of the reconstruct pass's dequantised weights and scales s, restricted to the live rows):
the dense fallback does not apply, since onnxruntime's dense int8 path quantizes X per tensor, not per token as
the layer was fitted for.

Also records the FLOPs the compiled model really executes (after elimination; dense layers count in full):
    flops_keep_executed = sum_l 2 * tokens_l * |executed elements_l| / sum_l 2 * tokens_l * |W_l|
"""

from __future__ import annotations

from torch import fx

from ..pass_manager import PassResult, compiler_pass
from ..quantization import codes
from ..runtime.modules import BlockSparseLinear, BlockSparseLinearInt8
from ..state import CompileState


@compiler_pass(requires=("masks", "masked_weights", "costs"), provides=("layout",), invariant="masked_outputs")
def bsr_layout(gm: fx.GraphModule, state: CompileState) -> PassResult:
    per_layer = {}
    executed = dense = 0.0
    for name, layer in state.layers.items():
        linear = gm.get_submodule(name)
        live_mask = layer.live_mask()
        int8 = state.options.quantize == "int8"
        if int8:
            scales = layer.weight_scales if layer.kept_rows is None else layer.weight_scales[layer.kept_rows]
            bsr = BlockSparseLinearInt8.from_quantized(codes(linear.weight.detach(), scales), scales, linear.bias,
                                                       live_mask, layer.grid.block_shape)
        else:
            bsr = BlockSparseLinear.from_masked_weight(linear.weight, linear.bias, live_mask, layer.grid.block_shape)
        layer.nnz_blocks = bsr.nnz_blocks
        dense += 2.0 * layer.tokens * layer.out_features * layer.in_features
        if state.options.dense_fallback and not layer.costs.sparse_faster and not int8:
            layer.layout = "dense"  # its weight is already masked (reconstruct's contract)
            executed += 2.0 * layer.tokens * linear.weight.numel()
        else:
            layer.layout = "bsr"
            gm.set_submodule(name, bsr)
            executed += 2.0 * layer.tokens * float(live_mask.sum())
        per_layer[name] = {
            "layout": layer.layout + ("-int8" if int8 else ""),
            "shape": [bsr.out_features, bsr.in_features],
            "block_shape": list(bsr.block_shape),
            "nnz_blocks": bsr.nnz_blocks,
            "block_rows": bsr.row_ptr.numel() - 1,
            "padded": bsr.out_features % bsr.block_shape[0] != 0 or bsr.in_features % bsr.block_shape[1] != 0,
            "bytes_dense": 4 * linear.weight.numel(),
            "bytes_bsr": bsr.values.element_size() * bsr.values.numel() + 8 * (bsr.row_ptr.numel() +
                                                                                bsr.col_idx.numel()),
        }
    gm.recompile()
    state.flops_keep_executed = executed / dense
    decisions = {"flops_keep_executed": state.flops_keep_executed, "layers": per_layer}
    return PassResult(gm, True, decisions)
