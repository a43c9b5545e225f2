"""The one loader of gpuhnsw's CUDA kernels (``kernels/*.cu``), compiled at run time by NVRTC.

Everything about compilation lives here:

* where the sources are (``gpuhnsw/kernels`` when installed, ``<repo>/kernels`` in a checkout);
* :func:`kernel_source`: the ``.cu`` file with our ``#include "x.cuh"`` headers inlined
  (recursively, each once), each preceded by ``#line 1 "x.cuh"`` so compiler errors name the
  real file. Inlining matters beyond convenience: CuPy keys its on-disk cache on the source text
  and options, not on headers found through ``-I``, so a header edit would otherwise be ignored;
* :data:`OPTIONS` and :func:`nvrtc_options`: our NVRTC options, and the complete list CuPy hands
  NVRTC (what the CI compile checks use);
* :func:`instances`: the template instantiation matrix, generated in one place;
  :func:`instance_source`: one instantiation as its own program, with C linkage and launch bounds
  equal to its launch (:func:`block_size`);
* :func:`get_kernel`: a ``cupy.RawKernel`` for one instantiation, compiled on first use and
  memoised per (device, module, instantiation).

How a kernel is launched (its arguments, grid, shared memory) is :mod:`gpuhnsw.device.launch`'s.
Everything here but :func:`get_kernel` and :func:`shared_limit` works without CuPy.

One program per instantiation: ``kernels/common.cuh``'s ``GPUHNSW_KERNEL`` turns the kernel
template into one ``extern "C"`` kernel when ``GPUHNSW_INSTANCE`` is defined, so CuPy loads it by
its plain name, without name expressions, and every CuPy release caches it on disk (keyed on source
and options); a query compiles only the one instantiation it launches, once per machine
(docs/architecture.md, "Loader").

Floating point: no ``--use_fast_math``, correctly rounded division and square root, FMA
contraction on (``-fmad=true``, as the C core's AVX2 and AVX-512 kernels), and denormals flushed
to zero (``-ftz=true``, which CuPy appends whatever the caller asks, so we ask for it too and the
code says what runs). The kernels do not need denormals: a product below 1.2e-38 is far under the
float32 resolution of any distance it is added to. GPU and CPU distances differ in the last bits
(summation order), so tests compare them with a relative tolerance, never bit for bit.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

from .._core import SPACES
from .arrays import import_cupy

__all__ = [
    "OPTIONS", "MODULES", "STORAGE_TYPES", "BEAM_STORAGES", "TEAM_SIZES", "FIXED_TEAM_SIZES", "SEARCH_CAPACITIES",
    "FIXED_CAPACITIES", "TOPK_CAPACITIES", "METRICS", "SEARCH_BLOCK", "FIXED_BLOCK", "DISTANCE_BLOCK",
    "SCATTER_BLOCK", "MERGE_BLOCK", "MAX_REGISTERS", "FIXED_MAX_REGISTERS", "kernel_source", "instances",
    "instance_source", "block_size", "max_registers", "topk_warps", "nvrtc_options", "get_kernel", "kernel_dir",
    "shared_limit", "nvrtc_module", "nvrtc_compile",
]

#: Our NVRTC options (an architecture option is added by CuPy, or by the CI check).
OPTIONS = ("-std=c++17", "-ftz=true", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")

#: Module name -> (source file, kernel, template parameter names).
MODULES = {
    "distance": ("distance.cu", "compute_distances_kernel", ("T", "Team")),
    "search": ("search.cu", "search_beam_kernel", ("T", "Team", "Capacity")),
    "search_fixed": ("search_fixed.cu", "search_fixed_kernel", ("T", "Team", "Capacity")),
    "topk": ("topk.cu", "select_topk_kernel", ("Capacity",)),
    "merge": ("merge.cu", "gather_merged_kernel", ()),
    "scatter": ("scatter.cu", "scatter_rows_kernel", ("T",)),
}

#: Threads per block of the launches (each kernel's __launch_bounds__; topk: see topk_warps).
SEARCH_BLOCK = 128
FIXED_BLOCK = 64     # kFixedBlock in kernels/search_fixed.cu
DISTANCE_BLOCK = 256
SCATTER_BLOCK = 128
MERGE_BLOCK = 64
#: Registers a thread may use (the launch bounds' minimum blocks per multiprocessor follow from it:
#: 65536 registers / (cap * threads)); the CI check requires every kernel to stay within it without
#: spilling.  search_fixed_kernel is capped at 64, so that 16 of its blocks share a multiprocessor.
MAX_REGISTERS = 128
FIXED_MAX_REGISTERS = 64

#: Storage dtype name -> C++ type of the template parameter T (bfloat16 rows are uint16 arrays of
#: the top halves of fp32 values).
STORAGE_TYPES = {"float32": "float", "float16": "gpuhnsw::half_t", "bfloat16": "gpuhnsw::bf16_t"}
#: The storages search_beam_kernel is instantiated for (bfloat16 rows only search_fixed_kernel reads).
BEAM_STORAGES = ("float32", "float16")
#: Lanes per distance (template parameter Team): search_beam_kernel and compute_distances_kernel;
#: search_fixed_kernel (teams of 8 and more: each lane issues several loads).
TEAM_SIZES = (4, 8, 16, 32)
FIXED_TEAM_SIZES = (8, 16, 32)
#: Beam buffer sizes (template parameter Capacity of search_beam_kernel): max(ef, k) must fit.
SEARCH_CAPACITIES = (32, 64, 128, 256, 512)
#: search_fixed_kernel's beam sizes: the beam passes through one warp's registers, Capacity / 32 a lane.
FIXED_CAPACITIES = (32, 64, 128, 256)
#: Per-warp list sizes of select_topk_kernel: k must fit.
TOPK_CAPACITIES = (32, 64, 128, 256, 512, 1024)
#: Space name -> the kernels' runtime metric id (gpuhnsw::Metric in kernels/common.cuh): the
#: space's code in the C core (ghnsw_space_t), the same numbering.
METRICS = {space: code for code, space in enumerate(SPACES)}

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"\s*$')


# ---------------------------------------------------------------------------------------------
# sources

def kernel_dir():
    """The folder holding the ``.cu`` / ``.cuh`` files.

    Returns
    -------
    pathlib.Path or importlib.resources.abc.Traversable
        ``gpuhnsw/kernels`` of an installed package (package data of ``gpuhnsw.kernels``), else
        the ``kernels/`` folder of the source checkout this module lives in.
    """
    try:
        from importlib.resources import files

        folder = files("gpuhnsw.kernels")
        if folder.joinpath("search.cu").is_file():
            return folder
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if (folder / "search.cu").is_file():
        return folder
    raise FileNotFoundError("gpuhnsw kernel sources not found (neither package gpuhnsw.kernels nor "
                            f"{folder})")


def _read(name):
    return kernel_dir().joinpath(name).read_text(encoding="utf-8")


def _inline(name, seen):
    """Text of `name` with our includes inlined (each header once per source), with #line markers."""
    out = [f'#line 1 "{name}"']
    for lineno, line in enumerate(_read(name).splitlines(), start=1):
        m = _INCLUDE.match(line)
        if m is None:
            out.append(line)
            continue
        header = m.group(1)
        if header in seen:
            out.append(f"// {header}: already included above")
            continue
        seen.add(header)
        out.append(_inline(header, seen))
        out.append(f'#line {lineno + 1} "{name}"')
    return "\n".join(out)


