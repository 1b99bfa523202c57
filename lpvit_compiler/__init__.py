"""lpvit-compiler: compile a Vision Transformer into a block-sparse, faster, lower-power one.

    import lpvit_compiler as lpvit
    compiled = lpvit.compile(model, hw="a100", flops_keep=0.5, calib=batches, dump_dir="dumps/")
    print(compiled.report)
"""

__version__ = "0.1.0"

from .api import compile
from .compiled import CompiledModel, Plan, load
from .errors import CalibrationError, CaptureError, ConfigError, LpvitError, ModelFileError
from .hardware import PROFILES, HardwareProfile, get_profile, known_profiles
from .modules import BlockSparseLinear

__all__ = [
    "compile", "load", "CompiledModel", "Plan", "HardwareProfile", "PROFILES", "get_profile", "known_profiles",
    "BlockSparseLinear", "LpvitError", "ConfigError", "CaptureError", "CalibrationError", "ModelFileError",
]
