"""Block-sparse linear kernel vs dense, per layer shape, density, block size and batch.

Side by side in one process (interleaved, median of --repeats): our op ai.lpvit::BlockSparseLinear in
onnxruntime, onnxruntime's dense MatMul+Add on the same (masked) weights, torch dense F.linear, and torch's own
CPU BSR linear. Speedups are ratios against onnxruntime dense.

    python benchmarks/kernel_bench.py [--models deit_s deit_b] [--threads 2] [--repeats 7]
                                      [--int8] [--baseline-library OLD.so] [--out benchmarks/results/kernel_bench]

``--baseline-library``: another build of liblpvit_kernels.so (say, of the commit before a kernel change) timed in
the same interleaved runs; the table then also gives our speed relative to it.

``--int8``: our int8 op (ai.lpvit::BlockSparseLinearInt8, random int8 weights) against onnxruntime's own dynamic
int8 of the dense layer (quantize_dynamic -> DynamicQuantizeMatMul, MLAS's int8 GEMM) and the float dense layer;
the table then gives our throughput per kept multiply-accumulate relative to MLAS int8 (density x MLAS time /
our time: 1.0 means as fast per useful MAC).

Writes <out>.md, <out>.json and <out>.png. No candidate spin-waits after its run (onnxruntime sessions from
``ort_session``; torch's OpenMP threads with OMP_WAIT_POLICY=PASSIVE), so candidates taking turns do not slow
each other down. ``LPVIT_KERNEL_ISA=avx2`` measures the AVX2 path on an AVX-512 machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lpvit_compiler.runtime.sessions import ort_session
from lpvit_compiler.tools.timing import interleaved

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.lowering.layer_models import single_layer_model
from lpvit_compiler.runtime.modules import BlockSparseLinear, BlockSparseLinearInt8
from lpvit_compiler.tools.bench import ort_dynamic_int8

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # name: (out_features, in_features) of the block linears
    "deit_s": {"qkv": (1152, 384), "proj": (384, 384), "fc1": (1536, 384), "fc2": (384, 1536)},
    "deit_b": {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)},
}
TOKENS = 197


def measure(out_features, in_features, block, density, batch, threads, repeats, torch_bsr: bool,
            baseline: Path | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    grid = BlockGrid(out_features, in_features, (block, block))
    block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=g) < density
    weight, bias = torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g)
    layer = BlockSparseLinear.from_masked_weight(weight, bias, grid.expand(block_mask), (block, block))
    ours = ort_session(single_layer_model(layer).SerializeToString(), threads, custom_ops=True)
    dense = ort_session(single_layer_model(layer, dense=True).SerializeToString(), threads, custom_ops=False)
    x = torch.randn(batch * TOKENS, in_features)
    feed = {"X": x.numpy()}
    dense_weight = layer.to_dense()
    np.testing.assert_allclose(ours.run(None, feed)[0], dense.run(None, feed)[0], rtol=1e-3, atol=1e-3)
    torch.set_num_threads(threads)
    candidates = {
        "ort_lpvit": lambda: ours.run(None, feed),
        "ort_dense": lambda: dense.run(None, feed),
        "torch_dense": lambda: F.linear(x, dense_weight, bias),
    }
    if baseline is not None:
        old = ort_session(single_layer_model(layer).SerializeToString(), threads, custom_ops=str(baseline))
        np.testing.assert_allclose(old.run(None, feed)[0], candidates["ort_lpvit"]()[0], rtol=1e-4, atol=1e-4)
        candidates["ort_lpvit_baseline"] = lambda: old.run(None, feed)
    times = interleaved(candidates, repeats)
    if torch_bsr:
        bsr_weight = dense_weight.to_sparse_bsr((block, block)) if out_features % block == 0 and \
            in_features % block == 0 else None
        if bsr_weight is not None:
            times.update(interleaved({"torch_bsr": lambda: F.linear(x, bsr_weight, bias)}, max(1, repeats // 3)))
    return {
        "out_features": out_features, "in_features": in_features, "block": block, "density": density,
        "actual_density": layer.nnz_blocks / grid.num_blocks, "batch": batch, "rows": batch * TOKENS,
        "threads": threads, "ms": {k: v * 1e3 for k, v in times.items()},
        "speedup_vs_ort_dense": times["ort_dense"] / times["ort_lpvit"],
        **({"speedup_vs_baseline": times["ort_lpvit_baseline"] / times["ort_lpvit"]} if baseline else {}),
    }


def measure_int8(out_features, in_features, block, density, batch, threads, repeats) -> dict:
    g = torch.Generator().manual_seed(0)
    grid = BlockGrid(out_features, in_features, (block, block))
    block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=g) < density
    codes = torch.randint(-127, 128, (out_features, in_features), generator=g)
    layer = BlockSparseLinearInt8.from_quantized(codes, torch.rand(out_features, generator=g) * 0.01,
                                                 torch.randn(out_features, generator=g), grid.expand(block_mask),
                                                 (block, block))
    dense_model = single_layer_model(layer, dense=True)
    sessions = {"ort_lpvit_int8": ort_session(single_layer_model(layer).SerializeToString(), threads, True),
                "ort_dense": ort_session(dense_model.SerializeToString(), threads, False),
                "ort_int8": ort_session(ort_dynamic_int8(dense_model), threads, False)}
    feed = {"X": np.random.default_rng(0).standard_normal((batch * TOKENS, in_features), dtype=np.float32)}
    times = interleaved({name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}, repeats)
    actual = layer.nnz_blocks / grid.num_blocks
    return {
        "out_features": out_features, "in_features": in_features, "block": block, "density": density,
        "actual_density": actual, "batch": batch, "rows": batch * TOKENS, "threads": threads,
        "ms": {k: v * 1e3 for k, v in times.items()},
        "speedup_vs_ort_dense": times["ort_dense"] / times["ort_lpvit_int8"],
        "speedup_vs_ort_int8": times["ort_int8"] / times["ort_lpvit_int8"],
        "per_kept_mac_vs_mlas_int8": actual * times["ort_int8"] / times["ort_lpvit_int8"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25, 0.1])
    parser.add_argument("--blocks", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-torch-bsr", action="store_true", help="skip torch's (slow) CPU BSR linear")
    parser.add_argument("--int8", action="store_true", help="the int8 op against onnxruntime's dynamic int8")
    parser.add_argument("--baseline-library", type=Path, help="another build of the kernel library, timed beside ours")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_bench", help="results stem (.md, .json, .png)")
    args = parser.parse_args()
    if args.baseline_library is not None and args.int8:
        parser.error("--baseline-library times the float32 op; leave it out with --int8")
    if args.baseline_library is not None and not args.baseline_library.is_file():
        parser.error(f"--baseline-library {args.baseline_library}: no such file (give a built liblpvit_kernels.so)")
    if args.int8:
        return main_int8(args)

    rows = []
    for model, layer_name, (n, k), block, density, batch in _cells(args):
        row = {"model": model, "layer": layer_name,
               **measure(n, k, block, density, batch, args.threads, args.repeats, not args.no_torch_bsr,
                         args.baseline_library)}
        rows.append(row)
        print(f"{model} {layer_name} {n}x{k} block {block} density {density} batch {batch}: "
              f"{row['speedup_vs_ort_dense']:.2f}x vs ORT dense", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"isa": lpvit.kernel_isa(), "threads": args.threads, "repeats": args.repeats, "tokens": TOKENS,
            "baseline_library": None if args.baseline_library is None else str(args.baseline_library)}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(rows, meta))
    _plot(rows, args.out.with_suffix(".png"))
    print(_markdown(rows, meta))


def _cells(args):
    """(model, layer, (out, in), block, density, batch) for every cell of the grid the flags ask for."""
    for model in args.models:
        for layer_name, shape in SHAPES[model].items():
            for block in args.blocks:
                for density in args.densities:
                    for batch in args.batches:
                        yield model, layer_name, shape, block, density, batch


def main_int8(args) -> None:
    rows = []
    for model, layer_name, (n, k), block, density, batch in _cells(args):
        row = {"model": model, "layer": layer_name,
               **measure_int8(n, k, block, density, batch, args.threads, args.repeats)}
        rows.append(row)
        print(f"{model} {layer_name} {n}x{k} block {block} density {density} batch {batch}: "
              f"{row['speedup_vs_ort_int8']:.2f}x vs ORT int8, per kept MAC "
              f"{row['per_kept_mac_vs_mlas_int8']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"isa": lpvit.kernel_int8_isa(), "threads": args.threads, "repeats": args.repeats, "tokens": TOKENS}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"int8 kernel ISA {meta['isa']}, {meta['threads']} threads, {TOKENS} tokens per image, median of "
             f"{meta['repeats']} interleaved runs; geometric mean over the model's four block linears. Cells: "
             "speedup over onnxruntime's dynamic int8 of the dense layer / our throughput per kept MAC relative to "
             "MLAS int8 (density x its time / ours) / speedup over float32 dense.", "",
             *_table(rows, ("speedup_vs_ort_int8", "per_kept_mac_vs_mlas_int8", "speedup_vs_ort_dense"), suffix="")]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _geomean(values):
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def _markdown(rows, meta) -> str:
    lines = [f"Kernel ISA {meta['isa']}, {meta['threads']} threads, {meta['tokens']} tokens per image, median of "
             f"{meta['repeats']} interleaved runs. Speedup = ORT dense MatMul+Add time / our op's time "
             "(geometric mean over the four block linears of the model).", "", *_table(rows, ("speedup_vs_ort_dense",))]
    if meta.get("baseline_library"):
        lines += ["", f"Against the baseline build `{meta['baseline_library']}` in the same runs (its time / ours):",
                  "", *_table(rows, ("speedup_vs_baseline",))]
    bsr = [r["ms"]["ort_dense"] / r["ms"]["torch_bsr"] for r in rows if "torch_bsr" in r["ms"]]
    if bsr:
        lines += ["", f"torch's own CPU BSR linear, same shapes: median {statistics.median(bsr):.2f}x the speed of "
                      "ORT dense (below 1 = slower)."]
    return "\n".join(lines) + "\n"


def _table(rows, keys: tuple[str, ...], suffix: str = "x") -> list[str]:
    """Markdown rows: model, block, batch, then at each density the geometric means of ``keys`` over the layers,
    joined by " / "."""
    densities = sorted({r["density"] for r in rows}, reverse=True)
    lines = ["| model | block | batch | " + " | ".join(f"density {d:g}" for d in densities) + " |",
             "|---|---|---|" + "---|" * len(densities)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for block in sorted({r["block"] for r in rows}):
            for batch in sorted({r["batch"] for r in rows}):
                cells = []
                for d in densities:
                    sel = [r for r in rows if (r["model"], r["block"], r["batch"], r["density"]) ==
                           (model, block, batch, d)]
                    cells.append(" / ".join(f"{_geomean([r[key] for r in sel]):.2f}{suffix}" for key in keys)
                                 if sel else "")
                lines.append(f"| {model} | {block}x{block} | {batch} | " + " | ".join(cells) + " |")
    return lines


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    figure, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    densities = sorted({r["density"] for r in rows})
    for ax, batch in zip(axes[0], batches):
        grid = np.linspace(min(densities), 1.0, 50)
        ax.plot(grid, 1 / grid, "k--", lw=1, label="1/density (ideal)")
        for model in dict.fromkeys(r["model"] for r in rows):
            for block in sorted({r["block"] for r in rows}):
                ys = [_geomean([r["speedup_vs_ort_dense"] for r in rows if (r["model"], r["block"], r["batch"],
                                                                            r["density"]) == (model, block, batch, d)])
                      for d in densities]
                ax.plot(densities, ys, "o-", label=f"{model} {block}x{block}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("block density")
        ax.set_ylabel("speedup vs onnxruntime dense")
        ax.set_title(f"batch {batch} ({batch * TOKENS} rows)")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
