"""The search graph (HNSW level 0 with its reverse edges, ``Core.build_search_graph``, built in C by
gpuhnsw/csrc/search_graph.c) against its NumPy reference (gpuhnsw._graph_reference), on the
shared data: the same graph whatever the thread count, the structure it promises, and the
replay figures of benchmarks/results/graph_replay.json reproduced from the C-built graph.
"""
import json
import pathlib
import threading

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw import _core
from gpuhnsw._graph_reference import level0_csr, pair_distances, search_graph_reference
from gpuhnsw._reference import INVALID, ReferenceGraph, beam_search_reference
from gpuhnsw._search_graph import build as build_graph
from gpuhnsw.testing import recall_at_k

NO_LABEL = np.uint64(2**64 - 1)   # the padding label (README: "label 2**64-1")
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "graph_replay.json"


def build(base, space="l2", *, M=16, ef_construction=100, seed=3, threads=2, delete_every=None, capacity=None):
    index = gpuhnsw.Index(space, base.shape[1], device="cpu")
    index.init_index(capacity or len(base), M=M, ef_construction=ef_construction, random_seed=seed)
    index.add_items(base, np.arange(len(base)), num_threads=threads)
    if delete_every:
        for label in range(0, len(base), delete_every):
            index.mark_deleted(label)
    return index


def check_structure(graph, state, degree):
    """Every promise of the graph, checked from scratch against the state's level 0."""
    g = ReferenceGraph(state)
    n = g.n
    assert graph.dtype == np.uint32 and graph.shape == (n, degree)
    indptr, ids = level0_csr(g)
    fwd = [set(ids[indptr[x]:indptr[x + 1]].tolist()) for x in range(n)]
    rev = [set() for _ in range(n)]
    for x in range(n):
        for y in fwd[x]:
            rev[y].add(x)
    for x in range(n):
        row = graph[x]
        valid = row != INVALID
        k = int(valid.sum())
        assert valid[:k].all() and not valid[k:].any(), f"row {x}: entries not a prefix"
        got = row[:k].astype(np.int64)
        assert np.all(got < n) and x not in got and len(set(got.tolist())) == k, f"row {x}"
        if g.deleted[x]:
            assert k == 0
            continue
        assert not g.deleted[got].any()
        want = {y for y in fwd[x] | rev[x] if not g.deleted[y]}
        assert set(got.tolist()) <= want and k == min(degree, len(want)), f"row {x}"


# ---------------------------------------------------------------------------------------------
# the same graph as the reference

@pytest.fixture(scope="module")
def sift(datasets):
    base, queries, gt, _ = datasets("siftsmall")
    return build(base, delete_every=97), base


@pytest.mark.parametrize("degree", [8, 32, 64, 100])
def test_equals_reference_on_siftsmall(sift, degree):
    """siftsmall's coordinates are integers whose squared distances sum exactly in float32, so the
    C and NumPy distances are equal bits and the graphs equal entry for entry."""
    index, _ = sift
    state = index._core.export_state()
    graph = build_graph(index._core, degree, num_threads=2)
    np.testing.assert_array_equal(graph, search_graph_reference(state, degree))
    check_structure(graph, state, degree)
    for threads in (1, 3, 7):
        np.testing.assert_array_equal(build_graph(index._core, degree, num_threads=threads), graph)


