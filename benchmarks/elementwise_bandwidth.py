"""The cost model's ``elementwise_bandwidth``, measured: the bytes the memory-bound ops of a dense ViT move
(``costmodel.flops``: norms, GELU, softmax, residual adds, copies) over the time onnxruntime's profiler spends in
every op that is not a product (MatMul, FusedMatMul, Gemm, Conv, our block-sparse ops), for the dense model
exported through our lowering.

    python benchmarks/elementwise_bandwidth.py [--model deit_small_patch16_224] [--batch 8] [--threads 2]
                                              [--out benchmarks/results/elementwise_bandwidth]

Writes <out>.md and <out>.json; the figure per thread is what the CPU profiles use (``costmodel.profiles._cpu``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import lpvit_compiler as lpvit
from lpvit_compiler.costmodel.flops import model_work_per_image
from lpvit_compiler.runtime.sessions import cpu_field
from lpvit_compiler.tools.bench import op_type_profile

RESULTS = Path(__file__).parent / "results"
PRODUCTS = {"MatMul", "FusedMatMul", "Gemm", "Conv", "BlockSparseLinear", "BlockSparseLinearInt8"}


def _cpu_name() -> str:
    """vendor, family and model name from /proc/cpuinfo (the ISA and generation the figure belongs to)."""
    return (f"{cpu_field('vendor_id')} {cpu_field('model name')} (family {cpu_field('cpu family')}, "
            f"kernel ISA {lpvit.kernel_isa()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="profiles, each of 5 runs; the median is kept")
    parser.add_argument("--out", type=Path, default=RESULTS / "elementwise_bandwidth")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    image = torch.zeros(1, 3, 224, 224)
    # flops_keep=1.0: the captured, dense model as the cost model counts it and as our lowering exports it
    compiled = lpvit.compile(model, flops_keep=1.0, calib=torch.randn(8, 3, 224, 224), importance="magnitude",
                             reconstruct=False, progress=False)
    moved = model_work_per_image(compiled.graph_module, image).memory_bytes
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)}
    with tempfile.TemporaryDirectory() as folder:
        path = str(compiled.export(Path(folder) / "dense.onnx"))
        profiles = [op_type_profile(path, feed, args.threads) for _ in range(args.runs)]
    memory_bound_ms = float(np.median([sum(ms for op, ms in p.items() if op not in PRODUCTS) for p in profiles]))
    total_ms = float(np.median([sum(p.values()) for p in profiles]))
    bandwidth = args.batch * moved / (memory_bound_ms / 1e3)
    result = {"model": args.model, "batch": args.batch, "threads": args.threads, "cpu": _cpu_name(),
              "memory_bound_bytes_per_image": moved, "memory_bound_ms": memory_bound_ms, "total_ms": total_ms,
              "elementwise_bandwidth": bandwidth, "per_thread": bandwidth / args.threads,
              "profile_ms": profiles[-1]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{args.model}, batch {args.batch}, onnxruntime, {args.threads} threads, {result['cpu']} (median of "
             f"{args.runs} profiles): bytes the memory-bound ops move (costmodel.flops) over the time spent outside "
             "products.",
             "", "| memory-bound MB per image | memory-bound ms | of total ms | GB/s | GB/s per thread |",
             "|---|---|---|---|---|",
             f"| {moved / 1e6:.1f} | {memory_bound_ms:.1f} | {total_ms:.1f} | {bandwidth / 1e9:.1f} | "
             f"{bandwidth / args.threads / 1e9:.2f} |"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
