"""What the passes share: the compile options, and one record per prunable linear layer.

Data flows one way. Capture fills the layer registry (names, shapes, block grid); each pass then fills its
own fields of :class:`PrunableLayer` and reads only those of earlier passes:

    capture            -> name, out/in_features, grid
    importance         -> tokens, block_scores, prune_order, distortion
    hardware           -> flops, latency, energy, power, sparse_faster (curves over pruned-block count k)
    block_mask_solve   -> pruned_blocks, block_mask
    dead_block_elim.   -> kept_rows, kept_cols, folded_bias
    bsr_layout         -> nnz_blocks, layout
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .blocks import BlockGrid
from .costmodel.profiles import HardwareProfile

IMPORTANCE_CRITERIA = ("taylor", "hessian", "obs", "magnitude")
POWER_MODELS = ("energy", "lpvit")


@dataclass(frozen=True)
class CompileOptions:
    hw: HardwareProfile
    budget: str  # "flops", "latency" or "power": which resource the target limits
    budget_target: float  # fraction of the dense resource to keep (latency: 1 / target_speedup)
    block_shape: tuple[int, int]
    importance: str
    min_density: float  # every layer keeps at least this fraction of its blocks
    power_weight: float | str  # beta of the solve's power term: "auto" or a float >= 0
    power_model: str
    damping: float  # lambda of the Taylor distortion's 1/2*lambda*||dW||^2 term
    prune_heads: bool  # also prune classifier heads (linears whose output reaches the model output)
    layers: tuple[str, ...] | None  # explicit module names to prune, overriding the default selection
    calib_batch_size: int
    dense_fallback: bool  # keep a pruned layer dense (masked) where the hw model says the sparse kernel is slower
    reconstruct: bool = True  # refit kept weights to the dense outputs (passes/reconstruct.py)
    reconstruct_images: int = 128  # calibration images the reconstruction fits on
    reconstruct_damping: float = 0.01  # ridge lambda, relative to mean(diag(X^T X))

    def to_dict(self) -> dict:
        return {
            "hw": self.hw.to_dict(),
            "budget": self.budget,
            "budget_target": self.budget_target,
            "block_shape": list(self.block_shape),
            "importance": self.importance,
            "min_density": self.min_density,
            "power_weight": self.power_weight,
            "power_model": self.power_model,
            "damping": self.damping,
            "prune_heads": self.prune_heads,
            "layers": list(self.layers) if self.layers is not None else None,
            "calib_batch_size": self.calib_batch_size,
            "dense_fallback": self.dense_fallback,
            "reconstruct": self.reconstruct,
            "reconstruct_images": self.reconstruct_images,
            "reconstruct_damping": self.reconstruct_damping,
        }


@dataclass
class PrunableLayer:
    name: str  # module name in the original model
    grid: BlockGrid
    # importance
    tokens: int = 0  # tokens per image that pass through the layer
    block_scores: torch.Tensor | None = None  # [block_rows, block_cols], higher = more important
    prune_order: np.ndarray | None = None  # flat block indices, least important first
    distortion: np.ndarray | None = None  # [num_blocks + 1]: distortion after pruning the first k blocks
    # hardware (all [num_blocks + 1], indexed by pruned-block count k, per image / per inference)
    flops: np.ndarray | None = None
    latency: np.ndarray | None = None
    energy: np.ndarray | None = None
    power: np.ndarray | None = None
    sparse_faster: np.ndarray | None = None  # [num_blocks + 1] bool: the block-sparse kernel beats dense GEMM
    dense_latency: float = 0.0  # of the original dense layer, seconds per inference
    dense_energy: float = 0.0  # joules per inference
    # solve
    pruned_blocks: int = 0
    block_mask: torch.Tensor | None = None  # [block_rows, block_cols] bool, True = kept
    # dead-block elimination (indices into the original rows / columns that remain)
    kept_rows: torch.Tensor | None = None
    kept_cols: torch.Tensor | None = None
    # bsr layout
    nnz_blocks: int = 0
    layout: str = ""  # "bsr", or "dense" where dense_fallback kept the masked layer a dense GEMM

    @property
    def out_features(self) -> int:
        return self.grid.out_features

    @property
    def in_features(self) -> int:
        return self.grid.in_features

    @property
    def num_blocks(self) -> int:
        return self.grid.num_blocks

    def element_mask(self) -> torch.Tensor:
        """Bool mask shaped like the original weight, True = kept."""
        return self.grid.expand(self.block_mask)

    def live_mask(self) -> torch.Tensor:
        """The element mask restricted to the rows and columns dead-block elimination left."""
        mask = self.element_mask()
        if self.kept_rows is not None:
            mask = mask[self.kept_rows]
        if self.kept_cols is not None:
            mask = mask[:, self.kept_cols]
        return mask


@dataclass
class CompileContext:
    options: CompileOptions
    calibration: list[torch.Tensor]
    layers: dict[str, PrunableLayer] = field(default_factory=dict)
    capture_method: str = ""
    model_flops: float = 0.0  # dense FLOPs per image of the whole model
    other_flops: float = 0.0  # of which outside the prunable linears
    summary: dict = field(default_factory=dict)  # budget figures the solve and later passes report
    progress: bool = True  # show progress bars
