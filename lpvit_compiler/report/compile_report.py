"""The compile report: per-layer table and budget summary; prints as a table, converts to dict/JSON."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table

from ..blocks import pack_mask
from ..state import CompileContext

CURVE_POINTS = 101  # LPViT samples its curves at 101 ratios too


@dataclass
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
    latency_dense_us: float  # predicted, per inference of hw.batch_size images
    latency_predicted_us: float
    energy_dense_mj: float
    energy_predicted_mj: float
    rows_removed: int  # by dead-block elimination
    cols_removed: int
    nnz_blocks: int  # blocks stored in the BSR layout
    layout: str  # "bsr", or "dense" (masked dense GEMM: the kernel would not be faster at this density)
    # the distortion curve sampled at CURVE_POINTS keep ratios, for plots (the solve used every block count)
    curve_keep_ratio: list[float] = field(default_factory=list)
    curve_distortion: list[float] = field(default_factory=list)
    block_mask: str = ""  # blocks.pack_mask of the [block_rows, block_cols] mask, True = kept
    # measured by ``measure_layers`` (lpvit compile --bench), per inference of hw batch_size images
    latency_measured_us: float | None = None
    latency_dense_measured_us: float | None = None

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (-(-self.weight_shape[0] // self.block_shape[0]), -(-self.weight_shape[1] // self.block_shape[1]))


@dataclass
class Report:
    hw: str
    importance: str
    budget: str
    budget_target: float
    summary: dict
    layers: list[LayerRow]
    passes: list[dict] = field(default_factory=list)
    hw_profile: dict = field(default_factory=dict)  # HardwareProfile.to_dict(), incl. how it was calibrated
    measured: dict = field(default_factory=dict)  # end-to-end onnxruntime timing, see bench.compare_sessions
    accuracy: dict = field(default_factory=dict)  # top-1 of the dense and compiled model, where evaluated

    @property
    def flops_keep_achieved(self) -> float:
        return self.summary["flops_keep_achieved"]

    def latency_error(self) -> float | None:
        """Median |predicted - measured| / measured of the per-layer latencies, where they were measured."""
        errors = [abs(r.latency_predicted_us - r.latency_measured_us) / r.latency_measured_us
                  for r in self.layers if r.latency_measured_us]
        return float(np.median(errors)) if errors else None

    @classmethod
    def from_context(cls, ctx: CompileContext, passes: list[dict]) -> "Report":
        rows = []
        for layer in ctx.layers.values():
            k = layer.pruned_blocks
            curve_k = np.unique(np.round(np.linspace(0, layer.num_blocks, CURVE_POINTS)).astype(int))
            rows.append(LayerRow(
                name=layer.name,
                weight_shape=[layer.out_features, layer.in_features],
                block_shape=list(layer.grid.block_shape),
                blocks=layer.num_blocks,
                kept_blocks=layer.num_blocks - k,
                keep_ratio=1 - k / layer.num_blocks,
                tokens=layer.tokens,
                flops_dense=float(layer.flops[0]),
                flops_kept=float(layer.flops[k]),
                distortion=float(layer.distortion[k]),
                latency_dense_us=layer.dense_latency * 1e6,
                latency_predicted_us=float(layer.latency[k]) * 1e6,
                energy_dense_mj=layer.dense_energy * 1e3,
                energy_predicted_mj=float(layer.energy[k]) * 1e3,
                rows_removed=layer.out_features - (len(layer.kept_rows) if layer.kept_rows is not None
                                                   else layer.out_features),
                cols_removed=layer.in_features - (len(layer.kept_cols) if layer.kept_cols is not None
                                                  else layer.in_features),
                nnz_blocks=layer.nnz_blocks,
                layout=layer.layout,
                curve_keep_ratio=(1 - curve_k / layer.num_blocks).tolist(),
                curve_distortion=layer.distortion[curve_k].astype(float).tolist(),
                block_mask=pack_mask(layer.block_mask),
            ))
        opts = ctx.options
        return cls(hw=opts.hw.name, importance=opts.importance, budget=opts.budget,
                   budget_target=opts.budget_target, summary=_plain(ctx.summary), layers=rows, passes=passes,
                   hw_profile=opts.hw.to_dict())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        return cls(**{**data, "layers": [LayerRow(**row) for row in data["layers"]]})

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
        s = self.summary
        budget = {"flops": "FLOPs kept", "latency": "latency kept", "power": "power kept"}[self.budget]
        caption = (f"{budget}: target {self.budget_target:.3f}, achieved {s['budget_achieved']:.3f} | prunable-linear "
                   f"FLOPs kept {s['flops_keep_achieved']:.3f} (executed {s.get('flops_keep_executed', float('nan')):.3f})"
                   f" | model FLOPs kept {s['model_flops_keep']:.3f} | predicted on {self.hw} (batch "
                   f"{s['hw_batch_size']}): {s['predicted_speedup']:.2f}x faster, energy x{s['predicted_energy_ratio']:.2f}")
        table = Table(title=f"lpvit compile report — {self.importance} importance, hw={self.hw}", caption=caption)
        measured = any(r.latency_measured_us for r in self.layers)
        if measured:
            caption += f" | per-layer latency: median prediction error {self.latency_error():.0%}"
        if self.accuracy:
            caption += (f" | top-1 on {self.accuracy['data']} ({self.accuracy['images']} images): dense "
                        f"{self.accuracy['dense']:.4f}, compiled {self.accuracy['compiled']:.4f}")
        columns = ["layer", "shape", "block", "layout", "kept/blocks", "keep", "distortion", "MFLOPs dense→kept",
                   "latency µs dense→pred", "energy mJ dense→pred", "rows/cols removed"]
        for column in columns + (["latency µs measured dense→ours"] if measured else []):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for r in self.layers:
            extra = ([f"{r.latency_dense_measured_us:.1f}→{r.latency_measured_us:.1f}"]
                     if measured and r.latency_measured_us else [""] if measured else [])
            table.add_row(
                r.name, f"{r.weight_shape[0]}x{r.weight_shape[1]}", f"{r.block_shape[0]}x{r.block_shape[1]}", r.layout,
                f"{r.kept_blocks}/{r.blocks}", f"{r.keep_ratio:.2f}", f"{r.distortion:.3g}",
                f"{r.flops_dense / 1e6:.1f}→{r.flops_kept / 1e6:.1f}",
                f"{r.latency_dense_us:.1f}→{r.latency_predicted_us:.1f}",
                f"{r.energy_dense_mj:.3f}→{r.energy_predicted_mj:.3f}", f"{r.rows_removed}/{r.cols_removed}", *extra)
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=180).print(self)
        return buffer.getvalue()


def _plain(summary: dict) -> dict:
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in summary.items()}
