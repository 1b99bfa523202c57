"""``lpvit export``: a saved compiled model (.pt2) to ONNX and/or a Triton repository."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, ModelFileError
from .output import write_onnx, write_triton
from .ui import Ui


def cmd_export(args, ui: Ui) -> int:
    path = Path(args.model)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ModelFileError(f"no ONNX model at {path}")
        onnx_path = path
    else:
        from ..compiled import load

        compiled = load(path)
        if not args.out:
            raise ConfigError("--out model.onnx is required to export a .pt2 model")
        onnx_path = write_onnx(compiled, Path(args.out), args.target, ui)
    if args.triton_repo:
        write_triton(onnx_path, args, ui)
    elif onnx_path == path:
        raise ConfigError(f"{path} is already ONNX: give --triton-repo DIR to make a Triton repository of it")
    return 0
