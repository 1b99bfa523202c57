"""Capture: nn.Module -> canonical torch.fx GraphModule.

Input: the user's model (never modified: it is deep-copied) and one example batch [B, C, H, W].
Output: a GraphModule whose every linear layer on a parameter is a ``call_module`` of an ``nn.Linear``
named as in the original model, and that reproduces the model's output on the example batch.

Capture tries ``torch.fx.symbolic_trace`` first (timm's no-trace modules/functions honoured, plus the user's
``leaf_modules``/``concrete_args``), then ``torch.export`` (Hugging Face models: transformers 5 has no fx
tracer), whose graph calls ``aten.linear``; those calls are turned back into ``nn.Linear`` modules so every
pass sees one form.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from .calibration import expected_input_shape, logits_of
from ..errors import CalibrationError, CaptureError

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
            exported = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},),
                                           strict=False)
            gm, method = exported.module(), "torch.export"
        except Exception as export_error:
            raise CaptureError(
                f"could not capture the model: torch.fx failed inside module '{fx_failure.module_name}' "
                f"({fx_failure.module_type}): {_first_line(fx_failure.error)}; torch.export failed too: "
                f"{_first_line(export_error)}. Fix: pass leaf_modules=[{fx_failure.module_type}] (or its name "
                f"'{fx_failure.module_name}') to keep that module opaque (its linears are then not pruned), or "
                "concrete_args={...} to fix the Python values its control flow depends on."
            ) from export_error
    _canonicalize_linears(gm)
    with torch.no_grad():
        captured = logits_of(gm(example))
    if captured.shape != reference.shape or not torch.allclose(captured, reference, rtol=1e-4, atol=1e-5):
        raise CaptureError(f"the graph captured by {method} does not reproduce the model's output "
                           f"(max abs difference {(captured - reference).abs().max().item():.3g}); mark the "
                           "module at fault as a leaf with leaf_modules=[...]")
    return gm, method
