"""Hardware analysis: FLOPs, latency, energy and power of every prunable layer as a function of pruning.

Input: layers with ``tokens`` and ``prune_order`` (from importance) and the profile ``options.hw``.
Output: the graph unchanged; per layer, curves over k = blocks pruned (0 .. num_blocks), per inference:

    flops[k]   = 2 * tokens * (real weight elements in the kept blocks)      per image, exact for edge blocks
    sparse_faster[k] = block-sparse latency(num_blocks - k) < dense latency  (roofline model, hardware.py)
    latency[k], energy[k] = the block-sparse kernel's, or with dense_fallback where it is not faster, the dense
                            GEMM's (the layout pass then keeps that layer dense)
    power[k]   = energy[k]  or, with power_model="lpvit", (num_blocks - k) * floor(in_features / 16)

and the dense figures of each layer and of the whole model. The whole model's FLOPs come from
``torch.utils.flop_counter`` on one image (attention included); what is not in the prunable linears is
costed at dense throughput as ``other``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..state import CompileContext
from ..costmodel.profiles import lpvit_power_proxy
from ..pass_manager import PassResult
from .importance import sample_at_ratios


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def model_flops_per_image(gm: fx.GraphModule, image: torch.Tensor) -> float:
    """Forward FLOPs of one image (torch.utils.flop_counter; CPU attention counted too)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        gm(image)
    return float(counter.get_total_flops())


def hardware(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    hw = ctx.options.hw
    per_layer = {}
    for name, layer in ctx.layers.items():
        grid = layer.grid
        counts = grid.element_counts().flatten().numpy()[layer.prune_order]
        kept_elements = counts.sum() - np.concatenate([[0], np.cumsum(counts)])
        kept_blocks = layer.num_blocks - np.arange(layer.num_blocks + 1)
        layer.flops = 2.0 * layer.tokens * kept_elements
        sparse_latency, sparse_energy = hw.linear_cost(layer.tokens, kept_blocks, grid.block_shape,
                                                       layer.in_features, layer.out_features, sparse=True)
        dense_latency, dense_energy = hw.linear_cost(
            layer.tokens, layer.out_features * layer.in_features / np.prod(grid.block_shape), grid.block_shape,
            layer.in_features, layer.out_features, sparse=False)
        layer.dense_latency, layer.dense_energy = float(dense_latency), float(dense_energy)
        layer.sparse_faster = sparse_latency < dense_latency
        use_sparse = layer.sparse_faster if ctx.options.dense_fallback else np.ones_like(layer.sparse_faster)
        layer.latency = np.where(use_sparse, sparse_latency, dense_latency)
        layer.energy = np.where(use_sparse, sparse_energy, dense_energy)
        if ctx.options.power_model == "lpvit":
            layer.power = lpvit_power_proxy(kept_blocks, layer.in_features)
        else:
            layer.power = layer.energy
        per_layer[name] = {
            "tokens": layer.tokens,
            "dense_flops": layer.flops[0],
            "dense_latency_us": layer.dense_latency * 1e6,
            "sparse_kernel_faster_below_density": float((kept_blocks[layer.sparse_faster].max() if
                                                         layer.sparse_faster.any() else 0) / layer.num_blocks),
            "sparse_latency_us_at_ratio_0_to_1_step_0.01": sample_at_ratios(layer.latency) * 1e6,
            "power_at_ratio_0_to_1_step_0.01": sample_at_ratios(layer.power),
        }
    ctx.model_flops = model_flops_per_image(gm, ctx.calibration[0][:1])
    prunable_flops = sum(layer.flops[0] for layer in ctx.layers.values())
    ctx.other_flops = max(0.0, ctx.model_flops - prunable_flops)
    other_latency, other_energy = hw.other_cost(ctx.other_flops)
    ctx.summary.update(
        hw_batch_size=hw.batch_size,
        other_latency_s=other_latency,
        other_energy_j=other_energy,
        dense_latency_s=other_latency + sum(layer.dense_latency for layer in ctx.layers.values()),
        dense_energy_j=other_energy + sum(layer.dense_energy for layer in ctx.layers.values()),
    )
    decisions = {
        "profile": hw.to_dict(),
        "power_model": ctx.options.power_model,
        "model_flops_per_image": ctx.model_flops,
        "prunable_linear_flops_per_image": prunable_flops,
        "prunable_share_of_model_flops": prunable_flops / ctx.model_flops if ctx.model_flops else None,
        "predicted_dense_latency_ms": ctx.summary["dense_latency_s"] * 1e3,
        "layers": per_layer,
    }
    return PassResult(gm, False, decisions)
