"""Block-level recovery: regions found from the traced module stack, the Adam fit never worse than its start on
calibration data, masks frozen, exact where the pruned part is redundant, and the option in a compile."""

import importlib
import json
import math
import weakref

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.costmodel.flops import flop_counter
from lpvit_compiler.frontend.regions import block_regions, whole_model_region
from lpvit_compiler.passes.block_recovery import STEP_IMAGES, _step_scales, recover_block, run_region
from lpvit_compiler.quantization import quantize_nearest
from lpvit_compiler.state import LayerState

from conftest import tiny_vit

WIDTH, BLOCK = 32, (8, 8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _setup(density=0.5, zero_pruned=False, seed=0):
    """(dense net, traced copy with masked weights, layer states, calibration chunks)."""
    dense = Net().eval()
    gm = fx.symbolic_trace(Net().eval())
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"):
        weight = gm.get_submodule(name).weight
        layer = LayerState(name, BlockGrid(*weight.shape, BLOCK))
        layer.block_mask = torch.rand(layer.grid.block_rows, layer.grid.block_cols, generator=g) < density
        with torch.no_grad():
            if zero_pruned:  # the pruned blocks carry nothing: pruning them changes nothing
                dense.get_submodule(name).weight.mul_(layer.element_mask())
                weight.copy_(dense.get_submodule(name).weight)
            weight.mul_(layer.element_mask())
        layers[name] = layer
    chunks = [torch.randn(8, 5, WIDTH, generator=g) for _ in range(3)]
    return dense, gm, layers, chunks


def _region_data(dense, region, chunks):
    """Pruned-model inputs (the calibration chunks: region 0 reads the graph input) and dense targets."""
    with torch.no_grad():
        return {region.inputs[0]: chunks}, [[dense.blocks[0](c) for c in chunks]]


def test_regions_are_the_numbered_blocks_of_a_traced_model():
    _, gm, layers, _ = _setup()
    regions = block_regions(gm, layers)
    assert [r.name for r in regions] == ["blocks.0", "blocks.1"]
    assert [r.layers for r in regions] == [["blocks.0.fc1", "blocks.0.fc2"], ["blocks.1.fc1", "blocks.1.fc2"]]
    assert all(len(r.inputs) == 1 and len(r.outputs) == 1 for r in regions)
    assert regions[0].outputs[0] in regions[1].inputs  # block 1 reads block 0's output
    # a timm ViT: one region per block, each holding its four prunable linears
    vit = fx.symbolic_trace(tiny_vit())
    names = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks")]
    vit_layers = {n: LayerState(n, BlockGrid(*vit.get_submodule(n).weight.shape, (16, 16))) for n in names}
    assert [(r.name, len(r.layers)) for r in block_regions(vit, vit_layers)] == [("blocks.0", 4), ("blocks.1", 4)]


@pytest.mark.parametrize("seed", [0, 1])
def test_recovery_lowers_the_block_loss_and_keeps_the_masks(seed):
    dense, gm, layers, chunks = _setup(seed=seed)
    region = block_regions(gm, layers)[0]
    inputs, targets = _region_data(dense, region, chunks)
    result, returned = recover_block(gm, region, layers, inputs, targets, steps=60, flops=math.inf, lr=3e-3, int8=False)
    assert result["kept"] and result["loss_after"] < 0.7 * result["loss_before"]
    for name in region.layers:  # nothing pruned came back
        weight = gm.get_submodule(name).weight
        assert torch.equal(weight * ~layers[name].element_mask(), torch.zeros_like(weight))
    # the recorded loss is the region's real loss on the calibration chunks
    outputs = run_region(gm, region, layers, inputs, int8=False)[0]
    num = sum(float((o - t).pow(2).sum()) for o, t in zip(outputs, targets[0]))
    den = sum(float(t.pow(2).sum()) for t in targets[0])
    assert num / den == pytest.approx(result["loss_after"], rel=1e-4)
    for got, fresh in zip(returned[0], outputs):  # what the pruned stream continues from
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)


