"""The query planner: one ``knn_query`` from its :class:`~gpuhnsw.search.params.SearchParams` to its
answer, deciding once which rows go to which leg.

::

    Index.knn_query -> SearchParams -> knn_query (this module)
        label filter: relabel retry around the parts; per-query bitsets: parts of the query rows
        per part: the label filter as AllowedSets, the plan (graph or exact per allowed set), then
            GPU graph leg      gpu.DeviceSearch.search_graph  (a GPU index, no exact row, no callable)
            CPU graph leg      cpu.graph_search             (every row the GPU leg did not answer)
            exact leg          cpu.exact_over_allowed       (rows planned exact, and graph rows that
                                                             found fewer than min(k, allowed))
        -> SearchResult -> pad or raise

A selective filter makes graph search slow: the beam steps over about ``live / allowed`` excluded
nodes for each allowed one it keeps (hnswlib's loop, ours too), while exact search over the allowed
rows costs ``allowed`` distances in one matrix product; :func:`prefer_exact` compares the two, per
allowed set.  A graph row that finds fewer than ``min(k, allowed)`` results (the filter cut the graph
apart) is redone exactly, whichever device searched it, so a result never depends on where the query
ran.  The choices are logged at DEBUG level on the ``gpuhnsw`` logger.
"""
from __future__ import annotations

import logging

import numpy as np

from .._surface import NOT_FOUND
from .._validate import as_vectors, memory_limit, on_host, plain_array
from ..device.arrays import as_cupy, is_gpu_array, put_rows, to_device
from . import filters
from .cpu import exact_over_allowed, graph_search
from .params import SearchResult

__all__ = ["knn_query", "prefer_exact", "RELABEL_REDOS", "EXACT_DISTANCE_COST"]

log = logging.getLogger("gpuhnsw")

# Results smaller than this (bytes) are allocated without asking the memory limit.
MEMORY_CHECK_FROM = 64 << 20

# Label-filtered passes a relabel (replace_deleted) may void before one runs with the labels pinned.
RELABEL_REDOS = 2
# Cost of one distance in exact search relative to one in graph search (which reads a random row and
# keeps two heaps).  From benchmarks/filtered_search.py on minilm-debian (50k x 384, CPU): graph and
# exact take equal time around 25% selectivity at ef=64; see benchmarks/results/filtered_search.md.
EXACT_DISTANCE_COST = 0.6


def knn_query(core, gpu, space, data, filter, params):
    """The ``params.k`` nearest labels of each row of ``data`` (float32-castable ``[nq, dim]``, or one
    ``[dim]`` row; NumPy or a GPU array) in ``core``, under ``filter`` (None, a callable, or a label
    filter in any form ``Index.knn_query`` takes); ``gpu``: the index's ``DeviceSearch``, or None.

    Returns (labels uint64 ``[nq, k]``, dists float32 ``[nq, k]``), NumPy for NumPy input and CuPy
    for GPU input; RuntimeError where a row finds fewer than ``k`` and ``params.pad`` is off.
    """
    data = plain_array(data)
    nq = 1 if np.ndim(data) <= 1 else np.shape(data)[0]
    # labels + distances, before allocating them; below the smallest memory a process may have, the
    # limit (cgroup files) is not read: a single query pays nothing for the check
    need = nq * params.k * 12
    have = memory_limit() if need > MEMORY_CHECK_FROM else None
    if have is not None and need > have:
        raise MemoryError(f"k={params.k} for {nq} queries needs {need / 2**30:.1f} GiB of results, more than "
                          f"the {have / 2**30:.1f} GiB of memory this process may use")
    if filter is None or callable(filter):   # (callables see the returned labels)
        return _in_parts(core, gpu, space, data, nq, filter, params)
    filter = on_host(filter)
    # Label filters become slot bitsets before the search; if a replace_deleted moved a slot to
    # another label meanwhile, the bitsets may name it by its old label: redo, so that no result
    # ever carries a label the filter excludes.  Under steady relabels the last pass pins the labels
    # (relabels wait for it), so the query always ends.
    for _ in range(RELABEL_REDOS):
        relabels = core.relabels
        out = _in_parts(core, gpu, space, data, nq, filter, params)
        if core.relabels == relabels:
            return out
    taken = core.pin_labels()
    try:
        return _in_parts(core, gpu, space, data, nq, filter, params)
    finally:
        core.unpin_labels(taken)


def _in_parts(core, gpu, space, data, nq, filter, params):
    """:func:`_search` over parts of the ``nq`` query rows where a per-query filter's bitsets (``nq *
    capacity / 8`` bytes) would exceed ``filters.BITSET_CHUNK_BYTES``; the same results."""
    labels_filter = filter is not None and not callable(filter)
    step = filters.chunk_rows(core.max_elements) if labels_filter and filters.per_query(filter) else nq
    if step >= nq:
        return _search(core, gpu, space, data, nq, filter, params, 0)
    labels = dists = None
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        part = _search(core, gpu, space, data[start:stop], stop - start,
                       filters.filter_rows(filter, np.arange(start, stop)), params, start)
        if labels is None:   # NumPy, or CuPy for GPU input, as one call's result
            empty = to_device if is_gpu_array(part[0]) else np.asarray
            labels = empty(np.empty((nq, params.k), dtype=np.uint64))
            dists = empty(np.empty((nq, params.k), dtype=np.float32))
        labels[start:stop], dists[start:stop] = part
    return labels, dists


