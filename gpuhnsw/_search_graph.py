"""The search graph of an index, built by the C engine (``gpuhnsw/csrc/search_graph.c``): HNSW
level 0 with its reverse edges, a fixed-degree padded adjacency over slots for batched search.

Its NumPy reference is ``gpuhnsw._graph_reference``; the measurements that chose it are in
``benchmarks/results/graph_replay.md``.
"""
from __future__ import annotations

import numpy as np

from ._core import NO_LABEL
from ._validate import as_int, num_threads as num_threads_rule

#: Entries per row: the degree the replay chose (benchmarks/results/graph_replay.md).
DEGREE = 64


def build(core, degree=DEGREE, num_threads=-1):
    """Build the search graph of ``core`` (a ``_core.Core``) with the engine's threads.

    Parameters
    ----------
    core : gpuhnsw._core.Core
    degree : int
        Entries per row, 1 .. ``gpuhnsw._core.MAX_GRAPH_DEGREE``.
    num_threads : int
        ``<= 0``: every core. The graph does not depend on it.

    Returns
    -------
    ndarray, uint32 [count, degree], read-only
        Row ``s`` holds slot ``s``'s neighbours (slots), valid entries first, ``0xFFFFFFFF`` after
        them; the rows of deleted slots are empty and no row names a deleted slot.
    """
    degree = as_int(degree, "degree")   # its range: the engine's check (ValueError)
    raw = core.build_search_graph(degree, num_threads_rule(num_threads))
    return np.frombuffer(raw, dtype=np.uint32).reshape(-1, degree)


def export(core, degree=DEGREE, num_threads=-1):
    """The search graph of ``core`` over labels: ``(ids, graph)``, one snapshot (built and read
    under the engine's lock, so rows and labels agree whatever runs beside it).

    Returns
    -------
    ids : ndarray, uint64 [n_live]
        The live labels, in slot order (the order of ``Index.get_ids_list()`` without the deleted).
    graph : ndarray, uint64 [n_live, degree]
        Row ``i`` holds the labels of ``ids[i]``'s neighbours, level-0 neighbours first, then reverse
        edges nearest first, padded with ``NO_LABEL`` (2**64 - 1).
    """
    degree = as_int(degree, "degree")
    raw, raw_labels, raw_live = core.build_search_graph(degree, num_threads_rule(num_threads), True)
    slots = np.frombuffer(raw, dtype=np.uint32).reshape(-1, degree)
    labels = np.frombuffer(raw_labels, dtype=np.uint64)
    live = np.frombuffer(raw_live, dtype=np.uint8).astype(bool)
    rows = slots[live]
    graph = np.full(rows.shape, NO_LABEL, dtype=np.uint64)
    valid = rows != np.uint32(0xFFFFFFFF)          # no row names a deleted slot (see build)
    graph[valid] = labels[rows[valid]]
    return labels[live].copy(), graph