def test_step_scales_follow_the_rows_and_columns_folding_scaled():
    # W = diag(a) U diag(b) with |U| = 1 over the kept entries: every weight's step factor is a_i b_j over the
    # RMS of a and b (so folded LayerScale rows and LayerNorm columns move at their own scale), 0 where pruned
    # rows' RMS comes from kept entries only
    _, gm, layers, _ = _setup()
    region = block_regions(gm, layers)[0]
    g = torch.Generator().manual_seed(3)
    fc1 = gm.get_submodule("blocks.0.fc1")
    a, b = torch.rand(2 * WIDTH, generator=g) + 0.1, torch.rand(WIDTH, generator=g) * 10 + 0.1
    full = torch.ones(layers["blocks.0.fc1"].grid.block_rows, layers["blocks.0.fc1"].grid.block_cols, dtype=torch.bool)
    layers["blocks.0.fc1"].block_mask = full
    with torch.no_grad():
        signs = torch.randint(0, 2, fc1.weight.shape, generator=g) * 2.0 - 1
        fc1.weight.copy_(a[:, None] * signs * b[None, :])
    scales = _step_scales(gm, region, layers)
    rms_a, rms_b = a.square().mean().sqrt(), b.square().mean().sqrt()
    torch.testing.assert_close(scales[id(fc1.weight)], a[:, None] * b[None, :] / (rms_a * rms_b))
    torch.testing.assert_close(scales[id(fc1.bias)], a / rms_a)
    assert set(scales) >= {id(gm.get_submodule("blocks.0.fc2").weight), id(gm.get_submodule("blocks.0.fc2").bias)}


@pytest.mark.parametrize("budget", [{"flops": 0.0}, {"flops": math.inf, "seconds": 0.0}])
def test_no_budget_means_no_steps(budget):
    dense, gm, layers, chunks = _setup()
    region = block_regions(gm, layers)[0]
    inputs, targets = _region_data(dense, region, chunks)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result, _ = recover_block(gm, region, layers, inputs, targets, steps=50, lr=3e-3, int8=False, **budget)
    assert result["steps"] == 0 and not result["kept"]
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_the_flop_budget_sets_the_number_of_steps():
    # one step on STEP_IMAGES images of 5 tokens: fc1 and fc2 are 2 * rows * 32 * 64 FLOPs forward each, and
    # their backward twice that (input and weight gradients: the LayerNorm before fc1 has parameters)
    dense, gm, layers, chunks = _setup()
    region = block_regions(gm, layers)[0]
    inputs, targets = _region_data(dense, region, chunks)
    step = 3 * 2 * (2 * STEP_IMAGES * 5 * WIDTH * 2 * WIDTH)
    result, _ = recover_block(gm, region, layers, inputs, targets, steps=50, flops=7.5 * step, lr=3e-3,
                              int8=False)
    assert result["steps"] == 7 and result["flops"] == 7 * step
    capped, _ = recover_block(gm, region, layers, inputs, targets, steps=3, flops=7.5 * step, lr=3e-3, int8=False)
    assert capped["steps"] == 3


def test_the_step_count_includes_attention_on_cpu():
    # SDPA on CPU runs a flash-attention kernel torch's counter has no formula for; Q K^T and A V are
    # 2 * b * h * s * s * d FLOPs each
    b, h, s, d = 2, 3, 17, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * b * h * s * s * d)


def test_a_diverging_fit_is_undone():
    dense, gm, layers, chunks = _setup()
    region = block_regions(gm, layers)[0]
    inputs, targets = _region_data(dense, region, chunks)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result, returned = recover_block(gm, region, layers, inputs, targets, steps=20, flops=math.inf, lr=0.9, int8=False)
    assert not result["kept"] and result["loss_after"] >= result["loss_before"]
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # never worse than the start
    for got, fresh in zip(returned[0], run_region(gm, region, layers, inputs, int8=False)[0]):
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)  # the restored block's outputs


def test_exact_and_untouched_when_the_pruned_part_is_redundant():
    dense, gm, layers, chunks = _setup(zero_pruned=True)
    region = block_regions(gm, layers)[0]
    inputs, targets = _region_data(dense, region, chunks)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result, _ = recover_block(gm, region, layers, inputs, targets, steps=20, flops=math.inf, lr=1e-2, int8=False)
    assert result["loss_before"] < 1e-12
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    for output, target in zip(run_region(gm, region, layers, inputs, int8=False)[0], targets[0]):
        torch.testing.assert_close(output, target, rtol=1e-6, atol=1e-6)


def test_int8_recovery_leaves_weights_on_their_int8_grid():
    dense, gm, layers, chunks = _setup()
    for name, layer in layers.items():
        weight = gm.get_submodule(name).weight
        with torch.no_grad():
            quantized, layer.weight_scales = quantize_nearest(weight, layer.element_mask())
            weight.copy_(quantized)
    region = block_regions(gm, layers)[0]
    inputs, targets = _region_data(dense, region, chunks)
    result, _ = recover_block(gm, region, layers, inputs, targets, steps=40, flops=math.inf, lr=3e-3, int8=True)
    assert result["loss_after"] <= result["loss_before"]
    for name in region.layers:
        weight, scales = gm.get_submodule(name).weight, layers[name].weight_scales
        grid = weight.detach() / scales[:, None]
        assert torch.allclose(grid, grid.round(), atol=1e-4) and float(grid.abs().max()) <= 127 + 1e-4
        assert torch.equal(weight * ~layers[name].element_mask(), torch.zeros_like(weight))


