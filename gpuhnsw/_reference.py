"""A NumPy reference of the search the GPU kernel runs (kernels/search.cu).

It follows docs/architecture.md "Search semantics" literally, on the state dict of
``Core.export_state()``, with ``search_width`` as a parameter: 1 is the C search's order exactly;
w > 1 expands up to w candidates per iteration, as the kernel does. Slow (plain Python loops per
query) and meant for tests: the oracle the C search and the kernels are held to.

Per query (``limit = max(ef, k)``)::

    descent: cur = entry point, d = dist(q, cur)
      for L = max_level .. 1: repeat { for n in upper[cur][L] (stored order):
                                          if dist(q, n) < d: d, cur = dist(q, n), n } until no change
    level 0, no filter and nothing deleted (beam mode): beam = [(d, cur)]; visited = {cur}
      loop: parents = the first `search_width` unexpanded beam entries (by (dist, slot)); none -> stop
            candidates = their level-0 neighbours in order, not yet visited (now visited)
            beam = the `limit` smallest (dist, slot) of beam + candidates
      return the beam's first k
    level 0, a filter or deletions (filtered mode, hnswlib's search):
      pending = [(d, cur)]; results = [(d, cur)] if cur is allowed; visited = {cur}
      loop: pop up to `search_width` pending entries (smallest first), stopping at one with
            d > bound (the worst result's distance once `limit` results are held); none -> stop
            for each popped parent, each unvisited neighbour n (now visited), in order:
                if fewer than `limit` results or dn < bound:
                    push (dn, n) on pending; if n is allowed: add it to results (drop the worst)
      return the results' first k

Keeping the `limit` smallest of the union is what inserting candidates one by one into a list
capped at `limit` gives (the C loop), whatever their order, so the batched kernel and this
reference agree with C in beam mode. In filtered mode the kernel caps pending at its Capacity;
``pending_limit`` reproduces that cap here (None: unbounded, as in C). Lists are read as the C
core reads them: counts capped at M0 (level 0) or M, ids >= count and self links skipped.

Distances are float32 as in the C core: ``l2`` squared L2, ``ip`` ``1 - a.b``, ``cosine`` ``ip`` on
stored-normalised vectors with the query scaled by ``1 / (|q| + 1e-30)``. The summation order is
NumPy's, not the SIMD kernels', so distances agree with C to about 1e-6 relative, and an exact tie
between two candidates may resolve differently.

Two extras serve ``benchmarks/graph_replay.py``: ``ReferenceGraph(state, level0=...)`` searches
any fixed-degree ``[n, D]`` level-0 adjacency in place of the stored one (the upper levels stay the
state's), and ``return_counts=True`` counts each query's serial steps and work (see
:func:`beam_search_reference`). The visited set here is exact: the kernel's beam mode may forget
visited slots when its hash is reset (search.cu, phase B) and recompute their distances, so the
distance count is a lower bound of the kernel's.
"""
from __future__ import annotations

import bisect

import numpy as np

__all__ = ["COUNTS", "ReferenceGraph", "beam_search_reference", "descend", "normalize_queries",
           "counts_by_name", "query_arrays", "result_mask", "unvisited_neighbours"]

INVALID = 0xFFFFFFFF


