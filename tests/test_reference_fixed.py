"""The NumPy reference of search_fixed_kernel (gpuhnsw._reference_fixed) against the C search, the
older kernel's reference and hand-built graphs.

Where the semantics coincide (no filter, nothing deleted, search_width 1, an exact visited set) it
must be the C search: same top-k label sets for >= 99 % of queries, distances within 1e-4.  Its own
rules are pinned down on hand-built graphs: complete graphs give exact answers with and without a
filter, deletions or several blocks; its work counters are counted by hand on a path.
(tests/test_kernels_emulated.py holds the kernel to this reference, counters included.)
"""
import numpy as np
import pytest

from gpuhnsw._reference import ReferenceGraph, beam_search_reference
from gpuhnsw._reference_fixed import STATUS_BAD_QUERY, STATUS_VISITED_FULL, fixed_search_reference
from gpuhnsw.testing import exact_knn
from test_reference import RTOL, ATOL, check_results, exact_slots, make_state, needs_core


@pytest.fixture
def complete(rng):
    """20 points in 6-d, every node linked to every other; slot 0 on level 1 too."""
    x = rng.standard_normal((20, 6)).astype(np.float32)
    return x, [[j for j in range(20) if j != i] for i in range(20)]


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("width, blocks", [(1, 1), (3, 1), (1, 4), (2, 3)])
def test_complete_graph_is_exact(complete, rng, space, width, blocks):
    x, links = complete
    state = make_state(x, links, space=space, upper={0: [[3, 7, 11]]})
    q = rng.standard_normal((15, 6)).astype(np.float32)
    slots, dists, found, status = fixed_search_reference(state, q, 5, 5, search_width=width, blocks=blocks,
                                                         global_log2=8)
    assert np.all(found == 5) and np.all(status == 0)
    for s, e in zip(slots, exact_slots(state, q, 5)):
        np.testing.assert_array_equal(s, e)
    check_results(slots, dists, found)


@pytest.mark.parametrize("blocks", [1, 2])
def test_deleted_and_filtered_slots_are_waypoints(complete, rng, blocks):
    """Excluded slots are traversed and never returned: on a complete graph the answer is the exact
    allowed top-k, and the path (the work counters) is the same as with nothing excluded."""
    x, links = complete
    deleted = np.zeros(20, np.uint8)
    deleted[[1, 2, 5, 8]] = 1
    plain = make_state(x, links)
    state = make_state(x, links, deleted=deleted)
    allowed = np.arange(20) % 3 != 0
    mask = allowed & (deleted == 0)
    q = rng.standard_normal((10, 6)).astype(np.float32)
    slots, dists, found, _, counts = fixed_search_reference(state, q, 4, 8, allowed=allowed, blocks=blocks,
                                                            global_log2=8, return_counts=True)
    check_results(slots, dists, found, mask)
    for s, e in zip(slots, exact_slots(state, q, 4, mask)):
        np.testing.assert_array_equal(s, e)
    *_, plain_counts = fixed_search_reference(plain, q, 4, 8, blocks=blocks, global_log2=8, return_counts=True)
    for name in counts:
        np.testing.assert_array_equal(counts[name], plain_counts[name])


def test_counters_on_a_path():
    """0 - 1 - 2 - 3 - 4 on a line, entry 0 (also on level 1 with 2), query at 4.4; beam 2.
    descent: entry (1 distance), level 1 list of 0 = [2]: moves to 2 (hop 1, 1 distance), list of 2
    = [0]: no move (hop 2, 1 distance).  level 0 from 2: expand 2 -> 1, 3 (2 distances); expand 3
    -> 4 (1); expand 4 -> nothing new; beam {4, 3} all expanded: 3 iterations, 3 distances."""
    x = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]], np.float32)
    links = [[1], [0, 2], [1, 3], [2, 4], [3]]
    state = make_state(x, links, M=1, upper={0: [[2]], 2: [[0]]})
    slots, _, found, status, counts = fixed_search_reference(state, [[4.4]], 2, 2, return_counts=True)
    assert slots[0].tolist() == [4, 3] and found[0] == 2 and status[0] == 0
    assert {c: int(v[0]) for c, v in counts.items()} == {"iterations": 3, "expanded": 3, "distances": 3, "hops": 2,
                                                          "upper_distances": 3}
    # beam 3, width 2: expand 2 -> 1, 3; then 3 and 1 together -> 4, 0; then 4 -> nothing new
    *_, counts = fixed_search_reference(state, [[4.4]], 2, 3, search_width=2, return_counts=True)
    assert counts["iterations"][0] == 3 and counts["expanded"][0] == 4 and counts["distances"][0] == 4


def test_bad_queries_and_empty_state(complete):
    x, links = complete
    state = make_state(x, links)
    q = np.array([[0.0] * 6, [np.nan] + [0.0] * 5, [np.inf] * 6], np.float32)
    slots, dists, found, status = fixed_search_reference(state, q, 3, 3)
    assert status.tolist() == [0, STATUS_BAD_QUERY, STATUS_BAD_QUERY]
    assert found.tolist() == [3, 0, 0] and np.all(slots[1:] == -1) and np.all(np.isinf(dists[1:]))
    empty = {"space": "l2", "dim": 4, "M": 2, "count": 0, "entry_point": -1, "max_level": -1,
             "vectors": b"", "links0": b"", "degree0": b"", "labels": b"", "levels": b"", "upper": b"",
             "deleted": b""}
    assert fixed_search_reference(empty, np.zeros((2, 4), np.float32), 3, 3)[2].tolist() == [0, 0]


