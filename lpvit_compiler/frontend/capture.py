"""Capture: nn.Module -> canonical torch.fx GraphModule.

Input: the user's model (never modified: it is deep-copied) and one example batch [B, C, H, W].
Output: a GraphModule whose every linear layer on a parameter — including 1x1 convolutions, linear over each
pixel's channels — is a ``call_module`` of an ``nn.Linear`` named as in the original model, and that
reproduces the model's output on the example batch.

Capture tries ``torch.fx.symbolic_trace`` first (timm's no-trace modules/functions honoured, plus the user's
``leaf_modules``/``concrete_args``), then ``torch.export`` (Hugging Face models: transformers 5 has no fx
tracer), whose graph calls ``aten.linear``; those calls are turned back into ``nn.Linear`` modules so every
pass sees one form. Where fx had to keep a timm block opaque although it holds linears (TinyViT's windowed
attention), torch.export is tried too and used when it reproduces the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from .calibration import expected_input_shape, logits_of
from ..errors import CalibrationError, CaptureError
from .patterns import is_elementwise

LINEAR_FUNCTIONS = (torch.nn.functional.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


class _LeafTracer(fx.Tracer):
    """fx tracer keeping timm's no-trace modules and the user's leaf modules opaque.

    fx's own ``module_stack`` is left holding the modules being traced when tracing fails: the culprit.
    """

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str], autowrap: tuple):
        super().__init__(autowrap_functions=autowrap)
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or qualname in self.leaf_names or super().is_leaf_module(m, qualname)


def _trace_fx(model: nn.Module, leaf_modules: Sequence, concrete_args) -> fx.GraphModule:
    timm_leaves, autowrap = _timm_notrace()
    user_types = tuple(m for m in leaf_modules if isinstance(m, type))
    user_names = frozenset(m for m in leaf_modules if isinstance(m, str))
    tracer = _LeafTracer(timm_leaves + user_types, user_names, autowrap)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as e:
        stack = list(tracer.module_stack.values())
        name, module_type = stack[-1] if stack else ("", type(model))
        raise _FxFailure(e, name or "<top level>", getattr(module_type, "__name__", str(module_type))) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _FxFailure(Exception):
    def __init__(self, error: Exception, module_name: str, module_type: str):
        super().__init__(str(error))
        self.error, self.module_name, self.module_type = error, module_name, module_type


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _canonicalize_linears(gm: fx.GraphModule) -> None:
    """Turn functional linear calls on a module's own weight/bias into call_module nn.Linear."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, weight, bias = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
            continue
        owner_name = weight.target.rsplit(".", 1)[0]
        if bias is not None and not (isinstance(bias, fx.Node) and bias.target == f"{owner_name}.bias"):
            continue
        owner = gm.get_submodule(owner_name)
        own_params = {n for n, _ in owner.named_parameters(recurse=False)}
        if len(weight.users) != 1 or any(True for _ in owner.children()) or \
                own_params != ({"weight", "bias"} if bias is not None else {"weight"}):
            continue
        linear = nn.Linear(owner.weight.shape[1], owner.weight.shape[0], bias=bias is not None)
        linear.weight = owner.weight
        if bias is not None:
            linear.bias = owner.bias
        gm.set_submodule(owner_name, linear)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner_name, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def capture(model: nn.Module, example: torch.Tensor, leaf_modules: Sequence = (), concrete_args=None
            ) -> tuple[fx.GraphModule, str]:
    """Capture ``model`` as a canonical GraphModule. Returns (graph module, "torch.fx" or "torch.export")."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    batch_shape = tuple(example.shape)
    example = example[:2]  # two images: enough to check the graph, and a batch dim torch.export keeps dynamic
    try:
        with torch.no_grad():
            reference = logits_of(model(example))
    except CalibrationError:
        raise
    except Exception as e:
        raise CalibrationError(
            f"the model fails on a calibration batch of shape {batch_shape} ({_first_line(e)}); "
            f"it expects images {expected_input_shape(model)}"
        ) from e

    try:
        gm, method = _trace_fx(model, leaf_modules, concrete_args), "torch.fx"
    except _FxFailure as fx_failure:
        try:
            gm, method = _export(model, example), "torch.export"
        except Exception as export_error:
            raise CaptureError(
                f"could not capture the model: torch.fx failed inside module '{fx_failure.module_name}' "
                f"({fx_failure.module_type}): {_first_line(fx_failure.error)}; torch.export failed too: "
                f"{_first_line(export_error)}. Fix: pass leaf_modules=[{fx_failure.module_type}] (or its name "
                f"'{fx_failure.module_name}') to keep that module opaque (its linears are then not pruned), or "
                "concrete_args={...} to fix the Python values its control flow depends on."
            ) from export_error
    _canonicalize(gm)
    error = _deviation(gm, example, reference)
    if error is not None:
        raise CaptureError(f"the graph captured by {method} does not reproduce the model's output "
                           f"({error}); mark the module at fault as a leaf with leaf_modules=[...]")
    if method == "torch.fx" and _hidden_linears(gm, leaf_modules):
        # timm keeps some blocks opaque to fx (shape-dependent control flow, e.g. TinyViT's windows);
        # torch.export traces them with concrete shapes, so their linears become prunable too
        try:
            exported = _export(model, example)
            _canonicalize(exported)
            if _deviation(exported, example, reference) is None:
                gm, method = exported, "torch.export"
        except Exception:  # keep the fx graph: those blocks' linears stay dense
            pass
    return gm, method


def _export(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    return exported.module()


def _canonicalize(gm: fx.GraphModule) -> None:
    _canonicalize_linears(gm)
    _canonicalize_pointwise_convs(gm)


def _deviation(gm: fx.GraphModule, example: torch.Tensor, reference: torch.Tensor) -> str | None:
    """None when ``gm`` reproduces ``reference`` on ``example``, else what differs."""
    with torch.no_grad():
        captured = logits_of(gm(example))
    if captured.shape != reference.shape:
        return f"output shape {tuple(captured.shape)} instead of {tuple(reference.shape)}"
    if not torch.allclose(captured, reference, rtol=1e-4, atol=1e-5):
        return f"max abs difference {(captured - reference).abs().max().item():.3g}"
    return None


def _hidden_linears(gm: fx.GraphModule, user_leaves: Sequence) -> list[str]:
    """Modules fx kept opaque, not at the user's request, that hold linear layers."""
    hidden = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        user_leaf = node.target in user_leaves or any(isinstance(t, type) and isinstance(module, t)
                                                      for t in user_leaves)
        if not user_leaf and not isinstance(module, nn.Linear) and \
                any(isinstance(m, nn.Linear) for m in module.modules()):
            hidden.append(node.target)
    return hidden


