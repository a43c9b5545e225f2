"""The k-NN graph of a dataset on a Dask cluster (docs/architecture.md, "Distributed"): every
point's ``k`` nearest other points, from random shards (every point queried against every shard) or
overlapping k-means clusters (each point against its 2 clusters, with a sampled recall estimate).
Finished row blocks can be checkpointed, and a rerun computes only what is missing.
"""
from __future__ import annotations

import io
import json
import logging
import zipfile

import numpy as np

from .._progress import Progress, wanted as progress_wanted
from .._rows import l2_centre, normalize_rows
from .._surface import DEFAULT_SEED, NO_LABEL, NOT_FOUND
from .._validate import as_int, as_vectors, check_space
from ..bruteforce import BFIndex
from .common import (cluster_workers, da, dask, distributed, fsspec, is_dask, merge_topk, new_shard, pick,
                     raise_first_error, row_blocks, shard_add, shard_of, shard_threads, write_atomic)

__all__ = ["knn_graph", "METHODS"]

log = logging.getLogger(__name__)

GRAPH_MANIFEST_NAME = "knn_graph.json"
GRAPH_FORMAT = "gpuhnsw.knn_graph"
GRAPH_VERSION = 1
# Rows per block when knn_graph gets a NumPy array (a Dask array keeps its own row chunks).
_GRAPH_BLOCK_ROWS = 8192
NOT_FOUND_HINT = f"{NOT_FOUND}. Probably ef or M is too small"


METHODS = ("shards", "clusters")


def _build_index(space, dim, M, ef_construction, random_seed, device, threads, *parts):
    shard = new_shard(space, dim, M, ef_construction, random_seed, device, threads)
    return shard_add(shard, *parts)


def _graph_query(shard, pieces, k, ef):
    """Neighbours (``k + 1``: self is dropped at the merge) of the rows in ``pieces`` in one index.

    ``pieces`` is one ``(vectors, ids, local rows)`` tuple or a list of them (a whole routed block);
    returns (local rows int64 [m], labels uint64 [m, k+1], distances float32 [m, k+1]).
    """
    if isinstance(pieces, tuple):
        pieces = [pieces]
    x = np.concatenate([p[0] for p in pieces])
    rows = np.concatenate([p[2] for p in pieces])
    labels, dists = shard.index.knn_query(x, k=k + 1, ef=ef, pad=True, num_threads=shard.threads)
    return rows, labels, dists


def _graph_merge(n_rows, start, k, *parts):
    """Merge one block's results from every index: drop each row's own id and duplicates (a point
    stored in two clusters), keep the top ``k`` by (distance, id).  int64 / float32 [n_rows, k]."""
    width = sum(p[1].shape[1] for p in parts) or 1
    lab = np.full((n_rows, width), NO_LABEL, dtype=np.uint64)
    dst = np.full((n_rows, width), np.inf, dtype=np.float32)
    fill = np.zeros(n_rows, dtype=np.int64)
    for rows, labels, dists in parts:
        if rows.size == 0:
            continue
        w = labels.shape[1]
        cols = fill[rows, None] + np.arange(w)
        lab[rows[:, None], cols], dst[rows[:, None], cols] = labels, dists
        fill[rows] += w
    self_ids = np.arange(start, start + n_rows, dtype=np.uint64)
    drop = lab == self_ids[:, None]
    order = np.lexsort((lab, dst), axis=1)
    lab, dst, drop = (np.take_along_axis(a, order, axis=1) for a in (lab, dst, drop))
    dup = np.zeros_like(drop)
    dup[:, 1:] = (lab[:, 1:] == lab[:, :-1]) & (lab[:, 1:] != NO_LABEL)
    dst = np.where(drop | dup, np.inf, dst)
    lab = np.where(drop | dup, NO_LABEL, lab)
    order = np.lexsort((lab, dst), axis=1)[:, :k]
    lab, dst = np.take_along_axis(lab, order, axis=1), np.take_along_axis(dst, order, axis=1)
    if (lab == NO_LABEL).any():
        raise RuntimeError(NOT_FOUND_HINT + f" (rows {start}..{start + n_rows - 1} of the k-NN graph)")
    return lab.astype(np.int64), dst


def _route_rows(block, start, n_parts, seed, centroids, space):
    """Rows of one block per shard (hash of the row id) or per cluster (the 2 nearest centroids):
    a list of ``n_parts`` (vectors, ids, local rows)."""
    x = as_vectors(block)
    if space == "cosine":
        x = normalize_rows(x)
    ids = np.arange(start, start + x.shape[0], dtype=np.uint64)
    local = np.arange(x.shape[0], dtype=np.int64)
    if centroids is None:
        where = shard_of(ids, n_parts, seed)
        return [(x[where == s], ids[where == s], local[where == s]) for s in range(n_parts)]
    near = _nearest_centroids(x, centroids, space, 2)          # [m, 2]
    return [(x[m], ids[m], local[m]) for m in ((near == c).any(axis=1) for c in range(n_parts))]


