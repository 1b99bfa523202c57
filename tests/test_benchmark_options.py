"""Option parsing of the benchmark scripts: a mistyped option is a one-line argparse error, not a traceback."""
import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("real_vit", Path(__file__).parents[1] / "benchmarks" / "real_vit.py")
real_vit = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(real_vit)


def test_a_variant_name_may_contain_an_equals_sign():
    assert real_vit._parse_variant('recovery_tflops=13.2={"recovery_tflops": 13.2}') == \
        ("recovery_tflops=13.2", {"recovery_tflops": 13.2})
    assert real_vit._parse_variant('no block recovery={"block_recovery": false}') == \
        ("no block recovery", {"block_recovery": False})


@pytest.mark.parametrize("text, message", [
    ("recovery=13", "expected NAME="),
    ('={"recovery_tflops": 1}', "expected NAME="),
    ('big={"recovery_tflops": 1', "not valid JSON"),
])
def test_a_malformed_variant_is_a_clear_error(text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        real_vit.main(["--variant", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_accuracy_only_table_claims_no_speed():
    meta = {"data": "fashion-mnist", "image": 112, "calib_images": 256, "test_images": 5000,
            "conversion_max_abs_error": 2e-5, "speed_measured": False}
    rows = [{"variant": "dense", "block": None, "flops_keep": 1.0, "top1_torch": 0.84, "top1_onnx": 0.84,
             "speedup": None},
            {"variant": "float32", "block": 16, "flops_keep": 0.5, "top1_torch": 0.76, "top1_onnx": 0.76,
             "model_flops_keep": 0.6, "compile_seconds": 200.0, "speedup": None}]
    table = real_vit.markdown(rows, meta, [1, 8])
    assert "Speed not measured" in table and "onnxruntime 1." not in table and "x |" not in table
    body = [line.strip("|").split("|") for line in table.splitlines() if line.startswith(("| dense", "| float32"))]
    assert [[cell.strip() for cell in cells[-3:-1]] for cells in body] == [["—", "—"]] * 2  # speedup b1, b8
