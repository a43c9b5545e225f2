"""gpuhnsw beyond one machine, on Dask (DESIGN section 9; docs/architecture.md, "Distributed").

``pip install "gpuhnsw[distributed]"``.  The core library never imports this module (nor Dask).

ShardedIndex
    One :class:`gpuhnsw.Index` per shard, each the value of a Dask task on one worker.  A label lives
    in exactly one shard, chosen by a hash of the label (:func:`shard_of`), so the same data, seed
    and shard count always give the same shards whatever the arrival order.  Each shard is the end
    of a *task chain*: ``create -> add -> add -> delete -> ...``; every task takes the shard before
    it and returns it updated.  Only the newest future of each chain is held; the scheduler keeps
    the chain's task specs, so a shard lost with its worker is rebuilt by replaying its chain (from
    the data blocks, or from the checkpoint a :meth:`ShardedIndex.load` started from).  Base vectors
    reach the workers inside task specs or as tasks reading a Dask array, never by ``scatter``.
knn_graph
    Every point's ``k`` nearest other points: random shards (every point queried against every
    shard) or overlapping k-means clusters (each point against its 2 clusters, with a sampled recall
    estimate).  Finished row blocks can be checkpointed, and a rerun computes only what is missing.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import zipfile

import numpy as np

try:
    import dask
    import dask.array as da
    import distributed
    import fsspec
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gpuhnsw.distributed needs Dask and fsspec: "
                      'pip install "gpuhnsw[distributed]"') from exc

from ._errors import IndexFileError, InputShapeError
from ._progress import Progress, stderr_is_tty
from ._validate import (as_int, as_label, as_labels, as_vectors, check_dim, check_space, cpu_count,
                        num_threads as num_threads_rule)
from .index import PAD_LABEL, Index

__all__ = ["ShardedIndex", "knn_graph", "shard_of", "merge_topk", "MANIFEST_VERSION"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gpuhnsw.ShardedIndex"
MANIFEST_VERSION = 2   # 2: the manifest's own sha256 and the total counts; 1 is still read
GRAPH_MANIFEST_NAME = "knn_graph.json"
GRAPH_FORMAT = "gpuhnsw.knn_graph"
GRAPH_VERSION = 1
# The label hash (splitmix64's finaliser): routing must never depend on arrival order or workers.
ROUTING = "splitmix64(label + seed * 0x9E3779B97F4A7C15) mod n_shards"
_NOT_FOUND = "Cannot return the results in a contiguous 2D array. Probably ef or M is too small"
# Rows per block when knn_graph gets a NumPy array (a Dask array keeps its own row chunks).
_GRAPH_BLOCK_ROWS = 8192


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
        lab = np.concatenate([lab, np.full((nq, k - width), PAD_LABEL, dtype=np.uint64)], axis=1)
        dst = np.concatenate([dst, np.full((nq, k - width), np.inf, dtype=np.float32)], axis=1)
    order = np.lexsort((lab, dst), axis=1)[:, :k]
    return np.take_along_axis(lab, order, axis=1), np.take_along_axis(dst, order, axis=1)


def _split_by_shard(x, labels, shards, n_shards):
    """Rows of ``x`` [n, d] and ``labels`` [n] grouped by shard, in row order within each group."""
    order = np.argsort(shards, kind="stable")
    bounds = np.searchsorted(shards[order], np.arange(n_shards + 1))
    return [(x[order[a:b]], labels[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def _is_dask(x):
    return isinstance(x, da.Array)


def _row_blocks(data, dim=None):
    """A Dask array [n, d] as delayed row blocks (one column chunk) and their row offsets."""
    if data.ndim != 2 or (dim is not None and data.shape[1] != dim):
        raise InputShapeError(f"data must be a 2-D Dask array of width {dim}, got shape {data.shape}")
    if len(data.chunks[1]) > 1:
        data = data.rechunk({1: -1})
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])]).astype(np.int64)
    return list(data.to_delayed()[:, 0]), starts


def _workers(client):
    workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        raise RuntimeError("the Dask cluster has no workers")
    return workers


def _shard_threads(client, num_threads):
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


def _raise_first_error(futures):
    """Wait for ``futures``; re-raise the first task error (in submission order)."""
    distributed.wait(futures)
    for f in futures:
        if f.status == "error":
            f.result()


# --------------------------------------------------------------------------------------------------
# worker side: every function below runs inside a task; a shard is a task's value
# --------------------------------------------------------------------------------------------------

class _Shard:
    """One shard's :class:`Index` on a worker; Dask sizes it by ``__sizeof__`` (its arrays), so the
    scheduler runs later tasks of the chain where the shard already is."""

    __slots__ = ("index", "threads")

    def __init__(self, index, threads):
        self.index, self.threads = index, threads

    def __sizeof__(self):
        return self.index.memory_usage() + 128


def _new_shard(space, dim, M, ef_construction, random_seed, device, threads):
    index = Index(space, dim, device=device)
    index.init_index(max_elements=0, M=M, ef_construction=ef_construction, random_seed=random_seed)
    return _Shard(index, threads)


def _shard_add(shard, *parts):
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


def _shard_delete(shard, labels):
    for label in labels.tolist():
        shard.index.mark_deleted(label)
    return shard


def _shard_query(shard, q, k, ef, allowed, callable_filter):
    """Top ``k`` of the shard for queries ``q`` [nq, d], padded (uint64, float32 [nq, k])."""
    filt = callable_filter if callable_filter is not None else allowed
    return shard.index.knn_query(q, k=k, ef=ef, filter=filt, pad=True, num_threads=shard.threads)


def _shard_len(shard):
    return len(shard.index)


def _shard_contains(shard, labels):
    return np.array([label in shard.index for label in labels.tolist()], dtype=bool)


def _shard_get_items(shard, labels):
    return shard.index.get_items(labels)


def _shard_labels(shard):
    return np.asarray(shard.index.get_ids_list(), dtype=np.uint64)


def _shard_bytes(shard):
    """The shard in the library's own format (bytes) and its manifest entry."""
    index = shard.index
    buf = io.BytesIO()
    index.save_index(buf)
    blob = buf.getvalue()
    labels = _shard_labels(shard)
    meta = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "elements": len(index), "count": index.element_count,
            "label_min": int(labels.min()) if labels.size else None,
            "label_max": int(labels.max()) if labels.size else None}
    return blob, meta


