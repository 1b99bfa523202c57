"""Data that works offline: Fashion-MNIST from Debian's package, ImageFolder directories, random images.

``fashion_mnist(split)`` reads the standard idx files (``apt-get install dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``). ``image_folder(path, model)`` reads an ImageFolder-style directory
(one sub-directory per class) with the model's own preprocessing (timm's data config).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import CalibrationError

FASHION_MNIST_DIR = Path(os.environ.get("LPVIT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the 60k training images, pixel values in [0, 1]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx file (big-endian header: magic 0x0000 08 <dims>, then one uint32 per dimension, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * dims or data[:3] != b"\0\0\x08" or data[3] != dims:
        raise CalibrationError(f"{path} is not an idx file of {dims}-D uint8 data")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise CalibrationError(f"{path} holds {body.size} bytes of data but its header says {shape}")
    return body.reshape(shape)


def fashion_mnist(split: str = "test", root=None) -> TensorDataset:
    """Fashion-MNIST as a dataset of (image [1, 28, 28] float normalised, label int64)."""
    if split not in _FILES:
        raise CalibrationError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    images_file, labels_file = (root / name for name in _FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise CalibrationError(f"Fashion-MNIST not found in {root}: install Debian's package "
                               "(apt-get install dataset-fashion-mnist) or set LPVIT_FASHION_MNIST_DIR")
    images = torch.from_numpy(_read_idx(images_file, 3).copy()).float().div_(255)
    images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_file, 1).astype(np.int64))
    return TensorDataset(images, labels)


class _ResizedGrey(Dataset):
    """Grey [1, h, w] images in [0, 1] as [C, H, W] ones, normalised by (mean, std); made per item, so a
    224-px copy of the whole set never sits in memory."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, shape, mean, std):
        self.pixels, self.labels, (self.channels, *self.size) = pixels, labels, shape
        self.mean = torch.tensor(mean[: self.channels]).view(self.channels, 1, 1)
        self.std = torch.tensor(std[: self.channels]).view(self.channels, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.nn.functional.interpolate(self.pixels[index][None], size=tuple(self.size), mode="bilinear",
                                                align_corners=False)[0]
        return (image.expand(self.channels, -1, -1) - self.mean) / self.std, self.labels[index]


def fashion_mnist_for(dataset: TensorDataset, input_shape, data_config: dict | None) -> Dataset:
    """Fashion-MNIST made to fit a model that takes images [C, H, W] = ``input_shape``: grey copied to every
    channel, resized (bilinear) and normalised with the model's ``data_config`` mean and std. For a model that
    takes [1, 28, 28] the dataset is returned as it is; any other model needs a data config."""
    images, labels = dataset.tensors
    shape = tuple(int(d) for d in input_shape)
    if shape == tuple(images.shape[1:]):
        return dataset
    if data_config is None or len(shape) != 3 or shape[0] not in (1, 3):
        raise CalibrationError(f"the model takes images {list(shape)} but Fashion-MNIST is [1, 28, 28] grey, and "
                               "the model does not say how to preprocess images (no data config); use "
                               "--preprocess-as TIMM_NAME or an ImageFolder DIR")
    pixels = images * FASHION_MNIST_STD + FASHION_MNIST_MEAN  # back to [0, 1]
    return _ResizedGrey(pixels, labels, shape, data_config["mean"], data_config["std"])


def data_config_of(model: torch.nn.Module) -> dict:
    """timm's evaluation preprocessing for ``model`` (input_size, interpolation, mean, std, crop_pct, ...)."""
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)


def image_folder(path, data_config: dict, batch_size: int = 32, limit: int | None = None) -> DataLoader:
    """A loader of (images, labels) from an ImageFolder directory, preprocessed by timm's evaluation
    transform for ``data_config`` (see :func:`data_config_of`); ``limit`` takes the first images (in class,
    then file order). Unreadable images raise CalibrationError naming the file."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise CalibrationError(f"{path} is not a directory: pass an ImageFolder-style directory "
                               "(one sub-directory of images per class)")
    try:
        dataset = ImageFolder(str(path), transform=create_transform(**data_config), loader=_load_image)
    except (FileNotFoundError, PermissionError, OSError) as e:
        raise CalibrationError(f"cannot read images from {path}: {e}. It needs one sub-directory per class "
                               "holding .jpg/.png files") from None
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size)


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except UnidentifiedImageError:
        raise CalibrationError(f"cannot read image {path}: not an image file PIL can decode") from None
    except OSError as e:
        raise CalibrationError(f"cannot read image {path}: {e.strerror or e}") from None
