"""Cascade token pruning (CP-ViT): scores, per-image top-k, schedule, export, unsupported models."""

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from conftest import tiny_swin, tiny_vit

import lpvit_compiler as lpvit
from lpvit_compiler.errors import ConfigError
from lpvit_compiler.passes.token_pruning import keep_counts
from lpvit_compiler.report.summary import summary_items
from lpvit_compiler.runtime.sessions import ort_session

PREFIX = 3  # class token + 2 registers


def _model(**overrides):
    """4 blocks, 8x8 patches of 4 px, a class token and two registers. Queries and keys are scaled up so that
    attention is peaked, as in trained models: with the near-uniform attention of a random init, patch scores
    tie to within float rounding, and torch and onnxruntime may then keep different (equally scored) patches."""
    model = tiny_vit(**{"patch_size": 4, "depth": 4, "reg_tokens": 2, **overrides})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(4.0)
    return model


def _compile(model, calib, **options):
    defaults = dict(flops_keep=1.0, calib=calib, token_pruning="cascade", patch_keep=0.5, block_shape=16,
                    importance="magnitude", reconstruct=False, progress=False)
    return lpvit.compile(model, **{**defaults, **options})


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(2)
    return torch.randn(16, 3, 32, 32)


def _reference(model, x: torch.Tensor, stages: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The cascade written out directly on the timm modules: per-block probabilities, S, top-k, gather.
    Returns the logits and, per stage, each image's kept patch positions in the original grid."""
    kept_after = {s["block"]: s["patches_kept"] for s in stages}
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    score, kept = None, []
    for i, block in enumerate(model.blocks):
        if f"blocks.{i}" in kept_after:
            top = score[:, PREFIX:].topk(kept_after[f"blocks.{i}"], dim=1).indices + PREFIX
            index = torch.cat([torch.arange(PREFIX).expand(x.shape[0], -1), top], dim=1)
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            score, positions = score.gather(1, index), positions.gather(1, index)
            kept.append(positions[:, PREFIX:] - PREFIX)
        b, n, c = x.shape
        attn = block.attn
        q, k, v = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        probabilities = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        contribution = probabilities.max(dim=2).values.sum(dim=1)  # max over queries, sum over heads
        score = contribution if score is None else score + contribution
        x = x + attn.proj((probabilities @ v).transpose(1, 2).reshape(b, n, c))
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x)), kept


@pytest.mark.parametrize("fused_attention", [True, False], ids=["sdpa", "explicit-softmax"])
def test_compiled_model_is_the_cascade_computed_directly(calib, fused_attention):
    model = _model()
    for block in model.blocks:
        block.attn.fused_attn = fused_attention
    compiled = _compile(model, calib, fold_scales=False)
    stages = compiled.report.token_stages
    assert [s["block"] for s in stages] == ["blocks.1", "blocks.2", "blocks.3"]
    assert stages[-1]["patches_kept"] == 32 and stages[0]["tokens_in"] == PREFIX + 64
    assert all(a["patches_kept"] > b["patches_kept"] for a, b in zip(stages, stages[1:]))
    x = torch.randn(5, 3, 32, 32)
    indices = {}
    hooks = [compiled.graph_module.get_submodule(s["module"]).register_forward_hook(
        lambda m, a, out, name=s["module"]: indices.__setitem__(name, out[2])) for s in stages]
    with torch.no_grad():
        got = compiled(x)
        expected, kept = _reference(model, x, stages)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    positions = torch.arange(PREFIX + 64).expand(5, -1)
    for stage, reference_kept in zip(stages, kept):
        positions = positions.gather(1, indices[stage["module"]])
        assert (positions[:, :PREFIX] == torch.arange(PREFIX)).all(), "prefix tokens are always kept"
        for image in range(5):  # each image keeps its own top-k: the same set as the direct computation
            assert set(positions[image, PREFIX:].tolist()) == set((reference_kept[image] + PREFIX).tolist())
    assert not all(set(positions[0].tolist()) == set(positions[i].tolist()) for i in range(1, 5))


