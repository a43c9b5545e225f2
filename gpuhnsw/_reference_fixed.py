"""A NumPy reference of the fixed-degree search kernel (kernels/search_fixed.cu), step for step.

Slow (plain Python per query) and meant for tests and for replays on real data: the oracle the
kernel is held to under the host emulation (tests/test_kernels_emulated.py), itself held to the C
search where the two have the same semantics (no filter, nothing deleted, ``search_width`` 1:
tests/test_reference_fixed.py).  It shares the descent, the graph parsing and the distances with
:mod:`gpuhnsw._reference` (the older kernel's reference).

One query, one block (``blocks=1``; ``limit`` = the beam width ``max(ef, k)``, ``D`` = the
adjacency's degree)::

    descent: as the C search (greedy, upper levels, stored order; one list per hop)
    level 0 over a fixed-degree padded adjacency graph [n, D] (HNSW level 0 by default; entries
    that are >= n or the row's own slot are skipped, so the padding 0xFFFFFFFF is):
      beam = [(d, cur)]; results = [(d, cur)] if cur is allowed; visited = {cur}
      loop: parents = the first `search_width` unexpanded beam entries; none -> stop
            candidates = their rows' entries not in visited (now visited)
            beam = the `limit` smallest (d, slot) of beam + candidates
            results = the `k` smallest allowed (d, slot) of results + candidates
            visited hash of 2**hash_log2 slots: if len(visited) + search_width * D would pass half
                of it, visited = the slots of beam and results (the kernel clears its hash and
                re-inserts them: a forgotten slot only costs a repeated distance, see visited.cuh)
      return results (a filter or deletions), else the beam's first k

Deleted and filtered slots are traversed like any other (they stay in the beam); only the results
leave them out, so one deletion does not change how every query searches (the older kernel and
the C search switch to hnswlib's filtered search instead).  Without a filter and with nothing
deleted, results are the beam's first k, and at ``search_width`` 1 with an exact visited set
(``hash_log2=None``) the search is the C search's beam mode.

Several blocks per query (``blocks=B > 1``, the kernel's small-batch mode): every block descends
alike, evaluates the row of the descent's end `cur` and keeps the entries of ranks b, b + B, ...
of those (sorted by (d, slot), repeats dropped) as its seeds (block 0 also `cur`, already
expanded); from there each block runs the loop above with its own beam and results but one
visited set for the query (a table of 2**global_log2 slots in global memory, never reset): a block
whose next iteration could take it past half full stops and sets ``STATUS_VISITED_FULL``.  The
query's answer is the k smallest of the blocks' answers.  The blocks run one after another here,
as the host emulation runs them (``lockstep=True``: one iteration of each in turn, a model of the
GPU for replays); on a GPU they interleave, so which block reaches a slot first,
and with it the answer, may differ from run to run (every evaluated slot is still in the answer of
the block that evaluated it, so the answer is the k best slots any block evaluated).
"""
from __future__ import annotations

import numpy as np

from .device.launch import STATUS_BAD_QUERY, STATUS_VISITED_FULL
from ._reference import (COUNTS, ReferenceGraph, counts_by_name, descend, query_arrays, result_mask,
                         unvisited_neighbours)

__all__ = ["fixed_search_reference", "STATUS_VISITED_FULL", "STATUS_BAD_QUERY"]

# The per-query work counters (``return_counts``) are gpuhnsw._reference's COUNTS, as the kernel's
# debug counters (``out_counts``) hold them: level-0 iterations (serial steps), level-0 lists read,
# level-0 distances, descent hops (serial steps), descent distances (the entry point's included).
# Several blocks: the serial steps are the most of any block, the rest summed over the blocks.
_ITERATIONS, _EXPANDED, _DISTANCES, _HOPS, _UPPER = (
    COUNTS.index(c) for c in ("iterations", "expanded", "distances", "hops", "upper_distances"))
_SERIAL = (_ITERATIONS, _HOPS)


class _Block:
    """One block's beam (list of [d, slot, expanded]) and results (list of (d, slot))."""

    def __init__(self, limit, k, allowed):
        self.limit, self.k, self.allowed = limit, k, allowed
        self.beam, self.results = [], []

    def merge(self, cands):
        """Candidates (list of (d, slot), none in the beam or the results) into both lists."""
        self.beam = sorted(self.beam + [[d, s, False] for d, s in cands], key=lambda e: (e[0], e[1]))[:self.limit]
        if self.allowed is not None:
            keep = [(d, s) for d, s in cands if self.allowed[s]]
            self.results = sorted(self.results + keep)[:self.k]

    def parents(self, width):
        """Tag and return the first `width` unexpanded beam entries' slots."""
        out = []
        for e in self.beam:
            if len(out) == width:
                break
            if not e[2]:
                e[2] = True
                out.append(e[1])
        return out

    def answer(self):
        if self.allowed is not None:
            return self.results
        return [(d, s) for d, s, _ in self.beam[:self.k]]

    def slots(self):
        return {s for _, s, _ in self.beam} | {s for _, s in self.results}


