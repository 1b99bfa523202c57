"""The reconstruction pass: its least-squares math on small synthetic layers, and the pass in a compile."""

import pytest
import torch
from torch.nn import functional as F

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.passes.reconstruct import (_normal_equations, _relative, _relative_output_error, _targets,
                                               reconstruct_weight)


def _layer(n=32, k=48, block=(8, 8), density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = BlockGrid(n, k, block)
    block_mask = torch.rand(grid.block_rows, grid.block_cols, generator=g) < density
    block_mask[:, 0] = True  # every block row keeps something
    return torch.randn(n, k, generator=g), torch.randn(n, generator=g), grid, grid.expand(block_mask), g


def _refit(weight, bias, grid, mask, xp, xd, damping):
    h, g, s = _normal_equations([xp], [xd], bias is not None)
    return reconstruct_weight(weight, bias, mask, grid.block_shape[0], h, _targets(weight, bias, g, s),
                              damping)[:2]


def test_exact_recovery_when_the_pruned_inputs_are_redundant():
    # every input column is a linear combination of the first 8, which every row keeps: the dense output is
    # reachable with the kept weights alone, so the refit must reproduce it exactly
    weight, bias, grid, mask, g = _layer()
    basis = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    x = (basis @ torch.randn(8, 48, generator=g, dtype=torch.float64)).float()
    x[:, :8] = basis.float()
    new_weight, new_bias = _refit(weight, bias, grid, mask, x, x, damping=1e-7)
    expected = F.linear(x, weight, bias)
    assert torch.equal(new_weight * ~mask, torch.zeros_like(new_weight))  # the mask is respected
    err_masked = (F.linear(x, weight * mask, bias) - expected).norm() / expected.norm()
    err = (F.linear(x, new_weight, new_bias) - expected).norm() / expected.norm()
    assert err_masked > 0.1 and err < 1e-4


def test_mean_shift_is_absorbed_by_the_bias():
    # the pruned model's inputs are the dense ones shifted by a constant: a bias change corrects it exactly
    weight, bias, grid, _, g = _layer()
    full = torch.ones_like(weight, dtype=torch.bool)
    xd = torch.randn(500, 48, generator=g)
    xp = xd + torch.randn(48, generator=g)
    new_weight, new_bias = _refit(weight, bias, grid, full, xp, xd, damping=1e-9)
    torch.testing.assert_close(F.linear(xp, new_weight, new_bias), F.linear(xd, weight, bias), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("damping", [1e-6, 0.01, 10.0, 1e4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_masking_on_calibration_data(damping, seed):
    weight, bias, grid, mask, g = _layer(seed=seed)
    xd = torch.randn(300, 48, generator=g) * torch.rand(48, generator=g) * 3
    xp = xd + 0.3 * torch.randn(300, 48, generator=g)
    for b in (bias, None):
        new_weight, new_bias = _refit(weight, b, grid, mask, xp, xd, damping)
        target = F.linear(xd, weight, b)
        err_masked = (F.linear(xp, weight * mask, b) - target).pow(2).sum(1)
        err = (F.linear(xp, new_weight, new_bias) - target).pow(2).sum(1)
        assert err.sum() <= err_masked.sum() * (1 + 1e-5)
        assert torch.equal(new_weight * ~mask, torch.zeros_like(new_weight))


def test_an_overwhelming_ridge_leaves_the_masked_dense_row():
    # the ridge is centred on the dense row: a ridge toward 0 would shrink the layer's output instead
    weight, bias, grid, mask, g = _layer()
    xd = torch.randn(60, 48, generator=g)  # few tokens for the width: where the ridge matters
    new_weight, _ = _refit(weight, bias, grid, mask, xd + 0.3 * torch.randn(60, 48, generator=g), xd, 1e9)
    torch.testing.assert_close(new_weight, weight * mask, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_recorded_errors_from_the_normal_equations_equal_running_the_layer(with_bias):
    weight, bias, grid, mask, g = _layer()
    bias = bias if with_bias else None
    xd = [torch.randn(400, 48, generator=g) * 2 + 1 for _ in range(3)]
    xp = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xd]
    h, gram, s = _normal_equations(xp, xd, with_bias)
    dense = [F.linear(x, weight, bias) for x in xd]
    energy = sum(float(y.double().square().sum()) for y in dense)
    direct = sum(float((F.linear(x, weight * mask, bias) - y).double().square().sum()) for x, y in zip(xp, dense))
    target = _targets(weight, bias, gram, s)
    recorded = _relative_output_error(weight * mask, bias, h, target, energy)
    assert recorded == pytest.approx(direct / energy, rel=1e-5)
    # the errors the refit returns: of the masked layer, and of the refitted one it returns
    new_weight, new_bias, masked_error, refit_error = reconstruct_weight(weight, bias, mask, grid.block_shape[0], h,
                                                                         target, 0.01)
    refitted = sum(float((F.linear(x, new_weight, new_bias) - y).double().square().sum()) for x, y in zip(xp, dense))
    assert _relative(masked_error, energy) == pytest.approx(direct / energy, rel=1e-5)
    assert _relative(refit_error, energy) == pytest.approx(refitted / energy, rel=1e-4)
    assert refitted < direct


@pytest.mark.parametrize("with_bias", [True, False])
def test_targets_from_the_dense_outputs_equal_those_from_the_dense_inputs(with_bias):
    # reconstruct takes A^T Y straight from the dense outputs where a layer has fewer outputs than inputs
    weight, bias, _, _, g = _layer(n=16, k=48)
    bias = bias if with_bias else None
    xd = [torch.randn(400, 48, generator=g) * 2 + 1 for _ in range(3)]
    xp = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xd]
    h, gram, s = _normal_equations(xp, xd, with_bias)
    h_from_outputs, from_outputs, _ = _normal_equations(xp, [F.linear(x, weight, bias) for x in xd], with_bias)
    assert torch.equal(h, h_from_outputs)
    from_inputs = _targets(weight, bias, gram, s)
    assert float((from_outputs.T - from_inputs).abs().max()) <= 1e-5 * float(from_inputs.abs().max())  # float32 sums


def test_pass_lowers_every_layers_calibration_error(model, calib, tmp_path):
    import json

    # the dense model's curves: the same masks as without reconstruction (sequential allocation re-solves them)
    compiled = lpvit.compile(model, flops_keep=0.4, calib=calib, block_shape=16, dump_dir=tmp_path, progress=False,
                             allocation="dense")
    decisions = json.loads(next(tmp_path.glob("*-reconstruct/decisions.json")).read_text())
    assert decisions["enabled"] and decisions["images"] == len(calib)
    assert set(decisions["layers"]) == {row.name for row in compiled.report.layers}
    for name, d in decisions["layers"].items():
        assert d["relative_error_reconstructed"] <= d["relative_error_masked"] * (1 + 1e-4), name
    # and the whole model moves closer to the dense one on the calibration images
    plain = lpvit.compile(model, flops_keep=0.4, calib=calib, block_shape=16, reconstruct=False, progress=False)
    with torch.no_grad():
        dense = model(calib)
        assert (compiled(calib) - dense).norm() < (plain(calib) - dense).norm()
        for name, mask in compiled.masks.items():  # same masks either way
            assert torch.equal(mask, plain.masks[name])


def test_reconstruct_options_are_checked(model, calib):
    with pytest.raises(lpvit.ConfigError, match="reconstruct_images must be a positive int"):
        lpvit.compile(model, calib=calib, reconstruct_images=0)
    with pytest.raises(lpvit.ConfigError, match=r"hessian_damping must be in \(0, inf\]"):
        lpvit.compile(model, calib=calib, hessian_damping=-1.0)
    with pytest.raises(lpvit.ConfigError, match=r"obs_damping must be in \[0, inf\]"):
        lpvit.compile(model, calib=calib, obs_damping=-0.5)


@pytest.mark.parametrize("n", [32, 29])  # 29: the last block row is short
def test_refit_rows_equal_a_direct_ridge_least_squares_per_row(n):
    # an independent reference: each output row solved alone by lstsq on its kept columns and the bias column,
    # with the ridge term on the weights only, centred on the dense row; block rows keep different numbers of
    # columns
    weight, bias, grid, mask, g = _layer(n=n, density=0.6, seed=3)
    x = torch.randn(400, 48, generator=g, dtype=torch.float64) * torch.rand(48, generator=g, dtype=torch.float64)
    xd = x + 0.2 * torch.randn(400, 48, generator=g, dtype=torch.float64)
    damping = 0.05
    new_weight, new_bias = _refit(weight, bias, grid, mask, x.float(), xd.float(), damping)
    a = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], dim=1)
    lam = damping * float((x * x).sum(0).mean())
    y = xd @ weight.double().T + bias.double()
    for row in range(n):
        kept = torch.cat([mask[row], torch.tensor([True])])
        ridge = torch.zeros(int(kept.sum()), dtype=torch.float64)
        ridge[:-1] = lam ** 0.5
        design = torch.cat([a[:, kept], torch.diag(ridge)])
        prior = ridge * torch.cat([weight[row].double(), torch.zeros(1, dtype=torch.float64)])[kept]
        solution = torch.linalg.lstsq(design, torch.cat([y[:, row], prior]))
        expected = torch.zeros(49, dtype=torch.float64)
        expected[kept] = solution.solution
        got = torch.cat([new_weight[row], new_bias[row:row + 1]]).double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert len({int(mask[r].sum()) for r in range(0, n, grid.block_shape[0])}) > 1  # unequal kept counts


@pytest.mark.parametrize("tokens, given, live_share, expected", [
    (197, None, None, 128),  # DeiT-S at 224 px: 128 images of 197 tokens are the reference sample
    (16, None, None, 1576),  # few tokens per image: as many images as give the same tokens
    (65, None, None, 387),
    (577, None, None, 128),  # many tokens per image: never fewer than 128 images
    (16, 32, None, 32),  # an explicit reconstruct_images wins
    (64, None, 0.25, 1576),  # sentences padded to 64 tokens, 16 of them real: only live tokens count
])
def test_reconstruction_images_give_enough_tokens(tokens, given, live_share, expected):
    from types import SimpleNamespace

    from lpvit_compiler.passes.reconstruct import reconstruction_images

    live = None if live_share is None else torch.arange(tokens)[None, :].expand(8, -1) < live_share * tokens
    state = SimpleNamespace(options=SimpleNamespace(reconstruct_images=given), live_tokens=live,
                            layers={"a": SimpleNamespace(tokens=tokens), "b": SimpleNamespace(tokens=tokens // 2)})
    assert reconstruction_images(state) == expected
