"""Accuracy without fine-tuning, on real data: the Fashion-MNIST ViT compiled at several budgets.

    python benchmarks/accuracy.py [--flops-keep 0.7 0.5 0.3] [--blocks 16 32] [--calib-images 256]
                                  [--patch-keep 0.5 0.25] [--options '{"model_recovery_tflops": 5}']

Trains (or loads the cached) ViT of ``benchmarks/fashion_mnist.py``, then compiles it with every importance
criterion, without and with weight reconstruction, at every budget and block size, and measures top-1 on the
10k test images for the compiled torch model and for its ONNX export in onnxruntime (they must agree). Per
(budget, block) it also times the exported model against the dense one in onnxruntime (batch 64). With
``--patch-keep``, tokens alone too: the default compile at ``flops_keep=1.0`` with ``token_pruning="merge"`` (the
model averages its 16 patch tokens, which merging keeps as a size-weighted mean; dropping them would change it),
with its whole-model FLOPs kept. ``--options`` passes further ``lpvit.compile`` options to every compile.
Writes benchmarks/results/accuracy.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import fashion_mnist  # noqa: E402

import lpvit_compiler as lpvit  # noqa: E402
from lpvit_compiler.runtime.sessions import ort_session  # noqa: E402
from lpvit_compiler.tools.bench import compare_sessions, compile_options_argument  # noqa: E402
from lpvit_compiler.tools.data import fashion_mnist as fashion_mnist_data  # noqa: E402
from lpvit_compiler.lowering.onnx_export import export_onnx  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CRITERIA = ("magnitude", "taylor", "hessian", "obs")


def plot(rows: list[dict], dense_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted({r["block"] for r in rows})
    figure, axes = plt.subplots(2, len(blocks), figsize=(5.5 * len(blocks), 8), squeeze=False)
    for column, block in enumerate(blocks):
        for variant in sorted({r["variant"] for r in rows}):
            points = sorted((r["flops_keep"], r["top1_torch"], r["speedup"]) for r in rows
                            if r["block"] == block and r["variant"] == variant)
            style = "-" if "reconstruct" in variant else "--"
            axes[0, column].plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=variant)
            axes[1, column].plot([p[2] for p in points], [p[1] for p in points], style, marker="o", label=variant)
        for row_axes, xlabel in ((axes[0, column], "flops_keep"), (axes[1, column], "measured onnxruntime speedup")):
            row_axes.axhline(dense_top1, color="k", lw=0.8, label="dense")
            row_axes.set_xlabel(xlabel)
            row_axes.set_ylabel("test top-1")
            row_axes.set_title(f"Fashion-MNIST ViT, {block}x{block} blocks", fontsize=10)
        axes[0, column].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-keep", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--blocks", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--criteria", nargs="*", default=list(CRITERIA), help="none: only the distillation rows")
    parser.add_argument("--calib-images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distill-flops-keep", nargs="*", type=float, default=[0.5])
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--patch-keep", nargs="*", type=float, default=[],
                        help="also tokens alone: token_pruning='merge' leaving these shares of the patches")
    parser.add_argument("--options", type=compile_options_argument, default={}, metavar="JSON",
                        help="further lpvit.compile options for every compile, e.g. '{\"model_recovery_tflops\": 5}'")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy")
    args = parser.parse_args(argv)

    model = fashion_mnist.trained_vit()
    test = DataLoader(fashion_mnist_data("test"), batch_size=500)
    calib = fashion_mnist_data("train").tensors[0][: args.calib_images]
    dense_top1 = lpvit.evaluate(model, test)
    work = Path(tempfile.mkdtemp(prefix="lpvit-accuracy-"))
    dense_session = ort_session(export_onnx(model, calib[:2], work / "dense.onnx"), args.threads, False)
    print(f"dense top-1 {dense_top1:.4f}", flush=True)
    rows = []
    for block in args.blocks:
        for flops_keep in args.flops_keep:
            speedup = None
            for reconstruct in (False, True):
                for criterion in args.criteria:
                    start = time.perf_counter()
                    compiled = lpvit.compile(model, hw="cpu", flops_keep=flops_keep, calib=calib, block_shape=block,
                                             importance=criterion, reconstruct=reconstruct, progress=False,
                                             **args.options)
                    seconds = time.perf_counter() - start
                    path = compiled.export(work / "compiled.onnx")
                    session = ort_session(path, args.threads, True)
                    if speedup is None:  # speed depends on the budget and block, not on which blocks go
                        timing = compare_sessions(dense_session, session, [64], repeats=7)
                        speedup = timing["batches"]["64"]["speedup"]
                    row = {"block": block, "flops_keep": flops_keep, "criterion": criterion, "reconstruct": reconstruct,
                           "variant": criterion + (" + reconstruct" if reconstruct else ""),
                           "flops_keep_achieved": compiled.report.flops_keep_achieved,
                           "top1_torch": lpvit.evaluate(compiled, test),
                           "top1_onnxruntime": lpvit.evaluate(session, test),
                           "compile_s": seconds, "speedup": speedup}
                    row["drop_points"] = 100 * (dense_top1 - row["top1_torch"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    merged = []
    for patch_keep in args.patch_keep:
        start = time.perf_counter()
        compiled = lpvit.compile(model, hw="cpu", flops_keep=1.0, calib=calib, token_pruning="merge",
                                 patch_keep=patch_keep, progress=False, **args.options)
        seconds = time.perf_counter() - start
        session = ort_session(compiled.export(work / "merged.onnx"), args.threads, True)
        timing = compare_sessions(dense_session, session, [64], repeats=7)
        row = {"patch_keep": patch_keep, "model_flops_keep": compiled.report.summary["model_flops_keep"],
               "tokens_per_block": [s["tokens_out"] for s in compiled.report.token_stages],
               "top1_torch": lpvit.evaluate(compiled, test), "top1_onnxruntime": lpvit.evaluate(session, test),
               "compile_s": seconds, "speedup": timing["batches"]["64"]["speedup"]}
        row["drop_points"] = 100 * (dense_top1 - row["top1_torch"])
        merged.append(row)
        print(json.dumps(row), flush=True)
    distilled = []
    train = DataLoader(fashion_mnist_data("train"), batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    for block in args.blocks:
        for flops_keep in args.distill_flops_keep:
            compiled = lpvit.compile(model, hw="cpu", flops_keep=flops_keep, calib=calib, block_shape=block,
                                     progress=False, **args.options)
            start = time.perf_counter()
            tuned = lpvit.finetune(compiled, train, epochs=1, teacher=model, lr=args.distill_lr, progress=False)
            row = {"block": block, "flops_keep": flops_keep, "epochs": 1, "seconds": time.perf_counter() - start,
                   "top1_before": lpvit.evaluate(compiled, test), "top1_after": lpvit.evaluate(tuned, test)}
            row["top1_after_onnxruntime"] = lpvit.evaluate(
                ort_session(tuned.export(work / "tuned.onnx"), args.threads, True), test)
            distilled.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dense_top1": dense_top1, "test_images": len(test.dataset), "calib_images": len(calib),
            "options": args.options, "threads": args.threads, "versions": lpvit.compiled.versions()}
    results = {"meta": meta, "rows": rows, "merged": merged, "distilled": distilled}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (("reconstruct" in v), v))
    lines = [f"Fashion-MNIST ViT (`benchmarks/fashion_mnist.py`), dense test top-1 {dense_top1:.4f} on "
             f"{len(test.dataset)} images; {len(calib)} calibration images from the training split; no fine-tuning. "
             "Cells: test top-1 of the compiled model in onnxruntime (torch agrees: see the JSON); speedup = "
             f"dense / compiled onnxruntime time at batch 64, {args.threads} threads, median of 7."
             + (f" Every compile with {json.dumps(args.options)}." if args.options else ""), "",
             "| block | flops_keep | speedup | " + " | ".join(variants) + " |",
             "|---" * (3 + len(variants)) + "|"]
    for block in args.blocks if rows else []:
        for flops_keep in args.flops_keep:
            cell = {r["variant"]: r for r in rows if r["block"] == block and r["flops_keep"] == flops_keep}
            first = next(iter(cell.values()))
            lines.append(f"| {block}x{block} | {flops_keep} | {first['speedup']:.2f}x | " +
                         " | ".join(f"{cell[v]['top1_onnxruntime']:.4f}" for v in variants) + " |")
    lines += ["", f"With one epoch of distillation (`lpvit.finetune`, teacher = the dense model, lr {args.distill_lr}, "
              "masks frozen), default compile options" + (" and those above" if args.options else "") + ":", "",
              "| block | flops_keep | top-1 before | top-1 after (torch) | after (onnxruntime) | seconds |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['block']}x{r['block']} | {r['flops_keep']} | {r['top1_before']:.4f} | {r['top1_after']:.4f} | "
              f"{r['top1_after_onnxruntime']:.4f} | {r['seconds']:.0f} |" for r in distilled]
    if merged:
        lines += ["", "Tokens alone (`token_pruning=\"merge\"`, `flops_keep=1.0`, default compile otherwise; patch tokens "
                  "after each merge stage, blocks 1-3):", "",
                  "| patch_keep | patches after each stage | model FLOPs kept | top-1 torch | top-1 onnxruntime | "
                  "drop (points) | speedup |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['patch_keep']} | {' / '.join(map(str, r['tokens_per_block']))} | {r['model_flops_keep']:.3f} | "
                  f"{r['top1_torch']:.4f} | {r['top1_onnxruntime']:.4f} | {r['drop_points']:.2f} | "
                  f"{r['speedup']:.2f}x |" for r in merged]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if rows:
        plot(rows, dense_top1, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
