"""The exact (brute-force) nearest-neighbour engine: ``exact_search`` and its building blocks.

The exact kernel of the project (docs/architecture.md, "Exact search"): ``exact_search``,
:class:`gpuhnsw.BFIndex`, the exact method of ``knn_graph`` and the exact leg of filtered queries run
through it. Public names: ``exact_search`` (validating entry point), ``exact_rows`` (the kernel on
validated input), ``CandidatePool`` (the float32 screening pool of the CPU), ``rerank`` (exact
float64 re-ranking of a pool), ``upload_base`` (a base kept on the GPU); the screening rules
(precisions, the margin rule, the key error bound and the certificate) are
:mod:`gpuhnsw._screen`'s, the row rules (cosine normalisation, the l2 centre) :mod:`gpuhnsw._rows`',
and the GPU engine is :mod:`gpuhnsw.device.brute`. (The test oracle ``gpuhnsw.testing.exact_knn``
is separate, plain float64 NumPy code on purpose, so that it shares nothing with what it checks.)

How one block of queries is answered on the CPU::

    queries [nq, d] --split--> blocks of `block` rows
      for each base tile of `base_block` rows:
          K = Q @ B_tile.T (BLAS sgemm, float32), then  K = |b - mu|^2 - 2 (q - mu).b   (l2)
                                                        K = -q.b                       (ip, cosine)
          first tile: keep the `pool` smallest keys per row (np.argpartition)
          later tiles: keep only keys below the row's current pool maximum (one comparison
                       pass; few survive), merge them into the pool (CandidatePool)
      refine: recompute the pool's distances in float64 from the vectors,
              sort by (distance, id), keep the first k

For l2 the keys are taken relative to a centre ``mu``, about the base's mean
(``_rows.l2_centre``, which says why): ``|q - b|^2 = |q - mu|^2 + 2 (q - mu).mu + K`` and the first
two terms are fixed per query, so K ranks exactly as the distance does. Only the query block is
centred in float32; the base is not copied. The keys' error is about
``eps * (|b - mu|^2 + sqrt(d) |q - mu| |b|)`` (the second term is sgemm's rounding of ``(q - mu).b``).

On the CPU ``pool = _screen.pool_size(k, n)`` candidates survive the float32 screening, so float32
rounding can only matter when it is larger than the gap between the k-th and the (k + margin)-th
distance. The GPU engine screens in reduced precision (fp16 by default) and certifies every row
against the key error bound, redoing the rows it cannot certify (``_screen``'s docstring), so its
results are exact by proof. The returned distances are the float64 ones rounded to float32: exact
for integer data such as SIFT and MNIST, and ties are broken by the smaller id, so results are
reproducible and match a float64 oracle.

Distances follow hnswlib: ``l2`` is the squared Euclidean distance, ``ip`` is ``1 - a.b``, ``cosine``
is ``ip`` on vectors normalised as ``x / (|x| + 1e-30)`` (base and queries alike).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._rows import l2_centre, normalize_rows
from ._screen import DEFAULT_PRECISION, EXCLUDED_KEY, check_precision, pool_size
from ._validate import as_int, as_vectors, check_space, num_threads as _num_workers, resolve_device
from .device.arrays import import_cupy

__all__ = ["exact_search", "exact_rows", "CandidatePool", "rerank", "upload_base"]

# Default tile shape on the CPU: block x base_block float32 keys (16 MiB) plus the argpartition
# indices (32 MiB) per worker.
_CPU_BLOCK = 512
_CPU_TILE_ENTRIES = 1 << 22
# Rows per chunk of the float64 re-ranking ([chunk, pool, d] float64 temporaries).
_REFINE_ENTRIES = 1 << 21


# --------------------------------------------------------------------------------------------------
# The exact kernel
# --------------------------------------------------------------------------------------------------

def exact_search(base, queries, k, space="l2", *, exclude_self=False, query_offset=0,
                 num_threads=-1, block=None, base_block=None, device="cpu", progress=None,
                 precision=DEFAULT_PRECISION):
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
    precision : {"fp16", "bf16", "tf32", "fp32"}
        GPU only: the precision of the screening products (tensor cores for the first three). The
        result is exact whatever it is (rows the screening cannot certify are redone); it decides
        the speed. The CPU screens in float32.

    Returns
    -------
    ids : ndarray, int64 [nq, k]
        Row numbers in ``base``, nearest first; equal distances ordered by the smaller id.
    dists : ndarray, float32 [nq, k]
        Distances, ascending.
    """
    space = check_space(space)
    precision = check_precision(precision)
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
    return exact_rows(base, queries, k, space, self_rows=self_rows, num_threads=num_threads,
                      block=block, base_block=base_block, device=resolve_device(device),
                      progress=progress, precision=precision)


