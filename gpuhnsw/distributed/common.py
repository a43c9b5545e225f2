"""What the sharded index and the distributed k-NN graph share: the label hash that routes a row to
its shard, the top-k merge of per-shard results, a shard as a task's value, and the Dask plumbing
(row blocks of a Dask array, workers, threads per shard, waiting for tasks, atomic writes through
fsspec).

Dask and fsspec are imported here, and a missing one is an ImportError saying how to install it.
"""
from __future__ import annotations

import os
import threading

import numpy as np

try:
    import dask
    import dask.array as da
    import distributed
    import fsspec
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gpuhnsw.distributed needs Dask and fsspec: "
                      'pip install "gpuhnsw[distributed]"') from exc

from .._errors import InputShapeError
from .._surface import NO_LABEL
from .._validate import as_int, cpu_count, num_threads as num_threads_rule
from ..index import Index

__all__ = ["dask", "da", "distributed", "fsspec", "shard_of", "merge_topk", "split_by_shard", "is_dask",
           "row_blocks", "cluster_workers", "shard_threads", "raise_first_error", "Shard", "new_shard", "shard_add",
           "write_atomic", "pick"]


# --------------------------------------------------------------------------------------------------
# routing and merging (pure NumPy, used on the client and in tasks)
# --------------------------------------------------------------------------------------------------

def shard_of(labels, n_shards, seed=0):
    """The shard of each label: a 64-bit hash of the label, modulo ``n_shards``.

    Parameters
    ----------
    labels : array_like, uint64 [n]
    n_shards : int
    seed : int
        Mixed into the hash (``knn_graph`` uses its ``random_seed``; ``ShardedIndex`` uses 0).

    Returns
    -------
    ndarray, int64 [n]
    """
    x = np.asarray(labels, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64((int(seed) * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n_shards)).astype(np.int64)


def merge_topk(labels, distances, k):
    """Merge per-shard top-k lists into one top-k, ordered by (distance, label).

    Parameters
    ----------
    labels : sequence of ndarray, uint64 [nq, k_i]
        One entry per shard; padding is label ``2**64 - 1`` with distance ``inf``.
    distances : sequence of ndarray, float32 [nq, k_i]
    k : int

    Returns
    -------
    labels : ndarray, uint64 [nq, k]
    distances : ndarray, float32 [nq, k]
        Rows with fewer than ``k`` real results end in padding.
    """
    nq = labels[0].shape[0] if labels else 0
    lab = np.concatenate([np.asarray(x, dtype=np.uint64).reshape(nq, -1) for x in labels], axis=1) \
        if labels else np.zeros((0, 0), dtype=np.uint64)
    dst = np.concatenate([np.asarray(x, dtype=np.float32).reshape(nq, -1) for x in distances], axis=1) \
        if distances else np.zeros((0, 0), dtype=np.float32)
    width = lab.shape[1]
    if width < k:  # every shard together holds fewer than k: pad
        lab = np.concatenate([lab, np.full((nq, k - width), NO_LABEL, dtype=np.uint64)], axis=1)
        dst = np.concatenate([dst, np.full((nq, k - width), np.inf, dtype=np.float32)], axis=1)
    order = np.lexsort((lab, dst), axis=1)[:, :k]
    return np.take_along_axis(lab, order, axis=1), np.take_along_axis(dst, order, axis=1)


def split_by_shard(x, labels, shards, n_shards):
    """Rows of ``x`` [n, d] and ``labels`` [n] grouped by shard, in row order within each group."""
    order = np.argsort(shards, kind="stable")
    bounds = np.searchsorted(shards[order], np.arange(n_shards + 1))
    return [(x[order[a:b]], labels[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def is_dask(x):
    return isinstance(x, da.Array)


def row_blocks(data, dim=None):
    """A Dask array [n, d] as delayed row blocks (one column chunk) and their row offsets."""
    if data.ndim != 2 or (dim is not None and data.shape[1] != dim):
        raise InputShapeError(f"data must be a 2-D Dask array of width {dim}, got shape {data.shape}")
    if len(data.chunks[1]) > 1:
        data = data.rechunk({1: -1})
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])]).astype(np.int64)
    return list(data.to_delayed()[:, 0]), starts


def cluster_workers(client):
    workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        raise RuntimeError("the Dask cluster has no workers")
    return workers


def shard_threads(client, num_threads):
    """C threads per shard: ``num_threads`` (at least 1, at most ``_validate.thread_limit()``), or by
    default the cores of a worker's machine shared among its workers there."""
    if num_threads is not None:
        return num_threads_rule(as_int(num_threads, "num_threads", minimum=1))
    info = client.scheduler_info()["workers"]
    per_host = {}
    for w in info.values():
        per_host[w["host"]] = per_host.get(w["host"], 0) + 1
    cores = client.run(cpu_count)
    return max(1, min(c // per_host[info[w]["host"]] for w, c in cores.items() if w in info) or 1)


def raise_first_error(futures):
    """Wait for ``futures``; re-raise the first task error (in submission order)."""
    distributed.wait(futures)
    for f in futures:
        if f.status == "error":
            f.result()


# --------------------------------------------------------------------------------------------------
# a shard: a task's value on a worker
# --------------------------------------------------------------------------------------------------

class Shard:
    """One shard's :class:`Index` on a worker; Dask sizes it by ``__sizeof__`` (its arrays), so the
    scheduler runs later tasks of the chain where the shard already is."""

    __slots__ = ("index", "threads")

    def __init__(self, index, threads):
        self.index, self.threads = index, threads

    def __sizeof__(self):
        return self.index.memory_usage() + 128


def new_shard(space, dim, M, ef_construction, random_seed, device, threads):
    index = Index(space, dim, device=device)
    index.init_index(max_elements=0, M=M, ef_construction=ef_construction, random_seed=random_seed)
    return Shard(index, threads)


def shard_add(shard, *parts):
    """Insert the ``(vectors [m, d], labels [m])`` parts in order; capacity doubles as needed."""
    x = np.concatenate([p[0] for p in parts]) if len(parts) != 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) != 1 else parts[0][1]
    if x.shape[0]:
        index = shard.index
        need = index.element_count + x.shape[0]   # upper bound: updates need no new slot
        if need > index.max_elements:
            index.resize_index(max(need, 2 * index.max_elements))
        index.add_items(x, labels, num_threads=shard.threads)
    return shard


def write_atomic(url, blob):
    """Write ``blob`` to ``url`` through a temporary name and a rename (no half-written file)."""
    fs, path = fsspec.core.url_to_fs(url)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with fs.open(tmp, "wb") as f:
        f.write(blob)
    fs.mv(tmp, path)


def pick(parts, i):
    return parts[i]
