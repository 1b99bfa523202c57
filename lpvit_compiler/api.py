"""``lpvit.compile``: validate options, capture, run the pass pipeline, package the result."""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .frontend.calibration import calibration_batches
from .frontend.capture import capture, select_prunable_layers
from .compiled import CompiledModel, Plan, versions
from .state import IMPORTANCE_CRITERIA, POWER_MODELS, CompileContext, CompileOptions
from .errors import ConfigError
from .costmodel import HardwareProfile, get_profile
from .pass_manager import PassManager, PassResult
from .passes import PIPELINE
from .report import Report

DUMP_DIR_ENV = "LPVIT_DUMP_DIR"


def _number(name: str, value, low: float, high: float, low_open: bool, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r} ({meaning})")
    value = float(value)
    if not ((low < value if low_open else low <= value) and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{name} must be in {interval}, got {value:g} ({meaning})")
    return value


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _block_shape(block_shape, hw: HardwareProfile) -> tuple[int, int]:
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


def make_options(hw, flops_keep, target_speedup, power_keep, block_shape, importance, min_density, power_weight,
                 power_model, damping, prune_heads, layers, calib_batch_size, dense_fallback=True, reconstruct=True,
                 reconstruct_images=128, reconstruct_damping=0.01) -> CompileOptions:
    profile = get_profile(hw)
    given = {k: v for k, v in (("flops_keep", flops_keep), ("target_speedup", target_speedup),
                               ("power_keep", power_keep)) if v is not None}
    if len(given) > 1:
        raise ConfigError(f"give one budget, not {' and '.join(given)}")
    if "target_speedup" in given:
        speedup = _number("target_speedup", target_speedup, 1.0, float("inf"), False,
                          "predicted speedup of the whole model on the hw profile")
        budget, target = "latency", 1.0 / speedup
    elif "power_keep" in given:
        budget, target = "power", _number("power_keep", power_keep, 0.0, 1.0, True,
                                          "fraction of the prunable layers' predicted power to keep")
    else:
        budget, target = "flops", _number("flops_keep", 0.5 if flops_keep is None else flops_keep, 0.0, 1.0, True,
                                          "fraction of the prunable linear layers' FLOPs to keep")
    if importance not in IMPORTANCE_CRITERIA:
        raise ConfigError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE_CRITERIA)}")
    if power_model not in POWER_MODELS:
        raise ConfigError(f"unknown power_model {power_model!r}; choose one of {', '.join(POWER_MODELS)}")
    if power_weight != "auto":
        power_weight = _number("power_weight", power_weight, float("-inf"), float("inf"), False,
                               "beta of the power term, or 'auto'")
    if isinstance(layers, str):
        layers = [layers]
    _count("calib_batch_size", calib_batch_size)
    return CompileOptions(
        hw=profile, budget=budget, budget_target=target, block_shape=_block_shape(block_shape, profile),
        importance=importance,
        min_density=_number("min_density", min_density, 0.0, 1.0, True, "share of blocks every layer keeps"),
        power_weight=power_weight, power_model=power_model,
        damping=_number("damping", damping, 0.0, float("inf"), False, "lambda of the Taylor distortion"),
        prune_heads=bool(prune_heads), layers=tuple(layers) if layers is not None else None,
        calib_batch_size=calib_batch_size, dense_fallback=bool(dense_fallback), reconstruct=bool(reconstruct),
        reconstruct_images=_count("reconstruct_images", reconstruct_images),
        reconstruct_damping=_number("reconstruct_damping", reconstruct_damping, 0.0, float("inf"), True,
                                    "ridge lambda of the reconstruction, relative to mean(diag(X^T X))"),
    )


