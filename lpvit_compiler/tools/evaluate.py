"""``lpvit.evaluate``: top-1 accuracy of a torch model or an onnxruntime session on labelled batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ..frontend.calibration import logits_of
from ..errors import CalibrationError


def _images_and_labels(batch, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping) and "pixel_values" in batch and "labels" in batch:
        return batch["pixel_values"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise CalibrationError(f"evaluation batch {index} is a {type(batch).__name__}; expected (images, labels) "
                           "pairs or dicts with 'pixel_values' and 'labels'")


def evaluate(model_or_session, loader: Iterable, limit: int | None = None, progress=None) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model_or_session`` on ``loader``.

    Args:
        model_or_session: an ``nn.Module`` (run in eval mode under no_grad; its mode is restored afterwards)
            or an ``onnxruntime.InferenceSession`` whose first input takes the images.
        loader: batches of (images [B, C, H, W], labels [B]) or dicts with ``pixel_values`` and ``labels``.
        limit: stop after this many images.
        progress: an optional callable(images_done) called after each batch (e.g. a progress bar's update).
    """
    is_module = isinstance(model_or_session, torch.nn.Module)
    if not is_module and not hasattr(model_or_session, "get_inputs"):
        raise CalibrationError(f"evaluate takes a torch nn.Module or an onnxruntime InferenceSession, "
                               f"got {type(model_or_session).__name__}")
    was_training = is_module and model_or_session.training
    if is_module:
        model_or_session.eval()
    correct = seen = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                images, labels = _images_and_labels(batch, index)
                if limit is not None:
                    images, labels = images[: limit - seen], labels[: limit - seen]
                if is_module:
                    predicted = logits_of(model_or_session(images)).argmax(-1)
                else:
                    feed = {model_or_session.get_inputs()[0].name: np.ascontiguousarray(images.numpy(), np.float32)}
                    predicted = torch.from_numpy(model_or_session.run(None, feed)[0].argmax(-1))
                correct += int((predicted == torch.as_tensor(labels)).sum())
                seen += len(labels)
                if progress is not None:
                    progress(len(labels))
                if limit is not None and seen >= limit:
                    break
    finally:
        if was_training:
            model_or_session.train()
    if seen == 0:
        raise CalibrationError("the evaluation loader yielded no images")
    return correct / seen
