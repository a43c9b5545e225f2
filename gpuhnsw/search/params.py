"""A query's parameters, decided and checked once (:class:`SearchParams`), and its answer
(:class:`SearchResult`), which says whether to pad or raise.

Every derived size is decided here and nowhere else: the beam width ``max(ef, k)`` (hnswlib's rule)
reaches the C search (``ghnsw_search_params_t.beam``) and the search kernel (``SearchArgs.beam``)
as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._surface import NOT_FOUND
from .._validate import as_int, num_threads as num_threads_rule

__all__ = ["SearchParams", "SearchResult", "FILTER_MODES", "MAX_SEARCH_WIDTH"]

#: ``filter_mode`` of ``knn_query``: choose per label filter by estimated cost, or force one.
FILTER_MODES = ("auto", "graph", "exact")
#: Parents a GPU beam iteration may expand (``search_width``).
MAX_SEARCH_WIDTH = 32


@dataclass(frozen=True)
class SearchParams:
    """One ``knn_query``'s parameters.

    k : results per query row
    ef : the beam width asked for; beam : the one searched with, ``max(ef, k)``
    search_width : parents per GPU beam iteration (1 follows the CPU order)
    filter_mode : one of :data:`FILTER_MODES`
    pad : fill missing results (label ``NO_LABEL``, distance ``inf``) instead of raising
    num_threads : CPU threads over the query rows (resolved: >= 1)
    device : where the index's exact searches run, ``"cpu"`` or ``"cuda:N"``
    """

    k: int
    ef: int
    beam: int
    search_width: int
    filter_mode: str
    pad: bool
    num_threads: int
    device: str

    @classmethod
    def of_query(cls, *, k, ef, num_threads, search_width, filter_mode, pad, default_threads, device):
        """The parameters of ``Index.knn_query``'s arguments (``ef``: the call's, or the index's
        default), each checked: TypeError for a non-integer or one below its minimum, ValueError for
        a value out of range."""
        k = as_int(k, "k", minimum=0)
        ef = as_int(ef, "ef", minimum=1)
        num_threads = num_threads_rule(num_threads, default=default_threads)
        search_width = as_int(search_width, "search_width", minimum=1)
        if search_width > MAX_SEARCH_WIDTH:
            raise ValueError(f"search_width must be 1..{MAX_SEARCH_WIDTH}, got {search_width}")
        if filter_mode not in FILTER_MODES:
            raise ValueError(f"filter_mode must be one of {', '.join(FILTER_MODES)}, got {filter_mode!r}")
        return cls(k=k, ef=ef, beam=max(ef, k), search_width=search_width, filter_mode=filter_mode,
                   pad=bool(pad), num_threads=num_threads, device=device)


@dataclass
class SearchResult:
    """The answer of some query rows.

    labels : uint64 ``[nq, k]``, NumPy (CuPy for GPU input), ``NO_LABEL`` past ``found``
    dists : float32 ``[nq, k]``, same kind, ``inf`` past ``found``
    found : int32 ``[nq]`` NumPy, results found per row
    """

    labels: Any
    dists: Any
    found: np.ndarray

    def finish(self, params, live, callable_filter, row0=0):
        """(labels, dists), or hnswlib's RuntimeError where a row found fewer than ``k`` and
        ``params.pad`` is off although enough are ``live``: the graph search missed them.
        ``row0``: the first row's number in the caller's query (for the message)."""
        short = self.found < params.k
        if not params.pad and short.any():
            row = int(np.argmax(short))
            cause = "the filter may allow fewer than k elements, or " if callable_filter else ""
            raise RuntimeError(f"{NOT_FOUND}: query row {row0 + row} found {self.found[row]} of k={params.k} "
                               f"neighbours among {live} live elements ({cause}the graph search missed some: "
                               f"raise ef, now {params.beam}, or M); pass pad=True to accept fewer")
        return self.labels, self.dists
