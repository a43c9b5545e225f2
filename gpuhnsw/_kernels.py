"""The one loader of gpuhnsw's CUDA kernels (``kernels/*.cu``), compiled at run time by NVRTC.

Everything about compilation lives here:

* where the sources are (``gpuhnsw/kernels`` when installed, ``<repo>/kernels`` in a checkout);
* :func:`kernel_source`: the ``.cu`` file with our ``#include "x.cuh"`` headers inlined
  (recursively, each once), each preceded by ``#line 1 "x.cuh"`` so compiler errors name the
  real file. Inlining matters beyond convenience: CuPy keys its on-disk cache on the source text
  and options, not on headers found through ``-I``, so a header edit would otherwise be ignored;
* :data:`OPTIONS`: the NVRTC options (also used by the CI compile check, tests/test_kernels_nvrtc.py);
* :func:`name_expressions`: the full template instantiation matrix, generated in one place;
* :func:`get_kernel`: a ``cupy.RawKernel`` for one instantiation, modules memoised per
  (device id, module name);
* the launch arithmetic the kernels' shared-memory drawings describe (``*_shared_bytes``,
  :func:`team_size`, :func:`beam_capacity`).

CuPy is imported lazily: this module imports (and :func:`kernel_source`, :func:`name_expressions`
work) without CuPy.

Floating point. :data:`OPTIONS` asks for IEEE behaviour: no ``--use_fast_math``, denormals kept
(``-ftz=false``; CuPy's ElementwiseKernels flush them, our RawModule does not), correctly rounded
division and square root. FMA contraction stays on (``-fmad=true``), as in the C core's AVX2 and
AVX-512 kernels. GPU and CPU distances still differ in the last bits (different summation order),
so tests compare them with a relative tolerance (about 1e-4 on distances; result sets equal for
>= 99 % of queries, allowing for flipped exact ties), never bit for bit.

Compile cost: NVRTC builds the whole search module (40 instantiations) in about 13 s, once per
machine and architecture (CuPy caches the result on disk, keyed on source and options).
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

__all__ = [
    "OPTIONS", "MODULES", "STORAGE_TYPES", "TEAM_SIZES", "SEARCH_CAPACITIES", "TOPK_CAPACITIES",
    "METRICS", "kernel_source", "name_expressions", "get_kernel", "kernel_dir", "team_size",
    "beam_capacity", "topk_capacity", "search_expr", "distance_expr", "topk_expr", "scatter_expr",
    "row_stride",
    "search_shared_bytes", "search_hash_log2", "distance_shared_bytes", "topk_shared_bytes", "topk_warps",
]

#: NVRTC options of every module (an architecture option is added by CuPy, or by the CI check).
OPTIONS = ("-std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")

#: Module name -> source file under the kernel folder.
MODULES = {"distance": "distance.cu", "search": "search.cu", "topk": "topk.cu", "scatter": "scatter.cu"}

#: Storage dtype name -> C++ type of the template parameter T.
STORAGE_TYPES = {"float32": "float", "float16": "gpuhnsw::half_t"}
#: Lanes per distance (template parameter Team).
TEAM_SIZES = (4, 8, 16, 32)
#: Beam buffer sizes (template parameter Capacity of search_beam_kernel): max(ef, k) must fit.
SEARCH_CAPACITIES = (32, 64, 128, 256, 512)
#: Per-warp list sizes of select_topk_kernel: k must fit.
TOPK_CAPACITIES = (32, 64, 128, 256, 512, 1024)
#: Metric name -> the kernels' runtime metric id (gpuhnsw::Metric in kernels/common.cuh).
METRICS = {"l2": 0, "ip": 1, "cosine": 2}

#: Bytes of one storage element.
_ELEMENT_BYTES = {"float32": 4, "float16": 2}

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
    """The complete source of module `name` (``"distance"``, ``"search"``, ``"topk"``).

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
        _source_cache[name] = _inline(MODULES[name], set()) + "\n"
    return _source_cache[name]


# ---------------------------------------------------------------------------------------------
# instantiation matrix

def search_expr(dtype, team, capacity):
    """Name expression of ``search_beam_kernel`` for storage `dtype` ("float32"/"float16")."""
    return f"search_beam_kernel<{STORAGE_TYPES[dtype]}, {int(team)}, {int(capacity)}>"


def distance_expr(dtype, team):
    """Name expression of ``compute_distances_kernel``."""
    return f"compute_distances_kernel<{STORAGE_TYPES[dtype]}, {int(team)}>"


def topk_expr(capacity):
    """Name expression of ``select_topk_kernel``."""
    return f"select_topk_kernel<{int(capacity)}>"


def scatter_expr(dtype):
    """Name expression of ``scatter_rows_kernel`` (device storage `dtype`)."""
    return f"scatter_rows_kernel<{STORAGE_TYPES[dtype]}>"


def name_expressions(name):
    """Every template instantiation of module `name`, as NVRTC name expressions.

    ``search``: storage x team x capacity (2 x 4 x 5 = 40); ``distance``: storage x team (8);
    ``topk``: capacity (6); ``scatter``: storage (2).

    Returns
    -------
    list of str
    """
    if name == "search":
        return [search_expr(t, team, cap) for t in STORAGE_TYPES for team in TEAM_SIZES
                for cap in SEARCH_CAPACITIES]
    if name == "distance":
        return [distance_expr(t, team) for t in STORAGE_TYPES for team in TEAM_SIZES]
    if name == "topk":
        return [topk_expr(cap) for cap in TOPK_CAPACITIES]
    if name == "scatter":
        return [scatter_expr(t) for t in STORAGE_TYPES]
    raise ValueError(f"unknown kernel module {name!r}; expected one of {sorted(MODULES)}")


