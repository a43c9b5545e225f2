"""The device mirror of a C core's graph (docs/architecture.md, "Device mirror"): CuPy arrays kept in
step by deltas.

``DeviceMirror(core).sync()``:

1. reads the entry point, then takes the core's dirty-row log (``drain_dirty``: ascending slots,
   each with what changed in it, cleared atomically with respect to inserters, and the drain's
   number), then the count (why in this order: the comment in ``sync``); a mirror whose drain is not
   the one after its own last missed what another drain of that core's one log took, and sends
   every row again;
2. grows the device arrays by doubling when the core's capacity passed theirs;
3. ships each changed row by what changed (the core's ``DIRTY_*`` kinds): new slots and rows whose
   vector or label changed go whole (``gather_rows``: vector, level-0 links, degree, label, level);
   a row whose level-0 list alone changed ships only that list (``gather_links``), and only its
   entries past the degree the device holds when the list was just appended to (a back-link: most
   dirty rows of an insert).  Both kinds go into one pinned staging buffer, up in one asynchronous
   copy and into the arrays by one kernel (``kernels/scatter.cu``), chunk by chunk; two staging
   buffers alternate, and each is rewritten (or freed) only after an event says its upload ran;
4. uploads the upper-level blocks of the slots whose upper lists changed, in place (a slot's
   blocks keep their place in ``upper_links``; new ones are appended), and the words of the deleted
   bitset that hold slots whose delete mark changed (or new slots);
5. with a search graph (``search_graph="optimized"``): brings its host copy
   (``gpuhnsw._search_graph.SearchGraph``) in step with the slots whose level-0 list changed and the
   new ones, and uploads the rows that refresh wrote; where the refresh builds afresh (the first
   sync, a re-sync, a refresh past ``REBUILD_FRACTION`` of the rows) the graph is built on the
   device from this sync's arrays (``device.search_graph``) and its host copy read back.

Cost: O(changed rows); a sync with nothing to do asks the core one O(1) question
(``Core.sync_pending``: its dirty flag and drain counter) and returns; a 1 % insert moves about
1.5 % of a full upload's bytes (tests/test_device.py).  A query sees the graph as of its sync
(snapshot semantics), up to rows written while the sync gathers them: those are dirty again and go
with the next sync, and meanwhile read as a mix of old and new entries, each a valid slot (as the C
readers' lists do).

Device arrays (slot = row; see kernels/README.md)::

    vectors      [capacity, stride]  float32 | float16 | uint16 (bfloat16 bits); stride: dim rounded up
                                     to 16 bytes; a float16 or int8 core's rows come decoded from
                                     ``gather_rows`` (``Index`` picks float16 rows for them)
    links0       [capacity, M0]      uint32
    degree0      [capacity]          uint32
    labels       [capacity]          uint64
    upper_start  [capacity]          uint32 offset into upper_links, 0xFFFFFFFF: level 0
    upper_links  [total]             uint32 the core's per-slot blocks, level L of slot s at
                                     upper_start[s] + (L-1)*(M+1) = [count, M ids]
    levels       [capacity]          uint8 top level of each slot (the descent reads a block only
                                     on levels the slot reaches)
    deleted      [ceil(capacity/32)] uint32 bitset
    graph        [capacity, D]       uint32 the search graph's rows (D = its degree), or None

The mirror is also the search's device graph: :meth:`DeviceMirror.search` launches the beam search
kernel over it, :class:`gpuhnsw.device.query.FixedSearch` the fixed-degree one (``gpuhnsw.search.gpu``
owns the mirror of each GPU index, its lock and its failures).

Stream order: a sync runs on the caller's current CuPy stream and records :attr:`DeviceMirror.synced`
after its uploads; a search waits for that event on its own current stream (:meth:`before_search`)
and records an event after its kernels (:meth:`after_search`).  A later sync waits for those events
before it writes any row, and arrays that a growth replaces are kept until every search that may
read them and the copy out of them have completed (checked, never waited for, at each sync and
search), so a search on another stream never reads a half-written row or freed memory.

CuPy is imported lazily; nothing here runs without a GPU (or the tests' NumPy stand-in for CuPy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import _core
from .._core import INVALID_SLOT
from . import kernels, launch, search_graph as device_graph
from .arrays import bf16_values, import_cupy, put_rows

__all__ = ["DeviceMirror", "SyncStats"]

_CHUNK_BYTES = 64 << 20   # staging buffer size bound: rows per transfer = this / bytes per row
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}   # device rows, by storage
_ALIGN = 16


def _align(n):
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class SyncStats:
    """What syncs moved (cumulative on ``DeviceMirror.stats``, per call as ``sync()``'s result)."""
    syncs: int = 0
    rows: int = 0            # full rows scattered (vector, links, degree, label)
    link_rows: int = 0       # rows whose level-0 list alone changed (only entries not on the device move)
    bytes: int = 0           # host -> device bytes (staging, upper blocks, bitset, graph rows)
    grows: int = 0           # capacity doublings
    upper_blocks: int = 0    # slots whose upper-level blocks were uploaded
    graph_rows: int = 0      # search-graph rows uploaded
    graph_builds: int = 0    # search-graph builds (instead of updates)
    seconds: float = 0.0
    last: dict = field(default_factory=dict)

    def add(self, other):
        for name in ("syncs", "rows", "link_rows", "bytes", "grows", "upper_blocks", "graph_rows", "graph_builds",
                     "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _Staging:
    """One pinned host buffer and its device twin. A batch of r full rows and q link rows (t link
    entries in all) is laid out compactly, each section 16-byte aligned, so the batch goes up in one
    copy of exactly its bytes (sections: kernels/scatter.cu)::

        slots u32[r] | degree u32[r] | labels u64[r] | links u32[r, M0] | vectors f32[r, dim_pad]
        | lslots u32[q] | ldegree u32[q] | lstart u32[q] | lfirst u32[q] | lpacked u32[t] || levels u8[r]

    (levels stay on the host: only the upper-level bookkeeping needs them)."""

    def __init__(self, cp, nbytes):
        self.nbytes = nbytes
        self._pinned = cp.cuda.alloc_pinned_memory(nbytes)
        self.host = np.frombuffer(self._pinned, dtype=np.uint8, count=nbytes)
        self.device = cp.empty(nbytes, dtype=cp.uint8)
        self._uploaded = None   # event recorded after the last upload from `host` was enqueued

    def upload(self, cp, nbytes):
        """Copy the first `nbytes` of the host buffer to the device twin: asynchronous on the current
        stream (``ndarray.set`` from pinned memory), so the host buffer is not free until
        :meth:`wait`."""
        self.device[:nbytes].set(self.host[:nbytes])
        self._uploaded = cp.cuda.Event(disable_timing=True)
        self._uploaded.record()

    def wait(self):
        """Block until the last upload has read the host buffer: before it is rewritten or freed."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    @staticmethod
    def layout(r, q, t, m0, dim_pad):
        """{section: (offset, dtype, shape)} and the bytes to upload / in all."""
        sections = [("slots", np.uint32, (r,)), ("degree", np.uint32, (r,)), ("labels", np.uint64, (r,)),
                    ("links", np.uint32, (r, m0)), ("vectors", np.float32, (r, dim_pad)),
                    ("lslots", np.uint32, (q,)), ("ldegree", np.uint32, (q,)), ("lstart", np.uint32, (q,)),
                    ("lfirst", np.uint32, (q,)), ("lpacked", np.uint32, (t,)), ("levels", np.uint8, (r,))]
        out, at, upload = {}, 0, 0
        for name, dtype, shape in sections:
            out[name] = (at, dtype, shape)
            at += int(np.prod(shape)) * np.dtype(dtype).itemsize
            if name == "lpacked":
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
    storage : "float32", "float16" or "bfloat16", the device storage of the vectors (16-bit rows halve
        the memory and the bandwidth of every distance; distances are still accumulated in fp32;
        bfloat16 rows are uint16 arrays of the top halves of the fp32 values, read only by
        search_fixed_kernel)
    search_graph : SearchGraph or None, the search graph to keep in step and on the device (its rows
        may come from a file; it is rebuilt where they do not match the core)
    """

    def __init__(self, core, *, device=0, storage="float32", search_graph=None):
        if storage not in kernels.STORAGE_TYPES:
            raise ValueError(f"storage must be one of {sorted(kernels.STORAGE_TYPES)}")
        self.core, self.device, self.storage = core, int(device), storage
        self.dim, self.dim_pad, self.M, self.M0 = int(core.dim), int(core.dim_pad), int(core.M), int(core.M0)
        self.metric = kernels.METRICS[core.space]
        self.stride = launch.row_stride(self.dim, storage)
        self.capacity = 0
        self.count = 0                     # slots in use as of the last sync
        self.entry_point, self.max_level = -1, -1
        self.n_deleted = 0
        self._drain = 0                    # number of this mirror's last drain of the core's log
        self.vectors = self.links0 = self.degree0 = self.labels = None
        self.upper_start = self.upper_links = self.levels = self.deleted = None
        self.search_graph, self.graph = search_graph, None
        self.stats = SyncStats()
        # host bookkeeping per slot [capacity]: its level, the degree the device holds, and where
        # its upper blocks start in upper_links (-1: none); upper_links[:_upper_used] is in use
        self._levels = np.zeros(0, dtype=np.uint8)
        self._degree = np.zeros(0, dtype=np.uint32)
        self._upper_at = np.zeros(0, dtype=np.int64)
        self._upper_used = 0
        self._launches = {}   # (beam, search_width, filtered) -> launch.plan_search's (SearchLaunch, kernel)
        self.synced = None    # event after the last sync's device work (None: none enqueued yet)
        self._readers = {}    # stream pointer -> event after the last search enqueued on that stream
        self._retired = []    # (arrays replaced by a growth, events that must complete before they go)
        self._replaced = []   # the arrays the running sync replaced
        # two staging buffers taken in turn: one is filled while the other's upload may still run
        self._staging = [None, None]
        self._turn = 0

    # ------------------------------------------------------------------ sync

    def sync(self):
        """Bring the device arrays up to date with the core. Returns this call's :class:`SyncStats`."""
        cp = import_cupy()
        t0 = time.perf_counter()
        st = SyncStats(syncs=1)
        if self.capacity and not self.core.sync_pending(self._drain):   # O(1): nothing changed
            st.seconds = time.perf_counter() - t0
            self.stats.add(st)
            return st
        with cp.cuda.Device(self.device):
            stream = cp.cuda.get_current_stream()
            self._release_retired()
            for event in self._readers.values():   # searches on other streams read what this writes
                stream.wait_event(event)
            # Order matters (an insert may run beside this sync): the entry point first, then the
            # drain, then the count.  A node becomes the entry only after it wrote (and marked) its
            # lists, so the entry read here has its final row in this drain or gathered after an
            # earlier one; read after the drain, it could be a node whose half-built row an earlier
            # sync gathered and whose last marks came after this drain: queries would start from a
            # row without links.  Slots are marked only once below count, so every drained slot
            # (and the entry) is below the count read last.
            entry = int(self.core.entry_point)
            log, drain = self.core.drain_dirty()
            log = np.frombuffer(log, dtype=np.uint64)
            count = int(self.core.count)
            # The log is one per core: a drain that is not the one after this mirror's last took
            # place after another consumer's (another mirror of this core) or this mirror's own
            # failed sync, which took changes this mirror never shipped: every row goes up again.
            known = self.count if drain == self._drain + 1 else 0
            self._replaced = []   # device arrays this sync's growths replace
            st.grows = self._ensure_capacity(int(self.core.max_elements))
            if log.size or count != known:
                self._ship(cp, log, known, count, st)
            if self.search_graph is not None:
                self._sync_graph(cp, log, drain, count, not known, st)
            if self._replaced:    # kept until their copies and every search reading them completed
                copied = cp.cuda.Event(disable_timing=True)
                copied.record()
                self._retired.append((tuple(self._replaced), [copied, *self._readers.values()]))
            self._drain = drain
            if self.synced is None:
                self.synced = cp.cuda.Event(disable_timing=True)
            self.synced.record(stream)
            self.n_deleted = int(self.core.n_deleted)
            self.count = count
            self.entry_point = entry if 0 <= entry < count else -1
            self.max_level = int(self._levels[entry]) if self.entry_point >= 0 else -1
        st.seconds = time.perf_counter() - t0
        st.last = {"rows": st.rows, "link_rows": st.link_rows, "bytes": st.bytes}
        self.stats.add(st)
        self.stats.last = st.last
        return st

    def _ship(self, cp, log, known, count, st):
        """Upload what the drained log (u64 ``(kind << 32) | slot``) and the slots from `known` up to
        `count` (new to the device, or all of them to re-sync) changed, counting it in `st`."""
        slots, kinds = (log & 0xFFFFFFFF).astype(np.uint32), (log >> 32).astype(np.uint32)
        old = slots < known                # slots from `known` on go up whole
        fresh = np.arange(known, count, dtype=np.uint32)
        row = (kinds & _core.DIRTY_ROW) != 0
        full = np.union1d(slots[old & row], fresh).astype(np.uint32)
        linked = old & ~row & ((kinds & (_core.DIRTY_LINKS | _core.DIRTY_APPEND)) != 0)
        links, rewritten = slots[linked], (kinds[linked] & _core.DIRTY_LINKS) != 0
        per_full = 4 * (4 + self.M0 + self.dim_pad)
        per_link = 4 * (4 + self.M0)
        nf = max(1, _CHUNK_BYTES // per_full)
        nl = max(1, _CHUNK_BYTES // per_link)
        for i in range(max(-(-len(full) // nf), -(-len(links) // nl))):
            st.bytes += self._scatter(cp, full[i * nf:(i + 1) * nf], links[i * nl:(i + 1) * nl],
                                      rewritten[i * nl:(i + 1) * nl])
        st.rows, st.link_rows = len(full), len(links)
        upper = np.union1d(slots[old & ((kinds & _core.DIRTY_UPPER) != 0)], full).astype(np.uint32)
        upper = upper[self._levels[upper] > 0]
        if upper.size:
            st.bytes += self._sync_upper(cp, upper)
            st.upper_blocks = len(upper)
        # the marks of every slot that went up whole: the log may hold none for them
        marked = np.union1d(slots[(kinds & _core.DIRTY_DELETED) != 0], fresh).astype(np.uint32)
        if marked.size:
            st.bytes += self._sync_deleted(cp, marked)

    def _sync_graph(self, cp, log, drain, count, whole, st):
        """Refresh the search graph from drain number ``drain`` (its log: u64 ``(kind << 32) | slot``)
        and upload the rows it wrote, or all of them (``whole``: the device holds none yet)."""
        graph = self.search_graph

        def on_device():   # a build from this sync's arrays, in place; the host copy comes back
            rows, forward = device_graph.build(self, graph.degree, count)
            self.graph[:count] = rows
            return cp.asnumpy(rows), cp.asnumpy(forward)

        written = graph.refresh(self.core, log, count, drain, build=on_device)
        if written is None:
            st.graph_builds, st.graph_rows = 1, graph.count
        elif whole:        # a graph from a file: the device holds none of it yet
            self.graph[:graph.count] = cp.asarray(graph.rows[:graph.count])
            st.graph_rows = graph.count
            st.bytes += graph.rows[:graph.count].nbytes
        elif written.size:
            rows = graph.rows[written]
            put_rows(self.graph, written, rows)
            st.graph_rows = written.size
            st.bytes += rows.nbytes + written.nbytes

    def _ensure_capacity(self, needed):
        """Allocate (first sync) or double the device arrays until they hold `needed` slots."""
        if needed <= self.capacity:
            return 0
        cp = import_cupy()
        new = max(needed, 2 * self.capacity, 1024)
        dtype = _DTYPES[self.storage]
        old = (self.vectors, self.links0, self.degree0, self.labels, self.upper_start, self.levels, self.deleted)
        old_graph = self.graph
        if self.search_graph is not None:
            self.graph = cp.full((new, self.search_graph.degree), INVALID_SLOT, dtype=cp.uint32)
        self.vectors = cp.zeros((new, self.stride), dtype=dtype)
        self.links0 = cp.full((new, self.M0), INVALID_SLOT, dtype=cp.uint32)
        self.degree0 = cp.zeros(new, dtype=cp.uint32)
        self.labels = cp.full(new, np.iinfo(np.uint64).max, dtype=cp.uint64)
        self.upper_start = cp.full(new, INVALID_SLOT, dtype=cp.uint32)
        self.levels = cp.zeros(new, dtype=cp.uint8)
        self.deleted = cp.zeros((new + 31) // 32, dtype=cp.uint32)
        if self.upper_links is None:
            self.upper_links = cp.zeros(1, dtype=cp.uint32)   # a valid pointer while there is none
        if self.capacity:
            c = self.capacity
            for dst, src in zip((self.vectors, self.links0, self.degree0, self.labels, self.upper_start,
                                 self.levels), old):
                dst[:c] = src
            self.deleted[:old[6].size] = old[6]
            self._replaced.extend(old)
            if old_graph is not None:
                self.graph[:c] = old_graph
                self._replaced.append(old_graph)
        grow = new - self.capacity
        self._levels = np.concatenate([self._levels, np.zeros(grow, np.uint8)])
        self._degree = np.concatenate([self._degree, np.zeros(grow, np.uint32)])
        self._upper_at = np.concatenate([self._upper_at, np.full(grow, -1, np.int64)])
        grown = 1 if self.capacity else 0
        self.capacity = new
        return grown

    def _release_retired(self):
        """Drop the replaced arrays whose readers have all completed (an event query, no wait)."""
        self._retired = [(arrays, events) for arrays, events in self._retired if not all(e.done for e in events)]
        self._readers = {ptr: e for ptr, e in self._readers.items() if not e.done}

    # ------------------------------------------------------------------ stream order of searches

    def before_search(self, cp):
        """The current stream, made to wait (on the device) for the last sync's work; replaced arrays
        whose readers completed are let go."""
        self._release_retired()
        stream = cp.cuda.get_current_stream()
        if self.synced is not None:
            stream.wait_event(self.synced)
        return stream

    def after_search(self, stream, event):
        """Record ``event`` on ``stream`` after a search's kernels: the mirror's arrays are not written
        or freed before it completes."""
        event.record(stream)
        self._readers[stream.ptr] = event

    def _scatter(self, cp, full, links, rewritten):
        """Gather the full rows `full` and the level-0 lists of `links` (u32 slots) into the staging
        buffer, upload them in one copy, scatter them with one kernel. A list that was only appended
        to (not `rewritten`, bool per link row) ships only the entries past the degree the device
        holds. Returns the bytes copied."""
        r, q = len(full), len(links)
        lists = np.empty((q, self.M0), dtype=np.uint32)         # [q, M0] the link rows' lists
        degree = np.empty(q, dtype=np.uint32)
        if q:
            self.core.gather_links(np.ascontiguousarray(links), lists, degree)
        held = self._degree[links]
        # a list that shrank since the device copy was rewritten after the drain: send it whole
        start = np.where(rewritten | (degree < held), 0, held).astype(np.uint32)
        ship = (np.arange(self.M0) >= start[:, None]) & (np.arange(self.M0) < degree[:, None])   # [q, M0]
        counts = (degree - start).astype(np.int64)
        layout, upload, total = _Staging.layout(r, q, int(counts.sum()), self.M0, self.dim_pad)
        staging = self._staging[self._turn]
        if staging is not None:
            staging.wait()   # its previous upload has read it: it may be rewritten (or freed)
        if staging is None or staging.nbytes < total:
            staging = self._staging[self._turn] = _Staging(cp, max(total, 1 << 20))
        self._turn ^= 1
        host, dev = staging.views(cp, layout)
        host["slots"][:] = full
        if r:
            self.core.gather_rows(host["slots"], host["vectors"], host["links"], host["degree"], host["labels"],
                                  host["levels"])
        self._levels[full] = host["levels"]
        self._degree[full] = host["degree"]
        host["lslots"][:], host["ldegree"][:], host["lstart"][:] = links, degree, start
        host["lfirst"][:] = np.cumsum(counts) - counts
        host["lpacked"][:] = lists[ship]
        self._degree[links] = degree
        staging.upload(cp, upload)   # the scatter below follows it on the same stream
        launch.scatter(kernels.get_kernel("scatter", (self.storage,), self.device), r=r, slots=dev["slots"],
                       degree=dev["degree"], labels=dev["labels"], links=dev["links"], rows=dev["vectors"],
                       m0=self.M0, dim_pad=self.dim_pad, vectors=self.vectors, stride=self.stride,
                       links0=self.links0, degree0=self.degree0, labels_out=self.labels, q=q,
                       lslots=dev["lslots"], ldegree=dev["ldegree"], lstart=dev["lstart"], lfirst=dev["lfirst"],
                       lpacked=dev["lpacked"])
        return upload

    def _sync_upper(self, cp, slots):
        """Upload the upper-level blocks of `slots` (u32, ascending, levels > 0).  A slot's blocks
        keep their place in upper_links for good (a slot's level never changes); a slot seen for the
        first time gets the next free place (upper_links doubles when full) and its upper_start
        entry. Returns the bytes copied."""
        sizes = self._levels[slots].astype(np.int64) * (1 + self.M)
        new = self._upper_at[slots] < 0
        self._upper_at[slots[new]] = self._upper_used + np.cumsum(sizes[new]) - sizes[new]
        self._upper_used += int(sizes[new].sum())
        if self._upper_used > self.upper_links.size:
            grown = cp.zeros(max(self._upper_used, 2 * self.upper_links.size, 1024), dtype=cp.uint32)
            grown[:self.upper_links.size] = self.upper_links
            self._replaced.append(self.upper_links)
            self.upper_links = grown
        flat = np.frombuffer(self.core.gather_upper(slots), dtype=np.uint32)   # [sum(sizes)]
        at = self._upper_at[slots]
        where = (np.repeat(at - (np.cumsum(sizes) - sizes), sizes) + np.arange(flat.size)).astype(np.uint32)
        self.upper_links[cp.asarray(where)] = cp.asarray(flat)
        if new.any():
            self.upper_start[cp.asarray(slots[new])] = cp.asarray(at[new].astype(np.uint32))
            self.levels[cp.asarray(slots[new])] = cp.asarray(self._levels[slots[new]])
        return flat.nbytes + where.nbytes + 9 * int(new.sum())

    def _sync_deleted(self, cp, slots):
        """Upload the words of the deleted bitset that hold `slots` (u32, their marks changed).
        Returns the bytes copied."""
        bits = np.frombuffer(self.core.deleted_bitset(), dtype=np.uint32)   # [ceil(capacity/32)]
        words = np.unique(slots >> 5)
        self.deleted[cp.asarray(words)] = cp.asarray(bits[words])
        return 8 * words.size

    # ------------------------------------------------------------------ search

    def search(self, queries, k, beam, *, search_width=1, filter_bits=None, filter_stride=0, max_iters=0,
               slots=False):
        """Batched search on the device (kernels/search.cu), as of the last sync.

        Parameters
        ----------
        queries : cupy or numpy array, float32-castable [nq, dim]
        k : int, results per query
        beam : int, the beam width (``SearchParams.beam``: ``max(ef, k)``, at most 512)
        search_width : int, 1..32, parents per iteration (1 = the C order)
        filter_bits : cupy uint32 array, optional: allowed slots, [ceil(capacity/32)] for all queries
            (filter_stride=0) or [nq, filter_stride]
        slots : bool, return slot ids (cupy uint32, 0xFFFFFFFF where missing) instead of labels
            (GPU-assisted insertion needs slots)

        Returns
        -------
        None where no launch fits this device's shared memory (``launch.search_launch``), else
        labels : cupy uint64 [nq, k] (2**64-1 where missing), or slots, see above
        dists : cupy float32 [nq, k] (inf where missing)
        info : cupy int32 [2, nq]: row 0 ``found`` (-1 everywhere: the kernel rejected its launch
            configuration), row 1 ``status``, kStatus* bits (filtered mode: where a fixed size bit;
            re-run on CPU). One array, so the caller reads both back in one transfer.
        """
        cp = import_cupy()
        if self.storage not in kernels.BEAM_STORAGES:
            raise ValueError(f"search_beam_kernel does not read {self.storage} rows (search_fixed_kernel does)")
        with cp.cuda.Device(self.device):
            q = cp.ascontiguousarray(cp.asarray(queries, dtype=cp.float32)).reshape(-1, self.dim)
            nq = q.shape[0]
            filtered = filter_bits is not None or self.n_deleted > 0
            key = (int(beam), int(search_width), filtered)
            plan = self._launches.get(key)
            if plan is None:   # a batch of one query pays for its launch, not for choosing it
                plan = self._launches[key] = launch.plan_search(self.device, self.dim, self.storage, self.M,
                                                                 self.M0, *key)
            if plan[0] is None:
                return None
            out_slots = cp.empty((nq, k), dtype=cp.uint32)
            out_dists = cp.empty((nq, k), dtype=cp.float32)
            out_labels = cp.empty((nq, k), dtype=cp.uint64)
            info = cp.empty((2, nq), dtype=cp.int32)   # the kernel writes every row's found and status
            stream = self.before_search(cp)
            if nq:
                launch.search(*plan, vectors=self.vectors, links0=self.links0, degree0=self.degree0,
                              upper_start=self.upper_start, upper_links=self.upper_links, levels=self.levels,
                              labels=self.labels,
                              deleted_bits=self.deleted if self.n_deleted > 0 else None, queries=q,
                              filter_bits=filter_bits, filter_stride=filter_stride, out_slots=out_slots,
                              out_dists=out_dists, out_labels=out_labels, out_found=info[0], out_status=info[1],
                              stride=self.stride, metric=self.metric, m0=self.M0, m=self.M, n_slots=self.count,
                              entry_point=self.entry_point, max_level=self.max_level, nq=nq, dim=self.dim, k=k,
                              beam=beam, search_width=search_width, max_iters=max_iters)
            self.after_search(stream, cp.cuda.Event(disable_timing=True))
            return (out_slots if slots else out_labels), out_dists, info

    def distances(self, queries, slots):
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
        cp = import_cupy()
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
            team = launch.team_size(self.dim, self.storage)
            launch.distances(kernels.get_kernel("distance", (self.storage, team), self.device), vectors=self.vectors,
                             stride=self.stride, metric=self.metric, n_slots=self.count, queries=q, nq=nq,
                             dim=self.dim, slots=ids, slots_ld=0 if shared else c, c=c, out=out, out_ld=c)
            return out

    # ------------------------------------------------------------------ checks

    def check_against_core(self):
        """Compare the mirror with the core's exported state (O(N), for tests). Returns problems."""
        cp = import_cupy()
        state = self.core.export_state()
        n, problems = int(state["count"]), []
        want = np.empty((n, self.dim_pad), dtype=np.float32)   # the stored rows, decoded as a sync ships them
        self.core.gather_rows(np.arange(n, dtype=np.uint32), want, np.empty((n, self.M0), np.uint32),
                              np.empty(n, np.uint32), np.empty(n, np.uint64), np.empty(n, np.uint8))
        want = want[:, :self.dim]
        with cp.cuda.Device(self.device):
            vec = cp.asnumpy(self.vectors[:n, :self.dim])
            vec = bf16_values(vec) if self.storage == "bfloat16" else vec.astype(np.float32)
            tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[self.storage]
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
            if not np.array_equal(cp.asnumpy(self.levels[:n]), levels):
                problems.append("levels")
            for s in np.flatnonzero(levels).tolist():
                size = int(levels[s]) * (1 + self.M)
                a = int(dev_start[s])
                if a == INVALID_SLOT or not np.array_equal(dev_links[a:a + size], upper[starts[s]:starts[s] + size]):
                    problems.append(f"upper[{s}]")
                    break
            dev_deleted = cp.asnumpy(self.deleted)
            want_deleted = np.flatnonzero(np.frombuffer(state["deleted"], np.uint8))
            bits = np.flatnonzero(np.unpackbits(dev_deleted.view(np.uint8), bitorder="little"))
            if not np.array_equal(bits, want_deleted):
                problems.append("deleted")
            if self.entry_point != int(state["entry_point"]) or self.max_level != int(state["max_level"]):
                problems.append("entry point / max level")
            g = self.search_graph
            if g is not None and not np.array_equal(cp.asnumpy(self.graph[:g.count]), g.rows[:g.count]):
                problems.append("search graph")
        return problems
