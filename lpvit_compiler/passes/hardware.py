"""Hardware analysis: FLOPs, latency, energy and power of every prunable layer as a function of pruning.

Input: layers with ``tokens`` and ``prune_order`` (from importance) and the profile ``options.hw``.
Output: the graph unchanged; per layer, ``curves`` over k = blocks pruned (0 .. num_blocks), per inference:

    flops[k]   = 2 * tokens * (real weight elements in the kept blocks)      per image, exact for edge blocks
    sparse_faster[k] = block-sparse latency(num_blocks - k) < dense latency  (roofline model, costmodel/profiles.py)
    latency[k], energy[k] = the block-sparse kernel's, or with dense_fallback where it is not faster, the dense
                            GEMM's (the layout pass then keeps that layer dense)
    power[k]   = energy[k]  or, with power_model="lpvit", (num_blocks - k) * floor(in_features / 16)

and ``state.model_costs``, the dense whole model's figures (with token or head pruning, the model before them:
its FLOPs and each layer at its original token count and shape, so speedups and FLOPs kept count them too);
the manager then computes every layer's current ``costs`` (state.py). The whole model's work comes from one
image (costmodel/flops.py): its FLOPs from ``torch.utils.flop_counter`` (attention included) and the bytes its
memory-bound ops move; what is not in the prunable linears is ``other``, its FLOPs at dense throughput and its
bytes at the profile's ``elementwise_bandwidth``:

    other latency = other_flops / peak_flops + other_bytes / elementwise_bandwidth      (per image, x batch_size)
"""

from __future__ import annotations

import numpy as np
from torch import fx

from ..blocks import BlockGrid
from ..costmodel import layer_costs, lpvit_power_proxy
from ..costmodel.flops import ModelWork, model_work_per_image
from ..pass_manager import PassResult, compiler_pass
from ..state import CompileState, CostCurves, LayerState, ModelCosts
from .importance import sample_at_ratios


def cost_curves(state: CompileState, layer: LayerState) -> CostCurves:
    """The layer's curves over k = blocks pruned at its current ``tokens`` (formulas in the module docstring)."""
    hw, grid = state.options.hw, layer.grid
    counts = grid.element_counts().flatten().numpy()[layer.prune_order]
    kept_elements = counts.sum() - np.concatenate([[0], np.cumsum(counts)])
    kept_blocks = layer.num_blocks - np.arange(layer.num_blocks + 1)
    dense = layer_costs(hw, layer.tokens, (layer.out_features, layer.in_features), grid.block_shape, layer.num_blocks)
    int8 = state.options.quantize == "int8"  # int8 layers always run the int8 kernel (bsr_layout)
    sparse_latency, sparse_energy = hw.linear_cost(layer.tokens, kept_blocks, grid.block_shape,
                                                   layer.in_features, layer.out_features, sparse=True, int8=int8)
    sparse_faster = sparse_latency < dense.dense_latency_s
    use_sparse = sparse_faster if state.options.dense_fallback and not int8 else np.ones_like(sparse_faster)
    latency = np.where(use_sparse, sparse_latency, dense.dense_latency_s)
    energy = np.where(use_sparse, sparse_energy, dense.dense_energy_j)
    power = lpvit_power_proxy(kept_blocks, layer.in_features) if state.options.power_model == "lpvit" else energy
    return CostCurves(flops=2.0 * layer.tokens * kept_elements, latency=latency, energy=energy, power=power,
                      sparse_faster=sparse_faster, dense=dense)


def whole_model_costs(state: CompileState, work: ModelWork) -> ModelCosts:
    """The dense model's costs from the graph's ``work`` per image and the layers' current curves; with token or
    head pruning, "dense" is the model before them (``state.unpruned``)."""
    hw = state.options.hw
    prunable_flops = sum(layer.curves.flops[0] for layer in state.layers.values())
    other_flops = max(0.0, work.flops - prunable_flops)
    other_latency, other_energy = hw.other_cost(other_flops, work.memory_bytes)
    original = state.unpruned  # the model before token/head pruning: what speedups and FLOPs compare with
    if original is None:
        dense = [layer.curves.dense for layer in state.layers.values()]
        original_flops, original_other = work.flops, (other_latency, other_energy)
    else:
        dense = [layer_costs(hw, original.tokens[name], original.shapes[name], layer.grid.block_shape,
                             BlockGrid(*original.shapes[name], layer.grid.block_shape).num_blocks)
                 for name, layer in state.layers.items()]
        original_flops = original.work.flops
        original_other = hw.other_cost(max(0.0, original_flops - sum(d.flops_dense for d in dense)),
                                       original.work.memory_bytes)
    return ModelCosts(
        hw_batch_size=hw.batch_size, model_flops=original_flops, other_flops=other_flops,
        other_bytes=work.memory_bytes, other_latency_s=other_latency, other_energy_j=other_energy,
        dense_latency_s=original_other[0] + sum(d.dense_latency_s for d in dense),
        dense_energy_j=original_other[1] + sum(d.dense_energy_j for d in dense),
        dense_linear_energy_j=sum(d.dense_energy_j for d in dense))


@compiler_pass(requires=("importance",), provides=("curves", "costs", "model_costs"), changes_costs=True)
def hardware(gm: fx.GraphModule, state: CompileState) -> PassResult:
    per_layer = {}
    for name, layer in state.layers.items():
        layer.curves = curves = cost_curves(state, layer)
        kept_blocks = layer.num_blocks - np.arange(layer.num_blocks + 1)
        per_layer[name] = {
            "tokens": layer.tokens,
            "dense_flops": curves.flops[0],
            "dense_latency_us": curves.dense.dense_latency_s * 1e6,
            "sparse_kernel_faster_below_density": float((kept_blocks[curves.sparse_faster].max() if
                                                         curves.sparse_faster.any() else 0) / layer.num_blocks),
            "sparse_latency_us_at_ratio_0_to_1_step_0.01": sample_at_ratios(curves.latency) * 1e6,
            "power_at_ratio_0_to_1_step_0.01": sample_at_ratios(curves.power),
        }
    work = model_work_per_image(gm, state.calibration[0][:1])
    model_flops = work.flops
    prunable_flops = sum(layer.curves.flops[0] for layer in state.layers.values())
    state.model_costs = whole_model_costs(state, work)
    original = state.unpruned
    decisions = {
        "profile": state.options.hw.to_dict(),
        "power_model": state.options.power_model,
        "model_flops_per_image": model_flops,
        "model_flops_per_image_before_token_and_head_pruning": None if original is None else original.work.flops,
        "memory_bound_bytes_per_image": work.memory_bytes,
        "memory_bound_bytes_per_image_before_token_and_head_pruning":
            None if original is None else original.work.memory_bytes,
        "predicted_memory_bound_latency_ms": state.options.hw.other_cost(0.0, work.memory_bytes)[0] * 1e3,
        "prunable_linear_flops_per_image": prunable_flops,
        "prunable_share_of_model_flops": prunable_flops / model_flops if model_flops else None,
        "predicted_dense_latency_ms": state.model_costs.dense_latency_s * 1e3,
        "layers": per_layer,
    }
    return PassResult(gm, False, decisions)
