"""Outlier activations of the real-weight benchmark model: does DINOv2-S carry massive activations, register
neurons or high-norm tokens on the benchmark's calibration images?

    python benchmarks/outliers.py [--data fashion-mnist|mnist] [--out benchmarks/results/outliers_dinov2]

The accuracy issue asks for blocks that touch massive-activation channels (arXiv 2402.17762: a few residual-stream
channels ~1000x larger than the median) or register neurons (MLP neurons that fire on a few tokens and make
high-norm "artifact" tokens, arXiv 2309.16588) to be costed as such. Before building that, this measures whether
the benchmark's model has any. On ``real_vit.py``'s model (DINOv2-S/14 at 112 px, the same 256 calibration
images), per block, over every token of every calibration image:

- residual stream (the block's output x [N, T, 384]): peak_c = max_{n,t} |x_ntc| per channel c; reported are
  max_c peak_c and max_c peak_c / median_c peak_c (a massive-activation channel makes this ratio ~1000);
- MLP neurons (fc2's input, after GELU, [N, T, 1536]): the same ratio over neurons (a register neuron makes it
  large);
- token norms: max_{n,t} ||x_nt|| / median_{n,t} ||x_nt|| (a high-norm artifact token makes it large).

Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_vit  # noqa: E402  (the benchmark whose model and calibration images are measured)

RESULTS = Path(__file__).parent / "results"


def peak_ratio(peaks: torch.Tensor) -> float:
    """max / median of per-channel (or per-neuron) peaks [C]."""
    return float(peaks.max() / peaks.median())


def measure(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> list[dict]:
    """Per block: residual-stream channel peaks [C], MLP-neuron peaks [4C] and every token's norm."""
    stream = [torch.zeros(0)] * len(model.blocks)
    neurons = [torch.zeros(0)] * len(model.blocks)
    norms: list[list[torch.Tensor]] = [[] for _ in model.blocks]

    def peaks(previous: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        current = x.abs().amax(dim=(0, 1))
        return current if previous.numel() == 0 else torch.maximum(previous, current)

    def on_block(i):
        def hook(module, args, output):
            stream[i] = peaks(stream[i], output)
            norms[i].append(torch.linalg.vector_norm(output, dim=-1).flatten())
        return hook

    def on_fc2(i):
        def hook(module, args):
            neurons[i] = peaks(neurons[i], args[0])
        return hook

    handles = [b.register_forward_hook(on_block(i)) for i, b in enumerate(model.blocks)]
    handles += [b.mlp.fc2.register_forward_pre_hook(on_fc2(i)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            for chunk in images.split(batch):
                model(chunk)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for i in range(len(model.blocks)):
        token_norms = torch.cat(norms[i])
        rows.append({"block": i, "stream_peak": float(stream[i].max()), "stream_ratio": peak_ratio(stream[i]),
                     "stream_top_channel": int(stream[i].argmax()), "neuron_ratio": peak_ratio(neurons[i]),
                     "token_norm_ratio": float(token_norms.max() / token_norms.median())})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("mnist", "fashion-mnist"), default="fashion-mnist")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "outliers_dinov2")
    args = parser.parse_args(argv)
    model = real_vit.dinov2_small(onnx.load_from_string(real_vit.dinov2_onnx())).eval()
    images, _ = real_vit.mnist() if args.data == "mnist" else real_vit.fashion_mnist()
    order = (torch.randperm(len(images), generator=torch.Generator().manual_seed(0)) if args.data == "mnist"
             else torch.arange(len(images)))  # real_vit.py's training split, whose first images calibrate
    rows = measure(model, images[order[: args.calib_images]])
    lines = [f"DINOv2-S/14 at {real_vit.IMAGE} px, {args.calib_images} {args.data} calibration images (real_vit.py's). "
             "Ratios are max / median; a massive-activation channel or register neuron shows as a ratio in the "
             "hundreds to thousands.", "",
             "| block | residual max \\|x\\| | channel peak ratio (channel) | MLP neuron peak ratio | token norm ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['stream_peak']:.1f} | {r['stream_ratio']:.1f} ({r['stream_top_channel']}) | "
              f"{r['neuron_ratio']:.1f} | {r['token_norm_ratio']:.2f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"data": args.data, "calib_images": args.calib_images,
                                                         "image_px": real_vit.IMAGE, "blocks": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
