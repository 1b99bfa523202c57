"""The ``lpvit`` command: through its real entry point (a subprocess of the installed console script) for runs
that compile, measure or need a fresh process's environment, and in-process through ``cli.main`` (the function
the script calls) for the many refusals of bad input, where a subprocess would spend its time importing torch."""

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lpvit_compiler as lpvit
from lpvit_compiler import cli
from lpvit_compiler.tools.data import image_folder

TESTS = Path(__file__).parent
MODEL = "cli_models:tiny_vit"


def lpvit_cli(*args, cwd, env=None, check=True):
    exe = shutil.which("lpvit")
    assert exe, "the lpvit console script is not installed (pip install -e .)"
    full_env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run([exe, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def lpvit_main(*args, cwd) -> subprocess.CompletedProcess:
    """``lpvit ARGS`` run in this process from ``cwd``: exit status and printed output, as from a subprocess."""
    stdout, stderr, before = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = cli.main(list(map(str, args)))
            except SystemExit as e:  # argparse's usage errors
                returncode = e.code
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, returncode, stdout.getvalue(), stderr.getvalue())


def assert_user_error(done, *expected):
    """Exit 2, one error line naming the problem (last on stderr, after any progress output), no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and done.stderr.strip().endswith(errors[0]), done.stderr
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """An ImageFolder directory: 3 classes x 4 PNGs of 40x40 random pixels."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        (root / label).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory, image_dir):
    """One full compile: calibration from a directory, export, dumps, bench, eval, report, .pt2, Triton repo."""
    work = tmp_path_factory.mktemp("compile")
    done = lpvit_cli("compile", MODEL, "--flops-keep", "0.5", "--block", "16x16", "--calib", image_dir,
                     "--out", "model.onnx", "--dump-dir", "dumps", "--report", "report.html", "--bench",
                     "--batch", "1,2", "--repeats", "1", "--eval", image_dir, "--save", "model.pt2",
                     "--triton-repo", "triton", cwd=work)
    return work, done


def test_compile_writes_every_artefact(compiled_run, image_dir):
    work, done = compiled_run
    for name in ("model.onnx", "model-dense.onnx", "model.pt2", "report.html", "dumps/passes.json",
                 "dumps/report.json", "triton/lpvit_model/config.pbtxt"):
        assert (work / name).is_file(), name
    assert "compiled vs dense" in done.stdout and "speedup" in done.stdout
    # the dense model --bench compares with went through the same lowering: its attentions head-major too
    import onnx
    dense_nodes = onnx.load(str(work / "model-dense.onnx")).graph.node
    assert any(a.name == "output_heads" and a.i > 0 for n in dense_nodes for a in n.attribute)
    assert "budget (FLOPs kept): target 0.500, achieved 0.5" in done.stdout
    # the exported model computes what the saved torch model computes
    saved = lpvit.load(work / "model.pt2")
    images = next(iter(image_folder(image_dir, {"input_size": (3, 32, 32), "crop_pct": 1.0}, batch_size=4)))[0]
    got = lpvit.InferenceSession(work / "model.onnx").run(None, {"pixel_values": images.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, saved(images).numpy(), rtol=1e-4, atol=1e-4)
    report = json.loads((work / "dumps" / "report.json").read_text())
    assert report["measurements"] == {"end_to_end": {}, "layers": {}, "accuracy": {}}  # written once, by compile
    measured = json.loads((work / "dumps" / "measurements.json").read_text())
    assert set(measured["end_to_end"]["batches"]) == {"1", "2"}
    assert {row["name"] for row in report["layers"]} == set(measured["layers"])
    assert all(m["latency_us"] > 0 and m["dense_latency_us"] > 0 for m in measured["layers"].values())
    assert measured["accuracy"]["images"] == 12 and 0 <= measured["accuracy"]["compiled"] <= 1
    # the console report shows the caption's added lines: measured end to end and accuracy
    assert "measured end to end, batch 1" in done.stdout and "top-1 on" in done.stdout


def test_eval_matches_in_process_evaluation(compiled_run, image_dir):
    work, _ = compiled_run
    done = lpvit_cli("eval", "model.onnx", "--data", image_dir, cwd=work)  # preprocessing from the ONNX metadata
    loader = image_folder(image_dir, {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
                                      "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    expected = lpvit.evaluate(lpvit.InferenceSession(work / "model.onnx"), loader)
    assert f"top-1 {expected:.4f} on 12 images" in done.stdout


def test_inspect_summarises_the_dump(compiled_run):
    work, _ = compiled_run
    done = lpvit_cli("inspect", "dumps", cwd=work)
    for text in ("capture", "importance", "block_mask_solve", "bsr_layout", "blocks.0.mlp.fc1",
                 "budget (FLOPs kept): target 0.500", "latency µs measured", "measured end to end, batch 1"):
        assert text in done.stdout, text


def test_bench_side_by_side(compiled_run):
    work, _ = compiled_run
    lpvit_cli("bench", "model.onnx", "--dense", "model-dense.onnx", "--batch", "1,3", "--repeats", "2",
              "--threads", "1", "--json", "bench.json", cwd=work)
    results = json.loads((work / "bench.json").read_text())
    assert set(results["batches"]) == {"1", "3"} and results["threads"] == 1
    for r in results["batches"].values():
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compiled_ms"])
    alone = lpvit_cli("bench", "model.onnx", "--batch", "2", "--repeats", "1", cwd=work)
    assert "images/s" in alone.stdout


def test_triton_repository_config_parses(compiled_run, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    work, _ = compiled_run
    for repo, mount in ((work / "triton", None), (tmp_path / "repo", "/models")):
        if mount:
            lpvit_cli("export", "model.pt2", "--out", tmp_path / "again.onnx", "--triton-repo", repo,
                      "--triton-name", "vit", "--triton-mount", mount, cwd=work)
        name = "vit" if mount else "lpvit_model"
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name and config.backend == "onnxruntime" and config.max_batch_size > 0
        assert [(i.name, list(i.dims)) for i in config.input] == [("pixel_values", [3, 32, 32])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [3])]
        library = Path(config.model_operations.op_library_filename[0])
        assert (repo / name / "liblpvit_kernels.so").is_file() and (repo / name / "1" / "model.onnx").is_file()
        if mount:
            assert library == Path("/models/vit/liblpvit_kernels.so")
        else:
            assert library.is_file() and library.samefile(repo / name / "liblpvit_kernels.so")


def test_quiet_prints_nothing(tmp_path):
    done = lpvit_cli("compile", MODEL, "--calib", "random:4", "--importance", "magnitude", "--out", "m.onnx",
                     "--quiet", cwd=tmp_path)
    assert done.stdout == "" and done.stderr == "" and (tmp_path / "m.onnx").is_file()


def test_compile_flags_become_compile_options():
    from lpvit_compiler.cli import build_parser
    from lpvit_compiler.cli.compile_cmd import compile_options

    args = build_parser().parse_args(["compile", MODEL, "--out", "x.onnx", "--head-keep", "0.84", "--head-criterion",
                                      "score", "--token-pruning", "merge", "--patch-keep", "0.5"])
    options = compile_options(args)
    assert (options["head_keep"], options["head_criterion"]) == (0.84, "score")
    assert (options["token_pruning"], options["patch_keep"]) == ("merge", 0.5)
    assert "head_keep" not in compile_options(build_parser().parse_args(["compile", MODEL, "--out", "x.onnx"]))


@pytest.mark.parametrize("args, expected", [
    (("compile", "deit_smal_patch16_224", "--out", "x.onnx"),
     ["unknown model 'deit_smal_patch16_224'", "did you mean deit_small_patch16_224"]),
    (("compile", "cli_models:nope", "--out", "x.onnx"), ["module 'cli_models' has no callable 'nope'"]),
    (("compile", "cli_models:not_a_model", "--out", "x.onnx"), ["returned a str, not a torch nn.Module"]),
    (("compile", MODEL, "--checkpoint", "missing.pth", "--out", "x.onnx"), ["checkpoint not found: missing.pth"]),
    (("compile", MODEL, "--flops-keep", "2.0", "--out", "x.onnx"), ["flops_keep must be in (0, 1], got 2"]),
    (("compile", MODEL, "--recovery-tflops", "-1", "--out", "x.onnx"), ["recovery_tflops must be in [0, inf], got -1"]),
    (("compile", MODEL, "--model-recovery-tflops", "-2", "--out", "x.onnx"),
     ["model_recovery_tflops must be in [0, inf], got -2"]),
    (("compile", MODEL, "--head-keep", "0", "--out", "x.onnx"), ["head_keep must be in (0, 1], got 0"]),
    (("compile", MODEL, "--calib", "no/such/dir", "--out", "x.onnx"), ["no/such/dir is not a directory"]),
    (("compile", MODEL, "--calib", "random:zero", "--out", "x.onnx"), ["count after ':' must be a positive integer"]),
    (("compile", MODEL, "--hw", "tpu", "--out", "x.onnx"), ["unknown hardware profile 'tpu'"]),
    (("compile", MODEL, "--preset", "quick", "--out", "x.onnx"), ["invalid choice: 'quick'", "fast"]),
    (("compile", "vit_tiny_patch16_224", "--pretrained", "--out", "x.onnx"),
     ["could not fetch the pretrained weights of 'vit_tiny_patch16_224'", "--checkpoint PATH"]),
    (("compile", "model.onnx", "--out", "x.onnx"), ["is an ONNX file", "lpvit bench"]),
    (("bench", "missing.onnx"), ["no ONNX model at missing.onnx"]),
    (("bench", "x.onnx", "--batch", "0"), ["--batch must be comma-separated positive integers"]),
    (("eval", "missing.onnx", "--data", "fashion-mnist"), ["no ONNX model at missing.onnx"]),
    (("inspect", "."), ["is not a compile dump (no passes.json)"]),
    (("export", "missing.pt2", "--out", "x.onnx"), ["no compiled model at missing.pt2"]),
])
def test_user_mistakes_get_one_clear_line(tmp_path, args, expected):
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    # --pretrained would try the hub: only a fresh process honours HF_HUB_OFFLINE (read when the hub is imported)
    done = lpvit_cli(*args, cwd=tmp_path, check=False) if "--pretrained" in args else lpvit_main(*args, cwd=tmp_path)
    assert_user_error(done, *expected)


def test_bad_checkpoint_and_unreadable_images(tmp_path, image_dir):
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    done = lpvit_main("compile", MODEL, "--checkpoint", "other.pth", "--out", "x.onnx", cwd=tmp_path)
    assert_user_error(done, "checkpoint other.pth is a state dict, but not of cli_models:tiny_vit",
                      "it holds 1 the model does not have (first: unrelated.weight)")
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 20)
    done = lpvit_main("compile", MODEL, "--checkpoint", "noise.pth", "--out", "x.onnx", cwd=tmp_path)
    assert_user_error(done, "checkpoint noise.pth is not a state dict torch.load (weights only) or safetensors "
                            "can read")
    broken = tmp_path / "broken"
    shutil.copytree(image_dir, broken)
    (broken / "a" / "0.png").write_bytes(b"not a png")
    done = lpvit_main("compile", MODEL, "--calib", broken, "--out", "x.onnx", cwd=tmp_path)
    assert_user_error(done, "cannot read image", "0.png")
    (tmp_path / "empty").mkdir()
    done = lpvit_main("compile", MODEL, "--calib", tmp_path / "empty", "--out", "x.onnx", cwd=tmp_path)
    assert_user_error(done, "cannot read images from", "one sub-directory per class")


def test_onnx_without_the_op_library(compiled_run, tmp_path):
    work, _ = compiled_run
    done = lpvit_cli("bench", work / "model.onnx", cwd=tmp_path, check=False,
                     env={"LPVIT_KERNELS_LIBRARY": str(tmp_path / "gone.so")})
    assert_user_error(done, f"LPVIT_KERNELS_LIBRARY={tmp_path / 'gone.so'} does not exist")
    import onnx

    model = onnx.load(work / "model.onnx")
    for node in model.graph.node:
        if node.domain == "ai.lpvit":
            node.domain = "com.example"
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "foreign.onnx")
    done = lpvit_cli("bench", "foreign.onnx", cwd=tmp_path, check=False)
    assert_user_error(done, "onnxruntime could not load foreign.onnx", "com.example")


def test_out_may_not_overwrite_the_input(compiled_run):
    work, _ = compiled_run
    before = (work / "model.pt2").read_bytes()
    done = lpvit_main("compile", "model.pt2", "--out", "model.pt2", cwd=work)
    assert_user_error(done, "--out model.pt2 is the input model")
    assert (work / "model.pt2").read_bytes() == before


def test_debug_shows_the_traceback(tmp_path):
    done = lpvit_cli("inspect", ".", "--debug", cwd=tmp_path, check=False)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_an_output_folder_that_cannot_be_written_is_one_line_before_compiling(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    for out in ("/proc/x.onnx", "file/x.onnx"):
        done = lpvit_main("compile", MODEL, "--out", out, cwd=tmp_path)
        assert_user_error(done, f"cannot write {out}", "choose an output path in a folder you can write")
        assert "compiling" not in done.stderr  # refused before the compile started


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist (test_evaluate_data requires it in CI)")
def test_eval_fits_fashion_mnist_to_a_model_of_another_input_size(compiled_run):
    """The built-in data source is resized to the model's 3x32x32 RGB input with its stored normalisation."""
    work, _ = compiled_run
    done = lpvit_cli("eval", "model.onnx", "--data", "fashion-mnist", "--limit", "20", cwd=work)
    assert "top-1" in done.stdout and "on 20 images of fashion-mnist" in done.stdout


def test_eval_without_a_data_config_says_what_the_model_expects(compiled_run, tmp_path):
    import onnx

    work, _ = compiled_run
    model = onnx.load(work / "model.onnx")
    del model.metadata_props[:]  # no preprocessing recorded
    onnx.save(model, tmp_path / "bare.onnx")
    done = lpvit_cli("eval", "bare.onnx", "--data", "fashion-mnist", cwd=tmp_path, check=False,
                     env={"LPVIT_FASHION_MNIST_DIR": str(_fake_fashion_mnist(tmp_path))})
    assert_user_error(done, "the model takes images [3, 32, 32] but Fashion-MNIST is [1, 28, 28] grey")


def _fake_fashion_mnist(root: Path) -> Path:
    """A 2-image Fashion-MNIST test split in the idx format, so the test needs no system package."""
    import gzip

    folder = root / "fmnist"
    folder.mkdir()
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(2 * 28 * 28))
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + (2).to_bytes(4, "big") + bytes([3, 7]))
    return folder


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"\x00garbage" * 100)
    return path


