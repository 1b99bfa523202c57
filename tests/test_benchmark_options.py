"""Option parsing of the benchmark scripts: a mistyped option is a one-line argparse error, not a traceback."""
import importlib.util
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _benchmark(name: str):
    """The script benchmarks/<name>.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


real_vit = _benchmark("real_vit")


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


@pytest.mark.parametrize("script, options, message", [
    ("minilm", "[1]", "expected a JSON object of compile options"),
    ("minilm", '{"recovery_tflops": 1', "is not valid JSON"),
    ("minilm", '{"importance": "obs"}', "--options may not set importance"),
    ("compile_time", "5", "expected a JSON object of compile options"),
    ("accuracy", '{"model_recovery_tflops": 5', "is not valid JSON"),
])
def test_malformed_compile_options_are_a_clear_error(script, options, message, capsys, monkeypatch):
    module = _benchmark(script)
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--options", options])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
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


def test_results_are_written_as_json_and_a_markdown_table(tmp_path):
    import json

    rows = [{"config": "dense", "top1": 0.8376}, {"config": "merge", "top1": 0.8066}]
    real_vit.write_results(tmp_path / "sub" / "sweep", {"image": 112}, rows, "Intro.", {
        "config": lambda r: r["config"], "vs dense": lambda r: f"{100 * (r['top1'] - rows[0]['top1']):+.1f}"})
    assert json.loads((tmp_path / "sub" / "sweep.json").read_text()) == {"meta": {"image": 112}, "rows": rows}
    assert (tmp_path / "sub" / "sweep.md").read_text() == ("Intro.\n\n| config | vs dense |\n|---|---|\n"
                                                            "| dense | +0.0 |\n| merge | -3.1 |\n")


@pytest.mark.parametrize("arguments, message", [
    (["--baseline-library", "no/such/lib.so"], "--baseline-library no/such/lib.so: no such file"),
    (["--baseline-library", __file__, "--int8"], "--baseline-library times the float32 op"),
])
def test_kernel_bench_baseline_library_mistakes_are_clear_errors(arguments, message):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(_BENCHMARKS / "kernel_bench.py"), *arguments], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_kernel_bench_times_a_baseline_build_beside_ours():
    # the baseline is another build of the library; the installed one stands in for it (same results, asserted
    # inside measure), so the row carries a speedup against it
    import lpvit_compiler as lpvit

    kernel_bench = _benchmark("kernel_bench")
    row = kernel_bench.measure(48, 40, 16, 0.5, 1, 1, 1, False, baseline=Path(lpvit.kernels_library_path()))
    assert set(row["ms"]) == {"ort_lpvit", "ort_dense", "torch_dense", "ort_lpvit_baseline"}
    assert row["speedup_vs_baseline"] > 0
    table = kernel_bench._markdown([{"model": "m", "layer": "l", **row}], {"isa": "x", "threads": 1, "repeats": 1,
                                                                         "tokens": 197, "baseline_library": "old.so"})
    assert "Against the baseline build `old.so`" in table


def test_the_outlier_measure_finds_a_planted_massive_channel():
    """benchmarks/outliers.py reports "no outliers" for DINOv2-S: it must see one where there is one."""
    import timm
    import torch

    outliers = _benchmark("outliers")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32)
    plain = outliers.measure(model, images)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[7] = 1e4  # a massive channel written into the residual stream by block 1
    planted = outliers.measure(model, images)
    assert max(r["stream_ratio"] for r in plain) < 100
    assert plain[0] == planted[0]  # before block 1 nothing changes
    for row in planted[1:]:
        assert row["stream_top_channel"] == 7 and row["stream_ratio"] > 1000
        assert row["token_norm_ratio"] < 1.1  # every token carries it: no single high-norm token



def test_e2e_bench_missing_baseline_library_is_a_clear_error(capsys):
    e2e_bench = _benchmark("e2e_bench")
    with pytest.raises(SystemExit) as exit_info:
        e2e_bench.main(["--baseline-library", "no/such/lib.so"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--baseline-library no/such/lib.so: no such file" in err and "Traceback" not in err
