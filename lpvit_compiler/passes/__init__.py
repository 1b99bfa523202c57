"""The pass pipeline, in order: capture (not a pass: it makes the graph) -> these.

Each module holds one pass ``(GraphModule, CompileContext) -> PassResult`` and documents its input, output and
the formula it implements.
"""

from .block_mask_solve import block_mask_solve
from .bsr_layout import bsr_layout
from .dead_block_elimination import dead_block_elimination
from .hardware import hardware
from .importance import importance
from .reconstruct import reconstruct

PIPELINE = (importance, hardware, block_mask_solve, reconstruct, dead_block_elimination, bsr_layout)

__all__ = ["PIPELINE", "importance", "hardware", "block_mask_solve", "reconstruct", "dead_block_elimination",
           "bsr_layout"]
