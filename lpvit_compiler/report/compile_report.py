"""The compile report: per-layer table and budget summary, immutable once compile returns; prints as a table,
converts to dict/JSON and HTML.

Measurements taken after compiling (``lpvit compile --bench``/``--eval``, :func:`~lpvit_compiler.tools.bench.
measure_layers`) never change a report: they are a separate :class:`Measurements` record, attached with
:meth:`Report.with_measurements`, which returns a new report. The console caption and the HTML summary table
both show the lines of one formatter (summary.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table

from ..blocks import pack_mask
from ..linalg import gemm_backend
from ..state import CompileState
from .summary import summary_items

CURVE_POINTS = 101  # LPViT samples its curves at 101 ratios too


@dataclass(frozen=True)
class LayerRow:
    name: str
    weight_shape: list[int]  # [out_features, in_features] in the original model
    block_shape: list[int]
    blocks: int
    kept_blocks: int
    keep_ratio: float
    tokens: int
    flops_dense: float  # per image
    flops_kept: float
    distortion: float  # the criterion's estimate at the chosen operating point
    latency_dense_us: float  # predicted for the original dense layer, per inference of hw.batch_size images
    latency_predicted_us: float  # predicted for the layer as compiled (its shape after elimination, its layout)
    energy_dense_mj: float
    energy_predicted_mj: float
    rows_removed: int  # by dead-block elimination
    cols_removed: int
    nnz_blocks: int  # blocks stored in the BSR layout
    layout: str  # "bsr", "bsr-int8", or "dense" (masked dense GEMM: the kernel would not be faster at this density)
    epilogue: str = ""  # fused into the block-sparse layer's write-back, e.g. "gelu+residual"
    # the distortion curve sampled at CURVE_POINTS keep ratios, for plots (the solve used every block count)
    curve_keep_ratio: list[float] = field(default_factory=list)
    curve_distortion: list[float] = field(default_factory=list)
    block_mask: str = ""  # blocks.pack_mask of the [block_rows, block_cols] mask, True = kept

    @property
    def layout_and_epilogue(self) -> str:
        """``bsr``, ``dense`` or e.g. ``bsr+gelu+residual``: the layout and what was fused into it."""
        return f"{self.layout}+{self.epilogue}" if self.epilogue else self.layout

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (-(-self.weight_shape[0] // self.block_shape[0]), -(-self.weight_shape[1] // self.block_shape[1]))


@dataclass(frozen=True)
class LayerMeasurement:
    """One layer timed in onnxruntime as it runs after export, next to a dense layer of its original shape."""

    latency_us: float
    dense_latency_us: float


@dataclass(frozen=True)
class Measurements:
    """What was measured after compiling; empty until attached."""

    end_to_end: dict = field(default_factory=dict)  # bench.compare_sessions result + "threads"
    layers: dict[str, LayerMeasurement] = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)  # data, images, dense, compiled (top-1)

    @classmethod
    def from_dict(cls, data: dict) -> "Measurements":
        return cls(end_to_end=data.get("end_to_end", {}), accuracy=data.get("accuracy", {}),
                   layers={name: LayerMeasurement(**m) for name, m in data.get("layers", {}).items()})


@dataclass(frozen=True)
class Report:
    hw: str
    importance: str
    budget: str
    budget_target: float
    summary: dict  # the solve's outcome, the model's costs, what elimination and layout did (JSON values)
    layers: list[LayerRow]
    passes: list[dict] = field(default_factory=list)
    hw_profile: dict = field(default_factory=dict)  # HardwareProfile.to_dict(), incl. how it was calibrated
    notes: list[str] = field(default_factory=list)  # decisions a user should know about (small layers left dense)
    measurements: Measurements = field(default_factory=Measurements)
    token_stages: list[dict] = field(default_factory=list)  # token pruning: state.TokenStage per stage, in order
    heads_kept: dict[str, list[int]] = field(default_factory=dict)  # head pruning: block -> kept head indices

    @property
    def flops_keep_achieved(self) -> float:
        return self.summary["flops_keep_achieved"]

    def with_measurements(self, **changes) -> "Report":
        """A copy with ``changes`` (end_to_end=, layers=, accuracy=) merged into its measurements."""
        return dataclasses.replace(self, measurements=dataclasses.replace(self.measurements, **changes))

    def latency_error(self) -> float | None:
        """Median |predicted - measured| / measured of the per-layer latencies, where they were measured."""
        measured = self.measurements.layers
        errors = [abs(r.latency_predicted_us - measured[r.name].latency_us) / measured[r.name].latency_us
                  for r in self.layers if r.name in measured]
        return float(np.median(errors)) if errors else None

    @classmethod
    def from_state(cls, state: CompileState, passes: list[dict]) -> "Report":
        hw = state.options.hw
        rows = []
        for layer in state.layers.values():
            k = layer.pruned_blocks
            curve_k = np.unique(np.round(np.linspace(0, layer.num_blocks, CURVE_POINTS)).astype(int))
            original = layer.curves.dense
            sparse = layer.layout == "bsr"
            rows.append(LayerRow(
                name=layer.name,
                weight_shape=[layer.out_features, layer.in_features],
                block_shape=list(layer.grid.block_shape),
                blocks=layer.num_blocks,
                kept_blocks=layer.num_blocks - k,
                keep_ratio=1 - k / layer.num_blocks,
                tokens=layer.tokens,
                flops_dense=float(layer.curves.flops[0]),
                flops_kept=float(layer.curves.flops[k]),
                distortion=float(layer.distortion[k]),
                latency_dense_us=original.dense_latency_s * 1e6,
                latency_predicted_us=layer.costs.latency(sparse) * 1e6,
                energy_dense_mj=original.dense_energy_j * 1e3,
                energy_predicted_mj=layer.costs.energy(sparse) * 1e3,
                rows_removed=layer.out_features - layer.shape[0],
                cols_removed=layer.in_features - layer.shape[1],
                nnz_blocks=layer.nnz_blocks,
                layout=layer.layout + ("-int8" if state.options.quantize == "int8" else ""),
                epilogue=layer.epilogue,
                curve_keep_ratio=(1 - curve_k / layer.num_blocks).tolist(),
                curve_distortion=layer.distortion[curve_k].astype(float).tolist(),
                block_mask=pack_mask(layer.block_mask),
            ))
        model = state.model_costs
        latency, energy = state.predicted_latency_s(), state.predicted_energy_j()
        summary = {**dataclasses.asdict(model), **dataclasses.asdict(state.solve),
                   "budget": state.options.budget, "budget_target": state.options.budget_target,
                   "hidden_units_removed": state.hidden_units_removed,
                   "flops_keep_executed": state.flops_keep_executed,
                   "compiled_latency_s": latency, "compiled_speedup": model.dense_latency_s / latency,
                   "compiled_energy_ratio": energy / model.dense_energy_j,
                   "compile_gemm": gemm_backend()}
        opts = state.options
        if opts.quantize:
            summary["quantize"] = f"{opts.quantize} ({'GPTQ' if opts.gptq else 'round to nearest'} weights, " \
                                  "per-token activations)"
        return cls(hw=hw.name, importance=opts.importance, budget=opts.budget, budget_target=opts.budget_target,
                   summary=summary, layers=rows, passes=passes, hw_profile=hw.to_dict(), notes=list(state.notes),
                   token_stages=[dataclasses.asdict(stage) for stage in state.token_stages],
                   heads_kept=dict(state.heads_kept))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        return cls(**{**data, "layers": [LayerRow(**row) for row in data["layers"]],
                      "measurements": Measurements.from_dict(data.get("measurements", {}))})

    def to_html(self, path):
        """Write the report as one self-contained HTML file (figures inlined); returns the path."""
        from .html import write_html

        return write_html(self, path)

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def __rich__(self) -> Table:
        caption = " | ".join(f"{label}: {value}" for label, value in summary_items(self))
        table = Table(title=f"lpvit compile report — {self.importance} importance, hw={self.hw}", caption=caption)
        measured = self.measurements.layers
        columns = ["layer", "shape", "block", "layout", "kept/blocks", "keep", "distortion", "MFLOPs dense→kept",
                   "latency µs dense→pred", "energy mJ dense→pred", "rows/cols removed"]
        for column in columns + (["latency µs measured dense→ours"] if measured else []):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for r in self.layers:
            m = measured.get(r.name)
            extra = [f"{m.dense_latency_us:.1f}→{m.latency_us:.1f}" if m else ""] if measured else []
            table.add_row(
                r.name, f"{r.weight_shape[0]}x{r.weight_shape[1]}", f"{r.block_shape[0]}x{r.block_shape[1]}",
                r.layout_and_epilogue,
                f"{r.kept_blocks}/{r.blocks}", f"{r.keep_ratio:.2f}", f"{r.distortion:.3g}",
                f"{r.flops_dense / 1e6:.1f}→{r.flops_kept / 1e6:.1f}",
                f"{r.latency_dense_us:.1f}→{r.latency_predicted_us:.1f}",
                f"{r.energy_dense_mj:.3f}→{r.energy_predicted_mj:.3f}", f"{r.rows_removed}/{r.cols_removed}", *extra)
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=180).print(self)
        return buffer.getvalue()
