"""Graph patterns shared by the front end and the passes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish, nn.LeakyReLU,
                       nn.ELU, nn.Dropout, nn.Identity)
ELEMENTWISE_FUNCTIONS = {F.gelu, F.relu, F.silu, F.dropout, torch.relu, torch.tanh, torch.sigmoid,
                         torch.ops.aten.gelu.default, torch.ops.aten.relu.default, torch.ops.aten.silu.default,
                         torch.ops.aten.dropout.default, torch.ops.aten.tanh.default, torch.ops.aten.sigmoid.default}


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node that reads ``node``'s value, or None where none or several do."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A per-element op (activation, dropout, identity) of one tensor, with a single user."""
    if len(node.users) != 1 or any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ELEMENTWISE_MODULES)
    return node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS


def is_inference_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """nn.Identity, or a dropout / drop-path module with rate 0 (a nonzero rate is kept for fine-tuning)."""
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.Identity):
        return True
    rate = getattr(module, "p", getattr(module, "drop_prob", None))  # nn.Dropout*, timm DropPath
    return type(module).__name__ in ("Dropout", "DropPath") and rate == 0
