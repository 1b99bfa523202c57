"""Scale folding: per-channel scales next to a linear layer move into its weights (pass 01).

Input: the canonical GraphModule. Output: a graph computing the same function (up to float rounding) in which

    LayerScale after a linear     gamma * (x W^T + b)  [through inference identities]
        -> the linear with W' = diag(gamma) W, b' = gamma * b; the multiply is removed
           (DINOv2, CaiT, DeiT-III: attn.proj and mlp.fc2 before the residual add)
    LayerNorm affine before linears, every user of LN(x) = gamma * x_hat + beta an nn.Linear
        -> each linear with W' = W diag(gamma), b' = b + W beta; the LayerNorm keeps gamma = 1, beta = 0
           (attn.qkv and mlp.fc1; Hugging Face's query/key/value)

Why: the passes after it score, solve and refit weights on the scale at which they act. Unfolded, the OBS
error of a proj/fc2 row counts every output channel alike although the residual stream weights channel c by
gamma_c^2 (DINOv2's gammas span 1e-3 .. 10 within one layer), the reconstruction's damping (relative to the
mean Hessian diagonal) is set by the few input channels an LN affine inflates, and int8's per-token
quantization of X has to cover those inflated channels. Removing the multiply also lets the residual add fuse
into the layer's write-back (fuse_epilogues). A linear called from more than one place, or whose parameters
are shared, is left alone (folding would change its other uses).
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..frontend.patterns import is_inference_identity
from ..pass_manager import PassResult, compiler_pass
from ..state import CompileState

_MULS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
_LAYER_NORMS = (F.layer_norm, torch.ops.aten.layer_norm.default)


def _single_call_linears(gm: fx.GraphModule, attr_uses: Counter) -> dict[str, nn.Linear]:
    """nn.Linear modules called from exactly one node whose parameters are read nowhere else."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    uses = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
    return {name: m for name, m in gm.named_modules() if type(m) is nn.Linear and calls[name] == 1
            and all(uses[id(p)] == 1 for p in m.parameters())
            and not any(attr_uses[f"{name}.{p}"] for p, _ in m.named_parameters())}


def _parameter(node, params: dict, attr_uses: Counter) -> torch.Tensor | None:
    """The parameter a get_attr node reads, if that node is its only reader and has one user."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or attr_uses[node.target] != 1 or len(node.users) != 1:
        return None
    return params.get(node.target)


def _producing_linear(gm: fx.GraphModule, node: fx.Node, linears: dict) -> str | None:
    """The linear whose output reaches ``node`` through single-user inference identities, if any."""
    while True:
        if len(node.users) != 1:
            return None
        if node.op == "call_module" and node.target in linears:
            return node.target
        if not is_inference_identity(gm, node):
            return None
        node = node.args[0]


def _fold_layer_scales(gm: fx.GraphModule, linears: dict, params: dict, attr_uses: Counter) -> list[str]:
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MULS or len(node.args) != 2 or node.kwargs:
            continue
        for value, scale in (node.args, node.args[::-1]):
            gamma = _parameter(scale, params, attr_uses)
            name = _producing_linear(gm, value, linears) if isinstance(value, fx.Node) else None
            if gamma is None or name is None:
                continue
            linear = linears[name]
            if gamma.numel() != linear.out_features or gamma.shape[-1] != linear.out_features:
                continue  # not one scale per output channel
            with torch.no_grad():
                g = gamma.detach().reshape(-1).to(linear.weight.dtype)
                linear.weight.mul_(g[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(g)
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            gm.graph.erase_node(scale)
            folded.append(name)
            break
    return folded


def _affine(gm: fx.GraphModule, node: fx.Node, params: dict, attr_uses: Counter):
    """(gamma, beta or None) of a LayerNorm node whose affine this pass may rewrite, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
        if isinstance(module, nn.LayerNorm) and module.weight is not None and calls == 1:
            return module.weight, module.bias
        return None
    if node.op == "call_function" and node.target in _LAYER_NORMS:
        args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args)) | node.kwargs
        weight = _parameter(args.get("weight"), params, attr_uses)
        bias_node = args.get("bias")
        bias = _parameter(bias_node, params, attr_uses) if bias_node is not None else None
        if weight is not None and (bias_node is None or bias is not None):
            return weight, bias
    return None


def _reads_shape_only(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)) or (
        node.op == "call_method" and node.target in ("size", "dim"))


def _fold_norm_affines(gm: fx.GraphModule, linears: dict, params: dict, attr_uses: Counter) -> list[str]:
    folded = []
    for node in gm.graph.nodes:
        users = [u for u in node.users if not _reads_shape_only(u)]  # timm's Attention reads x.shape
        if not users or not all(u.op == "call_module" and u.target in linears and u.args[0] is node
                                and len(u.args) == 1 and not u.kwargs for u in users):
            continue
        affine = _affine(gm, node, params, attr_uses)
        if affine is None:
            continue
        gamma, beta = affine
        if gamma.dim() != 1 or any(linears[u.target].in_features != gamma.numel() for u in users):
            continue  # normalised over more than the channel dimension
        with torch.no_grad():
            for user in users:
                linear = linears[user.target]
                if beta is not None:
                    shift = linear.weight @ beta.to(linear.weight.dtype)
                    if linear.bias is None:
                        linear.bias = nn.Parameter(shift)
                    else:
                        linear.bias.add_(shift)
                linear.weight.mul_(gamma.to(linear.weight.dtype)[None, :])
                folded.append(user.target)
            gamma.fill_(1.0)
            if beta is not None:
                beta.zero_()
    return folded


@compiler_pass(requires=("graph",), provides=("folded_scales",), invariant="masked_outputs")
def fold_scales(gm: fx.GraphModule, state: CompileState) -> PassResult:
    if not state.options.fold_scales:
        return PassResult(gm, False, {"enabled": False})
    attr_uses = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    linears, params = _single_call_linears(gm, attr_uses), dict(gm.named_parameters())
    layer_scales = _fold_layer_scales(gm, linears, params, attr_uses)
    norm_affines = _fold_norm_affines(gm, linears, params, attr_uses)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    decisions = {"enabled": True, "layer_scale_into": layer_scales, "layer_norm_affine_into": norm_affines}
    return PassResult(gm, bool(layer_scales or norm_affines), decisions)
