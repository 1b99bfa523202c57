"""The native kernel library (kernels/, built by ``pip install``): where it is, and calling it from torch.

``liblpvit_kernels.so`` holds the block-sparse kernels (float32 and int8) behind two front ends: the onnxruntime
custom-op library (``RegisterCustomOps``, domain ``ai.lpvit``) and a small C API (``lpvit_bsr_create/run/destroy``
and ``lpvit_bsr_int8_*``) that ``torch.ops.lpvit.bsr_linear`` and ``bsr_linear_int8`` call through ctypes. ``LPVIT_KERNELS_LIBRARY`` points at another build (e.g.
one with AddressSanitizer).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import weakref
from pathlib import Path

import torch

from ..errors import LpvitError

LIBRARY_NAME = "liblpvit_kernels.so"
LIBRARY_ENV = "LPVIT_KERNELS_LIBRARY"
ERROR_BYTES = 512


class KernelLibraryError(LpvitError):
    """The native kernel library is missing or rejected its input."""


def kernels_library_path() -> str:
    """Path of the custom-op library, for onnxruntime sessions in any language and Triton's ORT backend."""
    if os.environ.get(LIBRARY_ENV):
        path = Path(os.environ[LIBRARY_ENV])
        if not path.is_file():
            raise KernelLibraryError(f"{LIBRARY_ENV}={path} does not exist")
        return str(path)
    # installed beside the package's __init__; an editable install spreads the package over several folders
    for folder in importlib.util.find_spec(__name__.split(".")[0]).submodule_search_locations or ():
        if (Path(folder) / LIBRARY_NAME).is_file():
            return str(Path(folder) / LIBRARY_NAME)
    raise KernelLibraryError(f"the native kernel library ({LIBRARY_NAME}) is not built; reinstall with "
                             "`pip install .` (needs a C++17 compiler and CMake >= 3.18)")


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(kernels_library_path())
    except (KernelLibraryError, OSError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lpvit_bsr_create.restype = ptr
    lib.lpvit_bsr_create.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64, ctypes.c_char_p, i64]
    lib.lpvit_bsr_run.restype = ctypes.c_int
    lib.lpvit_bsr_run.argtypes = [ptr, ptr, i64, ptr, ptr, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, i64]
    lib.lpvit_bsr_int8_create.restype = ptr
    lib.lpvit_bsr_int8_create.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64,
                                          ctypes.c_char_p, i64]
    lib.lpvit_bsr_int8_run.restype = ctypes.c_int
    lib.lpvit_bsr_int8_run.argtypes = lib.lpvit_bsr_run.argtypes
    for name in ("lpvit_bsr_destroy", "lpvit_bsr_int8_destroy"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ptr]
    lib.lpvit_kernel_isa.restype = ctypes.c_char_p
    lib.lpvit_kernel_int8_isa.restype = ctypes.c_char_p
    return lib


def native_available() -> bool:
    return _library() is not None


def kernel_isa() -> str:
    """The instruction set the kernel uses on this CPU: ``avx512``, ``avx2`` or ``scalar``."""
    lib = _library()
    return lib.lpvit_kernel_isa().decode() if lib else "unavailable"


def kernel_int8_isa() -> str:
    """The int8 kernel's path on this CPU: ``avx512_vnni``, ``avx2`` or ``scalar``."""
    lib = _library()
    return lib.lpvit_kernel_int8_isa().decode() if lib else "unavailable"


class _PackedWeights:
    """A validated, repacked BSR weight inside the native library (float32, or int8 when ``scales`` is given);
    freed with this object."""

    def __init__(self, lib, row_ptr, col_idx, values, scales, bias, out_features: int, in_features: int):
        self._lib = lib
        self.int8 = scales is not None
        error = ctypes.create_string_buffer(ERROR_BYTES)
        bh, bw = values.shape[1], values.shape[2]
        index = (out_features, in_features, bh, bw, row_ptr.data_ptr(), row_ptr.numel(), col_idx.data_ptr(),
                 col_idx.numel(), values.data_ptr(), values.numel())
        tail = (bias.data_ptr() if bias is not None else None, bias.numel() if bias is not None else 0, error,
                ERROR_BYTES)
        self.handle = lib.lpvit_bsr_int8_create(*index, scales.data_ptr(), scales.numel(), *tail) if self.int8 \
            else lib.lpvit_bsr_create(*index, *tail)
        if not self.handle:
            raise KernelLibraryError(f"malformed block-sparse weight: {error.value.decode()}")

    def run(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None, activation: str) -> None:
        """y [m, n] = the layer on x [m, k] (contiguous float32); raises KernelLibraryError on failure."""
        error = ctypes.create_string_buffer(ERROR_BYTES)
        run = self._lib.lpvit_bsr_int8_run if self.int8 else self._lib.lpvit_bsr_run
        if run(self.handle, x.data_ptr(), x.shape[0], y.data_ptr(),
               residual.data_ptr() if residual is not None else None, activation.encode(),
               max(1, torch.get_num_threads()), error, ERROR_BYTES) != 0:
            raise KernelLibraryError(error.value.decode())

    def __del__(self):
        if getattr(self, "handle", None):
            (self._lib.lpvit_bsr_int8_destroy if self.int8 else self._lib.lpvit_bsr_destroy)(self.handle)


# id(values tensor) -> (identity of all the weight's buffers, packed weights); dropped when the tensor dies
_packed: dict[int, tuple] = {}


def native_bsr_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor | None, out_features: int, in_features: int, activation: str = "none",
                      residual: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """y = activation(x W^T + b) + residual with the native kernel (int8 when ``scales`` is given: W = scales[n]
    * values), or None when it cannot run these tensors (the caller falls back)."""
    lib = _library()
    values_dtype = torch.int8 if scales is not None else torch.float32
    tensors = (row_ptr, col_idx, values) + tuple(t for t in (scales, bias) if t is not None)
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or values.dtype != values_dtype or \
            row_ptr.dtype != torch.int64 or col_idx.dtype != torch.int64 or \
            any(t.dtype != torch.float32 for t in (scales, bias) if t is not None) or \
            not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors) or \
            (residual is not None and (residual.device.type != "cpu" or residual.dtype != torch.float32)):
        return None
    identity = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors) + ((out_features, in_features),)
    cached = _packed.get(id(values))
    if cached is None or cached[0] != identity:
        if cached is None:
            weakref.finalize(values, _packed.pop, id(values), None)
        cached = (identity, _PackedWeights(lib, row_ptr, col_idx, values, scales, bias, out_features, in_features))
        _packed[id(values)] = cached
    if x.shape[-1] != in_features:
        raise KernelLibraryError(f"input's last dimension is {x.shape[-1]}, the layer expects {in_features}")
    x2 = x.reshape(-1, in_features).contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    if residual is not None:  # its shape is checked by the op (ops.check_epilogue)
        residual = residual.reshape(-1, out_features).contiguous()
    # `cached` keeps the packed weights alive while the call runs (ctypes releases the GIL during it)
    cached[1].run(x2, y, residual, activation)
    return y.reshape(*x.shape[:-1], out_features)
