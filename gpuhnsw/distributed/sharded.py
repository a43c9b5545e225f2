"""``ShardedIndex``: an HNSW index split into shards over the workers of a Dask cluster
(docs/architecture.md, "Distributed").

One :class:`gpuhnsw.Index` per shard, each the value of a Dask task on one worker.  A label lives in
exactly one shard, chosen by a hash of the label (:func:`~gpuhnsw.distributed.shard_of`), so the same
data, seed and shard count always give the same shards whatever the arrival order.  Each shard is the
end of a *task chain*: ``create -> add -> add -> delete -> ...``; every task takes the shard before it
and returns it updated.  Only the newest future of each chain is held; the scheduler keeps the
chain's task specs, so a shard lost with its worker is rebuilt by replaying its chain (from the data
blocks, or from the checkpoint a :meth:`ShardedIndex.load` started from).  Base vectors reach the
workers inside task specs or as tasks reading a Dask array, never by ``scatter``.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading

import numpy as np

from .._errors import IndexFileError
from .._surface import DEFAULT_SEED, NO_LABEL, NOT_FOUND, Surface
from .._validate import as_int, as_label, as_labels, as_vectors, check_dim, check_radius, check_space
from ..search.filters import label_sets, per_query
from ..index import Index
from .common import (Shard, cluster_workers, dask, da, fsspec, is_dask, merge_topk, new_shard, pick,
                     raise_first_error, row_blocks, shard_add, shard_of, shard_threads, split_by_shard,
                     write_atomic)

__all__ = ["ShardedIndex", "MANIFEST_VERSION"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gpuhnsw.ShardedIndex"
MANIFEST_VERSION = 2   # 2: the manifest's own sha256 and the total counts; 1 is still read
# The label hash (splitmix64's finaliser): routing must never depend on arrival order or workers.
ROUTING = "splitmix64(label + seed * 0x9E3779B97F4A7C15) mod n_shards"


# --------------------------------------------------------------------------------------------------
# worker side: every function below runs inside a task; a shard is a task's value
# --------------------------------------------------------------------------------------------------

def _shard_delete(shard, labels):
    shard.index.mark_deleted(labels)   # checked whole first: a refused call deletes nothing
    return shard


def _shard_undelete(shard, labels):
    shard.index.unmark_deleted(labels)
    return shard


def _shard_query(shard, q, k, ef, allowed, callable_filter):
    """Top ``k`` of the shard for queries ``q`` [nq, d], padded (uint64, float32 [nq, k]).
    ``allowed``: this shard's part of a label filter (one label array, or one per query row)."""
    filt = callable_filter if callable_filter is not None else allowed
    return shard.index.knn_query(q, k=k, ef=ef, filter=filt, pad=True, num_threads=shard.threads)


def _shard_range(shard, q, radius, max_results, ef, allowed, callable_filter):
    """The shard's ``range_query`` (offsets int64 [nq + 1], labels uint64, distances float32)."""
    filt = callable_filter if callable_filter is not None else allowed
    return shard.index.range_query(q, radius, max_results=max_results, ef=ef, filter=filt,
                                   num_threads=shard.threads)


def _shard_counts(shard):
    """(stored, live, capacity, bytes) of the shard."""
    index = shard.index
    return index.element_count, len(index), index.max_elements, index.memory_usage()


def _shard_known(shard, labels):
    """bool [n]: which of ``labels`` the shard holds, deleted or not."""
    known = np.ones(labels.shape[0], dtype=bool)
    for i, label in enumerate(labels.tolist()):
        try:
            shard.index.get_levels([label])
        except RuntimeError:
            known[i] = False
    return known


def _shard_integrity(shard):
    return shard.index.check_integrity()


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


def _shard_save(shard, url, via_client):
    blob, meta = _shard_bytes(shard)
    if via_client:
        return meta, blob
    write_atomic(url, blob)
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
    shard = Shard(index, threads)
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
    return split_by_shard(x, labels, shard_of(labels, n_shards, seed), n_shards)


def _merge_parts(k, pad, *parts):
    """Merge ``(labels, distances)`` results of every shard for one query block."""
    labels, dists = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
    if not pad and k and (labels[:, -1] == NO_LABEL).any():
        raise RuntimeError(f"{NOT_FOUND}. Probably ef or M is too small")
    return labels, dists


def _merge_ranges(nq, max_results, parts):
    """Merge every shard's ``range_query`` CSR result row by row, ordered by (distance, label) and
    cut to ``max_results``: (offsets int64 [nq + 1], labels uint64, distances float32)."""
    rows = np.concatenate([np.repeat(np.arange(nq), np.diff(o)) for o, _, _ in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.uint64)
    dists = np.concatenate([p[2] for p in parts]).astype(np.float32)
    order = np.lexsort((labels, dists, rows))
    rows, labels, dists = rows[order], labels[order], dists[order]
    if max_results is not None:
        first = np.searchsorted(rows, np.arange(nq))
        keep = np.arange(rows.size) - first[rows] < max_results
        rows, labels, dists = rows[keep], labels[keep], dists[keep]
    offsets = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=nq), out=offsets[1:])
    return offsets, labels, dists


