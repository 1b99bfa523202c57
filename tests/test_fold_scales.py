"""Scale folding: LayerScale into the linear before it, LayerNorm affines into the linears after them."""

import operator

import pytest
import timm
import torch
from torch import fx, nn

import lpvit_compiler as lpvit
from lpvit_compiler.frontend.capture import capture
from lpvit_compiler.options import CompileOptions
from lpvit_compiler.passes.fold_scales import fold_scales
from lpvit_compiler.state import CompileState


def _layer_scale_vit() -> nn.Module:
    """A 2-block DINOv2-style ViT (LayerScale, 14-px patches) with every scale and shift far from 1 and 0."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, embed_dim=64,
                              num_heads=2, init_values=1e-5, num_classes=10).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or "norm" in name:
                p.copy_(torch.randn_like(p) * (3.0 if "weight" in name or "gamma" in name else 1.0))
    return model


def _fold(gm: fx.GraphModule, **options):
    state = CompileState(options=CompileOptions.build(**options), calibration=[], model=None)
    return fold_scales(gm, state)


def test_folded_graph_computes_the_same_and_has_no_layer_scale_left():
    model = _layer_scale_vit()
    x = torch.randn(3, 3, 28, 28)
    gm, _ = capture(model, x)
    with torch.no_grad():
        reference = model(x)
    result = _fold(gm)
    with torch.no_grad():
        folded = result.graph_module(x)
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert result.decisions["layer_scale_into"] == ["blocks.0.attn.proj", "blocks.0.mlp.fc2",
                                                    "blocks.1.attn.proj", "blocks.1.mlp.fc2"]
    assert result.decisions["layer_norm_affine_into"] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1",
                                                          "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    graph = result.graph_module.graph
    assert not [n for n in graph.nodes if n.op == "get_attr" and n.target.endswith("gamma")]
    assert not [n for n in graph.nodes if n.target in (operator.mul, torch.mul)]
    for i in (0, 1):  # the affine now lives in the linears
        block = result.graph_module.get_submodule(f"blocks.{i}")
        assert torch.equal(block.norm1.weight, torch.ones(64)) and torch.equal(block.norm2.bias, torch.zeros(64))
    # the final norm feeds pooling, not a linear: its affine stays
    assert not torch.equal(result.graph_module.norm.weight, torch.ones(64))


def test_user_model_is_not_modified_and_compile_fuses_the_residual_after_folding():
    model = _layer_scale_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = lpvit.compile(model, hw="cpu-avx2", flops_keep=0.7, calib=torch.randn(8, 3, 28, 28),
                             block_shape=16, importance="magnitude", reconstruct=False, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fused = {row.name: row for row in compiled.report.layers}
    # without folding, LayerScale's multiply sits between fc2 and the residual add and blocks the fusion
    assert any("residual" in fused[f"blocks.{i}.mlp.fc2"].epilogue for i in (0, 1)
               if fused[f"blocks.{i}.mlp.fc2"].layout == "bsr")


class _Shared(nn.Module):
    """Cases folding must leave alone: a LayerNorm with a non-linear user, a linear called twice, a scale that
    is not one per output channel."""

    def __init__(self):
        super().__init__()
        self.norm_a = nn.LayerNorm(16)
        self.norm_b = nn.LayerNorm(16)
        self.twice = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 16)
        self.gamma = nn.Parameter(torch.randn(16))
        self.scalar = nn.Parameter(torch.tensor(2.0))
        with torch.no_grad():
            for norm in (self.norm_a, self.norm_b):
                norm.weight.normal_()
                norm.bias.normal_()

    def forward(self, x):
        a = self.norm_a(x)
        y = self.fc(a) + a  # norm_a has a user that is not a linear
        z = self.twice(self.norm_b(y))
        z = self.twice(z) * self.gamma  # twice is called from two places
        return self.fc2(z) if hasattr(self, "fc2") else z * self.scalar


def test_cases_that_are_not_equivalent_are_left_alone():
    model = _Shared().eval()
    x = torch.randn(4, 16)
    gm = fx.symbolic_trace(model)
    reference = model(x)
    result = _fold(gm)
    assert result.decisions["layer_scale_into"] == [] and result.decisions["layer_norm_affine_into"] == []
    assert not result.modified
    torch.testing.assert_close(result.graph_module(x), reference)


def test_layer_norm_module_folds_into_every_linear_user_and_creates_a_bias():
    class Qkv(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.q, self.k = nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
            with torch.no_grad():
                self.norm.weight.normal_()
                self.norm.bias.normal_()

        def forward(self, x):
            h = self.norm(x)
            return self.q(h) * self.k(h)

    model = Qkv().eval()
    x = torch.randn(5, 16)
    reference = model(x)
    result = _fold(fx.symbolic_trace(model))
    assert sorted(result.decisions["layer_norm_affine_into"]) == ["k", "q"]
    assert result.graph_module.q.bias is not None  # W beta needs a bias where the layer had none
    torch.testing.assert_close(result.graph_module(x), reference, rtol=1e-5, atol=1e-5)


def test_option_turns_it_off():
    model = _layer_scale_vit()
    gm, _ = capture(model, torch.randn(2, 3, 28, 28))
    result = _fold(gm, fold_scales=False)
    assert result.decisions == {"enabled": False} and not result.modified
    with pytest.raises(lpvit.ConfigError, match="fold_scales must be True or False"):
        CompileOptions.build(fold_scales="yes")