def _is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1) and \
        module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1


def _canonicalize_pointwise_convs(gm: fx.GraphModule) -> None:
    """A 1x1 convolution is a linear layer over each pixel's channels: conv(x) = linear(x.permute(0, 2, 3, 1))
    .permute(0, 3, 1, 2). Rewrite it so (an nn.Linear of the same name); then drop permute pairs that only
    enclose per-element ops (fc1 -> GELU -> fc2 becomes linear -> GELU -> linear, as in a ViT MLP)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_pointwise_conv(conv := gm.get_submodule(node.target)) or \
                len(node.args) != 1 or node.kwargs:
            continue
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        linear.weight = nn.Parameter(conv.weight.detach()[:, :, 0, 0].clone(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias = conv.bias
        gm.set_submodule(node.target, linear)
        with gm.graph.inserting_before(node):
            channels_last = gm.graph.call_method("permute", (node.args[0], *CHANNELS_LAST))
            call = gm.graph.call_module(node.target, (channels_last,))
            channels_first = gm.graph.call_method("permute", (call, *CHANNELS_FIRST))
        node.replace_all_uses_with(channels_first)
        gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if _is_permute(node, CHANNELS_LAST):
            _cancel_permute_pair(gm, node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


CHANNELS_LAST, CHANNELS_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)


def _is_permute(node, dims: tuple[int, ...]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "permute" and \
        tuple(node.args[1:]) == dims and not node.kwargs


def _cancel_permute_pair(gm: fx.GraphModule, to_last: fx.Node) -> None:
    """permute(0,3,1,2) -> elementwise ops -> permute(0,2,3,1): run the ops channels-last, drop both permutes."""
    chain, value = [], to_last.args[0]
    while isinstance(value, fx.Node) and is_elementwise(gm, value):
        chain.append(value)
        value = value.args[0]
    if not _is_permute(value, CHANNELS_FIRST) or len(value.users) != 1:
        return
    source = value.args[0]
    if chain:
        chain[-1].replace_input_with(value, source)
    to_last.replace_all_uses_with(chain[0] if chain else source)