class ReferenceGraph:
    """The arrays of a ``Core.export_state()`` dict, parsed once (views on the bytes, no copies).

    Attributes
    ----------
    space : str
    n, dim, M, M0 : int
    entry_point, max_level : int (-1 when empty)
    vectors : float32 [n, dim]  (normalised for cosine, as stored)
    links0 : uint32 [n, M0];  degree0 : uint32 [n];  labels : uint64 [n];  levels : uint8 [n]
    upper : uint32 [total];  upper_start : int64 [n] (offset of each slot's block in ``upper``)
    deleted : bool [n]

    ``level0`` (optional, uint32 [n, D]): a level-0 adjacency searched instead of the state's, read
    as a fixed-degree padded one (every row's D entries, ``0xFFFFFFFF`` or any id >= n skipped); then
    ``M0`` is D and ``degree0`` is D for every row.
    """

    def __init__(self, state, level0=None):
        if state.get("storage", "float32") != "float32":   # its vectors are stored rows, not float32
            raise ValueError(f"the reference reads float32 rows: export a {state['storage']} index with "
                             "export_state(decoded=True)")
        self.space = state["space"]
        self.n = n = int(state["count"])
        self.dim = dim = int(state["dim"])
        self.M = int(state["M"])
        self.M0 = 2 * self.M
        self.entry_point = int(state["entry_point"])
        self.max_level = int(state["max_level"])
        self.vectors = np.frombuffer(state["vectors"], dtype=np.float32).reshape(n, dim)
        self.links0 = np.frombuffer(state["links0"], dtype=np.uint32).reshape(n, self.M0)
        self.degree0 = np.frombuffer(state["degree0"], dtype=np.uint32)[:n]
        self.labels = np.frombuffer(state["labels"], dtype=np.uint64)[:n]
        self.levels = np.frombuffer(state["levels"], dtype=np.uint8)[:n]
        self.upper = np.frombuffer(state["upper"], dtype=np.uint32)
        sizes = self.levels.astype(np.int64) * (1 + self.M)
        self.upper_start = np.concatenate(([0], np.cumsum(sizes)[:-1])) if n else np.zeros(0, np.int64)
        if n and int(sizes.sum()) != self.upper.size:
            raise ValueError("upper: length does not match levels")
        self.deleted = np.frombuffer(state["deleted"], dtype=np.uint8)[:n].astype(bool)
        if level0 is not None:
            level0 = np.asarray(level0)
            if level0.dtype != np.uint32 or level0.ndim != 2 or level0.shape[0] != n or level0.shape[1] < 1:
                raise ValueError(f"level0: expected uint32 [{n}, D >= 1], got {level0.dtype} {level0.shape}")
            self.M0 = level0.shape[1]
            self.links0 = np.ascontiguousarray(level0)
            self.degree0 = np.full(n, self.M0, dtype=np.uint32)

    def neighbors(self, slot, level):
        """Slot ids of `slot`'s list on `level`, as the C core reads them (uint32 array): the count
        capped at M0 / M, ids >= count and `slot` itself skipped."""
        if level == 0:
            ids = self.links0[slot, :min(int(self.degree0[slot]), self.M0)]
        else:
            if level > int(self.levels[slot]):
                return self.upper[:0]
            at = int(self.upper_start[slot]) + (level - 1) * (1 + self.M)
            ids = self.upper[at + 1:at + 1 + min(int(self.upper[at]), self.M)]
        return ids[(ids < self.n) & (ids != slot)]

    def distances(self, q, slots):
        """float32 distances from the (already normalised for cosine) query q to `slots`."""
        x = self.vectors[np.asarray(slots, dtype=np.int64)]
        if self.space == "l2":
            diff = x - q
            return np.einsum("ij,ij->i", diff, diff, dtype=np.float32)
        return (np.float32(1) - x @ q).astype(np.float32)


