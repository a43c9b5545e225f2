"""The search graph built on the device from a mirror's arrays (``gpuhnsw/csrc/search_graph.c`` says
what the graph is; this is the same construction in CuPy array operations, used where the index's
graph lives on a GPU).

``build(mirror, degree, count)`` over the mirror's first ``count`` slots, as its arrays hold them::

    valid   [n, M0] bool    level-0 entries as the search reads them: below the degree, ids < n, not
                            the row itself, neither end deleted (the deleted bitset)
    forward [n]             valid entries per row; rows [n, D] get them in stored order, cut at D
    edges   [e]             every valid entry (source -> target), all of them (the cut only limits
                            the row): the target's reverse candidates, less the sources already in
                            its forward part (a sorted key lookup)
    order                   (target, distance, source) by one lexsort; a candidate's rank in its
                            target's run + the target's forward count is its place, kept below D

Distances are the mirror's rows' (float32 sums of float32 values decoded from its float32, float16
or bfloat16 rows), in chunks of ``_CHUNK_PAIRS`` pairs; a NaN sorts last, as in C.  So the graph is
the C build's entry for entry where the two agree on every distance (float32 rows of data whose
sums are exact, as siftsmall's); elsewhere two reverse edges whose distances round differently may
swap places, as against the NumPy reference (``gpuhnsw._graph_reference``).
"""
from __future__ import annotations

import numpy as np

from .._core import INVALID_SLOT
from .arrays import bf16_values, import_cupy

__all__ = ["build"]

_CHUNK_PAIRS = 1 << 18   # pairs whose two rows are gathered at once (2 x 256k rows)


def _rows_f32(cp, vectors, idx, dim):
    """The mirror's rows ``idx`` as float32 ``[len(idx), dim]`` (bfloat16: uint16 top halves)."""
    rows = vectors[idx, :dim]
    return bf16_values(rows, cp) if rows.dtype == cp.uint16 else rows.astype(cp.float32)


def _pair_distances(cp, mirror, a, b):
    """float32 distances between the mirror's rows ``a[i]`` and ``b[i]`` (int64 ``[p]`` each), as the
    engine's pair distance defines them: squared l2, else 1 - dot (cosine rows are normalised)."""
    out = cp.empty(a.size, dtype=cp.float32)
    for s in range(0, a.size, _CHUNK_PAIRS):
        x = _rows_f32(cp, mirror.vectors, a[s:s + _CHUNK_PAIRS], mirror.dim)
        y = _rows_f32(cp, mirror.vectors, b[s:s + _CHUNK_PAIRS], mirror.dim)
        if mirror.metric == 0:   # l2 (kernels.METRICS)
            diff = x - y
            out[s:s + _CHUNK_PAIRS] = (diff * diff).sum(axis=1, dtype=cp.float32)
        else:
            out[s:s + _CHUNK_PAIRS] = cp.float32(1) - (x * y).sum(axis=1, dtype=cp.float32)
    return out


def build(mirror, degree, count):
    """The search graph of the first ``count`` slots of ``mirror`` (a
    :class:`~gpuhnsw.device.mirror.DeviceMirror` whose arrays hold them: synced, or in a sync after
    its uploads).

    Returns
    -------
    rows : cupy uint32 [count, degree]
        As ``Core.build_search_graph`` builds them (module docstring), ``0xFFFFFFFF`` padding.
    forward : cupy uint32 [count]
        The forward entries of each row (``with_forward``'s output).
    """
    cp = import_cupy()
    n, d = int(count), int(degree)
    rows = cp.full((n, d), INVALID_SLOT, dtype=cp.uint32)
    if n == 0:
        return rows, cp.zeros(0, dtype=cp.uint32)
    links = mirror.links0[:n].astype(cp.int64)                                    # [n, M0]
    slot = cp.arange(n, dtype=cp.int64)
    dead = ((mirror.deleted[slot >> 5] >> (slot & 31).astype(cp.uint32)) & 1).astype(cp.bool_)   # [n]
    deg = cp.minimum(mirror.degree0[:n], mirror.M0).astype(cp.int64)
    valid = (cp.arange(mirror.M0)[None, :] < deg[:, None]) & (links < n) & (links != slot[:, None])
    valid &= ~dead[cp.minimum(links, n - 1)] & ~dead[:, None]
    place = cp.cumsum(valid, axis=1) - 1                                          # [n, M0]
    forward = cp.minimum(valid.sum(axis=1), d).astype(cp.uint32)
    kept = valid & (place < d)
    src = cp.broadcast_to(slot[:, None], valid.shape)
    rows[src[kept], place[kept]] = links[kept].astype(cp.uint32)
    # reverse candidates: source -> target edges whose source is not in the target's forward part
    tgt_all, src_all = links[valid], src[valid]
    fkeys = cp.sort(src[kept] * n + links[kept])             # (row, forward entry) of the cut rows
    cand = tgt_all * n + src_all                             # (target, source) as a forward key
    at = cp.minimum(cp.searchsorted(fkeys, cand), max(fkeys.size - 1, 0))
    fresh = fkeys[at] != cand if fkeys.size else cp.ones(cand.size, dtype=cp.bool_)
    tgt, srcs = tgt_all[fresh], src_all[fresh]
    dist = _pair_distances(cp, mirror, tgt, srcs)
    dist = cp.where(cp.isnan(dist), cp.float32(np.inf), dist)
    order = cp.lexsort(cp.stack([srcs.astype(cp.float64), dist.astype(cp.float64), tgt.astype(cp.float64)]))
    tgt, srcs = tgt[order], srcs[order]
    rank = cp.arange(tgt.size, dtype=cp.int64) - cp.searchsorted(tgt, tgt)   # place in the target's run
    pos = forward.astype(cp.int64)[tgt] + rank
    room = pos < d
    rows[tgt[room], pos[room]] = srcs[room].astype(cp.uint32)
    return rows, forward