# --------------------------------------------------------------------------------------------------
# ShardedIndex
# --------------------------------------------------------------------------------------------------

class ShardedIndex(Surface):
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
                 random_seed=DEFAULT_SEED, device="auto", num_threads=None):
        self._client = client
        self._space, self._dim = check_space(space), check_dim(dim)
        workers = cluster_workers(client)
        self._n_shards = len(workers) if n_shards is None else as_int(n_shards, "n_shards", minimum=1)
        self._params = {"M": as_int(M, "M", minimum=2),
                        "ef_construction": as_int(ef_construction, "ef_construction", minimum=0),
                        "random_seed": as_int(random_seed, "random_seed", minimum=0)}
        self._device = device
        self._threads = shard_threads(client, num_threads)
        self._lock = threading.Lock()
        self._cur_l = 0
        self.ef = 10
        self._shards = [self._submit(new_shard, self._space, self._dim, self._params["M"],
                                     self._params["ef_construction"], self._params["random_seed"],
                                     device, self._threads)
                        for _ in range(self._n_shards)]
        raise_first_error(self._shards)

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
            if is_dask(data):
                parts, rows = self._route_dask(data, ids)
            else:
                x = as_vectors(data, self._dim)
                rows = x.shape[0]
                labels = np.arange(self._cur_l, self._cur_l + rows, dtype=np.uint64) if ids is None \
                    else as_labels(ids, rows)
                parts = [[p] for p in split_by_shard(x, labels, shard_of(labels, self._n_shards),
                                                      self._n_shards)]
            new = [self._submit(shard_add, self._shards[s], *parts[s])
                   for s in range(self._n_shards)]
            try:
                raise_first_error(new)
            finally:  # a shard whose add failed keeps its previous state
                self._shards = [n if n.status == "finished" else o for n, o in zip(new, self._shards)]
            self._cur_l += rows

    def _route_dask(self, data, ids):
        """Phase one for a Dask array: per-shard lists of futures of (vectors, labels) parts."""
        blocks, starts = row_blocks(data, self._dim)
        if ids is None:
            id_blocks = [None] * len(blocks)
        elif is_dask(ids):
            id_blocks = list(ids.rechunk((data.chunks[0],)).to_delayed())
        else:
            labels = as_labels(ids, int(starts[-1]))
            id_blocks = [labels[a:b] for a, b in zip(starts[:-1], starts[1:])]
        route = dask.delayed(_route_block, pure=True)
        routed = self._client.compute([route(b, i, self._cur_l + int(a), self._dim, self._n_shards, 0)
                                       for b, i, a in zip(blocks, id_blocks, starts[:-1])])
        raise_first_error(routed)
        parts = [[self._client.submit(pick, r, s, pure=False) for r in routed]
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
            self._replace_shards(_shard_delete, labels, shards)

    def unmark_deleted(self, labels):
        """Undo :meth:`mark_deleted` for one label or an array of labels.  A label not in the index,
        or not deleted, raises ``RuntimeError`` (as ``Index``) and nothing changes."""
        labels = np.unique(as_labels(labels) if np.ndim(labels) else np.array([as_label(labels, TypeError)],
                                                                               dtype=np.uint64))
        with self._lock:
            shards = shard_of(labels, self._n_shards)
            known = self._per_shard(labels, _shard_known)
            live = self._per_shard(labels, _shard_contains)
            for s in range(self._n_shards):
                mine = labels[shards == s]
                if not known[s].all():
                    raise RuntimeError(f"Label not found: {int(mine[~known[s]][0])}")
                if live[s].any():
                    raise RuntimeError(f"The requested to undelete element is not deleted: {int(mine[live[s]][0])}")
            self._replace_shards(_shard_undelete, labels, shards)

    def _replace_shards(self, fn, labels, shards):
        """Each shard holding some of ``labels`` (its number in ``shards``, one per label) replaced
        by ``fn(shard, its labels)`` on the cluster; every shard or none (the first error raised).
        The caller holds ``_lock``."""
        new = {s: self._submit(fn, self._shards[s], labels[shards == s]) for s in np.unique(shards).tolist()}
        raise_first_error(list(new.values()))
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
        filter : optional
            A callable (pickled to every worker), or the allowed labels in any form
            :meth:`gpuhnsw.Index.knn_query` takes: for every query (labels, a set, a boolean mask over
            labels) or one per query row (a list of those, a mask ``[nq, n_labels]``, an integer
            array ``[nq, m]``; NumPy queries only).  Labels are routed to the shards that hold them.
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
        current = list(self._shards)
        if is_dask(q):
            if filter is not None and not callable(filter) and per_query(filter):
                raise ValueError("a per-query filter needs NumPy queries (its rows pair with the query rows)")
            allowed, call = self._route_filter(filter, None)
            return self._knn_query_dask(q, k, ef, allowed, call, pad, current)
        q = as_vectors(q, self._dim, what="query")
        allowed, call = self._route_filter(filter, q.shape[0])
        futures = [self._submit(_shard_query, current[s], q, k, ef, allowed[s], call)
                   for s in range(self._n_shards)]
        return _merge_parts(k, pad, *self._client.gather(futures))

    def _route_filter(self, filter, nq):
        """(allowed, callable): ``allowed[s]`` is shard ``s``'s part of a label filter (None: no
        filter; one uint64 array; or a list of one per query row), ``callable`` a callable filter."""
        if filter is None:
            return [None] * self._n_shards, None
        if callable(filter):
            return [None] * self._n_shards, filter
        sets, one_per_row = label_sets(filter, nq)
        routed = [[] for _ in range(self._n_shards)]
        for labels in sets:
            shards = shard_of(labels, self._n_shards)
            for s in range(self._n_shards):
                routed[s].append(labels[shards == s])
        return (routed if one_per_row else [r[0] for r in routed]), None

    def range_query(self, q, radius, *, max_results=None, ef=None, filter=None):
        """Every label within ``radius`` of each query row over all shards, as CSR arrays, as
        :meth:`gpuhnsw.Index.range_query` (approximate as it is; ``filter`` as in :meth:`knn_query`).

        Returns
        -------
        offsets : int64 ``[nq + 1]``: row ``i``'s results are ``[offsets[i], offsets[i+1])``
        labels : uint64 ``[offsets[-1]]``, ordered by (distance, label) within each row
        distances : float32 ``[offsets[-1]]``
        """
        radius = check_radius(radius, self._space)
        if max_results is not None:
            max_results = as_int(max_results, "max_results", minimum=0)
        ef = self.ef if ef is None else as_int(ef, "ef", minimum=1)
        q = as_vectors(q, self._dim, what="query")
        allowed, call = self._route_filter(filter, q.shape[0])
        current = list(self._shards)
        futures = [self._submit(_shard_range, current[s], q, radius, max_results, ef, allowed[s], call)
                   for s in range(self._n_shards)]
        return _merge_ranges(q.shape[0], max_results, self._client.gather(futures))

    def _knn_query_dask(self, q, k, ef, allowed, call, pad, current):
        blocks, starts = row_blocks(q, self._dim)
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

    def _counts(self):
        """[(stored, live, capacity, bytes)] per shard."""
        return self._client.gather([self._submit(_shard_counts, f) for f in list(self._shards)])

    def get_current_count(self):
        """Elements stored over all shards, deleted ones included (as ``Index``)."""
        return sum(c[0] for c in self._counts())

    @property
    def element_count(self):
        """Elements stored, deleted included (see :meth:`get_current_count`)."""
        return self.get_current_count()

    def get_max_elements(self):
        """The shards' capacities added up (each shard grows its own as rows arrive)."""
        return sum(c[2] for c in self._counts())

    @property
    def max_elements(self):
        """See :meth:`get_max_elements`."""
        return self.get_max_elements()

    @property
    def count_deleted(self):
        """Elements marked deleted over all shards."""
        return sum(c[0] - c[1] for c in self._counts())

    def memory_usage(self):
        """Bytes held by the shards' arrays, added up."""
        return sum(c[3] for c in self._counts())

    def get_ids_list(self):
        """All labels, deleted ones included (as ``Index``), shard by shard."""
        futures = [self._submit(_shard_labels, f) for f in list(self._shards)]
        return np.concatenate(self._client.gather(futures)).tolist()

    def check_integrity(self):
        """Every shard's :meth:`gpuhnsw.Index.check_integrity`; the counts added up (``max_level``:
        the highest).  Raises ``RuntimeError`` naming the shard with the first problem."""
        futures = [self._submit(_shard_integrity, f) for f in list(self._shards)]
        total = {}
        for s, f in enumerate(futures):
            try:
                info = f.result()
            except RuntimeError as exc:
                raise RuntimeError(f"shard {s}: {exc}") from None
            for key, value in info.items():
                total[key] = max(total.get(key, value), value) if key == "max_level" else total.get(key, 0) + value
        return total

    def set_ef(self, ef):
        self.ef = as_int(ef, "ef", minimum=0)

    @property
    def n_shards(self):
        return self._n_shards

    @property
    def num_threads(self):
        """C engine threads each shard uses."""
        return self._threads

    def shard_sizes(self):
        """Live elements per shard (int list)."""
        return [int(c[1]) for c in self._counts()]

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
                    write_atomic(url, blob)
                entries.append({"file": name, **meta})
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "space": self._space,
                        "dim": self._dim, **self._params, "n_shards": self._n_shards,
                        "routing": ROUTING, "ef": self.ef, "next_label": self._cur_l,
                        "count": sum(e["count"] for e in entries),
                        "elements": sum(e["elements"] for e in entries), "shards": entries}
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            write_atomic(fs.unstrip_protocol(f"{root}/{MANIFEST_NAME}"),
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
        self._threads = shard_threads(client, num_threads)
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
        raise_first_error(self._shards)
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


