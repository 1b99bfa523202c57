"""Pass infrastructure, after torch.fx.passes.infra and MLIR's pass manager.

A pass is a plain function ``(GraphModule, CompileContext) -> PassResult`` named by its ``__name__``. The
manager runs the passes in order, checks each result (a linted GraphModule), times them and — when a dump
directory is set — writes a numbered dump after each, like ``--mlir-print-ir-after-all``:

    <dump_dir>/00-capture/graph.txt        the readable graph (GraphModule.print_readable) and its modules
    <dump_dir>/00-capture/decisions.json   what the pass saw and decided, with its wall time
    <dump_dir>/03-block_mask_solve/masks/<layer>.png   kept blocks (white) of each layer, for mask passes
    <dump_dir>/03-block_mask_solve/<figure>.png        figures a pass adds (e.g. distortion curves)
    <dump_dir>/passes.json                 the pipeline: pass names, times, dump folders
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx

from .state import CompileContext

HEATMAP_PIXELS_PER_BLOCK = 4


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    decisions: dict  # JSON-serialisable record of what the pass saw and decided
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> block mask, drawn as heatmaps
    figures: dict[str, Callable] = field(default_factory=dict)  # file stem -> () -> matplotlib Figure


CompilerPass = Callable[[fx.GraphModule, CompileContext], PassResult]


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


class PassManager:
    def __init__(self, passes: Sequence[CompilerPass], dump_dir: str | Path | None = None):
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.timings: list[dict] = []

    def record(self, name: str, result: PassResult, seconds: float) -> None:
        """Check a pass's result, note its time and dump it."""
        if not isinstance(result, PassResult) or not isinstance(result.graph_module, fx.GraphModule):
            raise TypeError(f"pass {name} must return a PassResult holding a GraphModule")
        result.graph_module.graph.lint()
        index = len(self.timings)
        folder = f"{index:02d}-{name}"
        self.timings.append({"pass": name, "seconds": round(seconds, 4), "modified": result.modified,
                             "dump": folder if self.dump_dir else None})
        if self.dump_dir is None:
            return
        out = self.dump_dir / folder
        out.mkdir(parents=True, exist_ok=True)
        (out / "graph.txt").write_text(_readable(result.graph_module))
        write_json(out / "decisions.json", {"pass": name, "seconds": seconds, "modified": result.modified,
                                            **result.decisions})
        if result.masks:
            import matplotlib.pyplot as plt

            (out / "masks").mkdir(exist_ok=True)
            for layer, block_mask in result.masks.items():
                pixels = np.kron(block_mask.numpy().astype(np.uint8),
                                 np.ones((HEATMAP_PIXELS_PER_BLOCK, HEATMAP_PIXELS_PER_BLOCK), np.uint8))
                plt.imsave(out / "masks" / f"{_safe_name(layer)}.png", pixels, cmap="gray", vmin=0, vmax=1)
        for stem, make_figure in result.figures.items():
            import matplotlib.pyplot as plt

            figure = make_figure()
            figure.savefig(out / f"{stem}.png", dpi=100)
            plt.close(figure)
        write_json(self.dump_dir / "passes.json", self.timings)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        for compiler_pass in self.passes:
            start = time.perf_counter()
            result = compiler_pass(gm, ctx)
            self.record(compiler_pass.__name__, result, time.perf_counter() - start)
            gm = result.graph_module
        return gm
