import numpy as np
import pytest
import torch

from lpvit_compiler import linalg
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.state import LayerState
from lpvit_compiler.passes.importance import _hessian, _magnitude, _taylor, block_diagonal_moments


def _layer(out_features=40, in_features=48, block=(16, 16)):
    return LayerState("layer", BlockGrid(out_features, in_features, block))


def _pruned_delta(layer, weight, order, k):
    flat = torch.ones(layer.num_blocks, dtype=torch.bool)
    flat[order[:k]] = False
    mask = layer.grid.expand(flat.reshape(layer.grid.block_rows, layer.grid.block_cols))
    return -weight.double() * ~mask


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_taylor_curve_matches_direct_formula(k):
    torch.manual_seed(0)
    layer, weight, grad = _layer(), torch.randn(40, 48), torch.randn(40, 48)
    damping = 0.3
    saliency, order, distortion = _taylor(layer, weight, grad, damping)
    delta = _pruned_delta(layer, weight, order, k)
    g = grad.double()
    direct = (delta * g).square().sum() + 0.5 * (delta * g).sum() ** 2 + 0.5 * damping * delta.square().sum()
    assert distortion[k].item() == pytest.approx(direct.item(), rel=1e-9)
    torch.testing.assert_close(saliency[1, 2], (weight * grad)[16:32, 32:48].abs().double().mean())
    assert torch.all(saliency.flatten()[order].diff() >= 0)  # least important first


def test_hessian_score_is_expected_output_error_of_zeroing_the_block():
    torch.manual_seed(0)
    layer, weight = _layer(), torch.randn(40, 48)
    x = torch.randn(500, 48) * torch.linspace(0.1, 3, 48)  # uneven input channels
    moment = (x.T @ x).double() / x.shape[0]
    blocks = torch.zeros(3, 16, 16, dtype=torch.float64)
    for c in range(3):
        blocks[c] = moment[16 * c:16 * (c + 1), 16 * c:16 * (c + 1)]
    energy = (x.double() @ weight.double().T).square().sum(1).mean()
    scores, order, distortion = _hessian(layer, weight, blocks, float(energy))
    for block in range(layer.num_blocks):
        delta = _pruned_delta(layer, weight, torch.tensor([block]), 1)
        error = (x.double() @ delta.T).square().sum(1).mean()
        assert scores.flatten()[block].item() == pytest.approx(error.item(), rel=1e-6)
    total = (x.double() @ weight.double().T).square().sum(1).mean()
    assert distortion[-1] == pytest.approx(scores.sum().item() / total.item(), rel=1e-6)
    assert np.all(np.diff(distortion.numpy()) >= 0)


def test_block_diagonal_moments_are_the_diagonal_blocks_of_xtx():
    x = torch.randn(300, 20, dtype=torch.float64)
    full = x.T @ x
    blocks = block_diagonal_moments(x, 8)  # 8, 8 and a last block of 4 columns, zero-padded
    assert blocks.shape == (3, 8, 8)
    for c, cols in enumerate([slice(0, 8), slice(8, 16), slice(16, 20)]):
        width = cols.stop - cols.start
        torch.testing.assert_close(blocks[c, :width, :width], full[cols, cols], rtol=1e-5, atol=1e-4)
    assert torch.all(blocks[2, 4:] == 0) and torch.all(blocks[2, :, 4:] == 0)


