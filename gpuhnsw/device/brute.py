"""Exact search and the exact k-NN graph on the GPU: screening products on tensor cores, certified
exact (the rules: ``gpuhnsw/_screen.py``).

::

    ResidentBase(x [n, d] host float32, space, precision)    uploaded once; BFIndex keeps it,
      rows    float32 [n, d]     the re-rank reads these      a knn_graph call uses one
      screen  [n, d]             (rows - mu) * scale in the precision's storage (_screen.to_storage)
      sq      float32 [n]        |b - mu|^2 (l2: the keys' bias)
      norms   float64 [n]        |b - mu| (l2) or |b| (ip): N of graph queries; radius R = their max

    search(base, queries, k)     per block of queries, per base tile:
        G = gemm(q_screen, screen[tile])   cuBLAS, reduced-precision inputs, float32 accumulation
        select_topk_kernel(G)              keys -2 G + sq (l2) / -G formed as read, pool merged
      then: float64 re-rank of the pool, order by (distance, id or label), the certificate; rows
      that fail it are redone with float32 screening and pools doubled (_redo)
    graph(base, k)               tile pairs (i, j >= i): one product feeds the pools of row block i
                                 (its rows) and of row block j (its columns, a transposed read);
                                 block i is complete once its row of pairs is done: re-rank,
                                 certify, download; ``tiling="full"`` runs ``search`` instead

Memory is bounded whatever n: the product tile is at most ``WORKSPACE_BYTES`` (block x base_block
float32, or tile x tile for the graph), pools are ``[rows, pool]``, the re-rank gathers
``[step, pool, d]`` float64 chunks; for the graph the pools of all n rows stay (12 bytes per entry).
The base is uploaded in chunks on a second stream while the compute stream centres and converts
the chunks already there; results go back to pinned host buffers on that stream while later blocks
compute (``_Download``), and host query blocks go up one block ahead into two device buffers
(``_Upload``).  Seconds per phase come from CUDA events (no waits); the host waits once per block
two blocks back (progress), and at the end.
"""
from __future__ import annotations

import numpy as np

from .._errors import DeviceError
from .._rows import l2_mean, normalize_rows
from .._screen import (EXCLUDED_KEY, certified, check_precision, key_error_bound, pool_size,
                       power_of_two_scale, storage_dtype, to_storage)
from . import launch
from .arrays import import_cupy, is_gpu_array
from .clock import PhaseClock
from .kernels import TOPK_CAPACITIES
from .ops import select_topk

__all__ = ["ResidentBase", "search", "graph", "TILINGS", "WORKSPACE_BYTES", "PHASES"]

#: ``graph``'s tilings: each tile pair once, feeding both row blocks ("symmetric"), or every row
#: block against every tile ("full", ``search`` with the base as queries).
TILINGS = ("symmetric", "full")
#: Bytes of the float32 product tile (the workspace): 2048 x 32768 queries x rows, 8192 x 8192 for
#: the graph.  The device run decides whether smaller tiles that stay in L2 pay for more launches.
WORKSPACE_BYTES = 1 << 28
_BLOCK = 2048
# Base rows per upload chunk (and per centring / conversion step).
_UPLOAD_BYTES = 1 << 26
# Entries of one [step, pool, d] float64 gather of the re-rank.
_RERANK_ENTRIES = 1 << 24
# Pools up to this size are ordered on the device by a [step, pool, pool] rank comparison; larger
# ones (redo rounds) on the host (NumPy's lexsort): CuPy has no per-row sort with a tie key.
_RANK_POOL = 256
# Phases of the event timing, in order.
PHASES = ("upload", "tiles", "rerank", "download", "redo")


