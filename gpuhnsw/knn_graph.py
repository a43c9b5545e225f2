"""k-nearest-neighbour graphs of a whole dataset (DESIGN section 6).

``knn_graph(data, k)`` returns, for every row, its ``k`` nearest other rows. Two methods:

exact
    Every pair is compared. The distance matrix is symmetric, so on the CPU only the tiles on and
    above the diagonal are computed and each product ``X_i @ X_j.T`` feeds the candidate pools of
    both row blocks ``i`` and ``j`` (half the BLAS work of a plain query-vs-base search). Memory is
    the data plus one tile pair and a ``[n, pool]`` candidate pool: about 1.1 GB for 100k x 784.
    The pools are then re-ranked in float64 exactly as in :func:`gpuhnsw.exact.exact_search`.
    On the GPU it is ``exact_search`` with every row as a query.
hnsw
    Build a :class:`gpuhnsw.Index` over the data, query every row for ``k + 1`` neighbours with beam
    width ``ef`` and drop the row itself (by id, so duplicates of a row survive as neighbours).

Ties are ordered by the smaller id in both cases.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._validate import as_int, as_vectors, check_space, num_threads as _num_workers, resolve_device
from ._progress import Progress as _Progress, stderr_is_tty as _stderr_is_tty
from .exact import EXCLUDED_KEY, CandidatePool, exact_rows, normalize_rows, pool_size, rerank

__all__ = ["knn_graph"]

METHODS = ("auto", "exact", "hnsw")
# method="auto" takes the exact path while n * n * d stays below this (CPU: about 10 s of BLAS on
# 2 cores with the symmetric tiling; GPU: a few seconds of cuBLAS).
AUTO_EXACT_LIMIT = {"cpu": 2e11, "cuda": 2e14}
# Show a progress bar by default above this many rows (when stderr is a terminal).
PROGRESS_MIN_ROWS = 50_000
# Square tile edge of the symmetric exact path on the CPU.
_TILE = 2048
# Rows per add_items / knn_query call on the hnsw path (progress granularity).
_HNSW_CHUNK = 16384


def knn_graph(data, k, *, space="l2", method="auto", device="auto", M=16, ef_construction=200,
              ef=None, num_threads=-1, progress=None, random_seed=100):
    """The k nearest neighbours of every row of ``data`` among the other rows.

    Parameters
    ----------
    data : array_like, [n, d]
        Vectors (cast to float32; must be finite). Row ``i`` has id ``i``.
    k : int
        Neighbours per row, ``0 <= k <= n - 1``.
    space : {"l2", "ip", "cosine"}
        Squared L2, ``1 - a.b``, ``1 - cos`` (hnswlib's definitions).
    method : {"auto", "exact", "hnsw"}
        ``"auto"``: exact while ``n * n * d`` is small (see ``AUTO_EXACT_LIMIT``), else hnsw.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        Where the exact search, or the queries of the hnsw path, run.
    M, ef_construction, random_seed : int
        HNSW build parameters (hnsw method only).
    ef : int, optional
        Beam width of the hnsw queries; default ``max(2 * (k + 1), 64)``.
    num_threads : int
        ``<= 0``: all cores.
    progress : bool, optional
        Show a tqdm progress bar (if tqdm is installed). ``None``: only for large inputs when
        stderr is a terminal.

    Returns
    -------
    neighbors : ndarray, int64 [n, k]
        Ids of the neighbours of each row, nearest first, never the row itself.
    distances : ndarray, float32 [n, k]
        Their distances, ascending; equal distances ordered by the smaller id.
    """
    space = check_space(space)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    x = as_vectors(data, what="data")
    n, d = x.shape
    k = as_int(k, "k")
    if not 0 <= k <= max(n - 1, 0):
        raise ValueError(f"k must be in [0, n - 1] = [0, {max(n - 1, 0)}], got {k}")
    dev = resolve_device(device)                 # ("cpu", None) or ("cuda", ordinal)
    if method == "auto":
        method = "exact" if float(n) * n * d <= AUTO_EXACT_LIMIT[dev[0]] else "hnsw"
    if progress is None:
        progress = n >= PROGRESS_MIN_ROWS and _stderr_is_tty()

    if k == 0 or n == 0:
        return np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float32)
    if space == "cosine":
        x = normalize_rows(x)
    if method == "exact":
        if dev[0] == "cuda":
            with _Progress(progress, n, "exact k-NN graph") as bar:
                return exact_rows(x, x, k, space, self_rows=np.arange(n, dtype=np.int64),
                                  device=dev, progress=bar.to)
        return _exact_graph_cpu(x, k, space, num_threads=num_threads, progress=progress)
    if ef is None:
        ef = max(2 * (k + 1), 64)
    return _hnsw_graph(x, k, space, device=device, M=M, ef_construction=ef_construction, ef=int(ef),
                       num_threads=num_threads, progress=progress, random_seed=random_seed)


# --------------------------------------------------------------------------------------------------
# exact, CPU: symmetric tiling
# --------------------------------------------------------------------------------------------------

def _exact_graph_cpu(x, k, space, *, num_threads=-1, progress=False, tile=None):
    """Exact graph of the (already normalised for cosine) float32 rows ``x`` [n, d].

    Tiles ``(i, j)`` with ``j >= i`` in row-major order; the product of one tile updates the pools
    of row block ``i`` (keys along its rows) and of row block ``j`` (keys along its columns).
    """
    n = x.shape[0]
    tile = tile or _TILE
    pool = min(n, pool_size(k, n) + 1)                    # +1: a row's own slot is in its pool
    sq32 = np.einsum("ij,ij->i", x, x, dtype=np.float64).astype(np.float32) if space == "l2" else None
    pools = CandidatePool(n, pool)
    seen = set()                                          # row blocks whose pools were offered
    starts = list(range(0, n, tile))
    pairs = [(i, j) for i in range(len(starts)) for j in range(i, len(starts))]
    with _Progress(progress, len(pairs), "exact k-NN graph (tiles)") as bar:
        for done, (i, j) in enumerate(pairs, 1):
            a0, a1 = starts[i], min(starts[i] + tile, n)
            b0, b1 = starts[j], min(starts[j] + tile, n)
            g = x[a0:a1] @ x[b0:b1].T                            # [ta, tb] float32 (sgemm)
            if space == "l2":
                g *= -2.0
                key_a = g + sq32[b0:b1]                          # keys of block i's rows
                key_b = np.add(g, sq32[a0:a1, None], out=g)      # keys of block j's rows, transposed
            else:
                key_a = key_b = np.negative(g, out=g)
            if i == j:
                np.fill_diagonal(key_a, EXCLUDED_KEY)
            for blk, key, r0, c0, along_rows in ((i, key_a, a0, b0, True),
                                                 (j, key_b, b0, a0, False)):
                if i == j and not along_rows:
                    break
                if blk not in seen:
                    seen.add(blk)
                    pools.offer_dense(r0, key if along_rows else np.ascontiguousarray(key.T), c0)
                elif along_rows:
                    r, c = np.nonzero(key < pools.thr[a0:a1, None])
                    pools.offer_sparse(r + r0, c + c0, key[r, c])
                else:
                    r, c = np.nonzero(key < pools.thr[None, b0:b1])
                    order = np.argsort(c, kind="stable")
                    r, c = r[order], c[order]
                    pools.offer_sparse(c + r0, r + c0, key[r, c])
            bar.to(done)

    neighbors = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)

    def refine(a0):
        a1 = min(a0 + tile, n)
        neighbors[a0:a1], distances[a0:a1] = rerank(
            x, x[a0:a1], pools.idx[a0:a1], k, space, np.arange(a0, a1, dtype=np.int64))

    workers = min(_num_workers(num_threads), len(starts))
    if workers <= 1:
        for a0 in starts:
            refine(a0)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(refine, starts))
    return neighbors, distances


# --------------------------------------------------------------------------------------------------
# approximate: HNSW
# --------------------------------------------------------------------------------------------------

def _index_class():
    """The HNSW index class used by the hnsw method (a hook the tests can replace)."""
    from .index import Index
    return Index


def _hnsw_graph(x, k, space, *, device, M, ef_construction, ef, num_threads, progress,
                random_seed):
    n, d = x.shape
    Index = _index_class()
    try:
        index = Index(space, d, device=device)
    except TypeError:  # an index class without the device keyword (hnswlib)
        index = Index(space, d)
    index.init_index(max_elements=n, M=M, ef_construction=ef_construction,
                     random_seed=random_seed)
    index.set_ef(max(ef, k + 1))
    threads = num_threads if num_threads is not None and num_threads > 0 else -1
    ids = np.arange(n, dtype=np.int64)
    chunk = _HNSW_CHUNK if progress else n
    neighbors = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    # a GPU index builds GPU-assisted (its "auto" threshold would not see chunked inserts)
    build = {"build": "gpu"} if getattr(index, "device", "cpu") == "cuda" and n >= 20_000 else {}
    with _Progress(progress, 2 * n, "HNSW k-NN graph (build, then query)") as bar:
        for a in range(0, n, chunk):
            index.add_items(x[a:a + chunk], ids[a:a + chunk], num_threads=threads, **build)
            bar.to(min(a + chunk, n))
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            labels, dists = index.knn_query(x[a:b], k=k + 1, num_threads=threads)
            neighbors[a:b], distances[a:b] = _drop_self(labels.astype(np.int64), dists,
                                                        ids[a:b], k)
            bar.to(n + b)
    return neighbors, distances


def _drop_self(labels, dists, self_ids, k):
    """From [m, k + 1] results remove each row's own id (else the last column); order by (dist, id).

    Dropping column 0 would be wrong: with duplicate rows, a row's twin can come first.
    """
    drop = labels == self_ids[:, None]
    drop[~drop.any(axis=1), k] = True
    keep = ~drop
    lab = labels[keep].reshape(-1, k)
    dst = dists[keep].reshape(-1, k)
    order = np.lexsort((lab, dst), axis=1)
    return np.take_along_axis(lab, order, axis=1), np.take_along_axis(dst, order, axis=1)
