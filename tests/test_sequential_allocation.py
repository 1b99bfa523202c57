"""allocation="sequential": each layer's OBS curve measured again, just before its refit, on the inputs it sees in
the model pruned so far, and the budget left re-solved."""

import json

import pytest
import torch
from torch import nn

import lpvit_compiler as lpvit
from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.errors import ConfigError
from lpvit_compiler.linalg import damped
from lpvit_compiler.passes.importance import refit_obs_curve
from lpvit_compiler.state import LayerState


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_curve_is_the_exact_error_increase_of_the_asymmetric_refit(with_bias):
    # d(k) - d(0) must be what pruning the first k blocks adds to the damped least-squares error of fitting the dense
    # outputs from the pruned inputs (the bias refitted too), per token and weighted by the loss weights
    torch.manual_seed(0)
    out_features, in_features, tokens = 24, 20, 300
    layer = LayerState("layer", BlockGrid(out_features, in_features, (8, 6)))
    layer.loss_weights = torch.full((out_features,), 0.7)
    xp = torch.randn(tokens, in_features, dtype=torch.float64) @ torch.randn(in_features, in_features,
                                                                              dtype=torch.float64)
    xd = xp + 0.3 * torch.randn_like(xp)  # the dense model's inputs differ from the pruned model's
    weight, bias = torch.randn(out_features, in_features, dtype=torch.float64), torch.randn(out_features,
                                                                                            dtype=torch.float64)
    a = torch.cat([xp, torch.ones(tokens, 1, dtype=torch.float64)], 1) if with_bias else xp
    y = xd @ weight.T + (bias if with_bias else 0)
    h, target = a.T @ a, (a.T @ y).T
    _, order, distortion = refit_obs_curve(layer, h, target, tokens, damping=0.01)
    hd, _ = damped(h, in_features, 0.01)

    def least_error(keep):  # sum over rows of min_u u^T Hd u - 2 u . t over u zero outside keep (bias always kept)
        total = 0.0
        for row_keep, t in zip(keep, target):
            s = torch.cat([row_keep, torch.ones(int(with_bias), dtype=torch.bool)])
            u = torch.linalg.solve(hd[s][:, s], t[s])
            total -= float(u @ t[s])
        return total

    full = least_error(torch.ones(out_features, in_features, dtype=torch.bool))
    for k in range(layer.num_blocks + 1):
        flat = torch.ones(layer.num_blocks, dtype=torch.bool)
        flat[order[:k]] = False
        keep = layer.grid.expand(flat.reshape(layer.grid.block_rows, layer.grid.block_cols))
        expected = 0.7 * (least_error(keep) - full) / tokens
        assert distortion[k].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


class _DeadInputs(nn.Module):
    """fc1's last 16 output rows are 1000x smaller than its first 16, and fc2 reads those inputs 1000x amplified.
    On the dense model fc2's last 16 columns matter as much as its first; once fc1 has lost its tiny rows (the
    cheapest blocks there are) they carry only fc1's bias, a constant fc2's bias absorbs: free to remove."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.fc1.weight[16:] *= 1e-3
            self.fc2.weight[:, 16:] *= 1e3

    def forward(self, x):  # x [B, 1, 4, 32]: 4 tokens of width 32
        return self.head(self.fc2(torch.nn.functional.gelu(self.fc1(x.flatten(1, 2))))).mean(1)


def test_sequential_allocation_spends_nothing_on_inputs_the_pruned_model_no_longer_has():
    model, calib = _DeadInputs().eval(), torch.randn(64, 1, 4, 32, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = {allocation: lpvit.compile(model, flops_keep=0.5, calib=calib, block_shape=8, allocation=allocation,
                                          block_recovery=False, model_recovery_tflops=0, progress=False)
                for allocation in ("dense", "sequential")}
    for result in compiled.values():
        assert result.masks["fc1"][16:].sum() == 0  # fc1's tiny rows go in both
        assert result.report.summary["flops_keep_achieved"] == pytest.approx(0.5, abs=0.01)
    dead_columns = {allocation: int(c.masks["fc2"][:, 16:].sum()) for allocation, c in compiled.items()}
    assert dead_columns["sequential"] == 0 and dead_columns["dense"] > 0  # the dense curves still pay for them
    with torch.no_grad():
        dense_out = model(calib)
        errors = {allocation: float((c(calib) - dense_out).square().mean()) for allocation, c in compiled.items()}
    assert errors["sequential"] < errors["dense"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched


def test_sequential_allocation_needs_the_obs_criterion_and_reconstruction(tmp_path):
    model, calib = _DeadInputs().eval(), torch.randn(8, 1, 4, 32)
    with pytest.raises(ConfigError, match="allocation='sequential'.*importance='obs'"):
        lpvit.compile(model, calib=calib, allocation="sequential", importance="hessian", block_shape=8,
                      progress=False)
    # the default ("auto") falls back to the dense model's curves where sequential does not apply
    lpvit.compile(model, calib=calib, importance="hessian", block_shape=8, progress=False, dump_dir=tmp_path)
    assert json.loads((tmp_path / "08-reconstruct" / "decisions.json").read_text())["allocation"] == "dense"