def _nearest_centroids(x, centroids, space, n):
    """The ``n`` nearest centroids of each row of ``x`` [m, d] float32: int64 [m, n]. l2 ranks by
    ``|c - mu|^2 - 2 (x - mu).(c - mu)`` about the centroids' centre (``_rows.l2_centre``: keys
    ``|c|^2 - 2 x.c`` are rounding noise far from the origin), ip and cosine by ``-x.c``."""
    if space == "l2":
        mu, sq = l2_centre(centroids)
        key = sq[None, :] - 2 * ((x - mu) @ (centroids - mu).T)
    else:
        key = -(x @ centroids.T)
    n = min(n, centroids.shape[0])
    return np.argsort(key, axis=1, kind="stable")[:, :n]


def _kmeans(sample, c, space, seed, iters=20):
    """Lloyd's k-means on the client's sample [m, d] (cosine/ip: spherical); centroids [c, d]."""
    rng = np.random.default_rng(seed)
    cent = sample[rng.choice(sample.shape[0], size=c, replace=False)].copy()
    for _ in range(iters):
        assign = _nearest_centroids(sample, cent, space, 1)[:, 0]
        for j in range(c):
            members = sample[assign == j]
            if len(members):
                cent[j] = members.mean(axis=0)
        if space != "l2":
            cent = normalize_rows(cent)
    return cent.astype(np.float32)


def _sample_rows(block, start, picks):
    """Rows ``picks`` (global ids, int64) that fall in this block, as float32 [m, d]."""
    x = as_vectors(block)
    local = picks[(picks >= start) & (picks < start + x.shape[0])] - start
    return x[local]


def _exact_part(block, start, queries, k, space):
    """Exact top ``k + 1`` of ``queries`` [m, d] among one block's rows: ids uint64, dists float32."""
    x = as_vectors(block)
    exact = BFIndex(space, x.shape[1], device="cpu")
    exact.init_index(x.shape[0])
    exact.add_items(x, np.arange(start, start + x.shape[0], dtype=np.uint64))
    return exact.knn_query(queries, k=min(k + 1, x.shape[0]))


def _gather_rows(client, blocks, starts, picks):
    """Rows ``picks`` (sorted global ids, int64) of the blocked data, on the client: float32 [m, d]."""
    sample = dask.delayed(_sample_rows, pure=True)
    futures = client.compute([sample(b, int(a), picks) for b, a in zip(blocks, starts[:-1])])
    return np.concatenate(client.gather(futures))


def _cluster_centres(client, blocks, starts, c, space, seed):
    """k-means centroids [c, d] from a seeded sample of at most ``64 * c`` (>= 20,000) rows."""
    n = int(starts[-1])
    if c > n:
        raise ValueError(f"n_clusters={c} is more than the {n} rows")
    picks = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max(64 * c, 20_000)),
                                                        replace=False))
    x = _gather_rows(client, blocks, starts, picks)
    if space == "cosine":
        x = normalize_rows(x)
    return _kmeans(x, c, space, seed)


def _recall_estimate(client, blocks, starts, neighbors, k, space, m, seed):
    """recall@k of ``neighbors`` [n, k] on ``m`` seeded rows against exact search (every block).
    Returns (recall, rows sampled)."""
    n = int(starts[-1])
    m = min(int(m), n)
    if m <= 0:
        return None, 0
    picks = np.sort(np.random.default_rng(seed + 1).choice(n, size=m, replace=False))
    queries = _gather_rows(client, blocks, starts, picks)
    exact = dask.delayed(_exact_part, pure=True)
    parts = client.gather(client.compute([exact(b, int(a), queries, k, space)
                                          for b, a in zip(blocks, starts[:-1])]))
    labels = [np.asarray(p[0], dtype=np.uint64) for p in parts]
    dists = [np.where(lab == picks[:, None].astype(np.uint64), np.inf, np.asarray(p[1]))
             for lab, p in zip(labels, parts)]                   # the row itself is not a neighbour
    truth, _ = merge_topk(labels, dists, k)
    found = neighbors[picks].astype(np.uint64)
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
    return hits / (m * k), m