# ---------------------------------------------------------------------------------------------
# launch arithmetic (mirrors the shared-memory drawings in kernels/*.cu)

def row_stride(dim, dtype="float32"):
    """Elements per stored row: `dim` rounded up to a whole number of 16-byte chunks."""
    per_chunk = 16 // _ELEMENT_BYTES[dtype]
    return -(-int(dim) // per_chunk) * per_chunk


def team_size(dim, dtype="float32"):
    """Lanes per distance for rows of `dim` elements: the smallest power of two >= the number of
    16-byte chunks, clamped to [4, 32] (128 fp32 dims -> 32 chunks -> a full warp)."""
    chunks = row_stride(dim, dtype) * _ELEMENT_BYTES[dtype] // 16
    team = 4
    while team < chunks and team < 32:
        team *= 2
    return team


def _bucket(n, buckets, what):
    for cap in buckets:
        if n <= cap:
            return cap
    raise ValueError(f"{what} = {n} exceeds the largest kernel capacity {buckets[-1]}")


def beam_capacity(ef, k, filtered=False):
    """The search capacity bucket for max(ef, k) (ValueError when none holds it).

    Beam mode: the smallest bucket holding max(ef, k). Filtered mode (a filter or deletions): the
    buffer is the pending-candidate list, which hnswlib's search lets grow past ef, so ask for
    4 * max(ef, k), as far as the largest bucket allows.
    """
    limit = max(int(ef), int(k))
    cap = _bucket(limit, SEARCH_CAPACITIES, "max(ef, k)")
    if filtered:
        cap = max(cap, min(_pow2_ceil(4 * limit), SEARCH_CAPACITIES[-1]))
    return cap


def topk_capacity(k):
    """The smallest top-k capacity bucket holding k (ValueError when none does)."""
    return _bucket(int(k), TOPK_CAPACITIES, "k")


def search_hash_log2(capacity, search_width, m0, min_log2=10):
    """log2 of the visited-hash size: half of it must hold 2 * capacity + search_width * m0
    (the beam and results after a reset, plus one iteration's insertions)."""
    need = 2 * (2 * int(capacity) + int(search_width) * int(m0))
    log2 = max(int(min_log2), 5)
    while (1 << log2) < need:
        log2 += 1
    return log2


def _pow2_ceil(n):
    p = 1
    while p < n:
        p *= 2
    return p


def search_shared_bytes(stride, search_width, m0, m, hash_log2):
    """Dynamic shared memory of ``search_beam_kernel`` in bytes (see kernels/search.cu): the query,
    two candidate buffers of pow2_ceil(max(search_width * m0, m)) pairs, the visited hash. The beam
    and result lists are static shared memory (16 * Capacity bytes)."""
    cand = _pow2_ceil(max(int(search_width) * int(m0), int(m), 1))
    return 4 * (int(stride) + 4 * cand + (1 << int(hash_log2)))


def distance_shared_bytes(stride):
    """Dynamic shared memory of ``compute_distances_kernel`` in bytes: the fp32 query row."""
    return 4 * int(stride)


def topk_warps(capacity):
    """Warps per block of ``select_topk_kernel`` for `capacity`: as many as fit in 48 KiB of
    shared memory, at most 8 (256 threads)."""
    return max(1, min(8, (48 * 1024 - 12 * int(capacity)) // (16 * int(capacity))))


def topk_shared_bytes(capacity, n_warps):
    """Dynamic shared memory of ``select_topk_kernel`` in bytes (see kernels/topk.cu): the running
    result (12 bytes per entry) and, per warp, a list and a buffer of `capacity` pairs."""
    return 12 * int(capacity) + 16 * int(n_warps) * int(capacity)


# ---------------------------------------------------------------------------------------------
# compilation (CuPy)

_lock = threading.Lock()
_modules = {}
_kernels = {}


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        from ._errors import DeviceError

        raise DeviceError("GPU kernels need CuPy (pip install 'gpuhnsw[cuda12]' or 'gpuhnsw[cuda13]')") from e
    return cupy


def _module(name, device_id):
    key = (device_id, name)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            cp = _cupy()
            with cp.cuda.Device(device_id):
                mod = cp.RawModule(code=kernel_source(name), options=OPTIONS,
                                   name_expressions=name_expressions(name))
                mod.compile()  # load on this device now, not on whichever is current later
            _modules[key] = mod
    return mod


def get_kernel(name, expr, device=None):
    """A compiled kernel of module `name` for one name expression.

    Parameters
    ----------
    name : str
        ``"distance"``, ``"search"`` or ``"topk"``.
    expr : str
        One of :func:`name_expressions` (`name`), e.g. ``search_expr("float32", 32, 128)``.
    device : int or cupy.cuda.Device, optional
        Defaults to the current device.

    Returns
    -------
    cupy.RawKernel
        Launch it with the device current; kernels needing more than 48 KiB of dynamic shared
        memory need ``kernel.max_dynamic_shared_size_bytes`` set first.
    """
    if expr not in name_expressions(name):
        raise ValueError(f"{expr!r} is not an instantiation of module {name!r}")
    cp = _cupy()
    device_id = cp.cuda.Device(device).id if device is not None else cp.cuda.Device().id
    key = (device_id, name, expr)
    kernel = _kernels.get(key)
    if kernel is None:
        mod = _module(name, device_id)
        with cp.cuda.Device(device_id):
            kernel = mod.get_function(expr)
        with _lock:
            _kernels[key] = kernel
    return kernel