def _write_atomic(url, blob):
    """Write ``blob`` to ``url`` through a temporary name and a rename (no half-written file)."""
    fs, path = fsspec.core.url_to_fs(url)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with fs.open(tmp, "wb") as f:
        f.write(blob)
    fs.mv(tmp, path)


def _shard_save(shard, url, via_client):
    blob, meta = _shard_bytes(shard)
    if via_client:
        return meta, blob
    _write_atomic(url, blob)
    return meta, None


def _shard_load(url, blob, meta, shard_no, n_shards, space, dim, device, threads):
    """A shard from its file (or from ``blob`` for process-local filesystems), checked against the
    manifest entry ``meta``: size, sha256, element count, and that every label routes here."""
    if blob is None:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f:
            blob = f.read()
    if len(blob) != meta["bytes"] or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise IndexFileError(f"{url}: size or sha256 differs from the manifest (corrupted or replaced)")
    index = Index(space, dim, device=device)
    buf = io.BytesIO(blob)
    buf.name = url   # the file's errors name the shard's URL
    index.load_index(buf)
    shard = _Shard(index, threads)
    labels = _shard_labels(shard)
    if index.element_count != meta["count"] or len(index) != meta["elements"]:
        raise IndexFileError(f"{url}: element counts differ from the manifest")
    if labels.size and (shard_of(labels, n_shards) != shard_no).any():
        raise IndexFileError(f"{url}: holds labels that belong to another shard (files swapped?)")
    return shard


def _route_block(block, labels, start, dim, n_shards, seed):
    """Validate one data block and split it by shard: a list of ``n_shards`` (vectors, labels)."""
    x = as_vectors(block, dim)
    if labels is None:
        labels = np.arange(start, start + x.shape[0], dtype=np.uint64)
    else:
        labels = as_labels(labels, x.shape[0])
    return _split_by_shard(x, labels, shard_of(labels, n_shards, seed), n_shards)


def _pick(parts, i):
    return parts[i]


def _merge_parts(k, pad, *parts):
    """Merge ``(labels, distances)`` results of every shard for one query block."""
    labels, dists = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
    if not pad and k and (labels[:, -1] == PAD_LABEL).any():
        raise RuntimeError(_NOT_FOUND)
    return labels, dists