def compile(
    model: nn.Module,
    hw: str | HardwareProfile = "cpu",
    *,
    calib=None,
    flops_keep: float | None = None,
    target_speedup: float | None = None,
    power_keep: float | None = None,
    block_shape=None,
    importance: str = "obs",
    min_density: float = 0.05,
    power_weight: float | str = 0.0,
    power_model: str = "energy",
    damping: float = 1e-7,
    prune_heads: bool = False,
    layers: Sequence[str] | None = None,
    calib_batch_size: int = 32,
    dense_fallback: bool = True,
    reconstruct: bool = True,
    reconstruct_images: int = 128,
    reconstruct_damping: float = 0.01,
    dump_dir=None,
    leaf_modules: Sequence = (),
    concrete_args: dict | None = None,
    progress: bool = True,
    data_config: dict | None = None,
) -> CompiledModel:
    """Compile ``model`` into a block-sparse model under one budget (default ``flops_keep=0.5``).

    Args:
        model: a ViT (timm, torchvision, Hugging Face) in any mode; it is copied, never modified.
        hw: hardware profile name (``"cpu"``, ``"a100"``, ``"h100"``, ...) or a :class:`HardwareProfile`.
        calib: calibration images: a tensor [N, C, H, W] or an iterable of batches ([B, C, H, W] tensors,
            (images, labels) pairs or dicts with ``pixel_values``), preprocessed as the model expects.
        flops_keep / target_speedup / power_keep: the budget — FLOPs fraction of the prunable linears to keep,
            predicted model speedup on ``hw``, or fraction of their predicted power to keep. Give one.
        block_shape: (rows, cols) of a weight block (default: the profile's).
        importance: ``"obs"`` (default: Optimal Brain Surgeon block costs — the output error left after
            reconstruction — weighted by the loss's sensitivity to each layer's output), ``"taylor"`` (LPViT),
            ``"hessian"`` (layer input second moments) or ``"magnitude"``.
        min_density: every layer keeps at least this share of its blocks.
        power_weight: beta of the solve's power term (0 = off, ``"auto"`` = LPViT's scaling).
        power_model: ``"energy"`` (the profile's energy model) or ``"lpvit"`` (the paper's proxy).
        damping: lambda of the Taylor distortion's 1/2*lambda*||dW||^2 term.
        prune_heads: also prune classifier heads; ``layers`` names the linears to prune explicitly instead.
        dense_fallback: keep a pruned layer a dense GEMM on its masked weight where ``hw`` predicts the
            block-sparse kernel would not be faster (too dense); False makes every pruned layer block-sparse.
        reconstruct: refit each pruned layer's kept weights and bias to the dense model's outputs, layer by layer
            on the first ``reconstruct_images`` calibration images (ridge ``reconstruct_damping``).
        dump_dir: write a numbered dump after every pass here (or set ``LPVIT_DUMP_DIR``).
        leaf_modules / concrete_args: help torch.fx capture (module types or names to keep opaque).
        progress: show progress bars.
        data_config: the preprocessing the model expects (timm data config), stored in the plan and in
            exported ONNX files for ``lpvit eval``.
    """
    options = make_options(hw, flops_keep, target_speedup, power_keep, block_shape, importance, min_density,
                           power_weight, power_model, damping, prune_heads, layers, calib_batch_size,
                           dense_fallback, reconstruct, reconstruct_images, reconstruct_damping)
    batches = calibration_batches(calib, calib_batch_size)
    start = time.perf_counter()
    gm, method = capture(model, batches[0], leaf_modules, concrete_args)
    prunable, selection = select_prunable_layers(gm, options, batches[0])
    ctx = CompileContext(options=options, calibration=batches, layers=prunable, capture_method=method,
                         progress=progress)
    dump_dir = dump_dir if dump_dir is not None else os.environ.get(DUMP_DIR_ENV)
    manager = PassManager(PIPELINE, dump_dir)
    manager.record("capture", PassResult(gm, True, {"method": method, "linear_layers": selection,
                                                    "options": options.to_dict()}),
                   time.perf_counter() - start)
    gm = manager.run(gm, ctx)

    report = Report.from_context(ctx, manager.timings)
    plan = Plan(
        options=options.to_dict(), capture=method, input_shape=list(batches[0].shape[1:]),
        layers={name: {"weight_shape": [l.out_features, l.in_features], "block_shape": list(l.grid.block_shape),
                       "blocks": l.num_blocks, "pruned_blocks": l.pruned_blocks,
                       "keep_ratio": 1 - l.pruned_blocks / l.num_blocks} for name, l in ctx.layers.items()},
        summary=report.summary, versions=versions(), data_config=data_config)
    if dump_dir is not None:
        report.to_json(Path(dump_dir) / "report.json")
    masks = {name: (l.grid, l.block_mask) for name, l in ctx.layers.items()}
    return CompiledModel(gm, report, plan, masks)
