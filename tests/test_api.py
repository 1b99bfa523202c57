import json

import pytest
import torch
from torch import nn

import lpvit_compiler as lpvit
from lpvit_compiler.runtime.modules import BlockSparseLinear

from conftest import masked_reference


@pytest.mark.parametrize("kwargs,message", [
    (dict(hw="tpu9"), r"unknown hardware profile 'tpu9'; known profiles: a100, cpu, cpu-avx2, cpu-avx512, h100, native"),
    (dict(flops_keep=1.5), r"flops_keep must be in \(0, 1\], got 1.5"),
    (dict(flops_keep=0), r"flops_keep must be in \(0, 1\], got 0"),
    (dict(flops_keep="half"), r"flops_keep must be a number, got 'half'"),
    (dict(flops_keep=0.5, target_speedup=2.0), r"give one budget, not flops_keep and target_speedup"),
    (dict(target_speedup=0.5), r"target_speedup must be in \[1, inf\), got 0.5"),
    (dict(block_shape=128), r"no linear layer is left to prune \(.*layers smaller than one 128x128 block"),
    (dict(block_shape="axb"), r"block_shape must be an int, \(rows, cols\) or 'RxC', got"),
    (dict(importance="fisher"), r"unknown importance 'fisher'; choose one of obs, taylor, hessian, magnitude"),
    (dict(importance=3), r"unknown importance 3; choose one of"),
    (dict(reconstruct="yes"), r"reconstruct must be True or False, got 'yes' \(str\)"),
    (dict(reconstruct_images=2.5), r"reconstruct_images must be a positive int, got 2.5"),
    (dict(power_weight="high"), r"power_weight must be a number, got 'high'"),
    (dict(layers=[3]), r"layers must hold module names \(str\), got \[3\]"),
    (dict(flop_keep=0.5), r"unknown option 'flop_keep' \(did you mean flops_keep\?\); options are: importance"),
    (dict(min_density=0.0), r"min_density must be in \(0, 1\]"),
    (dict(preset="quick"), r"unknown preset 'quick'; choose one of fast"),
    (dict(importance_images=0), r"importance_images must be a positive int, got 0"),
    (dict(sensitivity="row"), r"unknown sensitivity 'row'; choose one of channel, layer"),
    (dict(layers=["blocks.0.attn.qkv", "nope"]), r"layers=\['nope'\] are not linear layers of the model"),
])
def test_bad_options_get_clear_errors(model, calib, kwargs, message):
    with pytest.raises(lpvit.ConfigError, match=message):
        lpvit.compile(model, calib=calib, progress=False, **{"block_shape": 16, **kwargs})


@pytest.mark.parametrize("calib,message", [
    (torch.randn(4, 3, 28, 28), r"the model fails on a calibration batch of shape \(4, 3, 28, 28\).*expects images "
                                r"\[B, 3, 32, 32\]"),
    (torch.randn(4, 32, 32), r"calibration batch 0 has shape \(4, 32, 32\); expected images \[B, C, H, W\]"),
    ([torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)], r"calibration batch 1 has shape \(2, 1, 32, 32\) but "
                                                             r"batch 0 has \(2, 3, 32, 32\)"),
    (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), r"has dtype torch.uint8; expected float images"),
    ([], r"calib is empty"),
    (None, r"calib is required"),
    (["not a batch"], r"calibration batch of type str is not understood"),
])
def test_bad_calibration_data_gets_clear_errors(model, calib, message):
    with pytest.raises(lpvit.CalibrationError, match=message):
        lpvit.compile(model, calib=calib, block_shape=16, progress=False)


def test_preset_sets_defaults_and_given_options_override_it():
    from lpvit_compiler.options import PRESETS, CompileOptions

    fast = CompileOptions.build(preset="fast")
    assert all(getattr(fast, name) == value for name, value in PRESETS["fast"].items())
    assert CompileOptions.build(preset="fast", importance="obs").importance == "obs"
    assert CompileOptions.build().importance == "obs" and CompileOptions.build().importance_images is None


def test_importance_statistics_run_on_the_first_importance_images(model, calib, tmp_path):
    import json

    lpvit.compile(model, calib=calib, block_shape=16, importance_images=5, dump_dir=tmp_path, progress=False)
    decisions = json.loads(next(tmp_path.glob("*-importance/decisions.json")).read_text())
    assert decisions["calibration_images"] == 5


def test_model_without_linear_layers(calib):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(lpvit.ConfigError, match=r"the model has no nn.Linear layer"):
        lpvit.compile(model, calib=calib, progress=False)


def test_not_a_module():
    with pytest.raises(lpvit.CaptureError, match="expected a torch.nn.Module, got str"):
        lpvit.compile("deit_small_patch16_224", calib=torch.randn(2, 3, 32, 32), progress=False)


def test_compiled_model_matches_masked_dense_and_rewrites_every_pruned_linear(model, calib, compiled):
    reference = masked_reference(model, compiled.masks)
    with torch.no_grad():
        torch.testing.assert_close(compiled(calib), reference(calib), rtol=1e-4, atol=1e-6)
    layouts = {row.name: row.layout for row in compiled.report.layers}
    assert set(layouts.values()) == {"bsr", "dense"}  # blocks.0.mlp.fc1 keeps 94% of its blocks: dense GEMM wins
    for name, layout in layouts.items():
        module = compiled.graph_module.get_submodule(name)
        if layout == "bsr":
            assert isinstance(module, BlockSparseLinear)
        else:
            assert type(module) is nn.Linear and not module.weight[~compiled.masks[name]].any()
    assert isinstance(compiled.graph_module.get_submodule("head"), nn.Linear)