def test_compile_records_recovery_and_it_lowers_calibration_error(calib, tmp_path):
    model = tiny_vit()
    common = dict(hw="cpu-avx2", flops_keep=0.3, calib=calib, block_shape=16, progress=False, model_recovery_tflops=0)
    plain = lpvit.compile(model, block_recovery=False, **common)
    recovered = lpvit.compile(model, recovery_steps=80, recovery_lr=1e-3, dump_dir=tmp_path, **common)
    decisions = json.loads(next(tmp_path.glob("*-reconstruct/decisions.json")).read_text())
    blocks = decisions["block_recovery"]["blocks"]
    assert set(blocks) == {"blocks.0", "blocks.1"}
    assert all(b["loss_after"] <= b["loss_before"] for b in blocks.values())
    assert any(b["kept"] for b in blocks.values())
    for name in plain.plan.layers:  # recovery does not change what the solve chose
        assert plain.plan.layers[name]["pruned_blocks"] == recovered.plan.layers[name]["pruned_blocks"]
    with torch.no_grad():
        target = model(calib)
        errors = [float((c(calib) - target).pow(2).sum() / target.pow(2).sum()) for c in (plain, recovered)]
    assert errors[1] < errors[0]


@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}, {"token_pruning": "cascade", "patch_keep": 0.5},
                                     {"token_pruning": "merge", "patch_keep": 0.5}])
def test_the_pruned_stream_hands_recovery_the_blocks_outputs(monkeypatch, calib, options):
    # recovery starts from the outputs the reconstruction's pruned stream computed instead of running the block
    # again: they must be what the block computes now, in every kind of stream, and the same for the whole model's
    # outputs that the end-to-end step starts from
    reconstruct = importlib.import_module("lpvit_compiler.passes.reconstruct")
    seen = []

    def checked(gm, region, layers, inputs, targets, *, outputs, int8, **kwargs):
        fresh = run_region(gm, region, layers, inputs, int8)
        for streamed, computed in zip(outputs, fresh):
            for a, b in zip(streamed, computed):
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        seen.append(region.name)
        return recover_block(gm, region, layers, inputs, targets, outputs=outputs, int8=int8, **kwargs)

    monkeypatch.setattr(reconstruct, "recover_block", checked)
    lpvit.compile(tiny_vit(), hw="cpu-avx2", flops_keep=0.5, calib=calib, block_shape=16, progress=False,
                  recovery_steps=2, **options)
    assert seen == ["blocks.0", "blocks.1", "model"]


