import pytest
import torch
from torch import nn

from lpvit_compiler.blocks import BlockGrid
from lpvit_compiler.frontend.capture import capture
from lpvit_compiler.options import CompileOptions
from lpvit_compiler.passes import bsr_layout, dead_block_elimination
from lpvit_compiler.runtime.modules import BlockSparseLinear
from lpvit_compiler.state import CompileState, LayerState

from conftest import masked_reference


class MLP(nn.Module):
    def __init__(self, act: nn.Module, bias_in: bool, bias_out: bool):
        super().__init__()
        self.fc1 = nn.Linear(32, 64, bias=bias_in)
        self.act = act
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(64, 32, bias=bias_out)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x.flatten(1)))))


def _state(model, fc1_blocks, fc2_blocks):
    options = CompileOptions.build("cpu", block_shape=16, importance="magnitude", dense_fallback=False)
    layers = {"fc1": LayerState("fc1", BlockGrid(64, 32, (16, 16))),
              "fc2": LayerState("fc2", BlockGrid(32, 64, (16, 16)))}
    layers["fc1"].block_mask, layers["fc2"].block_mask = fc1_blocks, fc2_blocks
    for layer in layers.values():
        layer.tokens = 1
    return CompileState(options=options, calibration=[], model=model, layers=layers, progress=False)


@pytest.mark.parametrize("act,bias_in,bias_out", [(nn.GELU(), True, True), (nn.Sigmoid(), False, False),
                                                  (nn.ReLU(), True, False)])
def test_dead_hidden_units_are_removed_and_biases_folded_exactly(act, bias_in, bias_out):
    torch.manual_seed(0)
    model = MLP(act, bias_in, bias_out).eval()
    x = torch.randn(6, 2, 4, 4)
    gm, _ = capture(model, x)
    fc1_blocks = torch.ones(4, 2, dtype=torch.bool)
    fc1_blocks[1] = False  # hidden units 16..31 are the constant act(b1): folded into fc2's bias
    fc1_blocks[2, 0] = False  # partly dead row block: stays
    fc2_blocks = torch.ones(2, 4, dtype=torch.bool)
    fc2_blocks[:, 3] = False  # hidden units 48..63 feed nothing: fc1 rows dropped
    state = _state(model, fc1_blocks, fc2_blocks)
    reference = masked_reference(model, {name: layer.element_mask() for name, layer in state.layers.items()})

    result = dead_block_elimination(gm, state)
    assert result.decisions["hidden_units_removed"] == 32
    assert result.decisions["pairs"][0]["biases_folded"] == 16
    assert gm.fc1.out_features == 32 and gm.fc2.in_features == 32
    assert state.layers["fc1"].kept_rows.tolist() == [*range(16), *range(32, 48)]
    assert gm.fc2.bias is not None  # folded constants need a bias even where fc2 had none
    shrunk = masked_reference(gm, {name: layer.live_mask() for name, layer in state.layers.items()})
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), reference(x), rtol=1e-5, atol=1e-6)

    bsr_layout(gm, state)
    assert isinstance(gm.fc1, BlockSparseLinear) and isinstance(gm.fc2, BlockSparseLinear)
    assert gm.fc1.nnz_blocks == 3  # 4 live block-rows' worth of blocks, minus the dead one
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-6)
    assert state.flops_keep_executed == pytest.approx((3 * 256 + 2 * 2 * 256) / (2 * 32 * 64))


def test_nothing_removed_when_no_unit_is_dead():
    model = MLP(nn.GELU(), True, True).eval()
    x = torch.randn(2, 2, 4, 4)
    gm, _ = capture(model, x)
    state = _state(model, torch.ones(4, 2, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    result = dead_block_elimination(gm, state)
    assert not result.modified and result.decisions["hidden_units_removed"] == 0


def test_attention_layers_are_never_shrunk(compiled):
    for row in compiled.report.layers:
        if ".attn." in row.name:
            assert row.rows_removed == 0 and row.cols_removed == 0