def test_equals_reference_on_minilm(datasets):
    """Float data (cosine): where the SIMD sums and NumPy's round two reverse edges' distances
    differently, the two may swap; every other entry is the same."""
    base, _, _, _ = datasets("minilm-debian", n_base=6000, n_queries=1)
    index = build(base, "cosine", M=8, delete_every=31)
    state = index._core.export_state()
    graph = build_graph(index._core, 24)
    ref = search_graph_reference(state, 24)
    check_structure(graph, state, 24)
    differ = np.flatnonzero((graph != ref).any(axis=1))
    assert len(differ) <= len(graph) // 1000, f"{len(differ)} rows differ"
    g = ReferenceGraph(state)
    for x in differ:   # the same distances in the same order, to rounding
        k = int((ref[x] != INVALID).sum())
        rows = np.full(k, x, np.int64)
        np.testing.assert_allclose(pair_distances(g, rows, graph[x, :k].astype(np.int64)),
                                   pair_distances(g, rows, ref[x, :k].astype(np.int64)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_compressed_rows(datasets, storage):
    """A compressed index's reverse edges are ordered by its stored rows' distances (the engine's
    pair distances).  siftsmall's coordinates are integers <= 255, which float16 stores exactly, so
    a float16 index and its graph are the float32 index's, entry for entry (int8 stores them exactly
    too, but quantises the inserted row as a query, so its HNSW graph differs)."""
    base, _, _, _ = datasets("siftsmall", n_base=3000, n_queries=1)

    def one(storage):
        index = gpuhnsw.Index("l2", base.shape[1], device="cpu", storage=storage)
        index.init_index(len(base), M=8, ef_construction=60, random_seed=5)
        index.add_items(base, np.arange(len(base)), num_threads=1)
        return index

    index = one(storage)
    state = index._core.export_state(decoded=True)
    graph = build_graph(index._core, 24)
    check_structure(graph, state, 24)
    if storage == "float16":
        np.testing.assert_array_equal(graph, build_graph(one("float32")._core, 24))
    g = ReferenceGraph(state)
    indptr, ids = level0_csr(g)
    for x in range(0, g.n, 7):
        forward = indptr[x + 1] - indptr[x]
        reverse = graph[x, forward:][graph[x, forward:] != INVALID]
        d = np.empty(len(reverse), np.float32)
        index._core.pair_distances(np.full(len(reverse), x, np.uint32), reverse, d)
        assert np.all(np.diff(d) >= 0), f"row {x}: reverse edges out of order"


def test_every_row_of_a_small_index(make_data):
    """All degrees from 1, and an index with a slot whose list is full (hubs get reverse edges)."""
    base = make_data(600, 12, n_clusters=4)
    index = build(base, M=4, ef_construction=40, delete_every=13)
    state = index._core.export_state()
    for degree in (1, 2, 5, 8, 20, 200):
        graph = build_graph(index._core, degree)
        check_structure(graph, state, degree)
        np.testing.assert_array_equal(graph, search_graph_reference(state, degree))


def test_arguments_and_empty_index(make_data):
    index = gpuhnsw.Index("l2", 8, device="cpu")
    index.init_index(10)
    assert build_graph(index._core, 16).shape == (0, 16)
    for bad in (0, -1, _core.MAX_GRAPH_DEGREE + 1):
        with pytest.raises(ValueError, match="degree must be in"):
            build_graph(index._core, bad)
    with pytest.raises(TypeError):
        build_graph(index._core, 3.5)
    with pytest.raises(ValueError, match="num_threads"):
        build_graph(index._core, 8, num_threads=10**9)
    index.add_items(make_data(1, 8))
    np.testing.assert_array_equal(build_graph(index._core, 4), np.full((1, 4), INVALID, np.uint32))


# ---------------------------------------------------------------------------------------------
# beside other calls

def while_running(background, call):
    """``call()``'s results, called over and over while the ``background`` callables run in threads
    (until the first of them ends); the first exception a background callable raised is raised."""
    errors, results = [], []

    def wrap(fn):
        def run():
            try:
                fn()
            except Exception as exc:  # raised below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in background]
    for t in threads:
        t.start()
    while threads[0].is_alive():
        results.append(call())
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_built_beside_inserts_and_queries(make_data):
    """Inserts wait for a build (and a build for an insert): each graph is whole, of the count it saw."""
    data = make_data(3000, 16)
    index = build(data[:500], M=8, ef_construction=40, capacity=len(data))

    def insert():
        for s in range(500, 3000, 250):
            index.add_items(data[s:s + 250], np.arange(s, s + 250), num_threads=2)

    def query():
        for _ in range(20):
            index.knn_query(data[:50], k=5)

    graphs = while_running([insert, query], lambda: build_graph(index._core, 32, num_threads=2))
    assert graphs
    for graph in graphs:
        assert graph.shape[0] >= 500 and np.all((graph == INVALID) | (graph < graph.shape[0]))
    check_structure(build_graph(index._core, 32), index._core.export_state(), 32)


def test_export_over_labels(sift):
    """Index.export_search_graph: the C graph's rows of the live slots, in get_ids_list() order,
    its slots as labels, NO_LABEL after them; deleted labels have no row and are no one's neighbour."""
    index, _ = sift
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64)
    live = ~np.frombuffer(state["deleted"], np.uint8).astype(bool)
    slots = build_graph(index._core, 32)
    ids, graph = index.export_search_graph(32, return_ids=True)
    assert graph.dtype == np.uint64 and graph.shape == (int(live.sum()), 32)
    all_ids = np.array(index.get_ids_list(), dtype=np.uint64)
    np.testing.assert_array_equal(ids, all_ids[live])
    want = np.where(slots[live] == INVALID, NO_LABEL, labels[np.minimum(slots[live], len(labels) - 1)])
    np.testing.assert_array_equal(graph, want)
    np.testing.assert_array_equal(index.export_search_graph(32, num_threads=1), graph)
    named = graph[graph != NO_LABEL]
    assert np.isin(named, ids).all() and not np.isin(named, all_ids[~live]).any()
    assert index.export_search_graph().shape == (int(live.sum()), 64)          # the default degree


def test_export_errors_and_empty(make_data):
    with pytest.raises(RuntimeError, match="not initialized"):
        gpuhnsw.Index("l2", 4).export_search_graph()
    index = gpuhnsw.Index("l2", 4, device="cpu")
    index.init_index(10)
    assert index.export_search_graph(8).shape == (0, 8)
    with pytest.raises(ValueError, match="degree"):
        index.export_search_graph(0)
    with pytest.raises(TypeError):
        index.export_search_graph(8.5)


def test_export_is_one_snapshot_beside_deletes_and_inserts(make_data):
    """Rows and labels come from one snapshot: with deletes and inserts running beside it, every
    exported neighbour is one of the exported (live) labels."""
    data = make_data(3000, 16)
    index = build(data[:1500], M=8, ef_construction=40, capacity=len(data))

    def write():
        for s in range(1500, 3000, 100):
            index.add_items(data[s:s + 100], np.arange(s, s + 100), num_threads=1)
            for label in range(s - 1500, s - 1400, 3):
                index.mark_deleted(label)

    exports = while_running([write], lambda: index.export_search_graph(16, num_threads=2, return_ids=True))
    assert len(exports) > 1
    for ids, graph in exports:
        named = graph[graph != NO_LABEL]
        assert len(ids) == len(graph) and np.isin(named, ids).all()


def test_refused_inside_a_filter_callback(make_data):
    """A build waits for no writer, so from a filter callback of a query on the same index (which
    holds the index for reading) it raises instead of waiting."""
    data = make_data(200, 8)
    index = build(data, M=4, ef_construction=20)
    seen = []

    def callback(label):
        if not seen:
            with pytest.raises(RuntimeError, match="filter callback"):
                build_graph(index._core, 8)
            seen.append(label)
        return True

    index.knn_query(data[:1], k=3, filter=callback)
    assert seen


# ---------------------------------------------------------------------------------------------
# the replay's figures, from the C-built graph

def test_replay_figures_reproduced(datasets):
    """benchmarks/graph_replay.py's siftsmall figures (its HNSW built on one thread, bit for bit
    reproducible on integer data), replayed over the C-built graph: recall and the mean counts are
    the committed ones exactly, at every width and target."""
    results = json.loads(RESULTS.read_text())
    p, d = results["params"], results["datasets"]["siftsmall"]
    assert d["build_threads"] == 1
    base, queries, gt, _ = datasets("siftsmall", n_queries=d["nq"])
    index = build(base, M=p["M"], ef_construction=p["ef_construction"], seed=p["seed"], threads=1)
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64).astype(np.int64)
    checked = 0
    for name in ("hnsw", "hnsw+rev 64"):
        entry = d["graphs"][name]
        graph = None if name == "hnsw" else build_graph(index._core, entry["degree"])
        g = ReferenceGraph(state, level0=graph)
        for width, row in entry["widths"].items():
            for target, at in row["targets"].items():
                if at["ef"] is None:
                    continue
                slots, _, _, counts = beam_search_reference(g, queries, p["k"], at["ef"], search_width=int(width),
                                                            return_counts=True)
                found = np.where(slots >= 0, labels[np.maximum(slots, 0)], -1)
                assert recall_at_k(found, gt, p["k"]) == at["recall"], (name, width, target)
                assert counts["iterations"].mean() == pytest.approx(at["iterations"]["mean"], abs=1e-9)
                assert (counts["distances"] + counts["upper_distances"]).mean() == pytest.approx(
                    at["distances"]["mean"], abs=1e-9)
                checked += 1
    assert checked >= 4
