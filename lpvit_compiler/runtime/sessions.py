"""onnxruntime sessions with the lpvit custom-op library registered: what serving and benchmarking open."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LpvitError, ModelFileError, first_line
from .kernels import kernels_library_path


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_info() -> str:
    """The text of /proc/cpuinfo (vendor, flags, ...), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            return info.read()
    except OSError:
        return ""


def cpu_field(name: str) -> str:
    """One field of /proc/cpuinfo's first processor ("vendor_id", "cpu family", "model name", ...), or ""."""
    for line in cpu_info().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def session_options(custom_ops: bool | str = True, **settings):
    """``onnxruntime.SessionOptions`` with ``settings`` set on it (e.g. ``intra_op_num_threads``,
    ``enable_profiling``) and, with ``custom_ops``, the lpvit op library registered (a path: that build of it,
    e.g. a baseline to compare a kernel change with)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for name, value in settings.items():
        if not hasattr(options, name):
            raise LpvitError(f"onnxruntime.SessionOptions has no option {name!r}")
        setattr(options, name, value)
    if custom_ops:
        options.register_custom_ops_library(kernels_library_path() if custom_ops is True else str(custom_ops))
    return options


def ort_session(model, threads: int | None = None, custom_ops: bool | str = True, **settings):
    """An onnxruntime CPU session on a path or serialized model, with ``threads`` intra-op threads (one
    inter-op thread), further ``SessionOptions`` ``settings`` and, with ``custom_ops``, the lpvit op library —
    for timing sessions side by side in one process (benchmarks, ``--bench``, the native profile) and eval.

    Its thread pool does not spin-wait after a run: a spinning worker of one session keeps a core busy while
    the next session runs, so every interleaved comparison would measure the neighbour's spinning (on 2 cores
    1.4-2.4x the time per run of a DeiT-S qkv layer: benchmarks/spinning.py). (Serving with one session,
    :func:`InferenceSession`, keeps onnxruntime's default.)"""
    options = session_options(custom_ops, intra_op_num_threads=threads or default_threads(), inter_op_num_threads=1,
                              **settings)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return open_session(model, options)


def open_session(model, options, providers=None):
    """``onnxruntime.InferenceSession`` on a path or serialized model; a missing file or a model onnxruntime
    rejects raises ModelFileError with onnxruntime's first line."""
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ModelFileError(f"no ONNX model at {model}: the file does not exist")
        model = str(model)
    try:
        return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise ModelFileError(f"onnxruntime could not load {model if isinstance(model, str) else 'the model'}: "
                             f"{first_line(e)}") from e


def InferenceSession(path, intra_op_num_threads: int | None = None, providers=None, **options):
    """An ``onnxruntime.InferenceSession`` with the lpvit custom-op library registered.

    ``options`` are set on the ``onnxruntime.SessionOptions`` (e.g. ``graph_optimization_level``).
    """
    if intra_op_num_threads is not None:
        options["intra_op_num_threads"] = intra_op_num_threads
    return open_session(path, session_options(True, **options), providers)
