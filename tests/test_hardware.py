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


@pytest.mark.parametrize("field, value", [("elementwise_bandwidth", 0.0), ("peak_flops", -1.0),
                                          ("memory_bandwidth", float("nan")), ("batch_size", 0)])
def test_a_profile_with_a_rate_that_is_not_positive_is_a_clear_error(field, value):
    import dataclasses

    with pytest.raises(lpvit.ConfigError, match=f"HardwareProfile 'cpu': {field} must be positive"):
        dataclasses.replace(lpvit.get_profile("cpu"), **{field: value})


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


def test_memory_bound_bytes_count_each_op_once_and_views_not_at_all():
    import torch
    from torch import nn
    from lpvit_compiler.costmodel.flops import model_work_per_image

    norm = nn.LayerNorm(24)
    x = torch.randn(1, 10, 24)
    work = model_work_per_image(norm, x)  # x and its output, weight and bias, mean and rstd [1, 10, 1]
    assert work.memory_bytes == 4 * (2 * 10 * 24 + 2 * 24 + 2 * 10) and work.flops == 0
    views = model_work_per_image(lambda t: t.reshape(1, 240).t().unsqueeze(0).permute(0, 2, 1), x)
    assert views.memory_bytes == 0
    linear = model_work_per_image(nn.Linear(24, 8), x)  # a product: FLOPs, not memory-bound bytes
    assert linear.memory_bytes == 0 and linear.flops == 2 * 10 * 24 * 8


def test_fused_attention_counts_what_its_explicit_form_moves():
    """The token pass exposes SDPA's probabilities as softmax(q k^T * scale) @ v: the cost model must not see
    that rewrite alone as a change of memory traffic."""
    import torch
    from torch.nn import functional as F
    from lpvit_compiler.costmodel.flops import model_work_per_image

    q, k, v = (torch.randn(1, 3, 17, 8) for _ in range(3))

    def fused(q):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 17, 24)

    def explicit(q):
        return ((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1).matmul(v).transpose(1, 2).reshape(1, 17, 24)

    torch.testing.assert_close(fused(q), explicit(q))
    moved = model_work_per_image(fused, q).memory_bytes
    assert moved == model_work_per_image(explicit, q).memory_bytes
    assert moved == 4 * (2 * 3 * 17 * 8 + 2 * 3 * 17 * 17 + 2 * 3 * 17 * 8)


def test_memory_bound_ops_cost_at_the_elementwise_bandwidth_and_shrink_with_the_tokens(calib):
    from conftest import tiny_vit

    hw = lpvit.get_profile("cpu")
    latency, energy = hw.other_cost(1e9, 2e8)
    assert latency == pytest.approx(hw.batch_size * (1e9 / hw.peak_flops + 2e8 / hw.elementwise_bandwidth))
    assert energy == pytest.approx(hw.static_power_w * latency + hw.batch_size * (
        1e9 * hw.energy_per_flop_j + 2e8 * hw.energy_per_byte_j))
    # a profile saved before the field existed gives those ops no time, as the cost model did then
    old = {k: v for k, v in hw.to_dict().items() if k != "elementwise_bandwidth"}
    assert lpvit.HardwareProfile.from_dict(old).other_cost(0.0, 2e8)[0] == 0.0

    options = dict(calib=calib, flops_keep=1.0, importance="magnitude", reconstruct=False, progress=False)
    dense = lpvit.compile(tiny_vit(patch_size=4), **options)
    merged = lpvit.compile(tiny_vit(patch_size=4), token_pruning="merge", patch_keep=0.5, **options)
    assert merged.report.summary["predicted_speedup"] > 1.0  # fewer tokens: less of every memory-bound op
    assert dense.report.summary["predicted_speedup"] == pytest.approx(1.0)
