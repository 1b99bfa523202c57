"""Token and head pruning alone on real weights: DINOv2-S + frozen probe (``real_vit.py``'s protocol), no weight
pruning, over token modes, schedules and head counts.

    python benchmarks/token_sweep.py [--patch-keep 0.7 0.5] [--first-stage 1 4] [--modes cascade merge]
                                     [--head-keep 0.5] [--head-criteria refit score] [--repeats 3]
                                     [--out benchmarks/results/token_sweep]

Every row compiles with ``flops_keep=1.0``, ``reconstruct=False`` and ``importance="magnitude"``: no weight block
is pruned, so the criterion decides nothing, and the rows measure the token reducers alone, without the refit
and block recovery that the default compile runs (with them, merged rows gain up to 2.1 points: ``real_vit.py
--budget 1:0.25 --variant 'merge=...'``, README; cascade rows measured within 0.1 point), so a compile takes
seconds. Top-1 is onnxruntime's on the Fashion-MNIST test images, the speedup is at batch 8 over the dense
export (interleaved medians), model FLOPs kept counts the tokens (``torch.utils.flop_counter``). Writes <out>.md
and <out>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_vit  # noqa: E402

import lpvit_compiler as lpvit  # noqa: E402
from lpvit_compiler.lowering.onnx_export import export_onnx  # noqa: E402
from lpvit_compiler.options import HEAD_CRITERIA  # noqa: E402
from lpvit_compiler.runtime.sessions import ort_session  # noqa: E402
from lpvit_compiler.tools.bench import compare_sessions  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch-keep", nargs="+", type=float, default=[0.7, 0.5])
    parser.add_argument("--first-stage", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--modes", nargs="*", default=["cascade", "merge"])
    parser.add_argument("--head-keep", nargs="*", type=float, default=[0.5])
    parser.add_argument("--head-criteria", nargs="+", default=["refit"], choices=HEAD_CRITERIA,
                        help="head_criterion for the head rows")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=real_vit.RESULTS / "token_sweep")
    args = parser.parse_args(argv)

    proto = onnx.load_from_string(real_vit.dinov2_onnx())
    model = real_vit.dinov2_small(proto)
    images, labels = real_vit.fashion_mnist(args.test_images)
    train, test = torch.arange(4000), torch.arange(len(images) - args.test_images, len(images))
    model = real_vit.with_probe(model, images[train], labels[train])
    calib, test_images, test_labels = images[train[: args.calib_images]], images[test], labels[test]
    work = Path(tempfile.mkdtemp(prefix="lpvit-token-sweep-"))
    dense_session = ort_session(str(export_onnx(model, test_images[:2], work / "dense.onnx")), args.threads,
                                custom_ops=False)
    rows = [{"config": "dense", "top1": real_vit.top1(real_vit.run_onnx(dense_session, test_images), test_labels),
             "model_flops_keep": 1.0, "speedup_b8": 1.0}]
    configs = [(f"{mode}, patch_keep {keep}, from block {first}",
                {"token_pruning": mode, "patch_keep": keep, "first_token_stage": first})
               for mode in args.modes for first in args.first_stage for keep in args.patch_keep]
    configs += [(f"heads, head_keep {keep}, {criterion}", {"head_keep": keep, "head_criterion": criterion})
                for keep in args.head_keep for criterion in args.head_criteria]
    for name, options in configs:
        compiled = lpvit.compile(model, flops_keep=1.0, calib=calib, reconstruct=False, importance="magnitude",
                                 progress=False, **options)
        session = ort_session(str(compiled.export(work / "compiled.onnx")), args.threads, custom_ops=True)
        timing = compare_sessions(dense_session, session, [8], args.repeats)["batches"]
        rows.append({"config": name, **options,
                     "top1": real_vit.top1(real_vit.run_onnx(session, test_images), test_labels),
                     "model_flops_keep": compiled.report.summary["model_flops_keep"],
                     "speedup_b8": next(iter(timing.values()))["speedup"],
                     "tokens_per_stage": [s["tokens_out"] for s in compiled.report.token_stages]})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"isa": lpvit.kernel_isa(), "threads": args.threads, "repeats": args.repeats,
            "calib_images": len(calib), "test_images": len(test_images), "image": real_vit.IMAGE}
    intro = (f"DINOv2-S/14 + frozen probe, Fashion-MNIST at {meta['image']} px, {meta['calib_images']} "
             f"calibration images, {meta['test_images']} test images; flops_keep=1.0, reconstruct=False; speedup "
             f"at batch 8, onnxruntime, {meta['threads']} threads, kernel ISA {meta['isa']}, median of "
             f"{meta['repeats']} interleaved runs.")
    real_vit.write_results(args.out, meta, rows, intro, {
        "config": lambda r: r["config"], "top-1 (onnxruntime)": lambda r: f"{r['top1']:.4f}",
        "vs dense": lambda r: f"{100 * (r['top1'] - rows[0]['top1']):+.1f}",
        "model FLOPs kept": lambda r: f"{r['model_flops_keep']:.3f}",
        "speedup b8": lambda r: f"{r['speedup_b8']:.2f}x"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
