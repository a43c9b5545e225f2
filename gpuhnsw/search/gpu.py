"""The GPU side of one GPU ``Index``: its device mirror, the lock that orders syncs and launches, the
GPU leg of its queries and the candidate search of its GPU-assisted inserts.

The GPU leg answers what the kernel can and returns the rest: the rows whose fixed-size buffers
bit (the kernel's status) come back as ``unanswered`` for the planner to send to the CPU leg; it
never calls back into the index.  Device failures (out of memory, a launch or driver error, a
kernel that does not compile) become :class:`~gpuhnsw.DeviceError`; the mirror is dropped and
rebuilt from the intact C core at the next call, so nothing is lost.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from .._core import INVALID_SLOT
from .._errors import DeviceError
from .._validate import as_matrix, as_vectors
from ..device.arrays import as_cupy, import_cupy, is_gpu_array
from ..device.kernels import SEARCH_CAPACITIES
from ..device.mirror import DeviceMirror
from ..device.ops import batch_neighbours
from .params import SearchResult

__all__ = ["DeviceSearch", "device_matrix"]


def device_matrix(data, dim):
    """A GPU array as a C-contiguous float32 CuPy matrix ``[n, dim]``, validated on the device."""
    cp = import_cupy()
    arr = as_cupy(data)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"query must be a real numeric array, got dtype {arr.dtype}")
    arr = cp.ascontiguousarray(as_matrix(arr, dim, "query"), dtype=cp.float32)
    if arr.size and not bool(cp.isfinite(arr).all()):
        raise ValueError("query holds NaN or infinite values")
    return arr


class DeviceSearch:
    """The GPU side of one ``Index`` (see the module docstring).

    The core is passed to every call (``load_index`` and ``init_index`` replace it; the mirror is
    rebuilt when it changed).
    """

    def __init__(self, ordinal, storage):
        self.ordinal, self.storage = int(ordinal), storage
        self.mirror = None
        self._lock = threading.Lock()   # one sync + launch at a time

    @contextlib.contextmanager
    def _guard(self):
        cp = import_cupy()
        oom = cp.cuda.memory.OutOfMemoryError
        failures = (oom, cp.cuda.driver.CUDADriverError, cp.cuda.runtime.CUDARuntimeError,
                    cp.cuda.compiler.CompileException)
        try:
            with cp.cuda.Device(self.ordinal):
                yield cp
        except failures as exc:
            self.mirror = None
            what = "out of memory" if isinstance(exc, oom) else "error"
            hint = "free GPU memory, use storage='float16', or " if isinstance(exc, oom) else ""
            raise DeviceError(f"GPU {what} ({type(exc).__name__}: {exc}); the index is intact on the "
                              f"CPU: {hint}query with device='cpu'") from None

    def _mirror_of(self, core):
        if self.mirror is None or self.mirror.core is not core:
            self.mirror = DeviceMirror(core, device=self.ordinal, storage=self.storage)
        return self.mirror

    def sync(self, core):
        """Bring the mirror of ``core`` up to date; returns the sync's ``SyncStats``."""
        with self._guard(), self._lock:
            return self._mirror_of(core).sync()

    def search_graph(self, core, data, params, allowed):
        """The GPU leg: search the rows of ``data`` (NumPy-convertible or GPU array ``[nq, dim]``)
        under ``allowed`` (uint32 bitset words of the allowed slots, ``[words]`` for every query or
        ``[nq, words]``, or None).

        Returns None where the kernel cannot take the query (a beam beyond its largest capacity,
        no launch that fits this device), else (``SearchResult``, unanswered int64 ``[u]``: the
        rows whose fixed-size buffers bit, to be answered on the CPU). Labels and distances are
        CuPy arrays for GPU input, NumPy otherwise.
        """
        if params.beam > SEARCH_CAPACITIES[-1]:
            return None
        gpu_input = is_gpu_array(data)
        k = params.k
        with self._guard() as cp:
            q = device_matrix(data, int(core.dim)) if gpu_input else \
                cp.asarray(as_vectors(data, int(core.dim), what="query"))
            nq = q.shape[0]
            if k == 0 or nq == 0:
                labels, dists = cp.empty((nq, k), dtype=cp.uint64), cp.empty((nq, k), dtype=cp.float32)
                found, unanswered = np.zeros(nq, dtype=np.int32), np.zeros(0, dtype=np.int64)
            else:
                bits = None if allowed is None else cp.asarray(allowed)
                stride = 0 if allowed is None or allowed.ndim == 1 else allowed.shape[1]
                with self._lock:
                    mirror = self._mirror_of(core)
                    mirror.sync()
                    out = mirror.search(q, k, params.beam, search_width=params.search_width, filter_bits=bits,
                                        filter_stride=stride)
                if out is None:   # no launch fits this device
                    return None
                labels, dists, info = out
                found, status = cp.asnumpy(info)   # the one read-back before the results
                if (found < 0).any():
                    raise DeviceError("the search kernel rejected its launch configuration (see kernels/search.cu)")
                unanswered = np.flatnonzero(status)
            if not gpu_input:
                labels, dists = cp.asnumpy(labels), cp.asnumpy(dists)
        return SearchResult(labels, dists, found), unanswered

    def insert_candidates(self, core, chunk, space):
        """Level-0 candidates of the rows of ``chunk`` (float32 ``[b, dim]``) for GPU-assisted
        insertion: graph slots uint32 ``[b, ef_construction]`` from the search kernel, and batch
        rows uint32 ``[b, M0]``, exact nearest within the chunk (``INVALID_SLOT`` pads both); None
        where no search launch fits the device. The chunk is uploaded once; both searches read it."""
        kc = min(int(core.ef_construction), SEARCH_CAPACITIES[-1])
        b = chunk.shape[0]
        kb = min(int(core.M0), b - 1)
        batch = np.full((b, max(kb, 1)), INVALID_SLOT, dtype=np.uint32)
        with self._guard() as cp:
            rows = cp.asarray(chunk)
            with self._lock:
                mirror = self._mirror_of(core)
                mirror.sync()
                out = mirror.search(rows, kc, kc, slots=True)
            if out is None:   # no launch fits this device: the caller inserts on the CPU
                return None
            graph = cp.asnumpy(out[0])
            if kb > 0:
                batch[:, :kb] = batch_neighbours(cp, rows, kb, space)
        return np.ascontiguousarray(graph, dtype=np.uint32), batch
