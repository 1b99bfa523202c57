import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import lpvit_compiler as lpvit


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    calib = torch.randn(4, 3, 224, 224)
    # the export is under test: recovery's Adam steps on a 224-px model (a minute) would not change it
    compiled = lpvit.compile(model, flops_keep=0.5, calib=calib, importance="magnitude", block_shape=16,
                             block_recovery=False, model_recovery_tflops=0, progress=False)
    return compiled, calib


def test_deit_tiny_onnx_with_custom_op_matches_torch(deit_tiny, tmp_path):
    compiled, calib = deit_tiny
    block_sparse = [row for row in compiled.report.layers if row.layout == "bsr"]
    transposed = onnx.load(compiled.export(tmp_path / "transposed.onnx", head_major_attention=False))
    custom = [n for n in transposed.graph.node if n.domain == "ai.lpvit"]
    assert len(custom) == len(block_sparse) > 0 and all(n.op_type == "BlockSparseLinear" for n in custom)
    path = compiled.export(tmp_path / "deit_tiny.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    heads = {name: sorted(a.i for n in model.graph.node for a in n.attribute if a.name == name and a.i)
             for name in ("input_heads", "output_heads")}  # every attention head-major: q, k, v and proj
    assert heads == {"input_heads": [3] * 12, "output_heads": [3] * 36}
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 18), ("ai.lpvit", 1)}
    session = lpvit.InferenceSession(path, intra_op_num_threads=2)
    for batch in (1, 3):  # the batch dimension stays dynamic
        images = calib[:batch]
        got = session.run(None, {"pixel_values": images.numpy()})[0]
        with torch.no_grad():
            expected = compiled(images).numpy()
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_portable_export_runs_on_stock_onnxruntime(deit_tiny, tmp_path):
    compiled, calib = deit_tiny
    path = compiled.export(tmp_path / "portable.onnx", target="portable")
    model = onnx.load(path)
    assert not [n for n in model.graph.node if n.domain == "ai.lpvit"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # no custom-op library
    got = session.run(None, {"pixel_values": calib.numpy()})[0]
    with torch.no_grad():
        expected = compiled(calib).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_an_uncompiled_model_exports_to_both_targets(tmp_path):
    """The benchmarks' dense baselines: torch's standard lowering (portable) and ours (GELU as onnxruntime's op)."""
    from lpvit_compiler.lowering.onnx_export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(images).numpy()
    for target, gelu in (("portable", ("", "Erf")), ("lpvit", ("com.microsoft", "Gelu"))):
        path = export_onnx(model, images, tmp_path / f"{target}.onnx", target=target)
        assert sum((n.domain, n.op_type) == gelu for n in onnx.load(path).graph.node) == 2, target
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"pixel_values": images.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), target


def test_bad_export_target_and_missing_model(compiled, tmp_path):
    with pytest.raises(lpvit.LpvitError, match=r"unknown export target 'tensorrt'; choose one of lpvit, portable"):
        compiled.export(tmp_path / "x.onnx", target="tensorrt")
    with pytest.raises(lpvit.ModelFileError, match="no ONNX model at .*missing.onnx"):
        lpvit.InferenceSession(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(lpvit.ModelFileError, match="onnxruntime could not load"):
        lpvit.InferenceSession(junk)
    with pytest.raises(lpvit.LpvitError, match="SessionOptions has no option 'turbo'"):
        lpvit.InferenceSession(junk, turbo=True)