# every command, each input file missing, a directory where a file should be, and corrupt
INPUT_FILES = [
    ("compile {} --out o.onnx", "model.pt2"),
    ("compile " + MODEL + " --checkpoint {} --out o.onnx", "weights.pth"),
    ("bench {}", "model.onnx"),
    ("bench " + "{} --dense {}", "dense.onnx"),
    ("eval {} --data fashion-mnist", "model.onnx"),
    ("inspect {}", "dumps"),
    ("export {} --out o.onnx", "model.pt2"),
    ("export {} --triton-repo repo", "model.onnx"),
]


@pytest.mark.parametrize("kind", ["missing", "directory", "corrupt"])
@pytest.mark.parametrize("template,name", INPUT_FILES)
def test_every_command_refuses_a_bad_input_file_in_one_line(tmp_path, template, name, kind):
    path = tmp_path / name
    if kind == "directory" and name != "dumps":
        path.mkdir()
    elif kind == "corrupt":
        if name == "dumps":  # a dump folder whose passes.json is garbage
            path.mkdir()
            _corrupt(path / "passes.json")
        else:
            _corrupt(path)
    elif kind == "directory":  # "dumps" is a folder anyway: an empty one
        path.mkdir()
    args = template.format(*([name] * template.count("{}"))).split()
    if template.startswith("bench {} --dense"):  # only the dense file is bad: the compared model is fine
        args[1] = str(_tiny_onnx(tmp_path))
    done = lpvit_main(*args, cwd=tmp_path)
    assert_user_error(done, name)
    assert not (tmp_path / "o.onnx").exists()


def _tiny_onnx(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, folder / "good.onnx")
    return folder / "good.onnx"