@pytest.mark.parametrize("columns", [5, 8, 16, 21])  # one tile, two exactly, two with a partial last, three
def test_gram_is_xtx(monkeypatch, columns):
    monkeypatch.setattr(linalg, "GRAM_TILE", 8)
    x = torch.randn(50, columns)
    got = linalg.gram(x)
    np.testing.assert_allclose(got.numpy(), x.double().numpy().T @ x.double().numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size", [16, 17, 24])  # widened, as it is, widened
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_cholesky_of_aliased_widths_is_lapacks(monkeypatch, size, batch):
    monkeypatch.setattr(linalg, "ALIASED_COLUMNS", 8)
    torch.manual_seed(size)
    x = torch.randn(*batch, size, 2 * size, dtype=torch.float64)
    system = x @ x.mT / size + 1e-3 * torch.eye(size, dtype=torch.float64)
    factor, info = linalg.cholesky_ex(system)
    assert factor.shape == system.shape and info.shape == batch and not info.any()
    torch.testing.assert_close(factor, torch.linalg.cholesky(system), rtol=1e-12, atol=1e-12)
    assert torch.equal(factor, factor.tril())


@pytest.mark.parametrize("bad", [3, 15])
def test_cholesky_of_aliased_widths_reports_the_first_minor_that_is_not_positive_definite(monkeypatch, bad):
    monkeypatch.setattr(linalg, "ALIASED_COLUMNS", 8)
    torch.manual_seed(0)
    x = torch.randn(16, 32, dtype=torch.float64)
    system = torch.stack([x @ x.T, x @ x.T])
    system[1, bad, bad] = -1.0  # a negative diagonal entry: the minor of order bad + 1 is not positive definite
    _, info = linalg.cholesky_ex(system)
    assert info.tolist() == [0, bad + 1]


def test_magnitude_distortion_is_relative_energy_removed():
    torch.manual_seed(0)
    layer, weight = _layer(block=(16, 32)), torch.randn(40, 48)
    saliency, order, distortion = _magnitude(layer, weight)
    assert distortion[0] == 0 and distortion[-1].item() == pytest.approx(1.0)
    delta = _pruned_delta(layer, weight, order, 3)
    assert distortion[3].item() == pytest.approx((delta.square().sum() / weight.double().square().sum()).item())


def test_importance_pass_records_tokens_and_curves(compiled):
    layers = compiled.report.layers
    assert all(row.tokens == 17 for row in layers)  # 16 patches + class token
    assert all(row.distortion >= 0 for row in layers)


@pytest.mark.parametrize("shape, block", [((40, 48), (16, 16)), ((24, 20), (8, 6)), ((8, 78), (4, 4))])
def test_obs_curve_is_the_exact_error_after_refitting(shape, block):
    # d(k) must equal, for the first k blocks of the order, the least-squares output error left when each row
    # keeps only its surviving columns and refits them: sum_rows w_P (H/H_SS) w_P^T (H damped as in _obs)
    from lpvit_compiler.passes.importance import _obs

    torch.manual_seed(0)
    layer, weight = _layer(*shape, block), torch.randn(*shape)
    x = torch.randn(500, shape[1], dtype=torch.float64) @ torch.randn(shape[1], shape[1], dtype=torch.float64)
    moment = x.T @ x / 500
    damping = 0.01
    _, order, distortion = _obs(layer, weight, moment, gradient_energy=torch.ones(shape[0]), damping=damping)
    damped = moment + damping * moment.diagonal().mean() * torch.eye(shape[1], dtype=torch.float64)
    for k in range(layer.num_blocks + 1):  # every prefix, with 20 block columns a row (a padded last one)
        flat = torch.ones(layer.num_blocks, dtype=torch.bool)
        flat[order[:k]] = False
        mask = layer.grid.expand(flat.reshape(layer.grid.block_rows, layer.grid.block_cols))
        direct = 0.0
        for row, keep in zip(weight.double(), mask):
            pruned = ~keep
            if not pruned.any():
                continue
            schur = damped[pruned][:, pruned]
            if keep.any():
                refit = torch.linalg.solve(damped[keep][:, keep], damped[keep][:, pruned])
                schur = schur - damped[pruned][:, keep] @ refit
            direct += float(row[pruned] @ schur @ row[pruned])
        assert distortion[k].item() == pytest.approx(direct, rel=1e-6)


def test_obs_with_overwhelming_damping_orders_blocks_by_energy():
    # H + lambda I with lambda >> H is lambda I up to a vanishing part: no column can stand in for another, so
    # removing block b costs lambda ||W_b||^2 and the order is the blocks' energy order
    from lpvit_compiler.passes.importance import _obs

    torch.manual_seed(1)
    layer, weight = _layer(), torch.randn(40, 48) * torch.rand(48)
    x = torch.randn(300, 48, dtype=torch.float64) @ torch.randn(48, 48, dtype=torch.float64)
    moment = x.T @ x / 300
    scores, order, _ = _obs(layer, weight, moment, gradient_energy=torch.ones(40), damping=1e9)
    energy = layer.grid.block_sum(weight.double().square())
    lam = 1e9 * float(moment.diagonal().mean())
    assert torch.allclose(scores, lam * energy, rtol=1e-6)
    assert torch.equal(order, torch.argsort(energy.flatten(), stable=True))
    # and a small damping does not: the correlated columns make refitting matter
    _, small_order, _ = _obs(layer, weight, moment, gradient_energy=torch.ones(40), damping=0.01)
    assert not torch.equal(small_order, order)


def test_obs_ridge_is_the_floor_where_tokens_are_ample_and_grows_with_width_per_token():
    from lpvit_compiler.options import CompileOptions
    from lpvit_compiler.passes.importance import obs_ridge

    options = CompileOptions.build(hessian_damping=0.01, obs_damping=1.0)
    assert obs_ridge(options, 384, 197 * 256) == 0.01  # K / T = 0.008: below the floor
    assert obs_ridge(options, 1536, 4122) == pytest.approx(1536 / 4122)  # MiniLM's fc2 on 256 sentences
    assert obs_ridge(CompileOptions.build(obs_damping=3.0), 384, 4122) == pytest.approx(3 * 384 / 4122)
    assert obs_ridge(CompileOptions.build(obs_damping=0.0), 1536, 10) == 0.01  # 0: the floor alone


class _AmplifiedHalf(torch.nn.Module):
    """fc's first 16 output channels reach the logits amplified 10x, the last 16 damped 10x (a fixed buffer,
    not a foldable parameter): blocks in the damped half are the ones to prune."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 4)
        self.register_buffer("gain", torch.cat([torch.full((16,), 10.0), torch.full((16,), 0.1)]))

    def forward(self, x):  # x [B, 1, 4, 32]: 4 tokens of width 32
        return self.head(self.fc(x.flatten(1, 2)) * self.gain).mean(1)


@pytest.mark.parametrize("sensitivity", ["channel", "layer"])
def test_channel_sensitivity_prunes_the_channels_the_network_damps(sensitivity):
    import lpvit_compiler as lpvit

    torch.manual_seed(1)
    compiled = lpvit.compile(_AmplifiedHalf().eval(), flops_keep=0.5, calib=torch.randn(64, 1, 4, 32),
                             block_shape=8, sensitivity=sensitivity, reconstruct=False, progress=False)
    mask = compiled.masks["fc"][::8, ::8]  # one entry per 8x8 block: [4, 4], True = kept
    assert int(mask.sum()) == 8
    if sensitivity == "channel":  # exactly the damped half goes
        assert bool(mask[:2].all()) and not bool(mask[2:].any())
    else:  # one sensitivity for the whole layer cannot tell the halves apart
        assert bool(mask[2:].any())
