"""Epilogue fusion: fold the activation after a block-sparse layer, and the residual add after it, into the
layer's write-back.

Input: graph after the layout rewrite, BlockSparseLinear modules called as ``y = layer(x)``. Output: the same
graph where, for each such layer,

    layer(x) -> [identity*] -> act -> [identity*] -> add(., r)      becomes      layer(x, r)  with activation=act
    y = act(x W^T + b) + r       (act in ops.ACTIVATIONS; r a tensor of exactly y's shape, no broadcasting)

"identity" is what is the identity in inference: nn.Identity, and dropout / drop-path with probability 0 (a
nonzero rate is kept, so a later fine-tune still sees it). A step is folded only when the value has no other
user, so nothing else ever reads the unfused intermediate. Each fusion saves a full pass over the layer's
output in the runtime (onnxruntime runs GELU as five element-wise ops; the residual add as one more).

Each fused layer's ``LayerState.epilogue`` (and so the report's layout column) says what it took, e.g.
``gelu+residual``. Shapes come from one fx ShapeProp run on two calibration images (batch 2, so a
batch-broadcast residual never looks like an exact match).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import first_line
from ..frontend.attention import tensor_shape
from ..frontend.patterns import is_inference_identity, only_user
from ..pass_manager import PassResult, compiler_pass
from ..runtime.modules import BlockSparseLinear
from ..state import CompileState

_ADDS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
_GELUS = (torch.nn.functional.gelu, torch.ops.aten.gelu.default)
_RELUS = (torch.nn.functional.relu, torch.relu, torch.ops.aten.relu.default)


def _activation(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The ops.ACTIVATIONS name ``node`` computes on its single input, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.GELU:
            return "gelu_tanh" if module.approximate == "tanh" else "gelu"
        return "relu" if type(module) is nn.ReLU else None
    if node.op == "call_function" and len(node.args) == 1:
        if node.target in _GELUS and set(node.kwargs) <= {"approximate"}:
            return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
        if node.target in _RELUS and not node.kwargs:
            return "relu"
    return None


def _skip_identities(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node | None, list[fx.Node]]:
    """Follow single-user identities from ``node``: (the first non-identity user or None, identities passed)."""
    passed = []
    user = only_user(node)
    while user is not None and is_inference_identity(gm, user):
        passed.append(user)
        user = only_user(user)
    return user, passed


def _residual_operand(add: fx.Node, value: fx.Node) -> fx.Node | None:
    """The other operand of ``add`` when it adds a tensor of exactly ``value``'s shape, else None."""
    if add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is value else add.args[0] if add.args[1] is value else None
    shape = tensor_shape(other)
    if not isinstance(other, fx.Node) or other is value or shape is None or shape != tensor_shape(value):
        return None
    return other


def _fold(gm: fx.GraphModule, linear: fx.Node, last: fx.Node, dead: list[fx.Node]) -> None:
    """Make ``linear`` stand for ``last``: its users read ``linear``, and the folded nodes are erased."""
    last.replace_all_uses_with(linear)
    for node in reversed(dead):
        gm.graph.erase_node(node)


@compiler_pass(requires=("layout",), provides=("epilogues",), invariant="masked_outputs")
def fuse_epilogues(gm: fx.GraphModule, state: CompileState) -> PassResult:
    if not state.options.fuse_epilogues:
        return PassResult(gm, False, {"enabled": False})
    for node in gm.graph.nodes:  # shapes an earlier pass recorded may come from another batch size
        node.meta.pop("tensor_meta", None)
    first = state.calibration[0]
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.cat([first, first])[:2])
    except Exception as error:  # noqa: BLE001 (any failure only means no shapes: residual adds stay unfused)
        state.notes.append(f"fuse_epilogues: shapes could not be propagated ({first_line(error)}); activations "
                           "were fused, residual adds were not")
    fused = {}
    for linear in list(gm.graph.nodes):
        if linear.op != "call_module" or not isinstance(gm.get_submodule(linear.target), BlockSparseLinear) or \
                len(linear.args) != 1 or linear.kwargs:
            continue
        module = gm.get_submodule(linear.target)
        epilogue = []
        user, passed = _skip_identities(linear, gm)
        activation = _activation(user, gm) if user is not None else None
        if activation is not None:
            module.activation = activation
            _fold(gm, linear, user, passed + [user])
            linear.meta["tensor_meta"] = user.meta.get("tensor_meta")
            epilogue.append(activation)
            user, passed = _skip_identities(linear, gm)
        residual = _residual_operand(user, passed[-1] if passed else linear) if user is not None else None
        if residual is not None:
            user.prepend(linear)  # the residual may be computed after the layer: run the layer where the add was
            linear.args = (linear.args[0], residual)
            _fold(gm, linear, user, passed + [user])
            epilogue.append("residual")
        if epilogue:
            fused[str(linear.target)] = epilogue
            state.layers[str(linear.target)].epilogue = "+".join(epilogue)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(fused), {"enabled": True, "fused": fused})
