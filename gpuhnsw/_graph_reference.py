"""A NumPy reference of the search graph the C engine builds (``Core.build_search_graph``): HNSW level 0
with its reverse edges, as a fixed-degree padded adjacency for batched search.

Row ``x`` of the graph of degree D, for a live slot ``x`` (a deleted slot's row is empty, and no
row names a deleted slot)::

    forward(x) = x's level-0 list as the search reads it (``ReferenceGraph.neighbors``: count
                 capped at M0, ids >= count and x itself skipped), deleted slots dropped, stored order
    reverse(x) = the live slots whose level-0 list names x, not in forward(x), nearest first by
                 (distance to x, slot)
    row(x)     = (forward(x) + reverse(x))[:D], then 0xFFFFFFFF to D entries

Why this graph (and not CAGRA's detour-pruned one): ``benchmarks/results/graph_replay.md``.
Distances are float32 as ``ReferenceGraph.distances`` computes them; the C engine's SIMD sums
round differently, so two reverse edges at distances within rounding of each other may swap
places (never on integer data such as siftsmall's, whose sums are exact).
"""
from __future__ import annotations

import numpy as np

from ._reference import INVALID, ReferenceGraph

__all__ = ["level0_csr", "pair_distances", "search_graph_reference"]


def level0_csr(g):
    """The level-0 lists of a :class:`ReferenceGraph` as the search reads them, in CSR form.

    Returns
    -------
    indptr : int64 [n + 1]
    ids : int64 [edges], each row's ids in stored order
    """
    ids = g.links0.astype(np.int64)
    rows = np.arange(g.n)[:, None]
    cols = np.arange(g.M0)[None, :]
    keep = (cols < np.minimum(g.degree0, g.M0).astype(np.int64)[:, None]) & (ids < g.n) & (ids != rows)
    return np.concatenate(([0], np.cumsum(keep.sum(axis=1)))), ids[keep]


def pair_distances(g, rows, ids, chunk_bytes=1 << 26):
    """float32 distances between the stored vectors of ``rows[i]`` and ``ids[i]`` (int64 [p] each),
    as ``ReferenceGraph.distances`` computes them."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, chunk_bytes // (8 * max(g.dim, 1)))
    for s in range(0, len(rows), step):
        a = g.vectors[rows[s:s + step]]
        b = g.vectors[ids[s:s + step]]
        if g.space == "l2":
            diff = a - b
            out[s:s + step] = np.einsum("ij,ij->i", diff, diff, dtype=np.float32)
        else:
            out[s:s + step] = np.float32(1) - np.einsum("ij,ij->i", a, b, dtype=np.float32)
    return out


def search_graph_reference(state, degree):
    """The search graph of an index (see the module docstring).

    Parameters
    ----------
    state : dict or ReferenceGraph
        ``Core.export_state()``.
    degree : int
        Entries per row (D >= 1).

    Returns
    -------
    uint32 [count, degree]: each row's entries first, 0xFFFFFFFF after them.
    """
    g = state if isinstance(state, ReferenceGraph) else ReferenceGraph(state)
    degree = int(degree)
    if degree < 1:
        raise ValueError(f"degree must be at least 1, got {degree}")
    indptr, fwd = level0_csr(g)
    src = np.repeat(np.arange(g.n, dtype=np.int64), np.diff(indptr))
    live = ~g.deleted[src] & ~g.deleted[fwd]
    src, fwd = src[live], fwd[live]
    # every row's forward entries in stored order (key 0, then position), then its reverse edges by
    # (distance, slot) (key 1); a reverse edge that is also a forward one goes
    rows = np.concatenate((src, fwd))
    ids = np.concatenate((fwd, src))
    kind = np.repeat(np.array([0, 1], np.int8), len(src))
    order_key = np.concatenate((np.arange(len(src), dtype=np.float64),
                                pair_distances(g, fwd, src).astype(np.float64)))
    order = np.lexsort((ids, order_key, kind, rows))
    rows, ids, kind = rows[order], ids[order], kind[order]
    _, first = np.unique(rows * g.n + ids, return_index=True)
    first.sort()                                   # keeps each (row, id) pair's first place
    rows, ids = rows[first], ids[first]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    ok = rank < degree
    out = np.full((g.n, degree), INVALID, dtype=np.uint32)
    out[rows[ok], rank[ok]] = ids[ok]
    return out
