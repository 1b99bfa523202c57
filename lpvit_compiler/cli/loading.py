"""What the commands load: models (timm names, factories, .pt2 files, checkpoints) and images."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from pathlib import Path

from ..errors import CalibrationError, ConfigError, ModelFileError, first_line
from .ui import Ui


def load_model(spec: str, checkpoint: str | None = None, pretrained: bool = False):
    """(model, compiled) from MODEL: a saved .pt2 (compiled → (None, CompiledModel); plain torch.export →
    its module), ``package.module:factory`` (called with no arguments), or a timm model name."""
    import torch

    from ..compiled import load

    path = Path(spec)
    if path.suffix == ".onnx":
        raise ConfigError(f"{spec} is an ONNX file; compile takes a torch model (a timm name, "
                          "package.module:factory or a .pt2 file). Time an ONNX file with `lpvit bench`")
    if path.suffix in (".pt2", ".pt", ".pth") or os.sep in spec:
        if not path.is_file():
            raise ModelFileError(f"no model file at {spec}")
        if path.suffix != ".pt2":
            raise ConfigError(f"{spec}: a weights file is not a model; pass the model (timm name or "
                              f"package.module:factory) and give the weights with --checkpoint {spec}")
        try:
            return None, load(path)
        except ModelFileError as e:
            if "not an lpvit-compiler model" not in str(e):
                raise
        model = torch.export.load(path).module()
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        model = from_timm(spec, pretrained)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, spec)
    return model.eval(), None


def _from_factory(spec: str):
    from torch import nn

    module_name, _, factory_name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:  # like `python -m`, so project-local modules resolve
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r} for model {spec!r}: {e}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"module {module_name!r} has no callable {factory_name!r} (model {spec!r})")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def from_timm(name: str, pretrained: bool):
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}: give a timm model name (timm.list_models('*vit*')), "
                          "package.module:factory, or a .pt2 file")
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as e:  # hub errors come in many types (HTTP, offline mode, OS)
        if not pretrained:
            raise
        raise ConfigError(f"could not fetch the pretrained weights of {name!r} ({first_line(e)}); without network "
                          "access, download them elsewhere and pass --checkpoint PATH instead of --pretrained") from None


def _load_checkpoint(model, checkpoint: str, spec: str) -> None:
    from timm.models import load_state_dict

    if not Path(checkpoint).is_file():
        raise ModelFileError(f"checkpoint not found: {checkpoint}")
    try:
        state_dict = load_state_dict(checkpoint, weights_only=True)  # no code is unpickled
    except Exception as e:  # torch.load / safetensors failures have no common type
        raise ModelFileError(f"checkpoint {checkpoint} is not a state dict torch.load (weights only) or "
                             f"safetensors can read ({type(e).__name__}: {first_line(e)[:200]}); pass a "
                             ".pth/.pt/.safetensors file of the model's weights") from None
    try:
        incompatible = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # tensors of the right names but another model's shapes
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ModelFileError(f"checkpoint {checkpoint} is a state dict, but not of {spec}: "
                             f"{(lines[1] if len(lines) > 1 else lines[0] if lines else '')[:300]}") from None
    missing, unexpected = incompatible.missing_keys, incompatible.unexpected_keys
    if missing or unexpected:
        raise ModelFileError(
            f"checkpoint {checkpoint} is a state dict, but not of {spec}: {len(missing)} of the model's tensors are "
            f"missing from it{f' (first: {missing[0]})' if missing else ''} and it holds {len(unexpected)} the "
            f"model does not have{f' (first: {unexpected[0]})' if unexpected else ''}")


def _input_shape(model, data_config: dict | None) -> tuple[int, ...]:
    if data_config is not None:
        return tuple(data_config["input_size"])
    from ..frontend.calibration import expected_input_shape

    shape = expected_input_shape(model)
    try:
        return tuple(int(v) for v in shape.strip("[]").split(", ")[1:])
    except ValueError:
        raise ConfigError(f"cannot tell the input size of this model ({shape}); use --calib DIR or fashion-mnist "
                          "rather than random images") from None


def calibration_images(spec: str, count: int, model, data_config: dict | None, ui: Ui):
    """Calibration images [N, C, H, W] from ``random:N``, ``fashion-mnist[:N]`` or an ImageFolder DIR."""
    import torch

    from ..tools.data import fashion_mnist, fashion_mnist_for, image_folder

    name, _, n = spec.partition(":")
    if name in ("random", "fashion-mnist") and n:
        if not n.isdigit() or int(n) < 1:
            raise CalibrationError(f"--calib {spec}: the count after ':' must be a positive integer")
        count = int(n)
    if name == "random":
        generator = torch.Generator().manual_seed(0)
        return torch.randn(count, *_input_shape(model, data_config), generator=generator)
    if name == "fashion-mnist":
        dataset = fashion_mnist("train")
        if data_config is not None:  # a model of other input size: grey, resized, its normalisation
            dataset = fashion_mnist_for(dataset, data_config["input_size"], data_config)
        return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    if data_config is None:
        raise CalibrationError("this model has no timm data config to preprocess images with; use --calib "
                               "random:N or fashion-mnist, or pass preprocessed tensors through the Python API")
    loader = image_folder(spec, data_config, limit=count)
    images = []
    with ui.bar("reading calibration images", len(loader.dataset)) as advance:
        for batch, _ in loader:
            images.append(batch)
            advance(len(batch))
    if not images:
        raise CalibrationError(f"{spec} holds no images")
    return torch.cat(images)


def evaluation_loader(spec: str, data_config: dict | None, input_shape, limit: int | None, batch_size: int = 64):
    """(images, labels) batches from an ImageFolder DIR or ``fashion-mnist`` (its test split), preprocessed for a
    model taking images of ``input_shape`` [C, H, W] with ``data_config``'s normalisation."""
    from torch.utils.data import DataLoader, Subset

    from ..tools.data import fashion_mnist, fashion_mnist_for, image_folder

    if spec == "fashion-mnist":
        dataset = fashion_mnist_for(fashion_mnist("test"), input_shape, data_config)
        return DataLoader(Subset(dataset, range(min(limit or len(dataset), len(dataset)))), batch_size=batch_size)
    if data_config is None:
        raise ConfigError("the model does not say how to preprocess images (no timm data config in the ONNX "
                          "metadata); pass --preprocess-as TIMM_NAME to take the preprocessing of that timm model")
    return image_folder(spec, data_config, batch_size=batch_size, limit=limit)