def test_a_compile_with_block_recovery_is_reproducible(calib, tmp_path):
    # the compute budget, not the wall clock, decides the steps: a second compile (here while the first one's
    # model still holds memory, in practice on another machine or under load) gives the same weights. The budget
    # is small enough that it, not the recovery_steps cap, is what ends each block's steps.
    model = tiny_vit()
    common = dict(hw="cpu-avx2", flops_keep=0.3, calib=calib, block_shape=16, progress=False, recovery_lr=1e-3,
                  recovery_tflops=0.002, recovery_steps=200)
    first, second = (lpvit.compile(model, dump_dir=tmp_path / str(i), **common).state_dict() for i in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for i in range(2):
        decisions = json.loads(next((tmp_path / str(i)).glob("*-reconstruct/decisions.json")).read_text())
        steps = [b["steps"] for b in decisions["block_recovery"]["blocks"].values()]
        assert all(0 < s < 200 for s in steps), steps


def test_the_whole_model_region_runs_the_graph_from_its_inputs_to_its_outputs():
    dense, gm, layers, chunks = _setup()
    model = whole_model_region(gm, layers)
    assert [n.op for n in model.inputs] == ["placeholder"]
    assert model.layers == list(layers)
    (outputs,) = run_region(gm, model, layers, {model.inputs[0]: chunks}, int8=False)
    for chunk, output in zip(chunks, outputs):
        torch.testing.assert_close(output, gm(chunk))


def test_a_region_run_drops_each_value_after_its_last_reader():
    """Without autograd nothing else holds a region's intermediates: the whole model on a calibration chunk must not
    keep them all alive at once (DeiT-S's end-to-end step peaked 1.5 GB higher when it did)."""
    _, gm, layers, chunks = _setup()
    model = whole_model_region(gm, layers)
    first_output, alive_at_last_layer = [], []
    first = gm.get_submodule("blocks.0.fc1").register_forward_hook(
        lambda module, args, out: first_output.append(weakref.ref(out)))
    last = gm.get_submodule("blocks.1.fc2").register_forward_hook(
        lambda module, args, out: alive_at_last_layer.append(first_output[-1]() is not None))
    try:
        run_region(gm, model, layers, {model.inputs[0]: chunks[:1]}, int8=False)
    finally:
        first.remove()
        last.remove()
    assert alive_at_last_layer == [False]


@pytest.mark.parametrize("options", [{}, {"token_pruning": "merge", "patch_keep": 0.5}])
def test_model_recovery_fits_the_outputs_and_leaves_the_masks(calib, tmp_path, options):
    model = tiny_vit()
    common = dict(hw="cpu-avx2", flops_keep=0.3, calib=calib, block_shape=16, progress=False, recovery_steps=40,
                  recovery_lr=1e-3, **options)
    plain = lpvit.compile(model, model_recovery_tflops=0, **common)
    fitted = lpvit.compile(model, model_recovery_tflops=0.05, dump_dir=tmp_path, **common)
    decisions = json.loads(next(tmp_path.glob("*-reconstruct/decisions.json")).read_text())["model_recovery"]
    assert decisions["kept"] and 0 < decisions["steps"] <= 40
    assert decisions["loss_after"] < decisions["loss_before"]
    assert any(n.startswith("end-to-end recovery: ") and n.endswith("kept") for n in fitted.report.notes)
    for name in plain.plan.layers:  # the same blocks pruned; pruned weights stay 0 (the layout stores kept ones)
        assert plain.plan.layers[name]["pruned_blocks"] == fitted.plan.layers[name]["pruned_blocks"]
    with torch.no_grad():
        target = model(calib)
        errors = [float((c(calib) - target).pow(2).sum() / target.pow(2).sum()) for c in (plain, fitted)]
    assert errors[1] < errors[0]
    assert errors[1] == pytest.approx(decisions["loss_after"], rel=1e-3)


def test_recovery_seconds_bounds_the_end_to_end_step_too(calib, tmp_path):
    model = tiny_vit()
    compiled = lpvit.compile(model, hw="cpu-avx2", flops_keep=0.3, calib=calib, block_shape=16, progress=False,
                             recovery_seconds=0, dump_dir=tmp_path)
    decisions = json.loads(next(tmp_path.glob("*-reconstruct/decisions.json")).read_text())
    assert all(b["steps"] == 0 for b in decisions["block_recovery"]["blocks"].values())
    assert decisions["model_recovery"] == {"steps": 0, "kept": False,
                                           "skipped": "no time left of recovery_seconds"}
    assert "end-to-end recovery skipped: no time left of recovery_seconds" in compiled.report.notes


def test_recovery_options_are_validated(model, calib):
    with pytest.raises(lpvit.ConfigError, match="recovery_steps must be a non-negative int"):
        lpvit.compile(model, calib=calib, recovery_steps=-1)
    with pytest.raises(lpvit.ConfigError, match="recovery_lr must be in"):
        lpvit.compile(model, calib=calib, recovery_lr=0)
    with pytest.raises(lpvit.ConfigError, match=r"recovery_tflops must be in \[0, inf\], got -1"):
        lpvit.compile(model, calib=calib, recovery_tflops=-1)
    with pytest.raises(lpvit.ConfigError, match=r"model_recovery_tflops must be in \[0, inf\], got -1"):
        lpvit.compile(model, calib=calib, model_recovery_tflops=-1)


class StaticBlock(Block):
    """A block whose graph has the batch size baked in (as torch.export graphs can): it runs on 16 images only."""

    def forward(self, x):
        return super().forward(x).reshape(16, -1, WIDTH)


def test_a_graph_with_a_fixed_batch_size_steps_on_whole_chunks():
    dense, _, layers, _ = _setup()
    net = Net().eval()
    net.blocks[0] = StaticBlock()
    net.blocks[0].load_state_dict(dense.blocks[0].state_dict())
    gm = fx.symbolic_trace(net)
    for name in ("blocks.0.fc1", "blocks.0.fc2"):
        with torch.no_grad():
            gm.get_submodule(name).weight.mul_(layers[name].element_mask())
    region = block_regions(gm, layers)[0]
    chunks = [torch.randn(16, 5, WIDTH, generator=torch.Generator().manual_seed(c)) for c in range(2)]
    with torch.no_grad():
        targets = [[dense.blocks[0](c) for c in chunks]]
    result, _ = recover_block(gm, region, layers, {region.inputs[0]: chunks}, targets, steps=10, flops=math.inf,
                           lr=3e-3, int8=False)
    assert result["images_per_step"] == "chunk" and result["steps"] == 10
    assert result["loss_after"] <= result["loss_before"]