_source_cache = {}


def kernel_source(name):
    """The complete source of module `name` (a key of :data:`MODULES`).

    Our ``#include "x.cuh"`` lines are replaced by the header text (recursively, each header once),
    preceded by ``#line 1 "x.cuh"`` and followed by a ``#line`` back into the including file.
    The kernels include no system header.

    Returns
    -------
    str
    """
    if name not in MODULES:
        raise ValueError(f"unknown kernel module {name!r}; expected one of {sorted(MODULES)}")
    if name not in _source_cache:
        _source_cache[name] = _inline(MODULES[name][0], set()) + "\n"
    return _source_cache[name]


# ---------------------------------------------------------------------------------------------
# instantiation matrix

def instances(name):
    """Every template instantiation of module `name`, as tuples of template arguments (storage
    dtype names for ``T``).

    ``search``: storage (fp32, fp16) x team x capacity (2 x 4 x 5 = 40); ``search_fixed``:
    storage x team x capacity (3 x 3 x 4 = 36); ``distance``: storage x team (3 x 4 = 12);
    ``topk``: capacity (6); ``merge``: one; ``scatter``: storage (3).

    Returns
    -------
    list of tuple
    """
    if name == "search":
        return [(t, team, cap) for t in BEAM_STORAGES for team in TEAM_SIZES for cap in SEARCH_CAPACITIES]
    if name == "search_fixed":
        return [(t, team, cap) for t in STORAGE_TYPES for team in FIXED_TEAM_SIZES for cap in FIXED_CAPACITIES]
    if name == "distance":
        return [(t, team) for t in STORAGE_TYPES for team in TEAM_SIZES]
    if name == "topk":
        return [(cap,) for cap in TOPK_CAPACITIES]
    if name == "merge":
        return [()]
    if name == "scatter":
        return [(t,) for t in STORAGE_TYPES]
    raise ValueError(f"unknown kernel module {name!r}; expected one of {sorted(MODULES)}")


