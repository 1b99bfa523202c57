"""lpvit.finetune: distillation with the block structure frozen."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lpvit_compiler as lpvit
from lpvit_compiler.runtime.modules import BlockSparseLinear


@pytest.fixture(scope="module")
def sparse_compiled(model, calib):
    return lpvit.compile(model, flops_keep=0.4, calib=calib, block_shape=16, dense_fallback=False,
                         reconstruct=False, progress=False)


def _structure(compiled):
    return {name: (m.row_ptr.clone(), m.col_idx.clone()) for name, m in compiled.graph_module.named_modules()
            if isinstance(m, BlockSparseLinear)}


def test_distillation_moves_towards_the_teacher_and_keeps_the_structure(model, sparse_compiled):
    torch.manual_seed(0)
    images = torch.randn(256, 3, 32, 32)
    labels = model(images).argmax(-1).detach()
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    before = {n: m.values.clone() for n, m in sparse_compiled.graph_module.named_modules()
              if isinstance(m, BlockSparseLinear)}
    tuned = lpvit.finetune(sparse_compiled, loader, epochs=3, teacher=model, lr=1e-3, distill_weight=1.0,
                           progress=False)
    # the input model is untouched, the structure is identical, the values moved
    for name, values in before.items():
        assert torch.equal(sparse_compiled.graph_module.get_submodule(name).values, values)
    structure = _structure(sparse_compiled)
    assert structure.keys() == _structure(tuned).keys() and len(structure) > 0
    for name, (row_ptr, col_idx) in _structure(tuned).items():
        assert torch.equal(row_ptr, structure[name][0]) and torch.equal(col_idx, structure[name][1])
    assert any(not torch.equal(tuned.graph_module.get_submodule(n).values, v) for n, v in before.items())
    with torch.no_grad():
        teacher = model(images)
        gap_before = (sparse_compiled(images) - teacher).pow(2).mean()
        gap_after = (tuned(images) - teacher).pow(2).mean()
    assert gap_after < 0.7 * gap_before
    assert not any(p.requires_grad for p in tuned.parameters())


def test_masked_dense_layers_keep_their_zeros(model, calib):
    compiled = lpvit.compile(model, flops_keep=0.5, calib=calib, block_shape=16, progress=False)
    dense_layers = [r.name for r in compiled.report.layers if r.layout == "dense"]
    zeros = {n: compiled.graph_module.get_submodule(n).weight == 0 for n in dense_layers}
    images = torch.randn(64, 3, 32, 32)
    tuned = lpvit.finetune(compiled, [(images, torch.randint(0, 10, (64,)))], epochs=2, lr=1e-2, progress=False)
    for name, zero in zeros.items():
        assert torch.all(tuned.graph_module.get_submodule(name).weight[zero] == 0)


def test_finetune_errors(compiled):
    with pytest.raises(lpvit.ConfigError, match="epochs must be a positive int"):
        lpvit.finetune(compiled, [], epochs=0)
    with pytest.raises(lpvit.ConfigError, match="needs a teacher"):
        lpvit.finetune(compiled, [], distill_weight=0.5)
    with pytest.raises(lpvit.CalibrationError, match="needs labels"):
        lpvit.finetune(compiled, [torch.zeros(2, 3, 32, 32)], progress=False)
