"""Layer selection: which linear layers of a captured graph are pruned, and why the others are not.

Input: the canonical GraphModule (frontend/capture.py), the options and one example batch.
Output: a :class:`~lpvit_compiler.state.LayerState` per prunable linear and, for every linear, the reason it is
or is not pruned. Left dense: layers called more than once (shared weights), classifier heads (unless
``prune_heads``), layers not in ``layers=[...]``, and layers smaller than one block in either dimension
(nothing to gain, and a note in the report says so).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..blocks import BlockGrid
from ..errors import ConfigError
from ..options import CompileOptions
from ..state import LayerState


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]


def _head_names(gm: fx.GraphModule, linears: list[fx.Node], example: torch.Tensor) -> set[str]:
    """Classifier heads: linears on pooled features ([batch, features] input) that feed no other linear.

    Both conditions matter: a headless model's last fc2 feeds no linear either, but it sees every token.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(example[:2])
    linear_set = set(linears)
    feeds_linear: dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        feeds_linear[node] = any(user in linear_set or feeds_linear.get(user, False) for user in node.users)
    heads = set()
    for node in linears:
        meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
        if not feeds_linear[node] and meta is not None and len(meta.shape) == 2:
            heads.add(node.target)
    return heads


def select_prunable_layers(gm: fx.GraphModule, options: CompileOptions, example: torch.Tensor
                           ) -> tuple[dict[str, LayerState], dict]:
    """The layers to prune, and a record of why each linear was or was not chosen."""
    linears = linear_nodes(gm)
    if not linears:
        raise ConfigError("the model has no nn.Linear layer (or linear call on a parameter) to prune; "
                          "lpvit-compiler prunes the linear layers of transformer blocks")
    calls: dict[str, int] = {}
    for n in linears:
        calls[n.target] = calls.get(n.target, 0) + 1
    heads = _head_names(gm, linears, example)
    if options.layers is not None:
        unknown = [name for name in options.layers if name not in calls]
        if unknown:
            raise ConfigError(f"layers={list(unknown)} are not linear layers of the model; linear layers are: "
                              f"{', '.join(list(calls)[:8])}{', ...' if len(calls) > 8 else ''}")
    decisions: dict[str, str] = {}
    layers: dict[str, LayerState] = {}
    for name, count in calls.items():
        if options.layers is not None and name not in options.layers:
            decisions[name] = "not in layers="
        elif count > 1:
            decisions[name] = f"called {count} times (shared weights); left dense"
        elif options.layers is None and name in heads and not options.prune_heads:
            decisions[name] = "classifier head; left dense (prune_heads=True to prune it)"
        else:
            weight = gm.get_submodule(name).weight
            bh, bw = options.block_shape
            if bh > weight.shape[0] or bw > weight.shape[1]:
                decisions[name] = (f"smaller than one {bh}x{bw} block ({weight.shape[0]}x{weight.shape[1]}); left "
                                   "dense")
            else:
                layers[name] = LayerState(name, BlockGrid(weight.shape[0], weight.shape[1], options.block_shape))
                decisions[name] = "pruned"
    if not layers:
        raise ConfigError("no linear layer is left to prune (only classifier heads, shared layers or layers smaller "
                          f"than one {options.block_shape[0]}x{options.block_shape[1]} block were found); pass "
                          "prune_heads=True, layers=[...] or a smaller block_shape")
    return layers, decisions
