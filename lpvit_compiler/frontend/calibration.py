"""Calibration data: normalising what users pass, and reading logits from what models return."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..errors import CalibrationError


def _images_of(batch) -> torch.Tensor:
    """The input tensor of one batch: a tensor, an (images, labels) pair, or a dict with pixel_values (or
    input_ids, for text models)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and ("pixel_values" in batch or "input_ids" in batch):
        return batch["pixel_values"] if "pixel_values" in batch else batch["input_ids"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise CalibrationError(
        f"calibration batch of type {type(batch).__name__} is not understood; pass image tensors [B, C, H, W], "
        "(images, labels) pairs, or dicts with 'pixel_values'"
    )


def _is_token_ids(batch: torch.Tensor) -> bool:
    return batch.dim() == 2 and not batch.is_floating_point() and batch.dtype != torch.bool


def calibration_batches(calib, batch_size: int) -> list[torch.Tensor]:
    """Normalise ``calib`` (a tensor [N, C, H, W] or an iterable of batches) into float tensors [B, C, H, W];
    integer token ids [N, T] (text transformers whose forward takes input_ids) pass through as they are."""
    if calib is None:
        raise CalibrationError("calib is required: pass calibration images, e.g. a tensor [N, 3, 224, 224] "
                               "or a DataLoader yielding (images, labels)")
    if isinstance(calib, torch.Tensor):
        batches = list(torch.split(calib, batch_size)) if calib.dim() == 4 or _is_token_ids(calib) else [calib]
    elif isinstance(calib, Iterable):
        batches = [_images_of(b) for b in calib]
    else:
        raise CalibrationError(f"calib of type {type(calib).__name__} is not a tensor or an iterable of batches")
    if not batches:
        raise CalibrationError("calib is empty: pass at least one batch of images")
    first = batches[0]
    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor) and _is_token_ids(batch) and _is_token_ids(first):
            if batch.shape[1:] != first.shape[1:]:
                raise CalibrationError(f"calibration batch {i} has shape {tuple(batch.shape)} but batch 0 has "
                                       f"{tuple(first.shape)}; pad every batch of token ids to the same length")
            continue
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise CalibrationError(f"calibration batch {i} has shape {shape}; expected images [B, C, H, W]")
        if not batch.is_floating_point():
            raise CalibrationError(f"calibration batch {i} has dtype {batch.dtype}; expected float images "
                                   "(normalised as the model expects)")
        if batch.shape[1:] != first.shape[1:]:
            raise CalibrationError(f"calibration batch {i} has shape {tuple(batch.shape)} but batch 0 has "
                                   f"{tuple(first.shape)}; all batches need the same [C, H, W]")
    return [b if _is_token_ids(b) else b.float() for b in batches]


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a model's output (tensor, tuple, HF ModelOutput or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and output:
        return logits_of(output.get("logits", next(iter(output.values()))))
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise CalibrationError(f"the model returned {type(output).__name__}; expected logits (a tensor, a tuple "
                           "starting with one, or an object with .logits)")


def expected_input_shape(model: torch.nn.Module) -> str:
    """Best-effort description of the input a model expects, for error messages."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return f"[B, {c}, {h}, {w}]"
    patch_embed = getattr(model, "patch_embed", None)  # timm models built without a pretrained config
    img_size, proj = getattr(patch_embed, "img_size", None), getattr(patch_embed, "proj", None)
    if img_size is not None and hasattr(proj, "in_channels"):
        return f"[B, {proj.in_channels}, {img_size[0]}, {img_size[1]}]"
    hf = getattr(model, "config", None)
    if hf is not None and hasattr(hf, "image_size"):
        return f"[B, {getattr(hf, 'num_channels', 3)}, {hf.image_size}, {hf.image_size}]"
    if hasattr(model, "image_size"):
        return f"[B, 3, {model.image_size}, {model.image_size}]"
    return "[B, C, H, W] as the model was built for"