class _Checkpoint:
    """Finished blocks of a knn_graph run under an fsspec folder, with the run's parameters."""

    @staticmethod
    def saved_params(url):
        """The parameters of the run checkpointed under ``url``, or None."""
        fs, root = fsspec.core.url_to_fs(url)
        try:
            with fs.open(f"{root}/{GRAPH_MANIFEST_NAME}", "rb") as f:
                saved = json.loads(f.read())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or (saved.get("format"), saved.get("version")) != \
                (GRAPH_FORMAT, GRAPH_VERSION) or not isinstance(saved.get("params"), dict):
            return None
        return saved["params"]

    def __init__(self, url, params):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)
        path = f"{self.root}/{GRAPH_MANIFEST_NAME}"
        manifest = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "params": params}
        if self.fs.exists(path):
            if self.saved_params(url) != params:
                raise ValueError(f"{url} holds a checkpoint of a different knn_graph run "
                                 f"({path}); use another checkpoint_dir or remove it")
        else:
            write_atomic(self.fs.unstrip_protocol(path), json.dumps(manifest, indent=1).encode())
        self.shape = [(b - a, params["k"]) for a, b in params["blocks"]]

    def _path(self, b):
        return f"{self.root}/block-{b:06d}.npz"

    def read(self, b):
        """(neighbors int64, distances float32) of block ``b``, or None if missing or unreadable."""
        try:
            with self.fs.open(self._path(b), "rb") as f, np.load(f) as z:
                lab, dst = z["neighbors"], z["distances"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if lab.shape != self.shape[b] or dst.shape != self.shape[b] or lab.dtype != np.int64 \
                or dst.dtype != np.float32:
            return None
        return lab, dst

    def write(self, b, neighbors, distances):
        buf = io.BytesIO()
        np.savez(buf, neighbors=neighbors, distances=distances)
        write_atomic(self.fs.unstrip_protocol(self._path(b)), buf.getvalue())


def knn_graph(data, k, *, client, method="shards", space="l2", n_shards=None, n_clusters=None,
              M=16, ef_construction=200, ef=None, random_seed=DEFAULT_SEED, device="auto", num_threads=None,
              checkpoint_dir=None, recall_sample=1000, progress=None, return_info=False):
    """The ``k`` nearest other points of every row, computed on a Dask cluster.

    Parameters
    ----------
    data : ndarray or dask.array.Array, [n, d]
        Row ``i`` has id ``i``.  A Dask array is read by tasks block by block (its row chunks are
        the graph's blocks); a NumPy array is cut into blocks of ``_GRAPH_BLOCK_ROWS`` rows.
    k : int
        ``1 <= k <= n - 1``.
    client : distributed.Client
    method : {"shards", "clusters"}
        ``"shards"``: rows hashed into ``n_shards`` random shards (default: one per worker), one
        HNSW index each, every row queried against every shard for ``k + 1`` and the lists merged
        (self excluded, ties by smaller id): each shard is a smaller graph searched with the same
        ``ef``, so recall matches or beats one index over everything (up to the run-to-run noise
        of multithreaded builds).  ``"clusters"``: k-means on
        a sample (``n_clusters``, default 4 per worker), each row stored in the indexes of its 2
        nearest centroids and queried only against those 2: ``2 / n_clusters`` of the query work of
        ``"shards"`` with that many shards, but a neighbour across a third cluster is missed, so
        recall depends on how clustered the data is; it is always estimated (see Returns).
    space, M, ef_construction, random_seed, device, num_threads
        As for :class:`ShardedIndex`; ``random_seed`` also seeds the shard hash and k-means.
    ef : int, optional
        Query beam width; default ``max(2 * (k + 1), 64)`` as :func:`gpuhnsw.knn_graph`.
    checkpoint_dir : str, optional
        fsspec URL or path: each finished block is written there as it completes (from the
        client, as ``block-NNNNNN.npz``) with a manifest of the parameters; a rerun with the same
        data and parameters reads finished blocks and computes only the missing ones (no index is
        built when none is missing).  Different parameters raise ``ValueError``.
    recall_sample : int
        Rows whose exact neighbours are computed to estimate recall (``"clusters"`` always;
        ``"shards"`` only with ``return_info``); 0 turns the estimate off for ``"shards"``.
    progress : bool, optional
        A tqdm bar over blocks in the client (default: when stderr is a terminal).  Tasks also
        show in the Dask dashboard.
    return_info : bool
        Also return a dict: ``recall_estimate`` (recall@k of the sampled rows against exact search,
        or None), ``recall_sample``, ``blocks``, ``blocks_computed``, ``blocks_loaded``,
        ``n_indexes``, ``queries`` (point-vs-index queries run).

    Returns
    -------
    neighbors : ndarray, int64 [n, k]
    distances : ndarray, float32 [n, k]
    info : dict, only with ``return_info=True``
    """
    space = check_space(space)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if not is_dask(data):
        x = as_vectors(data, what="data")
        data = da.from_array(x, chunks=(_GRAPH_BLOCK_ROWS, -1))
    blocks, starts = row_blocks(data)
    n, dim = int(data.shape[0]), int(data.shape[1])
    k = as_int(k, "k")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, n - 1] = [1, {n - 1}], got {k}")
    workers = cluster_workers(client)
    given = n_shards if method == "shards" else n_clusters
    if given is not None:
        n_parts = as_int(given, "n_shards" if method == "shards" else "n_clusters", minimum=1)
    else:  # a resumed run keeps its shard count even if the cluster has changed size since
        saved = _Checkpoint.saved_params(checkpoint_dir) if checkpoint_dir is not None else None
        n_parts = saved["n_parts"] if saved and saved.get("method") == method else \
            (len(workers) if method == "shards" else 4 * len(workers))
    ef = max(2 * (k + 1), 64) if ef is None else as_int(ef, "ef", minimum=1)
    threads = shard_threads(client, num_threads)
    params = {"n": n, "dim": dim, "k": k, "method": method, "space": space, "n_parts": n_parts,
              "M": M, "ef_construction": ef_construction, "ef": ef, "random_seed": random_seed,
              "blocks": [[int(a), int(b)] for a, b in zip(starts[:-1], starts[1:])]}
    ckpt = _Checkpoint(checkpoint_dir, params) if checkpoint_dir is not None else None
    progress = progress_wanted(progress, len(blocks))
    neighbors = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    missing = []
    for b in range(len(blocks)):
        done = ckpt.read(b) if ckpt is not None else None
        if done is None:
            missing.append(b)
        else:
            neighbors[starts[b]:starts[b + 1]], distances[starts[b]:starts[b + 1]] = done
    info = {"blocks": len(blocks), "blocks_computed": len(missing),
            "blocks_loaded": len(blocks) - len(missing), "n_indexes": 0, "queries": 0,
            "recall_estimate": None, "recall_sample": 0}

    if missing:
        centroids = None
        if method == "clusters":
            centroids = _cluster_centres(client, blocks, starts, n_parts, space, random_seed)
        route = dask.delayed(_route_rows, pure=True)
        routed = client.compute([route(blk, int(a), n_parts, random_seed, centroids, space)
                                 for blk, a in zip(blocks, starts[:-1])])
        raise_first_error(routed)
        parts = [[client.submit(pick, r, p, pure=False) for r in routed] for p in range(n_parts)]
        # A build runs where most of its input is unless placed: pin index p to worker p mod W
        # (loosely), so the indexes spread.  Not with one worker: a loosely pinned task whose worker
        # is gone while no other worker runs stays unrunnable in Dask (see docs/architecture.md).
        place = (lambda p: {"workers": [workers[p % len(workers)]], "allow_other_workers": True}) \
            if len(workers) > 1 else (lambda p: {})
        indexes = [client.submit(_build_index, space, dim, M, ef_construction, random_seed, device,
                                 threads, *parts[p], pure=False, **place(p))
                   for p in range(n_parts)]
        info["n_indexes"] = n_parts
        merged = {}
        for b in missing:
            # "shards": the whole routed block goes to every index; "clusters": each index gets
            # only the rows of the block that belong to its cluster
            qs = [client.submit(_graph_query, indexes[p], routed[b] if method == "shards" else parts[p][b],
                                k, ef, pure=False)
                  for p in range(n_parts)]
            merged[client.submit(_graph_merge, int(starts[b + 1] - starts[b]), int(starts[b]), k, *qs,
                                 pure=False)] = b
        with Progress(progress, len(missing), f"distributed k-NN graph ({method})") as bar:
            for count, (fut, result) in enumerate(distributed.as_completed(merged, with_results=True,
                                                                           raise_errors=True), 1):
                b = merged[fut]
                lab, dst = result
                neighbors[starts[b]:starts[b + 1]], distances[starts[b]:starts[b + 1]] = lab, dst
                if ckpt is not None:
                    ckpt.write(b, lab, dst)
                fut.release()
                bar.to(count)
        info["queries"] = int(sum(int(starts[b + 1] - starts[b]) for b in missing)) * \
            (n_parts if method == "shards" else 2)
    if method == "clusters" or (return_info and recall_sample):
        est, m = _recall_estimate(client, blocks, starts, neighbors, k, space, recall_sample,
                                  random_seed)
        info["recall_estimate"], info["recall_sample"] = est, m
        if method == "clusters":
            log.info("knn_graph(method='clusters'): sampled recall@%d = %.4f over %d rows", k, est, m)
    if return_info:
        return neighbors, distances, info
    return neighbors, distances
