"""How well the cost model predicts per-layer latency: DeiT-S compiled at flops_keep 0.5 with each hw profile
and block shape, every pruned layer timed in onnxruntime as it runs after export (``tools.bench.measure_layers``:
our op, or MatMul+Add where the layout is dense, at the profile's batch of 8 images), next to the latency the
report predicted for it.

    python benchmarks/cost_model_error.py [--profiles cpu native] [--blocks 16 32] [--runs 3]
                                          [--out benchmarks/results/cost_model_error]

Each run compiles anew, so ``native`` is re-measured every run: the spread over runs is the fit's own noise plus
the machine's drift between fitting and measuring. Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import lpvit_compiler as lpvit
from lpvit_compiler.costmodel.native import native_profile
from lpvit_compiler.tools.bench import measure_layers

RESULTS = Path(__file__).parent / "results"


def one_run(model, calib, hw: str, block: int) -> dict:
    native_profile.cache_clear()  # a fresh fit per run: its noise is part of what is measured
    compiled = lpvit.compile(model, hw=hw, flops_keep=0.5, calib=calib, importance="magnitude", block_shape=block,
                             reconstruct=False, progress=False)
    measured = measure_layers(compiled, repeats=5)
    errors, by_kind = [], defaultdict(list)
    for row in compiled.report.layers:
        error = (row.latency_predicted_us - measured[row.name].latency_us) / measured[row.name].latency_us
        errors.append(abs(error))
        by_kind[f"{row.name.rsplit('.', 1)[-1]} ({row.layout})"].append(error)
    return {"median_abs_error": float(np.median(errors)),
            "median_signed_error_by_layer": {k: float(np.median(v)) for k, v in sorted(by_kind.items())},
            "calibration": compiled.report.hw_profile["calibration"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["cpu", "native"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "cost_model_error")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    calib = torch.randn(16, 3, 224, 224)
    results = []
    for hw in args.profiles:
        for block in args.blocks:
            runs = [one_run(model, calib, hw, block) for _ in range(args.runs)]
            results.append({"hw": hw, "block": block, "runs": runs})
            print(hw, block, [round(r["median_abs_error"], 3) for r in runs], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"isa": lpvit.kernel_isa(), "model": "deit_small_patch16_224", "flops_keep": 0.5, "batch": 8}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"DeiT-S, flops_keep 0.5, batch 8, onnxruntime, kernel ISA {meta['isa']}; per-layer |predicted - "
             "measured| / measured, median over the 48 layers, one compile (and for `native` one fit) per run.", "",
             "| profile | block | median error per run | median over runs | signed error by layer kind (last run) |",
             "|---|---|---|---|---|"]
    for r in results:
        per_run = [run["median_abs_error"] for run in r["runs"]]
        kinds = ", ".join(f"{k} {v:+.0%}" for k, v in r["runs"][-1]["median_signed_error_by_layer"].items())
        lines.append(f"| {r['hw']} | {r['block']}x{r['block']} | {', '.join(f'{e:.0%}' for e in per_run)} | "
                     f"**{np.median(per_run):.0%}** | {kinds} |")
    lines += ["", "Fits (last run of each):", ""]
    lines += [f"- {r['hw']} {r['block']}x{r['block']}: {r['runs'][-1]['calibration']}" for r in results]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
