"""``lpvit.finetune``: a short recovery training of a compiled model, its block structure frozen.

Every pruned layer trains as a dense weight multiplied by its fixed mask (the stored blocks of a
BlockSparseLinear, the non-zero entries of a masked dense layer), so pruned weights get no gradient and stay
zero; all other parameters (norms, embeddings, heads) train as usual. Afterwards the layers are packed back
into the same layout: the same blocks, the same ``row_ptr``/``col_idx``, new values (an int8 layer trains
its dequantised weights in float and is rounded back to int8 with new per-channel scales; its activations are
not quantized during training).

Loss per batch (labels y, student logits s, teacher logits t, temperature T):

    loss = (1 - distill_weight) * CE(s, y) + distill_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

with ``distill_weight`` 0 without a teacher and 1 without labels. AdamW, cosine learning-rate decay.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from rich.progress import Progress
from torch import nn
from torch.nn import functional as F

from ..frontend.calibration import logits_of
from ..errors import CalibrationError, ConfigError
from .evaluate import _images_and_labels
from ..quantization import channel_scales, codes
from ..runtime.modules import BlockSparseLinear, BlockSparseLinearInt8, linear_from
from ..runtime.ops import apply_epilogue


class _MaskedLinear(nn.Module):
    """y = activation(x (W * mask)^T + b) + residual, trainable W, fixed mask (a fused layer keeps its epilogue)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                 activation: str = "none"):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone() * mask)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("mask", mask.to(weight.dtype))
        self.activation = activation

    def forward(self, x, residual=None):
        return apply_epilogue(F.linear(x, self.weight * self.mask, self.bias), self.activation, residual)


def finetune(compiled, train_loader: Iterable, epochs: int = 1, teacher: nn.Module | None = None,
             lr: float = 1e-4, weight_decay: float = 0.0, temperature: float = 1.0,
             distill_weight: float | None = None, progress: bool = True):
    """Return a fine-tuned copy of ``compiled`` (a :class:`~lpvit_compiler.CompiledModel`); the input is not
    modified. ``train_loader`` yields (images, labels) pairs or dicts with ``pixel_values``/``labels``
    (labels may be omitted with a teacher: batches of images only). ``distill_weight`` defaults to 0.5 with a
    teacher and labels."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive int, got {epochs!r}")
    if distill_weight is None:
        distill_weight = 0.5 if teacher is not None else 0.0
    if not 0.0 <= distill_weight <= 1.0 or (distill_weight > 0 and teacher is None):
        raise ConfigError(f"distill_weight must be in [0, 1] and needs a teacher, got {distill_weight} with "
                          f"teacher={'given' if teacher is not None else 'None'}")
    result = copy.deepcopy(compiled)
    gm = result.graph_module
    for parameter in gm.parameters():
        parameter.requires_grad_(True)
    layouts = {}
    for row in result.report.layers:
        module = gm.get_submodule(row.name)
        if isinstance(module, BlockSparseLinear):
            layouts[row.name] = (module.block_shape, isinstance(module, BlockSparseLinearInt8))
            gm.set_submodule(row.name, _MaskedLinear(module.to_dense(), module.bias, module.element_mask(),
                                                     module.activation))
        else:
            layouts[row.name] = None
            gm.set_submodule(row.name, _MaskedLinear(module.weight, module.bias, module.weight != 0))
    teacher_mode = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    steps = epochs * len(train_loader) if hasattr(train_loader, "__len__") else None
    optimizer = torch.optim.AdamW(gm.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
                if steps else None)
    gm.train()
    try:
        with Progress(disable=not progress) as bar:
            task = bar.add_task("finetune", total=steps)
            for _ in range(epochs):
                for index, batch in enumerate(train_loader):
                    images, labels = _unpack(batch, index, teacher is not None)
                    student = logits_of(gm(images))
                    loss = student.new_zeros(())
                    if distill_weight < 1 and labels is not None:
                        loss = loss + (1 - distill_weight) * F.cross_entropy(student, labels)
                    if distill_weight > 0:
                        with torch.no_grad():
                            target = logits_of(teacher(images))
                        loss = loss + distill_weight * temperature ** 2 * F.kl_div(
                            F.log_softmax(student / temperature, -1), F.log_softmax(target / temperature, -1),
                            log_target=True, reduction="batchmean")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if schedule is not None:
                        schedule.step()
                    bar.advance(task)
    finally:
        if teacher is not None:
            teacher.train(teacher_mode)
    gm.eval()
    for name, layout in layouts.items():
        masked = gm.get_submodule(name)
        weight, mask = masked.weight.detach() * masked.mask, masked.mask.bool()
        bias = masked.bias.detach() if masked.bias is not None else None
        if layout is not None and layout[1]:  # an int8 layer: trained in float, rounded back to int8
            scales = channel_scales(weight, mask)
            gm.set_submodule(name, BlockSparseLinearInt8.from_quantized(codes(weight, scales), scales, bias, mask,
                                                                        layout[0], masked.activation))
        elif layout is not None:
            gm.set_submodule(name, BlockSparseLinear.from_masked_weight(weight, bias, mask, layout[0],
                                                                        masked.activation))
        else:
            gm.set_submodule(name, linear_from(weight, bias))
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    return result


def _unpack(batch, index: int, has_teacher: bool):
    if isinstance(batch, torch.Tensor):
        if not has_teacher:
            raise CalibrationError("finetune without a teacher needs labels: batches of (images, labels)")
        return batch, None
    return _images_and_labels(batch, index)
