"""Float64 Cholesky as the compile runs it: ``torch.linalg.cholesky_ex`` (MKL's potrf) at the system's own width
against ``linalg.cholesky_ex``, which factors widths that are a multiple of ``ALIASED_COLUMNS`` one identity row
and column wider (``linalg.unaliased_width``), on the widths of DeiT-S's OBS curves and refits.

    python benchmarks/cholesky_bench.py [--threads 2] [--repeats 9]

Rows: fc2's inverse Hessian (K = 1536), one and the batch of three that ``_sequential_obs_errors`` factors at once
(its 64 MiB group); and, not widened, 768 (a refit keeping half of fc2's columns), 384 (qkv, proj, fc1) and 1537 (an
fc2 refit with its bias column) as controls. Times are medians of interleaved runs; the ratio is the plain call's
time over the widened one's.
"""

from __future__ import annotations

import argparse

import torch

from lpvit_compiler.linalg import ALIASED_COLUMNS, cholesky_ex, unaliased_width
from lpvit_compiler.tools.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, ALIASED_COLUMNS {ALIASED_COLUMNS}, median of {args.repeats} interleaved runs\n")
    print("| systems | n | factored at | plain ms | GFLOP/s | widened ms | GFLOP/s | ratio |\n"
          "|---|---|---|---|---|---|---|---|")
    for batch, n in ((1, 1536), (3, 1536), (8, 768), (40, 384), (3, 1537)):
        x = torch.randn(batch, n, 2 * n, dtype=torch.float64)
        system = x @ x.mT / n + 1e-2 * torch.eye(n, dtype=torch.float64)
        times = interleaved({"plain": lambda: torch.linalg.cholesky_ex(system),
                             "widened": lambda: cholesky_ex(system)}, args.repeats)
        gflop = batch * n**3 / 3 / 1e9
        print(f"| {batch} | {n} | {unaliased_width(n)} | {times['plain'] * 1e3:.1f} | {gflop / times['plain']:.0f} | "
              f"{times['widened'] * 1e3:.1f} | {gflop / times['widened']:.0f} | "
              f"{times['plain'] / times['widened']:.2f}x |")


if __name__ == "__main__":
    main()
