"""Label filters of ``Index.knn_query``: every accepted form as allowed-slot bitsets of a core.

One interface for every label filter, as hnswlib passes one filter down: whatever form the caller
gave (labels, a set, a boolean mask over labels, or one of those per query row), the searches see
:class:`AllowedSets`, bitsets over slots with the deleted ones cleared.  A callable filter is not
parsed here: the C search calls it.
"""
import numpy as np

from .._validate import as_labels, label_array

# Per-query filters take one bitset of capacity / 8 bytes per query row: knn_query parses and
# searches them in parts of at most this many bytes of bitsets (``chunk_rows``).
BITSET_CHUNK_BYTES = 64 << 20


class AllowedSets:
    """Allowed labels as bitsets over slots.

    bits : uint32 ``[g, words]``, ``g = 1`` (one filter for every query) or ``g = nq`` (one per row);
        deleted slots are already cleared
    live : int64 ``[g]``, allowed elements that are not deleted
    per_query : bool
    """

    def __init__(self, bits, live, per_query):
        self.bits, self.live, self.per_query = bits, live, per_query

    def row_live(self, nq):
        """int64 ``[nq]``: allowed live elements of each of ``nq`` query rows."""
        return self.live if self.per_query else np.repeat(self.live, nq)

    def search_bits(self):
        """The bitsets as a search takes them: uint32 ``[words]`` (one for every query) or
        ``[nq, words]`` (one row per query)."""
        return self.bits if self.per_query else self.bits[0]

    def take(self, rows):
        """The sets of query rows ``rows`` (int ``[r]``): per-query sets are cut, shared ones kept."""
        if not self.per_query:
            return self
        return AllowedSets(self.bits[rows], self.live[rows], True)

    def slots(self, i):
        """Allowed live slots of set ``i`` (uint32 ``[live[i]]``, ascending)."""
        flags = np.unpackbits(self.bits[i].view(np.uint8), bitorder="little")
        return np.flatnonzero(flags).astype(np.uint32)


def _is_collection(x):
    return isinstance(x, (set, frozenset, list, tuple)) or np.ndim(x) >= 1


def _labels_of(one):
    """One filter's allowed labels (uint64 ``[m]``): labels, a set of labels, or a boolean mask over
    labels (``mask[label]`` True means allowed)."""
    arr = label_array(one)
    if arr.dtype == np.bool_:
        if arr.ndim != 1:
            raise ValueError(f"a boolean filter mask must be 1-D over labels, got shape {arr.shape}")
        return np.flatnonzero(arr).astype(np.uint64)
    if arr.ndim != 1 and arr.size:
        raise ValueError(f"a filter's allowed labels must be 1-D, got shape {arr.shape}")
    return as_labels(arr.reshape(-1))


def _per_query_list(filter):
    return isinstance(filter, (list, tuple)) and filter and _is_collection(filter[0])


def per_query(filter):
    """Whether ``filter`` (a host label filter, not a callable) holds one allowed set per query row."""
    if isinstance(filter, (set, frozenset)):
        return False
    return bool(_per_query_list(filter)) or np.ndim(filter) == 2


def chunk_rows(capacity):
    """Query rows whose per-query bitsets over ``capacity`` slots fit in ``BITSET_CHUNK_BYTES``."""
    return max(1, BITSET_CHUNK_BYTES // (4 * ((capacity + 31) // 32)))


def filter_rows(filter, rows):
    """The part of a ``knn_query`` filter that applies to query rows ``rows`` (int ``[r]``): a
    per-query filter is cut to those rows; a callable or a filter for every row is returned as is."""
    if filter is None or callable(filter) or isinstance(filter, (set, frozenset)):
        return filter
    if _per_query_list(filter):
        return [filter[i] for i in rows]
    arr = np.asarray(filter)
    return arr[rows] if arr.ndim == 2 else filter


def label_sets(filter, nq):
    """``filter`` (anything but a callable) -> (list of uint64 label arrays, per_query).

    One filter for every query: labels (array-like or set), or a boolean mask ``[n_labels]``.
    Per query: a boolean mask ``[nq, n_labels]``, an integer array ``[nq, m]``, or a list of ``nq``
    label arrays / sets / masks (ragged).
    """
    if not per_query(filter):
        if not isinstance(filter, (set, frozenset)) and np.ndim(filter) > 2:
            raise ValueError(f"filter must be 1-D (one for all queries) or 2-D (one row per query), "
                             f"got shape {np.shape(filter)}")
        return [_labels_of(filter)], False
    rows = list(filter) if _per_query_list(filter) else list(np.asarray(filter))
    if len(rows) != nq:
        raise ValueError(f"a per-query filter needs one entry per query row: got {len(rows)} for {nq} queries")
    return [_labels_of(r) for r in rows], True


def popcount(words):
    """Set bits per row of uint32 ``[g, words]`` -> int64 ``[g]``."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    return np.unpackbits(words.view(np.uint8), axis=1).sum(axis=1, dtype=np.int64)


def allowed_sets(core, filter, nq):
    """Parse ``filter`` and turn its labels into live-slot bitsets of ``core`` (unknown labels are
    ignored: they cannot be returned anyway)."""
    sets, one_per_row = label_sets(filter, nq)
    deleted = np.frombuffer(core.deleted_bitset(), dtype=np.uint32)
    bits = np.zeros((len(sets), deleted.shape[0]), dtype=np.uint32)
    for i, labels in enumerate(sets):
        row = np.frombuffer(core.allowed_bitset(labels), dtype=np.uint32)
        # a resize may run beside us: words past the shorter of the two stay zero (not allowed)
        words = min(deleted.shape[0], row.shape[0])
        np.bitwise_and(row[:words], ~deleted[:words], out=bits[i, :words])
    return AllowedSets(bits, popcount(bits), one_per_row)
