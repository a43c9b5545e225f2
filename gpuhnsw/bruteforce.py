"""``BFIndex``: exact search with hnswlib 0.8.0's ``BFIndex`` API.

Searches run through the exact engine (:mod:`gpuhnsw.exact`); the file formats live in
:mod:`gpuhnsw._io.bfindex`.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from ._errors import IndexFileNotFoundError
from ._io.bfindex import read_bfindex, write_bfindex
from ._io.files import source_name
from ._rows import normalize_rows
from ._surface import NOT_FOUND, IndexSurface
from ._validate import (as_int, as_label, as_labels, as_vectors, check_dim, check_space, cpu_count,
                        num_threads as num_threads_rule, resolve_device)
from .exact import exact_rows, upload_base

__all__ = ["BFIndex"]


# --------------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------------

class _ReadWriteLock:
    """Many readers (queries, save, pickle) or one writer (every mutation), writers first.

    A thread that already reads reads again without waiting (a filter callback querying the same
    index, even with a writer queued), and one that tries to write raises ``RuntimeError``: it would
    wait for its own query forever.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._depth = threading.local()     # .n: how many reads this thread holds

    @contextlib.contextmanager
    def reading(self):
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._cond:
                while self._writing or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, what):
        if getattr(self._depth, "n", 0):
            raise RuntimeError(f"{what} is not allowed inside a filter callback of a query (or a "
                               "file object's method during a save) on the same index")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# --------------------------------------------------------------------------------------------------
# BFIndex
# --------------------------------------------------------------------------------------------------

class BFIndex(IndexSurface):
    """Exact search index with hnswlib 0.8.0's ``BFIndex`` API.

    Differences from hnswlib (its bugs, fixed): ``k`` larger than the number of elements that can be
    returned raises ``RuntimeError`` instead of padding with garbage; filters return the true k
    nearest allowed elements; cosine queries are normalised; input of the wrong width, or holding
    NaN or infinity, raises ``ValueError``; ``add_items`` that would overflow capacity raises before
    adding anything.

    Any call may run beside any other: queries, ``save_index`` and pickling run together, and each
    sees the index between two mutations (``add_items``, ``delete_vector``, ``init_index``,
    ``load_index``), which run one at a time.

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
        self._num_threads = cpu_count()
        self._lock = _ReadWriteLock()
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

    def __getstate__(self):
        with self._lock.reading():          # pickle serialises after this returns: copy the rows
            n = self._count
            state = {**self.__dict__, "_vectors": self._vectors[:n].copy(),
                     "_labels": self._labels[:n].copy(), "_rows": dict(self._rows)}
        del state["_lock"]
        state["_gpu_cache"] = None          # device arrays are rebuilt on the next query
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = _ReadWriteLock()
        spare = self._max_elements - self._vectors.shape[0]   # the stored rows only: regrow
        if spare > 0:
            self._vectors = np.concatenate([self._vectors,
                                            np.zeros((spare, self._dim), np.float32)])
            self._labels = np.concatenate([self._labels, np.zeros(spare, np.uint64)])

    # ---- properties ---------------------------------------------------------------------------
    @property
    def device(self):
        """``"cpu"``, or ``"cuda:N"``: where ``knn_query`` runs."""
        return "cpu" if self._device[0] == "cpu" else f"cuda:{self._device[1] or 0}"

    def get_max_elements(self):
        """Capacity in vectors (0 before :meth:`init_index`)."""
        return self._max_elements

    def get_current_count(self):
        """Vectors stored."""
        return self._count

    # ---- building -----------------------------------------------------------------------------
    def init_index(self, max_elements):
        """Allocate room for ``max_elements`` vectors."""
        max_elements = as_int(max_elements, "max_elements", minimum=0)
        with self._lock.writing("init_index"):
            if self._inited:
                raise RuntimeError("The index is already initiated.")
            self._reset(max_elements)

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
        labels = None if ids is None else as_labels(ids, rows)
        if self._space == "cosine":
            x = normalize_rows(x)
        with self._lock.writing("add_items"):
            if labels is None:
                labels = np.arange(self._next_auto, self._next_auto + rows, dtype=np.uint64)
            last = {}                              # label -> last row of x carrying it
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
        with self._lock.writing("delete_vector"):
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
            on the query.  It may query this index but not change it (``RuntimeError``).

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
        threads = num_threads_rule(num_threads, default=self._num_threads)
        with self._lock.reading():                 # the rows, labels and device copy of one state
            n = self._count
            base, labels = self._vectors[:n], self._labels[:n]     # [n, dim], [n]: views
            use_cache = True
            if filter is not None:
                keep = np.fromiter((bool(filter(lab)) for lab in labels.tolist()), dtype=bool,
                                   count=n)
                if not keep.all():
                    base, labels = base[keep], labels[keep]
                    use_cache = False
            if k > base.shape[0] and q.shape[0] > 0:
                raise RuntimeError(
                    f"{NOT_FOUND}: k={k} but only "
                    f"{base.shape[0]} element(s) can be returned"
                    + (" (after the filter)" if filter is not None else ""))
            cache = None
            if self._device[0] == "cuda" and use_cache and k > 0 and q.shape[0] > 0:
                cache = self._device_base()
            rows, dists = exact_rows(base, q, k, self._space, labels=labels, num_threads=threads,
                                     device=self._device, base_cache=cache)
            return labels[rows], dists

    def _device_base(self):
        """The device copy of the stored rows; under the read lock, so no mutation (which drops
        it) runs between its upload and its use, and a stale copy is never cached."""
        if self._gpu_cache is None:
            self._gpu_cache = upload_base(self._vectors[:self._count], self._space, self._device)
        return self._gpu_cache

    # ---- persistence --------------------------------------------------------------------------
    def save_index(self, path_to_index, *, format="gpuhnsw"):
        """Write the index to ``path_to_index`` (temporary file + rename: never a half-written file).

        format : ``"gpuhnsw"`` (magic, version, checksums) or ``"hnswlib"`` (hnswlib 0.8.0's
        BFIndex layout, readable by ``hnswlib.BFIndex.load_index``).
        """
        self._require_init()
        with self._lock.reading():
            n = self._count
            write_bfindex(path_to_index, self._vectors[:n], self._labels[:n], space=self._space,
                          max_elements=self._max_elements, next_auto_id=self._next_auto,
                          format=format)

    def load_index(self, path_to_index, max_elements=0):
        """Replace the contents with the index saved at ``path_to_index`` (either format).

        The capacity becomes ``max(max_elements, saved capacity)``. Every length, checksum and label
        is checked; any inconsistency raises :class:`gpuhnsw.IndexFileError`.
        """
        max_elements = as_int(max_elements, "max_elements", minimum=0)
        try:
            saved = read_bfindex(path_to_index, space=self._space, dim=self._dim)
        except FileNotFoundError as exc:
            raise IndexFileNotFoundError.of(exc, source_name(path_to_index)) from None
        vec, lab = saved["vectors"], saved["labels"]
        n = vec.shape[0]
        rows = {lab_: r for r, lab_ in enumerate(lab.tolist())}
        with self._lock.writing("load_index"):
            self._reset(max(max_elements, saved["max_elements"]))
            self._vectors[:n], self._labels[:n], self._count = vec, lab, n
            self._rows = rows
            self._next_auto = saved["next_auto_id"]
