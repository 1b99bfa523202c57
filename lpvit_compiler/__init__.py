"""lpvit-compiler: compile a Vision Transformer into a block-sparse, faster, lower-power one.

    import lpvit_compiler as lpvit
    compiled = lpvit.compile(model, hw="a100", flops_keep=0.5, calib=batches, dump_dir="dumps/")
    print(compiled.report)
    compiled.export("model.onnx")                 # run with lpvit.InferenceSession("model.onnx")
"""

__version__ = "0.1.0"

from .api import compile
from .compiled import CompiledModel, Plan, load
from .costmodel import PROFILES, HardwareProfile, get_profile, known_profiles
from .errors import CalibrationError, CaptureError, ConfigError, LpvitError, ModelFileError
from .options import CompileOptions
from .pass_manager import PipelineError
from .runtime.kernels import KernelLibraryError, kernel_int8_isa, kernel_isa, kernels_library_path
from .runtime.modules import BlockSparseLinear
from .runtime.sessions import InferenceSession
from .tools.evaluate import evaluate
from .tools.finetune import finetune

__all__ = [
    "compile", "evaluate", "finetune", "load", "CompiledModel", "CompileOptions", "Plan", "PipelineError",
    "HardwareProfile", "PROFILES", "get_profile",
    "known_profiles", "BlockSparseLinear", "InferenceSession", "kernels_library_path", "kernel_isa", "kernel_int8_isa",
    "KernelLibraryError",
    "LpvitError", "ConfigError", "CaptureError", "CalibrationError", "ModelFileError",
]
