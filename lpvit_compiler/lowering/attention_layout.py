"""Head-major attention for the onnxruntime lowering: q, k and v come out of their layers in the layout the
attention's matmuls read, and ``proj`` reads the attention's output as they write it, so onnxruntime runs no
Transpose or Split between them (8% of onnxruntime's profiled time of DeiT-S compiled at ``flops_keep=0.5`` and
``patch_keep=0.5``, batch 8; README, End to end, has what removing them measured).

Input: a compiled GraphModule (torch-level nodes, as the passes leave it) and an example input. Output: a copy in
which, for every attention that matches one of these forms (shapes from one ShapeProp run),

    qkv(x) -> reshape [B, T, S, H, D] -> permute(2, 0, 3, 1, 4) -> unbind(0) -> S tensors [B, H, T, D]   (timm)
        becomes S layers, layer s holding rows s*H*D .. (s+1)*H*D of qkv with output_heads = H
    linear(x) -> reshape [B, T, H, D] -> transpose(1, 2) or permute(0, 2, 1, 3)                (Hugging Face)
        becomes linear(x) with output_heads = H
    a [B, H, T, D] -> transpose(1, 2) or permute(0, 2, 1, 3) -> reshape [B, T, H*D] -> proj(.)
        becomes proj(a) with input_heads = H
    scaled_dot_product_attention(q, k, v) without mask, dropout or causality
        becomes softmax((q * scale) @ k^T) @ v (frontend.attention.expose_probabilities)

The last because onnxruntime folds that k^T and scale into one FusedMatMul, where the ONNX exporter's own SDPA
decomposition (k^T, then q and k^T each times sqrt(scale)) leaves a Transpose of k and two Muls to run.

ops.bsr_linear states the layouts. Torch-level and aten nodes both match, and copies (contiguous) and inference
identities on the way from the transpose to proj are passed. A block-sparse layer's kernel only reads and writes
other addresses: its products and sums are the ones it computed before. A layer kept dense (nn.Linear) becomes a
BlockSparseLinear holding every block, 32 x 32 (16 x 16 where 32 does not divide the head width), and runs on the
lpvit kernel instead of onnxruntime's GEMM (the same products, summed in another order). A head layout needs a
block to lie within one head (D divisible by bh for output_heads, by bw for input_heads). int8 layers stay int8:
q, k and v hold qkv's rows of codes and scales, and each row of X is quantized as before (gathered from its heads
for proj). Other layers, q, k, v with a fused epilogue, and graphs whose layers are not modules (a loaded .pt2:
torch.export inlined them) keep their transposes.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..frontend.attention import SDPA, UnsupportedModel, expose_probabilities, tensor_shape
from ..frontend.patterns import is_inference_identity, only_user
from ..runtime import ops
from ..runtime.modules import BlockSparseLinear, BlockSparseLinearInt8

_DENSE_BLOCKS = (32, 16)  # block edge of a dense layer given a head layout: the first that divides the head width
_ATEN = torch.ops.aten
# the same op as a torch-level node (symbolic trace: method or function) or an aten node (torch.export capture)
_RESHAPES = ("reshape", "view", torch.reshape, _ATEN.view.default, _ATEN.reshape.default, _ATEN._unsafe_view.default)
_TRANSPOSES = ("transpose", torch.transpose, _ATEN.transpose.int)
_PERMUTES = ("permute", torch.permute, _ATEN.permute.default)
_UNBINDS = ("unbind", torch.unbind, _ATEN.unbind.int)
_CONTIGUOUS = ("contiguous", _ATEN.clone.default)


def _is(node: fx.Node, targets: tuple) -> bool:
    """``node`` calls one of ``targets`` (method names, or functions)."""
    if node.op == "call_method":
        return node.target in targets
    return node.op == "call_function" and any(node.target is t for t in targets if not isinstance(t, str))


def _dims(node: fx.Node) -> tuple:
    """The int arguments of x.permute(*dims) / x.transpose(a, b) / x.unbind(dim), as a tuple."""
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    return tuple(args) + tuple(node.kwargs.values())


def _swaps_heads_and_tokens(node: fx.Node) -> bool:
    """[B, H, T, D] <-> [B, T, H, D]: transpose(1, 2) or permute(0, 2, 1, 3) of a 4-D tensor."""
    shape = tensor_shape(node)
    if shape is None or len(shape) != 4:
        return False
    if _is(node, _TRANSPOSES):
        return sorted(d % 4 for d in _dims(node)) == [1, 2]
    return _is(node, _PERMUTES) and tuple(d % 4 for d in _dims(node)) == (0, 2, 1, 3)


def _layer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The linear ``node`` calls (a BlockSparseLinear, float or int8, or a dense nn.Linear), else None."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    return module if isinstance(module, BlockSparseLinear) or type(module) is nn.Linear else None


def _with_heads(module: nn.Module, head_width: int, rows: slice | None = None, input_heads: int = 0,
                output_heads: int = 0) -> BlockSparseLinear | None:
    """``module`` (rows ``rows`` of it) as a BlockSparseLinear with these head layouts, or None where its blocks
    would cross heads."""
    int8 = isinstance(module, BlockSparseLinearInt8)
    if isinstance(module, BlockSparseLinear):  # int8: its integer codes, the scales sliced alongside
        weight = ops.bsr_to_dense(module.row_ptr, module.col_idx, module.values.float(), module.out_features,
                                  module.in_features) if int8 else module.to_dense()
        mask, block, activation = module.element_mask(), module.block_shape, module.activation
    else:
        edge = next((b for b in _DENSE_BLOCKS if head_width % b == 0), None)
        if edge is None:
            return None
        weight, block, activation = module.weight.detach(), (edge, edge), "none"
        mask = torch.ones_like(weight, dtype=torch.bool)
    if (output_heads and head_width % block[0]) or (input_heads and head_width % block[1]):
        return None
    bias, scales = module.bias, module.scales if int8 else None
    if rows is not None:
        weight, mask, bias = weight[rows], mask[rows], bias[rows] if bias is not None else None
        scales = scales[rows] if int8 else None
    layer = BlockSparseLinearInt8.from_quantized(weight, scales, bias, mask, block, activation) if int8 else \
        BlockSparseLinear.from_masked_weight(weight, bias, mask, block, activation)
    layer.input_heads, layer.output_heads = input_heads, output_heads
    return layer


def _give_heads(gm: fx.GraphModule, node: fx.Node, module: nn.Module, head_width: int, input_heads: int = 0,
                output_heads: int = 0) -> bool:
    """Make ``node``'s whole layer read or write these head layouts: a BlockSparseLinear whose blocks fit the
    heads takes them as it is, a dense nn.Linear is replaced (_with_heads). False where the blocks do not fit."""
    if not isinstance(module, BlockSparseLinear):
        layer = _with_heads(module, head_width, input_heads=input_heads, output_heads=output_heads)
        if layer is not None:
            gm.set_submodule(node.target, layer)
        return layer is not None
    if (output_heads and head_width % module.block_shape[0]) or (input_heads and head_width % module.block_shape[1]):
        return False
    module.input_heads, module.output_heads = input_heads or module.input_heads, output_heads or module.output_heads
    return True


def _split_outputs(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> bool:
    """The two q/k/v forms of the module docstring: True when ``node`` was rewritten."""
    if len(node.args) != 1 or node.kwargs or getattr(module, "activation", "none") != "none":
        return False
    reshape = only_user(node)
    shape = tensor_shape(reshape) if reshape is not None and _is(reshape, _RESHAPES) else None
    swap = only_user(reshape) if shape is not None else None
    if swap is None or len(shape) not in (4, 5) or shape[:2] != (tensor_shape(node) or ())[:2] or \
            shape[-2] * shape[-1] * (shape[2] if len(shape) == 5 else 1) != module.out_features:
        return False  # not [B, T, N] -> [B, T, (S,) H, D]
    heads, width = shape[-2], shape[-1]
    if len(shape) == 4 and _swaps_heads_and_tokens(swap):  # one of q, k, v
        if not _give_heads(gm, node, module, width, output_heads=heads):
            return False
        swap.replace_all_uses_with(node)
        return True
    unbind = only_user(swap) if len(shape) == 5 and _is(swap, _PERMUTES) else None
    if unbind is None or _dims(swap) != (2, 0, 3, 1, 4) or not _is(unbind, _UNBINDS) or \
            _dims(unbind) not in ((), (0,)) or any(u.target is not operator.getitem for u in unbind.users):
        return False
    parts = shape[2]
    rows = [slice(s * heads * width, (s + 1) * heads * width) for s in range(parts)]
    layers = [_with_heads(module, width, rows=r, output_heads=heads) for r in rows]
    if any(layer is None for layer in layers):
        return False
    for s, layer in enumerate(layers):
        name = f"{node.target}_{'qkv'[s] if parts == 3 else s}"
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            part = gm.graph.call_module(name, node.args)
        for getter in [u for u in unbind.users if u.args[1] == s]:
            getter.replace_all_uses_with(part)
    return True


def _read_heads(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> bool:
    """The proj form of the module docstring: True when ``node`` was rewritten."""
    def back(value):  # past single-user identities and copies
        while isinstance(value, fx.Node) and len(value.users) == 1 and (is_inference_identity(gm, value) or
                                                                        _is(value, _CONTIGUOUS)):
            value = value.args[0]
        return value

    reshape = back(node.args[0] if node.args else None)
    if not isinstance(reshape, fx.Node) or len(reshape.users) != 1 or not _is(reshape, _RESHAPES):
        return False
    swap = back(reshape.args[0])
    if not isinstance(swap, fx.Node) or len(swap.users) != 1 or not _swaps_heads_and_tokens(swap):
        return False
    source = swap.args[0]
    shape = tensor_shape(source) if isinstance(source, fx.Node) else None
    if shape is None or shape[1] * shape[3] != module.in_features or \
            tensor_shape(reshape) != (shape[0], shape[2], shape[1] * shape[3]):
        return False  # not [B, H, T, D] -> [B, T, H, D] -> [B, T, H * D]
    if not _give_heads(gm, node, module, shape[3], input_heads=shape[1]):
        return False
    node.replace_input_with(node.args[0], source)
    return True


def head_major_attention(gm: fx.GraphModule, example: torch.Tensor) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` with its attentions' layers reading and writing head-major tensors and SDPA written out
    (module docstring), and how many layers were rewritten (0: their transposes stay)."""
    gm = copy.deepcopy(gm)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    rewritten = 0
    for node in list(gm.graph.nodes):
        module = _layer(gm, node)
        if module is not None and (_split_outputs(gm, node, module) or _read_heads(gm, node, module)):
            rewritten += 1
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]:  # shapes read above
        try:
            expose_probabilities(gm, node)
        except UnsupportedModel:  # a mask (Hugging Face's, even all-true), dropout or causal: left to SDPA
            pass
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm, rewritten
