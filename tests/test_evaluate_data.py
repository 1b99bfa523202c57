"""lpvit.evaluate and the offline data readers."""

import gzip

import numpy as np
import pytest

from conftest import require_or_skip
import torch
from torch.utils.data import DataLoader, TensorDataset

import lpvit_compiler as lpvit
from lpvit_compiler.tools.data import FASHION_MNIST_DIR, fashion_mnist


class Oracle(torch.nn.Module):
    """Predicts class = first pixel value (as an int): accuracy is known exactly."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 4).float()


def _loader(predicted, labels, batch_size=3):
    images = torch.zeros(len(labels), 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor(predicted, dtype=torch.float32)
    return DataLoader(TensorDataset(images, torch.tensor(labels)), batch_size=batch_size)


def test_top1_counts_exactly_and_restores_training_mode():
    model = Oracle().train()
    loader = _loader([0, 1, 2, 3, 1, 1, 0], [0, 1, 2, 0, 0, 1, 3])
    assert lpvit.evaluate(model, loader) == pytest.approx(4 / 7)
    assert model.training
    assert lpvit.evaluate(model, loader, limit=4) == pytest.approx(3 / 4)
    seen = []
    lpvit.evaluate(model, loader, progress=seen.append)
    assert seen == [3, 3, 1]


def test_dict_batches_and_onnxruntime_sessions_agree(compiled, tmp_path):
    torch.manual_seed(0)
    images, labels = torch.randn(10, 3, 32, 32), torch.randint(0, 10, (10,))
    session = lpvit.InferenceSession(compiled.export(tmp_path / "m.onnx"))
    with torch.no_grad():
        expected = (compiled(images).argmax(-1) == labels).float().mean().item()
    batches = [{"pixel_values": images[:6], "labels": labels[:6]}, {"pixel_values": images[6:], "labels": labels[6:]}]
    assert lpvit.evaluate(session, batches) == pytest.approx(expected)
    assert lpvit.evaluate(compiled, batches) == pytest.approx(expected)


def test_evaluate_rejects_what_it_cannot_use():
    with pytest.raises(lpvit.CalibrationError, match="torch nn.Module or an onnxruntime InferenceSession"):
        lpvit.evaluate("model.onnx", [])
    with pytest.raises(lpvit.CalibrationError, match="expected \\(images, labels\\) pairs"):
        lpvit.evaluate(Oracle(), [torch.zeros(2, 1, 2, 2)])
    with pytest.raises(lpvit.CalibrationError, match="yielded no images"):
        lpvit.evaluate(Oracle(), [])


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_on_small_files(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 0, 9]))
    data = fashion_mnist("test", root=tmp_path)
    x, y = data.tensors
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [7, 0, 9]
    np.testing.assert_allclose(x[1, 0].numpy(), ((images[1] / 255 - 0.2860) / 0.3530), rtol=1e-5)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x01")  # header says 5 labels, holds 1
    with pytest.raises(lpvit.CalibrationError, match="holds 1 bytes of data but its header says"):
        fashion_mnist("test", root=tmp_path)
    with pytest.raises(lpvit.CalibrationError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(lpvit.CalibrationError, match="'train' or 'test'"):
        fashion_mnist("val", root=tmp_path)


def test_real_fashion_mnist_when_installed():
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        require_or_skip("Fashion-MNIST is not installed", "apt-get install dataset-fashion-mnist")
    x, y = fashion_mnist("test").tensors
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist() == [1000] * 10
