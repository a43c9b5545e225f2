"""Exact (brute-force) nearest-neighbour search: ``exact_search`` and ``BFIndex``.

The exact kernel of the project (DESIGN section 6): ``BFIndex``, ``exact_search`` and the exact
method of ``knn_graph`` run through it. (The test oracle ``gpuhnsw.testing.exact_knn`` is separate,
plain float64 NumPy code on purpose, so that it shares nothing with what it checks.)

How one block of queries is answered (CPU; the CUDA path has the same phases)::

    queries [nq, d] --split--> blocks of `block` rows
      for each base tile of `base_block` rows:
          K = Q @ B_tile.T (BLAS sgemm, float32), then     K = |b|^2 - 2 q.b   (l2)
                                                           K = -q.b           (ip, cosine)
          first tile: keep the `pool` smallest keys per row (np.argpartition)
          later tiles: keep only keys below the row's current pool maximum (one comparison
                       pass; few survive), merge them into the pool (CandidatePool)
      refine: recompute the pool's distances in float64 from the vectors,
              sort by (distance, id), keep the first k

``pool = min(k + margin, n)`` candidates survive the float32 screening, so float32 rounding can only
matter when it is larger than the gap between the k-th and the (k + margin)-th distance. The returned
distances are the float64 ones rounded to float32: exact for integer data such as SIFT and MNIST, and
ties are broken by the smaller id, so results are reproducible and match a float64 oracle.

Distances follow hnswlib: ``l2`` is the squared Euclidean distance, ``ip`` is ``1 - a.b``, ``cosine``
is ``ip`` on vectors normalised as ``x / (|x| + 1e-30)`` (base and queries alike).
"""
from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._errors import DeviceError, IndexFileError, IndexFileNotFoundError
from ._io import _atomic_write
from ._validate import (as_int, as_label, as_labels, as_vectors, check_dim, check_space,
                        num_threads as _num_workers, resolve_device)

__all__ = ["BFIndex", "exact_search", "CandidatePool", "normalize_rows"]

# Candidates kept per query beyond k before the exact float64 re-ranking (see module docstring).
_MIN_MARGIN = 8
# Default tile shape on the CPU: block x base_block float32 keys (16 MiB) plus the argpartition
# indices (32 MiB) per worker.
_CPU_BLOCK = 512
_CPU_TILE_ENTRIES = 1 << 22
# On the GPU: 2048 x 32768 keys (256 MiB).
_GPU_BLOCK = 2048
_GPU_TILE_ENTRIES = 1 << 26
# Keys marking a base row excluded from a query (its own row). Finite, so that the CUDA path can pad
# tiles with +inf and never pick padding before a real row.
_EXCLUDED = np.float32(np.finfo(np.float32).max)
# Rows per chunk of the float64 re-ranking ([chunk, pool, d] float64 temporaries).
_REFINE_ENTRIES = 1 << 21


# --------------------------------------------------------------------------------------------------
# Input handling (validation itself lives in _validate, shared with Index and the CLI)
# --------------------------------------------------------------------------------------------------

def _import_cupy():
    import cupy
    return cupy


