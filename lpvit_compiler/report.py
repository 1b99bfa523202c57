"""The compile report: per-layer table and budget summary; prints as a table, converts to dict/JSON."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.table import Table

from .context import CompileContext


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


@dataclass
class Report:
    hw: str
    importance: str
    budget: str
    budget_target: float
    summary: dict
    layers: list[LayerRow]
    passes: list[dict] = field(default_factory=list)

    @property
    def flops_keep_achieved(self) -> float:
        return self.summary["flops_keep_achieved"]

    @classmethod
    def from_context(cls, ctx: CompileContext, passes: list[dict]) -> "Report":
        rows = []
        for layer in ctx.layers.values():
            k = layer.pruned_blocks
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
            ))
        opts = ctx.options
        return cls(hw=opts.hw.name, importance=opts.importance, budget=opts.budget,
                   budget_target=opts.budget_target, summary=_plain(ctx.summary), layers=rows, passes=passes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        return cls(**{**data, "layers": [LayerRow(**row) for row in data["layers"]]})

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
        for column in ("layer", "shape", "block", "layout", "kept/blocks", "keep", "distortion", "MFLOPs dense→kept",
                       "latency µs dense→pred", "energy mJ dense→pred", "rows/cols removed"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for r in self.layers:
            table.add_row(
                r.name, f"{r.weight_shape[0]}x{r.weight_shape[1]}", f"{r.block_shape[0]}x{r.block_shape[1]}", r.layout,
                f"{r.kept_blocks}/{r.blocks}", f"{r.keep_ratio:.2f}", f"{r.distortion:.3g}",
                f"{r.flops_dense / 1e6:.1f}→{r.flops_kept / 1e6:.1f}",
                f"{r.latency_dense_us:.1f}→{r.latency_predicted_us:.1f}",
                f"{r.energy_dense_mj:.3f}→{r.energy_predicted_mj:.3f}", f"{r.rows_removed}/{r.cols_removed}")
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=180).print(self)
        return buffer.getvalue()


def _plain(summary: dict) -> dict:
    return {k: (float(v) if hasattr(v, "item") else v) for k, v in summary.items()}
