"""The pass infrastructure: contracts checked when the pipeline is built, invariants checked as it runs, costs
recomputed after a pass changes shapes, instruments around passes, and the report's caption lines."""

import pytest
import torch
from torch import nn

import lpvit_compiler as lpvit
from lpvit_compiler import instruments
from lpvit_compiler.instruments import InvariantChecker, PassTimer
from lpvit_compiler.options import CompileOptions
from lpvit_compiler.pass_manager import PassManager, PassResult, PipelineError, compiler_pass
from lpvit_compiler.passes import (PIPELINE, block_mask_solve, bsr_layout, capture, dead_block_elimination,
                                   hardware, importance, reconstruct)
from lpvit_compiler.report import LayerMeasurement
from lpvit_compiler.state import CompileState

from conftest import masked_reference, tiny_vit


def test_a_pass_out_of_order_is_refused_when_the_pipeline_is_built():
    with pytest.raises(PipelineError, match=r"pass 'block_mask_solve' runs too early: it requires \['curves', "
                                            r"'model_costs'\] \('curves' comes from pass 'hardware', which must "
                                            r"run before it; 'model_costs' comes from pass 'hardware'"):
        PassManager([capture, importance, block_mask_solve, hardware, reconstruct, dead_block_elimination,
                     bsr_layout])
    with pytest.raises(PipelineError, match=r"pass 'importance' runs too early: .*no pass in the pipeline "
                                            r"provides 'graph'"):
        PassManager([importance])


def test_an_undeclared_function_is_not_a_pass():
    def loose(gm, state):
        return PassResult(gm, False, {})

    with pytest.raises(PipelineError, match=r"'loose' is not a declared pass"):
        PassManager([capture, loose])


def _state(model, calib, **options) -> CompileState:
    opts = CompileOptions.build("cpu-avx2", block_shape=16, importance="magnitude", **options)
    return CompileState(options=opts, calibration=list(torch.split(calib, 8)), model=model, progress=False)


def test_a_pass_that_breaks_its_invariant_is_caught(model, calib):
    @compiler_pass(requires=("layout",), provides=("broken",), invariant="masked_outputs")
    def perturb(gm, state):
        with torch.no_grad():
            gm.get_submodule("head").bias.add_(1.0)  # not what the masked model computes
        return PassResult(gm, True, {})

    manager = PassManager([*PIPELINE, perturb], [InvariantChecker(calib[:2])])
    with pytest.raises(PipelineError, match=r"pass perturb broke its invariant: the graph no longer computes the "
                                            r"masked model \(max deviation"):
        manager.run(_state(model, calib, reconstruct=False))


def test_int8_invariants_compare_float_passes_as_they_will_run(model, calib, monkeypatch):
    """Before the layout rewrite an int8 compile's layers are still float layers: the checker compares a pass's
    graph and its reference both with inputs quantized as the int8 kernel will, so a pass that changes nothing
    measures no deviation (against the raw float graph, int8's own rounding showed: ~3% of the output scale)."""
    @compiler_pass(requires=("masks", "masked_weights"), provides=("unchanged",), invariant="masked_outputs")
    def unchanged(gm, state):
        return PassResult(gm, False, {})

    monkeypatch.setattr(instruments, "VERIFY_RTOL_INT8", 1e-5)
    after = [p.contract.name for p in PIPELINE].index("reconstruct") + 1
    manager = PassManager([*PIPELINE[:after], unchanged], [InvariantChecker(calib[:2])])
    manager.run(_state(model, calib, reconstruct=False, quantize="int8"))


def test_reconstruct_leaves_zeros_outside_the_masks_and_the_pipeline_verifies(model, calib):
    timer = PassTimer()
    state = _state(model, calib, reconstruct=True)
    gm = PassManager(PIPELINE, [timer, InvariantChecker(calib[:2])]).run(state)
    assert [t["pass"] for t in timer.timings] == ["capture", "fold_scales", "token_pruning", "head_pruning",
                                                   "importance", "hardware", "token_schedule", "block_mask_solve",
                                                   "reconstruct", "dead_block_elimination", "bsr_layout",
                                                   "fuse_epilogues"]
    assert all(t["seconds"] >= 0 for t in timer.timings)
    assert isinstance(gm, torch.fx.GraphModule)


def test_costs_follow_the_shapes_dead_block_elimination_leaves(model, calib):
    state = _state(model, calib, reconstruct=False, flops_keep=0.3)
    PassManager(PIPELINE).run(state)
    shrunk = [layer for layer in state.layers.values() if layer.shape != (layer.out_features, layer.in_features)]
    assert shrunk, "this budget should leave dead MLP units"
    for layer in state.layers.values():
        assert layer.costs.shape == layer.shape
        assert layer.costs.kept_blocks == int(layer.live_block_mask().sum())
        # the layout follows the current costs, not the solve-time curves of the original shape
        assert (layer.layout == "bsr") == layer.costs.sparse_faster


class WithTinyLinear(nn.Module):
    """A ViT whose output goes through a 10 -> 4 linear: smaller than one 16x16 block."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_vit()
        self.tiny = nn.Linear(10, 4)

    def forward(self, x):
        return self.tiny(self.vit(x))


def test_a_layer_smaller_than_a_block_stays_dense_with_a_report_note(calib):
    model = WithTinyLinear().eval()
    compiled = lpvit.compile(model, hw="cpu-avx2", calib=calib, block_shape=16, importance="magnitude",
                             reconstruct=False, layers=["vit.blocks.0.mlp.fc1", "tiny"], progress=False)
    assert list(compiled.masks) == ["vit.blocks.0.mlp.fc1"]
    assert type(compiled.graph_module.get_submodule("tiny")) is nn.Linear
    note = "tiny: smaller than one 16x16 block (4x10); left dense"
    assert compiled.report.notes == [note]
    assert note in str(compiled.report)
    with torch.no_grad():
        torch.testing.assert_close(compiled(calib), masked_reference(model, compiled.masks)(calib),
                                   rtol=1e-4, atol=1e-5)


def test_report_caption_shows_every_summary_line_and_measurements(compiled):
    text = " ".join(str(compiled.report).split())  # the console wraps the caption
    for line in ("hardware: cpu-avx2", "budget (FLOPs kept): target 0.500, achieved 0.500",
                 "prunable-linear FLOPs kept: 0.500 (executed", "model FLOPs kept:",
                 "predicted on cpu-avx2 (batch 8):"):
        assert line in text, line
    first = compiled.report.layers[0]
    measured = compiled.report.with_measurements(
        end_to_end={"batches": {"8": {"dense_ms": 3.0, "compiled_ms": 2.0, "speedup": 1.5}}, "threads": 2},
        layers={first.name: LayerMeasurement(first.latency_predicted_us * 2, 10.0)},
        accuracy={"data": "fashion-mnist", "images": 50, "dense": 0.9, "compiled": 0.88})
    text = " ".join(str(measured).split())
    for line in ("per-layer latency, predicted vs measured: median error 50%",
                 "measured end to end, batch 8 (2 threads): dense 3.0 ms, compiled 2.0 ms: 1.50x",
                 "top-1 on fashion-mnist (50 images): dense 0.9000, compiled 0.8800 (-0.0200)",
                 f"10.0→{first.latency_predicted_us * 2:.1f}"):  # the measured column
        assert line in text, line
    assert "measured end to end" not in str(compiled.report)  # the compile's report is unchanged