def test_arguments_are_checked(complete):
    x, links = complete
    state = make_state(x, links)
    with pytest.raises(ValueError, match="level0"):
        fixed_search_reference(state, x[:2], 3, 3, graph=np.zeros((20, 4), np.int64))
    with pytest.raises(ValueError, match="global_log2"):
        fixed_search_reference(state, x[:2], 3, 3, blocks=2)
    with pytest.raises(ValueError, match="allowed"):
        fixed_search_reference(state, x[:2], 3, 3, allowed=np.ones(5, bool))


# ---------------------------------------------------------------------------------------------
# real data

def labels_of(state, slots):
    labels = np.frombuffer(state["labels"], np.uint64)
    return np.where(slots >= 0, labels[np.maximum(slots, 0)], np.uint64(2**64 - 1))


@needs_core
@pytest.mark.parametrize("which", ["sift", "minilm"])
def test_width_one_is_the_c_search(sift_index, minilm_index, which):
    index, _, queries = sift_index if which == "sift" else minilm_index
    state = index._core.export_state()
    c_labels, c_dists = index.knn_query(queries, k=10, ef=30, num_threads=1)
    slots, dists, found, status = fixed_search_reference(state, queries, 10, 30)
    same = np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(c_labels, labels_of(state, slots))])
    assert same >= 0.99, f"same top-10 sets for only {same:.3f} of the queries"
    np.testing.assert_allclose(dists, c_dists, rtol=RTOL, atol=ATOL)
    assert np.all(status == 0)


@needs_core
@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_beam_is_the_older_kernels_beam_mode(sift_index, width):
    """Without a filter or deletions and with an exact visited set, the same search as the older
    kernel's beam mode at every width; a small visited hash (resets) gives the same answer at the
    price of repeated distances."""
    index, _, queries = sift_index
    state = index._core.export_state()
    old = beam_search_reference(state, queries, 10, 20, search_width=width, return_counts=True)
    new = fixed_search_reference(state, queries, 10, 20, search_width=width, return_counts=True)
    for a, b in zip(old[:3], new[:3]):
        np.testing.assert_array_equal(a, b)
    for name in old[3]:   # the same work too, counted the same way
        np.testing.assert_array_equal(old[3][name], new[4][name])
    reset = fixed_search_reference(state, queries, 10, 20, search_width=width, hash_log2=7, return_counts=True)
    for a, b in zip(new[:4], reset[:4]):
        np.testing.assert_array_equal(a, b)
    more = reset[4]["distances"] - new[4]["distances"]
    assert np.all(more >= 0) and more.sum() > 0
    for name in ("iterations", "expanded", "hops", "upper_distances"):
        np.testing.assert_array_equal(reset[4][name], new[4][name])


@needs_core
def test_filter_and_deletions_keep_recall(minilm_index):
    """Deleted and filtered slots only leave the answer: recall over the allowed rows stays near
    the unfiltered search's, and the results are sorted, distinct and allowed."""
    index, base, queries = minilm_index
    state = index._core.export_state()
    g = ReferenceGraph(state)
    allowed = np.arange(g.n) % 10 != 0
    slots, dists, found, _ = fixed_search_reference(state, queries, 10, 40, search_width=2, allowed=allowed)
    check_results(slots, dists, found, allowed)
    truth, _ = exact_knn(base[allowed], queries, 10, "cosine")
    rows = np.flatnonzero(allowed)
    got = labels_of(state, slots)
    recall = np.mean([len(set(a.tolist()) & set(rows[b].tolist())) / 10 for a, b in zip(got, truth)])
    assert recall >= 0.9, recall


@needs_core
@pytest.mark.parametrize("blocks", [2, 4])
def test_blocks_share_the_work(sift_index, blocks):
    """Several blocks per query: no slot evaluated twice (the distances sum to at most one exact
    search's plus the seed rounds), recall as one block's, in either schedule; a table too small
    stops the blocks with the status bit."""
    index, base, queries = sift_index
    state = index._core.export_state()
    truth, _ = exact_knn(base, queries, 10, "l2")

    def recall(slots):
        return np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(labels_of(state, slots), truth)])

    one = fixed_search_reference(state, queries, 10, 40, return_counts=True)
    for lockstep in (False, True):
        many = fixed_search_reference(state, queries, 10, 40, blocks=blocks, global_log2=15, lockstep=lockstep,
                                      return_counts=True)
        check_results(*many[:3])
        assert np.all(many[3] == 0) and recall(many[0]) >= recall(one[0]) - 0.01
        assert np.all(many[4]["distances"] <= ReferenceGraph(state).n + blocks * ReferenceGraph(state).M0)
    full = fixed_search_reference(state, queries[:5], 10, 40, blocks=blocks, global_log2=7)
    assert np.all(full[3] == STATUS_VISITED_FULL)
    check_results(*full[:3])
