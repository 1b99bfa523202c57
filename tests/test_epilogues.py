"""Fused epilogues: y = activation(x W^T + b) + residual in the kernel's write-back, against unfused references;
the fuse_epilogues pass; the ONNX attribute and input, and their malformed forms."""

import importlib
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erfc, expit
from torch import nn
from torch.nn import functional as F

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.lowering.layer_models import single_layer_model
from lpvit_compiler.runtime.modules import BlockSparseLinear
from lpvit_compiler.runtime.ops import ACTIVATIONS

from test_kernels import ISA_CPU_FLAGS, _session, skip_unless_cpu_runs


def _layer(out_features, in_features, block_shape, density, activation, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = BlockGrid(out_features, in_features, block_shape)
    block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=g) < density
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    return BlockSparseLinear.from_masked_weight(weight, bias, grid.expand(block_mask), block_shape, activation)


def _unfused(layer: BlockSparseLinear, x: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    """float64: dense masked GEMM, then the activation as its textbook formula, then the add."""
    y = x.astype(np.float64) @ layer.to_dense().double().numpy().T
    if layer.bias is not None:
        y = y + layer.bias.double().numpy()
    y = {"none": lambda v: v, "relu": lambda v: np.maximum(v, 0),
         "gelu": lambda v: v * 0.5 * erfc(-v / np.sqrt(2)),
         # 0.5 (1 + tanh u) = expit(2u), the form that keeps float64 accuracy where tanh u -> -1
         "gelu_tanh": lambda v: v * expit(2 * np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3))}[layer.activation](y)
    return y + residual if residual is not None else y


@settings(max_examples=60, deadline=None)
@given(
    out_features=st.integers(1, 100), in_features=st.integers(1, 100), rows=st.sampled_from([1, 5, 13, 61]),
    block_shape=st.sampled_from([(16, 16), (32, 32), (32, 16), (8, 4), (20, 12)]),
    density=st.sampled_from([0.0, 0.25, 0.5, 1.0]), activation=st.sampled_from(sorted(ACTIVATIONS)),
    with_residual=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**16), threads=st.sampled_from([1, 2]),
)
def test_fused_op_matches_unfused_reference(out_features, in_features, rows, block_shape, density, activation,
                                            with_residual, with_bias, seed, threads):
    """onnxruntime and the torch op, both running the native fused write-back, against the unfused formula."""
    layer = _layer(out_features, in_features, block_shape, density, activation, with_bias, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, in_features), dtype=np.float32)
    residual = rng.standard_normal((rows, out_features), dtype=np.float32) if with_residual else None
    expected = _unfused(layer, x, residual)
    tolerance = dict(rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max(initial=0))))
    feed = {"X": x, **({"R": residual} if with_residual else {})}
    got = _session(single_layer_model(layer, residual=with_residual), threads).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, **tolerance)
    torch_got = layer(torch.from_numpy(x), torch.from_numpy(residual) if with_residual else None)
    np.testing.assert_allclose(torch_got.numpy(), expected, **tolerance)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_is_at_least_as_accurate_as_torchs_float_gelu(activation):
    """GELU on [-20, 20] through an identity weight, against float64: absolute error <= 3e-7 * max(1, |v|),
    relative error <= 1e-3 where |GELU| > 1e-3, and both within 1.25x of torch's own float32 GELU's."""
    layer = BlockSparseLinear.from_masked_weight(torch.eye(16), None, torch.ones(16, 16, dtype=torch.bool), (16, 16),
                                                 activation)
    x = torch.linspace(-20, 20, 16 * 4001).reshape(-1, 16)
    expected = _unfused(layer, x.numpy(), None)
    scale, visible = np.maximum(1.0, np.abs(x.numpy())), np.abs(expected) > 1e-3
    torch_error = np.abs(F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none").double().numpy()
                         - expected)
    error = np.abs(layer(x).double().numpy() - expected)
    assert np.max(error / scale) <= min(3e-7, 1.25 * np.max(torch_error / scale))
    relative = error[visible] / np.abs(expected[visible])
    assert np.max(relative) <= min(1e-3, 1.25 * np.max(torch_error[visible] / np.abs(expected[visible])))


