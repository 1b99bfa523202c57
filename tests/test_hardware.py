import numpy as np
import pytest

import lpvit_compiler as lpvit
from lpvit_compiler.costmodel.profiles import lpvit_power_proxy


def test_known_profiles_and_unknown_name_lists_them():
    for name in ("a100", "h100", "cpu", "cpu-avx2", "cpu-avx512"):
        assert lpvit.get_profile(name).peak_flops > 0
    with pytest.raises(lpvit.ConfigError, match=r"unknown hardware profile 'tpu9'.*a100.*cpu.*h100"):
        lpvit.get_profile("tpu9")


def test_latency_and_energy_grow_with_kept_blocks_and_tokens():
    hw = lpvit.get_profile("a100")
    kept = np.arange(0, 1729)
    latency, energy = hw.linear_cost(197, kept, (16, 16), 384, 1152)
    assert np.all(np.diff(latency) >= 0) and np.all(np.diff(energy) > 0)
    more_tokens, _ = hw.linear_cost(394, kept, (16, 16), 384, 1152)
    assert np.all(more_tokens > latency)


def test_small_blocks_lose_throughput_on_a_gpu_profile():
    hw = lpvit.get_profile("h100")  # 64-wide tiles
    full = 1024 * 1024
    small, _ = hw.linear_cost(4096, full / 256, (16, 16), 1024, 1024)
    large, _ = hw.linear_cost(4096, full / 4096, (64, 64), 1024, 1024)
    assert small > 2 * large


def test_lpvit_power_proxy_formula():
    assert lpvit_power_proxy(np.array([10]), 3072)[0] == 10 * 192
    assert lpvit_power_proxy(np.array([3]), 40)[0] == 3 * 2


def test_profile_round_trips_through_dict():
    hw = lpvit.get_profile("cpu-avx512")
    assert lpvit.HardwareProfile.from_dict(hw.to_dict()) == hw


def test_flops_count_heads_and_partial_blocks_exactly(calib):
    from conftest import tiny_vit

    model = tiny_vit(embed_dim=48, num_heads=2, num_classes=40)  # 40, 48, 192 don't divide by 32: edge blocks
    with pytest.warns(UserWarning, match="too coarse"):  # 32x32 blocks of such small layers: 3% FLOPs steps
        compiled = lpvit.compile(model, calib=calib, block_shape=32, prune_heads=True, progress=False)
    rows = {r.name: r for r in compiled.report.layers}
    assert rows["head"].tokens == 1 and rows["head"].flops_dense == 2 * 40 * 48
    assert rows["blocks.0.mlp.fc1"].flops_dense == 2 * 17 * 192 * 48
    kept = compiled.masks["blocks.0.mlp.fc1"].sum().item()
    assert rows["blocks.0.mlp.fc1"].flops_kept == 2 * 17 * kept
