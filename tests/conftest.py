import copy
import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import lpvit_compiler as lpvit

# every compile in the tests (CLI subprocesses included) checks each pass's invariant as it runs
os.environ.setdefault("LPVIT_VERIFY", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: two torch threads each would oversubscribe
    torch.set_num_threads(1)


def tiny_vit(**overrides) -> torch.nn.Module:
    """A 2-block ViT on 32x32 images: every linear dim a multiple of 16, compiles in about a second."""
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4, num_classes=10)
    return VisionTransformer(**{**kwargs, **overrides}).eval()


def tiny_swin() -> torch.nn.Module:
    """A 2-stage Swin on 32x32 images (windows of 4 patches, relative position tables)."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(1, 1), num_heads=(2, 2),
                           num_classes=10).eval()


def masked_reference(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The dense model with every mask applied to its weight: what a compiled model must reproduce."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_submodule(name).weight.mul_(mask)
    return reference


def require_or_skip(reason: str, install: str) -> None:
    """Skip a test whose system dependency is missing — or fail it where CI requires every dependency
    (``LPVIT_REQUIRE_SYSTEM_DEPS=1``), so a missing package can never hide a test there."""
    if os.environ.get("LPVIT_REQUIRE_SYSTEM_DEPS") == "1":
        pytest.fail(f"{reason} (LPVIT_REQUIRE_SYSTEM_DEPS=1): {install}")
    pytest.skip(f"{reason}: {install}")


@pytest.fixture(scope="session")
def model():
    return tiny_vit()


@pytest.fixture(scope="session")
def calib():
    torch.manual_seed(1)
    return torch.randn(16, 3, 32, 32)


@pytest.fixture(scope="session")
def compiled(model, calib):
    return lpvit.compile(model, hw="cpu-avx2", flops_keep=0.5, calib=calib, block_shape=16, importance="taylor",
                         reconstruct=False, progress=False)
