"""Instruments the pass manager calls around every pass (MLIR's instrumentation model): nothing here is inside
a pass, and a pass never writes files or times itself.

:class:`PassTimer`       the pipeline's record: pass names, seconds, modified, dump folder
:class:`DumpWriter`      a numbered folder per pass, like ``--mlir-print-ir-after-all``:

    <dump_dir>/00-capture/graph.txt        the readable graph (GraphModule.print_readable) and its modules
    <dump_dir>/00-capture/decisions.json   what the pass saw and decided, with its wall time
    <dump_dir>/07-block_mask_solve/masks/<layer>.png   kept blocks (white) of each layer, for mask passes
    <dump_dir>/07-block_mask_solve/<figure>.png        figures a pass adds (e.g. distortion curves)
    <dump_dir>/passes.json                 the pipeline: pass names, times, dump folders

:class:`InvariantChecker`  with ``verify=True``: after every pass that declares an invariant, checks it on a
                         probe batch and raises :class:`~lpvit_compiler.pass_manager.PipelineError` naming the
                         pass and the deviation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .frontend.calibration import logits_of
from .pass_manager import PassContract, PassInstrument, PassResult, PipelineError
from .runtime.modules import InputQuantizedLinear
from .state import CompileState

HEATMAP_PIXELS_PER_BLOCK = 4
VERIFY_RTOL = 1e-4  # relative to the largest output magnitude
# int8: float rounding may move a quantized input across a rounding boundary (one step, 1/127 of its row's max),
# and dead-block elimination removes constant input columns that can set a token's int8 scale (a new grid)
VERIFY_RTOL_INT8 = 3e-2


def _to_json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=_to_json) + "\n")


def _readable(gm: fx.GraphModule) -> str:
    """The graph's code, then every module it calls with its shapes (the code shows only their names)."""
    lines = [gm.print_readable(print_output=False), "# Modules the graph calls:"]
    for node in gm.graph.nodes:
        if node.op == "call_module":
            lines.append(f"#   {node.target}: {' '.join(repr(gm.get_submodule(node.target)).split())}")
    return "\n".join(lines) + "\n"


def _safe_name(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)


class PassTimer(PassInstrument):
    def __init__(self, dump_dir: str | Path | None = None):
        self.dump_dir = dump_dir
        self.timings: list[dict] = []

    def after_pass(self, contract: PassContract, result: PassResult, seconds: float, state: CompileState) -> None:
        folder = f"{len(self.timings):02d}-{contract.name}"
        self.timings.append({"pass": contract.name, "seconds": round(seconds, 4), "modified": result.modified,
                             "dump": folder if self.dump_dir else None})


class DumpWriter(PassInstrument):
    def __init__(self, dump_dir: str | Path, timer: PassTimer):
        self.dump_dir = Path(dump_dir)
        self.timer = timer  # runs before this instrument: its last entry is the pass just finished

    def after_pass(self, contract: PassContract, result: PassResult, seconds: float, state: CompileState) -> None:
        out = self.dump_dir / self.timer.timings[-1]["dump"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "graph.txt").write_text(_readable(result.graph_module))
        write_json(out / "decisions.json", {"pass": contract.name, "seconds": seconds, "modified": result.modified,
                                            **result.decisions})
        if result.masks or result.figures:
            import matplotlib.pyplot as plt

            if result.masks:
                (out / "masks").mkdir(exist_ok=True)
            for layer, block_mask in result.masks.items():
                pixels = np.kron(block_mask.numpy().astype(np.uint8),
                                 np.ones((HEATMAP_PIXELS_PER_BLOCK, HEATMAP_PIXELS_PER_BLOCK), np.uint8))
                plt.imsave(out / "masks" / f"{_safe_name(layer)}.png", pixels, cmap="gray", vmin=0, vmax=1)
            for stem, make_figure in result.figures.items():
                figure = make_figure()
                figure.savefig(out / f"{stem}.png", dpi=100)
                plt.close(figure)
        write_json(self.dump_dir / "passes.json", self.timer.timings)


def masked_copy(gm: fx.GraphModule, state: CompileState) -> fx.GraphModule:
    """A copy of ``gm`` with every pruned layer's nn.Linear weight multiplied by its live mask, seen as it will
    run (``as_it_will_run``)."""
    masked = copy.deepcopy(gm)
    with torch.no_grad():
        for name, layer in state.layers.items():
            module = masked.get_submodule(name)
            if layer.block_mask is not None and type(module) is nn.Linear:
                module.weight.mul_(layer.live_mask())
    return as_it_will_run(masked, state)


def as_it_will_run(gm: fx.GraphModule, state: CompileState) -> fx.GraphModule:
    """``gm`` itself, or with quantize="int8" ``gm`` with each pruned layer still an nn.Linear wrapped to see its
    input quantized per token as the int8 kernel will (in place). Both sides of an invariant are compared in this
    form: a pass run before the layout rewrite leaves float layers, whose distance from a quantized reference
    is int8's own rounding, not the pass's doing."""
    if state.options.quantize == "int8":
        for name, layer in state.layers.items():
            module = gm.get_submodule(name)
            if layer.block_mask is not None and type(module) is nn.Linear:
                gm.set_submodule(name, InputQuantizedLinear(module))
    return gm


class InvariantChecker(PassInstrument):
    """Checks each pass's declared invariant on ``probe`` (a couple of calibration images)."""

    def __init__(self, probe: torch.Tensor):
        self.probe = probe
        self.reference: torch.Tensor | None = None

    def _outputs(self, gm: fx.GraphModule) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(gm(self.probe)).float()

    def before_pass(self, contract: PassContract, gm: fx.GraphModule | None, state: CompileState) -> None:
        self.reference = self._outputs(masked_copy(gm, state)) if contract.invariant == "masked_outputs" else None

    def after_pass(self, contract: PassContract, result: PassResult, seconds: float, state: CompileState) -> None:
        gm = result.graph_module
        if contract.invariant == "masked_outputs":
            got = self._outputs(as_it_will_run(copy.deepcopy(gm), state) if state.options.quantize == "int8" else gm)
            scale = float(self.reference.abs().max()) or 1.0
            error = float((got - self.reference).abs().max()) / scale if got.shape == self.reference.shape \
                else float("inf")
            tolerance = VERIFY_RTOL_INT8 if state.options.quantize == "int8" else VERIFY_RTOL
            if not error <= tolerance:
                raise PipelineError(f"pass {contract.name} broke its invariant: the graph no longer computes the "
                                    f"masked model (max deviation {error:.3g} of the output scale, tolerance "
                                    f"{tolerance:g})")
        elif contract.invariant == "zero_outside_masks":
            for name, layer in state.layers.items():
                module = gm.get_submodule(name)
                if layer.block_mask is not None and type(module) is nn.Linear and \
                        bool(module.weight.detach()[~layer.live_mask()].any()):
                    raise PipelineError(f"pass {contract.name} broke its invariant: layer '{name}' has nonzero "
                                        "weights outside its mask")
