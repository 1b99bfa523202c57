"""The compile's dense linear algebra on DeiT-S's widths, each against the plain torch call it replaces.

    python benchmarks/linalg_bench.py [--threads 2] [--repeats 9]

The three products of a linear layer's forward and backward (y = x W^T, dx = dy W, dW = dy^T x) on DeiT-S's
shapes, 8 images (1,576 tokens, block recovery's step), through torch's BLAS (MKL) and through oneDNN
(``linalg.onednn_product``): what ``linalg.gemm_backend`` chooses between.

x^T x as the compile accumulates it (importance's input moments, reconstruction's normal equations): one GEMM
through torch against ``linalg.gram`` (upper column tiles, mirrored, on ``linalg.gemm_backend``). Importance
runs 8-image chunks (1,576 tokens), reconstruction 32-image batches (6,304); K = 384 is the input of qkv, proj and
fc1, K = 1536 that of fc2.

Float64 Cholesky (the OBS curves, the refits, GPTQ): ``torch.linalg.cholesky_ex`` (MKL's potrf) at the system's own
width against ``linalg.cholesky_ex``, which factors widths whose float64 rows are a multiple of 4 KiB apart one
identity row and column wider (``linalg.unaliased_width``). Rows: fc2's inverse Hessian (K = 1536), one and the
batch of three that ``_sequential_obs_errors`` factors at once (its 64 MiB group); and, not widened, 768 (a refit
keeping half of fc2's columns), 384 (qkv, proj, fc1) and 1537 (an fc2 refit with its bias column) as controls.

Times are medians of interleaved runs; each ratio is the plain call's time over the replacement's.
"""

from __future__ import annotations

import argparse

import torch

from lpvit_compiler.linalg import (ALIASED_COLUMNS, GRAM_TILE, cholesky_ex, gemm_backend, gram, onednn_product,
                                   unaliased_width)
from lpvit_compiler.tools.timing import interleaved


def gemm_table(repeats: int) -> None:
    print("| layer | product | BLAS ms | GFLOP/s | oneDNN ms | GFLOP/s | ratio |\n|---|---|---|---|---|---|---|")
    tokens = 8 * 197
    for layer, (n, k) in {"qkv": (1152, 384), "proj": (384, 384), "fc1": (1536, 384), "fc2": (384, 1536)}.items():
        x, w, dy = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
        products = {"y = x W^T": (lambda: x @ w.T, lambda: onednn_product(x, w)),
                    "dx = dy W": (lambda: dy @ w, lambda: onednn_product(dy, w.T)),
                    "dW = dy^T x": (lambda: dy.T @ x, lambda: onednn_product(dy.T, x.T))}
        for name, (blas, onednn) in products.items():
            times = interleaved({"blas": blas, "onednn": onednn}, repeats)
            gflop = 2 * tokens * n * k / 1e9
            print(f"| {layer} | {name} | {times['blas'] * 1e3:.2f} | {gflop / times['blas']:.0f} | "
                  f"{times['onednn'] * 1e3:.2f} | {gflop / times['onednn']:.0f} | "
                  f"{times['blas'] / times['onednn']:.2f}x |")


def gram_table(repeats: int) -> None:
    print("| tokens | K | one GEMM ms | gram ms | ratio |\n|---|---|---|---|---|")
    for tokens in (8 * 197, 32 * 197):
        for k in (384, 1536):
            x = torch.randn(tokens, k)
            times = interleaved({"gemm": lambda: x.T @ x, "gram": lambda: gram(x)}, repeats)
            print(f"| {tokens} | {k} | {times['gemm'] * 1e3:.1f} | {times['gram'] * 1e3:.1f} | "
                  f"{times['gemm'] / times['gram']:.2f}x |")


def cholesky_table(repeats: int) -> None:
    print("| systems | n | factored at | plain ms | GFLOP/s | widened ms | GFLOP/s | ratio |\n"
          "|---|---|---|---|---|---|---|---|")
    for batch, n in ((1, 1536), (3, 1536), (8, 768), (40, 384), (3, 1537)):
        x = torch.randn(batch, n, 2 * n, dtype=torch.float64)
        system = x @ x.mT / n + 1e-2 * torch.eye(n, dtype=torch.float64)
        times = interleaved({"plain": lambda: torch.linalg.cholesky_ex(system),
                             "widened": lambda: cholesky_ex(system)}, repeats)
        gflop = batch * n**3 / 3 / 1e9
        print(f"| {batch} | {n} | {unaliased_width(n)} | {times['plain'] * 1e3:.1f} | {gflop / times['plain']:.0f} | "
              f"{times['widened'] * 1e3:.1f} | {gflop / times['widened']:.0f} | "
              f"{times['plain'] / times['widened']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, GRAM_TILE {GRAM_TILE}, ALIASED_COLUMNS {ALIASED_COLUMNS}, gemm_backend "
          f"{gemm_backend()}, median of {args.repeats} interleaved runs\n")
    gemm_table(args.repeats)
    print()
    gram_table(args.repeats)
    print()
    cholesky_table(args.repeats)


if __name__ == "__main__":
    main()
