import itertools
import math

import numpy as np
import pytest

import lpvit_compiler as lpvit
from lpvit_compiler.passes.block_mask_solve import equal_slope_solve, lpvit_beta


def _convex_curves(rng, layers, points):
    costs = [np.concatenate([[0.0], np.cumsum(np.sort(rng.uniform(0, s, points - 1)))])
             for s in rng.uniform(0.1, 5, layers)]
    return costs


def _brute_force(costs, resources, max_pruned, target):
    best = math.inf
    for ks in itertools.product(*[range(m + 1) for m in max_pruned]):
        if sum(r[k] for r, k in zip(resources, ks)) <= target + 1e-12:
            best = min(best, sum(c[k] for c, k in zip(costs, ks)))
    return best


def test_equal_slope_matches_brute_force_with_uniform_block_cost():
    rng = np.random.default_rng(0)
    costs = _convex_curves(rng, 3, 9)
    resources = [np.arange(8, -1, -1, dtype=float) for _ in range(3)]  # each block costs one unit
    max_pruned = [8, 6, 7]
    for target in range(3, 25):
        ks, _ = equal_slope_solve(costs, resources, max_pruned, target)
        assert sum(r[k] for r, k in zip(resources, ks)) <= target
        assert sum(c[k] for c, k in zip(costs, ks)) == pytest.approx(_brute_force(costs, resources, max_pruned, target))


def test_equal_slope_is_optimal_at_its_own_slopes_with_uneven_block_costs():
    rng = np.random.default_rng(1)
    costs = _convex_curves(rng, 3, 9)
    per_block = [1.0, 2.5, 0.7]
    resources = [w * np.arange(8, -1, -1, dtype=float) for w in per_block]
    max_pruned = [8, 8, 8]
    from lpvit_compiler.passes.block_mask_solve import _allocate

    for slope in np.geomspace(0.01, 100, 25):
        ks = _allocate(costs, resources, max_pruned, slope)
        target = sum(r[k] for r, k in zip(resources, ks))
        ours, _ = equal_slope_solve(costs, resources, max_pruned, target)
        assert sum(r[k] for r, k in zip(resources, ours)) <= target + 1e-9
        assert sum(c[k] for c, k in zip(costs, ours)) == pytest.approx(
            _brute_force(costs, resources, max_pruned, target), abs=1e-9)


def test_lpvit_beta_is_ratio_of_mean_max_slopes():
    n = 100
    distortion = [np.linspace(0, 1, n + 1) ** 2, 3 * np.linspace(0, 1, n + 1) ** 2]  # max slopes ~2 and ~6
    power = [np.linspace(10, 0, n + 1), np.linspace(20, 0, n + 1)]  # slopes 10 and 20 in ratio space
    assert lpvit_beta(distortion, power) == pytest.approx(((2 + 6) / 2 - 0.02) / 15, rel=0.02)


@pytest.mark.parametrize("flops_keep", [0.3, 0.5, 0.8])
def test_flops_budget_is_met_within_one_percent_and_min_density_holds(model, calib, flops_keep):
    compiled = lpvit.compile(model, flops_keep=flops_keep, calib=calib, block_shape=16, min_density=0.1,
                             progress=False)
    assert compiled.report.flops_keep_achieved == pytest.approx(flops_keep, rel=0.01)
    assert compiled.report.flops_keep_achieved <= flops_keep
    assert all(row.keep_ratio >= 0.1 for row in compiled.report.layers)


def test_speedup_and_power_budgets(model, calib):
    # dense_fallback off: with it the latency/power curves jump where a layer turns dense, in steps too coarse
    # for this tiny model to land within 1%
    faster = lpvit.compile(model, hw="a100", target_speedup=1.1, calib=calib, block_shape=16, dense_fallback=False,
                           progress=False)
    assert faster.report.summary["predicted_speedup"] == pytest.approx(1.1, rel=0.01)
    frugal = lpvit.compile(model, hw="a100", power_keep=0.6, calib=calib, block_shape=16, power_weight="auto",
                           dense_fallback=False, progress=False)
    assert frugal.report.summary["budget_achieved"] == pytest.approx(0.6, rel=0.01)
    assert frugal.report.summary["beta"] > 0


def test_unreachable_budget_says_what_limits_it(model, calib):
    with pytest.raises(lpvit.ConfigError, match=r"flops_keep=0.02 cannot be met.*min_density=0.05"):
        lpvit.compile(model, flops_keep=0.02, calib=calib, block_shape=16, progress=False)
