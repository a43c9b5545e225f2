"""GPU arrays: the one home of the CuPy import, and every conversion between host and device arrays.

CuPy is imported lazily, at the first call that needs it: ``import gpuhnsw`` works without it, and
the tests put a NumPy stand-in for it in ``sys.modules["cupy"]`` (``tests/conftest.py``).
"""
from __future__ import annotations

import functools

import numpy as np

from .._errors import DeviceError

_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def import_cupy():
    """The cupy module, or DeviceError saying how to install it."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise DeviceError("GPU kernels need CuPy (pip install 'gpuhnsw[cuda12]' or 'gpuhnsw[cuda13]')") from e
    return cupy


@functools.lru_cache(maxsize=None)
def cuda_status():
    """(devices, reason): how many CUDA devices CuPy sees (0 where it cannot be imported or sees
    none), and why none where that is so."""
    try:
        cupy = import_cupy()
    except Exception as exc:  # DeviceError, or a CuPy that cannot load its CUDA libraries
        return 0, (f"CuPy cannot be imported ({exc.__class__.__name__}: {exc}); "
                   "install gpuhnsw[cuda12] or gpuhnsw[cuda13]")
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return 0, f"CUDA reports no usable device ({exc})"
    return n, "" if n > 0 else "CUDA reports no device"


def device_name(ordinal):
    """The name CUDA gives device ``ordinal``."""
    name = import_cupy().cuda.runtime.getDeviceProperties(int(ordinal))["name"]
    return name.decode() if isinstance(name, bytes) else name


def is_gpu_array(x):
    """CuPy arrays, anything with ``__cuda_array_interface__``, or a DLPack producer on a CUDA device."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) in _DLPACK_CUDA
    except Exception:
        return False


def as_cupy(x):
    """A GPU array as a CuPy array on its device (no copy)."""
    cp = import_cupy()
    return cp.asarray(x) if hasattr(x, "__cuda_array_interface__") else cp.from_dlpack(x)


def to_host(x):
    """A host (NumPy-convertible) view of ``x``; GPU arrays are copied to the host."""
    if not is_gpu_array(x):
        return x
    return import_cupy().asnumpy(as_cupy(x))


def to_device(x):
    """``x`` (NumPy) copied to the current GPU as a CuPy array."""
    return import_cupy().asarray(x)


def put_rows(out, rows, values):
    """``out[rows] = values`` where ``out`` is a NumPy or a CuPy array and ``rows`` (int ``[r]``)
    and ``values`` (``[r, ...]``) are NumPy: they go to the device first where ``out`` lives there."""
    if is_gpu_array(out):
        rows, values = to_device(rows), to_device(values)
    out[rows] = values


def bf16_bits(x, xp=np):
    """float32-castable ``x`` (NumPy, or CuPy as ``xp``) as bfloat16 bit patterns (uint16, same
    shape), rounded to nearest even, NaN a quiet NaN: what kernels/scatter.cu stores for bfloat16
    rows (float_to_bf16_bits), and the exact engine's bf16 screening inputs."""
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(xp.uint16)
    return xp.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), np.uint16(0x7FC0), bits)


def bf16_values(bits, xp=np):
    """bfloat16 bit patterns (uint16 array, NumPy, or CuPy as ``xp``) as float32 values (exact)."""
    return (xp.asarray(bits, dtype=xp.uint16).astype(xp.uint32) << 16).view(xp.float32)
