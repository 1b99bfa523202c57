"""The GEMM the compile's passes run on (linalg.gemm_products): oneDNN's products against float64 references,
the routing of nn.Linear calls, FLOP counts that do not depend on the backend, and the backend's choice."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_vit
from lpvit_compiler import linalg
from lpvit_compiler.errors import ConfigError
from lpvit_compiler.costmodel.flops import flop_counter
from lpvit_compiler.report.summary import summary_items

import lpvit_compiler as lpvit

ONEDNN = linalg.onednn_available()
BACKENDS = ["blas", pytest.param("onednn", marks=pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN"))]


@pytest.fixture
def gemm(monkeypatch):
    """Force LPVIT_GEMM to a backend for one test (gemm_backend caches its choice per process)."""
    def force(backend: str | None) -> None:
        if backend is None:
            monkeypatch.delenv("LPVIT_GEMM", raising=False)
        else:
            monkeypatch.setenv("LPVIT_GEMM", backend)
        linalg.gemm_backend.cache_clear()
    yield force
    monkeypatch.undo()
    linalg.gemm_backend.cache_clear()


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_and_its_gradients_match_float64(gemm, backend, shape, with_bias):
    gemm(backend)
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=with_bias)
    x = torch.randn(*shape, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 40)
    with linalg.gemm_products():
        y = layer(x)
    (y * upstream).sum().backward()
    x64, w64 = x.detach().double(), layer.weight.detach().double()
    expected = x64 @ w64.T + (layer.bias.detach().double() if with_bias else 0)
    g64 = upstream.double().reshape(-1, 40)
    np.testing.assert_allclose(y.detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), (upstream.double() @ w64).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.weight.grad.numpy(), (g64.T @ x64.reshape(-1, 24)).numpy(), rtol=1e-5,
                               atol=1e-4)
    if with_bias:
        np.testing.assert_allclose(layer.bias.grad.numpy(), g64.sum(0).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_layers_run_on_the_chosen_backend(gemm, backend):
    gemm(backend)
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with linalg.gemm_products(), _RecordOps() as recorded:
        layer(x).sum().backward()
        layer.double()(x.detach().double())  # float64 has no oneDNN product: torch's own GEMM
    onednn_products = {"mkldnn._linear_pointwise"} & recorded.ops
    assert bool(onednn_products) == (backend == "onednn")
    assert {"aten.addmm", "aten.mm"} & recorded.ops  # the float64 call, and blas's float32 ones


@pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
def test_a_step_counts_the_same_flops_on_either_backend(gemm):
    """Block recovery sizes its steps by counted FLOPs: a compile takes as many steps on either GEMM."""
    layer = nn.Linear(24, 40)
    x = torch.randn(3, 5, 24, requires_grad=True)
    counts = []
    for backend in ("blas", "onednn"):
        gemm(backend)
        with flop_counter() as counter, linalg.gemm_products():
            layer(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 15 * 24 * 40


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("columns", [5, 8, 21])
def test_gram_is_xtx_on_either_backend(gemm, monkeypatch, backend, columns):
    gemm(backend)
    monkeypatch.setattr(linalg, "GRAM_TILE", 8)
    x = torch.randn(50, columns)
    np.testing.assert_allclose(linalg.gram(x).numpy(), x.double().numpy().T @ x.double().numpy(), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("vendor, expected", [("GenuineIntel", "blas"), ("AuthenticAMD", "onednn"), ("", "blas")])
def test_auto_takes_onednn_off_intel_cpus(gemm, monkeypatch, vendor, expected):
    gemm(None)
    monkeypatch.setattr(linalg, "_cpu_vendor", lambda: vendor)
    assert linalg.gemm_backend() == (expected if ONEDNN else "blas")


def test_a_bad_lpvit_gemm_names_the_choices(gemm):
    gemm("mkl")
    with pytest.raises(ConfigError, match=r"LPVIT_GEMM='mkl'.*auto, onednn, blas"):
        linalg.gemm_backend()


@pytest.mark.skipif(not ONEDNN, reason="torch built without oneDNN")
def test_a_compile_chooses_the_same_blocks_on_either_backend(gemm, calib):
    compiled = {}
    for backend in ("blas", "onednn"):
        gemm(backend)
        compiled[backend] = lpvit.compile(tiny_vit(), flops_keep=0.5, calib=calib, importance="obs", progress=False)
    for backend, c in compiled.items():  # the report says which library the compile ran on
        assert c.report.summary["compile_gemm"] == backend
        expected = {"blas": "torch's BLAS (MKL) (LPVIT_GEMM)", "onednn": "oneDNN (LPVIT_GEMM)"}[backend]
        assert ("GEMM of importance and reconstruction", expected) in summary_items(c.report)
    masks = [{row.name: row.block_mask for row in c.report.layers} for c in compiled.values()]
    assert masks[0] == masks[1]
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        blas, onednn = (c(images) for c in compiled.values())
    torch.testing.assert_close(onednn, blas, rtol=1e-3, atol=1e-3 * float(blas.abs().max()))
