"""A small ViT trained from scratch on Fashion-MNIST: the accuracy benchmark's model.

    python benchmarks/fashion_mnist.py [--epochs 8] [--out ~/.cache/lpvit-compiler/fashion_mnist_vit.pt]

``vit()`` builds it (timm ``VisionTransformer``, 28×28×1 input, 7×7 patches → 16 tokens, average pooled,
width 128, depth 4, 4 heads, MLP 384: every linear dimension a multiple of 32). ``trained_vit()`` returns it
with the cached checkpoint, training it first if there is none (about 9 minutes on 2 cores). The CLI takes
the factory as ``benchmarks.fashion_mnist:vit``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

CHECKPOINT = Path(os.environ.get("LPVIT_CACHE_DIR", Path.home() / ".cache" / "lpvit-compiler")) / \
    "fashion_mnist_vit.pt"


def vit() -> nn.Module:
    """The benchmark's ViT, randomly initialised; input [B, 1, 28, 28] normalised, output logits [B, 10]."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=4,
                             num_heads=4, mlp_ratio=3.0, class_token=False, global_pool="avg")


def train(model: nn.Module, epochs: int, batch_size: int = 128, lr: float = 1.5e-3, log=print) -> nn.Module:
    """AdamW with a one-cycle schedule on the 60k training images (no augmentation: a short schedule
    converges faster without it)."""
    from lpvit_compiler.tools.data import fashion_mnist

    images, labels = fashion_mnist("train").tensors
    steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(epochs):
        start, order = time.perf_counter(), torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            index = order[i:i + batch_size]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s, "
            f"test top-1 {test_accuracy(model):.4f}")
        model.train()
    return model.eval()


def test_accuracy(model: nn.Module) -> float:
    from lpvit_compiler import evaluate
    from lpvit_compiler.tools.data import fashion_mnist

    return evaluate(model, torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=500))


def trained_vit(checkpoint: Path = CHECKPOINT, epochs: int = 8) -> nn.Module:
    """The benchmark's ViT with trained weights, from ``checkpoint`` (trained and saved there if missing)."""
    model = vit()
    if checkpoint.is_file():
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    train(model, epochs)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), checkpoint)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = train(vit(), args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"trained in {time.perf_counter() - start:.0f} s; test top-1 {test_accuracy(model):.4f}; saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
