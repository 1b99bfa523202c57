"""Head pruning: the kept heads are the highest-scoring, removal is exact before the refit, the refit helps."""

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_swin, tiny_vit
from torch.fx.passes.shape_prop import ShapeProp

import lpvit_compiler as lpvit
from lpvit_compiler.errors import ConfigError
from lpvit_compiler.frontend.capture import capture
from lpvit_compiler.frontend.regions import block_regions
from lpvit_compiler.options import CompileOptions
from lpvit_compiler.passes.head_pruning import _layout, remove_heads
from lpvit_compiler.runtime.sessions import ort_session
from lpvit_compiler.state import LayerState

HEADS, DIM = 4, 16  # tiny_vit with 4 heads of 16 channels


def _model():
    model = tiny_vit(patch_size=4, depth=3, num_heads=HEADS)
    with torch.no_grad():  # peaked attention, as in trained models (see test_token_pruning)
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 64].mul_(4.0)
    return model


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(3)
    return torch.randn(32, 3, 32, 32)


def _compile(model, calib, **options):
    defaults = dict(flops_keep=1.0, calib=calib, head_keep=0.5, block_shape=16, importance="magnitude",
                    reconstruct=False, progress=False)
    return lpvit.compile(model, **{**defaults, **options})


def test_removing_heads_before_the_refit_equals_zeroing_their_outputs(calib):
    model = _model()
    gm, _ = capture(model, calib[:2])
    ShapeProp(gm).propagate(calib[:2])
    layers = {n: LayerState(n, None) for n in ("blocks.1.attn.qkv", "blocks.1.attn.proj")}
    region = next(r for r in block_regions(gm, layers) if r.name == "blocks.1")
    remove_heads(gm, _layout(gm, region, layers), [0, 2], None, 0.0)
    gm.recompile()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for head in (1, 3):
            reference.blocks[1].attn.proj.weight[:, head * DIM:(head + 1) * DIM] = 0
        torch.testing.assert_close(gm(calib[:4]), reference(calib[:4]), rtol=1e-5, atol=1e-6)
    assert gm.get_submodule("blocks.1.attn.qkv").weight.shape == (3 * 2 * DIM, 64)
    assert gm.get_submodule("blocks.1.attn.proj").weight.shape == (64, 2 * DIM)


def test_kept_heads_are_the_highest_scoring_and_the_refit_helps(calib, tmp_path):
    model = _model()
    compiled = _compile(model, calib, head_criterion="score")
    kept = compiled.report.heads_kept
    assert list(kept) == ["blocks.0", "blocks.1", "blocks.2"] and all(len(k) == 2 for k in kept.values())
    with torch.no_grad():  # CP-ViT's head score in block 0, computed directly on the timm modules
        x = model.norm_pre(model._pos_embed(model.patch_embed(calib)))
        attn = model.blocks[0].attn
        b, n, c = x.shape
        q, k, _ = attn.qkv(model.blocks[0].norm1(x)).reshape(b, n, 3, HEADS, DIM).permute(2, 0, 3, 1, 4)
        probabilities = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        scores = probabilities.max(dim=2).values.sum(dim=-1).mean(dim=0)
    assert kept["blocks.0"] == sorted(scores.topk(2).indices.tolist())
    rows = {r.name: r.weight_shape for r in compiled.report.layers}
    assert rows["blocks.0.attn.qkv"] == [3 * 2 * DIM, 64] and rows["blocks.0.attn.proj"] == [64, 2 * DIM]
    assert compiled.report.summary["model_flops_keep"] < 0.95 and compiled.report.summary["predicted_speedup"] > 1
    # the refit against zeroing the same heads' outputs
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, heads in enumerate(kept.values()):
            for head in set(range(HEADS)) - set(heads):
                zeroed.blocks[i].attn.proj.weight[:, head * DIM:(head + 1) * DIM] = 0
        x = calib[:16]
        reference = model(x)
        errors = [float((m(x) - reference).norm() / reference.norm()) for m in (zeroed, compiled)]
    assert errors[1] < errors[0], errors
    session = ort_session(str(compiled.export(tmp_path / "m.onnx")), 2, custom_ops=True)
    with torch.no_grad():
        expected = compiled(x).numpy()
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_heads_and_tokens_together(calib):
    compiled = _compile(_model(), calib, token_pruning="cascade", patch_keep=0.5, flops_keep=0.5)
    assert compiled.report.token_stages and compiled.report.heads_kept
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(compiled(x)).all()


