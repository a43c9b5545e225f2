"""The NumPy reference of the GPU search (gpuhnsw._reference) against the C search and exact search.

The reference is the oracle the kernels are held to on a GPU machine, so it must first agree with
the C core: same top-k label sets for >= 99 % of queries (an exact float tie may resolve
differently), distances within 1e-4 relative, in both modes (beam; filtered / deleted).
Hand-built tiny graphs pin the semantics down exactly (a complete graph must give exact results).
"""
import pickle

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw._reference import INVALID, ReferenceGraph, beam_search_reference, normalize_queries
from gpuhnsw.testing import exact_knn

RTOL, ATOL = 1e-4, 1e-5  # float32, different summation order; cosine distances can be near 0


# ---------------------------------------------------------------------------------------------
# helpers

def make_state(vectors, links0, *, space="l2", M=None, levels=None, upper=None, entry_point=0,
               deleted=None, labels=None):
    """A Core.export_state()-style dict for a hand-built graph.

    links0: list of level-0 lists; upper: {slot: [level-1 list, level-2 list, ...]}.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if space == "cosine":
        vectors = normalize_queries(vectors)
    M = M or max(1, -(-max(len(x) for x in links0) // 2))
    M0 = 2 * M
    l0 = np.full((n, M0), 0xFFFFFFFF, dtype=np.uint32)
    deg = np.zeros(n, dtype=np.uint32)
    for i, lst in enumerate(links0):
        l0[i, :len(lst)] = lst
        deg[i] = len(lst)
    upper = upper or {}
    lv = np.zeros(n, dtype=np.uint8)
    blocks = []
    for i in range(n):
        lists = upper.get(i, [])
        lv[i] = len(lists) if levels is None else levels[i]
        for lst in lists:
            blk = np.full(1 + M, 0xFFFFFFFF, dtype=np.uint32)
            blk[0] = len(lst)
            blk[1:1 + len(lst)] = lst
            blocks.append(blk)
    max_level = int(lv.max()) if n else -1
    return {
        "space": space, "dim": dim, "M": M, "ef_construction": 10, "random_seed": 1,
        "allow_replace_deleted": False, "max_elements": n, "count": n,
        "entry_point": entry_point if n else -1, "max_level": max_level, "insert_seq": n,
        "vectors": vectors.tobytes(), "links0": l0.tobytes(), "degree0": deg.tobytes(),
        "labels": (np.arange(n, dtype=np.uint64) if labels is None else np.asarray(labels, np.uint64)).tobytes(),
        "levels": lv.tobytes(),
        "upper": (np.concatenate(blocks) if blocks else np.zeros(0, np.uint32)).tobytes(),
        "deleted": (np.zeros(n, np.uint8) if deleted is None else np.asarray(deleted, np.uint8)).tobytes(),
    }


def exact_slots(state, queries, k, mask=None):
    g = ReferenceGraph(state)
    q = np.asarray(queries, dtype=np.float32)
    if g.space == "cosine":
        q = normalize_queries(q)
    out = []
    for row in q:
        d = g.distances(row, np.arange(g.n))
        order = np.lexsort((np.arange(g.n), d))
        if mask is not None:
            order = order[mask[order]]
        out.append(order[:k])
    return out


def check_results(slots, dists, found, mask=None):
    """Sorted, unique, allowed, padded: whatever the graph."""
    for s, d, f in zip(slots, dists, found):
        assert np.all(s[f:] == -1) and np.all(np.isinf(d[f:]))
        s, d = s[:f], d[:f]
        assert len(set(s.tolist())) == f
        assert np.all(np.diff(d) >= 0)
        if mask is not None:
            assert np.all(mask[s])


def c_core_available():
    try:
        gpuhnsw.Index("l2", 4).init_index(10)
        return True
    except Exception:  # the engine is not built
        return False


needs_core = pytest.mark.skipif(not c_core_available(), reason="gpuhnsw._core not built")


# ---------------------------------------------------------------------------------------------
# hand-built graphs: exact answers

@pytest.fixture
def complete(rng):
    """20 points in 6-d, every node linked to every other; slot 0 on level 1 too."""
    x = rng.standard_normal((20, 6)).astype(np.float32)
    links = [[j for j in range(20) if j != i] for i in range(20)]
    return x, links


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("width", [1, 3])
def test_complete_graph_is_exact(complete, rng, space, width):
    x, links = complete
    state = make_state(x, links, space=space, upper={0: [[3, 7, 11]]})
    q = rng.standard_normal((15, 6)).astype(np.float32)
    slots, dists, found = beam_search_reference(state, q, 5, 5, search_width=width)
    assert np.all(found == 5)
    for s, e in zip(slots, exact_slots(state, q, 5)):
        np.testing.assert_array_equal(s, e)
    check_results(slots, dists, found)


@pytest.mark.parametrize("width", [1, 4])
def test_complete_graph_with_deletions_and_filter(complete, rng, width):
    x, links = complete
    deleted = np.zeros(20, np.uint8)
    deleted[[1, 2, 5, 8]] = 1
    state = make_state(x, links, deleted=deleted)
    q = rng.standard_normal((15, 6)).astype(np.float32)
    live = ~deleted.astype(bool)
    slots, dists, found = beam_search_reference(state, q, 6, 6, search_width=width)
    for s, e in zip(slots, exact_slots(state, q, 6, live)):
        np.testing.assert_array_equal(s, e)
    allowed = np.arange(20) % 3 != 0
    slots, dists, found = beam_search_reference(state, q, 6, 6, search_width=width, allowed=allowed)
    for s, e in zip(slots, exact_slots(state, q, 6, live & allowed)):
        np.testing.assert_array_equal(s, e)
    check_results(slots, dists, found, live & allowed)
    # a filter letting 2 slots through finds both, and no more
    two = np.zeros(20, bool)
    two[[4, 17]] = True
    slots, _, found = beam_search_reference(state, q, 6, 6, search_width=width, allowed=two)
    assert np.all(found == 2)
    assert all(set(s[:2].tolist()) == {4, 17} for s in slots)


def test_chain_descent_and_beam_order():
    """A path graph 0-1-...-9 on a line: the beam walks it; the upper level jumps ahead."""
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    links = [[j for j in (i - 1, i + 1) if 0 <= j < 10] for i in range(10)]
    state = make_state(x, links, M=2, upper={0: [[9]], 9: [[0]]})
    q = np.full((1, 4), 8.2, np.float32)
    slots, dists, found = beam_search_reference(state, q, 3, 3)
    assert slots[0].tolist() == [8, 9, 7]
    np.testing.assert_allclose(dists[0], 4 * (np.array([8, 9, 7]) - 8.2) ** 2, rtol=1e-5)
    # ef = 1 still returns the greedy end of the walk
    slots, _, _ = beam_search_reference(state, np.zeros((1, 4), np.float32), 1, 1)
    assert slots[0].tolist() == [0]


def test_lists_read_like_the_c_core(rng):
    """Counts above the cap read as capped, ids >= count and self links are skipped."""
    x = rng.standard_normal((4, 4)).astype(np.float32)
    state = make_state(x, [[1, 2], [0, 1, 99], [0], [0]], M=2)
    g = ReferenceGraph(state)
    assert g.neighbors(1, 0).tolist() == [0]
    deg = np.frombuffer(state["degree0"], np.uint32).copy()
    deg[0] = 50
    g = ReferenceGraph(dict(state, degree0=deg.tobytes()))
    assert g.neighbors(0, 0).tolist() == [1, 2]   # capped at M0 = 4; unused entries are invalid


def test_empty_and_k0():
    empty = {"space": "l2", "dim": 4, "M": 2, "count": 0, "entry_point": -1, "max_level": -1,
             "vectors": b"", "links0": b"", "degree0": b"", "labels": b"", "levels": b"", "upper": b"",
             "deleted": b""}
    slots, dists, found = beam_search_reference(empty, np.zeros((3, 4), np.float32), 2, 5)
    assert slots.shape == (3, 2) and np.all(slots == -1) and np.all(np.isinf(dists)) and np.all(found == 0)
    x = np.eye(4, dtype=np.float32)
    s, d, f = beam_search_reference(make_state(x, [[1], [2], [3], [0]]), x, 0, 3)
    assert s.shape == (4, 0) and np.all(f == 0)
    with pytest.raises(ValueError):
        beam_search_reference(make_state(x, [[1], [2], [3], [0]]), x, 1, 0)


def test_pending_limit_keeps_results_valid(complete, rng):
    x, links = complete
    state = make_state(x, links)
    q = rng.standard_normal((10, 6)).astype(np.float32)
    allowed = np.arange(20) % 2 == 0
    full = beam_search_reference(state, q, 4, 4, allowed=allowed)
    for limit in (1, 3, 64):
        slots, dists, found = beam_search_reference(state, q, 4, 4, allowed=allowed, pending_limit=limit)
        check_results(slots, dists, found, allowed)
    np.testing.assert_array_equal(beam_search_reference(state, q, 4, 4, allowed=allowed, pending_limit=64)[0],
                                  full[0])


# ---------------------------------------------------------------------------------------------
# against the C search on real data

def compare_with_c(index, queries, k, ef, *, filter_labels=None):
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64)
    c_labels, c_dists = index.knn_query(queries, k=k, ef=ef, filter=filter_labels, pad=True, num_threads=1)
    allowed = None if filter_labels is None else np.isin(labels, filter_labels)
    slots, dists, found = beam_search_reference(state, queries, k, ef, allowed=allowed)
    r_labels = np.where(slots >= 0, labels[np.maximum(slots, 0)], np.uint64(2**64 - 1))
    same = np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(c_labels, r_labels)])
    assert same >= 0.99, f"same top-{k} sets for only {same:.3f} of the queries"
    ok = np.isfinite(c_dists)
    np.testing.assert_array_equal(ok, np.isfinite(dists))
    np.testing.assert_allclose(dists[ok], c_dists[ok], rtol=RTOL, atol=ATOL)
    check_results(slots, dists, found, None if allowed is None else allowed & ~ReferenceGraph(state).deleted)
    return slots, found


@needs_core
@pytest.mark.parametrize("ef", [10, 40])
def test_matches_c_search_l2(sift_index, ef):
    index, _, queries = sift_index
    compare_with_c(index, queries, 10, ef)


@needs_core
def test_matches_c_search_cosine(minilm_index):
    index, _, queries = minilm_index
    compare_with_c(index, queries, 10, 30)


@needs_core
@pytest.mark.parametrize("every", [3, 50, 2000])
def test_matches_c_search_filtered(sift_index, every):
    index, base, queries = sift_index
    allowed = np.arange(0, len(base), every, dtype=np.uint64)
    _, found = compare_with_c(index, queries[:40], 10, 20, filter_labels=allowed)
    assert np.all(found == min(10, len(allowed)))   # a selective filter still finds what it allows


@needs_core
def test_matches_c_search_with_deletions(minilm_index):
    index, base, queries = minilm_index
    copy = pickle.loads(pickle.dumps(index))   # the fixture's index stays unchanged
    for label in range(0, len(base), 7):
        copy.mark_deleted(label)
    compare_with_c(copy, queries, 10, 30)


@needs_core
@pytest.mark.parametrize("width", [2, 4])
def test_wider_search_keeps_recall(sift_index, width):
    """search_width > 1 (the GPU's batched expansion) visits at least as much: recall does not drop."""
    index, base, queries = sift_index
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64)
    truth, _ = exact_knn(base, queries, 10, "l2")
    recall = {}
    for w in (1, width):
        slots, dists, found = beam_search_reference(state, queries, 10, 20, search_width=w)
        check_results(slots, dists, found)
        got = labels[slots]
        recall[w] = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got, truth)])
    assert recall[width] >= recall[1] - 0.01, recall


