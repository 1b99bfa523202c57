"""The compile's dense linear algebra on DeiT-S's widths, each against the plain torch call it replaces.

    python benchmarks/linalg_bench.py [--threads 2] [--repeats 9]

x^T x as the compile accumulates it (importance's input moments, reconstruction's normal equations): one GEMM
against ``linalg.gram`` (upper column tiles, mirrored). Importance runs 8-image chunks (1,576 tokens),
reconstruction 32-image batches (6,304); K = 384 is the input of qkv, proj and fc1, K = 1536 that of fc2.

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

from lpvit_compiler.linalg import ALIASED_COLUMNS, GRAM_TILE, cholesky_ex, gram, unaliased_width
from lpvit_compiler.tools.timing import interleaved


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
          f"{args.threads} threads, GRAM_TILE {GRAM_TILE}, ALIASED_COLUMNS {ALIASED_COLUMNS}, median of "
          f"{args.repeats} interleaved runs\n")
    gram_table(args.repeats)
    print()
    cholesky_table(args.repeats)


if __name__ == "__main__":
    main()