def _search(core, gpu, space, data, nq, filter, params, row0):
    """One search of the ``nq`` query rows ``data`` (a label filter already on the host); ``row0``:
    the first row's number in the caller's query (for error messages)."""
    callback = filter if callable(filter) else None
    sets = exact = None                                  # AllowedSets; bool [nq]: rows searched exactly
    if filter is not None and callback is None:
        sets = filters.allowed_sets(core, filter, nq)
        exact = _plan_exact(core, sets, params, nq)
    live = core.count - core.n_deleted
    if not params.pad:
        _check_enough(live, params.k, sets, row0)
    answer = None
    if gpu is not None and callback is None and (exact is None or not exact.any()):
        answer = gpu.search_graph(core, data, params, None if sets is None else sets.search_bits())
    if answer is None:   # the CPU answers every row: graph search, then the exact leg
        q = as_vectors(data, core.dim, what="query")
        if exact is None or not exact.any():
            result = SearchResult(*graph_search(core, q, params, sets, callback))
        else:
            result = SearchResult(np.empty((nq, params.k), dtype=np.uint64),
                                  np.empty((nq, params.k), dtype=np.float32), np.zeros(nq, dtype=np.int32))
            _graph_rows(core, q, sets, callback, np.flatnonzero(~exact), result, params)
    else:                # the GPU answered; the rows whose buffers bit go to the CPU
        result, unanswered = answer
        q = _HostRows(data, core.dim)   # the GPU leg validated them; only rows a CPU leg takes move
        _graph_rows(core, q, sets, callback, unanswered, result, params)
    if sets is not None:
        _exact_rows(core, space, q, sets, exact, result, params)
    if answer is None and is_gpu_array(data):
        result.labels, result.dists = to_device(result.labels), to_device(result.dists)
    return result.finish(params, live, callback is not None, row0)


class _HostRows:
    """Query rows the GPU leg answered, for the CPU legs that take some of them: ``q[rows]`` is
    float32 ``[r, dim]`` on the host, and GPU input moves only those rows off the device."""

    def __init__(self, data, dim):
        self.data, self.dim, self.host = data, dim, None

    def __getitem__(self, rows):
        if is_gpu_array(self.data):   # already [nq, dim] as the GPU leg checked it
            return as_vectors(as_cupy(self.data).reshape(-1, self.dim)[to_device(rows)], self.dim, what="query")
        if self.host is None:
            self.host = as_vectors(self.data, self.dim, what="query")
        return self.host[rows]


def _graph_rows(core, q, sets, callback, rows, result, params):
    """The CPU graph leg for the query rows ``rows`` (int ``[r]``) of ``q``, into ``result``."""
    if not rows.size:
        return
    labels, dists, found = graph_search(core, q[rows], params, None if sets is None else sets.take(rows), callback)
    put_rows(result.labels, rows, labels)
    put_rows(result.dists, rows, dists)
    result.found[rows] = found


def _exact_rows(core, space, q, sets, exact, result, params):
    """The exact leg: the rows planned exact (``exact``, bool ``[nq]``) and the graph rows that found
    fewer than ``min(k, allowed)`` (the filter cut the graph apart), over each row's allowed set."""
    nq = result.found.shape[0]
    row_live = sets.row_live(nq)                                     # int64 [nq]
    exact = exact | (result.found < np.minimum(params.k, row_live))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("filtered knn_query: %d of %d query rows by exact search over the allowed rows, the rest by "
                  "graph search (allowed live elements: min %d, max %d)", int(exact.sum()), nq,
                  int(sets.live.min()), int(sets.live.max()))
    rows = np.flatnonzero(exact)
    # one exact search per allowed set: per query row, or one for all the rows of a shared filter
    groups = [rows[i:i + 1] for i in range(rows.size)] if sets.per_query else [rows] if rows.size else []
    for group in groups:
        labels, dists = exact_over_allowed(core, space, q[group], sets.slots(group[0] if sets.per_query else 0),
                                           params)
        put_rows(result.labels, group, labels)
        put_rows(result.dists, group, dists)
    result.found[rows] = np.minimum(params.k, row_live[rows])


def _plan_exact(core, sets, params, nq):
    """bool ``[nq]``: which query rows are searched exactly over their allowed rows (by
    ``params.filter_mode``, or by :func:`prefer_exact` per allowed set)."""
    if params.filter_mode == "auto":
        exact = prefer_exact(sets.live, core.count - core.n_deleted, params.beam, core.M0)
    else:
        exact = np.full(sets.live.shape, params.filter_mode == "exact")
    return exact if sets.per_query else np.repeat(exact, nq)


def prefer_exact(allowed, live, beam, M0):
    """bool ``[g]``: where exact search over the ``allowed`` rows (int64 ``[g]``) is cheaper than
    graph search in an index of ``live`` elements with beam width ``beam`` and ``M0`` level-0 links.

    Graph search evaluates about ``M0`` neighbours per expanded node and expands about
    ``beam * live / allowed`` nodes before its beam holds ``beam`` allowed ones, never more than the
    whole graph; exact search evaluates each allowed row once, at ``EXACT_DISTANCE_COST``.
    """
    allowed = np.asarray(allowed, dtype=np.float64)
    graph = np.minimum(float(live), beam * M0 * live / np.maximum(allowed, 1.0))
    return EXACT_DISTANCE_COST * allowed < graph


def _check_enough(live, k, sets, row0):
    """Fewer than ``k`` live elements, in the index or allowed by a label filter: hnswlib's
    RuntimeError, with the numbers."""
    if k > live:
        raise RuntimeError(f"{NOT_FOUND}: " + (f"k={k} but the index holds only {live} live elements"
                                               if live else f"k={k} but the index is empty")
                           + "; pass pad=True to accept fewer")
    if sets is not None and k and sets.live.min() < k:
        i = int(np.argmin(sets.live))
        which = f" of query row {row0 + i}" if sets.per_query else ""
        raise RuntimeError(f"{NOT_FOUND}: k={k} but the filter{which} allows only {sets.live[i]} live "
                           "elements; pass pad=True to accept fewer")