def normalize_rows(x):
    """Rows scaled by ``1 / (|x| + 1e-30)`` as float32 (hnswlib's cosine rule; zero rows stay zero).

    The norm is taken in float64 so the scaling is correctly rounded.
    """
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    step = max(1, (1 << 22) // max(1, x.shape[1]))
    for a in range(0, x.shape[0], step):
        xb = x[a:a + step].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", xb, xb))
        out[a:a + step] = xb * (1.0 / (norms + 1e-30))[:, None]
    return out


# --------------------------------------------------------------------------------------------------
# The exact kernel
# --------------------------------------------------------------------------------------------------

def exact_search(base, queries, k, space="l2", *, exclude_self=False, query_offset=0,
                 num_threads=-1, block=None, base_block=None, device="cpu", progress=None):
    """Exact k nearest neighbours of every query among the rows of ``base``.

    Parameters
    ----------
    base : array_like, [n, d]
        Database vectors (cast to float32). For ``space="cosine"`` they are normalised here.
    queries : array_like, [nq, d]
        Query vectors (cast to float32; normalised for cosine).
    k : int
        Neighbours per query; ``k <= n`` (``k <= n - 1`` with ``exclude_self``).
    space : {"l2", "ip", "cosine"}
        Squared L2, ``1 - a.b``, or ``1 - cos``.
    exclude_self : bool
        Query ``i`` is base row ``query_offset + i`` and that row is never returned for it (other
        rows at distance 0, i.e. duplicates, are kept).
    query_offset : int
        See ``exclude_self``.
    num_threads : int
        ``<= 0``: one worker per CPU core. Query blocks are spread over a thread pool (NumPy and
        BLAS release the GIL); BLAS itself may add its own threads.
    block, base_block : int, optional
        Queries per block and base rows per tile (memory: about ``12 * block * base_block`` bytes
        per worker). Defaults adapt to the sizes.
    device : {"cpu", "auto", "cuda", "cuda:N"}
        ``"cuda"`` runs the matrix products and the selection on the GPU through CuPy.
    progress : callable, optional
        Called with the number of queries finished after each block.

    Returns
    -------
    ids : ndarray, int64 [nq, k]
        Row numbers in ``base``, nearest first; equal distances ordered by the smaller id.
    dists : ndarray, float32 [nq, k]
        Distances, ascending.
    """
    space = check_space(space)
    base = as_vectors(base, what="base")
    queries = as_vectors(queries, dim=base.shape[1], what="queries")
    k = as_int(k, "k", minimum=0)
    n, nq = base.shape[0], queries.shape[0]
    self_rows = None
    if exclude_self:
        if query_offset < 0 or query_offset + nq > n:
            raise ValueError(f"exclude_self: queries must be base rows {query_offset}.."
                             f"{query_offset + nq - 1}, but base has {n} rows")
        self_rows = np.arange(query_offset, query_offset + nq, dtype=np.int64)
    limit = n - 1 if exclude_self else n
    if k > limit:
        raise ValueError(f"k={k} exceeds the {limit} base rows that can be returned per query")
    if space == "cosine":
        base = normalize_rows(base)
        queries = normalize_rows(queries)
    return _exact(base, queries, k, space, self_rows=self_rows, num_threads=num_threads,
                  block=block, base_block=base_block, device=resolve_device(device),
                  progress=progress)


def _exact(base, queries, k, space, *, labels=None, self_rows=None, num_threads=-1, block=None,
           base_block=None, device=("cpu", None), progress=None, base_cache=None):
    """The kernel on validated float32 input (cosine rows already normalised).

    labels : [n] integer array, optional. Tie-break key per base row (default: the row number).
    self_rows : [nq] int64, optional. Base row excluded for each query.
    device : ("cpu", None) or ("cuda", ordinal), as from ``_validate.resolve_device``.
    Returns (rows int64 [nq, k] into ``base``, dists float32 [nq, k]).
    """
    n, nq = base.shape[0], queries.shape[0]
    ids = np.empty((nq, k), dtype=np.int64)
    dists = np.empty((nq, k), dtype=np.float32)
    if nq == 0 or k == 0:
        return ids, dists
    avail = n - 1 if self_rows is not None else n
    pool = min(avail, k + max(_MIN_MARGIN, k // 4))
    if self_rows is not None:
        pool = min(pool + 1, n)  # the excluded row may occupy one slot of the pool
    if device[0] == "cuda":
        with _import_cupy().cuda.Device(device[1] or 0):
            return _exact_cuda(base, queries, k, pool, space, labels=labels, self_rows=self_rows,
                               block=block, base_block=base_block, progress=progress,
                               base_cache=base_cache, out=(ids, dists))

    block = int(block) if block else min(_CPU_BLOCK, nq)
    base_block = int(base_block) if base_block else max(pool, _CPU_TILE_ENTRIES // block)
    base_block = max(base_block, pool)
    base_sq = np.einsum("ij,ij->i", base, base, dtype=np.float64) if space == "l2" else None

    def run(a):
        b = min(a + block, nq)
        srows = None if self_rows is None else self_rows[a:b]
        cand = _screen_cpu(base, base_sq, queries[a:b], pool, space, srows, base_block)
        ids[a:b], dists[a:b] = _refine(base, base_sq, queries[a:b], cand, k, space, srows, labels)
        return b - a

    starts = range(0, nq, block)
    workers = min(_num_workers(num_threads), len(starts))
    done = 0
    if workers <= 1:
        for a in starts:
            done += run(a)
            if progress is not None:
                progress(done)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            for m in ex.map(run, starts):
                done += m
                if progress is not None:
                    progress(done)
    return ids, dists


class CandidatePool:
    """Running pool of the ``pool`` smallest float32 keys per row, for rows ``0..m``.

    Rows start empty. A row's first tile goes through :meth:`offer_dense` (``np.argpartition`` over
    the tile); after that, :meth:`offer_sparse` takes only the entries below the row's current
    threshold (the largest key in its full pool), which after a few tiles is a small fraction, so
    the per-tile cost is one comparison pass instead of a selection.
    """

    def __init__(self, m, pool):
        self.pool = pool
        self.key = np.full((m, pool), np.inf, dtype=np.float32)
        self.idx = np.full((m, pool), -1, dtype=np.int64)
        self.thr = np.full(m, np.inf, dtype=np.float32)

    def _merge(self, rows, key, idx):
        """Rows ``rows`` [r]: keep the pool smallest of (pool, key [r, c], idx [r, c])."""
        key = np.concatenate([self.key[rows], key], axis=1)
        idx = np.concatenate([self.idx[rows], idx], axis=1)
        sel = np.argpartition(key, self.pool - 1, axis=1)[:, :self.pool]
        self.key[rows] = np.take_along_axis(key, sel, axis=1)
        self.idx[rows] = np.take_along_axis(idx, sel, axis=1)
        self.thr[rows] = self.key[rows].max(axis=1)

    def offer_dense(self, r0, key, col0):
        """A whole tile: rows ``r0 .. r0 + key.shape[0]``, columns = ids ``col0 ..``."""
        m, t = key.shape
        rows = slice(r0, r0 + m)
        if t > self.pool:
            sel = np.argpartition(key, self.pool - 1, axis=1)[:, :self.pool]
            key, idx = np.take_along_axis(key, sel, axis=1), sel + col0
        else:
            idx = np.broadcast_to(np.arange(col0, col0 + t, dtype=np.int64), key.shape)
        self._merge(rows, key, idx)

    def offer_sparse(self, rows, ids, keys):
        """Entries ``(rows[e], ids[e], keys[e])``, ``rows`` ascending; each id once per row."""
        if rows.size == 0:
            return
        start = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        touched = rows[start]
        counts = np.diff(np.r_[start, rows.size])
        width = int(counts.max())
        pos = np.arange(rows.size) - np.repeat(start, counts)
        slot = np.repeat(np.arange(touched.size), counts)
        key = np.full((touched.size, width), np.inf, dtype=np.float32)
        idx = np.full((touched.size, width), -1, dtype=np.int64)
        key[slot, pos] = keys
        idx[slot, pos] = ids
        self._merge(touched, key, idx)


def _tile_keys(q, base, sq32, t0, t1, space):
    """float32 [nq, t1 - t0] ranking keys: |b|^2 - 2 q.b (l2) or -q.b (ip, cosine)."""
    g = q @ base[t0:t1].T                                       # BLAS sgemm
    if space == "l2":
        g *= -2.0
        g += sq32[t0:t1]
    else:
        np.negative(g, out=g)
    return g


def _screen_cpu(base, base_sq, q, pool, space, self_rows, base_block):
    """Rows of the ``pool`` smallest float32 keys per query, int64 [nq, pool] (unordered)."""
    nq = q.shape[0]
    pools = CandidatePool(nq, pool)
    sq32 = None if base_sq is None else base_sq.astype(np.float32)
    for t0 in range(0, base.shape[0], base_block):
        t1 = min(t0 + base_block, base.shape[0])
        g = _tile_keys(q, base, sq32, t0, t1, space)
        if self_rows is not None:
            hit = (self_rows >= t0) & (self_rows < t1)
            g[np.flatnonzero(hit), self_rows[hit] - t0] = _EXCLUDED
        if t0 == 0:
            pools.offer_dense(0, g, t0)
        else:
            r, c = np.nonzero(g < pools.thr[:, None])
            pools.offer_sparse(r, c + t0, g[r, c])
    return pools.idx


def _exact_dists(base, base_sq, q, cand, space):
    """float64 [nq, pool]: exact distances of query i to base rows cand[i]."""
    nq, pool = cand.shape
    out = np.empty((nq, pool), dtype=np.float64)
    step = max(1, _REFINE_ENTRIES // max(1, pool * base.shape[1]))
    for a in range(0, nq, step):
        c = cand[a:a + step]
        v = base[c].astype(np.float64)                            # [step, pool, d]
        q64 = q[a:a + step].astype(np.float64)[:, None, :]
        if space == "l2":
            v -= q64
            out[a:a + step] = np.einsum("ijk,ijk->ij", v, v)
        else:
            out[a:a + step] = 1.0 - np.einsum("ijk,ijk->ij", v, q64)
    return out


def _refine(base, base_sq, q, cand, k, space, self_rows, labels):
    """Exact re-ranking of the candidate pool: (rows int64 [nq, k], dists float32 [nq, k])."""
    d64 = _exact_dists(base, base_sq, q, cand, space)
    return _order(d64, cand, k, self_rows, labels)


def _order(d64, cand, k, self_rows, labels):
    if self_rows is not None:
        d64[cand == self_rows[:, None]] = np.inf
    tie = cand if labels is None else labels[cand]
    order = np.lexsort((tie, d64), axis=1)[:, :k]
    rows = np.take_along_axis(cand, order, axis=1)
    return rows, np.take_along_axis(d64, order, axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# CUDA path (CuPy; imported lazily). Same phases as the CPU path; the candidate pool comes back to
# the host for the final (distance, id) ordering, which is tiny.
# --------------------------------------------------------------------------------------------------

def _topk_cuda(cp, g, pool, group=32):
    """Keys and column indices of the ``pool`` smallest entries per row of ``g`` [m, t], unordered.

    CuPy's argpartition is a full sort, so sort only group minima: the ``pool`` groups of ``group``
    columns with the smallest minima contain the ``pool`` smallest entries (each of those groups
    holds an entry no larger than any entry outside them), then sort just their ``pool * group``
    entries. Padding columns are +inf and real keys are finite, so padding is never chosen while
    ``t >= pool``.
    """
    m, t = g.shape
    if t <= max(pool * group, 4096):
        sel = cp.argsort(g, axis=1)[:, :pool]
        return cp.take_along_axis(g, sel, axis=1), sel
    pad = (-t) % group
    if pad:
        g = cp.concatenate([g, cp.full((m, pad), cp.inf, dtype=g.dtype)], axis=1)
    ng = g.shape[1] // group
    gg = g.reshape(m, ng, group)
    top = cp.argsort(gg.min(axis=2), axis=1)[:, :pool]                   # [m, pool] groups
    cand = gg[cp.arange(m)[:, None], top].reshape(m, pool * group)       # their entries
    cols = (top[:, :, None] * group + cp.arange(group)[None, None, :]).reshape(m, pool * group)
    sel = cp.argsort(cand, axis=1)[:, :pool]
    return cp.take_along_axis(cand, sel, axis=1), cp.take_along_axis(cols, sel, axis=1)


def _exact_cuda(base, queries, k, pool, space, *, labels, self_rows, block, base_block, progress,
                base_cache, out):
    cp = _import_cupy()
    ids, dists = out
    nq, n = queries.shape[0], base.shape[0]
    try:
        if base_cache is not None:
            bdev, bsq = base_cache
        else:
            bdev = cp.asarray(base)
            bsq = (bdev * bdev).sum(axis=1) if space == "l2" else None
        block = int(block) if block else min(_GPU_BLOCK, nq)
        base_block = int(base_block) if base_block else max(pool, _GPU_TILE_ENTRIES // block)
        base_block = max(base_block, pool)
        excluded = cp.float32(_EXCLUDED)
        for a in range(0, nq, block):
            b = min(a + block, nq)
            q = cp.asarray(queries[a:b])
            srows = None if self_rows is None else cp.asarray(self_rows[a:b])
            best_key = best_idx = None
            for t0 in range(0, n, base_block):
                t1 = min(t0 + base_block, n)
                g = q @ bdev[t0:t1].T                                  # cuBLAS sgemm
                if space == "l2":
                    g *= -2.0
                    g += bsq[t0:t1]
                else:
                    cp.negative(g, out=g)
                if srows is not None:
                    hit = cp.flatnonzero((srows >= t0) & (srows < t1))
                    g[hit, srows[hit] - t0] = excluded
                take = min(pool, t1 - t0)
                key, idx = _topk_cuda(cp, g, take)
                idx = idx + t0
                if best_key is not None:
                    key = cp.concatenate([best_key, key], axis=1)
                    idx = cp.concatenate([best_idx, idx], axis=1)
                    if key.shape[1] > pool:
                        sel = cp.argsort(key, axis=1)[:, :pool]
                        key = cp.take_along_axis(key, sel, axis=1)
                        idx = cp.take_along_axis(idx, sel, axis=1)
                best_key, best_idx = key, idx
            # exact float64 re-ranking of the pool on the device, [step, pool, d] at a time
            d64 = cp.empty(best_idx.shape, dtype=cp.float64)
            step = max(1, 8 * _REFINE_ENTRIES // (best_idx.shape[1] * base.shape[1]))
            for r in range(0, b - a, step):
                v = bdev[best_idx[r:r + step]].astype(cp.float64)
                q64 = q[r:r + step].astype(cp.float64)[:, None, :]
                if space == "l2":
                    v -= q64
                    d64[r:r + step] = (v * v).sum(axis=2)
                else:
                    d64[r:r + step] = 1.0 - (v * q64).sum(axis=2)
            cand = cp.asnumpy(best_idx).astype(np.int64)
            srows_h = None if self_rows is None else self_rows[a:b]
            ids[a:b], dists[a:b] = _order(cp.asnumpy(d64), cand, k, srows_h, labels)
            if progress is not None:
                progress(b)
    except cp.cuda.memory.OutOfMemoryError as exc:
        raise DeviceError(f"GPU out of memory in exact search ({exc}); pass a smaller block= or "
                          f"base_block=, or device='cpu'") from exc
    return ids, dists


# --------------------------------------------------------------------------------------------------
# BFIndex
# --------------------------------------------------------------------------------------------------

_MAGIC = b"GHNSWBF\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQ")   # magic, version, space, dim, max_elements, count, next_auto_id
_SECTION = struct.Struct("<QI")        # byte length, crc32
_SPACE_CODES = {"l2": 0, "ip": 1, "cosine": 2}


class BFIndex:
    """Exact search index with hnswlib 0.8.0's ``BFIndex`` API.

    Differences from hnswlib (its bugs, fixed): ``k`` larger than the number of elements that can be
    returned raises ``RuntimeError`` instead of padding with garbage; filters return the true k
    nearest allowed elements; cosine queries are normalised; input of the wrong width, or holding
    NaN or infinity, raises ``ValueError``; ``add_items`` that would overflow capacity raises before
    adding anything.

    Parameters
    ----------
    space : {"l2", "ip", "cosine"}
    dim : int
    device : {"auto", "cpu", "cuda", "cuda:N"}, keyword-only
        Where ``knn_query`` runs. ``"auto"``: the GPU when CuPy sees one.
    """

    def __init__(self, space, dim, *, device="auto"):
        self._space = check_space(space)
        self._dim = check_dim(dim)
        self._device = resolve_device(device)      # ("cpu", None) or ("cuda", ordinal)
        self._num_threads = os.cpu_count() or 1
        self._reset(None)

    def _reset(self, max_elements):
        self._inited = max_elements is not None
        cap = max_elements or 0
        self._max_elements = cap
        self._vectors = np.zeros((cap, self._dim), dtype=np.float32)
        self._labels = np.zeros(cap, dtype=np.uint64)
        self._count = 0
        self._rows = {}        # label -> row
        self._next_auto = 0    # hnswlib's cur_l: advances by the rows of every add_items call
        self._gpu_cache = None

    def __repr__(self):
        return f"<gpuhnsw.BFIndex(space='{self._space}', dim={self._dim})>"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_gpu_cache"] = None          # device arrays are rebuilt on the next query
        return state

    # ---- properties ---------------------------------------------------------------------------
    @property
    def space(self):
        return self._space

    @property
    def dim(self):
        return self._dim

    @property
    def device(self):
        """``"cpu"``, or ``"cuda:N"``: where ``knn_query`` runs."""
        return "cpu" if self._device[0] == "cpu" else f"cuda:{self._device[1] or 0}"

    @property
    def max_elements(self):
        return self._max_elements

    @property
    def element_count(self):
        return self._count

    @property
    def num_threads(self):
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value):
        self.set_num_threads(value)

    def set_num_threads(self, num_threads):
        self._num_threads = as_int(num_threads, "num_threads")

    def get_max_elements(self):
        return self._max_elements

    def get_current_count(self):
        return self._count

    # ---- building -----------------------------------------------------------------------------
    def init_index(self, max_elements):
        """Allocate room for ``max_elements`` vectors."""
        if self._inited:
            raise RuntimeError("The index is already initiated.")
        self._reset(as_int(max_elements, "max_elements", minimum=0))

    def _require_init(self):
        if not self._inited:
            raise RuntimeError("The index is not initialised: call init_index() or load_index() first")

    def add_items(self, data, ids=None):
        """Add ``data`` [n, dim] under ``ids`` [n] (default: consecutive auto ids).

        An existing label has its vector replaced. Duplicate ids within one call: the last row wins.
        """
        self._require_init()
        x = as_vectors(data, dim=self._dim, what="data")
        rows = x.shape[0]
        if ids is None:
            labels = np.arange(self._next_auto, self._next_auto + rows, dtype=np.uint64)
        else:
            labels = as_labels(ids, rows)
        if self._space == "cosine":
            x = normalize_rows(x)
        last = {}                                  # label -> last row of x carrying it
        for i, lab in enumerate(labels.tolist()):
            last[lab] = i
        new = [lab for lab in last if lab not in self._rows]
        if self._count + len(new) > self._max_elements:
            raise RuntimeError("The number of elements exceeds the specified limit")
        for lab, i in last.items():
            r = self._rows.get(lab)
            if r is None:
                r = self._count
                self._rows[lab] = r
                self._labels[r] = lab
                self._count += 1
            self._vectors[r] = x[i]
        self._next_auto += rows
        self._gpu_cache = None

    def delete_vector(self, label):
        """Remove ``label`` (a label that is not present is ignored, as in hnswlib)."""
        self._require_init()
        label = as_label(label, out_of_range=TypeError)
        r = self._rows.pop(label, None)
        if r is None:
            return
        last = self._count - 1
        if r != last:
            moved = int(self._labels[last])
            self._vectors[r] = self._vectors[last]
            self._labels[r] = moved
            self._rows[moved] = r
        self._count = last
        self._gpu_cache = None

    # ---- search -------------------------------------------------------------------------------
    def knn_query(self, data, k=1, num_threads=-1, filter=None):
        """Exact k nearest neighbours.

        Parameters
        ----------
        data : array_like, [nq, dim] (or [dim])
        k : int
        num_threads : int
            ``<= 0``: ``self.num_threads``.
        filter : callable(label) -> bool, optional
            Only labels for which it returns true are returned. It is called once per stored
            element per call (not once per query and element as in hnswlib), so it must not depend
            on the query.

        Returns
        -------
        labels : ndarray, uint64 [nq, k]
        distances : ndarray, float32 [nq, k], ascending; ties ordered by the smaller label.
        """
        self._require_init()
        q = as_vectors(data, dim=self._dim, what="queries")
        k = as_int(k, "k", minimum=0)
        if self._space == "cosine":
            q = normalize_rows(q)
        n = self._count
        base, labels = self._vectors[:n], self._labels[:n]
        use_cache = True
        if filter is not None:
            keep = np.fromiter((bool(filter(lab)) for lab in labels.tolist()), dtype=bool, count=n)
            if not keep.all():
                base, labels = base[keep], labels[keep]
                use_cache = False
        if k > base.shape[0] and q.shape[0] > 0:
            raise RuntimeError(
                f"Cannot return the results in a contiguous 2D array: k={k} but only "
                f"{base.shape[0]} element(s) can be returned"
                + (" (after the filter)" if filter is not None else ""))
        threads = as_int(num_threads, "num_threads")
        threads = threads if threads > 0 else self._num_threads
        cache = None
        if self._device[0] == "cuda" and use_cache and k > 0 and q.shape[0] > 0:
            cache = self._device_base()
        rows, dists = _exact(base, q, k, self._space, labels=labels, num_threads=threads,
                             device=self._device, base_cache=cache)
        return labels[rows], dists

    def _device_base(self):
        if self._gpu_cache is None:
            cp = _import_cupy()
            with cp.cuda.Device(self._device[1] or 0):
                b = cp.asarray(self._vectors[:self._count])
                self._gpu_cache = (b, (b * b).sum(axis=1) if self._space == "l2" else None)
        return self._gpu_cache

    # ---- persistence --------------------------------------------------------------------------
    def save_index(self, path_to_index, *, format="gpuhnsw"):
        """Write the index to ``path_to_index`` (temporary file + rename: never a half-written file).

        format : ``"gpuhnsw"`` (magic, version, checksums) or ``"hnswlib"`` (hnswlib 0.8.0's
        BFIndex layout, readable by ``hnswlib.BFIndex.load_index``).
        """
        self._require_init()
        n = self._count
        vec = np.ascontiguousarray(self._vectors[:n])
        lab = np.ascontiguousarray(self._labels[:n])
        if format == "gpuhnsw":
            head = _HEADER.pack(_MAGIC, _VERSION, _SPACE_CODES[self._space], self._dim,
                                self._max_elements, n, self._next_auto)
            chunks = [head, struct.pack("<I", zlib.crc32(head))]
            for arr in (vec, lab):
                b = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
                chunks += [_SECTION.pack(len(b), zlib.crc32(b)), b]
        elif format == "hnswlib":
            # maxelements, size_per_element, cur_element_count (size_t each), then the whole
            # capacity of [dim float32 | uint64 label] records.
            rec = np.zeros(self._max_elements, dtype=[("v", "<f4", (self._dim,)), ("l", "<u8")])
            rec["v"][:n], rec["l"][:n] = vec, lab
            chunks = [struct.pack("<QQQ", self._max_elements, rec.dtype.itemsize, n), rec.tobytes()]
        else:
            raise ValueError(f"format must be 'gpuhnsw' or 'hnswlib', got {format!r}")
        _atomic_write(path_to_index, chunks)

    def load_index(self, path_to_index, max_elements=0):
        """Replace the contents with the index saved at ``path_to_index`` (either format).

        The capacity becomes ``max(max_elements, saved capacity)``. Every length, checksum and label
        is checked; any inconsistency raises :class:`gpuhnsw.IndexFileError`.
        """
        path = os.fspath(path_to_index)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError as exc:
            raise IndexFileNotFoundError(exc.errno, f"Cannot open file: {exc.strerror}",
                                         exc.filename) from None
        if blob[:len(_MAGIC)] == _MAGIC:
            cap, vec, lab, next_auto = self._parse_own(blob, path)
        else:
            cap, vec, lab = self._parse_hnswlib(blob, path)
            next_auto = vec.shape[0]
        if not np.isfinite(vec).all():
            raise IndexFileError(f"{path}: vectors hold NaN or infinite values")
        if np.unique(lab).shape[0] != lab.shape[0]:
            raise IndexFileError(f"{path}: duplicate labels")
        self._reset(max(as_int(max_elements, "max_elements", minimum=0), cap))
        n = vec.shape[0]
        self._vectors[:n], self._labels[:n], self._count = vec, lab, n
        self._rows = {lab_: r for r, lab_ in enumerate(lab.tolist())}
        self._next_auto = next_auto

    def _parse_own(self, blob, path):
        def bad(msg):
            return IndexFileError(f"{path}: {msg}")
        hs = _HEADER.size
        if len(blob) < hs + 4:
            raise bad("truncated header")
        magic, version, space, dim, cap, n, next_auto = _HEADER.unpack_from(blob, 0)
        (crc,) = struct.unpack_from("<I", blob, hs)
        if version != _VERSION:
            raise bad(f"unsupported BFIndex file version {version} (this build reads {_VERSION})")
        if zlib.crc32(blob[:hs]) != crc:
            raise bad("header checksum mismatch")
        names = {v: s for s, v in _SPACE_CODES.items()}
        if space not in names:
            raise bad(f"unknown space code {space}")
        if names[space] != self._space or dim != self._dim:
            raise bad(f"holds space '{names[space]}', dim {dim}; this index is space "
                      f"'{self._space}', dim {self._dim}")
        if n > cap:
            raise bad(f"count {n} exceeds capacity {cap}")
        pos = hs + 4
        out = []
        for name, dtype, width in (("vectors", "<f4", dim), ("labels", "<u8", 1)):
            if len(blob) < pos + _SECTION.size:
                raise bad(f"truncated before the {name} section")
            nbytes, scrc = _SECTION.unpack_from(blob, pos)
            pos += _SECTION.size
            want = n * width * np.dtype(dtype).itemsize
            if nbytes != want:
                raise bad(f"{name} section holds {nbytes} bytes, expected {want}")
            if len(blob) < pos + nbytes:
                raise bad(f"truncated {name} section")
            body = blob[pos:pos + nbytes]
            if zlib.crc32(body) != scrc:
                raise bad(f"{name} section checksum mismatch")
            arr = np.frombuffer(body, dtype=dtype)
            out.append(arr.reshape(n, dim).astype(np.float32) if width == dim and name == "vectors"
                       else arr.astype(np.uint64))
            pos += nbytes
        if pos != len(blob):
            raise bad(f"{len(blob) - pos} unexpected trailing bytes")
        return int(cap), out[0], out[1], int(next_auto)

    def _parse_hnswlib(self, blob, path):
        def bad(msg):
            return IndexFileError(f"{path}: not a BFIndex file or corrupted ({msg})")
        if len(blob) < 24:
            raise bad("shorter than the 24-byte header")
        cap, size, n = struct.unpack_from("<QQQ", blob, 0)
        if size != 4 * self._dim + 8:
            raise bad(f"record size {size} does not match dim {self._dim}")
        if n > cap:
            raise bad(f"count {n} exceeds capacity {cap}")
        if len(blob) != 24 + cap * size:
            raise bad(f"file has {len(blob)} bytes, the header implies {24 + cap * size}")
        rec = np.frombuffer(blob, dtype=[("v", "<f4", (self._dim,)), ("l", "<u8")], count=n,
                            offset=24)
        return int(cap), rec["v"].astype(np.float32), rec["l"].astype(np.uint64)
