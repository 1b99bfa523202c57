"""The typed compile state: one :class:`LayerState` per prunable linear and one :class:`CompileState` for the
model, read and updated by every pass — nothing passes between passes outside these records.

Who fills what (each pass's contract in ``passes/`` says the same to the pass manager):

    capture            -> CompileState.layers (name, grid), capture_method, selection, notes
    fold_scales        -> (the graph's weights only)
    token_pruning      -> CompileState.token_stages (the graph gathers tokens; importance then counts them)
    head_pruning       -> CompileState.heads_kept; qkv and proj layers get their smaller grids
    importance         -> tokens, block_scores, prune_order, distortion
    hardware           -> curves (cost over pruned-block count k), CompileState.model_costs, then costs
    token_schedule     -> (joint token schedule only) token_stages, tokens, curves, model_costs for the chosen one
    block_mask_solve   -> pruned_blocks, block_mask; CompileState.solve
    reconstruct        -> weight_scales (quantize="int8"; the weights themselves live in the graph)
    dead_block_elim.   -> kept_rows, kept_cols (the layer's shape shrinks); CompileState.hidden_units_removed
    bsr_layout         -> nnz_blocks, layout; CompileState.flops_keep_executed
    fuse_epilogues     -> epilogue

``LayerState.costs`` is an analysis of the layer as it is *now* — its current shape (after dead-block
elimination), its tokens and its live blocks — and :meth:`CompileState.refresh_costs` recomputes it. The pass
manager calls that after every pass whose contract says it changes shapes, masks or tokens, so a decision
taken later (the layout's dense fallback) always sees current costs, never stale ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from .blocks import BlockGrid
from .costmodel import LayerCosts, layer_costs
from .costmodel.flops import ModelWork, tokens_and_work
from .options import CompileOptions


@dataclass
class CostCurves:
    """A layer's predicted cost for every pruned-block count k = 0 .. num_blocks (pruning in importance order),
    in its original shape: what the solve trades. Per inference of ``hw.batch_size`` images."""

    flops: np.ndarray  # per image
    latency: np.ndarray  # seconds: block-sparse kernel, or the dense GEMM where dense_fallback keeps it faster
    energy: np.ndarray  # joules, same choice
    power: np.ndarray  # the solve's power term: energy, or LPViT's proxy
    sparse_faster: np.ndarray  # bool: the block-sparse kernel beats the dense GEMM at k
    dense: LayerCosts  # the original dense layer's costs (k = 0, no kernel choice)


@dataclass
class LayerState:
    name: str  # module name in the original model
    grid: BlockGrid  # the block grid of the original weight [out, in]; masks are in this grid
    tokens: int = 0  # tokens per image that pass through the layer
    # importance
    block_scores: torch.Tensor | None = None  # [block_rows, block_cols], higher = more important
    prune_order: np.ndarray | None = None  # flat block indices, least important first
    distortion: np.ndarray | None = None  # [num_blocks + 1]: estimated damage after pruning the first k blocks
    loss_weights: torch.Tensor | None = None  # importance="obs": [out] the weight a_r of each output row's error
    # hardware
    curves: CostCurves | None = None
    costs: LayerCosts | None = None  # of the layer as it is now (refresh_costs)
    # solve
    pruned_blocks: int = 0
    block_mask: torch.Tensor | None = None  # [block_rows, block_cols] bool, True = kept
    # reconstruct, quantize="int8": per-output-channel scales of the int8 weights (original rows)
    weight_scales: torch.Tensor | None = None
    # dead-block elimination: indices into the original rows / columns that remain
    kept_rows: torch.Tensor | None = None
    kept_cols: torch.Tensor | None = None
    # layout
    nnz_blocks: int = 0
    layout: str = ""  # "bsr", or "dense" where dense_fallback kept the masked layer a dense GEMM
    epilogue: str = ""  # what fuse_epilogues folded into the layer's write-back: "gelu", "residual", "gelu+residual"

    @property
    def out_features(self) -> int:
        return self.grid.out_features

    @property
    def in_features(self) -> int:
        return self.grid.in_features

    @property
    def num_blocks(self) -> int:
        return self.grid.num_blocks

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's current [out, in]: the original, less what dead-block elimination removed."""
        return (len(self.kept_rows) if self.kept_rows is not None else self.out_features,
                len(self.kept_cols) if self.kept_cols is not None else self.in_features)

    @property
    def live_grid(self) -> BlockGrid:
        """The block grid of the current shape (the one the BSR layout stores)."""
        return BlockGrid(*self.shape, self.grid.block_shape)

    def element_mask(self) -> torch.Tensor:
        """Bool mask shaped like the original weight, True = kept (all True before the solve)."""
        if self.block_mask is None:
            return torch.ones(self.out_features, self.in_features, dtype=torch.bool)
        return self.grid.expand(self.block_mask)

    def live_mask(self) -> torch.Tensor:
        """The element mask in the current shape (rows and columns dead-block elimination removed are gone)."""
        mask = self.element_mask()
        if self.kept_rows is not None:
            mask = mask[self.kept_rows]
        if self.kept_cols is not None:
            mask = mask[:, self.kept_cols]
        return mask

    def live_block_mask(self) -> torch.Tensor:
        """[block_rows, block_cols] of the current shape: True where a block holds any kept element."""
        return self.live_grid.reduce_any(self.live_mask())