def normalize_queries(queries):
    """``x * (1 / (|x| + 1e-30))`` per row, in float32, as the C core does (float32 [nq, dim])."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float32)).astype(np.float32)
    inv = (np.float32(1) / (norms + np.float32(1e-30))).astype(np.float32)
    return (q * inv[:, None]).astype(np.float32)


def _insert_limit(lst, items, limit):
    """The `limit` smallest (dist, slot) pairs of lst + items, sorted."""
    if not items:
        return lst
    merged = lst + items
    merged.sort()
    return merged[:limit]


#: The per-query counters of ``return_counts=True``, in this order (int64 [nq] each).
COUNTS = ("iterations", "expanded", "distances", "hops", "upper_distances")
_ITERATIONS, _EXPANDED, _DISTANCES, _HOPS, _UPPER_DISTANCES = range(len(COUNTS))   # their columns


def descend(g, q, counts):
    """The greedy descent of the C search from the entry point through the upper levels of ``g`` for
    the (normalised) query ``q``: (slot, distance) where it ends; adds its hops and distances to
    ``counts`` (int64 [len(COUNTS)]).  Shared with gpuhnsw._reference_fixed."""
    cur = g.entry_point
    d = float(g.distances(q, [cur])[0])
    counts[_UPPER_DISTANCES] += 1
    for level in range(g.max_level, 0, -1):  # exactly the C loop
        changed = True
        while changed:
            changed = False
            nbrs = g.neighbors(cur, level)
            counts[_HOPS] += 1
            if nbrs.size == 0:
                break
            counts[_UPPER_DISTANCES] += nbrs.size
            for s, dn in zip(nbrs.tolist(), g.distances(q, nbrs).tolist()):
                if dn < d:
                    d, cur, changed = dn, s, True
    return cur, d


def _beam_mode(g, q, limit, search_width, cur, d, counts):
    beam = [(d, cur)]
    expanded = set()
    visited = {cur}
    while True:
        parents = [s for _, s in beam if s not in expanded][:search_width]
        if not parents:
            return beam
        expanded.update(parents)
        counts[_ITERATIONS] += 1
        counts[_EXPANDED] += len(parents)
        cands = unvisited_neighbours(g, parents, visited)
        if cands:
            counts[_DISTANCES] += len(cands)
            beam = _insert_limit(beam, list(zip(g.distances(q, cands).tolist(), cands)), limit)


def _filtered_mode(g, q, limit, search_width, cur, d, allowed, pending_limit, counts):
    pending = [(d, cur)]                   # sorted by (dist, slot): a min-heap's pop order
    results = [(d, cur)] if allowed[cur] else []
    visited = {cur}
    while pending:
        bound = results[-1][0] if len(results) == limit else np.inf
        parents = []
        while pending and len(parents) < search_width and not pending[0][0] > bound:
            parents.append(pending.pop(0)[1])
        if not parents:
            break
        counts[_ITERATIONS] += 1
        counts[_EXPANDED] += len(parents)
        for p in parents:
            nbrs = [s for s in g.neighbors(p, 0).tolist() if s not in visited]
            visited.update(nbrs)
            if not nbrs:
                continue
            counts[_DISTANCES] += len(nbrs)
            for dn, s in zip(g.distances(q, nbrs).tolist(), nbrs):
                if len(results) < limit or dn < results[-1][0]:
                    bisect.insort(pending, (dn, s))
                    if allowed[s]:
                        bisect.insort(results, (dn, s))
                        del results[limit:]
        if pending_limit is not None:
            del pending[pending_limit:]
    return results


def query_arrays(g, queries, k):
    """A search's queries and empty outputs: ``q`` float32 [nq, dim] (cosine: normalised), then
    slots int64 [nq, k] (-1), dists float32 [nq, k] (+inf), found int64 [nq] and the work
    counters int64 [nq, len(COUNTS)] (one row per query, columns as ``COUNTS``)."""
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, g.dim)
    if g.space == "cosine":
        q = normalize_queries(q)
    nq = q.shape[0]
    return (q, np.full((nq, k), -1, dtype=np.int64), np.full((nq, k), np.inf, dtype=np.float32),
            np.zeros(nq, dtype=np.int64), np.zeros((nq, len(COUNTS)), dtype=np.int64))


def result_mask(g, allowed):
    """Which slots a search may return, as a list of bool [n]: live, and in ``allowed`` (bool [n],
    or None for every slot)."""
    mask = ~g.deleted
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (g.n,):
            raise ValueError(f"allowed: expected bool [{g.n}], got shape {allowed.shape}")
        mask &= allowed
    return mask.tolist()


def unvisited_neighbours(g, parents, visited):
    """The level-0 neighbours of ``parents`` (in list order) not yet in the set ``visited``, which
    takes them: one iteration's distance candidates, as the kernels' visited hash admits them."""
    cands = []
    for p in parents:
        for s in g.neighbors(p, 0).tolist():
            if s not in visited:
                visited.add(s)
                cands.append(s)
    return cands


def beam_search_reference(state, queries, k, ef, *, search_width=1, allowed=None, pending_limit=None,
                          return_counts=False):
    """Search `queries` in the graph of `state` as the C search and the GPU kernel do.

    Parameters
    ----------
    state : dict
        ``Core.export_state()`` (or a :class:`ReferenceGraph` made from one).
    queries : array-like, float32 [nq, dim]
        Raw queries (normalised here for cosine).
    k, ef : int
        Results per query; beam width (``max(ef, k)`` is used).
    search_width : int, keyword-only
        Candidates expanded per iteration (1 = the C order).
    allowed : bool array [count] over slots, keyword-only, optional
        Filter: slots where it is False are traversed but never returned. Deleted slots (from the
        state) are never returned either. A filter, or any deleted slot, selects the filtered mode.
    pending_limit : int, keyword-only, optional
        Filtered mode: keep at most this many pending candidates (the kernel's Capacity).
    return_counts : bool, keyword-only
        Also return each query's work, a dict of int64 [nq] arrays keyed by :data:`COUNTS`:
        ``iterations`` level-0 iterations (serial steps: passes that expanded at least one parent),
        ``expanded`` level-0 lists read (parents), ``distances`` level-0 distance evaluations,
        ``hops`` upper-level lists read in the descent (its serial steps, one per list),
        ``upper_distances`` the descent's distance evaluations, the entry point's included.

    Returns
    -------
    slots : int64 [nq, k], -1 where fewer than k were found
    dists : float32 [nq, k], +inf where fewer than k were found
    found : int64 [nq]
    counts : dict of int64 [nq], only with ``return_counts``
    """
    g = state if isinstance(state, ReferenceGraph) else ReferenceGraph(state)
    k, ef, search_width = int(k), int(ef), int(search_width)
    if k < 0 or ef < 1 or search_width < 1:
        raise ValueError("need k >= 0, ef >= 1, search_width >= 1")
    q, slots, dists, found, counts = query_arrays(g, queries, k)
    if g.entry_point < 0 or k == 0:
        return _output(slots, dists, found, counts, return_counts)
    mask = result_mask(g, allowed)
    filtered = allowed is not None or bool(g.deleted.any())
    limit = max(ef, k)
    for i in range(len(q)):
        cur, d = descend(g, q[i], counts[i])
        if filtered:
            res = _filtered_mode(g, q[i], limit, search_width, cur, d, mask, pending_limit, counts[i])
        else:
            res = _beam_mode(g, q[i], limit, search_width, cur, d, counts[i])
        res = res[:k]
        found[i] = len(res)
        if res:
            dists[i, :len(res)] = [d for d, _ in res]
            slots[i, :len(res)] = [s for _, s in res]
    return _output(slots, dists, found, counts, return_counts)


def _output(slots, dists, found, counts, return_counts):
    return (slots, dists, found, counts_by_name(counts)) if return_counts else (slots, dists, found)


def counts_by_name(counts):
    """The work counters int64 ``[nq, len(COUNTS)]`` as ``return_counts`` gives them: a dict of
    int64 ``[nq]`` by name."""
    return {name: np.ascontiguousarray(counts[:, j]) for j, name in enumerate(COUNTS)}
