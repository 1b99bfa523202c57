"""Dead-block elimination: shrink linear pairs A -> elementwise -> B (MLP fc1 -> GELU -> fc2) whose hidden units
the masks leave dead, keeping the model numerically identical to the masked one.

Input: graph with nn.Linear modules and per-layer ``block_mask``. Output: smaller nn.Linear modules for A and B,
``kept_rows`` of A and ``kept_cols`` of B (indices into the original weights), and B's bias updated; the layers'
shapes change, so the manager recomputes their costs after this pass.

A hidden unit j (row j of A, column j of B) is dead when
  * column j of B's masked weight is all zero: A's row j is computed for nothing — drop it from both; or
  * row j of A's masked weight is all zero: unit j is the constant h_j = act(b_A[j]) for every token, so
    B's output gets the constant  W_B[:, j] * h_j  — fold it into B's bias, then drop the unit:
        b_B <- b_B + W_B[:, J] @ act(b_A[J])      (J = dead rows of A whose column in B is alive).
The chain between A and B must be per-feature elementwise ops (activations, dropout, identity) with A's output
used only by it, so act can be evaluated on the bias vector alone.

Inside attention nothing is removed: dropping a row of qkv or a column of proj changes the head dimension,
which the graph's reshapes bake in; the BSR layout already skips those dead blocks.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..frontend.patterns import is_elementwise
from ..pass_manager import PassResult, compiler_pass
from ..runtime.modules import linear_from
from ..state import CompileState


def _is_linear(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and \
        isinstance(gm.get_submodule(node.target), nn.Linear)


def find_linear_chains(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node], fx.Node]]:
    """(A, elementwise nodes in order, B) for every linear B fed by linear A through elementwise ops only."""
    chains = []
    for b in gm.graph.nodes:
        if not _is_linear(gm, b):
            continue
        chain, node = [], b.args[0]
        while isinstance(node, fx.Node) and is_elementwise(gm, node):
            chain.append(node)
            node = node.args[0]
        if _is_linear(gm, node) and len(node.users) == 1:
            chains.append((node, chain[::-1], b))
    return chains


def _apply_chain(gm: fx.GraphModule, chain: list[fx.Node], value: torch.Tensor) -> torch.Tensor:
    for node in chain:
        if node.op == "call_module":
            value = gm.get_submodule(node.target)(value)
        else:
            value = node.target(value, *node.args[1:], **node.kwargs)
    return value


def _replace_linear(gm: fx.GraphModule, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    gm.set_submodule(name, linear_from(weight, bias, requires_grad=True))


@compiler_pass(requires=("masks", "masked_weights"), provides=("shrunk",), changes_costs=True,
               invariant="masked_outputs")
def dead_block_elimination(gm: fx.GraphModule, state: CompileState) -> PassResult:
    eliminated = []
    for a_node, chain, b_node in find_linear_chains(gm):
        a_layer, b_layer = state.layers.get(a_node.target), state.layers.get(b_node.target)
        if a_layer is None and b_layer is None:
            continue
        a, b = gm.get_submodule(a_node.target), gm.get_submodule(b_node.target)
        a_mask = a_layer.live_mask() if a_layer else torch.ones_like(a.weight, dtype=torch.bool)
        b_mask = b_layer.live_mask() if b_layer else torch.ones_like(b.weight, dtype=torch.bool)
        dead_rows, dead_cols = ~a_mask.any(1), ~b_mask.any(0)
        remove = dead_rows | dead_cols
        if not remove.any() or remove.all():
            continue
        fold = dead_rows & ~dead_cols
        b_weight = b.weight.detach() * b_mask
        with torch.no_grad():
            a_bias = a.bias[fold] if a.bias is not None else a.weight.new_zeros(int(fold.sum()))
            constant = b_weight[:, fold] @ _apply_chain(gm, chain, a_bias)
            b_bias = (b.bias.detach() if b.bias is not None else b.weight.new_zeros(b.out_features)) + constant
        keep = ~remove
        _replace_linear(gm, a_node.target, a.weight[keep], a.bias[keep] if a.bias is not None else None)
        _replace_linear(gm, b_node.target, b.weight[:, keep],
                        b_bias if (b.bias is not None or fold.any()) else None)
        keep_index = keep.nonzero().flatten()
        if a_layer:
            a_layer.kept_rows = keep_index if a_layer.kept_rows is None else a_layer.kept_rows[keep_index]
        if b_layer:
            b_layer.kept_cols = keep_index if b_layer.kept_cols is None else b_layer.kept_cols[keep_index]
        eliminated.append({"from": a_node.target, "to": b_node.target,
                           "via": [str(n.target) for n in chain], "hidden_units": int(remove.numel()),
                           "removed": int(remove.sum()), "dead_rows_of_from": int(dead_rows.sum()),
                           "dead_columns_of_to": int(dead_cols.sum()), "biases_folded": int(fold.sum())})
    gm.recompile()
    total = sum(e["removed"] for e in eliminated)
    state.hidden_units_removed = total
    decisions = {"pairs": eliminated, "hidden_units_removed": total,
                 "note": "attention layers are never shrunk (head shapes are baked into reshapes)"}
    masks = {name: layer.live_block_mask() for name, layer in state.layers.items()
             if layer.kept_rows is not None or layer.kept_cols is not None}
    return PassResult(gm, bool(eliminated), decisions, masks=masks)
