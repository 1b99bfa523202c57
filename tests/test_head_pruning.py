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
    compiled = _compile(model, calib)
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
