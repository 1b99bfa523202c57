"""Does ``target_speedup`` deliver what it asks? DeiT-S (random weights, ``importance="magnitude"``, no refit:
speed does not depend on the weights' values) compiled for each target with the ``--hw`` profile (``cpu``: vendor
figures; ``native``: fitted to this machine) — once as it is,
once with its memory-bound ops given no time (``elementwise_bandwidth=inf``, the cost model before it counted
them) — then timed in onnxruntime against the dense model through our lowering, side by side (interleaved,
median of --repeats), at each batch size.

    python benchmarks/target_speedup.py [--hw cpu] [--targets 1.3 1.5] [--batches 1 8] [--threads 2] [--repeats 9]
                                        [--out benchmarks/results/target_speedup]

Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import lpvit_compiler as lpvit
from lpvit_compiler.lowering.onnx_export import export_onnx
from lpvit_compiler.runtime.sessions import ort_session
from lpvit_compiler.tools.timing import interleaved

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--hw", choices=("cpu", "native"), default="cpu")
    parser.add_argument("--targets", nargs="+", type=float, default=[1.3, 1.5])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS / "target_speedup")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    calib = torch.randn(16, 3, 224, 224)
    profiles = {"memory-bound ops costed": lpvit.get_profile(args.hw)}
    profiles["without them (before)"] = dataclasses.replace(profiles["memory-bound ops costed"],
                                                            elementwise_bandwidth=float("inf"))
    work = Path(tempfile.mkdtemp(prefix="lpvit-target-"))
    paths = {"dense": export_onnx(model, torch.zeros(2, 3, 224, 224), work / "dense.onnx")}
    compiled = {}
    for target in args.targets:
        for label, hw in profiles.items():
            key = (target, label)
            compiled[key] = lpvit.compile(model, hw=hw, target_speedup=target, calib=calib, importance="magnitude",
                                          reconstruct=False, progress=False)
            paths[key] = compiled[key].export(work / f"{target}-{len(paths)}.onnx")
    rows = []
    for batch in args.batches:
        feed = {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
        sessions = {key: ort_session(str(path), args.threads, custom_ops=key != "dense") for key, path in paths.items()}
        times = interleaved({key: (lambda s=s: s.run(None, feed)) for key, s in sessions.items()}, args.repeats)
        for (target, label), result in compiled.items():
            summary = result.report.summary
            rows.append({"target_speedup": target, "cost_model": label, "batch": batch,
                         "flops_keep": summary["flops_keep_achieved"], "predicted": summary["predicted_speedup"],
                         "ms_dense": times["dense"] * 1e3, "ms_lpvit": times[(target, label)] * 1e3,
                         "measured": times["dense"] / times[(target, label)]})
            print(rows[-1], flush=True)
    meta = {"model": args.model, "hw": args.hw, "isa": lpvit.kernel_isa(), "threads": args.threads,
            "repeats": args.repeats,
            "elementwise_bandwidth": profiles["memory-bound ops costed"].elementwise_bandwidth}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"{args.model}, `{args.hw}` profile, onnxruntime, kernel ISA {meta['isa']}, {args.threads} threads, "
             f"median of {args.repeats} interleaved runs; random weights; measured = dense (our lowering) ms / "
             "compiled ms.",
             "", "| target_speedup | cost model | flops_keep chosen | predicted | batch | dense ms | lpvit ms | "
             "**measured** |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['target_speedup']} | {r['cost_model']} | {r['flops_keep']:.3f} | {r['predicted']:.2f}x | "
              f"{r['batch']} | {r['ms_dense']:.1f} | {r['ms_lpvit']:.1f} | **{r['measured']:.2f}x** |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
