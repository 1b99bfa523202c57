"""Model factories the CLI tests name as ``cli_models:<factory>`` (the tests put this folder on PYTHONPATH)."""

import timm
import torch


def tiny_vit() -> torch.nn.Module:
    """A 2-block timm ViT on 32x32 images with a timm data config of its own size, 3 classes."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                              num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    return model


def not_a_model():
    return "a string"