def block_size(name, instance):
    """Threads per block the code launches instantiation `instance` of module `name` with (its
    launch bound)."""
    if name == "topk":
        return 32 * topk_warps(instance[0])
    return {"search": SEARCH_BLOCK, "search_fixed": FIXED_BLOCK, "distance": DISTANCE_BLOCK, "scatter": SCATTER_BLOCK,
            "merge": MERGE_BLOCK}[name]


def max_registers(name):
    """The register cap a thread of module `name` is compiled with (its launch bounds)."""
    return FIXED_MAX_REGISTERS if name == "search_fixed" else MAX_REGISTERS


def topk_warps(capacity):
    """Warps per block of ``select_topk_kernel`` for `capacity`: as many as fit in 48 KiB of
    shared memory, at most 8 (256 threads)."""
    return max(1, min(8, (48 * 1024 - 12 * int(capacity)) // (16 * int(capacity))))


def instance_source(name, instance):
    """The program of one instantiation: ``GPUHNSW_INSTANCE`` (the template arguments as
    declarations), ``GPUHNSW_MAX_THREADS`` and ``GPUHNSW_MIN_BLOCKS`` defined ahead of
    :func:`kernel_source`, so the kernel (``MODULES[name][1]``) has C linkage and launch bounds
    equal to its launch, with room for :func:`max_registers` registers a thread.

    Returns
    -------
    str
    """
    instance = tuple(instance)
    if instance not in instances(name):
        raise ValueError(f"{instance!r} is not an instantiation of module {name!r}")
    decls = " ".join(f"using T = {STORAGE_TYPES[v]};" if p == "T" else f"constexpr int {p} = {int(v)};"
                     for p, v in zip(MODULES[name][2], instance))
    threads = block_size(name, instance)
    return (f"#define GPUHNSW_INSTANCE {decls}\n#define GPUHNSW_MAX_THREADS {threads}\n"
            f"#define GPUHNSW_MIN_BLOCKS {max(1, 65536 // (max_registers(name) * threads))}\n" + kernel_source(name))


# ---------------------------------------------------------------------------------------------
# compilation (CuPy)

#: CuPy's additions to :data:`OPTIONS` for a ``RawKernel``, in order, for NVRTC >= 12 (read in
#: CuPy 13.6 and 14.2): ``_compile_with_cache_cuda`` (cupy/cuda/compiler.py) appends ``-ftz=true``;
#: ``compile_using_nvrtc`` (13.6) / ``_compile_using_nvrtc_no_warning`` (14.2) append the
#: architecture (``-arch=sm_XX``, a cubin, where NVRTC knows the device; else ``compute_XX``) and
#: ``--device-as-default-execution-space``. ``assemble_cupy_compiler_options`` (cupy/_core/core.pyx)
#: also adds include directories (CCCL, CuPy's and the CUDA headers; our kernels include nothing)
#: and ``--std=c++17`` only when no ``-std`` is given.
def nvrtc_options(arch):
    """The complete NVRTC option list CuPy compiles our kernels with, include directories aside.

    Parameters
    ----------
    arch : str, e.g. ``"sm_80"`` (what CuPy passes for a device NVRTC knows) or ``"compute_90"``

    Returns
    -------
    tuple of str
    """
    return OPTIONS + ("-ftz=true", f"-arch={arch}", "--device-as-default-execution-space")


_lock = threading.Lock()
_kernels = {}
_shared_limits = {}


def get_kernel(name, instance, device=None):
    """The compiled kernel of one instantiation of module `name`, compiled (or read from CuPy's disk
    cache) and loaded on `device` at the first call, memoised after.

    Parameters
    ----------
    name : str
        A key of :data:`MODULES`.
    instance : tuple
        One of :func:`instances` (`name`), e.g. ``("float32", 32, 128)`` for ``search``.
    device : int, optional
        Defaults to the current device.

    Returns
    -------
    cupy.RawKernel
        Launch it with the device current and :func:`block_size` threads; its
        ``shared_size_bytes`` is its static shared memory. Static plus dynamic shared memory above
        48 KiB needs ``kernel.max_dynamic_shared_size_bytes`` set first.
    """
    instance = tuple(instance)
    cp = import_cupy()
    device_id = cp.cuda.Device(device).id
    key = (device_id, name, instance)
    kernel = _kernels.get(key)
    if kernel is None:
        source = instance_source(name, instance)  # checks the instance
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                with cp.cuda.Device(device_id):
                    kernel = cp.RawKernel(source, MODULES[name][1], options=OPTIONS)
                    kernel.compile()   # load on this device now, not on whichever is current later
                _kernels[key] = kernel
    return kernel


def shared_limit(device_id):
    """Shared memory one block of device `device_id` may use with the opt-in, in bytes."""
    limit = _shared_limits.get(device_id)
    if limit is None:
        rt = import_cupy().cuda.runtime
        limit = _shared_limits[device_id] = int(rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                                                      device_id))
    return limit


# ---------------------------------------------------------------------------------------------
# compilation without a GPU (NVRTC through cuda-python: the CI checks and benchmarks/nvrtc_cost.py)

def _preload_libnvrtc():
    """Load libnvrtc from the nvidia-cuda-nvrtc wheel, for cuda-python releases that only look on
    the system library path (recent ones find it through cuda-pathfinder). RTLD_LOCAL: the
    library's symbols must not leak into extension modules loaded later in this process."""
    import ctypes
    import glob
    import os
    import sys

    for base in sys.path:
        for sub in ("nvidia/cuda_nvrtc/lib", "nvidia/cu13/lib"):
            for lib in sorted(glob.glob(os.path.join(base, sub, "libnvrtc.so*"))):
                if "builtins" in lib or ".alt." in lib:
                    continue
                try:
                    ctypes.CDLL(lib, mode=ctypes.RTLD_LOCAL)
                    return
                except OSError:
                    continue


def nvrtc_module():
    """cuda-python's NVRTC bindings with a loadable libnvrtc, or None (``pip install
    'gpuhnsw[nvrtc]'``)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            from cuda import nvrtc
        except ImportError:
            return None
    for attempt in range(2):
        try:
            err, _major, _minor = nvrtc.nvrtcVersion()
            return nvrtc if int(err) == 0 else None
        except Exception:  # the bindings are there but did not find libnvrtc: point them at the wheel's
            if attempt:
                return None
            _preload_libnvrtc()
    return None


def nvrtc_compile(name, instance, arch, extra=()):
    """Compile one instantiation with NVRTC as CuPy would (:func:`instance_source`,
    :func:`nvrtc_options` (`arch`) + `extra`), without a GPU.

    Returns
    -------
    (ok, log, seconds) : bool, str (NVRTC's log: errors, warnings, ``-Xptxas=-v`` output), float
    """
    import time

    nvrtc = nvrtc_module()
    if nvrtc is None:
        raise RuntimeError("NVRTC not available: pip install 'gpuhnsw[nvrtc]' (cuda-python + nvidia-cuda-nvrtc)")
    src = instance_source(name, instance).encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, MODULES[name][0].encode(), 0, [], [])
    if int(err):
        raise RuntimeError(f"nvrtcCreateProgram: {err}")
    try:
        opts = [o.encode() for o in nvrtc_options(arch) + tuple(extra)]
        t0 = time.perf_counter()
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        seconds = time.perf_counter() - t0
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = bytearray(size)   # a bytearray: NVRTC writes into it (never a shared bytes object)
        nvrtc.nvrtcGetProgramLog(prog, buf)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    err = result[0] if isinstance(result, tuple) else result
    return int(err) == 0, bytes(buf).rstrip(b"\0 ").decode(errors="replace"), seconds
