"""The joint token schedule: under target_speedup/power_keep without patch_keep, tokens and blocks share one
budget, each paid for by its measured damage."""

import json

import pytest
import torch
from conftest import tiny_vit

import lpvit_compiler as lpvit
from lpvit_compiler.errors import ConfigError
from lpvit_compiler.options import CompileOptions
from lpvit_compiler.passes.token_schedule import PATCH_KEEP_GRID


def _model():
    """4 blocks of 64 patches; queries and keys scaled up so attention is peaked, as in trained models."""
    model = tiny_vit(patch_size=4, depth=4)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(4.0)
    return model


def _compile(model, calib, dump_dir, **options):
    defaults = dict(target_speedup=1.2, calib=calib, block_shape=16, reconstruct=False, progress=False,
                    dump_dir=dump_dir)
    compiled = lpvit.compile(model, **{**defaults, **options})
    return compiled, json.loads((dump_dir / "06-token_schedule" / "decisions.json").read_text())


def _blocks_pruned(compiled) -> int:
    return sum(row.blocks - row.kept_blocks for row in compiled.report.layers)


def test_lossless_merging_carries_the_whole_budget(tmp_path):
    """Identical patches (no position embedding, a flat image) merge without changing anything: the schedule
    must meet the power budget (the linears' energy, against the unpruned model) with tokens alone and prune
    no weight block."""
    model = _model()
    with torch.no_grad():
        model.pos_embed.zero_()
    calib = torch.full((8, 3, 32, 32), 0.3) + torch.randn(8, 3, 1, 1)  # one colour per image
    compiled, decisions = _compile(model, calib, tmp_path, token_pruning="merge", target_speedup=None,
                                   power_keep=0.8)
    assert decisions["enabled"] and decisions["patch_keep"] < 1.0
    assert _blocks_pruned(compiled) == 0
    assert compiled.report.summary["budget_achieved"] <= 0.8 * 1.01
    feasible = [c for c in decisions["candidates"] if "total" in c]
    assert max(c["token_damage"] for c in feasible) < 1e-6 * min(c["block_damage"] for c in feasible
                                                                 if c["block_damage"] > 0)
    assert (tmp_path / "06-token_schedule" / "candidates.png").exists()


def test_free_blocks_keep_every_patch(tmp_path):
    """Most weight blocks are zero, so removing them costs nothing, while dropping patches of random images
    does: the schedule must keep every patch and meet the budget with blocks."""
    model = _model()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
                out_blocks, in_blocks = module.out_features // 16, module.in_features // 16
                zero = torch.rand(out_blocks, in_blocks) < 0.85
                module.weight.mul_((~zero).repeat_interleave(16, 0).repeat_interleave(16, 1).float())
    calib = torch.randn(8, 3, 32, 32)
    # a budget the free blocks reach with every patch kept: on a model this narrow the stages' own scoring and
    # selection cost nearly what the blocks save (memory-bound ops, costmodel.flops), so that is a small one
    compiled, decisions = _compile(model, calib, tmp_path, token_pruning="cascade", target_speedup=1.01)
    assert decisions["patch_keep"] == 1.0
    assert all(stage["patches_kept"] == 64 for stage in compiled.report.token_stages)
    assert compiled.report.summary["predicted_speedup"] >= 1.01 * 0.99
    chosen = next(c for c in decisions["candidates"] if c["patch_keep"] == 1.0)
    assert chosen["total"] == 0.0
    assert all(c["token_damage"] > 0 for c in decisions["candidates"][1:])
    assert (tmp_path / "06-token_schedule" / "kept_patches.png").exists()


def test_chosen_schedule_is_the_one_compiled_and_costed(tmp_path):
    torch.manual_seed(3)
    calib = torch.randn(16, 3, 32, 32)
    compiled, decisions = _compile(_model(), calib, tmp_path, token_pruning="cascade", target_speedup=1.5)
    feasible = [c for c in decisions["candidates"] if "total" in c]
    assert decisions["patch_keep"] == min(feasible, key=lambda c: c["total"])["patch_keep"]
    assert decisions["patch_keep"] in PATCH_KEEP_GRID
    stages = compiled.report.token_stages
    assert stages[-1]["patches_kept"] == round(decisions["patch_keep"] * 64)
    assert all(a["tokens_out"] == b["tokens_in"] for a, b in zip(stages, stages[1:]))
    # the layers are costed at the tokens the compiled model really runs
    seen = {}
    hooks = [compiled.graph_module.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: seen.__setitem__(name, args[0].shape[1])) for name in ("blocks.3.attn.qkv",)]
    with torch.no_grad():
        compiled(calib[:1])
    for hook in hooks:
        hook.remove()
    row = next(row for row in compiled.report.layers if row.name == "blocks.3.attn.qkv")
    assert row.tokens == seen["blocks.3.attn.qkv"] == stages[-1]["tokens_out"]
    assert compiled.report.summary["predicted_speedup"] == pytest.approx(1.5, rel=0.02)


def test_explicit_patch_keep_or_a_flops_budget_keep_a_fixed_schedule(tmp_path):
    calib = torch.randn(8, 3, 32, 32)
    compiled, decisions = _compile(_model(), calib, tmp_path, token_pruning="cascade", patch_keep=0.75,
                                   target_speedup=1.1)
    assert not decisions["enabled"]
    assert compiled.report.token_stages[-1]["patches_kept"] == 48
    flops = CompileOptions.build(flops_keep=0.8, token_pruning="cascade")
    assert not flops.joint_token_schedule and flops.fixed_patch_keep == 0.5
    assert CompileOptions.build(power_keep=0.8, token_pruning="merge").joint_token_schedule


def test_joint_schedule_needs_the_obs_criterion():
    with pytest.raises(ConfigError, match=r"importance='obs' \(not 'magnitude'\) or give patch_keep"):
        lpvit.compile(_model(), target_speedup=1.3, token_pruning="cascade", importance="magnitude",
                      calib=torch.randn(4, 3, 32, 32), progress=False)
