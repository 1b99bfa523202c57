"""End to end: a compiled timm DeiT in onnxruntime with our op vs the same dense model in onnxruntime.

For each model and flops_keep: compile (random weights; importance "magnitude" — the criterion changes which
blocks go, not how many, so speed does not depend on it), export with ai.lpvit::BlockSparseLinear, export the
dense original, and time both side by side (interleaved, median of --repeats) at each batch size. Next to the
ratios, onnxruntime's own profiler gives the time per op type of both models at the largest batch, so anyone
can see where the time goes.

    python benchmarks/e2e_bench.py [--models deit_small_patch16_224 deit_base_patch16_224]
                                   [--flops-keep 0.5 0.3] [--batches 1 8] [--threads 2] [--repeats 9]
                                   [--out benchmarks/results/e2e_bench]

Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from lpvit_compiler.runtime.sessions import ort_session
from lpvit_compiler.tools.bench import op_type_profile
from lpvit_compiler.tools.timing import interleaved

import lpvit_compiler as lpvit
from lpvit_compiler.lowering.onnx_export import export_onnx

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    parser.add_argument("--flops-keep", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--block", type=int, default=None, help="block edge (default: the hw profile's)")
    parser.add_argument("--hw", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_bench", help="results stem (.md, .json)")
    args = parser.parse_args()
    import timm

    rows = []
    work = Path(tempfile.mkdtemp(prefix="lpvit-e2e-"))
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        dense_path = work / f"{name}-dense.onnx"
        export_onnx(model, torch.zeros(2, 3, 224, 224), dense_path)
        dense = ort_session(str(dense_path), args.threads, custom_ops=False)
        calib = torch.randn(16, 3, 224, 224)
        for flops_keep in args.flops_keep:
            compiled = lpvit.compile(model, hw=args.hw, flops_keep=flops_keep, calib=calib, importance="magnitude",
                                     block_shape=args.block, progress=False)
            sparse_path = compiled.export(work / f"{name}-{flops_keep}.onnx")
            sparse = ort_session(str(sparse_path), args.threads, custom_ops=True)
            for batch in args.batches:
                feed = {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, 224, 224),
                                                                                dtype=np.float32)}
                with torch.no_grad():
                    expected = compiled(torch.from_numpy(feed["pixel_values"])).numpy()
                got = sparse.run(None, feed)[0]
                assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
                times = interleaved({"lpvit": lambda: sparse.run(None, feed), "dense": lambda: dense.run(None, feed)},
                                    args.repeats)
                row = {"model": name, "flops_keep": flops_keep, "block": list(compiled.report.layers[0].block_shape),
                       "model_flops_keep": compiled.report.summary["model_flops_keep"], "batch": batch,
                       "threads": args.threads, "ms_lpvit": times["lpvit"] * 1e3, "ms_dense": times["dense"] * 1e3,
                       "speedup": times["dense"] / times["lpvit"],
                       "predicted_speedup": compiled.report.summary["predicted_speedup"]}
                if batch == max(args.batches):
                    row["profile_ms"] = {"dense": op_type_profile(str(dense_path), feed, args.threads, False),
                                         "lpvit": op_type_profile(str(sparse_path), feed, args.threads, True)}
                rows.append(row)
                print({k: v for k, v in row.items() if k != "profile_ms"}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"isa": lpvit.kernel_isa(), "threads": args.threads, "repeats": args.repeats, "hw_profile": args.hw}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"onnxruntime {__import__('onnxruntime').__version__}, kernel ISA {meta['isa']}, {args.threads} threads, "
             f"median of {args.repeats} interleaved runs; random weights.", "",
             "| model | flops_keep (linears) | model FLOPs kept | block | batch | dense ms | lpvit ms | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['flops_keep']} | {r['model_flops_keep']:.3f} | "
                     f"{r['block'][0]}x{r['block'][1]} | {r['batch']} | {r['ms_dense']:.1f} | {r['ms_lpvit']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    for r in rows:
        if "profile_ms" in r:
            lines += ["", *profile_table(r)]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def profile_table(row: dict) -> list[str]:
    """Markdown: ms per run by op type, dense vs compiled (onnxruntime's profiler, summed kernel time)."""
    dense, ours = row["profile_ms"]["dense"], row["profile_ms"]["lpvit"]
    lines = [f"Where the time goes: {row['model']}, flops_keep {row['flops_keep']}, batch {row['batch']} "
             "(onnxruntime profiler, ms per run, summed kernel time)", "",
             "| op type | dense ms | lpvit ms |", "|---|---|---|"]
    for op in sorted(set(dense) | set(ours), key=lambda o: -max(dense.get(o, 0), ours.get(o, 0))):
        if max(dense.get(op, 0), ours.get(op, 0)) >= 0.1:
            lines.append(f"| {op} | {dense.get(op, 0):.1f} | {ours.get(op, 0):.1f} |")
    lines.append(f"| **total** | {sum(dense.values()):.1f} | {sum(ours.values()):.1f} |")
    return lines


if __name__ == "__main__":
    main()