@dataclass(frozen=True)
class TokenStage:
    """One token-pruning stage (token_pruning pass): the tokens entering a block and those it keeps."""

    block: str  # e.g. "blocks.3"
    module: str  # the TokenSelect (cascade) or TokenMerge (merge) module at its input
    tokens_in: int  # per image, prefix tokens included
    tokens_out: int
    patches_kept: int  # patch tokens after the stage (merged tokens count once)
    locality: float  # the block's 3x3 attention locality on the calibration images (the schedule's weight)


@dataclass(frozen=True)
class UnprunedModel:
    """The model as the first token or head pruning pass found it: what whole-model FLOPs and speedups
    compare with."""

    work: ModelWork  # per image: FLOPs and the bytes of the memory-bound ops (costmodel.flops)
    tokens: dict[str, int]  # per prunable layer, tokens per image
    shapes: dict[str, tuple[int, int]]  # per prunable layer, [out, in] (head pruning shrinks qkv and proj)


@dataclass(frozen=True)
class ModelCosts:
    """The dense model's predicted cost (hardware pass), per inference of ``hw_batch_size`` images. "Dense" is
    the original model: with token or head pruning, before it (``CompileState.unpruned``)."""

    hw_batch_size: int
    model_flops: float  # per image, the whole dense model (torch.utils.flop_counter)
    other_flops: float  # outside the prunable linears, in the graph as it is (tokens pruned)
    other_bytes: float  # per image, moved by the memory-bound ops of the graph as it is (costmodel.flops)
    other_latency_s: float  # of other_flops and other_bytes
    other_energy_j: float
    dense_latency_s: float  # whole dense model
    dense_energy_j: float
    dense_linear_energy_j: float  # the prunable linears' share of dense_energy_j (what power_keep limits)


@dataclass(frozen=True)
class SolveOutcome:
    """What the block-mask solve chose, as the cost model predicts it."""

    beta: float  # weight of the power term
    slope: float  # the common equal-slope lambda
    budget_achieved: float  # fraction of the dense budget resource
    flops_keep_achieved: float  # fraction of the prunable linears' FLOPs
    model_flops_keep: float | None  # fraction of the whole model's FLOPs
    predicted_latency_s: float
    predicted_speedup: float
    predicted_energy_j: float
    predicted_energy_ratio: float


@dataclass
class CompileState:
    options: CompileOptions
    calibration: list[torch.Tensor]  # [B, C, H, W] batches (or [B, T] token ids)
    model: nn.Module  # the user's model (capture deep-copies it; never modified)
    leaf_modules: Sequence = ()  # torch.fx help, see frontend/capture.py
    concrete_args: dict | None = None
    progress: bool = True  # show progress bars
    # capture
    capture_method: str = ""
    layers: dict[str, LayerState] = field(default_factory=dict)
    selection: dict[str, str] = field(default_factory=dict)  # every linear -> why it is (not) pruned
    notes: list[str] = field(default_factory=list)  # for the report: decisions a user should know about
    token_stages: list[TokenStage] = field(default_factory=list)  # token_pruning, in block order
    heads_kept: dict[str, list[int]] = field(default_factory=dict)  # head_pruning: block -> kept head indices
    unpruned: UnprunedModel | None = None  # token_pruning, head_pruning: the model before them
    # importance (obs): [images, T] bool, the calibration token positions that reach the output, where some do not
    live_tokens: torch.Tensor | None = None
    # hardware, solve, dead-block elimination, layout
    model_costs: ModelCosts | None = None
    solve: SolveOutcome | None = None
    hidden_units_removed: int = 0
    flops_keep_executed: float | None = None

    def remember_unpruned(self, gm: fx.GraphModule) -> None:
        """Record the model's work and per-layer tokens before the first token or head rewrite (once)."""
        if self.unpruned is not None:
            return
        tokens, work = tokens_and_work(gm, self.layers, self.calibration[0][:1])
        shapes = {name: tuple(gm.get_submodule(name).weight.shape) for name in self.layers}
        self.unpruned = UnprunedModel(work, tokens, shapes)

    def refresh_costs(self) -> None:
        """Recompute every layer's ``costs`` from its current shape, tokens and live blocks."""
        for layer in self.layers.values():
            live = layer.live_block_mask() if layer.block_mask is not None else None
            kept = int(live.sum()) if live is not None else layer.live_grid.num_blocks
            layer.costs = layer_costs(self.options.hw, layer.tokens, layer.shape, layer.grid.block_shape, kept,
                                      self.options.quantize == "int8")

    def predicted_latency_s(self) -> float:
        """The whole model as laid out now: every layer at its chosen layout (dense until bsr_layout ran)."""
        return self.model_costs.other_latency_s + sum(layer.costs.latency(layer.layout == "bsr")
                                                      for layer in self.layers.values())

    def predicted_energy_j(self) -> float:
        return self.model_costs.other_energy_j + sum(layer.costs.energy(layer.layout == "bsr")
                                                     for layer in self.layers.values())