def exact_rows(base, queries, k, space, *, labels=None, self_rows=None, num_threads=-1, block=None,
               base_block=None, device=("cpu", None), progress=None, base_cache=None, phases=None,
               precision=DEFAULT_PRECISION, stats=None):
    """The kernel on validated float32 input: base [n, d], queries [nq, d] C-contiguous float32
    (cosine rows already normalised), ``0 <= k <=`` the rows that can be returned.

    labels : [n] integer array, optional. Tie-break key per base row (default: the row number).
    self_rows : [nq] int64, optional. Base row excluded for each query.
    device : ("cpu", None) or ("cuda", ordinal), as from ``_validate.resolve_device``.
    base_cache : the :func:`upload_base` of ``base`` (CUDA; its precision is used), optional.
    phases : dict, optional. CUDA path: filled with GPU seconds per phase (``brute.PHASES``:
        ``upload``, ``tiles`` (products and selection), ``rerank`` (float64 re-ranking, ordering and
        the certificate), ``download``, ``redo``), from CUDA events, so measuring adds no waits.
    precision : the GPU's screening precision (``_screen.PRECISIONS``) when ``base_cache`` is None.
    stats : dict, optional. CUDA path: the pool and the rows redone (``brute.search``).
    Returns (rows int64 [nq, k] into ``base``, dists float32 [nq, k]).
    """
    n, nq = base.shape[0], queries.shape[0]
    ids = np.empty((nq, k), dtype=np.int64)
    dists = np.empty((nq, k), dtype=np.float32)
    if nq == 0 or k == 0:
        return ids, dists
    if device[0] == "cuda":
        from .device import brute

        with import_cupy().cuda.Device(device[1] or 0):
            resident = base_cache if base_cache is not None else brute.ResidentBase(base, space, precision, phases)
            return brute.search(resident, queries, k, self_rows=self_rows, labels=labels, block=block,
                                base_block=base_block, progress=progress, phases=phases, stats=stats)
    pool = pool_size(k, n - 1 if self_rows is not None else n)
    if self_rows is not None:
        pool = min(pool + 1, n)  # the excluded row may occupy one slot of the pool

    block = int(block) if block else min(_CPU_BLOCK, nq)
    base_block = int(base_block) if base_block else max(pool, _CPU_TILE_ENTRIES // block)
    base_block = max(base_block, pool)
    centre = l2_centre(base) if space == "l2" else None

    def run(a):
        b = min(a + block, nq)
        srows = None if self_rows is None else self_rows[a:b]
        cand = _screen_cpu(base, centre, queries[a:b], pool, space, srows, base_block)
        ids[a:b], dists[a:b] = rerank(base, queries[a:b], cand, k, space, srows, labels)
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


def upload_base(base, space, device, precision=DEFAULT_PRECISION):
    """``base`` [n, d] float32 (cosine rows normalised) kept on the GPU ``device`` (("cuda",
    ordinal)) with its screening copy in ``precision``: the ``base_cache`` of :func:`exact_rows`,
    for callers that query one base often (:class:`gpuhnsw.BFIndex`)."""
    from .device import brute

    with import_cupy().cuda.Device(device[1] or 0):
        return brute.ResidentBase(base, space, precision)


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
    """float32 [nq, t1 - t0] ranking keys (BLAS sgemm): sq32[b] - 2 q.b (l2) or -q.b (ip, cosine)."""
    g = q @ base[t0:t1].T
    if space == "l2":
        g *= -2.0
        g += sq32[t0:t1]
    else:
        np.negative(g, out=g)
    return g


def _screen_cpu(base, centre, q, pool, space, self_rows, base_block):
    """Rows of the ``pool`` smallest float32 keys per query, int64 [nq, pool] (unordered);
    ``centre``: ``l2_centre(base)`` for l2, else None."""
    nq = q.shape[0]
    pools = CandidatePool(nq, pool)
    sq32 = None
    if centre is not None:
        mu, sq32 = centre
        q = q - mu                                                # [nq, d] float32, the block only
    for t0 in range(0, base.shape[0], base_block):
        t1 = min(t0 + base_block, base.shape[0])
        g = _tile_keys(q, base, sq32, t0, t1, space)
        if self_rows is not None:
            hit = (self_rows >= t0) & (self_rows < t1)
            g[np.flatnonzero(hit), self_rows[hit] - t0] = EXCLUDED_KEY
        if t0 == 0:
            pools.offer_dense(0, g, t0)
        else:
            r, c = np.nonzero(g < pools.thr[:, None])
            pools.offer_sparse(r, c + t0, g[r, c])
    return pools.idx


def _exact_dists(base, q, cand, space):
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


def rerank(base, q, cand, k, space, self_rows=None, labels=None):
    """Exact float64 re-ranking of a candidate pool, ties by the smaller id (or label).

    base [n, d] float32, q [nq, d] float32 (both normalised for cosine), cand [nq, pool] int64 rows
    of ``base``, self_rows [nq] int64 or None (that row is dropped), labels [n] or None (tie key).
    Returns (rows int64 [nq, k], dists float32 [nq, k]).
    """
    d64 = _exact_dists(base, q, cand, space)
    return _order(d64, cand, k, self_rows, labels)


def _order(d64, cand, k, self_rows, labels):
    if self_rows is not None:
        d64[cand == self_rows[:, None]] = np.inf
    tie = cand if labels is None else labels[cand]
    order = np.lexsort((tie, d64), axis=1)[:, :k]
    rows = np.take_along_axis(cand, order, axis=1)
    return rows, np.take_along_axis(d64, order, axis=1).astype(np.float32)