@pytest.mark.parametrize("isa", sorted(ISA_CPU_FLAGS))
def test_every_instruction_set_path_fuses_the_same(isa):
    """Each kernel path this CPU can run (forced with LPVIT_KERNEL_ISA) computes every epilogue."""
    skip_unless_cpu_runs(isa)
    code = (
        "import torch, torch.nn.functional as F, lpvit_compiler as lpvit\n"
        "from lpvit_compiler.blocks import BlockGrid\n"
        "from lpvit_compiler.runtime.modules import BlockSparseLinear\n"
        "from lpvit_compiler.runtime.ops import ACTIVATIONS\n"
        f"assert lpvit.kernel_isa() == '{isa}', lpvit.kernel_isa()\n"
        "torch.manual_seed(0)\n"
        "for block in [(16, 32), (32, 16)]:\n"
        "    g = BlockGrid(100, 72, block); m = g.expand(torch.rand(g.block_rows, g.block_cols) < 0.6)\n"
        "    w, b, x, r = torch.randn(100, 72), torch.randn(100), 3 * torch.randn(3, 29, 72), torch.randn(3, 29, 100)\n"
        "    for act, f in ACTIVATIONS.items():\n"
        "        layer = BlockSparseLinear.from_masked_weight(w, b, m, block, act)\n"
        "        ref = f(F.linear(x.double(), (w * m).double(), b.double())) + r\n"
        "        torch.testing.assert_close(layer(x, r).double(), ref, rtol=1e-4, atol=1e-3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "LPVIT_KERNEL_ISA": isa})


def _with_attribute(model: onnx.ModelProto, **attributes) -> onnx.ModelProto:
    node = model.graph.node[0]
    for name, value in attributes.items():
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])
    return model


@pytest.mark.parametrize("attribute,message", [
    ("swish", r"activation is 'swish', expected one of none, relu, gelu, gelu_tanh"),
    (2, r"activation: "),
])
def test_bad_activation_attribute_is_rejected(attribute, message):
    layer = _layer(32, 32, (16, 16), 1.0, "none")
    session = _session(_with_attribute(single_layer_model(layer), activation=attribute))
    with pytest.raises(Exception, match=message):
        session.run(None, {"X": np.ones((3, 32), np.float32)})


def test_residual_of_the_wrong_shape_is_rejected():
    layer = _layer(32, 48, (16, 16), 1.0, "relu")
    model = single_layer_model(layer, residual=True)
    model.graph.input[-1].type.tensor_type.shape.dim[1].dim_param = "C"  # let a wrong width reach the kernel
    session = _session(model)
    with pytest.raises(Exception, match=r"residual must be a float tensor of Y's shape"):
        session.run(None, {"X": np.ones((3, 48), np.float32), "R": np.ones((3, 48), np.float32)})
    with pytest.raises(lpvit.KernelLibraryError, match=r"residual has shape \[3, 48\], the layer's output has \[3, 32\]"):
        layer(torch.ones(3, 48), torch.ones(3, 48))


def test_residual_without_bias_leaves_the_bias_slot_empty():
    layer = _layer(32, 48, (16, 16), 0.5, "gelu", with_bias=False)
    model = single_layer_model(layer, residual=True)
    assert list(model.graph.node[0].input) == ["X", "row_ptr", "col_idx", "values", "", "R"]
    x, r = np.ones((2, 48), np.float32), np.full((2, 32), 3.0, np.float32)
    np.testing.assert_allclose(_session(model).run(None, {"X": x, "R": r})[0], _unfused(layer, x, r), rtol=1e-5,
                               atol=1e-5)


class _Mlp(nn.Module):
    def __init__(self, act: nn.Module, drop: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc1, self.act, self.drop = nn.Linear(64, 128), act, nn.Dropout(drop)
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x):
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))