# --------------------------------------------------------------------------------------------------
# ShardedIndex
# --------------------------------------------------------------------------------------------------

class ShardedIndex:
    """An HNSW index split into shards over the workers of a Dask cluster.

    Parameters
    ----------
    client : distributed.Client
    space : {"l2", "ip", "cosine"}
    dim : int
    n_shards : int, optional
        Default: one per worker.  Fixed for the life of the index (routing depends on it).  The Dask
        scheduler places the shards (empty shards go to idle workers; every later task of a shard
        runs where it is), see docs/architecture.md, section 5.
    M, ef_construction, random_seed : int
        Every shard's HNSW parameters (one seed for all shards).
    device : {"auto", "cpu", "cuda", "cuda:N"}
        Where each shard's queries run, resolved on its worker.
    num_threads : int, optional
        C engine threads per shard.  Default: the cores of each worker's machine divided by the
        workers on it (GPU workers: run one worker per GPU with ``threads_per_worker=1``, as
        ``dask-cuda`` does, and this gives each GPU its share of the cores).  With 1 thread a build
        is bit-for-bit reproducible; with more, the graph (not the routing) varies a little, as a
        single multithreaded ``Index`` does.

    Notes
    -----
    Mutating calls (``add_items``, ``mark_deleted``) are serialised by a lock in this object and
    return when every shard has applied them.  Queries may run beside them; as with ``Index``, a
    query running beside an insert may see part of it.
    """

    def __init__(self, client, space, dim, *, n_shards=None, M=16, ef_construction=200,
                 random_seed=100, device="auto", num_threads=None):
        self._client = client
        self._space, self._dim = check_space(space), check_dim(dim)
        workers = _workers(client)
        self._n_shards = len(workers) if n_shards is None else as_int(n_shards, "n_shards", minimum=1)
        self._params = {"M": as_int(M, "M", minimum=2),
                        "ef_construction": as_int(ef_construction, "ef_construction", minimum=0),
                        "random_seed": as_int(random_seed, "random_seed", minimum=0)}
        self._device = device
        self._threads = _shard_threads(client, num_threads)
        self._lock = threading.Lock()
        self._cur_l = 0
        self.ef = 10
        self._shards = [self._submit(_new_shard, self._space, self._dim, self._params["M"],
                                     self._params["ef_construction"], self._params["random_seed"],
                                     device, self._threads)
                        for _ in range(self._n_shards)]
        _raise_first_error(self._shards)

    def _submit(self, fn, *args):
        """A task without worker restrictions: it runs where its shard is (Dask sizes a shard by
        its arrays), and anywhere once that worker is lost."""
        return self._client.submit(fn, *args, pure=False)

    # ------------------------------------------------------------------------------ writes
    def add_items(self, data, ids=None):
        """Insert rows (an existing label is updated in the shard that holds it).

        Parameters
        ----------
        data : ndarray or dask.array.Array, float32-castable [n, dim]
            A Dask array is read by tasks block by block (never gathered on the client).  NumPy
            rows travel inside the task specs, which the scheduler keeps so that a lost shard can
            be rebuilt (Dask warns about graphs over 10 MB: for large data pass a Dask array that
            reads from storage).
        ids : array_like or dask.array.Array, uint64 [n], optional
            Default: consecutive labels continuing from the previous call (as hnswlib).

        Two phases: every block is validated and split by shard first; only when all of that
        succeeded do the shards change, so bad input (NaN, wrong width) changes nothing.
        """
        with self._lock:
            if _is_dask(data):
                parts, rows = self._route_dask(data, ids)
            else:
                x = as_vectors(data, self._dim)
                rows = x.shape[0]
                labels = np.arange(self._cur_l, self._cur_l + rows, dtype=np.uint64) if ids is None \
                    else as_labels(ids, rows)
                parts = [[p] for p in _split_by_shard(x, labels, shard_of(labels, self._n_shards),
                                                      self._n_shards)]
            new = [self._submit(_shard_add, self._shards[s], *parts[s])
                   for s in range(self._n_shards)]
            try:
                _raise_first_error(new)
            finally:  # a shard whose add failed keeps its previous state
                self._shards = [n if n.status == "finished" else o for n, o in zip(new, self._shards)]
            self._cur_l += rows

    def _route_dask(self, data, ids):
        """Phase one for a Dask array: per-shard lists of futures of (vectors, labels) parts."""
        blocks, starts = _row_blocks(data, self._dim)
        if ids is None:
            id_blocks = [None] * len(blocks)
        elif _is_dask(ids):
            id_blocks = list(ids.rechunk((data.chunks[0],)).to_delayed())
        else:
            labels = as_labels(ids, int(starts[-1]))
            id_blocks = [labels[a:b] for a, b in zip(starts[:-1], starts[1:])]
        route = dask.delayed(_route_block, pure=True)
        routed = self._client.compute([route(b, i, self._cur_l + int(a), self._dim, self._n_shards, 0)
                                       for b, i, a in zip(blocks, id_blocks, starts[:-1])])
        _raise_first_error(routed)
        parts = [[self._client.submit(_pick, r, s, pure=False) for r in routed]
                 for s in range(self._n_shards)]
        return parts, int(starts[-1])

    def mark_deleted(self, labels):
        """Hide one label or an array of labels from results.  A label not in the index raises
        ``RuntimeError`` and nothing is deleted."""
        labels = as_labels(labels) if np.ndim(labels) else np.array([as_label(labels, TypeError)],
                                                                     dtype=np.uint64)
        with self._lock:
            shards = shard_of(labels, self._n_shards)
            present = self._per_shard(labels, _shard_contains)
            if not all(p.all() for p in present):
                missing = np.concatenate([labels[shards == s][~p] for s, p in enumerate(present)])
                raise RuntimeError(f"Label not found: {int(missing[0])}")
            new = {s: self._submit(_shard_delete, self._shards[s], labels[shards == s])
                   for s in np.unique(shards).tolist()}
            _raise_first_error(list(new.values()))
            for s, f in new.items():
                self._shards[s] = f

    def _per_shard(self, labels, fn):
        """``fn(shard, labels of that shard)`` for every shard, gathered (list per shard)."""
        shards = shard_of(labels, self._n_shards)
        current = list(self._shards)
        futures = [self._submit(fn, current[s], labels[shards == s]) for s in range(self._n_shards)]
        return self._client.gather(futures)

    # ------------------------------------------------------------------------------ queries
    def knn_query(self, q, k=1, *, ef=None, filter=None, pad=False):
        """The ``k`` nearest labels of each query over all shards.

        Parameters
        ----------
        q : ndarray or dask.array.Array, [nq, dim]
        k : int
        ef : int, optional
            Beam width in every shard (default ``self.ef``; ``max(ef, k)`` is used).
        filter : callable or array_like of labels, optional
            A callable (pickled to every worker) or the allowed labels (routed to their shards).
        pad : bool
            Where fewer than ``k`` are found: label ``2**64-1``, distance ``inf`` instead of
            ``RuntimeError``.

        Returns
        -------
        labels : uint64 [nq, k]
        distances : float32 [nq, k]
            Ordered by (distance, label).  NumPy in gives NumPy out; a Dask array in gives lazy
            Dask arrays out (chunked as ``q``'s rows), computed against the shards as they are then.
        """
        k = as_int(k, "k", minimum=0)
        ef = self.ef if ef is None else as_int(ef, "ef", minimum=1)
        allowed, call = [None] * self._n_shards, None
        if callable(filter):
            call = filter
        elif filter is not None:
            labels = as_labels(filter)
            shards = shard_of(labels, self._n_shards)
            allowed = [labels[shards == s] for s in range(self._n_shards)]
        current = list(self._shards)
        if _is_dask(q):
            return self._knn_query_dask(q, k, ef, allowed, call, pad, current)
        q = as_vectors(q, self._dim, what="query")
        futures = [self._submit(_shard_query, current[s], q, k, ef, allowed[s], call)
                   for s in range(self._n_shards)]
        return _merge_parts(k, pad, *self._client.gather(futures))

    def _knn_query_dask(self, q, k, ef, allowed, call, pad, current):
        blocks, starts = _row_blocks(q, self._dim)
        query = dask.delayed(_shard_query, pure=True)
        merge = dask.delayed(_merge_parts, pure=True, nout=2)
        out_l, out_d = [], []
        for b, n in zip(blocks, np.diff(starts).tolist()):
            valid = dask.delayed(as_vectors, pure=True)(b, self._dim, "query")
            lab, dst = merge(k, pad, *[query(current[s], valid, k, ef, allowed[s], call)
                                       for s in range(self._n_shards)])
            out_l.append(da.from_delayed(lab, shape=(n, k), dtype=np.uint64))
            out_d.append(da.from_delayed(dst, shape=(n, k), dtype=np.float32))
        return da.concatenate(out_l), da.concatenate(out_d)

    # ------------------------------------------------------------------------------ reads
    def __len__(self):
        """Live (not deleted) elements over all shards."""
        return sum(self.shard_sizes())

    def __contains__(self, label):
        try:
            label = as_label(label)
        except (TypeError, OverflowError):
            return False
        s = int(shard_of(np.array([label], dtype=np.uint64), self._n_shards)[0])
        f = self._submit(_shard_contains, self._shards[s], np.array([label], dtype=np.uint64))
        return bool(f.result()[0])

    def get_items(self, ids):
        """Stored vectors of ``ids`` (cosine: normalised), float32 [n, dim], in the order of ``ids``.
        A missing label raises ``RuntimeError``."""
        labels = as_labels(ids)
        shards = shard_of(labels, self._n_shards)
        out = np.empty((labels.shape[0], self._dim), dtype=np.float32)
        for s, rows in enumerate(self._per_shard(labels, _shard_get_items)):
            out[shards == s] = rows
        return out

    def set_ef(self, ef):
        self.ef = as_int(ef, "ef", minimum=0)

    @property
    def n_shards(self):
        return self._n_shards

    @property
    def num_threads(self):
        """C engine threads each shard uses."""
        return self._threads

    @property
    def space(self):
        return self._space

    @property
    def dim(self):
        return self._dim

    def shard_sizes(self):
        """Live elements per shard (int list)."""
        futures = [self._submit(_shard_len, f) for f in list(self._shards)]
        return [int(x) for x in self._client.gather(futures)]

    def __repr__(self):
        return (f"<gpuhnsw.distributed.ShardedIndex(space='{self._space}', dim={self._dim}, "
                f"n_shards={self._n_shards})>")

    # ------------------------------------------------------------------------------ persistence
    def save(self, path):
        """Write every shard in the library's own checksummed format, in parallel from the workers,
        then ``manifest.json`` (last, so a folder without it is an incomplete save).

        ``path`` is an fsspec URL or local path (``file://``, ``memory://``, ``s3://``, ...) that
        every worker can reach.  A process-local filesystem (``memory://``) is written from the
        client instead (the shard bytes travel to it).
        """
        fs, root = fsspec.core.url_to_fs(path)
        via_client = "memory" in _protocols(fs)
        fs.makedirs(root, exist_ok=True)
        with self._lock:
            names = [f"shard-{s:05d}.ghnsw" for s in range(self._n_shards)]
            urls = [fs.unstrip_protocol(f"{root}/{name}") for name in names]
            futures = [self._submit(_shard_save, f, urls[s], via_client)
                       for s, f in enumerate(self._shards)]
            results = self._client.gather(futures)
            entries = []
            for name, url, (meta, blob) in zip(names, urls, results):
                if blob is not None:
                    _write_atomic(url, blob)
                entries.append({"file": name, **meta})
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "space": self._space,
                        "dim": self._dim, **self._params, "n_shards": self._n_shards,
                        "routing": ROUTING, "ef": self.ef, "next_label": self._cur_l,
                        "count": sum(e["count"] for e in entries),
                        "elements": sum(e["elements"] for e in entries), "shards": entries}
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            _write_atomic(fs.unstrip_protocol(f"{root}/{MANIFEST_NAME}"),
                          json.dumps(manifest, indent=1).encode())

    @classmethod
    def load(cls, client, path, *, device="auto", num_threads=None):
        """Load a saved ``ShardedIndex`` onto this cluster's workers (any number of them: the shard
        count stays as saved, the scheduler spreads the shards).  Every shard is checked against the
        manifest (size, sha256, counts, routing) and by the library's own file checks; any mismatch
        raises :class:`gpuhnsw.IndexFileError` naming the file."""
        fs, root = fsspec.core.url_to_fs(path)
        try:
            with fs.open(f"{root}/{MANIFEST_NAME}", "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise IndexFileError(f"{path}: no {MANIFEST_NAME} (not a saved ShardedIndex, or the "
                                 "save did not finish)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise IndexFileError(f"{path}/{MANIFEST_NAME}: not valid JSON ({exc})") from None
        _check_manifest(manifest, path)
        self = cls.__new__(cls)
        self._client = client
        self._space, self._dim = manifest["space"], manifest["dim"]
        self._n_shards = manifest["n_shards"]
        self._params = {key: manifest[key] for key in ("M", "ef_construction", "random_seed")}
        self._device = device
        self._threads = _shard_threads(client, num_threads)
        self._lock = threading.Lock()
        self._cur_l = manifest["next_label"]
        self.ef = manifest["ef"]
        via_client = "memory" in _protocols(fs)
        self._shards = []
        for s, entry in enumerate(manifest["shards"]):
            url = fs.unstrip_protocol(f"{root}/{entry['file']}")
            if not fs.exists(f"{root}/{entry['file']}"):
                raise IndexFileError(f"{url}: shard file missing")
            blob = None
            if via_client:
                with fs.open(f"{root}/{entry['file']}", "rb") as f:
                    blob = f.read()
            self._shards.append(self._submit(_shard_load, url, blob, entry, s, self._n_shards,
                                             self._space, self._dim, device, self._threads))
        _raise_first_error(self._shards)
        return self


def _protocols(fs):
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _manifest_digest(m):
    """sha256 of the manifest without its own digest, over its canonical JSON (sorted keys)."""
    rest = {key: value for key, value in m.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_manifest(m, path):
    """A manifest that an edit or damage changed is refused: version 2 carries its own sha256 and the
    total counts that the shard entries must add up to (a shard list cut together with n_shards
    passes every shard's own checks, and would load part of the index)."""
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise IndexFileError(f"{path}: not a gpuhnsw ShardedIndex manifest")
    if m.get("version") not in (1, MANIFEST_VERSION):
        raise IndexFileError(f"{path}: manifest version {m.get('version')!r} is not supported "
                             f"(this gpuhnsw reads versions 1 to {MANIFEST_VERSION})")
    if m["version"] >= 2 and m.get("manifest_sha256") != _manifest_digest(m):
        raise IndexFileError(f"{path}/{MANIFEST_NAME}: its sha256 does not match its content (edited or "
                             "damaged since the save); nothing was loaded")
    if m.get("routing") != ROUTING:
        raise IndexFileError(f"{path}: unknown label routing {m.get('routing')!r}")
    try:
        check_space(m["space"]), check_dim(m["dim"])
        for key in ("M", "ef_construction", "random_seed", "n_shards", "ef", "next_label"):
            as_int(m[key], key, minimum=0)
        shards = m["shards"]
        if len(shards) != m["n_shards"] or m["n_shards"] < 1:
            raise ValueError(f"{len(shards)} shard entries for n_shards={m['n_shards']}")
        for s, e in enumerate(shards):
            if e["file"] != f"shard-{s:05d}.ghnsw" or not isinstance(e["sha256"], str):
                raise ValueError(f"shard entry {s} is malformed")
            for key in ("bytes", "elements", "count"):
                as_int(e[key], key, minimum=0)
        if m["version"] >= 2:
            for key in ("count", "elements"):
                if as_int(m[key], key, minimum=0) != sum(e[key] for e in shards):
                    raise ValueError(f"the shards hold {sum(e[key] for e in shards)} {key}, the manifest "
                                     f"says {m[key]}")
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFileError(f"{path}: inconsistent manifest ({exc})") from None


# --------------------------------------------------------------------------------------------------
# knn_graph
# --------------------------------------------------------------------------------------------------

METHODS = ("shards", "clusters")


def _build_index(space, dim, M, ef_construction, random_seed, device, threads, *parts):
    shard = _new_shard(space, dim, M, ef_construction, random_seed, device, threads)
    return _shard_add(shard, *parts)


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
    lab = np.full((n_rows, width), PAD_LABEL, dtype=np.uint64)
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
    dup[:, 1:] = (lab[:, 1:] == lab[:, :-1]) & (lab[:, 1:] != PAD_LABEL)
    dst = np.where(drop | dup, np.inf, dst)
    lab = np.where(drop | dup, PAD_LABEL, lab)
    order = np.lexsort((lab, dst), axis=1)[:, :k]
    lab, dst = np.take_along_axis(lab, order, axis=1), np.take_along_axis(dst, order, axis=1)
    if (lab == PAD_LABEL).any():
        raise RuntimeError(_NOT_FOUND + f" (rows {start}..{start + n_rows - 1} of the k-NN graph)")
    return lab.astype(np.int64), dst


def _route_rows(block, start, n_parts, seed, centroids, space):
    """Rows of one block per shard (hash of the row id) or per cluster (the 2 nearest centroids):
    a list of ``n_parts`` (vectors, ids, local rows)."""
    x = as_vectors(block)
    if space == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    ids = np.arange(start, start + x.shape[0], dtype=np.uint64)
    local = np.arange(x.shape[0], dtype=np.int64)
    if centroids is None:
        where = shard_of(ids, n_parts, seed)
        return [(x[where == s], ids[where == s], local[where == s]) for s in range(n_parts)]
    near = _nearest_centroids(x, centroids, space, 2)          # [m, 2]
    return [(x[m], ids[m], local[m]) for m in ((near == c).any(axis=1) for c in range(n_parts))]


def _nearest_centroids(x, centroids, space, n):
    """The ``n`` nearest centroids of each row of ``x`` [m, d]: int64 [m, n]."""
    g = x @ centroids.T
    key = (np.einsum("ij,ij->i", centroids, centroids)[None, :] - 2 * g) if space == "l2" else -g
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
            cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-30)
    return cent.astype(np.float32)


def _sample_rows(block, start, picks):
    """Rows ``picks`` (global ids, int64) that fall in this block, as float32 [m, d]."""
    x = as_vectors(block)
    local = picks[(picks >= start) & (picks < start + x.shape[0])] - start
    return x[local]


def _exact_part(block, start, queries, k, space):
    """Exact top ``k + 1`` of ``queries`` [m, d] among one block's rows: ids uint64, dists float32."""
    from .bruteforce import BFIndex
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
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
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
            _write_atomic(self.fs.unstrip_protocol(path), json.dumps(manifest, indent=1).encode())
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
        _write_atomic(self.fs.unstrip_protocol(self._path(b)), buf.getvalue())


def knn_graph(data, k, *, client, method="shards", space="l2", n_shards=None, n_clusters=None,
              M=16, ef_construction=200, ef=None, random_seed=100, device="auto", num_threads=None,
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
    if not _is_dask(data):
        x = as_vectors(data, what="data")
        data = da.from_array(x, chunks=(_GRAPH_BLOCK_ROWS, -1))
    blocks, starts = _row_blocks(data)
    n, dim = int(data.shape[0]), int(data.shape[1])
    k = as_int(k, "k")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, n - 1] = [1, {n - 1}], got {k}")
    workers = _workers(client)
    given = n_shards if method == "shards" else n_clusters
    if given is not None:
        n_parts = as_int(given, "n_shards" if method == "shards" else "n_clusters", minimum=1)
    else:  # a resumed run keeps its shard count even if the cluster has changed size since
        saved = _Checkpoint.saved_params(checkpoint_dir) if checkpoint_dir is not None else None
        n_parts = saved["n_parts"] if saved and saved.get("method") == method else \
            (len(workers) if method == "shards" else 4 * len(workers))
    ef = max(2 * (k + 1), 64) if ef is None else as_int(ef, "ef", minimum=1)
    threads = _shard_threads(client, num_threads)
    params = {"n": n, "dim": dim, "k": k, "method": method, "space": space, "n_parts": n_parts,
              "M": M, "ef_construction": ef_construction, "ef": ef, "random_seed": random_seed,
              "blocks": [[int(a), int(b)] for a, b in zip(starts[:-1], starts[1:])]}
    ckpt = _Checkpoint(checkpoint_dir, params) if checkpoint_dir is not None else None
    if progress is None:
        progress = stderr_is_tty()
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
        _raise_first_error(routed)
        parts = [[client.submit(_pick, r, p, pure=False) for r in routed] for p in range(n_parts)]
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
