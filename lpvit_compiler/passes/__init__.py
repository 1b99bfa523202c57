"""The pass pipeline, in order. Each module holds one pass ``(GraphModule, CompileState) -> PassResult``,
declared with its contract (what it requires and provides, see pass_manager.py), and documents its input,
output and the formula it implements.
"""

from .block_mask_solve import block_mask_solve
from .bsr_layout import bsr_layout
from .capture import capture
from .dead_block_elimination import dead_block_elimination
from .fold_scales import fold_scales
from .fuse_epilogues import fuse_epilogues
from .hardware import hardware
from .head_pruning import head_pruning
from .importance import importance
from .reconstruct import reconstruct
from .token_pruning import token_pruning
from .token_schedule import token_schedule

PIPELINE = (capture, fold_scales, token_pruning, head_pruning, importance, hardware, token_schedule, block_mask_solve,
            reconstruct, dead_block_elimination, bsr_layout, fuse_epilogues)

__all__ = ["PIPELINE", "capture", "fold_scales", "token_pruning", "head_pruning", "importance", "hardware",
           "token_schedule", "block_mask_solve", "reconstruct", "dead_block_elimination", "bsr_layout", "fuse_epilogues"]
