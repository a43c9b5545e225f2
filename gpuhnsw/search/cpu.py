"""The CPU legs of a query: graph search in the C engine (``Core.search``), and exact search over the
rows a label filter allows (gathered from the core, searched by the exact engine on the index's
device).  Both answer the query rows they are given and return; neither decides which rows they get.
"""
from __future__ import annotations

import numpy as np

from .._surface import NO_LABEL
from .._validate import threads_for
from ..exact import exact_search

__all__ = ["graph_search", "exact_over_allowed"]


def graph_search(core, q, params, sets=None, callback=None):
    """The C search of the query rows ``q`` (float32 ``[nq, dim]``) under the allowed bitsets ``sets``
    (``filters.AllowedSets`` of these rows, or None) or a callable filter ``callback`` (label ->
    bool, or None).  Returns labels uint64 ``[nq, k]``, dists float32 ``[nq, k]`` (padded past what
    was found) and found int32 ``[nq]``."""
    nq, k = q.shape[0], params.k
    labels = np.empty((nq, k), dtype=np.uint64)
    dists = np.empty((nq, k), dtype=np.float32)
    found = np.zeros(nq, dtype=np.int32)
    if k == 0 or nq == 0:
        return labels, dists, found
    allowed = None if sets is None else np.ascontiguousarray(sets.search_bits())
    core.search(np.ascontiguousarray(q), labels, dists, found, k=k, beam=params.beam,
                num_threads=threads_for(params.num_threads, nq), allowed=allowed,
                allowed_stride=allowed.shape[-1] if sets is not None and sets.per_query else 0, filter=callback)
    return labels, dists, found


def exact_over_allowed(core, space, q, slots, params):
    """Exact search of the query rows ``q`` (float32 ``[r, dim]``) over the elements in ``slots``
    (uint32 ``[m]``), on ``params.device``.  Returns labels uint64 ``[r, k]`` and dists float32
    ``[r, k]``, padded (``NO_LABEL``, ``inf``) past ``m``."""
    m, r, k = slots.shape[0], q.shape[0], params.k
    vectors = np.empty((m, core.dim_pad), dtype=np.float32)
    slot_labels = np.empty(m, dtype=np.uint64)
    core.gather_rows(slots, vectors, np.empty((m, core.M0), dtype=np.uint32), np.empty(m, dtype=np.uint32),
                     slot_labels, np.empty(m, dtype=np.uint8), True)   # the exact rows where kept
    labels = np.full((r, k), NO_LABEL, dtype=np.uint64)
    dists = np.full((r, k), np.inf, dtype=np.float32)
    kk = min(k, m)
    if kk:
        ids, d = exact_search(vectors[:, :q.shape[1]], q, kk, space, num_threads=threads_for(params.num_threads, r),
                              device=params.device)
        labels[:, :kk], dists[:, :kk] = slot_labels[ids], d
    return labels, dists
