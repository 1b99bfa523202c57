"""Whole-model FLOPs of a graph, counted by ``torch.utils.flop_counter`` (attention included), and the tokens
its layers see."""

from __future__ import annotations

import torch
from torch import nn
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


def model_flops_per_image(model: nn.Module, image: torch.Tensor) -> float:
    """Forward FLOPs of one image (CPU attention counted too)."""
    with torch.no_grad(), flop_counter() as counter:
        model(image)
    return float(counter.get_total_flops())


def tokens_and_flops(model: nn.Module, layer_names, image: torch.Tensor) -> tuple[dict[str, int], float]:
    """({layer: tokens per image}, forward FLOPs) of one image in one run: the tokens are the rows of each
    named layer's input."""
    tokens = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: tokens.__setitem__(name, args[0].numel() // args[0].shape[-1]))
        for name in layer_names]
    try:
        flops = model_flops_per_image(model, image)
    finally:
        for hook in hooks:
            hook.remove()
    return tokens, flops
