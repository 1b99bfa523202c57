"""The options of ``lpvit.compile``: one typed record, one place for every default, validated once.

``CompileOptions.build(**kwargs)`` takes what a user passes (``lpvit.compile(..., **kwargs)``, the CLI's flags,
tests) and returns a frozen :class:`CompileOptions`; every mistake — an unknown name, a wrong type, a value
out of range, two budgets — raises :class:`~lpvit_compiler.errors.ConfigError` naming the option and the fix.
The defaults are the field defaults below and nowhere else (the CLI reads them from here).
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

from .costmodel import HardwareProfile, get_profile
from .errors import ConfigError

IMPORTANCE_CRITERIA = ("obs", "taylor", "hessian", "magnitude")
SENSITIVITIES = ("channel", "layer")
POWER_MODELS = ("energy", "lpvit")
QUANTIZE_MODES = (None, "int8")
TOKEN_PRUNING_MODES = (None, "cascade", "merge", "auto")
ALLOCATIONS = ("auto", "sequential", "dense")
HEAD_CRITERIA = ("score", "refit")
DEFAULT_HW = "cpu"
DEFAULT_FLOPS_KEEP = 0.5
DEFAULT_PATCH_KEEP = 0.5
# Named sets of tuning options; options given with a preset override it. "fast": DeiT-S on 256 images in about
# half a minute on 2 cores (benchmarks/compile_time.py), for trying budgets before a full compile.
PRESETS = {
    "fast": {"importance": "hessian", "importance_images": 64, "reconstruct_images": 32, "block_recovery": False,
             "model_recovery_tflops": 0.0},
}


def _number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable:
    def check(name: str, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if not ((low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ConfigError(f"{name} must be in {interval}, got {value:g}")
        return value
    return check


def _optional_fraction(name: str, value) -> float | None:
    return None if value is None else _number(0.0, 1.0, low_open=True)(name, value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _optional_positive_int(name: str, value) -> int | None:
    return None if value is None else _positive_int(name, value)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _choice(choices: tuple[str, ...]) -> Callable:
    def check(name: str, value):
        if value not in choices:
            raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
        return value
    return check


def _power_weight(name: str, value):
    return value if value == "auto" else _number(float("-inf"), float("inf"), True, True)(name, value)


def _layer_names(name: str, value):
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError:
        raise ConfigError(f"{name} must be a module name or a list of them, got {value!r}") from None
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{name} must hold module names (str), got {value!r}")
    return names


def _option(default, check: Callable, doc: str):
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class CompileOptions:
    """Everything that decides a compile besides the model and the data. Build with :meth:`build`."""

    hw: HardwareProfile  # the cost model's target
    budget: str  # which resource the target limits: "flops", "latency" or "power"
    budget_target: float  # fraction of the dense resource to keep (latency: 1 / target_speedup)
    block_shape: tuple[int, int]  # (rows, cols) of a weight block
    importance: str = _option("obs", _choice(IMPORTANCE_CRITERIA),
                              "block criterion: obs (error left after refit), taylor (LPViT), hessian, magnitude")
    sensitivity: str = _option("layer", _choice(SENSITIVITIES),
                               "obs: weight each output channel's error by the loss's sensitivity to that channel "
                               "(channel), or by the layer's mean sensitivity (layer)")
    importance_images: int | None = _option(None, _optional_positive_int, "calibration images the importance "
                                                                          "statistics run on (None: all)")
    allocation: str = _option("auto", _choice(ALLOCATIONS),
                              "where the solve's distortion curves come from: each layer's measured again just "
                              "before its refit, on the inputs it sees in the model pruned so far, with the budget "
                              "left re-solved (sequential; needs importance='obs' and reconstruct), or the dense "
                              "model's, once (dense); auto: sequential where it applies, else dense")
    min_density: float = _option(0.05, _number(0.0, 1.0, low_open=True), "share of blocks every layer keeps")
    power_weight: float | str = _option(0.0, _power_weight, "beta of the solve's power term, or 'auto' (LPViT)")
    power_model: str = _option("energy", _choice(POWER_MODELS), "power term: the profile's energy, or LPViT's proxy")
    damping: float = _option(1e-7, _number(0.0, float("inf")), "lambda of the Taylor distortion's ||dW||^2 term")
    hessian_damping: float = _option(0.01, _number(0.0, float("inf"), low_open=True),
                                     "ridge lambda of GPTQ's and head pruning's least squares on X^T X, relative "
                                     "to its mean diagonal; the floor of the obs ridge")
    obs_damping: float = _option(1.0, _number(0.0, float("inf")),
                                 "ridge lambda of the input Hessian in the obs scores (importance and sequential "
                                 "allocation) and the reconstruction's refit (there centred on the dense weights) "
                                 "per input column per calibration token, relative to its mean diagonal: "
                                 "max(hessian_damping, obs_damping * K / T)")
    prune_heads: bool = _option(False, _flag, "also prune classifier heads")
    layers: tuple[str, ...] | None = _option(None, _layer_names, "module names to prune (default: all but heads)")
    calib_batch_size: int = _option(32, _positive_int, "calibration images per batch")
    dense_fallback: bool = _option(True, _flag, "keep a layer dense where the block-sparse kernel would be slower")
    fuse_epilogues: bool = _option(True, _flag, "fold the activation and residual add after a block-sparse layer "
                                               "into its write-back")
    fold_scales: bool = _option(True, _flag, "fold LayerScale into the linear before it and LayerNorm affines into "
                                             "the linears after them, before scoring (an equivalent graph)")
    token_pruning: str | None = _option(None, _choice(TOKEN_PRUNING_MODES),
                                        "None, 'cascade' (CP-ViT: drop the lowest-scoring patch tokens block by "
                                        "block), 'merge' (ToMe: merge the most similar patches instead) or "
                                        "'auto' (cascade where the model allows it, else skipped with a report "
                                        "note)")
    patch_keep: float | None = _option(None, _optional_fraction,
                                       "token_pruning: fraction of the patch tokens left after the last pruning "
                                       f"stage (None: {DEFAULT_PATCH_KEEP:g} under flops_keep; under "
                                       "target_speedup or power_keep chosen jointly with the block masks)")
    first_token_stage: int = _option(1, _positive_int, "token_pruning: the first block (0-based) whose input is "
                                                       "pruned; blocks before it only score")
    head_keep: float = _option(1.0, _number(0.0, 1.0, low_open=True),
                               "fraction of the attention heads kept (round(head_keep * heads) per block counted "
                               "over all blocks); the others' q, k, v rows and proj columns go, proj is refitted")
    head_criterion: str = _option("refit", _choice(HEAD_CRITERIA),
                                  "head_keep: which heads go — 'refit' (greedily the head whose removal proj's refit "
                                  "makes good best, and across blocks where that costs least) or 'score' (CP-ViT's "
                                  "cumulative attention score, the lowest in every block)")
    prefix_tokens: int | None = _option(None, lambda n, v: None if v is None else _count(n, v),
                                        "token_pruning: class/distillation/register tokens before the patches, "
                                        "never pruned (None: the model's num_prefix_tokens)")
    reconstruct: bool = _option(True, _flag, "refit kept weights and biases to the dense outputs")
    quantize: str | None = _option(None, _choice(QUANTIZE_MODES),
                                   "None (float32) or 'int8': int8 weights (one scale per output channel) and X "
                                   "quantized per token at run time, on the int8 block-sparse kernel")
    gptq: bool = _option(True, _flag, "with quantize='int8': quantize the kept weights column by column with "
                                      "second-order error compensation (GPTQ) on the reconstruction's Hessian; "
                                      "False rounds each weight to nearest")
    reconstruct_images: int | None = _option(None, _optional_positive_int, "calibration images the reconstruction "
                                             "fits on (None: enough for 25,216 live tokens per layer, at least 128)")
    block_recovery: bool = _option(True, _flag, "after the per-layer refit, fit each transformer block's output "
                                                "to the dense block's by Adam (masks frozen; needs reconstruct)")
    recovery_tflops: float = _option(20.0, _number(0.0, float("inf")), "compute budget of block recovery in "
                                     "10^12 FLOPs of its Adam steps (counted, so the same on every machine), "
                                     "shared over the blocks")
    recovery_seconds: float = _option(float("inf"), _number(0.0, float("inf")), "wall-clock cap of block "
                                      "recovery and the end-to-end step, shared over the blocks, the step taking "
                                      "what they leave (when it binds, the result depends on the machine's speed "
                                      "and load)")
    recovery_steps: int = _option(1000, _count, "most Adam steps per block in block recovery, and of the "
                                                "end-to-end step")
    recovery_lr: float = _option(3e-4, _number(0.0, 1.0, low_open=True), "Adam learning rate of block recovery")
    model_recovery_tflops: float = _option(5.0, _number(0.0, float("inf")), "compute budget (10^12 FLOPs) of a "
                                           "last recovery step over the whole model, fitting its outputs to the "
                                           "dense model's (0: off; needs reconstruct)")
    model_recovery_lr: float = _option(3e-6, _number(0.0, 1.0, low_open=True), "Adam learning rate of that step")
    verify: bool = _option(False, _flag, "check every rewriting pass's invariant (slower; on in tests)")

    @property
    def joint_token_schedule(self) -> bool:
        """Token pruning without patch_keep under a latency or power budget: the token_schedule pass chooses the
        stages' keep counts together with the block masks."""
        return self.token_pruning is not None and self.patch_keep is None and self.budget in ("latency", "power")

    @property
    def sequential_allocation(self) -> bool:
        """Whether reconstruct re-scores and re-solves each layer (allocation "sequential", or "auto" where the obs
        criterion and reconstruction are on)."""
        return self.allocation != "dense" and self.importance == "obs" and self.reconstruct

    @property
    def fixed_patch_keep(self) -> float:
        """The patch_keep a fixed token schedule uses (the given one, else the default)."""
        return DEFAULT_PATCH_KEEP if self.patch_keep is None else self.patch_keep

    @classmethod
    def tuning_names(cls) -> tuple[str, ...]:
        """The options with a default (all but the hardware, the budget and the block shape)."""
        return tuple(f.name for f in dataclasses.fields(cls) if "check" in f.metadata)

    @classmethod
    def default(cls, name: str):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def build(cls, hw: str | HardwareProfile = DEFAULT_HW, *, flops_keep: float | None = None,
              target_speedup: float | None = None, power_keep: float | None = None, block_shape=None,
              preset: str | None = None, **tuning) -> CompileOptions:
        """Validated options from keyword arguments; the budget is one of ``flops_keep`` (default 0.5),
        ``target_speedup`` or ``power_keep``; ``preset`` names a set of defaults (``PRESETS``)."""
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            tuning = {**PRESETS[preset], **tuning}
        known = cls.tuning_names()
        for name in tuning:
            if name not in known:
                close = difflib.get_close_matches(name, [*known, "flops_keep", "target_speedup", "power_keep",
                                                         "block_shape", "hw", "preset"], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown option {name!r}{hint}; options are: {', '.join(known)}")
        requested_block = _block_shape(block_shape, None) if block_shape is not None else None
        profile = get_profile(hw, requested_block)  # "native" is measured at the block it will run
        budget, target = _budget(flops_keep, target_speedup, power_keep)
        checked = {f.name: f.metadata["check"](f.name, tuning.get(f.name, f.default))
                   for f in dataclasses.fields(cls) if "check" in f.metadata}
        options = cls(hw=profile, budget=budget, budget_target=target,
                      block_shape=_block_shape(block_shape, profile), **checked)
        if options.joint_token_schedule and options.importance != "obs":
            raise ConfigError(f"token_pruning={options.token_pruning!r} without patch_keep under a "
                              f"{'target_speedup' if budget == 'latency' else 'power_keep'} budget chooses the token "
                              "schedule jointly with the blocks, which weighs token damage in the obs criterion's "
                              f"units: use importance='obs' (not {options.importance!r}) or give patch_keep")
        if options.allocation == "sequential" and not options.sequential_allocation:
            raise ConfigError("allocation='sequential' re-scores each layer with the obs criterion on the "
                              "reconstruction's inputs: use importance='obs' and reconstruct=True, or "
                              "allocation='dense'")
        return options

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {**data, "hw": self.hw.to_dict(), "block_shape": list(self.block_shape),
                "layers": list(self.layers) if self.layers is not None else None}


def _budget(flops_keep, target_speedup, power_keep) -> tuple[str, float]:
    given = [name for name, value in (("flops_keep", flops_keep), ("target_speedup", target_speedup),
                                      ("power_keep", power_keep)) if value is not None]
    if len(given) > 1:
        raise ConfigError(f"give one budget, not {' and '.join(given)}")
    if target_speedup is not None:
        speedup = _number(1.0, float("inf"), high_open=True)("target_speedup", target_speedup)
        return "latency", 1.0 / speedup
    if power_keep is not None:
        return "power", _number(0.0, 1.0, low_open=True)("power_keep", power_keep)
    keep = DEFAULT_FLOPS_KEEP if flops_keep is None else flops_keep
    return "flops", _number(0.0, 1.0, low_open=True)("flops_keep", keep)


def _block_shape(block_shape, hw: HardwareProfile | None) -> tuple[int, int]:
    if block_shape is None:
        return tuple(hw.block_shape)
    if isinstance(block_shape, str) and "x" in block_shape:
        block_shape = block_shape.split("x", 1)
    if isinstance(block_shape, (int, str)):
        block_shape = (block_shape, block_shape)
    try:
        bh, bw = (int(v) for v in block_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"block_shape must be an int, (rows, cols) or 'RxC', got {block_shape!r}") from None
    if bh < 1 or bw < 1:
        raise ConfigError(f"block_shape must be positive, got ({bh}, {bw})")
    return bh, bw