def test_without_dense_fallback_every_pruned_linear_is_block_sparse(model, calib):
    compiled = lpvit.compile(model, flops_keep=0.5, calib=calib, block_shape=16, dense_fallback=False,
                             reconstruct=False, progress=False)
    assert all(isinstance(compiled.graph_module.get_submodule(n), BlockSparseLinear) for n in compiled.masks)
    reference = masked_reference(model, compiled.masks)
    with torch.no_grad():
        torch.testing.assert_close(compiled(calib), reference(calib), rtol=1e-4, atol=1e-6)


def test_masks_are_shaped_like_the_original_weights(model, compiled):
    assert set(compiled.masks) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                                 "mlp.fc2")}
    for name, mask in compiled.masks.items():
        assert mask.dtype == torch.bool and mask.shape == model.get_submodule(name).weight.shape
    kept = sum(m.sum().item() for m in compiled.masks.values())
    total = sum(m.numel() for m in compiled.masks.values())
    assert 0.3 < kept / total < 0.7


def test_report_prints_and_converts(compiled):
    text = str(compiled.report)
    assert "blocks.0.mlp.fc1" in text and "achieved 0.500" in text
    data = json.loads(compiled.report.to_json())
    assert data["summary"]["flops_keep_achieved"] == pytest.approx(0.5, rel=0.01)
    assert [row["name"] for row in data["layers"]] == list(compiled.masks)
    assert [p["pass"] for p in data["passes"]] == ["capture", "fold_scales", "token_pruning", "head_pruning",
                                                    "importance", "hardware", "token_schedule", "block_mask_solve",
                                                    "reconstruct", "dead_block_elimination", "bsr_layout",
                                                    "fuse_epilogues"]


def test_plan_is_json_and_reproducible(compiled, tmp_path, model, calib):
    compiled.plan.save(tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["options"]["budget"] == "flops" and plan["options"]["block_shape"] == [16, 16]
    assert plan["versions"]["torch"] == torch.__version__ and plan["input_shape"] == [3, 32, 32]
    again = lpvit.compile(model, hw="cpu", flops_keep=0.5, calib=calib, block_shape=16, importance="taylor",
                          reconstruct=False, progress=False)
    assert again.plan.layers == compiled.plan.layers


def test_dumps_one_numbered_folder_per_pass(model, calib, tmp_path):
    lpvit.compile(model, flops_keep=0.5, calib=calib, block_shape=16, dump_dir=tmp_path, progress=False)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == ["00-capture", "01-fold_scales", "02-token_pruning", "03-head_pruning", "04-importance",
                       "05-hardware", "06-token_schedule", "07-block_mask_solve", "08-reconstruct",
                       "09-dead_block_elimination", "10-bsr_layout", "11-fuse_epilogues"]
    for folder in folders:
        assert (tmp_path / folder / "graph.txt").read_text().startswith("class ")
        assert json.loads((tmp_path / folder / "decisions.json").read_text())["pass"] == folder[3:]
    solve = json.loads((tmp_path / "07-block_mask_solve" / "decisions.json").read_text())
    assert solve["budget_achieved"] == pytest.approx(0.5, rel=0.01)
    assert "why" in solve["layers"]["blocks.0.mlp.fc1"]
    heatmap = tmp_path / "07-block_mask_solve" / "masks" / "blocks.0.mlp.fc1.png"
    assert heatmap.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "07-block_mask_solve" / "distortion_curves.png").exists()
    assert "BlockSparseLinear" in (tmp_path / "10-bsr_layout" / "graph.txt").read_text()
    assert [p["pass"] for p in json.loads((tmp_path / "passes.json").read_text())][0] == "capture"


def test_dump_dir_from_environment(model, calib, tmp_path, monkeypatch):
    monkeypatch.setenv("LPVIT_DUMP_DIR", str(tmp_path / "env"))
    lpvit.compile(model, flops_keep=0.5, calib=calib, block_shape=16, importance="magnitude", progress=False)
    assert (tmp_path / "env" / "10-bsr_layout" / "decisions.json").exists()


@pytest.mark.parametrize("importance", ["hessian", "magnitude"])
def test_other_criteria_compile_exactly(model, calib, importance):
    compiled = lpvit.compile(model, flops_keep=0.4, calib=calib, block_shape=16, importance=importance,
                             reconstruct=False, progress=False)
    assert compiled.report.flops_keep_achieved == pytest.approx(0.4, rel=0.01)
    reference = masked_reference(model, compiled.masks)
    with torch.no_grad():
        torch.testing.assert_close(compiled(calib), reference(calib), rtol=1e-4, atol=1e-6)


def test_save_and_load_round_trip(compiled, calib, tmp_path):
    compiled.save(tmp_path / "model.pt2")
    loaded = lpvit.load(tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib[:3]), compiled(calib[:3]))
    assert loaded.report.to_dict() == compiled.report.to_dict()
    assert all(torch.equal(loaded.masks[k], v) for k, v in compiled.masks.items())
    assert loaded.plan == compiled.plan


def test_loading_bad_files_gets_clear_errors(tmp_path, compiled):
    with pytest.raises(lpvit.ModelFileError, match="the file does not exist"):
        lpvit.load(tmp_path / "missing.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip archive at all")
    with pytest.raises(lpvit.ModelFileError, match="is not a readable compiled model"):
        lpvit.load(junk)
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),)), plain)
    with pytest.raises(lpvit.ModelFileError, match="not an lpvit-compiler model"):
        lpvit.load(plain)
    good = tmp_path / "good.pt2"
    compiled.save(good)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(lpvit.ModelFileError):
        lpvit.load(truncated)