def _run_block(g, q, k, limit, width, allowed, hash_log2, blocks, global_log2, b, visited, out):
    """Block `b` of one query, a generator that yields after each level-0 iteration; `visited` is
    the query's set (shared by its blocks when ``blocks > 1``); `out` (dict) gets the block's
    answer, status bits and counts."""
    counts = np.zeros(len(COUNTS), dtype=np.int64)
    degree = g.M0
    out["status"], out["counts"] = 0, counts
    cur, d = descend(g, q, counts)
    blk = _Block(limit, k, allowed)
    if blocks == 1:
        visited.add(cur)
        blk.beam = [[d, cur, False]]
        blk.results = [(d, cur)] if allowed is not None and allowed[cur] else []
    else:
        # the seed round: cur's row, every block alike; block b keeps ranks b, b + B, ...
        nbrs = g.neighbors(cur, 0).tolist()
        visited |= {cur, *nbrs}
        counts[_ITERATIONS] += 1
        counts[_EXPANDED] += 1
        counts[_DISTANCES] += len(nbrs)
        ranked = sorted(set(zip(g.distances(q, nbrs).tolist(), nbrs))) if nbrs else []
        if b == 0:
            blk.beam = [[d, cur, True]]
            blk.results = [(d, cur)] if allowed is not None and allowed[cur] else []
        blk.merge(ranked[b::blocks])
        yield
    while True:
        parents = blk.parents(width)
        if not parents:
            break
        if blocks > 1 and len(visited) + len(parents) * degree > (1 << global_log2) // 2:
            out["status"] |= STATUS_VISITED_FULL
            break
        counts[_ITERATIONS] += 1
        counts[_EXPANDED] += len(parents)
        cands = unvisited_neighbours(g, parents, visited)
        if cands:
            counts[_DISTANCES] += len(cands)
            blk.merge(list(zip(g.distances(q, cands).tolist(), cands)))
        if blocks == 1 and hash_log2 is not None and len(visited) + width * degree > (1 << hash_log2) // 2:
            visited.clear()
            visited |= blk.slots()
        yield
    out["answer"] = blk.answer()


def _search_one(g, q, k, limit, width, allowed, hash_log2, blocks, global_log2, lockstep):
    """One query: (answer [(d, slot)] sorted, status, counts [len(COUNTS)])."""
    visited = set()
    outs = [{} for _ in range(blocks)]
    runs = [_run_block(g, q, k, limit, width, allowed, hash_log2, blocks, global_log2, b, visited, outs[b])
            for b in range(blocks)]
    if lockstep:   # one iteration of each block in turn, until all are done
        while runs:
            runs = [r for r in runs if next(r, StopIteration) is not StopIteration]
    else:          # one block after another, as the host emulation runs them
        for r in runs:
            for _ in r:
                pass
    counts = np.stack([o["counts"] for o in outs])
    counts = np.array([counts[:, j].max() if j in _SERIAL else counts[:, j].sum() for j in range(len(COUNTS))])
    status = 0
    for o in outs:
        status |= o["status"]
    return sorted(a for o in outs for a in o["answer"])[:k], status, counts


def fixed_search_reference(state, queries, k, ef, *, search_width=1, allowed=None, graph=None, hash_log2=None,
                           blocks=1, global_log2=None, lockstep=False, return_counts=False):
    """Search `queries` as ``search_fixed_kernel`` does (see the module docstring).

    Parameters
    ----------
    state : dict (``Core.export_state()``) or :class:`~gpuhnsw._reference.ReferenceGraph`
    queries : float32-castable [nq, dim], raw (normalised here for cosine)
    k, ef : int; the beam holds ``max(ef, k)`` entries (per block with ``blocks > 1``)
    search_width : int, 1..8, parents per iteration
    allowed : bool [count], optional: slots that may be returned (deleted ones never are)
    graph : uint32 [count, D], optional: the level-0 adjacency, fixed degree, padded with
        0xFFFFFFFF (``ReferenceGraph``'s ``level0``; default: the state's ``links0``, D = M0, read
        whole as the kernel reads it: its entries past degree0 are 0xFFFFFFFF)
    hash_log2 : int, optional: the kernel's shared-memory visited hash (resets as it does);
        None: an exact visited set (no repeated distances)
    blocks : int, blocks per query; global_log2 : int, their shared visited table (required with
        ``blocks > 1``)
    lockstep : bool, the blocks of a query take one iteration each in turn (a model of a GPU
        running them side by side, for replays) instead of one after another (the emulation's order)
    return_counts : bool, also return the counters of ``gpuhnsw._reference.COUNTS``

    Returns
    -------
    slots : int64 [nq, k], -1 where missing; dists : float32 [nq, k], inf where missing;
    found : int64 [nq]; status : int32 [nq] (``STATUS_*`` bits);
    counts : dict of int64 [nq] keyed by ``COUNTS``, only with ``return_counts``
    """
    if isinstance(state, ReferenceGraph):
        if graph is not None:
            raise ValueError("graph: pass the state, not a ReferenceGraph, with a graph")
        g = state
    else:
        n = int(state["count"])
        if graph is None and n:   # the stored level 0, every row read whole, as the kernel reads it
            graph = np.frombuffer(state["links0"], np.uint32).reshape(n, -1)
        g = ReferenceGraph(state, level0=graph)
    k, limit, width, blocks = int(k), max(int(ef), int(k)), int(search_width), int(blocks)
    if k < 1 or width < 1 or blocks < 1 or (blocks > 1 and global_log2 is None):
        raise ValueError("need k >= 1, search_width >= 1, blocks >= 1 (and global_log2 with blocks > 1)")
    q, slots, dists, found, counts = query_arrays(g, queries, k)
    nq = q.shape[0]
    status = np.zeros(nq, dtype=np.int32)
    mask = result_mask(g, allowed) if allowed is not None or g.deleted.any() else None
    raw = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, g.dim)
    for i in range(nq):
        if not np.isfinite(raw[i]).all():
            status[i] = STATUS_BAD_QUERY
            continue
        if g.entry_point < 0:
            continue
        res, status[i], counts[i] = _search_one(g, q[i], k, limit, width, mask, hash_log2, blocks,
                                                global_log2, lockstep)
        found[i] = len(res)
        if res:
            dists[i, :len(res)] = [d for d, _ in res]
            slots[i, :len(res)] = [s for _, s in res]
    out = (slots, dists, found, status)
    if not return_counts:
        return out
    return out + (counts_by_name(counts),)