class ResidentBase:
    """The base of exact search, resident on the current GPU (see the module docstring).

    Parameters
    ----------
    x : ndarray, float32 [n, d], C-contiguous (host)
    space : {"l2", "ip", "cosine"}
    precision : one of ``_screen.PRECISIONS``
    phases : dict, optional: the ``upload`` seconds are added to it
    normalize : bool: cosine rows normalised on the device (``_rows.normalize_rows``) as they
        arrive; else they come normalised
    """

    def __init__(self, x, space, precision, phases=None, normalize=False):
        cp = import_cupy()
        try:
            self._upload(cp, x, space, precision, phases, normalize)
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise DeviceError(f"GPU out of memory keeping {x.shape[0]} x {x.shape[1]} rows on the device "
                              f"({exc}); use device='cpu'") from exc

    def _upload(self, cp, x, space, precision, phases, normalize):
        self.space, self.precision = space, check_precision(precision)
        self.n, self.d = x.shape
        clock = PhaseClock(cp, phases, PHASES)
        clock.start("upload")
        self.mu_host = l2_mean(x) if space == "l2" else None             # float32 [d] or None
        self.mu = None if self.mu_host is None else cp.asarray(self.mu_host)
        self.rows = cp.empty((self.n, self.d), dtype=cp.float32)
        self.sq = cp.empty(self.n, dtype=cp.float32) if space == "l2" else None
        self.norms = cp.empty(self.n, dtype=cp.float64)
        peaks = cp.zeros(max(1, -(-self.n // self._step())), dtype=cp.float32)
        copy = cp.cuda.Stream(non_blocking=True)
        compute = cp.cuda.get_current_stream()
        step = self._step()
        for c, a in enumerate(range(0, self.n, step)):
            b = min(a + step, self.n)
            with copy:
                self.rows[a:b].set(x[a:b], stream=copy)     # pageable: returns once staged
                landed = copy.record()
            compute.wait_event(landed)                      # what follows works on chunk c
            if normalize:
                self.rows[a:b] = normalize_rows(self.rows[a:b], cp)
            centred, norms = self._centred(cp, self.rows[a:b])
            if self.sq is not None:
                self.sq[a:b] = cp.einsum("ij,ij->i", centred, centred)
            self.norms[a:b] = norms
            if b > a:
                peaks[c] = cp.abs(centred).max()
        peak = float(peaks.max())                           # the one wait of the upload
        self.radius = float(self.norms.max()) if self.n else 0.0
        self.scale = power_of_two_scale(peak, precision)
        self.screen = self._screen_copy(cp)
        clock.stop()
        clock.read()

    def _step(self):
        return max(1, _UPLOAD_BYTES // (4 * max(1, self.d)))

    def _centred(self, cp, q):
        """(float32 [m, d] ``q - mu`` (l2; else ``q``), float64 [m] its norm from float64)."""
        if self.mu is None:
            return q, cp.sqrt(cp.einsum("ij,ij->i", q.astype(cp.float64), q.astype(cp.float64)))
        q64 = q.astype(cp.float64) - self.mu.astype(cp.float64)
        return q - self.mu, cp.sqrt(cp.einsum("ij,ij->i", q64, q64))

    def _screen_copy(self, cp):
        if self.mu is None and self.precision in ("tf32", "fp32"):
            return self.rows                                  # cuBLAS reads float32 rows as they are
        out = cp.empty((self.n, self.d), dtype=storage_dtype(self.precision))
        step = self._step()
        for a in range(0, self.n, step):
            centred, _ = self._centred(cp, self.rows[a:a + step])
            out[a:a + step] = to_storage(cp, centred, self.precision, self.scale)
        return out

    def tile(self, cp, t0, t1, precision):
        """Rows ``t0:t1`` as screening inputs of ``precision`` (the resident copy, or float32 rows
        centred on the fly for the redo's float32 screening) and their scale."""
        if precision == self.precision:
            return self.screen[t0:t1], self.scale
        centred, _ = self._centred(cp, self.rows[t0:t1])
        return to_storage(cp, centred, precision), 1.0

    def query_scale(self, cp, queries, precision):
        """The scale of the screening inputs of ``queries`` ([nq, d] float32, host or device)."""
        if precision in ("tf32", "fp32") or len(queries) == 0:
            return 1.0
        if queries is self.rows:
            return self.scale
        if is_gpu_array(queries):
            c = queries if self.mu is None else queries - self.mu
            return power_of_two_scale(float(cp.abs(c).max()), precision)
        c = queries if self.mu_host is None else queries - self.mu_host
        return power_of_two_scale(float(np.abs(c).max()), precision)

    def bound(self, cp, precision, qnorm, q_scale):
        """float64 [m]: the key error bound ``E`` of queries of norms ``qnorm``."""
        b_scale = self.scale if precision == self.precision else 1.0
        return key_error_bound(cp, precision, self.space, self.d, qnorm, self.radius, q_scale, b_scale)


# --------------------------------------------------------------------------------------------------
# copies on the second stream

class _Upload:
    """Host query blocks into two device buffers on a second stream, a block ahead of the compute
    that reads them; a buffer is refilled only after the compute that used it is done."""

    def __init__(self, cp, queries, block):
        self.cp, self.queries = cp, queries
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.buffers = [cp.empty((block, queries.shape[1]), dtype=cp.float32) for _ in range(2)]
        self.freed = [None, None]                # event after the last compute that read a buffer

    def get(self, turn, a, b):
        """Rows a:b of the queries on the device, ready for the compute stream."""
        cp, i = self.cp, turn % 2
        if self.freed[i] is not None:
            self.stream.wait_event(self.freed[i])
        with self.stream:
            self.buffers[i][:b - a].set(self.queries[a:b], stream=self.stream)
            landed = self.stream.record()
        cp.cuda.get_current_stream().wait_event(landed)
        return self.buffers[i][:b - a]

    def release(self, turn):
        self.freed[turn % 2] = self.cp.cuda.get_current_stream().record()


class _Download:
    """Finished blocks' results to the host on a second stream, through two pinned buffers, while
    later blocks compute; the device arrays are kept until their copy is done."""

    def __init__(self, cp, ids, dists, block):
        self.cp, self.ids, self.dists = cp, ids, dists
        k = ids.shape[1]
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.slots = []
        for _ in range(2):
            mem_i = cp.cuda.alloc_pinned_memory(max(1, block * k * 8))
            mem_d = cp.cuda.alloc_pinned_memory(max(1, block * k * 4))
            self.slots.append(dict(mem=(mem_i, mem_d), event=None, keep=None, rows=None,
                                   ids=np.frombuffer(mem_i, np.int64, block * k).reshape(block, k),
                                   dists=np.frombuffer(mem_d, np.float32, block * k).reshape(block, k)))
        self.turn = 0

    def put(self, rows, ids_dev, dists_dev):
        """Copy the device results of the host rows ``rows`` (slice or int64 array)."""
        slot = self.slots[self.turn % 2]
        self._land(slot)
        m = ids_dev.shape[0]
        ready = self.cp.cuda.get_current_stream().record()
        self.stream.wait_event(ready)
        with self.stream:
            ids_dev.get(stream=self.stream, out=slot["ids"][:m], blocking=False)
            dists_dev.get(stream=self.stream, out=slot["dists"][:m], blocking=False)
            slot["event"] = self.stream.record()
        slot["keep"], slot["rows"], slot["m"] = (ids_dev, dists_dev), rows, m
        self.turn += 1

    def _land(self, slot):
        if slot["event"] is None:
            return
        slot["event"].synchronize()
        m = slot["m"]
        self.ids[slot["rows"]] = slot["ids"][:m]
        self.dists[slot["rows"]] = slot["dists"][:m]
        slot["event"] = slot["keep"] = None

    def finish(self):
        for i in range(2):
            self._land(self.slots[(self.turn + i) % 2])


# --------------------------------------------------------------------------------------------------
# pools: screening products and the fused top-k

def _pool(cp, base, qs, q_scale, precision, pool, srows, base_block, work):
    """(keys float32 [m, pool] ascending, rows int64 [m, pool]) of the ``pool`` smallest screening
    keys of the queries ``qs`` ([m, d] in ``precision``'s storage, scale ``q_scale``)."""
    m, n = qs.shape[0], base.n
    key_scale = -2.0 if base.space == "l2" else -1.0
    if pool > TOPK_CAPACITIES[-1]:
        return _pool_grouped(cp, base, qs, q_scale, precision, pool, srows, base_block)
    keys = cp.empty((m, pool), dtype=cp.float32)
    rows = cp.empty((m, pool), dtype=cp.int64)
    for t0 in range(0, n, base_block):
        t1 = min(t0 + base_block, n)
        tile, b_scale = base.tile(cp, t0, t1, precision)
        g = work[:m, :t1 - t0]
        launch.gemm(qs, tile, g, precision=precision, alpha=1.0 / (q_scale * b_scale))
        select_topk(g, pool, keys, rows, index_offset=t0, prev=t0 > 0, key_scale=key_scale,
                    key_bias=None if base.sq is None else base.sq[t0:t1], exclude=srows,
                    exclude_key=EXCLUDED_KEY)
    return keys, rows


def _smallest(cp, g, pool, group=32):
    """Keys and column indices of the ``pool`` smallest entries per row of ``g`` [m, t], unordered:
    for pools beyond ``select_topk_kernel``'s largest capacity. CuPy's argpartition is a full sort,
    so sort only group minima: the ``pool`` groups of ``group`` columns with the smallest minima hold
    the ``pool`` smallest entries, then sort just their ``pool * group`` entries (padding +inf)."""
    m, t = g.shape
    if t <= max(pool * group, 4096):
        sel = cp.argsort(g, axis=1)[:, :pool]
        return cp.take_along_axis(g, sel, axis=1), sel
    pad = (-t) % group
    if pad:
        g = cp.concatenate([g, cp.full((m, pad), cp.inf, dtype=g.dtype)], axis=1)
    gg = g.reshape(m, g.shape[1] // group, group)
    top = cp.argsort(gg.min(axis=2), axis=1)[:, :pool]                   # [m, pool] groups
    cand = gg[cp.arange(m)[:, None], top].reshape(m, pool * group)
    cols = (top[:, :, None] * group + cp.arange(group)[None, None, :]).reshape(m, pool * group)
    sel = cp.argsort(cand, axis=1)[:, :pool]
    return cp.take_along_axis(cand, sel, axis=1), cp.take_along_axis(cols, sel, axis=1)


def _pool_grouped(cp, base, qs, q_scale, precision, pool, srows, base_block):
    """``_pool`` for pools beyond the kernel's capacity: keys formed explicitly, ``_smallest``."""
    m, n = qs.shape[0], base.n
    keys = rows = None
    for t0 in range(0, n, base_block):
        t1 = min(t0 + base_block, n)
        tile, b_scale = base.tile(cp, t0, t1, precision)
        g = cp.empty((m, t1 - t0), dtype=cp.float32)
        launch.gemm(qs, tile, g, precision=precision, alpha=1.0 / (q_scale * b_scale))
        g *= cp.float32(-2.0 if base.space == "l2" else -1.0)
        if base.sq is not None:
            g += base.sq[t0:t1]
        if srows is not None:
            hit = cp.flatnonzero((srows >= t0) & (srows < t1))
            g[hit, srows[hit] - t0] = EXCLUDED_KEY
        k_t, r_t = _smallest(cp, g, min(pool, t1 - t0))
        r_t = r_t + t0
        if keys is not None:
            k_t, r_t = cp.concatenate([keys, k_t], axis=1), cp.concatenate([rows, r_t], axis=1)
            if k_t.shape[1] > pool:
                sel = cp.argsort(k_t, axis=1)[:, :pool]
                k_t, r_t = cp.take_along_axis(k_t, sel, axis=1), cp.take_along_axis(r_t, sel, axis=1)
        keys, rows = k_t, r_t
    return keys, rows


# --------------------------------------------------------------------------------------------------
# re-rank, order, certificate

def _exact_dists(cp, base, q, cand):
    """float64 [m, pool]: distances of q[i] ([m, d] float32) to base rows cand[i], from float32
    inputs in float64 (differences for l2, never norms)."""
    d64 = cp.empty(cand.shape, dtype=cp.float64)
    step = max(1, _RERANK_ENTRIES // max(1, cand.shape[1] * base.d))
    for r in range(0, cand.shape[0], step):
        v = base.rows[cand[r:r + step]].astype(cp.float64)
        q64 = q[r:r + step].astype(cp.float64)[:, None, :]
        if base.space == "l2":
            v -= q64
            d64[r:r + step] = (v * v).sum(axis=2)
        else:
            d64[r:r + step] = 1.0 - (v * q64).sum(axis=2)
    return d64


def _order(cp, d64, cand, k, srows, tie):
    """The first k of each pool by (distance, tie key), the query's own row (``srows``) last:
    (rows int64 [m, k], dists float32 [m, k], the k-th distance float64 [m]) on the device.
    Small pools: a row's rank is the number of entries before it ([step, pool, pool]
    comparisons); large ones (redo rounds): NumPy's lexsort on the host."""
    m, pool = cand.shape
    if srows is not None:
        d64[cand == srows[:, None]] = cp.inf
    key = cand if tie is None else tie[cand]
    if pool > _RANK_POOL:
        h_d, h_c, h_t = (cp.asnumpy(a) for a in (d64, cand, key))
        first = np.lexsort((h_t, h_d), axis=1)[:, :k]
        rows = cp.asarray(np.take_along_axis(h_c, first, axis=1))
        d = np.take_along_axis(h_d, first, axis=1)
        return rows, cp.asarray(d.astype(np.float32)), cp.asarray(d[:, k - 1].copy())
    rows = cp.empty((m, k), dtype=cp.int64)
    dists = cp.empty((m, k), dtype=cp.float64)
    step = max(1, _RERANK_ENTRIES // (pool * pool))
    for r in range(0, m, step):
        d, c, t = d64[r:r + step], cand[r:r + step], key[r:r + step]
        before = (d[:, None, :] < d[:, :, None]) | ((d[:, None, :] == d[:, :, None])
                                                     & (t[:, None, :] < t[:, :, None]))
        rank = before.sum(axis=2)                                  # [s, pool], a permutation
        s = c.shape[0]
        slot = cp.empty((s, pool), dtype=cp.int64)
        slot[cp.arange(s)[:, None], rank] = cp.arange(pool, dtype=cp.int64)[None, :]
        first = slot[:, :k]                                        # positions of the k best
        rows[r:r + s] = cp.take_along_axis(c, first, axis=1)
        dists[r:r + s] = cp.take_along_axis(d, first, axis=1)
    return rows, dists.astype(cp.float32), dists[:, k - 1].copy()


def _ship(clock, download, a, b, turn, rows, d32, waits, progress):
    """Queue the download of rows ``[a, b)`` (a finished block, into ``download``'s slot of
    ``turn``); with three blocks in flight, wait for the oldest and report its end to ``progress``."""
    clock.start("download")
    download.put(slice(a, b), rows, d32)
    clock.stop()
    waits.append((b, download.slots[turn % 2]["event"]))
    if len(waits) > 2:
        done, event = waits.pop(0)
        event.synchronize()
        if progress is not None:
            progress(done)


def _finish_block(cp, base, q, keys, cand, k, srows, tie, qnorm, bound, complete):
    """Re-rank and order one block's pools and certify them: (rows, dists, ok bool [m])."""
    d64 = _exact_dists(cp, base, q, cand)
    rows, dists, kth = _order(cp, d64, cand, k, srows, tie)
    if complete:
        ok = cp.ones(rows.shape[0], dtype=bool)
    else:
        ok = certified(cp, base.space, kth, keys.max(axis=1), qnorm, bound)
    return rows, dists, ok


# --------------------------------------------------------------------------------------------------
# exact search

def _blocks(base, nq, pool, block, base_block):
    block = int(block) if block else min(_BLOCK, max(nq, 1))
    base_block = int(base_block) if base_block else max(pool, WORKSPACE_BYTES // (4 * block))
    return block, max(base_block, pool)


def search(base, queries, k, *, self_rows=None, labels=None, block=None, base_block=None, progress=None,
           phases=None, stats=None):
    """Exact ``k`` nearest rows of ``base`` (a :class:`ResidentBase`) for every query.

    queries : float32 [nq, d] C-contiguous, host or device (``base.rows`` itself for a graph)
    self_rows : int64 [nq] host array or None: the base row excluded for each query
    labels : [n] integer host array or None: tie key per base row (default: the row number)
    stats : dict, optional: filled with ``precision``, ``pool``, ``redone`` (rows that failed the
        certificate at screening) and ``redo`` (per redo round: [pool, rows that still failed])
    Returns (rows int64 [nq, k], dists float32 [nq, k]) on the host.
    """
    cp = import_cupy()
    nq, n = queries.shape[0], base.n
    ids = np.empty((nq, k), dtype=np.int64)
    dists = np.empty((nq, k), dtype=np.float32)
    available = n - 1 if self_rows is not None else n
    pool = pool_size(k, available, base.precision)
    if self_rows is not None:
        pool = min(pool + 1, n)       # the excluded row may occupy one slot of the pool
    if stats is not None:
        stats.update(precision=base.precision, pool=pool, redone=0, redo=[])
    if nq == 0 or k == 0:
        return ids, dists
    clock = PhaseClock(cp, phases, PHASES)
    try:
        tie = None if labels is None else cp.asarray(labels)
        sdev = None if self_rows is None else cp.asarray(self_rows)
        block, base_block = _blocks(base, nq, pool, block, base_block)
        work = cp.empty((block, base_block), dtype=cp.float32) if pool <= TOPK_CAPACITIES[-1] else None
        q_scale = base.query_scale(cp, queries, base.precision)
        upload = None if is_gpu_array(queries) else _Upload(cp, queries, block)
        download = _Download(cp, ids, dists, block)
        failed = cp.zeros(nq, dtype=bool)
        waits = []
        for turn, a in enumerate(range(0, nq, block)):
            b = min(a + block, nq)
            q = queries[a:b] if upload is None else upload.get(turn, a, b)
            srows = None if sdev is None else sdev[a:b]
            clock.start("tiles")
            centred, qnorm = base._centred(cp, q)
            qs = to_storage(cp, centred, base.precision, q_scale)
            keys, cand = _pool(cp, base, qs, q_scale, base.precision, pool, srows, base_block, work)
            clock.stop()
            clock.start("rerank")
            rows, d32, ok = _finish_block(cp, base, q, keys, cand, k, srows, tie, qnorm,
                                          base.bound(cp, base.precision, qnorm, q_scale), pool >= n)
            failed[a:b] = ~ok
            clock.stop()
            if upload is not None:
                upload.release(turn)
            _ship(clock, download, a, b, turn, rows, d32, waits, progress)
        download.finish()
        redo = cp.asnumpy(cp.flatnonzero(failed))
        clock.start("redo")
        _redo(cp, base, queries, redo, k, pool, None if self_rows is None else np.asarray(self_rows), tie, ids,
              dists, stats)
        clock.stop()
        clock.read()
        if progress is not None:
            progress(nq)
    except cp.cuda.memory.OutOfMemoryError as exc:
        raise DeviceError(f"GPU out of memory in exact search ({exc}); pass a smaller block= or "
                          f"base_block=, or device='cpu'") from exc
    return ids, dists


def _redo(cp, base, queries, redo, k, pool, self_rows, tie, ids, dists, stats):
    """Rows ``redo`` (host int64) of ``queries`` that failed the certificate: float32 screening with
    the pool doubled, again until every row passes or the pool holds every row. ``self_rows``: host
    int64 or None. Writes ``ids`` and ``dists`` (host) in place."""
    n = base.n
    if stats is not None:
        stats["redone"] = int(redo.size)
    while redo.size:
        pool = min(n, 2 * pool)
        q = cp.asarray(queries[redo]) if not is_gpu_array(queries) else queries[cp.asarray(redo)]
        srows = None if self_rows is None else cp.asarray(self_rows[redo])
        centred, qnorm = base._centred(cp, q)
        qs = to_storage(cp, centred, "fp32")
        block, base_block = _blocks(base, redo.size, pool, None, None)
        work = cp.empty((block, base_block), dtype=cp.float32) if pool <= TOPK_CAPACITIES[-1] else None
        still = []
        for a in range(0, redo.size, block):
            b = min(a + block, redo.size)
            s = None if srows is None else srows[a:b]
            keys, cand = _pool(cp, base, qs[a:b], 1.0, "fp32", pool, s, base_block, work)
            rows, d32, ok = _finish_block(cp, base, q[a:b], keys, cand, k, s, tie, qnorm[a:b],
                                          base.bound(cp, "fp32", qnorm[a:b], 1.0), pool >= n)
            ids[redo[a:b]] = cp.asnumpy(rows)
            dists[redo[a:b]] = cp.asnumpy(d32)
            still.append(redo[a:b][~cp.asnumpy(ok)])
        redo = np.concatenate(still)
        if stats is not None:
            stats["redo"].append([pool, int(redo.size)])


# --------------------------------------------------------------------------------------------------
# the exact k-NN graph

def graph(base, k, *, tiling="symmetric", tile=None, progress=None, phases=None, stats=None):
    """Exact ``k`` nearest other rows of every row of ``base`` (a :class:`ResidentBase`).

    tiling : ``"symmetric"`` (each tile pair once, both row blocks fed from one product) or
        ``"full"`` (``search`` with the base as queries)
    tile : rows per square tile (default: ``WORKSPACE_BYTES`` of float32 products)
    Returns (rows int64 [n, k], dists float32 [n, k]) on the host; ``stats`` as ``search``'s.
    """
    cp = import_cupy()
    n = base.n
    if tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {', '.join(map(repr, TILINGS))}, got {tiling!r}")
    if tiling == "full":
        return search(base, base.rows, k, self_rows=np.arange(n, dtype=np.int64), progress=progress,
                      phases=phases, stats=stats)
    ids = np.empty((n, k), dtype=np.int64)
    dists = np.empty((n, k), dtype=np.float32)
    pool = min(pool_size(k, n - 1, base.precision) + 1, n)
    if stats is not None:
        stats.update(precision=base.precision, pool=pool, redone=0, redo=[])
    if n == 0 or k == 0:
        return ids, dists
    if pool > TOPK_CAPACITIES[-1]:
        return search(base, base.rows, k, self_rows=np.arange(n, dtype=np.int64), progress=progress,
                      phases=phases, stats=stats)
    clock = PhaseClock(cp, phases, PHASES)
    try:
        t = int(tile) if tile else max(pool, int((WORKSPACE_BYTES // 4) ** 0.5))
        work = cp.empty((min(t, n), min(t, n)), dtype=cp.float32)
        keys = cp.empty((n, pool), dtype=cp.float32)
        cand = cp.empty((n, pool), dtype=cp.int64)
        self_rows = cp.arange(n, dtype=cp.int64)
        started = set()                                   # row blocks whose pools hold a result
        key_scale = -2.0 if base.space == "l2" else -1.0
        alpha = 1.0 / (base.scale * base.scale)

        def bias(r0, r1):
            return None if base.sq is None else base.sq[r0:r1]

        starts = list(range(0, n, t))
        download = _Download(cp, ids, dists, t)
        failed = cp.zeros(n, dtype=bool)
        waits = []
        for i, a0 in enumerate(starts):
            a1 = min(a0 + t, n)
            clock.start("tiles")
            for b0 in starts[i:]:
                b1 = min(b0 + t, n)
                g = work[:a1 - a0, :b1 - b0]
                launch.gemm(base.screen[a0:a1], base.screen[b0:b1], g, precision=base.precision, alpha=alpha)
                select_topk(g, pool, keys[a0:a1], cand[a0:a1], index_offset=b0, prev=a0 in started,
                            key_scale=key_scale, key_bias=bias(b0, b1),
                            exclude=self_rows[a0:a1] if b0 == a0 else None, exclude_key=EXCLUDED_KEY)
                started.add(a0)
                if b0 != a0:
                    select_topk(g, pool, keys[b0:b1], cand[b0:b1], index_offset=a0, prev=b0 in started,
                                key_scale=key_scale, key_bias=bias(a0, a1), transposed=True)
                    started.add(b0)
            clock.stop()
            clock.start("rerank")                       # block i has met every column: complete
            qnorm = base.norms[a0:a1]
            rows, d32, ok = _finish_block(cp, base, base.rows[a0:a1], keys[a0:a1], cand[a0:a1], k,
                                          self_rows[a0:a1], None, qnorm,
                                          base.bound(cp, base.precision, qnorm, base.scale), pool >= n)
            failed[a0:a1] = ~ok
            clock.stop()
            _ship(clock, download, a0, a1, i, rows, d32, waits, progress)
        download.finish()
        redo = cp.asnumpy(cp.flatnonzero(failed))
        clock.start("redo")
        _redo(cp, base, base.rows, redo, k, pool, np.arange(n, dtype=np.int64), None, ids, dists, stats)
        clock.stop()
        clock.read()
        if progress is not None:
            progress(n)
    except cp.cuda.memory.OutOfMemoryError as exc:
        raise DeviceError(f"GPU out of memory in the exact k-NN graph ({exc}); use device='cpu'") from exc
    return ids, dists
