"""``lpvit.compile``: build the options, run the pass pipeline over one compile state, package the result."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .compiled import CompiledModel, Plan, versions
from .costmodel import HardwareProfile
from .frontend.calibration import calibration_batches
from .instruments import DumpWriter, InvariantChecker, PassTimer
from .options import DEFAULT_HW, CompileOptions
from .pass_manager import PassManager
from .passes import PIPELINE
from .report import Report
from .state import CompileState

DUMP_DIR_ENV = "LPVIT_DUMP_DIR"
VERIFY_ENV = "LPVIT_VERIFY"  # "1": check every pass's invariant, as verify=True does (the test suite sets it)
VERIFY_PROBE_IMAGES = 2


def compile(
    model: nn.Module,
    hw: str | HardwareProfile = DEFAULT_HW,
    *,
    calib=None,
    flops_keep: float | None = None,
    target_speedup: float | None = None,
    power_keep: float | None = None,
    block_shape=None,
    dump_dir=None,
    leaf_modules: Sequence = (),
    concrete_args: dict | None = None,
    progress: bool = True,
    data_config: dict | None = None,
    **options,
) -> CompiledModel:
    """Compile ``model`` into a block-sparse model under one budget (default ``flops_keep=0.5``).

    Args:
        model: a ViT (timm, torchvision, Hugging Face) in any mode; it is copied, never modified.
        hw: hardware profile name (``"cpu"``, ``"native"``, ``"a100"``, ...) or a :class:`HardwareProfile`.
        calib: calibration images: a tensor [N, C, H, W] or an iterable of batches ([B, C, H, W] tensors,
            (images, labels) pairs or dicts with ``pixel_values``), preprocessed as the model expects.
        flops_keep / target_speedup / power_keep: the budget — FLOPs fraction of the prunable linears to keep,
            predicted model speedup on ``hw``, or fraction of their predicted power to keep. Give one.
        block_shape: (rows, cols) of a weight block (default: the profile's).
        dump_dir: write a numbered dump after every pass here (or set ``LPVIT_DUMP_DIR``).
        leaf_modules / concrete_args: help torch.fx capture (module types or names to keep opaque).
        progress: show progress bars.
        data_config: the preprocessing the model expects (timm data config), stored in the plan and in
            exported ONNX files for ``lpvit eval``.
        **options: the tuning options of :class:`~lpvit_compiler.options.CompileOptions`, each with its default
            and meaning there: ``importance`` ("obs"), ``sensitivity`` ("layer"), ``min_density`` (0.05),
            ``power_weight`` (0), ``power_model`` ("energy"), ``damping``, ``hessian_damping`` (0.01),
            ``obs_damping`` (1: OBS's ridge max(hessian_damping, obs_damping * K / T), the scores' and the
            refit's), ``prune_heads`` (False),
            ``layers``, ``calib_batch_size`` (32), ``dense_fallback`` (True), ``fold_scales`` (True),
            ``reconstruct`` (True), ``reconstruct_images`` (enough for 25,216 live tokens, at least 128),
            ``block_recovery`` (True), ``recovery_tflops`` (20), ``recovery_seconds`` (no cap), ``recovery_steps``
            (1000), ``recovery_lr`` (3e-4), ``model_recovery_tflops`` (5; 0: off), ``model_recovery_lr`` (3e-6),
            ``verify`` (False).
    """
    opts = CompileOptions.build(hw, flops_keep=flops_keep, target_speedup=target_speedup, power_keep=power_keep,
                                block_shape=block_shape, **options)
    if os.environ.get(VERIFY_ENV) == "1":
        opts = dataclasses.replace(opts, verify=True)
    batches = calibration_batches(calib, opts.calib_batch_size)
    state = CompileState(options=opts, calibration=batches, model=model, leaf_modules=leaf_modules,
                         concrete_args=concrete_args, progress=progress)
    dump_dir = dump_dir if dump_dir is not None else os.environ.get(DUMP_DIR_ENV)
    timer = PassTimer(dump_dir)
    instruments = [timer, *([DumpWriter(dump_dir, timer)] if dump_dir is not None else []),
                   *([InvariantChecker(batches[0][:VERIFY_PROBE_IMAGES])] if opts.verify else [])]
    gm = PassManager(PIPELINE, instruments).run(state)

    report = Report.from_state(state, timer.timings)
    plan = Plan(
        options=opts.to_dict(), capture=state.capture_method, input_shape=list(batches[0].shape[1:]),
        layers={name: {"weight_shape": [layer.out_features, layer.in_features],
                       "block_shape": list(layer.grid.block_shape), "blocks": layer.num_blocks,
                       "pruned_blocks": layer.pruned_blocks, "keep_ratio": 1 - layer.pruned_blocks / layer.num_blocks}
                for name, layer in state.layers.items()},
        summary=report.summary, versions=versions(), data_config=data_config)
    if dump_dir is not None:
        report.to_json(Path(dump_dir) / "report.json")
    masks = {name: (layer.grid, layer.block_mask) for name, layer in state.layers.items()}
    return CompiledModel(gm, report, plan, masks)