def test_batch_independence_and_onnxruntime_agreement(calib, tmp_path):
    compiled = _compile(_model(), calib, flops_keep=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = compiled(x)
        alone = torch.cat([compiled(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    for target in ("lpvit", "portable"):
        path = compiled.export(tmp_path / f"{target}.onnx", target=target)
        session = ort_session(str(path), 2, custom_ops=target == "lpvit")
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        assert np.abs(got - together.numpy()).max() <= 1e-4 * np.abs(together.numpy()).max(), target
        single = session.run(None, {"pixel_values": x[1:2].numpy()})[0]
        np.testing.assert_allclose(single, got[1:2], rtol=1e-5, atol=1e-6)


def test_exported_graph_has_static_token_counts(calib, tmp_path):
    from lpvit_compiler.lowering.onnx_export import _register_schema

    compiled = _compile(_model(), calib)
    proto = onnx.load(compiled.export(tmp_path / "m.onnx"))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    top_k = {int(constants[n.input[1]].reshape(-1)[0]) for n in proto.graph.node if n.op_type == "TopK"}
    stages = compiled.report.token_stages
    assert top_k == {s["patches_kept"] for s in stages}  # every TopK's k is a constant: a stage's patch count
    _register_schema()  # so shape inference knows ai.lpvit::BlockSparseLinear
    inferred = onnx.shape_inference.infer_shapes(proto)
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in inferred.graph.value_info}
    streams = [shape for shape in dims.values() if len(shape) == 3 and shape[2] == 64]  # [batch, tokens, C]
    assert streams and all(isinstance(shape[1], int) and shape[0] == "batch" for shape in streams)
    assert {s["tokens_out"] for s in stages} <= {shape[1] for shape in streams}


def test_schedule_removes_in_proportion_to_locality():
    counts = keep_counts(64, 0.5, np.array([0.1, 0.3, 0.1, 0.5]))
    assert counts[-1] == 32 and all(a >= b for a, b in zip(counts, counts[1:]))
    removed = -np.diff([64, *counts])
    assert removed.sum() == 32 and removed.argmax() == 3 and removed[1] > removed[0]
    assert keep_counts(10, 1.0, np.ones(3)) == [10, 10, 10]


def test_cost_model_counts_tokens_against_the_unpruned_model(calib, tmp_path):
    model = _model()
    dense = lpvit.compile(model, flops_keep=1.0, calib=calib, block_shape=16, importance="magnitude",
                          reconstruct=False, progress=False)
    pruned = _compile(model, calib, dump_dir=tmp_path)
    tokens = {row.name: row.tokens for row in pruned.report.layers}
    assert tokens["blocks.0.attn.qkv"] == PREFIX + 64 and tokens["blocks.3.mlp.fc1"] == PREFIX + 32
    assert pruned.report.summary["model_flops"] == pytest.approx(dense.report.summary["model_flops"])
    assert pruned.report.summary["model_flops_keep"] < 0.85
    assert pruned.report.summary["predicted_speedup"] > 1.1 > dense.report.summary["predicted_speedup"] - 0.05
    decisions = json.loads((tmp_path / "02-token_pruning" / "decisions.json").read_text())
    assert set(decisions["locality_3x3"]) == {f"blocks.{i}" for i in range(4)}
    assert (tmp_path / "02-token_pruning" / "kept_patches.png").stat().st_size > 1000
    assert "tokens per image" in "\n".join(f"{k}: {v}" for k, v in summary_items(pruned.report))


def test_reconstruction_fits_kept_tokens_to_the_model_before_token_pruning(calib, tmp_path):
    model = _model()
    runs = {"tokens": _compile(model, calib),
            "tokens, refitted": _compile(model, calib, reconstruct=True, recovery_steps=5),
            "tokens + blocks": _compile(model, calib, flops_keep=0.5),
            "tokens + blocks, refitted": _compile(model, calib, flops_keep=0.5, reconstruct=True, recovery_steps=5,
                                                  dump_dir=tmp_path)}
    decisions = json.loads((tmp_path / "08-reconstruct" / "decisions.json").read_text())
    blocks = decisions["block_recovery"]["blocks"]
    assert sorted(blocks) == [f"blocks.{i}" for i in range(4)] and all(b["steps"] == 5 for b in blocks.values())
    x = calib[:8]  # calibration images: what the refit is guaranteed not to fit worse
    with torch.no_grad():
        target = model(x)
        error = {name: float((c(x) - target).norm() / target.norm()) for name, c in runs.items()}
    assert error["tokens, refitted"] < error["tokens"], error  # the refit makes up for dropped tokens too
    assert error["tokens + blocks, refitted"] < 0.5 * error["tokens + blocks"], error


def test_models_whose_tokens_cannot_be_dropped_get_a_clear_error(calib):
    from timm.models.eva import Eva
    swin = tiny_swin()
    with pytest.raises(ConfigError, match="relative position"):
        _compile(swin, calib)
    eva = Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
              use_rot_pos_emb=True, ref_feat_shape=(4, 4)).eval()
    with pytest.raises(ConfigError, match="rotary embeddings"):
        _compile(eva, calib)
    compiled = _compile(swin, calib, token_pruning="auto")
    assert any(note.startswith("token pruning skipped") for note in compiled.report.notes)
    assert compiled.report.token_stages == []


def test_prefix_tokens_must_be_known():
    class Wrapper(torch.nn.Module):  # hides num_prefix_tokens
        def __init__(self):
            super().__init__()
            self.vit = _model()

        def forward(self, x):
            return self.vit(x)

    wrapper = Wrapper().eval()
    calib = torch.randn(4, 3, 32, 32)
    with pytest.raises(ConfigError, match="prefix_tokens"):
        _compile(wrapper, calib)
    compiled = _compile(wrapper, calib, prefix_tokens=PREFIX)
    assert compiled.report.token_stages[0]["tokens_in"] == PREFIX + 64


def test_composes_with_int8(calib, tmp_path):
    compiled = _compile(_model(), calib, flops_keep=0.5, quantize="int8", reconstruct=True, block_recovery=False,
                        model_recovery_tflops=0)
    assert compiled.report.token_stages and all(r.layout.endswith("int8") for r in compiled.report.layers
                                                if r.kept_blocks < r.blocks)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = compiled(x).numpy()
    session = ort_session(str(compiled.export(tmp_path / "int8.onnx")), 2, custom_ops=True)
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    assert np.linalg.norm(got - expected) <= 0.05 * np.linalg.norm(expected)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(3, 20), remove=st.integers(0, 10), prefix=st.integers(0, 2), seed=st.integers(0, 99))
def test_token_merge_conserves_what_the_tokens_stand_for(tokens, remove, prefix, seed):
    from lpvit_compiler.tokens import TokenMerge

    patches = tokens - prefix
    remove = min(remove, (patches + 1) // 2) if patches >= 2 else 0  # at most |A|, and B must not be empty
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 5, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (2, tokens), generator=generator).double()
    merged, merged_size = TokenMerge(prefix, remove)(x, size)
    assert merged.shape == (2, tokens - remove, 5) and merged_size.shape == (2, tokens - remove)
    torch.testing.assert_close(merged[:, :prefix], x[:, :prefix])  # prefix tokens are never merged
    torch.testing.assert_close(merged_size.sum(1), size.sum(1))  # every patch is counted once
    torch.testing.assert_close((merged * merged_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    if remove == 0:  # nothing merged: the same tokens
        torch.testing.assert_close(merged, x)


def _direct_bipartite_merge(x, size, prefix, remove):
    """ToMe's merge of one image written out token by token (float64): A = even patches, B = odd ones, each A
    patch's partner the B patch of highest cosine, the ``remove`` A patches of highest such cosine merged into
    their partners by size-weighted average; out: prefix, the other A patches (highest cosine first), B (with
    nothing to merge, the tokens as they were)."""
    if remove == 0:
        return x, size
    patches = list(range(prefix, x.shape[0]))
    a, b = patches[0::2], patches[1::2]
    unit = x / x.norm(dim=-1, keepdim=True)
    partner = {i: max(b, key=lambda j: float(unit[i] @ unit[j])) for i in a}
    ranked = sorted(a, key=lambda i: -float(unit[i] @ unit[partner[i]]))
    tokens, sizes = [x[t] for t in range(prefix)] + [x[i] for i in ranked[remove:]], [size[t] for t in range(prefix)]
    sizes += [size[i] for i in ranked[remove:]]
    for j in b:
        joined = [j] + [i for i in ranked[:remove] if partner[i] == j]
        total = sum(size[t] for t in joined)
        tokens.append(sum(size[t] * x[t] for t in joined) / total)
        sizes.append(total)
    return torch.stack(tokens), torch.stack(sizes)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(3, 20), remove=st.integers(0, 10), prefix=st.integers(0, 2), seed=st.integers(0, 99))
def test_token_merge_matches_a_direct_bipartite_merge(tokens, remove, prefix, seed):
    from lpvit_compiler.tokens import TokenMerge

    patches = tokens - prefix
    remove = min(remove, (patches + 1) // 2) if patches >= 2 else 0
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, tokens, 5, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (3, tokens), generator=generator).double()
    merged, merged_size = TokenMerge(prefix, remove)(x, size)
    for image in range(3):
        expected, expected_size = _direct_bipartite_merge(x[image], size[image], prefix, remove)
        torch.testing.assert_close(merged[image], expected)
        torch.testing.assert_close(merged_size[image], expected_size)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(4, 20), prefix=st.integers(0, 2), seed=st.integers(0, 99))
def test_merged_map_holds_the_patches_each_merged_token_stands_for(tokens, prefix, seed):
    """Two merges in a row: M @ (the tokens before any merge) is the merged tokens, each row of M is 1/size on
    the size original positions the token holds, and the reconstruction's targets are those rows' means."""
    from lpvit_compiler.passes.reconstruct import _at_pruned_tokens, _merged_map
    from lpvit_compiler.tokens import TokenMerge

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 6, generator=generator, dtype=torch.float64)
    first = TokenMerge(prefix, (tokens - prefix) // 2)
    decision = first.decide(x)
    once, once_size = first.reduce(x, None, decision)
    token_map = _merged_map(first, None, None, x, decision)
    second = TokenMerge(prefix, (once.shape[1] - prefix) // 2)
    decision = second.decide(once, once_size)
    twice, size = second.reduce(once, once_size, decision)
    token_map = _merged_map(second, token_map, once_size, once, decision)
    torch.testing.assert_close(token_map @ x, twice)
    torch.testing.assert_close(token_map.sum(-1), torch.ones_like(size))
    torch.testing.assert_close((token_map > 0).sum(-1).double(), size)
    torch.testing.assert_close(token_map * size[..., None], (token_map > 0).double())
    dense_outputs = torch.randn(2, tokens, 3, generator=generator, dtype=torch.float64)
    (targets,) = _at_pruned_tokens([dense_outputs], [twice], [token_map])
    torch.testing.assert_close(targets, token_map @ dense_outputs)


def test_reconstruction_fits_merged_tokens_to_the_model_before_merging(calib, tmp_path):
    """With merging, the refit's targets are the unmerged model's values averaged over each merged token's
    patches: at flops_keep=1.0 every layer after the first merge has a target error to remove, and a model that
    averages its tokens (what those targets describe) comes out closer to the unmerged one on the calibration
    images. (On the class-token form of this tiny random model, with 16 calibration images, the refit overfits;
    on DINOv2-S it gains 2 points, README.)"""
    model = _average_pooled()
    merged = _compile(model, calib, token_pruning="merge", patch_keep=0.25, prefix_tokens=0)
    refitted = _compile(model, calib, token_pruning="merge", patch_keep=0.25, prefix_tokens=0, reconstruct=True,
                        recovery_steps=5, dump_dir=tmp_path)
    layers = json.loads((tmp_path / "08-reconstruct" / "decisions.json").read_text())["layers"]
    for name, errors in layers.items():
        if name.startswith("blocks.0."):  # before the first merge both streams hold the same tokens
            assert errors["relative_error_masked"] < 1e-5, (name, errors)
        else:
            assert errors["relative_error_reconstructed"] < errors["relative_error_masked"], (name, errors)
    x = calib[:8]
    with torch.no_grad():
        target = model(x)
        error = {name: float((c(x) - target).norm() / target.norm())
                 for name, c in {"merged": merged, "refitted": refitted}.items()}
    assert error["refitted"] < 0.5 * error["merged"], error


def test_merge_mode_matches_the_model_when_nothing_is_merged_and_runs_in_onnxruntime(calib, tmp_path):
    model = _model()
    unmerged = _compile(model, calib, token_pruning="merge", patch_keep=1.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(x), model(x), rtol=1e-4, atol=1e-5)
    merged = _compile(model, calib, token_pruning="merge", patch_keep=0.5, flops_keep=0.5)
    assert [s["tokens_out"] for s in merged.report.token_stages][-1] == PREFIX + 32
    assert "log" in merged.graph_module.code  # proportional attention
    with torch.no_grad():
        together = merged(x)
        alone = torch.cat([merged(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    for target in ("lpvit", "portable"):
        session = ort_session(str(merged.export(tmp_path / f"{target}.onnx", target=target)), 2,
                              custom_ops=target == "lpvit")
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        assert np.abs(got - together.numpy()).max() <= 1e-4 * np.abs(together.numpy()).max(), target


def _hf_reference(model, x: torch.Tensor, stages: list[dict]) -> torch.Tensor:
    """The cascade written out on Hugging Face's ViT modules (class token only, patch scores as CP-ViT's)."""
    kept_after = {s["block"]: s["patches_kept"] for s in stages}
    h, score = model.vit.embeddings(x), None
    for i, layer in enumerate(model.vit.layers):
        if f"vit.layers.{i}" in kept_after:
            top = score[:, 1:].topk(kept_after[f"vit.layers.{i}"], dim=1).indices + 1
            index = torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.long), top], dim=1)
            h, score = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1])), score.gather(1, index)
        attn, y = layer.attention, layer.layernorm_before(h)
        b, n, _ = y.shape
        q, k, v = (proj(y).view(b, n, -1, attn.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        probabilities = (q @ k.transpose(-2, -1) * attn.scaling).softmax(-1)
        contribution = probabilities.amax(dim=2).sum(dim=1)
        score = contribution if score is None else score + contribution
        h = h + attn.o_proj((probabilities @ v).transpose(1, 2).reshape(b, n, -1))
        h = h + layer.mlp(layer.layernorm_after(h))
    return model.classifier(model.vit.layernorm(h)[:, 0])


def test_hugging_face_vit_is_pruned_like_the_direct_cascade(calib, tmp_path):
    """transformers 5 passes every layer's SDPA an all-true [B, 1, N, N] mask built from shapes, and torch.export
    bakes the token count into the layers' reshapes: the pass drops the mask (it masks nothing) and reads the
    count from the kept tokens."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # peaked attention, as in trained models (see _model)
        for layer in model.vit.layers:
            layer.attention.q_proj.weight.mul_(4.0)
            layer.attention.k_proj.weight.mul_(4.0)
    compiled = _compile(model, calib, fold_scales=False, dump_dir=tmp_path / "dumps")
    decisions = json.loads((tmp_path / "dumps" / "02-token_pruning" / "decisions.json").read_text())
    assert decisions["attention_masks_dropped_as_constant"] == 3  # one per layer
    stages = compiled.report.token_stages
    assert [s["block"] for s in stages] == ["vit.layers.1", "vit.layers.2"] and stages[-1]["patches_kept"] == 32
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = compiled(x)
        got = getattr(got, "logits", got)
        torch.testing.assert_close(got, _hf_reference(model, x, stages), rtol=1e-4, atol=1e-5)
    session = ort_session(str(compiled.export(tmp_path / "hf.onnx")), 2, custom_ops=True)
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(onnx_out - got.numpy()).max() <= 1e-4 * np.abs(got.numpy()).max()




@pytest.mark.parametrize("family", ["deit-distilled", "deit3"])
def test_distilled_deit_and_deit3(calib, family):
    """DeiT's distillation token is a prefix token (kept, and both heads read it); DeiT-III adds position
    embeddings to the patches only and scales its branches by LayerScale."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=10)
    model = (VisionTransformerDistilled(**kwargs) if family == "deit-distilled"
             else tiny_vit(**kwargs, init_values=1e-1, no_embed_class=True)).eval()
    prefix = 2 if family == "deit-distilled" else 1
    unpruned = _compile(model, calib, patch_keep=1.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unpruned(x), model(x), rtol=1e-4, atol=1e-5)
        compiled = _compile(model, calib)
        stages = compiled.report.token_stages
        assert all(s["tokens_out"] - s["patches_kept"] == prefix for s in stages)
        assert stages[-1]["patches_kept"] == 32
        together = compiled(x)
        torch.testing.assert_close(together, torch.cat([compiled(x[i:i + 1]) for i in range(3)]), rtol=1e-5,
                                   atol=1e-6)


def test_merge_beyond_half_a_stage_is_a_clear_error(calib):
    with pytest.raises(ConfigError, match=r"merge at most half of a block's patches, but blocks.3 would have to "
                                          r"merge 58 of 64: raise patch_keep or lower first_token_stage"):
        _compile(_model(), calib, token_pruning="merge", patch_keep=0.1, first_token_stage=3)


def _average_pooled(**overrides):
    """_model without class token or registers, averaging its 64 patches before the head (global_pool="avg")."""
    return _model(reg_tokens=0, class_token=False, global_pool="avg", **overrides)


def test_merge_keeps_an_average_pooled_models_mean_exactly_where_the_later_blocks_pass_tokens_through(calib):
    """Blocks 1-3 write nothing to the residual stream, so the dense model averages block 0's tokens. Merged
    tokens are size-weighted averages of the patches they stand for, so the size-weighted mean of any merge is
    that same average; the plain mean of the merged tokens is not."""
    model = _average_pooled()
    with torch.no_grad():
        for block in model.blocks[1:]:
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    compiled = _compile(model, calib, token_pruning="merge", patch_keep=0.25, prefix_tokens=0)
    assert compiled.report.token_stages[-1]["tokens_out"] == 16
    assert "weighted_token_mean" in compiled.graph_module.code
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_an_average_pooled_model_merges_in_onnxruntime_and_refuses_dropping(calib, tmp_path):
    model = _average_pooled()
    merged = _compile(model, calib, token_pruning="merge", patch_keep=0.5, flops_keep=0.5, prefix_tokens=0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = merged(x)
        alone = torch.cat([merged(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    session = ort_session(str(merged.export(tmp_path / "merged.onnx")), 2, custom_ops=True)
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    assert np.abs(got - together.numpy()).max() <= 1e-4 * np.abs(together.numpy()).max()
    with pytest.raises(ConfigError, match="averages its tokens.*token_pruning='merge' keeps it"):
        _compile(model, calib, prefix_tokens=0)
    skipped = _compile(model, calib, token_pruning="auto", prefix_tokens=0)
    assert any("averages its tokens" in note for note in skipped.report.notes)


def test_other_token_reductions_after_the_last_block_are_refused(calib):
    class MaxPooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = _average_pooled()
            self.num_prefix_tokens = 0

        def forward(self, x):
            return self.vit.head(self.vit.forward_features(x).amax(dim=1))

    with pytest.raises(ConfigError, match="reduces its tokens with amax"):
        _compile(MaxPooled().eval(), calib, token_pruning="merge")
