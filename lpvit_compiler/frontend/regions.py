"""Transformer blocks as regions of the graph: the nodes fx recorded under one numbered module.

``node.meta["nn_module_stack"]`` names the modules a node was traced in; the outermost whose last path component
is an index (``blocks.3``, ``encoder.layer.3``) is the node's block. Block recovery fits one region at a time;
token pruning gathers tokens at a region's input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

from ..state import LayerState

_NUMBERED = re.compile(r"^(.*\.)?\d+$")  # a module path whose last component is an index: blocks.3


@dataclass
class BlockRegion:
    """One transformer block as a contiguous run of graph nodes."""

    name: str  # module path, e.g. "blocks.3"
    nodes: list[fx.Node]  # in graph order
    inputs: list[fx.Node]  # values defined before the region that it reads (not parameters)
    outputs: list[fx.Node]  # region values read after it
    layers: list[str]  # the prunable linears inside

    def fitted(self) -> list[int]:
        """Indices of the outputs block recovery fits: all but the token-pruning scores (meta "token_score")."""
        return [i for i, node in enumerate(self.outputs) if not node.meta.get("token_score")]


def block_of(node: fx.Node) -> str | None:
    """The outermost numbered module the node was traced in, e.g. "blocks.3" for blocks.3.attn.qkv."""
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        path = entry[0] if isinstance(entry, tuple) else str(entry)
        if _NUMBERED.match(path):
            return path
    return None


def place_in_block_of(nodes, like: fx.Node) -> None:
    """Record ``nodes`` (inserted by a pass) as traced in the same modules as ``like``, so they stay in its block."""
    for node in nodes:
        if node is not None and "nn_module_stack" in like.meta:
            node.meta["nn_module_stack"] = like.meta["nn_module_stack"]


def block_regions(gm: fx.GraphModule, layers: dict[str, LayerState]) -> list[BlockRegion]:
    """The graph's numbered blocks that hold a prunable layer and are one contiguous run of nodes, in order."""
    nodes = list(gm.graph.nodes)
    members: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        block = block_of(node) if node.op != "get_attr" else None
        if block is not None:
            members.setdefault(block, []).append(i)
    regions = []
    for name, where in members.items():
        first, last = where[0], where[-1]
        run = [n for n in nodes[first:last + 1] if n.op != "get_attr"]
        if len(run) != len(where):  # interleaved with another block's nodes: not one region
            continue
        inside = set(run)
        inputs = list(dict.fromkeys(i for n in run for i in n.all_input_nodes
                                    if i not in inside and i.op != "get_attr"))
        outputs = [n for n in run if any(u not in inside for u in n.users)]
        prunable = [n.target for n in run if n.op == "call_module" and n.target in layers]
        if prunable and outputs and inputs:
            regions.append(BlockRegion(name, run, inputs, outputs, prunable))
    return regions


def last_readers(nodes) -> dict[fx.Node, fx.Node]:
    """Each value that ``nodes`` (in graph order) read, mapped to the last of them that reads it."""
    last = {}
    for node in nodes:
        for used in node.all_input_nodes:
            last[used] = node
    return last


def whole_model_region(gm: fx.GraphModule, layers: dict[str, LayerState]) -> BlockRegion:
    """The whole graph as one region: its inputs the graph's placeholders, its outputs the values it returns."""
    nodes = list(gm.graph.nodes)
    returned = next(n for n in nodes if n.op == "output").all_input_nodes
    run = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    inputs = [n for n in nodes if n.op == "placeholder"]
    prunable = [n.target for n in run if n.op == "call_module" and n.target in layers]
    return BlockRegion("model", run, inputs, list(dict.fromkeys(returned)), prunable)
