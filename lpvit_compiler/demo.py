"""The main job on the default model: compile timm DeiT-S and print the report.

    python -m lpvit_compiler.demo [--model deit_small_patch16_224] [--hw cpu] [--flops-keep 0.5] [--images 64]

Weights and calibration images are random (model hubs are unreachable on the build machines), so the report
shows what the compiler does, not accuracy. It also checks the compiled model against the masked dense one.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import lpvit_compiler as lpvit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile a timm ViT with lpvit-compiler and print the report.")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--hw", default="cpu")
    parser.add_argument("--flops-keep", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=64, help="random calibration images")
    parser.add_argument("--dump-dir", default="dumps")
    args = parser.parse_args(argv)

    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    size = model.pretrained_cfg["input_size"]
    calib = torch.randn(args.images, *size)
    start = time.perf_counter()
    try:
        compiled = lpvit.compile(model, hw=args.hw, flops_keep=args.flops_keep, calib=calib, dump_dir=args.dump_dir)
    except lpvit.LpvitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(compiled.report)

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in compiled.masks.items():
            reference.get_submodule(name).weight.mul_(mask)
        images = torch.randn(2, *size)
        expected = reference(images)
        error = ((compiled(images) - expected).abs().max() / expected.abs().max()).item()
    print(f"compiled {args.model} in {seconds:.1f} s; max relative difference to the masked dense model: "
          f"{error:.2e}; pass dumps in {args.dump_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