class _Net(nn.Module):
    """[B, 1, 16, 16] image -> 16 tokens of 64 features -> two residual MLPs -> 10 logits."""

    def __init__(self, act: nn.Module, drop: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.blocks = nn.Sequential(_Mlp(act, drop), _Mlp(act, drop))
        self.head = nn.Linear(64, 10)

    def forward(self, images):
        tokens = self.embed(images.reshape(images.shape[0], 16, 16))
        return self.head(self.blocks(tokens).mean(1))


def _compile(net, **options):
    torch.manual_seed(0)
    return lpvit.compile(net.eval(), hw="cpu", flops_keep=0.5, calib=torch.randn(8, 1, 16, 16), block_shape=(16, 16),
                         importance="magnitude", dense_fallback=False, progress=False, **options)


@pytest.mark.parametrize("act,name", [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                      (nn.ReLU(), "relu")])
def test_pass_folds_activation_and_residual_and_export_matches_torch(act, name, tmp_path):
    torch.manual_seed(0)
    net = _Net(act)
    compiled = _compile(net)
    gm = compiled.graph_module
    fc1, fc2 = gm.get_submodule("blocks.0.fc1"), gm.get_submodule("blocks.0.fc2")
    assert (fc1.activation, fc2.activation) == (name, "none")
    calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    assert "blocks.0.act" not in calls and len(calls["blocks.0.fc2"].args) == 2  # GELU folded; fc2 takes the residual
    assert not any(n.op == "call_function" and "add" in str(n.target) for n in gm.graph.nodes)
    layouts = {row.name: row.layout_and_epilogue for row in compiled.report.layers}
    assert layouts["blocks.0.fc1"] == f"bsr+{name}" and layouts["blocks.0.fc2"] == "bsr+residual"
    assert f"bsr+{name}" in str(compiled.report)
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected = compiled(x)
        unfused = _compile(net, fuse_epilogues=False)(x)
    torch.testing.assert_close(expected, unfused, rtol=1e-4, atol=1e-5)
    path = compiled.export(tmp_path / "fused.onnx")
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "BlockSparseLinear"]
    activations = [next((a.s.decode() for a in n.attribute if a.name == "activation"), "none") for n in nodes]
    assert activations.count(name) == 2 and sum(len(n.input) == 6 for n in nodes) == 2
    got = lpvit.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    portable = compiled.export(tmp_path / "portable.onnx", target="portable")
    got = ort.InferenceSession(str(portable), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("act,contrib_op", [(nn.GELU(), "Gelu"), (nn.GELU(approximate="tanh"), "FastGelu")])
def test_a_gelu_left_unfused_lowers_to_onnxruntimes_op_and_stays_standard_in_the_portable_file(act, contrib_op,
                                                                                              tmp_path):
    compiled = _compile(_Net(act), fuse_epilogues=False)
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected = compiled(x).numpy()
    tolerance = {"rtol": 1e-4, "atol": 1e-4 * float(np.abs(expected).max())}
    model = onnx.load(compiled.export(tmp_path / "lpvit.onnx"))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("com.microsoft", contrib_op)) == 2 and not {"Erf", "Tanh"} & {op for _, op in ops}
    onnx.checker.check_model(model)
    got = lpvit.InferenceSession(str(tmp_path / "lpvit.onnx")).run(None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, **tolerance)
    portable = onnx.load(compiled.export(tmp_path / "portable.onnx", target="portable"))
    assert {n.domain for n in portable.graph.node} <= {""}
    got = ort.InferenceSession(str(tmp_path / "portable.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, **tolerance)


class _NotFusable(nn.Module):
    """fc1's output gets a batch-broadcast add; fc2's output is read twice."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.pos = nn.Parameter(torch.randn(1, 16, 64))

    def forward(self, images):
        y = self.fc1(self.embed(images.reshape(images.shape[0], 16, 16))) + self.pos
        z = self.fc2(y)
        return self.head((z + torch.relu(z)).mean(1))


def test_pass_leaves_what_is_not_an_inference_identity_or_an_exact_add():
    gm = _compile(_Net(nn.GELU(), drop=0.1)).graph_module  # a nonzero dropout after GELU and after fc2
    assert gm.get_submodule("blocks.0.fc1").activation == "gelu"  # GELU comes before the dropout
    assert all(len(n.args) == 1 for n in gm.graph.nodes if n.op == "call_module" and "fc" in str(n.target))
    assert any(n.op == "call_function" and "add" in str(n.target) for n in gm.graph.nodes)
    torch.manual_seed(0)
    net = _NotFusable()
    compiled = _compile(net, layers=("fc1", "fc2"))
    gm = compiled.graph_module
    assert all(isinstance(gm.get_submodule(n), BlockSparseLinear) for n in ("fc1", "fc2"))
    assert gm.get_submodule("fc2").activation == "none"
    assert all(len(n.args) == 1 for n in gm.graph.nodes if n.op == "call_module" and "fc" in str(n.target))
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _compile(net, layers=("fc1", "fc2"), fuse_epilogues=False)(x))


def test_pass_records_what_it_fused_in_its_dump(tmp_path):
    _compile(_Net(nn.GELU()), dump_dir=tmp_path)
    dump = next(tmp_path.glob("*fuse_epilogues*"))
    text = "".join(p.read_text() for p in (dump.glob("*.json") if dump.is_dir() else [dump]))
    assert '"blocks.0.fc1"' in text and '"gelu"' in text and '"residual"' in text


def test_pass_still_fuses_activations_when_shapes_cannot_be_propagated(monkeypatch):
    class FailingShapeProp:
        def __init__(self, gm):
            pass

        def propagate(self, *args):
            raise RuntimeError("no shapes today")

    monkeypatch.setattr(importlib.import_module("lpvit_compiler.passes.fuse_epilogues"), "ShapeProp",
                        FailingShapeProp)
    compiled = _compile(_Net(nn.GELU()))
    gm = compiled.graph_module
    assert gm.get_submodule("blocks.0.fc1").activation == "gelu"
    assert all(len(n.args) == 1 for n in gm.graph.nodes if n.op == "call_module" and "fc" in str(n.target))
    assert any("residual adds were not" in note for note in compiled.report.notes)
