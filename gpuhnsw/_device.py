"""The device mirror of a C core's graph (DESIGN section 4): CuPy arrays kept in step by deltas.

``DeviceMirror(core).sync()``:

1. takes the core's dirty-row log (``drain_dirty``: ascending slots, cleared atomically with respect
   to inserters), adds the slots created since the last sync, reads the entry point;
2. grows the device arrays by doubling when the core's capacity passed theirs;
3. gathers those rows (``gather_rows``: vector, level-0 links, degree, label, level) into one pinned
   staging buffer, copies it to the device in one transfer and scatters it with one kernel
   (``kernels/scatter.cu``), chunk by chunk;
4. when a slot with upper levels changed, rebuilds the upper-level blocks (about N/M slots) and
   their per-slot index; uploads the deleted bitset when it changed.

Cost: O(changed rows), plus O(N/M) when an upper level changed and O(capacity/32) words to compare
the deleted bitset. A query sees the graph as of its sync (snapshot semantics): rows written after
the drain are dirty again and go with the next sync.

Device arrays (slot = row; see kernels/README.md)::

    vectors      [capacity, stride]  float32 | float16 (stride: dim rounded up to 16 bytes)
    links0       [capacity, M0]      uint32
    degree0      [capacity]          uint32
    labels       [capacity]          uint64
    upper_start  [capacity]          uint32 offset into upper_links, 0xFFFFFFFF: level 0
    upper_links  [total]             uint32 the core's per-slot blocks, level L of slot s at
                                     upper_start[s] + (L-1)*(M+1) = [count, M ids]
    deleted      [ceil(capacity/32)] uint32 bitset

CuPy is imported lazily; nothing here runs without a GPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import _kernels

__all__ = ["DeviceMirror", "SyncStats"]

INVALID = 0xFFFFFFFF
_CHUNK_BYTES = 64 << 20   # staging buffer size bound: rows per transfer = this / bytes per row
_ALIGN = 16


def _align(n):
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class SyncStats:
    """What syncs moved (cumulative on ``DeviceMirror.stats``, per call as ``sync()``'s result)."""
    syncs: int = 0
    rows: int = 0            # rows scattered
    bytes: int = 0           # host -> device bytes (staging, upper blocks, bitset)
    grows: int = 0           # capacity doublings
    upper_rebuilds: int = 0
    seconds: float = 0.0
    last: dict = field(default_factory=dict)

    def add(self, other):
        for name in ("syncs", "rows", "bytes", "grows", "upper_rebuilds", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _Staging:
    """One pinned host buffer and its device twin. A batch of r rows is laid out compactly, each
    section 16-byte aligned, so the batch goes up in one copy of exactly its bytes::

        slots u32[r] | degree u32[r] | labels u64[r] | links u32[r, M0] | vectors f32[r, dim_pad] || levels u8[r]

    (levels stay on the host: only the upper-level bookkeeping needs them)."""

    def __init__(self, cp, nbytes):
        self.nbytes = nbytes
        self._pinned = cp.cuda.alloc_pinned_memory(nbytes)
        self.host = np.frombuffer(self._pinned, dtype=np.uint8, count=nbytes)
        self.device = cp.empty(nbytes, dtype=cp.uint8)

    @staticmethod
    def layout(r, m0, dim_pad):
        """{section: (offset, dtype, shape)} and the bytes to upload / in all."""
        sections = [("slots", np.uint32, (r,)), ("degree", np.uint32, (r,)), ("labels", np.uint64, (r,)),
                    ("links", np.uint32, (r, m0)), ("vectors", np.float32, (r, dim_pad)), ("levels", np.uint8, (r,))]
        out, at, upload = {}, 0, 0
        for name, dtype, shape in sections:
            out[name] = (at, dtype, shape)
            at += int(np.prod(shape)) * np.dtype(dtype).itemsize
            if name == "vectors":
                upload = at
            at = _align(at)
        return out, upload, at

    def views(self, cp, layout):
        host, dev = {}, {}
        for name, (at, dtype, shape) in layout.items():
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            host[name] = self.host[at:at + n].view(dtype).reshape(shape)
            dev[name] = self.device[at:at + n].view(dtype)
        return host, dev


class DeviceMirror:
    """Device copy of `core`'s graph, refreshed by :meth:`sync`.

    Parameters
    ----------
    core : gpuhnsw._core.Core
    device : int, the CUDA device
    storage : "float32" or "float16", the device storage of the vectors (fp16 halves the memory and
        the bandwidth of every distance; distances are still accumulated in fp32)
    """

    def __init__(self, core, *, device=0, storage="float32"):
        if storage not in _kernels.STORAGE_TYPES:
            raise ValueError(f"storage must be one of {sorted(_kernels.STORAGE_TYPES)}")
        self.core, self.device, self.storage = core, int(device), storage
        self.dim, self.dim_pad, self.M, self.M0 = int(core.dim), int(core.dim_pad), int(core.M), int(core.M0)
        self.metric = _kernels.METRICS[core.space]
        self.stride = _kernels.row_stride(self.dim, storage)
        self.capacity = 0
        self.count = 0                     # slots in use as of the last sync
        self.entry_point, self.max_level = -1, -1
        self.n_deleted = 0
        self.vectors = self.links0 = self.degree0 = self.labels = None
        self.upper_start = self.upper_links = self.deleted = None
        self.stats = SyncStats()
        self._levels = np.zeros(0, dtype=np.uint8)   # host: level of every synced slot
        self._upper = {}                              # host: slot -> uint32 block, level > 0 only
        self._deleted_host = None
        self._staging = None

    # ------------------------------------------------------------------ sync

    def sync(self):
        """Bring the device arrays up to date with the core. Returns this call's :class:`SyncStats`."""
        cp = _kernels._cupy()
        t0 = time.perf_counter()
        st = SyncStats(syncs=1)
        with cp.cuda.Device(self.device):
            dirty = np.frombuffer(self.core.drain_dirty(), dtype=np.uint32)
            entry = int(self.core.entry_point)     # read after the drain, count after the entry:
            count = int(self.core.count)           # the entry's row is dirty or below count
            st.grows = self._ensure_capacity(int(self.core.max_elements))
            fresh = np.arange(self.count, count, dtype=np.uint32)
            slots = np.union1d(dirty, fresh).astype(np.uint32)   # ascending, unique
            if self._levels.size < count:
                self._levels = np.concatenate([self._levels, np.zeros(count - self._levels.size, np.uint8)])
            upper_changed = []
            per_row = 4 * (4 + self.M0 + self.dim_pad) + 1
            chunk = max(1, min(len(slots), _CHUNK_BYTES // per_row))
            for start in range(0, len(slots), chunk):
                part = slots[start:start + chunk]
                st.bytes += self._scatter(cp, part)
                levels = self._levels[part]
                upper_changed.extend(part[(levels > 0) | np.isin(part, list(self._upper))].tolist())
            st.rows = len(slots)
            if upper_changed:
                st.bytes += self._rebuild_upper(cp, upper_changed)
                st.upper_rebuilds = 1
            st.bytes += self._sync_deleted(cp)
            self.count = count
            self.entry_point = entry if 0 <= entry < count else -1
            self.max_level = int(self._levels[entry]) if self.entry_point >= 0 else -1
        st.seconds = time.perf_counter() - t0
        st.last = {"rows": st.rows, "bytes": st.bytes}
        self.stats.add(st)
        self.stats.last = st.last
        return st

    def _ensure_capacity(self, needed):
        """Allocate (first sync) or double the device arrays until they hold `needed` slots."""
        if needed <= self.capacity:
            return 0
        cp = _kernels._cupy()
        new = max(needed, 2 * self.capacity, 1024)
        dtype = np.float32 if self.storage == "float32" else np.float16
        old = (self.vectors, self.links0, self.degree0, self.labels, self.upper_start, self.deleted)
        self.vectors = cp.zeros((new, self.stride), dtype=dtype)
        self.links0 = cp.full((new, self.M0), INVALID, dtype=cp.uint32)
        self.degree0 = cp.zeros(new, dtype=cp.uint32)
        self.labels = cp.full(new, np.iinfo(np.uint64).max, dtype=cp.uint64)
        self.upper_start = cp.full(new, INVALID, dtype=cp.uint32)
        self.deleted = cp.zeros((new + 31) // 32, dtype=cp.uint32)
        if self.upper_links is None:
            self.upper_links = cp.zeros(1, dtype=cp.uint32)   # a valid pointer while there is none
        if self.capacity:
            c = self.capacity
            for dst, src in zip((self.vectors, self.links0, self.degree0, self.labels, self.upper_start), old):
                dst[:c] = src
            self.deleted[:old[5].size] = old[5]
        grown = 1 if self.capacity else 0
        self.capacity = new
        return grown

    def _scatter(self, cp, part):
        """Gather rows `part` into the staging buffer, upload them in one copy, scatter them with
        one kernel. Returns the bytes copied."""
        r = len(part)
        layout, upload, total = _Staging.layout(r, self.M0, self.dim_pad)
        if self._staging is None or self._staging.nbytes < total:
            self._staging = _Staging(cp, max(total, 1 << 20))
        host, dev = self._staging.views(cp, layout)
        host["slots"][:] = part
        self.core.gather_rows(host["slots"], host["vectors"], host["links"], host["degree"], host["labels"],
                              host["levels"])
        self._levels[part] = host["levels"]
        self._staging.device[:upload].set(self._staging.host[:upload])  # synchronous: host reusable after
        kernel = _kernels.get_kernel("scatter", _kernels.scatter_expr(self.storage), self.device)
        kernel((min(r, 65535),), (128,),
               (np.int32(r), dev["slots"], dev["degree"], dev["labels"], dev["links"], dev["vectors"],
                np.int32(self.M0), np.int32(self.dim_pad), self.vectors, np.int32(self.stride), self.links0,
                self.degree0, self.labels))
        return upload

    def _upper_blocks(self, slots):
        """{slot: block} for `slots` (level > 0 ones), from the core."""
        slots = np.asarray(slots, dtype=np.uint32)
        levels = self._levels[slots].astype(np.int64)
        sizes = levels * (1 + self.M)
        flat = np.frombuffer(self.core.gather_upper(slots), dtype=np.uint32)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        return {int(s): flat[a:a + n].copy() for s, a, n in zip(slots, starts, sizes) if n > 0}

    def _rebuild_upper(self, cp, changed):
        """Refresh the changed slots' blocks, then lay all blocks out again in slot order."""
        changed = np.unique(np.asarray(changed, dtype=np.uint32))
        for s in changed.tolist():
            self._upper.pop(s, None)
        gone = changed[self._levels[changed] == 0]
        self._upper.update(self._upper_blocks(changed[self._levels[changed] > 0]))
        order = np.array(sorted(self._upper), dtype=np.uint32)
        blocks = [self._upper[s] for s in order.tolist()]
        sizes = np.array([b.size for b in blocks], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.uint32)
        flat = np.concatenate(blocks) if blocks else np.zeros(1, dtype=np.uint32)
        self.upper_links = cp.asarray(flat)
        if gone.size:
            self.upper_start[cp.asarray(gone)] = INVALID
        if order.size:
            self.upper_start[cp.asarray(order)] = cp.asarray(offsets)
        return flat.nbytes + 2 * order.nbytes + gone.nbytes

    def _sync_deleted(self, cp):
        self.n_deleted = int(self.core.n_deleted)
        bits = np.frombuffer(self.core.deleted_bitset(), dtype=np.uint32)
        if self._deleted_host is not None and np.array_equal(bits, self._deleted_host):
            return 0
        self._deleted_host = bits.copy()
        self.deleted[:bits.size] = cp.asarray(bits)
        return bits.nbytes

    # ------------------------------------------------------------------ search

    def search(self, queries, k, ef, *, search_width=1, filter_bits=None, filter_stride=0, block=128,
               hash_log2=None, max_iters=0, slots=False):
        """Batched search on the device (kernels/search.cu), as of the last sync.

        Parameters
        ----------
        queries : cupy or numpy array, float32-castable [nq, dim]
        k, ef : int (``max(ef, k)`` <= 512)
        search_width : int, 1..32, parents per iteration (1 = the C order)
        filter_bits : cupy uint32 array, optional: allowed slots, [ceil(capacity/32)] for all queries
            (filter_stride=0) or [nq, filter_stride]
        block : int, threads per block (multiple of 32, 64..512)

        slots : bool, return slot ids (cupy uint32, 0xFFFFFFFF where missing) instead of labels
            (GPU-assisted insertion needs slots)

        Returns
        -------
        labels : cupy uint64 [nq, k] (2**64-1 where missing), or slots, see above
        dists : cupy float32 [nq, k] (inf where missing)
        found : cupy int32 [nq]
        status : cupy int32 [nq], kStatus* bits (filtered mode: where a fixed size bit; re-run on CPU)
        """
        cp = _kernels._cupy()
        with cp.cuda.Device(self.device):
            q = cp.ascontiguousarray(cp.asarray(queries, dtype=cp.float32)).reshape(-1, self.dim)
            nq, k, ef = q.shape[0], int(k), int(ef)
            filtered = filter_bits is not None or self.n_deleted > 0
            cap = _kernels.beam_capacity(ef, k, filtered)
            team = _kernels.team_size(self.dim, self.storage)
            log2 = hash_log2 or _kernels.search_hash_log2(cap, search_width, self.M0, 13 if filtered else 10)
            smem = _kernels.search_shared_bytes(self.stride, search_width, self.M0, self.M, log2)
            kernel = _kernels.get_kernel("search", _kernels.search_expr(self.storage, team, cap), self.device)
            if smem > 48 * 1024:
                kernel.max_dynamic_shared_size_bytes = smem
            out_slots = cp.empty((nq, k), dtype=cp.uint32)
            out_dists = cp.empty((nq, k), dtype=cp.float32)
            out_labels = cp.empty((nq, k), dtype=cp.uint64)
            found = cp.zeros(nq, dtype=cp.int32)
            status = cp.zeros(nq, dtype=cp.int32)
            if nq == 0:
                return out_labels, out_dists, found, status
            null = np.uint64(0)
            deleted = self.deleted if self.n_deleted > 0 else null
            fbits = null if filter_bits is None else filter_bits
            kernel((nq,), (int(block),),
                   (self.vectors, np.int32(self.stride), np.int32(self.metric), self.links0, self.degree0,
                    np.int32(self.M0), self.upper_start, self.upper_links, np.int32(self.M), np.int32(self.count),
                    np.int32(self.entry_point), np.int32(self.max_level), deleted, fbits,
                    np.int64(filter_stride), q, np.int32(nq), np.int32(self.dim), np.int32(k), np.int32(ef),
                    np.int32(search_width), np.int32(log2), np.int32(max_iters), self.labels,
                    out_slots, out_dists, out_labels, found, status),
                   shared_mem=smem)
            if int(found.min()) < 0:
                raise RuntimeError("search kernel rejected its launch configuration (see kernels/search.cu)")
            return (out_slots if slots else out_labels), out_dists, found, status

    def distances(self, queries, slots, *, block=256):
        """Distances from each query to a list of slots (kernels/distance.cu), as of the last sync.

        Parameters
        ----------
        queries : cupy or numpy array, float32-castable [nq, dim]
        slots : cupy or numpy uint32 [nq, c] (one list per query) or [c] (one list for all);
            0xFFFFFFFF or ids >= count give inf

        Returns
        -------
        cupy float32 [nq, c]: l2 squared, ip 1 - dot, cosine 1 - cos
        """
        cp = _kernels._cupy()
        with cp.cuda.Device(self.device):
            q = cp.ascontiguousarray(cp.asarray(queries, dtype=cp.float32)).reshape(-1, self.dim)
            ids = cp.ascontiguousarray(cp.asarray(slots, dtype=cp.uint32))
            nq = q.shape[0]
            shared = ids.ndim == 1
            c = ids.shape[-1]
            if not shared and ids.shape[0] != nq:
                raise ValueError(f"slots has {ids.shape[0]} rows for {nq} queries")
            out = cp.empty((nq, c), dtype=cp.float32)
            if nq == 0 or c == 0:
                return out
            team = _kernels.team_size(self.dim, self.storage)
            kernel = _kernels.get_kernel("distance", _kernels.distance_expr(self.storage, team), self.device)
            kernel((min(nq, 65535),), (int(block),),
                   (self.vectors, np.int32(self.stride), np.int32(self.metric), np.int32(self.count), q,
                    np.int32(nq), np.int32(self.dim), ids, np.int64(0 if shared else c), np.int32(c), out,
                    np.int64(c)),
                   shared_mem=_kernels.distance_shared_bytes(self.stride))
            return out

    # ------------------------------------------------------------------ checks

    def check_against_core(self):
        """Compare the mirror with the core's exported state (O(N), for tests). Returns problems."""
        cp = _kernels._cupy()
        state = self.core.export_state()
        n, problems = int(state["count"]), []
        with cp.cuda.Device(self.device):
            vec = cp.asnumpy(self.vectors[:n, :self.dim]).astype(np.float32)
            want = np.frombuffer(state["vectors"], np.float32).reshape(n, self.dim)
            tol = 0 if self.storage == "float32" else 1e-3
            if not np.allclose(vec, want, rtol=tol, atol=tol):
                problems.append("vectors")
            checks = (("links0", self.links0[:n].ravel(), np.uint32), ("degree0", self.degree0[:n], np.uint32),
                      ("labels", self.labels[:n], np.uint64))
            for name, arr, dtype in checks:
                if not np.array_equal(cp.asnumpy(arr), np.frombuffer(state[name], dtype)):
                    problems.append(name)
            levels = np.frombuffer(state["levels"], np.uint8)
            upper = np.frombuffer(state["upper"], np.uint32)
            starts = np.concatenate(([0], np.cumsum(levels.astype(np.int64) * (1 + self.M))[:-1]))
            dev_start = cp.asnumpy(self.upper_start[:n])
            dev_links = cp.asnumpy(self.upper_links)
            for s in np.flatnonzero(levels).tolist():
                size = int(levels[s]) * (1 + self.M)
                a = int(dev_start[s])
                if a == INVALID or not np.array_equal(dev_links[a:a + size], upper[starts[s]:starts[s] + size]):
                    problems.append(f"upper[{s}]")
                    break
            dev_deleted = cp.asnumpy(self.deleted)
            want_deleted = np.flatnonzero(np.frombuffer(state["deleted"], np.uint8))
            bits = np.flatnonzero(np.unpackbits(dev_deleted.view(np.uint8), bitorder="little"))
            if not np.array_equal(bits, want_deleted):
                problems.append("deleted")
            if self.entry_point != int(state["entry_point"]) or self.max_level != int(state["max_level"]):
                problems.append("entry point / max level")
        return problems
