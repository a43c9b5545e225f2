"""k-nearest-neighbour graphs of a whole dataset (docs/architecture.md, section 2, the `knn_graph.py` row).

``knn_graph(data, k)`` returns, for every row, its ``k`` nearest other rows. Three methods:

exact
    Every pair is compared. The distance matrix is symmetric, so on the CPU only the tiles on and
    above the diagonal are computed and each product ``X_i @ X_j.T`` feeds the candidate pools of
    both row blocks ``i`` and ``j`` (half the BLAS work of a plain query-vs-base search). Memory is
    the data plus one tile pair and a ``[n, pool]`` candidate pool: about 1.1 GB for 100k x 784.
    The pools are then re-ranked in float64 exactly as in :func:`gpuhnsw.exact.exact_search`.
    On the GPU the same tiling screens on tensor cores and certifies every row
    (:mod:`gpuhnsw.device.brute`).
nndescent
    NN-descent in the C engine (``csrc/nndescent.c``): random-projection-tree initial graph, then
    local joins over sampled new/old neighbour lists until a round changes fewer than
    ``delta * n * k`` entries. The data is read in place (a float32 C-contiguous array or
    ``np.memmap`` is not copied, cosine included). Deterministic for a seed, whatever the thread
    count. With ``device="cuda"`` the forest and the local joins are batched fp16 matrix products
    on the GPU (:mod:`gpuhnsw._nndescent_gpu`).
hnsw
    Build a :class:`gpuhnsw.Index` over the data, query every row for ``k + 1`` neighbours with beam
    width ``ef`` and drop the row itself (by id, so duplicates of a row survive as neighbours).

Ties are ordered by the smaller id. ``include_self=True`` puts each row itself in column 0 and,
for l2, gives euclidean distances (UMAP's ``precomputed_knn`` and pynndescent's ``neighbor_graph``:
layout and values); ``as_sparse=True`` returns a ``scipy.sparse`` CSR distance graph.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _core
from ._progress import KNN_GRAPH_MIN_ROWS, Progress as _Progress, wanted as _progress_wanted
from ._rows import l2_centre, normalize_rows
from ._screen import DEFAULT_PRECISION, EXCLUDED_KEY, pool_size
from ._surface import DEFAULT_SEED
from ._validate import (as_int, as_vectors, check_space, check_storage, num_threads as _num_workers,
                        resolve_device)
from .device.arrays import import_cupy
from .exact import CandidatePool, rerank
from .index import GPU_BUILD_MIN_ROWS, Index

__all__ = ["knn_graph", "METHODS", "AUTO_EXACT_LIMIT", "GPU_COST", "auto_method"]

#: ``method`` of :func:`knn_graph`.
METHODS = ("auto", "exact", "nndescent", "hnsw")
#: method="auto" on the CPU takes the exact path while n * n * d stays below this, else NN-descent:
#: exact costs ~n^2 d, NN-descent ~n d times a few hundred, so the switch sits where exact takes
#: well under a second (docs/architecture.md, section 2, the `knn_graph.py` row).
AUTO_EXACT_LIMIT = 4e9
#: method="auto" on a GPU: the cheaper by these estimates (``auto_method``), in seconds:
#:   exact       n^2 (d * exact_product_s + exact_select_s)   (products on tensor cores, every key
#:                                                             through the top-k selection)
#:   NN-descent  n * k * d * nndescent_s
#: PLACEHOLDERS until a device run of this code measures them (benchmarks/device_check.sh prints
#: the three from its knn-graph stage): exact_product_s is half the fp16 tensor-core peak of an
#: H100/H200 (1 / 2.5e14 multiply-adds per second), exact_select_s one key through the selection
#: (8 bytes written and read at ~3.2 TB/s), nndescent_s the previous GPU NN-descent's 11.7 s on the
#: one H200 run (500k x 128, k = 32, benchmarks/results/h200/knn_graph_gpu.json).
GPU_COST = {"exact_product_s": 4e-15, "exact_select_s": 2.5e-12, "nndescent_s": 5.7e-9}
# Square tile edge of the symmetric exact path on the CPU.
_TILE = 2048
# Rows per add_items / knn_query call on the hnsw path (progress granularity).
_HNSW_CHUNK = 16384
# NN-descent's stopping rule: a round that changes at most delta * n * k heap entries is the last.
NNDESCENT_DELTA = 0.001

_log = logging.getLogger("gpuhnsw")


def auto_method(n, d, k, device):
    """What ``method="auto"`` runs for ``n`` rows of width ``d`` and ``k`` neighbours on ``device``
    (``"cpu"`` or ``"cuda"``): (method, estimates) where ``estimates`` is None on the CPU (the
    ``AUTO_EXACT_LIMIT`` rule) and ``{"exact": s, "nndescent": s}`` on a GPU (``GPU_COST``)."""
    if device == "cpu":
        return ("exact" if float(n) * n * d <= AUTO_EXACT_LIMIT else "nndescent"), None
    c = GPU_COST
    estimates = {"exact": float(n) * n * (d * c["exact_product_s"] + c["exact_select_s"]),
                 "nndescent": float(n) * max(k, 1) * d * c["nndescent_s"]}
    return min(estimates, key=estimates.get), estimates


def nndescent_defaults(n, k, device="cpu"):
    """NN-descent parameters used where the caller passes None, as a dict: ``intermediate_degree``,
    ``n_trees``, ``leaf_size``, ``max_candidates``, ``n_iters``.

    Chosen with benchmarks/knn_graph.py so that the shared datasets reach recall@k >= 0.95 (on the
    CPU: mnist 0.99, minilm-debian 0.96 at k = 10). For small k the heaps keep up to 1.5 k
    neighbours (returning the best k), as cuVS's NN-descent does with its intermediate graph
    degree. On the CPU the forest is cheap (built breadth-first, leaves joined as distance tiles),
    so it gets many trees with large leaves, and more than 16 candidates per round buy little
    recall for their cost. The GPU path (``device="cuda"``) builds the same forest (median splits
    of random +-1 projections, all nodes of a level at once) and takes more candidates per round,
    which its batched products make cheap.
    """
    degree = max(k, min(int(round(1.5 * k)), 20))
    return dict(intermediate_degree=degree,
                n_trees=int(max(3, min(12, round(2.5 * np.log10(max(n, 2)))))),
                leaf_size=int(max(64, min(200, 8 * degree))),
                max_candidates=int(min(degree, 16) if device == "cpu"
                                   else min(60, max(20, degree + degree // 2))),
                n_iters=int(max(5, round(np.log2(max(n, 2))))))


def knn_graph(data, k, *, space="l2", method="auto", device="auto", include_self=False,
              squared=None, as_sparse=False, return_info=False, M=16, ef_construction=200, ef=None, n_trees=None,
              leaf_size=None, max_candidates=None, n_iters=None, intermediate_degree=None,
              delta=NNDESCENT_DELTA, storage="float32", num_threads=-1, progress=None, random_seed=DEFAULT_SEED):
    """The k nearest neighbours of every row of ``data`` among the other rows.

    Parameters
    ----------
    data : array_like, [n, d]
        Vectors (cast to float32 unless already float32 C-contiguous; must be finite). Row ``i``
        has id ``i``.
    k : int
        Neighbours per row: ``0 <= k <= n - 1``, or ``0 <= k <= n`` with ``include_self``.
    space : {"l2", "ip", "cosine"}
        L2 (squared or not: see ``squared``), ``1 - a.b``, ``1 - cos`` (hnswlib's definitions).
    method : {"auto", "exact", "nndescent", "hnsw"}
        ``"auto"``: on the CPU exact while ``n * n * d`` is small (``AUTO_EXACT_LIMIT``), else
        NN-descent; on a GPU the cheaper of the two by ``GPU_COST``'s estimates (``auto_method``).
    device : {"auto", "cpu", "cuda", "cuda:N"}
        Where the exact search, the NN-descent joins or the hnsw queries run.
    include_self : bool
        Column 0 holds the row itself (distance 0) and columns ``1..k-1`` its ``k - 1`` nearest
        other rows: the layout of UMAP's ``precomputed_knn`` and pynndescent's ``neighbor_graph``,
        whose l2 distances are euclidean (so the default of ``squared`` follows it), e.g.
        ``umap.UMAP(n_neighbors=15, precomputed_knn=(*knn_graph(x, 15, include_self=True), None))``.
    squared : bool, optional
        ``space="l2"`` only: squared L2 (True, the distance of :class:`gpuhnsw.Index` and hnswlib)
        or the euclidean distance (False, what UMAP, pynndescent and scikit-learn's
        ``"euclidean"`` use).  None: squared, except with ``include_self`` (euclidean).  The
        neighbours are the same either way.
    as_sparse : bool
        Return a ``scipy.sparse.csr_matrix`` [n, n] of distances (row ``i`` holds its ``k``
        neighbours, explicit zeros included) instead of the two arrays. Needs scipy.
    return_info : bool
        Also return a dict: ``method`` (the one that ran), ``device``, ``dist_evals`` (distance
        evaluations, or None where not counted), ``rounds`` (NN-descent), ``seconds``, ``phases``
        (GPU exact and NN-descent: seconds per phase, a dict; else None), ``estimates`` (``"auto"``
        on a GPU: the estimated seconds of ``exact`` and ``nndescent`` it chose between; else None),
        ``exact`` (GPU exact: the screening ``precision``, ``pool``, ``tiling``, ``redone`` rows and
        ``redo`` rounds of the certificate; else None). The same facts are logged at INFO level on
        the ``gpuhnsw`` logger.
    M, ef_construction : int
        HNSW build parameters (hnsw method only).
    ef : int, optional
        Beam width of the hnsw queries; default ``max(2 * (k + 1), 64)``.
    n_trees, leaf_size, max_candidates, n_iters, intermediate_degree : int, optional
        NN-descent: random-projection trees of the initial graph (0: a random initial graph),
        their leaf size, candidates sampled per row and round, the most rounds, and the neighbours
        kept per row while it runs (``>= k``; the best ``k`` are returned). None: see
        :func:`nndescent_defaults`.
    delta : float
        NN-descent stops after a round that changes at most ``delta * n * k`` entries.
    storage : {"float32", "float16", "int8"}
        NN-descent on the CPU: the rows its local joins read.  ``"float16"`` and ``"int8"`` join
        over a copy of the rows at half or a quarter of the bytes (int8: one scale for every
        dimension, so a pair's sum is an exact integer; integer data whose every dimension spans at
        most 256 values, such as image pixels or SIFT, is copied exactly); each row's final list is re-scored on the
        float32 rows, so the returned distances are float32 ones (``method="auto"`` then runs
        NN-descent).  See ``csrc/nndescent.c``.
    num_threads : int
        ``<= 0``: all cores.
    progress : bool, optional
        Show a tqdm progress bar (tiles, rows or NN-descent rounds). ``None``: only for large
        inputs when stderr is a terminal.
    random_seed : int
        Seeds NN-descent (its result depends on the seed only, not on the thread count) and the
        HNSW build.

    Returns
    -------
    neighbors : ndarray, int64 [n, k]
        Ids of the neighbours of each row, nearest first (never the row itself, except column 0
        with ``include_self``).
    distances : ndarray, float32 [n, k]
        Their distances, ascending; equal distances ordered by the smaller id.
    (or the CSR matrix with ``as_sparse``; then the info dict with ``return_info``)
    """
    space = check_space(space)
    if squared is None:
        squared = not include_self
    elif not isinstance(squared, (bool, np.bool_)):
        raise TypeError(f"squared must be a bool or None, got {type(squared).__name__}")
    elif not squared and space != "l2":
        raise ValueError(f"squared=False applies to space='l2' only (space is {space!r})")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    storage = check_storage(storage)
    if storage != "float32" and method not in ("auto", "nndescent"):
        raise ValueError(f"storage={storage!r} applies to method='nndescent' only, not {method!r}")
    x = as_vectors(data, what="data")
    n, d = x.shape
    k = as_int(k, "k")
    top = n if include_self else max(n - 1, 0)
    if not 0 <= k <= top:
        raise ValueError(f"k must be in [0, {'n' if include_self else 'n - 1'}] = [0, {top}], "
                         f"got {k}")
    num_threads = _num_workers(num_threads)      # checked (and <= 0 resolved) before the work
    if as_sparse:
        _import_scipy_sparse()                  # fail before the work, not after it
    dev = resolve_device(device)                 # ("cpu", None) or ("cuda", ordinal)
    estimates = None
    if method == "auto" and storage != "float32":
        method = "nndescent"                     # a compressed storage asks for NN-descent
    elif method == "auto":
        method, estimates = auto_method(n, d, k, dev[0])
    progress = _progress_wanted(progress, n, KNN_GRAPH_MIN_ROWS)
    info = dict(method=method, device="cpu" if dev[0] == "cpu" else f"cuda:{dev[1] or 0}",
                dist_evals=None, rounds=None, seconds=None, phases=None, estimates=estimates,
                exact=None)
    start = time.perf_counter()
    kk = k - 1 if include_self else k            # other rows to find
    if kk <= 0 or n <= 1:
        neighbors, distances = np.empty((n, 0), dtype=np.int64), np.empty((n, 0), dtype=np.float32)
        info["dist_evals"] = 0
    elif method == "nndescent":
        params = nndescent_defaults(n, kk, dev[0])
        given = dict(n_trees=n_trees, leaf_size=leaf_size, max_candidates=max_candidates,
                     n_iters=n_iters, intermediate_degree=intermediate_degree)
        params.update({key: as_int(v, key, minimum=0) for key, v in given.items() if v is not None})
        neighbors, distances = _nndescent_graph(x, kk, space, dev, params, float(delta),
                                                num_threads, progress, random_seed, info, storage)
    elif method == "exact":
        xs = normalize_rows(x) if space == "cosine" else x
        if dev[0] == "cuda":
            neighbors, distances = _exact_graph_gpu(xs, kk, space, dev, progress, info)
        else:
            neighbors, distances, info["dist_evals"] = _exact_graph_cpu(
                xs, kk, space, num_threads=num_threads, progress=progress)
    else:
        xs = normalize_rows(x) if space == "cosine" else x
        if ef is None:
            ef = max(2 * (kk + 1), 64)
        neighbors, distances = _hnsw_graph(xs, kk, space, device=device, M=M,
                                           ef_construction=ef_construction, ef=int(ef),
                                           num_threads=num_threads, progress=progress,
                                           random_seed=random_seed)
    if include_self and k > 0:
        neighbors = np.concatenate([np.arange(n, dtype=np.int64)[:, None], neighbors], axis=1)
        distances = np.concatenate([np.zeros((n, 1), dtype=np.float32), distances], axis=1)
    if space == "l2" and not squared:
        distances = np.sqrt(np.maximum(distances, 0, out=distances), out=distances)
    info["seconds"] = time.perf_counter() - start
    _log.info("knn_graph: n=%d k=%d method=%s%s device=%s dist_evals=%s rounds=%s %.3f s", n, k,
              info["method"], "" if estimates is None else
              " (auto: estimated exact %.3g s, nndescent %.3g s)" % (estimates["exact"], estimates["nndescent"]),
              info["device"], info["dist_evals"], info["rounds"], info["seconds"])
    out = (to_csr(neighbors, distances, n),) if as_sparse else (neighbors, distances)
    if return_info:
        out += (info,)
    return out[0] if len(out) == 1 else out


def _import_scipy_sparse():
    try:
        import scipy.sparse
    except ImportError:
        raise ImportError("as_sparse=True needs scipy: pip install scipy "
                          "(or gpuhnsw[sklearn])") from None
    return scipy.sparse


def to_csr(neighbors, distances, n_cols):
    """CSR distance graph [n, n_cols] from neighbors int64 [n, k] and distances float32 [n, k];
    every entry is stored, zeros included (a zero distance is an edge, not a missing one)."""
    n, k = neighbors.shape
    return _import_scipy_sparse().csr_matrix(
        (distances.ravel(), neighbors.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n_cols))


# --------------------------------------------------------------------------------------------------
# NN-descent
# --------------------------------------------------------------------------------------------------

def _nndescent_graph(x, k, space, dev, params, delta, num_threads, progress, seed, info, storage):
    """x [n, d] float32 C-contiguous (read in place); returns (ids int64 [n, k], dists f32 [n, k])."""
    n, d = x.shape
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if params["max_candidates"] < 1 or params["leaf_size"] < 2:
        raise ValueError("max_candidates must be >= 1 and leaf_size >= 2")
    if dev[0] == "cuda" and storage != "float32":
        raise ValueError(f"storage={storage!r} applies to NN-descent on the CPU (the GPU's joins are "
                         "matrix products over float32 rows)")
    if dev[0] == "cuda":
        from . import _nndescent_gpu
        return _nndescent_gpu.nndescent_graph(x, k, space, dev, params, delta, progress, seed,
                                              info)
    degree = min(max(params["intermediate_degree"], k), n - 1)
    ids = np.empty((n, degree), dtype=np.int64)
    dists = np.empty((n, degree), dtype=np.float32)
    with _Progress(progress, params["n_iters"], "NN-descent rounds") as bar:
        rounds, evals, _ = _core.nndescent(
            x, n, d, space, degree, params["max_candidates"], params["n_trees"],
            params["leaf_size"], params["n_iters"], delta, int(seed) & (2**64 - 1),
            _num_workers(num_threads), ids, dists, lambda r, updates: bar.to(r), storage)
    info.update(rounds=rounds, dist_evals=evals)
    if degree > k:                               # rows are sorted: the best k lead
        ids, dists = np.ascontiguousarray(ids[:, :k]), np.ascontiguousarray(dists[:, :k])
    return ids, dists


# --------------------------------------------------------------------------------------------------
# exact, GPU: device/brute.py's symmetric tiling

def _exact_graph_gpu(x, k, space, dev, progress, info):
    """x [n, d] float32 (normalised for cosine) uploaded once (``brute.ResidentBase``), then
    ``brute.graph``; fills ``info``'s phases, dist_evals and ``exact`` (the pool and the rows the
    certificate sent back)."""
    from .device import brute

    n = x.shape[0]
    info["phases"], info["exact"] = {}, {"tiling": "symmetric"}
    with import_cupy().cuda.Device(dev[1] or 0):
        base = brute.ResidentBase(x, space, DEFAULT_PRECISION, info["phases"])
        with _Progress(progress, n, "exact k-NN graph") as bar:
            out = brute.graph(base, k, tiling="symmetric", progress=bar.to, phases=info["phases"],
                              stats=info["exact"])
    info["dist_evals"] = n * n
    return out


# --------------------------------------------------------------------------------------------------
# exact, CPU: symmetric tiling
# --------------------------------------------------------------------------------------------------

def _exact_graph_cpu(x, k, space, *, num_threads=-1, progress=False, tile=None):
    """Exact graph of the (already normalised for cosine) float32 rows ``x`` [n, d].

    Tiles ``(i, j)`` with ``j >= i`` in row-major order; the product of one tile updates the pools
    of row block ``i`` (keys along its rows) and of row block ``j`` (keys along its columns).
    For l2 both blocks are centred on ``mu`` (``l2_centre``; a tile-sized float32 copy each, small
    beside the tile's product) and the keys are ``|b - mu|^2 - 2 (a - mu).(b - mu)``, which differs
    from ``|a - b|^2`` by ``|a - mu|^2``, fixed per row: their float32 error scales with the data's
    spread, not with its distance from the origin (``exact``'s module docstring).
    Returns (neighbors int64 [n, k], distances float32 [n, k], distance evaluations).
    """
    n = x.shape[0]
    tile = tile or _TILE
    pool = min(n, pool_size(k, n) + 1)                    # +1: a row's own slot is in its pool
    mu, sq32 = None, None
    if space == "l2":
        mu, sq32 = l2_centre(x)
    pools = CandidatePool(n, pool)
    evals = n * pool                                      # the float64 re-ranking
    seen = set()                                          # row blocks whose pools were offered
    starts = list(range(0, n, tile))
    pairs = [(i, j) for i in range(len(starts)) for j in range(i, len(starts))]
    with _Progress(progress, len(pairs), "exact k-NN graph (tiles)") as bar:
        for done, (i, j) in enumerate(pairs, 1):
            a0, a1 = starts[i], min(starts[i] + tile, n)
            b0, b1 = starts[j], min(starts[j] + tile, n)
            xa, xb = x[a0:a1], x[b0:b1]
            if mu is not None:
                xa = xa - mu
                xb = xa if i == j else xb - mu
            g = xa @ xb.T                                        # [ta, tb] float32 (sgemm)
            evals += g.size
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
    return neighbors, distances, evals


# --------------------------------------------------------------------------------------------------
# approximate: HNSW
# --------------------------------------------------------------------------------------------------

def _hnsw_graph(x, k, space, *, device, M, ef_construction, ef, num_threads, progress,
                random_seed):
    n, d = x.shape
    index = Index(space, d, device=device)
    index.init_index(max_elements=n, M=M, ef_construction=ef_construction,
                     random_seed=random_seed)
    index.set_ef(max(ef, k + 1))
    threads = num_threads if num_threads is not None and num_threads > 0 else -1
    ids = np.arange(n, dtype=np.int64)
    chunk = _HNSW_CHUNK if progress else n
    neighbors = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    # a GPU index builds GPU-assisted (its "auto" threshold would not see chunked inserts)
    build = "gpu" if index.device == "cuda" and n >= GPU_BUILD_MIN_ROWS else "auto"
    with _Progress(progress, 2 * n, "HNSW k-NN graph (build, then query)") as bar:
        for a in range(0, n, chunk):
            index.add_items(x[a:a + chunk], ids[a:a + chunk], num_threads=threads, build=build)
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
