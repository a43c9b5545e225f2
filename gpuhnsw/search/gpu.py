"""The GPU side of one GPU ``Index``: its device mirror, the lock that orders syncs and launches, the
GPU leg of its queries and the candidate search of its GPU-assisted inserts.

Two search kernels, one switch (``device.launch.search_kernel``: the environment's
``GHNSW_SEARCH_KERNEL``, read when the index is made): ``"beam"`` (``search_beam_kernel``, the
default) and ``"fixed"`` (``search_fixed_kernel`` through ``device.query.FixedSearch``: the thin host
path).  Where the fixed kernel cannot take a batch (a beam past 256, a search_width past 8) the beam
kernel answers it; bfloat16 rows only the fixed kernel reads (beyond its limits the CPU answers).
With ``search_graph="optimized"`` the mirror keeps the search graph (``gpuhnsw._search_graph``) in
step and the fixed kernel reads it; the beam kernel, where it answers instead, reads HNSW level 0.

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
from .._validate import as_matrix, as_vectors, not_finite
from ..device import launch
from ..device.arrays import as_cupy, import_cupy, is_gpu_array
from ..device.kernels import BEAM_STORAGES, SEARCH_CAPACITIES, STORAGE_TYPES
from ..device.mirror import DeviceMirror
from ..device.ops import batch_neighbours
from ..device.query import FixedSearch
from .params import SearchResult

__all__ = ["DeviceSearch", "device_matrix", "STORAGES"]

#: Device row storages an index may ask for (``Index(..., gpu_storage=)``).
STORAGES = tuple(STORAGE_TYPES)


def device_matrix(data, dim, check_finite=True):
    """A GPU array as a C-contiguous float32 CuPy matrix ``[n, dim]``, validated on the device
    (NaN and infinities too unless ``check_finite`` is off: the fixed kernel checks them itself,
    without the host waiting for the device here)."""
    cp = import_cupy()
    arr = as_cupy(data)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"query must be a real numeric array, got dtype {arr.dtype}")
    arr = cp.ascontiguousarray(as_matrix(arr, dim, "query"), dtype=cp.float32)
    if check_finite:
        _check_finite(cp, arr)
    return arr


def _check_finite(cp, arr):
    """ValueError where the CuPy matrix ``arr`` holds NaN or infinities (the host waits here)."""
    if arr.size and not bool(cp.isfinite(arr).all()):
        raise ValueError("query holds NaN or infinite values")


class DeviceSearch:
    """The GPU side of one ``Index`` (see the module docstring).

    The core is passed to every call (``load_index`` and ``init_index`` replace it; the mirror is
    rebuilt when it changed).
    """

    def __init__(self, ordinal, storage, search_graph="hnsw"):
        self.ordinal, self.storage = int(ordinal), storage
        self.kernel = launch.search_kernel(storage, search_graph)
        self.graph = None   # the index's SearchGraph ("optimized"), set with its core; None: HNSW level 0
        self.mirror = self.fixed = None
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
            hint = "free GPU memory, use gpu_storage='float16', or " if isinstance(exc, oom) else ""
            raise DeviceError(f"GPU {what} ({type(exc).__name__}: {exc}); the index is intact on the "
                              f"CPU: {hint}query with device='cpu'") from None

    def _mirror_of(self, core):
        if self.mirror is None or self.mirror.core is not core:
            self.mirror = DeviceMirror(core, device=self.ordinal, storage=self.storage, search_graph=self.graph)
            self.fixed = FixedSearch(self.mirror)
        return self.mirror

    def _launch(self, cp, core, q, k, beam, search_width, bits, stride, slots):
        """Sync, then enqueue the search of ``q`` (NumPy for the fixed kernel's host path, else CuPy)
        under the lock.  Returns ("fixed", pending call), ("beam", (ids, dists, info)) or None where
        no kernel takes the batch."""
        with self._lock:
            mirror = self._mirror_of(core)
            mirror.sync()
            if self.kernel == "fixed":
                pending = self.fixed.launch(q, k, beam, search_width=search_width, filter_bits=bits,
                                            filter_stride=stride, slots=slots)
                if pending is not None:
                    return "fixed", pending
                if is_gpu_array(q):   # GPU queries were left for the fixed kernel's status bit to check
                    _check_finite(cp, q)
            if self.storage not in BEAM_STORAGES:
                return None
            out = mirror.search(cp.asarray(q), k, beam, search_width=search_width, filter_bits=bits,
                                filter_stride=stride, slots=slots)
            return None if out is None else ("beam", out)

    def sync(self, core):
        """Bring the mirror of ``core`` up to date; returns the sync's ``SyncStats``."""
        with self._guard(), self._lock:
            return self._mirror_of(core).sync()

    def graph_copy(self, core):
        """The search graph of ``core`` brought in step (a sync), copied under the lock: (forward
        uint32 [count], rows uint32 [count, D])."""
        with self._guard(), self._lock:
            self._mirror_of(core).sync()
            g = self.graph
            return g.forward[:g.count].copy(), g.rows[:g.count].copy()

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
            # host queries are checked on the host; GPU queries by the fixed kernel (its status bit)
            q = device_matrix(data, int(core.dim), check_finite=self.kernel != "fixed") if gpu_input else \
                as_vectors(data, int(core.dim), what="query")
            nq = q.shape[0]
            if k == 0 or nq == 0:
                empty = cp.empty if gpu_input else np.empty
                labels, dists = empty((nq, k), dtype=np.uint64), empty((nq, k), dtype=np.float32)
                return SearchResult(labels, dists, np.zeros(nq, dtype=np.int32)), np.zeros(0, dtype=np.int64)
            bits = None if allowed is None else cp.asarray(allowed)
            stride = 0 if allowed is None or allowed.ndim == 1 else allowed.shape[1]
            chosen = self._launch(cp, core, q, k, params.beam, params.search_width, bits, stride, False)
            if chosen is None:   # no kernel takes it on this device
                return None
            if chosen[0] == "fixed":
                res = chosen[1].finish()   # the one read-back
                labels, dists, found, status = res.ids, res.dists, res.found, res.status
            else:
                labels, dists, info = chosen[1]
                found, status = cp.asnumpy(info)   # the one read-back before the results
                if not gpu_input:
                    labels, dists = cp.asnumpy(labels), cp.asnumpy(dists)
            if (found < 0).any():
                raise DeviceError(f"the search kernel ({self.kernel}) rejected its launch configuration "
                                  "(see kernels/search.cu, kernels/search_fixed.cu)")
            bad = np.flatnonzero(status & launch.STATUS_BAD_QUERY)
            if bad.size:
                raise not_finite("query", int(bad[0]))
            unanswered = np.flatnonzero(status)
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
            chosen = self._launch(cp, core, rows, kc, kc, 1, None, 0, True)
            if chosen is None:   # no kernel takes it on this device: the caller inserts on the CPU
                return None
            graph = chosen[1].finish().ids if chosen[0] == "fixed" else chosen[1][0]
            graph = cp.asnumpy(graph)
            if kb > 0:
                batch[:, :kb] = batch_neighbours(cp, rows, kb, space)
        return np.ascontiguousarray(graph, dtype=np.uint32), batch
