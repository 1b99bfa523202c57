"""Deployment artefacts: a Triton Inference Server model repository for an exported model.

    <repo>/<name>/config.pbtxt          onnxruntime backend, inputs/outputs from the ONNX graph,
                                        model_operations naming the custom-op library
    <repo>/<name>/1/model.onnx
    <repo>/<name>/liblpvit_kernels.so   the op library, copied beside the model

Triton's onnxruntime backend loads ``model_operations.op_library_filename`` (an absolute path as the
server sees it) before creating the session. ``mount`` says where ``repo`` will be mounted in the server's
container (e.g. ``/models``); by default the path is the repository's absolute path on this machine.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx

from ..errors import LpvitError, ModelFileError
from ..runtime.kernels import kernels_library_path

_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                 onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32"}


def _io_entries(values, batched: bool) -> str:
    entries = []
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ModelFileError(f"tensor '{value.name}' has ONNX type {tensor.elem_type}, which this exporter does "
                                 "not map to a Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        dims = dims[1:] if batched else dims
        entries.append(f'  {{\n    name: "{value.name}"\n    data_type: {_TRITON_TYPES[tensor.elem_type]}\n'
                       f'    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}')
    return ",\n".join(entries)


def write_triton_repo(onnx_path, repo, name: str = "lpvit_model", max_batch_size: int = 32,
                      mount: str | None = None, instance_count: int = 1) -> Path:
    """Write a Triton model repository for ``onnx_path`` (exported with target "lpvit" or "portable");
    returns the config.pbtxt path."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise LpvitError(f"Triton model name {name!r} may hold only letters, digits, '_', '.' and '-'")
    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise ModelFileError(f"cannot read ONNX model {onnx_path}: {e}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    uses_lpvit = any(node.domain == "ai.lpvit" for node in model.graph.node)
    batched = all(v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
                  for v in [*inputs, *model.graph.output])
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    operations = ""
    if uses_lpvit:
        library = Path(kernels_library_path())
        shutil.copyfile(library, model_dir / library.name)
        server_path = (Path(mount) / name / library.name).as_posix() if mount else str((model_dir / library.name)
                                                                                       .resolve())
        operations = f'model_operations {{\n  op_library_filename: [ "{server_path}" ]\n}}\n'
    config = (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size if batched else 0}\n'
              f'input [\n{_io_entries(inputs, batched)}\n]\noutput [\n{_io_entries(model.graph.output, batched)}\n]\n'
              f'instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]\n{operations}')
    path = model_dir / "config.pbtxt"
    path.write_text(config)
    return path
