"""The thin host path of ``search_fixed_kernel`` (kernels/search_fixed.cu) over one device mirror.

Per call, in the steady state: no device or pinned allocation (buffers are kept per shape and
reused), one launch (three with several blocks per query), no host synchronisation before the one
read-back of the packed results, and nothing that scans the index (the sync before it asks the core
one O(1) question)::

    host queries  -> pinned staging -> device queries     (one asynchronous copy, kept buffers)
    GPU queries   -> used in place (C-contiguous float32), not checked on the host: a row holding
                     NaN or an infinity comes back with status bit 4 and raises ValueError then
    search_fixed_kernel [+ select_topk_kernel + gather_merged_kernel]   on the caller's current
                     stream, after the mirror's last sync (an event), before the next one
    packed results (device) -> pinned -> NumPy             (one read-back)

    packed layout (nq rows, k results; sections 16-byte aligned):
    | ids u64 [nq, k] (labels) or u32 [nq, k] (slots) | dists f32 [nq, k] | found i32 [nq] |
    | status i32 [nq] | counts i32 [nq, 5] (with counts) |

For GPU input the labels (or slots) and distances are the caller's fresh CuPy arrays, and only
found, status (and counts) travel back.  Buffers belong to one call from its upload to its
read-back (a pool per shape: a second thread searching at the same time gets its own set), so
they are rewritten only after the work that used them completed.

Graph capture of the launches for small batches (CUDA graphs) is not done here: the struct of
arguments holds the mirror's array addresses and its count, which a sync changes, and the launch
sequence cannot be checked without a GPU; the device run measures the launch cost first.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import kernels, launch
from .arrays import import_cupy, is_gpu_array

__all__ = ["FixedSearch", "FixedResult", "packed_layout"]

_ALIGN = 16
_KEEP_SHAPES = 8   # shapes whose buffers are kept (the least recently used go first)


def _align(n):
    return -(-n // _ALIGN) * _ALIGN


def packed_layout(nq, k, *, ids, host_results, counts):
    """{section: (offset, dtype, shape)} and the total bytes of one call's packed results: ``ids``
    ``"labels"`` (uint64) or ``"slots"`` (uint32); the ids and distances only with
    ``host_results``; counts (int32 ``[nq, FIXED_COUNTERS]``) only with ``counts``."""
    sections = []
    if host_results:
        sections += [("ids", np.uint64 if ids == "labels" else np.uint32, (nq, k)), ("dists", np.float32, (nq, k))]
    sections += [("found", np.int32, (nq,)), ("status", np.int32, (nq,))]
    if counts:
        sections.append(("counts", np.int32, (nq, launch.FIXED_COUNTERS)))
    out, at = {}, 0
    for name, dtype, shape in sections:
        out[name] = (at, dtype, shape)
        at = _align(at + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return out, at


@dataclass
class FixedResult:
    """One call's answer.  ids: labels uint64 or slots uint32 ``[nq, k]`` and dists float32 ``[nq, k]``
    (NumPy for host queries, CuPy for GPU queries), found / status int32 ``[nq]`` (NumPy), counts
    int32 ``[nq, 5]`` (NumPy) or None: level-0 iterations, lists read and distances, descent hops
    and distances (``gpuhnsw._reference.COUNTS``)."""
    ids: object
    dists: object
    found: np.ndarray
    status: np.ndarray
    counts: np.ndarray | None


class _Buffers:
    """The device and pinned buffers of one shape (rows up to ``rows``, ``k``, blocks per query)."""

    def __init__(self, cp, rows, dim, k, blocks, ws_words):
        nbytes = packed_layout(rows, k, ids="labels", host_results=True, counts=True)[1]
        self.packed = cp.empty(nbytes, dtype=cp.uint8)
        self._pinned = cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        self.host = np.frombuffer(self._pinned, dtype=np.uint8, count=nbytes)
        self._pinned_q = cp.cuda.alloc_pinned_memory(max(4 * rows * dim, 1))
        self.host_q = np.frombuffer(self._pinned_q, dtype=np.float32, count=rows * dim).reshape(rows, dim)
        self.queries = cp.empty((rows, dim), dtype=cp.float32)
        self.done = cp.cuda.Event(disable_timing=True)   # after this set's last kernel
        if blocks > 1:
            self.tile_d = cp.empty((rows, blocks * k), dtype=cp.float32)
            self.tile_s = cp.empty((rows, blocks * k), dtype=cp.uint32)
            self.columns = cp.empty((rows, k), dtype=cp.int64)
            self.workspace = cp.empty((rows, ws_words), dtype=cp.uint32)

    def views(self, nq, k, *, ids, host_results, counts):
        layout, total = packed_layout(nq, k, ids=ids, host_results=host_results, counts=counts)
        dev = {name: self.packed[at:at + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
               for name, (at, dt, shape) in layout.items()}
        host = {name: self.host[at:at + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
                for name, (at, dt, shape) in layout.items()}
        return dev, host, total


class FixedSearch:
    """``search_fixed_kernel`` over ``mirror`` (a :class:`~gpuhnsw.device.mirror.DeviceMirror`), its
    launches planned once per (k, beam, search_width, blocks) and its buffers kept per shape."""

    def __init__(self, mirror):
        self.mirror = mirror
        self._plans = {}
        self._free = {}                 # shape key -> [_Buffers], most recently used key last
        self._lock = threading.Lock()   # the pool (calls may overlap between launch and read-back)
        self._multiprocessors = None

    def _plan(self, k, beam, width, blocks):
        key = (k, beam, width, blocks)
        plan = self._plans.get(key)
        if plan is None:
            m = self.mirror
            plan = self._plans[key] = launch.plan_fixed(m.device, m.dim, m.storage, self._graph()[1], k, beam,
                                                        width, blocks)
        return plan

    def _graph(self):
        """(adjacency, degree) the kernel reads: the mirror's search graph where it keeps one, else
        HNSW level 0 (``links0``, its entries past the degree 0xFFFFFFFF)."""
        m = self.mirror
        return (m.links0, m.M0) if m.search_graph is None else (m.graph, m.search_graph.degree)

    def _take(self, cp, key):
        with self._lock:
            free = self._free.pop(key, [])
            bufs = free.pop() if free else None
            self._free[key] = free                      # most recently used last
            while len(self._free) > _KEEP_SHAPES:
                self._free.pop(next(iter(self._free)))
        if bufs is None:
            rows, k, blocks, ws_words = key
            bufs = _Buffers(cp, rows, self.mirror.dim, k, blocks, ws_words)
        return bufs

    def _give(self, key, bufs):
        with self._lock:
            self._free.setdefault(key, []).append(bufs)

    def blocks_for(self, cp, nq):
        """Blocks per query for a batch of ``nq`` (:func:`launch.fixed_blocks`)."""
        if self._multiprocessors is None:
            props = cp.cuda.runtime.getDeviceProperties(self.mirror.device)
            self._multiprocessors = int(props["multiProcessorCount"])
        return launch.fixed_blocks(nq, self._multiprocessors)

    def launch(self, queries, k, beam, *, search_width=1, filter_bits=None, filter_stride=0, slots=False,
               counts=False):
        """Enqueue one batch (the caller holds the index's lock: the mirror does not change under it).

        Parameters
        ----------
        queries : NumPy float32 ``[nq, dim]`` (validated on the host) or a CuPy float32 C-contiguous
            ``[nq, dim]`` (checked by the kernel)
        k, beam, search_width : the query's (``beam`` = ``max(ef, k)``)
        filter_bits, filter_stride : as :meth:`DeviceMirror.search`
        slots : return slots (uint32) instead of labels
        counts : also the per-query work counters (a debug read-back)

        Returns None where the kernel cannot take the batch (no plan: a beam past 256, ...), else a
        pending call: its ``finish()`` (outside the lock) is the one read-back, the :class:`FixedResult`.
        """
        cp = import_cupy()
        m = self.mirror
        host_input = not is_gpu_array(queries)
        nq = queries.shape[0]
        blocks = self.blocks_for(cp, nq)
        plan, kernel = self._plan(k, beam, search_width, blocks)
        if plan is None:
            return None
        rows = 1 << max(0, (nq - 1).bit_length())       # shapes bucketed by powers of two
        ws_words = launch.workspace_words(plan.global_log2) if blocks > 1 else 0
        key = (rows, k, blocks, ws_words)
        bufs = self._take(cp, key)
        ids = "slots" if slots else "labels"
        dev, host, total = bufs.views(nq, k, ids=ids, host_results=host_input, counts=counts)
        if host_input:
            bufs.host_q[:nq] = queries
            q = bufs.queries[:nq]
            out_ids, out_dists = dev["ids"], dev["dists"]
        else:
            q = queries
            out_ids = cp.empty((nq, k), dtype=cp.uint32 if slots else cp.uint64)
            out_dists = cp.empty((nq, k), dtype=cp.float32)
        stream = m.before_search(cp)
        if host_input:
            q.set(bufs.host_q[:nq], stream=stream)
        if counts:
            dev["counts"].fill(0)
        graph, degree = self._graph()
        common = dict(vectors=m.vectors, graph=graph, upper_start=m.upper_start, upper_links=m.upper_links,
                      levels=m.levels, labels=m.labels, deleted_bits=m.deleted if m.n_deleted > 0 else None, queries=q,
                      filter_bits=filter_bits, filter_stride=filter_stride, out_found=dev["found"],
                      out_status=dev["status"], out_counts=dev["counts"] if counts else None, stride=m.stride,
                      metric=m.metric, degree=degree, m=m.M, n_slots=m.count, entry_point=m.entry_point,
                      max_level=m.max_level, nq=nq, dim=m.dim, k=k, search_width=search_width)
        if blocks == 1:
            launch.search_fixed(plan, kernel, workspace=None, out_slots=out_ids if slots else None,
                                out_dists=out_dists, out_labels=None if slots else out_ids, **common)
        else:
            workspace, tile_d, tile_s, columns = (bufs.workspace[:nq], bufs.tile_d[:nq], bufs.tile_s[:nq],
                                                  bufs.columns[:nq])
            workspace.fill(0)
            launch.search_fixed(plan, kernel, workspace=workspace, out_slots=tile_s, out_dists=tile_d,
                                out_labels=None, **common)
            launch.topk(tile=tile_d, row_stride=blocks * k, col_stride=1, n=blocks * k, index_offset=0,
                        key_scale=1.0, key_bias=None, exclude=None, exclude_key=0.0, prev_dists=None,
                        prev_index=None, nq=nq, k=k, out_dists=out_dists, out_index=columns)
            launch.gather_merged(kernels.get_kernel("merge", (), m.device), columns=columns, tile_slots=tile_s,
                                 tile_ld=blocks * k, labels=m.labels, workspace=workspace, ws_ld=ws_words, nq=nq, k=k,
                                 dists=out_dists, out_slots=out_ids if slots else None,
                                 out_labels=None if slots else out_ids, out_found=dev["found"],
                                 out_status=dev["status"])
        m.after_search(stream, bufs.done)
        return _Pending(self, key, bufs, host, total, out_ids, out_dists, host_input, counts)


class _Pending:
    """A launched call, until its read-back."""

    def __init__(self, owner, key, bufs, host, total, out_ids, out_dists, host_input, counts):
        self.owner, self.key, self.bufs, self.host, self.total = owner, key, bufs, host, total
        self.out_ids, self.out_dists, self.host_input, self.counts = out_ids, out_dists, host_input, counts

    def finish(self):
        try:
            self.bufs.packed[:self.total].get(out=self.bufs.host[:self.total])   # blocks until the kernels ran
            h = self.host
            if self.host_input:
                ids, dists = np.array(h["ids"]), np.array(h["dists"])
            else:
                ids, dists = self.out_ids, self.out_dists
            return FixedResult(ids, dists, np.array(h["found"]), np.array(h["status"]),
                               np.array(h["counts"]) if self.counts else None)
        finally:
            self.owner._give(self.key, self.bufs)
