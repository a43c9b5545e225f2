"""The search graph of an index, built by the C engine (``gpuhnsw/csrc/search_graph.c``): HNSW
level 0 with its reverse edges, a fixed-degree padded adjacency over slots for batched search.

Its NumPy reference is ``gpuhnsw._graph_reference``; the measurements that chose it are in
``benchmarks/results/graph_replay.md``.
"""
from __future__ import annotations

import numpy as np

from . import _core
from ._core import INVALID_SLOT, NO_LABEL
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


#: Search-graph modes of an index (``Index(..., search_graph=)``): "hnsw" searches HNSW level 0 as
#: built; "optimized" keeps this module's graph in step and the GPU search reads it.
MODES = ("hnsw", "optimized")

#: An update that would rewrite more than this fraction of the rows builds the graph afresh instead.
#: On equal threads an update of 35-49 % of the rows cost 0.15-0.27 of a build, and of 86-96 % 0.40-0.52
#: (benchmarks/results/search_graph_update.md): past half, the build's extra cost buys a graph without
#: the stale entries that updates leave.
REBUILD_FRACTION = 0.5


class SearchGraph:
    """The search graph of one core, kept in step by :meth:`refresh` (host copy; a GPU mirror ships
    the rows each refresh wrote).

    Attributes
    ----------
    rows : ndarray, uint32 [capacity, degree]
        Row ``s`` as :func:`build` gives it (after updates: see ``search_graph.c`` on what an update
        keeps); rows from ``count`` on hold ``0xFFFFFFFF``.
    forward : ndarray, uint32 [capacity]
        Entries of each row's forward part (its level-0 list), what an update needs.
    count : int
        Slots the graph covers.
    drain : int or None
        The number of the last drain of the core's dirty-row log the graph has taken in (None: none,
        the next refresh builds afresh).
    builds : int
        Builds so far (afresh, not updates).
    """

    def __init__(self, degree=DEGREE, num_threads=-1):
        self.degree = as_int(degree, "degree")
        self.num_threads = num_threads
        self.rows = np.full((0, self.degree), INVALID_SLOT, dtype=np.uint32)
        self.forward = np.zeros(0, dtype=np.uint32)
        self.count = 0
        self.drain = None
        self.builds = 0

    @classmethod
    def from_arrays(cls, rows, forward, core):
        """A saved graph (``rows`` uint32 [count, D], ``forward`` uint32 [count], checked by
        ``_io.native``) of ``core`` as loaded: in step with it, so the core's dirty-row log is drained
        here (a load marks every row; a mirror made later ships every row anyway)."""
        graph = cls(rows.shape[1])
        graph.rows, graph.forward, graph.count = np.array(rows, np.uint32), np.array(forward, np.uint32), len(rows)
        graph.drain = core.drain_dirty()[1]
        return graph

    def reserve(self, n):
        """Room for ``n`` rows (doubling; new rows empty)."""
        if n <= len(self.rows):
            return
        new = max(n, 2 * len(self.rows), 1024)
        rows = np.full((new, self.degree), INVALID_SLOT, dtype=np.uint32)
        rows[:self.count] = self.rows[:self.count]
        forward = np.zeros(new, dtype=np.uint32)
        forward[:self.count] = self.forward[:self.count]
        self.rows, self.forward = rows, forward

    def rebuild(self, core, build=None):
        """Build the graph afresh from ``core`` by the C engine, or by ``build()`` -> (rows uint32
        [count, D], forward uint32 [count]) where given (a GPU mirror's device build)."""
        if build is None:
            raw, fwd = core.build_search_graph(self.degree, num_threads_rule(self.num_threads), False, True)
            built, fwd = np.frombuffer(raw, dtype=np.uint32).reshape(-1, self.degree), np.frombuffer(fwd, np.uint32)
        else:
            built, fwd = build()
        n = len(built)
        self.count = 0
        self.reserve(n)
        self.rows[:n] = built
        self.rows[n:] = INVALID_SLOT
        self.forward[:n] = fwd
        self.forward[n:] = 0
        self.count = n
        self.builds += 1

    def changes(self, log, count):
        """What :meth:`refresh` updates for ``log`` and ``count``: the slots (uint32 ascending) and
        their renew flags (uint8: the row was replaced or its delete mark changed)."""
        kinds, slots = log >> 32, (log & 0xFFFFFFFF).astype(np.uint32)
        renewed = slots[(kinds & (_core.DIRTY_ROW | _core.DIRTY_DELETED)) != 0]
        changed = slots[(kinds & (_core.DIRTY_ROW | _core.DIRTY_LINKS | _core.DIRTY_APPEND | _core.DIRTY_DELETED)) != 0]
        todo = np.union1d(changed, np.arange(self.count, count, dtype=np.uint32)).astype(np.uint32)
        return todo, np.isin(todo, renewed).astype(np.uint8)

    def refresh(self, core, log, count, drain, build=None):
        """Bring the graph in step with ``core`` after drain number ``drain`` of its dirty-row log
        (``log``: uint64 ``(kind << 32) | slot``, ascending, each slot below ``count``) and the slots
        up to ``count`` that were added.  The slots whose level-0 list changed are updated; so are
        those whose row was replaced or whose delete mark changed, which push to every slot their
        list names (a target may have dropped them while they were deleted).

        Returns the rows written (uint32 ascending), or None where it built the graph afresh (every
        row from 0 to ``self.count`` is new): the first time, where drains were missed (another
        consumer of the log took changes), and where the update would rewrite more than
        ``REBUILD_FRACTION`` of the rows.  ``build``: how to build it then (see :meth:`rebuild`).
        """
        todo, renew = self.changes(log, count)
        missed = self.drain is None or drain != self.drain + 1
        self.drain = drain
        if missed or todo.size > REBUILD_FRACTION * max(count, 1):
            self.rebuild(core, build)
            return None
        self.reserve(count)
        self.count = max(self.count, count)
        if not todo.size:
            return todo
        return np.frombuffer(core.update_search_graph(self.rows[:self.count], self.forward[:self.count], todo, renew,
                                                      num_threads_rule(self.num_threads)), dtype=np.uint32)
