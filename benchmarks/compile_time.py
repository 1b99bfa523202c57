"""Wall time and peak memory of ``lpvit.compile`` on DeiT-S and DeiT-B (random weights, random calibration).

Each compile runs in a fresh subprocess so its peak RSS is its own. Goal (compiler issue): DeiT-S with 256
calibration images at 224 px in <= 60 s with peak RSS <= 4 GB on 2 CPU cores.

    python benchmarks/compile_time.py [--models deit_small_patch16_224 deit_base_patch16_224] [--images 256]
                                      [--importance taylor hessian magnitude | --preset fast] [--repeats 3]
                                      [--allocation dense sequential] [--options '{"recovery_tflops": 8}']
                                      [--gemm blas onednn]

``--gemm`` compiles once per GEMM backend (``LPVIT_GEMM``, see ``lpvit_compiler.linalg.gemm_backend``; default:
the machine's own choice).

The machine is shared and noisy: each configuration runs ``--repeats`` times and the table gives the median
wall time with the range. Writes benchmarks/results/compile_time_<models>.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lpvit_compiler.tools.bench import compile_options_argument

RESULTS = Path(__file__).parent / "results"


def run_one(model_name: str, images: int, importance: str, preset: str | None = None, allocation: str = "auto",
            extra_options: dict | None = None) -> dict:
    import timm
    import torch

    import lpvit_compiler as lpvit
    from lpvit_compiler.linalg import gemm_backend

    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    calib = torch.randn(images, 3, 224, 224)
    start = time.perf_counter()
    options = {"preset": preset} if preset else {"importance": importance}
    options["allocation"] = allocation
    options.update(extra_options or {})
    compiled = lpvit.compile(model, hw="cpu", flops_keep=0.5, calib=calib, progress=False, **options)
    seconds = time.perf_counter() - start
    return {
        "model": model_name,
        "importance": f"preset {preset}" if preset else importance,
        "allocation": allocation,
        "options": extra_options or {},
        "calibration_images": images,
        "threads": torch.get_num_threads(),
        "gemm": gemm_backend(),
        "seconds": round(seconds, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "passes": {p["pass"]: p["seconds"] for p in compiled.report.passes},
        "flops_keep_achieved": compiled.report.flops_keep_achieved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--importance", nargs="+", default=["taylor"])
    parser.add_argument("--allocation", nargs="+", default=["auto"], choices=["auto", "sequential", "dense"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--preset", help="compile with this preset (lpvit_compiler.options.PRESETS) instead of "
                                          "--importance")
    parser.add_argument("--options", type=compile_options_argument, default={}, metavar="JSON",
                        help="further lpvit.compile options for every compile, e.g. '{\"recovery_tflops\": 8}'")
    parser.add_argument("--gemm", nargs="+", default=["auto"], choices=["auto", "onednn", "blas"],
                        help="the compile's GEMM backend (LPVIT_GEMM), one row each")
    parser.add_argument("--stem", help="results file name (default compile_time_<models>)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "IMPORTANCE", "ALLOCATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.images, args.one[1], args.preset, args.one[2], args.options)))
        return
    rows = []
    for model in args.models:
        for importance, allocation, gemm in itertools.product([None] if args.preset else args.importance,
                                                              args.allocation, args.gemm):
            runs = []
            for _ in range(args.repeats):
                command = [sys.executable, __file__, "--one", model, str(importance), allocation,
                           "--images", str(args.images), "--options", json.dumps(args.options)]
                out = subprocess.run(command + (["--preset", args.preset] if args.preset else []), check=True,
                                     capture_output=True, text=True, env={**os.environ, "LPVIT_GEMM": gemm})
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            times = sorted(r["seconds"] for r in runs)
            row = {**runs[0], "seconds": statistics.median(times), "seconds_runs": times,
                   "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}
            rows.append(row)
            print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = args.stem or "compile_time_" + "_".join(args.models)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model | importance | allocation | options | calib images | threads | GEMM | wall s (median) | runs (s) "
             "| peak RSS GB | slowest pass | reconstruct s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        slowest = max(r["passes"], key=r["passes"].get)
        lines.append(f"| {r['model']} | {r['importance']} | {r['allocation']} | {json.dumps(r['options'])} | "
                     f"{r['calibration_images']} | {r['threads']} | {r['gemm']} | "
                     f"{r['seconds']:.1f} | {', '.join(f'{t:.1f}' for t in r['seconds_runs'])} | {r['peak_rss_gb']} | "
                     f"{slowest} {r['passes'][slowest]:.1f} s | {r['passes'].get('reconstruct', 0):.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
