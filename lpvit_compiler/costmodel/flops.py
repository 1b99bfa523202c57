"""Whole-model work of a graph per image — FLOPs counted by ``torch.utils.flop_counter`` (attention included) and
the bytes the memory-bound ops move — and the tokens its layers see.

Memory-bound ops are every op the FLOP counter has no formula for (norms, activations, softmax, residual adds,
copies, the token passes' selection and merging): each moves its tensor inputs and outputs once,

    bytes = sum over such ops of (bytes of its tensor arguments + bytes of its outputs)      (views move none)

(``_unsafe_view`` too: a reshape, though not tagged a view). Fused attention (SDPA), which onnxruntime runs as
explicit ops, moves what the explicit form's memory-bound ops do — the scaled queries read and written, the
probabilities B x H x N_q x N_k read and written by the softmax, the output read and written by the transpose back
to [B, N, C] (where torch itself does not copy it, which is then counted as any copy):

    2 * (bytes of q) + 2 * 4 * B * H * N_q * N_k + 2 * (bytes of the output)

So the cost model sees elementwise work grow with the tokens and attention's with their square
(costmodel.profiles: ``elementwise_bandwidth``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..linalg import onednn_available, onednn_product_flops


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, taught the flash-attention kernel SDPA runs on CPU and the oneDNN product linear layers
    run on under ``linalg.gemm_products`` (it has no formula for either): a count is the same on either GEMM."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        **({torch.ops.mkldnn._linear_pointwise: onednn_product_flops} if onednn_available() else {})})


class ModelWork(NamedTuple):
    """What one image costs the whole model."""

    flops: float
    memory_bytes: float  # moved by the memory-bound ops (module docstring)


class _MemoryTraffic(TorchDispatchMode):
    """Sums the bytes the memory-bound ops move (module docstring); ``counted``: the ops whose FLOPs are counted."""

    def __init__(self, counted):
        super().__init__()
        self.counted = counted
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view:
            return out
        if func.overloadpacket is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            q, k, output = args[0], args[1], out[0]
            self.bytes += 2 * q.numel() * q.element_size() + 2 * 4 * q.shape[:-1].numel() * k.shape[-2]
            if output.transpose(1, 2).is_contiguous():  # else torch copies it back to [B, N, C]: counted there
                self.bytes += 2 * output.numel() * output.element_size()
        elif func.overloadpacket not in self.counted:
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor))
        return out


def model_work_per_image(model: nn.Module, image: torch.Tensor) -> ModelWork:
    """Forward FLOPs and memory-bound bytes of one image (``image`` [1, ...])."""
    counter = flop_counter()
    with torch.no_grad(), counter, _MemoryTraffic(set(counter.flop_registry)) as traffic:
        model(image)
    return ModelWork(float(counter.get_total_flops()), float(traffic.bytes))


def tokens_and_work(model: nn.Module, layer_names, image: torch.Tensor) -> tuple[dict[str, int], ModelWork]:
    """({layer: tokens per image}, the model's work) of one image in one run: the tokens are the rows of each
    named layer's input."""
    tokens = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: tokens.__setitem__(name, args[0].numel() // args[0].shape[-1]))
        for name in layer_names]
    try:
        work = model_work_per_image(model, image)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens, work