def test_head_pruning_refuses_attention_it_cannot_read(calib):
    swin = tiny_swin()
    with pytest.raises(ConfigError, match="cannot prune this model's heads"):
        _compile(swin, calib)
    with pytest.raises(ConfigError, match="head_keep"):
        CompileOptions.build(head_keep=0.0)


def test_refit_order_removes_first_the_heads_proj_can_do_without():
    """A head proj ignores, then a head that duplicates another's output, cost nothing after the refit; the
    greedy order finds them, its errors never fall, and a third removal costs more than the free two."""
    from lpvit_compiler.passes.head_pruning import refit_order

    torch.manual_seed(0)
    heads, dim, tokens = 4, 8, 400
    x = torch.randn(tokens, heads * dim, dtype=torch.float64)
    x[:, 3 * dim:] = x[:, dim:2 * dim] @ torch.randn(dim, dim, dtype=torch.float64)  # head 3 = a map of head 1
    weight = torch.randn(16, heads * dim, dtype=torch.float64)
    weight[:, 2 * dim:3 * dim] = 0  # proj ignores head 2
    bias = torch.randn(16, dtype=torch.float64)
    removed, errors = refit_order(x, weight, bias, heads, 3, damping=0.0)
    assert 2 in removed[:2] and {1, 3} & set(removed[:2])  # both free: either order
    assert errors[0] < 1e-20 and errors[1] < 1e-20 and errors[2] > 1e-3
    assert all(later >= earlier - 1e-12 for earlier, later in zip(errors, errors[1:]))


def test_removals_go_to_the_blocks_where_they_cost_least():
    from lpvit_compiler.passes.head_pruning import allocate_removals

    # cumulative errors of 1, 2, 3 removals per block: block 0 cheap, block 1 dear, block 2 cheap after a dear first
    errors = [[0.01, 0.02, 0.50], [0.30, 0.60, 0.90], [0.20, 0.21, 0.22]]
    assert allocate_removals(errors, 3) == [2, 0, 1]  # 0.01, 0.01, then block 2's 0.20 below block 0's 0.48
    assert allocate_removals(errors, 5) == [2, 0, 3]
    assert allocate_removals(errors, 20) == [3, 3, 3]  # never more than each block allows


def test_refit_criterion_in_a_compile(calib, tmp_path):
    """head_criterion="refit": as many heads go as with the score, spread over the blocks by allocate_removals
    on the errors the dump records, each block's by its refit order; the model runs in onnxruntime as in torch."""
    import json

    from lpvit_compiler.passes.head_pruning import allocate_removals

    model = _model()
    with torch.no_grad():  # block 1's proj ignores heads 1-3: removing them costs nothing
        model.blocks[1].attn.proj.weight[:, DIM:] = 0
    compiled = _compile(model, calib, head_criterion="refit", dump_dir=tmp_path)
    kept = compiled.report.heads_kept
    assert sum(map(len, kept.values())) == 3 * 2  # head_keep=0.5 of 4 heads in 3 blocks
    assert kept["blocks.1"] == [0] and len(kept["blocks.0"]) + len(kept["blocks.2"]) == 5  # uneven counts
    blocks = json.loads(next(tmp_path.glob("*-head_pruning/decisions.json")).read_text())["blocks"]
    errors = [blocks[b]["relative_refit_error_after_each_removal"] for b in kept]  # cumulative (up to the ridge)
    assert all(len(e) == HEADS - 1 and e[0] >= 0 and all(b >= a - 1e-6 for a, b in zip(e, e[1:])) for e in errors)
    for block, count in zip(kept, allocate_removals(errors, 6)):
        assert kept[block] == sorted(set(range(HEADS)) - set(blocks[block]["refit_order"][:count]))
    x = torch.randn(4, 3, 32, 32)
    session = ort_session(str(compiled.export(tmp_path / "m.onnx")), 2, custom_ops=True)
    with torch.no_grad():
        expected = compiled(x).numpy()
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    with pytest.raises(ConfigError, match="head_criterion"):
        _compile(_model(), calib, head_criterion="attention")
