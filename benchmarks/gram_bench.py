"""x^T x as the compile accumulates it (importance's input moments, reconstruction's normal equations): one GEMM
against ``linalg.gram`` (upper column tiles, mirrored), on DeiT-S's input widths and chunk sizes.

    python benchmarks/gram_bench.py [--threads 2] [--repeats 9]

Importance runs 8-image chunks (1,576 tokens), reconstruction 32-image batches (6,304); K = 384 is the input of
qkv, proj and fc1, K = 1536 that of fc2. Times are medians of interleaved runs; the ratio is one GEMM over gram.
"""

from __future__ import annotations

import argparse

import torch

from lpvit_compiler.linalg import GRAM_TILE, gram
from lpvit_compiler.tools.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, GRAM_TILE {GRAM_TILE}, median of {args.repeats} interleaved runs\n")
    print("| tokens | K | one GEMM ms | gram ms | ratio |\n|---|---|---|---|---|")
    for tokens in (8 * 197, 32 * 197):
        for k in (384, 1536):
            x = torch.randn(tokens, k)
            times = interleaved({"gemm": lambda: x.T @ x, "gram": lambda: gram(x)}, args.repeats)
            print(f"| {tokens} | {k} | {times['gemm'] * 1e3:.1f} | {times['gram'] * 1e3:.1f} | "
                  f"{times['gemm'] / times['gram']:.2f}x |")


if __name__ == "__main__":
    main()