# ---------------------------------------------------------------------------------------------
# counters (return_counts) and a replaced level 0 (level0=), as benchmarks/graph_replay.py uses them

def test_counts_on_a_path():
    """Every step of the chain's search counted by hand (see test_chain_descent_and_beam_order)."""
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    links = [[j for j in (i - 1, i + 1) if 0 <= j < 10] for i in range(10)]
    state = make_state(x, links, M=2, upper={0: [[9]], 9: [[0]]})
    q = np.full((1, 4), 8.2, np.float32)
    for width in (1, 2):
        *_, counts = beam_search_reference(state, q, 3, 3, search_width=width, return_counts=True)
        # descent: d(0), then 0's list moves to 9, 9's list [0] does not improve: 2 lists, 3 distances
        # level 0 from 9: expand 9 (new: 8), 8 (new: 7), 7 (new: 6, too far); one parent a time either way
        assert {k: v.tolist() for k, v in counts.items()} == {
            "iterations": [3], "expanded": [3], "distances": [3], "hops": [2], "upper_distances": [3]}


@pytest.mark.parametrize("width", [1, 3, 4])
@pytest.mark.parametrize("ef", [5, 12])
def test_counts_on_a_complete_graph(complete, rng, width, ef):
    """The first expansion visits all 19 others; then every beam entry is expanded once (the
    descent's end too, also when it drops out of the beam)."""
    x, links = complete
    state = make_state(x, links, upper={0: [[3, 7, 11]]})
    q = rng.standard_normal((6, 6)).astype(np.float32)
    slots, _, found, counts = beam_search_reference(state, q, 5, ef, search_width=width, return_counts=True)
    assert set(counts) == {"iterations", "expanded", "distances", "hops", "upper_distances"}
    assert all(v.dtype == np.int64 and v.shape == (6,) for v in counts.values())
    g = ReferenceGraph(state)
    d = np.array([g.distances(r, np.arange(20)) for r in q])
    entry = np.array([0, 3, 7, 11])[np.argmin(d[:, [0, 3, 7, 11]], axis=1)]
    kept = np.array([e in top for e, top in zip(entry, exact_slots(state, q, ef))])   # the entry stays in the beam
    np.testing.assert_array_equal(counts["distances"], 19)
    np.testing.assert_array_equal(counts["expanded"], ef + ~kept)
    np.testing.assert_array_equal(counts["iterations"], 1 + -(-(ef - kept) // width))
    np.testing.assert_array_equal(counts["upper_distances"], 4)
    np.testing.assert_array_equal(counts["hops"], np.where(entry != 0, 2, 1))   # a move reads one more list
    # the counts do not change the results
    plain = beam_search_reference(state, q, 5, ef, search_width=width)
    np.testing.assert_array_equal(plain[0], slots)


def test_counts_filtered_mode_and_empty(complete, rng):
    x, links = complete
    state = make_state(x, links)
    q = rng.standard_normal((4, 6)).astype(np.float32)
    allowed = np.arange(20) % 2 == 0
    *_, counts = beam_search_reference(state, q, 3, 4, allowed=allowed, return_counts=True)
    np.testing.assert_array_equal(counts["distances"], 19)
    assert np.all(counts["iterations"] >= 1) and np.all(counts["expanded"] >= counts["iterations"])
    empty = {"space": "l2", "dim": 4, "M": 2, "count": 0, "entry_point": -1, "max_level": -1,
             "vectors": b"", "links0": b"", "degree0": b"", "labels": b"", "levels": b"", "upper": b"",
             "deleted": b""}
    *_, counts = beam_search_reference(empty, np.zeros((2, 4), np.float32), 2, 5, return_counts=True)
    assert all(v.tolist() == [0, 0] for v in counts.values())


def test_level0_replaced(complete, rng):
    """A path graph searched through a complete level-0 adjacency is exact; padding is skipped."""
    x, _ = complete
    path = [[j for j in (i - 1, i + 1) if 0 <= j < 20] for i in range(20)]
    state = make_state(x, path)
    full = np.full((20, 24), INVALID, np.uint32)
    for i in range(20):
        full[i, 2:22] = [j for j in range(20) if j != i] + [i]   # padding first, a self link last
    g = ReferenceGraph(state, level0=full)
    assert g.M0 == 24 and g.neighbors(5, 0).tolist() == [j for j in range(20) if j != 5]
    q = rng.standard_normal((10, 6)).astype(np.float32)
    slots, _, _, counts = beam_search_reference(g, q, 5, 5, return_counts=True)
    for s, e in zip(slots, exact_slots(state, q, 5)):
        np.testing.assert_array_equal(s, e)
    np.testing.assert_array_equal(counts["distances"], 19)
    with pytest.raises(ValueError, match="level0"):
        ReferenceGraph(state, level0=full.astype(np.int64))
    with pytest.raises(ValueError, match="level0"):
        ReferenceGraph(state, level0=full[:10])
