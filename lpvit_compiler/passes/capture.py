"""Capture: the user's model -> the canonical GraphModule and the registry of prunable layers (pass 00).

Input: ``state.model`` (deep-copied, never modified), the first calibration batch, ``leaf_modules`` and
``concrete_args``. Output: a GraphModule in which every linear layer on a parameter is a ``call_module`` of an
``nn.Linear`` (frontend/capture.py; it reproduces the model on the batch), ``state.layers`` (one
:class:`~lpvit_compiler.state.LayerState` per prunable linear, frontend/selection.py), ``state.selection``
(why every linear is or is not pruned) and a report note for every layer too small to prune.
"""

from __future__ import annotations

from ..frontend.capture import capture as capture_graph
from ..frontend.selection import select_prunable_layers
from ..pass_manager import PassResult, compiler_pass
from ..state import CompileState


@compiler_pass(provides=("graph", "layers"))
def capture(gm: None, state: CompileState) -> PassResult:
    example = state.calibration[0]
    gm, state.capture_method = capture_graph(state.model, example, state.leaf_modules, state.concrete_args)
    state.layers, state.selection = select_prunable_layers(gm, state.options, example)
    state.notes.extend(f"{name}: {why}" for name, why in state.selection.items()
                       if why.startswith("smaller than one"))
    decisions = {"method": state.capture_method, "linear_layers": state.selection,
                 "options": state.options.to_dict()}
    return PassResult(gm, True, decisions)
