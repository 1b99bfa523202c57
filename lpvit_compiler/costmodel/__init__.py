"""The cost model: hardware profiles (``profiles.py``: the roofline latency/energy of a block-sparse GEMM) and
``hw="native"`` (``native.py``: the CPU profile fitted to measurements here). Change the cost model in
:meth:`profiles.HardwareProfile.linear_cost`; add a target to ``profiles.PROFILES``."""

from __future__ import annotations

from ..errors import ConfigError
from .profiles import PROFILES, HardwareProfile, LayerCosts, layer_costs, lpvit_power_proxy, this_cpu

__all__ = ["PROFILES", "HardwareProfile", "LayerCosts", "get_profile", "known_profiles", "layer_costs",
           "lpvit_power_proxy", "this_cpu"]


def known_profiles() -> list[str]:
    return sorted([*PROFILES, "cpu", "native"])


def get_profile(hw: str | HardwareProfile, block_shape: tuple[int, int] | None = None) -> HardwareProfile:
    """A profile by name (``"cpu"`` is this machine's cores and ISA) or the profile object itself;
    ``"native"`` is fitted at ``block_shape`` (default 16×16)."""
    if isinstance(hw, HardwareProfile):
        return hw
    if not isinstance(hw, str):
        raise ConfigError(f"hw must be a profile name or a HardwareProfile, got {type(hw).__name__}")
    if hw == "cpu":
        return this_cpu()
    if hw == "native":  # imported only when asked for: it needs onnxruntime and the exporter
        from .native import native_profile

        return native_profile(block_shape=tuple(block_shape or (16, 16)))
    if hw not in PROFILES:
        raise ConfigError(f"unknown hardware profile {hw!r}; known profiles: {', '.join(known_profiles())} "
                          "(or pass a lpvit_compiler.HardwareProfile)")
    return PROFILES[hw]
