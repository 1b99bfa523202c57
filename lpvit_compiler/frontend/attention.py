"""Attention inside a transformer block, as the token and head passes see it.

``attention_site`` finds a block's one attention op — ``F.scaled_dot_product_attention``, an explicit softmax
over the keys, or probabilities already exposed by an earlier pass — and ``expose_probabilities`` makes its
probabilities A [B, H, N, N] a graph value (SDPA becomes softmax(q k^T * scale) @ v: the same function).
``drop_constant_masks`` removes attention masks that mask nothing (Hugging Face's, under torch.export).
``record`` runs the graph on images and returns the values of given nodes.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.nn import functional as F

from ..tokens import attention_probabilities
from .regions import BlockRegion, place_in_block_of

SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)


class UnsupportedModel(Exception):
    """A token or head rewrite would change what the model computes (the message says why)."""


def _is_softmax_over_keys(node: fx.Node) -> bool:
    if not ((node.op == "call_method" and node.target == "softmax")
            or (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS)):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    shape = tensor_shape(node.args[0])
    return shape is not None and len(shape) == 4 and dim in (-1, 3)


def tensor_shape(node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a node's value (None where it is not a tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def attention_site(region: BlockRegion) -> fx.Node:
    """The block's one attention op (raises UnsupportedModel for none or several)."""
    sites = [n for n in region.nodes if (n.op == "call_function" and n.target in (*SDPA, attention_probabilities))
             or _is_softmax_over_keys(n)]
    if len(sites) != 1:
        raise UnsupportedModel(f"block {region.name} holds {len(sites)} attention ops (one expected)")
    return sites[0]


def _default(value):
    """A graph input left at its default (timm's attn_mask=None, is_causal=False) as that default."""
    if isinstance(value, fx.Node) and value.op == "placeholder":
        return value.args[0] if value.args else value
    return value


def expose_probabilities(gm: fx.GraphModule, site: fx.Node) -> fx.Node:
    """The node holding the attention's probabilities; an SDPA call is rewritten to compute them explicitly."""
    if site.op == "call_function" and site.target in SDPA:
        q, k, v = site.args[:3]
        extra = {key: _default(value) for key, value in
                 (dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), site.args[3:])) | site.kwargs).items()}
        if extra.get("attn_mask") is not None or extra.get("is_causal") or extra.get("dropout_p", 0.0):
            raise UnsupportedModel(f"{site.name}: attention with a mask, causal or with dropout")
        scale = extra.get("scale") or tensor_shape(q)[-1] ** -0.5
        with gm.graph.inserting_before(site):
            probabilities = gm.graph.call_function(attention_probabilities, (q, k, float(scale)))
            output = gm.graph.call_function(operator.matmul, (probabilities, v))
        place_in_block_of((probabilities, output), site)
        site.replace_all_uses_with(output)
        gm.graph.erase_node(site)
        return probabilities
    return site


def _from_shapes_only(node: fx.Node) -> bool:
    """The value depends on no input's values: every path to a graph input passes through a size query."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op in ("placeholder", "call_module"):
            return False
        if current.op == "call_function" and current.target is torch.ops.aten.sym_size.int:
            continue
        todo.extend(current.all_input_nodes)
    return True


def drop_constant_masks(gm: fx.GraphModule, example: torch.Tensor) -> int:
    """Remove SDPA masks that let every query see every key whatever the input — built from shapes only and
    all true (or all zero, an additive mask) on ``example`` — as Hugging Face's ``create_bidirectional_mask``
    builds under torch.export: an [B, 1, N, N] tensor that would no longer fit once tokens are dropped, and
    that computes nothing. Returns how many attention calls lost their mask."""
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA and len(n.args) > 3
             and isinstance(n.args[3], fx.Node)]
    masks = list(dict.fromkeys(n.args[3] for n in sites if _from_shapes_only(n.args[3])))
    trivial = {mask for mask, value in zip(masks, record(gm, masks, example) if masks else [])
               if bool((value if value.dtype == torch.bool else value == 0).all())}
    for site in sites:
        if site.args[3] in trivial:
            site.args = (*site.args[:3], None, *site.args[4:])
    if trivial:
        gm.graph.eliminate_dead_code()  # the masks and what only they used
        gm.recompile()
    return sum(site.args[3] is None for site in sites)


def record(gm: fx.GraphModule, nodes: list[fx.Node], images: torch.Tensor) -> list[torch.Tensor]:
    """The values ``nodes`` take when the graph runs on ``images`` (no gradients)."""
    wanted = {node: i for i, node in enumerate(nodes)}
    found: list = [None] * len(nodes)

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in wanted:
                found[wanted[node]] = value.detach()
            return value

    with torch.no_grad():
        Recorder(gm).run(images)
    return found
