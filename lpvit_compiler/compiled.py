"""The compiled model, its plan, and saving/loading it.

A saved compiled model is a ``torch.export`` archive (.pt2) of the rewritten graph — the block-sparse op
included — with the plan, the report and the block masks as extra JSON files. Loading it needs no Python
model code and unpickles nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import fx, nn

from .blocks import BlockGrid, pack_mask, unpack_mask
from .errors import ModelFileError
from .report import Report

FORMAT = "lpvit-compiled-model/1"
EXTRA_FILES = ("lpvit/plan.json", "lpvit/report.json", "lpvit/masks.json")


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("lpvit_compiler", "timm", "transformers", "torchvision"):
        try:  # from the installed metadata: importing transformers only for its version takes most of a second
            found[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


@dataclass
class Plan:
    """Everything needed to reproduce a compile: options, capture, per-layer decisions, versions."""

    options: dict
    capture: str  # "torch.fx" or "torch.export"
    input_shape: list[int]  # [C, H, W] of the calibration images
    layers: dict  # name -> weight_shape, block_shape, blocks, pruned_blocks, keep_ratio
    summary: dict
    versions: dict
    format: str = FORMAT
    data_config: dict | None = None  # preprocessing the model expects (timm data config), where known

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(**data)


def _encode_masks(block_masks: dict[str, tuple[BlockGrid, torch.Tensor]]) -> str:
    return json.dumps({
        name: {"weight_shape": [g.out_features, g.in_features], "block_shape": list(g.block_shape),
               "bits": pack_mask(m)}
        for name, (g, m) in block_masks.items()})


def _decode_masks(text: str) -> dict[str, tuple[BlockGrid, torch.Tensor]]:
    masks = {}
    for name, entry in json.loads(text).items():
        grid = BlockGrid(*entry["weight_shape"], tuple(entry["block_shape"]))
        try:
            masks[name] = (grid, unpack_mask(entry["bits"], grid.block_rows, grid.block_cols))
        except ValueError:
            raise ModelFileError(f"mask of layer '{name}' is truncated in the saved file") from None
    return masks


class CompiledModel(nn.Module):
    """The rewritten model. Call it like the original; ``report``, ``masks`` and ``plan`` explain it."""

    def __init__(self, graph_module: fx.GraphModule, report: Report, plan: Plan,
                 block_masks: dict[str, tuple[BlockGrid, torch.Tensor]]):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.plan = plan
        self._block_masks = block_masks

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{module name in the original model: bool tensor shaped like its weight, True = kept}."""
        return {name: grid.expand(mask) for name, (grid, mask) in self._block_masks.items()}

    def export(self, path, target: str = "lpvit", head_major_attention: bool = True):
        """Write an ONNX model: ``target="lpvit"`` with ai.lpvit::BlockSparseLinear nodes (run it with
        :func:`lpvit_compiler.InferenceSession`), ``"portable"`` with standard ops only; the plan's data config
        goes into the metadata (``lpvit eval`` preprocesses with it). ``head_major_attention`` (lpvit target):
        the attentions' layers write q, k, v and read their output head-major, with no transposes between them
        (lowering/attention_layout.py); False keeps the transposes. Returns the path."""
        from .lowering.onnx_export import DATA_CONFIG_KEY, export_onnx

        metadata = {DATA_CONFIG_KEY: json.dumps(self.plan.data_config)} if self.plan.data_config else None
        return export_onnx(self.graph_module, torch.zeros(2, *self.plan.input_shape), path, target, metadata,
                           head_major_attention)

    def save(self, path) -> None:
        """Write a .pt2 archive loadable by :func:`lpvit_compiler.load`."""
        example = torch.zeros(2, *self.plan.input_shape)
        exported = torch.export.export(self.graph_module, (example,),
                                       dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
        extra = dict(zip(EXTRA_FILES, (self.plan.to_json(), self.report.to_json(), _encode_masks(self._block_masks))))
        with warnings.catch_warnings():  # torch's archive writer warns about CUDA placement; all is on the CPU
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(exported, path, extra_files=extra)


def load(path) -> CompiledModel:
    """Load a compiled model written by :meth:`CompiledModel.save`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no compiled model at {path}: the file does not exist")
    extra = dict.fromkeys(EXTRA_FILES, "")
    export_log = logging.getLogger("torch.export")  # it logs a traceback for unreadable archives, then raises
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        exported = torch.export.load(path, extra_files=extra)
    except Exception as e:
        raise ModelFileError(f"{path} is not a readable compiled model (.pt2 written by CompiledModel.save): "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        export_log.setLevel(level)
    if not extra["lpvit/plan.json"]:
        raise ModelFileError(f"{path} is a torch.export archive but not an lpvit-compiler model (no plan inside)")
    try:
        plan = Plan.from_dict(json.loads(extra["lpvit/plan.json"]))
        report = Report.from_dict(json.loads(extra["lpvit/report.json"]))
        masks = _decode_masks(extra["lpvit/masks.json"])
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFileError(f"{path}: the plan, report or masks inside are corrupt ({e})") from e
    if plan.format != FORMAT:
        raise ModelFileError(f"{path} has format {plan.format!r}; this lpvit-compiler reads {FORMAT!r}")
    return CompiledModel(exported.module(), report, plan, masks)
