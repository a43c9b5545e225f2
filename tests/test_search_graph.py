"""The search graph (HNSW level 0 with its reverse edges, ``Core.build_search_graph``, built in C by
gpuhnsw/csrc/search_graph.c) against its NumPy reference (gpuhnsw._graph_reference), on the
shared data: the same graph whatever the thread count, the structure it promises, and the
replay figures of benchmarks/results/graph_replay.json reproduced from the C-built graph.
"""
import io
import json
import pathlib
import pickle
import struct
import tempfile
import zlib

import numpy as np
import pytest
from conftest import run_threads

import gpuhnsw
from gpuhnsw import _core
from gpuhnsw._graph_reference import level0_csr, pair_distances, search_graph_reference
from gpuhnsw._reference import INVALID, ReferenceGraph, beam_search_reference
from gpuhnsw._reference_fixed import fixed_search_reference
from gpuhnsw._search_graph import SearchGraph, build as build_graph
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

    graphs = run_threads(insert, query, meanwhile=lambda: build_graph(index._core, 32, num_threads=2))
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

    exports = run_threads(write, meanwhile=lambda: index.export_search_graph(16, num_threads=2, return_ids=True))
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


# ---------------------------------------------------------------------------------------------
# kept in step: updates (Core.update_search_graph through SearchGraph.refresh)

def refresh(graph, core):
    """``graph.refresh`` with the core's dirty-row log drained now (as a GPU mirror's sync does)."""
    raw, drain = core.drain_dirty()
    return graph.refresh(core, np.frombuffer(raw, np.uint64), core.count, drain)


def check_updated(graph, core):
    """What an updated graph promises (search_graph.c): rows whose valid entries are a prefix of
    distinct slots below the count, never their own; each forward part a subsequence of the slot's
    current level-0 list; and the reverse edges: where y's row has room, the slots whose forward
    part names y are in it, all but a few (a push refused while y's row was full stays refused after
    the row shrinks, until the next build)."""
    state = core.export_state()
    g = ReferenceGraph(state)
    n = g.n
    assert graph.count == n
    rows, forward = graph.rows[:n], graph.forward[:n]
    indptr, ids = level0_csr(g)
    valid = rows != INVALID
    k = valid.sum(axis=1)
    assert (valid[:, 1:] <= valid[:, :-1]).all() and (forward <= k).all()
    edges = held = 0
    for x in range(n):
        got = rows[x, :k[x]].astype(np.int64)
        assert np.all(got < n) and x not in got and len(set(got.tolist())) == k[x], f"row {x}"
        fwd = got[:forward[x]]
        assert np.isin(fwd, ids[indptr[x]:indptr[x + 1]]).all(), f"row {x}: forward part not its list"
        for y in fwd if not g.deleted[x] else ():
            if not g.deleted[y] and k[y] < graph.degree:
                edges += 1
                held += x in rows[y, :k[y]]
    assert held >= 0.99 * edges, f"{edges - held} of {edges} reverse edges missing"


def grow(index, data, start, stop, step, graph, threads=2):
    """Add rows start..stop in batches of step, refreshing ``graph`` after each: the rows written."""
    core = index._core
    written = []
    for s in range(start, stop, step):
        index.add_items(data[s:s + step], np.arange(s, min(s + step, stop)), num_threads=threads)
        written.append(refresh(graph, core))
    return written


def test_update_after_growth_matches_a_fresh_build(datasets):
    """siftsmall grown from half to full in 1 % batches, the graph updated after each: every
    forward part equals a fresh build's, the structure holds, and the GPU kernel's search (its NumPy
    reference) over the updated graph reaches the fresh graph's recall within 0.005 at each ef."""
    base, queries, gt, _ = datasets("siftsmall")
    n, half = len(base), len(base) // 2
    index = build(base[:half], M=16, ef_construction=100, capacity=n)
    graph = SearchGraph(64)
    assert refresh(graph, index._core) is None and graph.builds == 1
    written = grow(index, base, half, n, n // 100, graph)
    assert all(w is not None and 0 < len(w) < 0.25 * n for w in written) and graph.builds == 1
    check_updated(graph, index._core)
    fresh = build_graph(index._core, 64)
    for x in range(n):
        f = graph.forward[x]
        np.testing.assert_array_equal(graph.rows[x, :f], fresh[x, :f])
    state = index._core.export_state()
    for ef in (10, 16, 32):
        got = [recall_at_k(fixed_search_reference(state, queries, 10, ef, graph=g)[0], gt, 10)
               for g in (graph.rows[:n], fresh)]
        assert got[0] >= got[1] - 0.005, (ef, got)


def test_update_beside_deletes_replacements_and_updates(make_data):
    """Deletes, replace_deleted inserts and vector updates between refreshes: the graph stays
    whole (check_updated) and never names a slot past the count."""
    data = make_data(1600, 16, n_clusters=8)
    index = gpuhnsw.Index("l2", 16, device="cpu")
    index.init_index(1000, M=8, ef_construction=40, random_seed=5, allow_replace_deleted=True)
    index.add_items(data[:700], np.arange(700), num_threads=2)
    graph = SearchGraph(24)
    refresh(graph, index._core)
    rng = np.random.default_rng(0)
    for step in range(12):
        live = np.array([x for x in index.get_ids_list() if x in index], dtype=np.int64)
        if step % 3 == 0:
            index.mark_deleted(rng.choice(live, 20, replace=False))
        new = np.arange(1000 + 20 * step, 1020 + 20 * step)
        index.add_items(data[700 + 20 * step:720 + 20 * step], new, replace_deleted=True, num_threads=2)
        live = np.array([x for x in rng.choice(live, 15, replace=False) if x in index])
        index.add_items(data[1200 + 20 * step:1200 + 20 * step + live.size], live, num_threads=2)   # updates
        out = refresh(graph, index._core)
        check_updated(graph, index._core)
        assert out is None or np.all(out < index._core.count)


def test_update_is_the_same_for_any_thread_count(datasets):
    """The same changed slots from the same graph give the same rows and the same written list on
    1, 2, 3 and 7 threads (each phase's choices depend on the data only)."""
    base, _, _, _ = datasets("siftsmall")
    index = build(base[:6000], M=8, ef_construction=60, capacity=7000)
    graph = SearchGraph(32)
    refresh(graph, index._core)
    index.add_items(base[6000:6300], np.arange(6000, 6300), num_threads=2)
    todo, renew = graph.changes(np.frombuffer(index._core.drain_dirty()[0], np.uint64), 6300)
    graph.reserve(6300)
    results = []
    for threads in (1, 2, 3, 7):
        rows, forward = graph.rows[:6300].copy(), graph.forward[:6300].copy()
        written = np.frombuffer(index._core.update_search_graph(rows, forward, todo, renew, threads), np.uint32)
        results.append((rows, forward, written))
    for rows, forward, written in results[1:]:
        for a, b in zip((rows, forward, written), results[0]):
            np.testing.assert_array_equal(a, b)
    assert np.isin(todo, results[0][2]).all()   # every changed row is written


def test_update_arguments(make_data):
    data = make_data(300, 8)
    index = build(data, M=4, ef_construction=20)
    core = index._core
    graph = SearchGraph(8)
    graph.rebuild(core)
    rows, forward = graph.rows[:300], graph.forward[:300]
    NONE = np.zeros(0, np.uint32)
    for bad in ([5, 3], [300], [2, 2]):
        with pytest.raises(ValueError, match="slots must ascend"):
            core.update_search_graph(rows, forward, np.array(bad, np.uint32), bytes(len(bad)), 2)
    for r, f in ((7, 2), (8, 0)):
        with pytest.raises(ValueError, match="rows must be"):
            core.update_search_graph(np.zeros(r, np.uint32), np.zeros(f, np.uint32), NONE, b"", 2)
    with pytest.raises(ValueError, match="degree must be"):
        core.update_search_graph(np.zeros((300, 2000), np.uint32), forward, NONE, b"", 2)
    with pytest.raises(TypeError):
        core.update_search_graph(rows.tobytes(), forward, NONE, b"", 2)   # read-only rows
    before = graph.rows.copy()
    with pytest.raises(ValueError, match="renew"):
        core.update_search_graph(rows, forward, np.arange(3, dtype=np.uint32), b"\0", 2)
    assert len(core.update_search_graph(rows, forward, NONE, b"", 2)) == 0
    np.testing.assert_array_equal(graph.rows, before)
    # an update with every row changed but nothing new rewrites each row as it was
    written = np.frombuffer(core.update_search_graph(rows, forward, np.arange(300, dtype=np.uint32), bytes(300), 2),
                            np.uint32)
    np.testing.assert_array_equal(written, np.arange(300))
    np.testing.assert_array_equal(graph.rows, before)


def test_refresh_rebuilds_past_the_threshold(make_data):
    """A refresh that would rewrite more than REBUILD_FRACTION of the rows builds afresh (None),
    as does one after a drain it did not take in; the result equals a fresh build then."""
    data = make_data(2000, 16)
    index = build(data[:1000], M=8, ef_construction=40, capacity=2000)
    graph = SearchGraph(32)
    refresh(graph, index._core)
    assert grow(index, data, 1000, 1600, 600, graph) == [None] and graph.builds == 2
    np.testing.assert_array_equal(graph.rows[:1600], build_graph(index._core, 32))
    index._core.drain_dirty()          # another consumer of the log: the graph missed a drain
    assert refresh(graph, index._core) is None and graph.builds == 3


# ---------------------------------------------------------------------------------------------
# Index(search_graph=...) and the saved graph

def test_search_graph_argument(make_data):
    assert gpuhnsw.Index("l2", 4).search_graph == "hnsw"
    assert gpuhnsw.Index("l2", 4, search_graph="optimized").search_graph == "optimized"
    with pytest.raises(ValueError, match="search_graph must be one of 'hnsw', 'optimized'"):
        gpuhnsw.Index("l2", 4, search_graph="cagra")
    index = gpuhnsw.Index("l2", 4, device="cpu", search_graph="optimized")
    index.init_index(20)
    index.add_items(make_data(20, 4))
    copy = pickle.loads(pickle.dumps(index))            # the mode travels with a pickle
    assert copy.search_graph == "optimized" and copy._graph is not None and len(copy) == 20
    state = index.__getstate__()[0]
    with pytest.raises(gpuhnsw.IndexFileError, match="search_graph must be one of"):
        gpuhnsw.Index({**state, "search_graph": "cagra"})


def saved(index, **kwargs):
    buf = io.BytesIO()
    index.save_index(buf, **kwargs)
    return buf.getvalue()


def test_saved_and_loaded_with_the_index(sift):
    """A CPU index with search_graph="optimized" saves a fresh graph (version 4, section SGRF); an
    optimized index loads it as it was; a "hnsw" index loads the same file without it; files of
    either mode load in the other."""
    plain, base = sift
    index = gpuhnsw.Index(plain, device="cpu")          # a copy; mode "hnsw"
    optimized = gpuhnsw.Index("l2", 128, device="cpu", search_graph="optimized")
    optimized.load_index(io.BytesIO(saved(index)))
    assert optimized._graph is not None and optimized._graph.count == 0      # built when needed
    data = saved(optimized)
    assert struct.unpack_from("<I", data, 8)[0] == 4 and b"SGRF" in data
    assert saved(index)[8] == 2 and b"SGRF" not in saved(index)
    again = gpuhnsw.Index("l2", 128, device="cpu", search_graph="optimized")
    again.load_index(io.BytesIO(data))
    fresh = build_graph(optimized._core, 64)
    np.testing.assert_array_equal(again._graph.rows[:again._graph.count], fresh)
    raw, fwd = optimized._core.build_search_graph(64, 2, False, True)
    np.testing.assert_array_equal(again._graph.forward[:again._graph.count], np.frombuffer(fwd, np.uint32))
    hnsw = gpuhnsw.Index("l2", 128, device="cpu")
    hnsw.load_index(io.BytesIO(data))
    assert hnsw._graph is None
    np.testing.assert_array_equal(hnsw.knn_query(base[:20], k=5)[0], index.knn_query(base[:20], k=5)[0])
    with tempfile.TemporaryDirectory() as tmp:          # and mapped
        path = f"{tmp}/a.idx"
        optimized.save_index(path)
        mapped = gpuhnsw.Index("l2", 128, device="cpu", search_graph="optimized")
        mapped.load_index(path, mmap=True)
        np.testing.assert_array_equal(mapped._graph.rows[:mapped._graph.count], fresh)


def _sgrf(data):
    """(offset of the SGRF data, its length) in a saved file."""
    at = data.index(b"SGRF")
    _, length, _, pad = struct.unpack_from("<4sQII", data, at)
    return at + struct.calcsize("<4sQII") + pad, length


def _with_sgrf(data, edit):
    """``data`` with its SGRF bytes changed by ``edit(bytearray) -> bytearray`` and the CRC fixed."""
    start, length = _sgrf(data)
    new = edit(bytearray(data[start:start + length]))
    at = data.index(b"SGRF")
    head = struct.pack("<4sQII", b"SGRF", len(new), zlib.crc32(new), struct.unpack_from("<4sQII", data, at)[3])
    return data[:at] + head + data[at + len(head):start] + bytes(new) + data[start + length:]


@pytest.mark.parametrize("case", ["self", "past count", "gap", "forward", "degree", "length", "crc"])
def test_a_bad_saved_graph_is_refused(make_data, case):
    data = make_data(200, 8)
    index = gpuhnsw.Index("l2", 8, device="cpu", search_graph="optimized")
    index.init_index(200, M=4, ef_construction=20)
    index.add_items(data)
    good = saved(index)
    n, degree = 200, 64
    rows_at = 8 + 4 * n

    def row_entry(x, j, value):
        def edit(b):
            struct.pack_into("<I", b, rows_at + 4 * (x * degree + j), value)
            return b
        return edit

    edits = {"self": row_entry(3, 0, 3), "past count": row_entry(3, 0, 200), "gap": row_entry(3, 60, 7),
             "forward": lambda b: b[:8] + struct.pack("<I", 65) + b[12:],
             "degree": lambda b: struct.pack("<II", 2000, 0) + b[8:], "length": lambda b: b[:-4]}
    if case == "crc":
        start, _ = _sgrf(good)
        bad = good[:start] + bytes([good[start] ^ 1]) + good[start + 1:]
    else:
        bad = _with_sgrf(good, edits[case])
    fresh = gpuhnsw.Index("l2", 8, device="cpu", search_graph="optimized")
    with pytest.raises(gpuhnsw.IndexFileError, match="SGRF"):
        fresh.load_index(io.BytesIO(bad))
    assert fresh._core is None


def test_refreshed_beside_inserts_deletes_and_queries(make_data):
    """Refreshes (the C update waits for no writer, as a build) beside inserts, deletes and queries:
    each leaves the graph whole; after the writers stop, one more refresh brings it in step."""
    data = make_data(4000, 16)
    index = build(data[:1000], M=8, ef_construction=40, capacity=len(data))
    graph = SearchGraph(32)
    refresh(graph, index._core)

    def write():
        for s in range(1000, 4000, 100):
            index.add_items(data[s:s + 100], np.arange(s, s + 100), num_threads=2)
            index.mark_deleted(list(range(s - 1000, s - 990)))

    def query():
        for _ in range(30):
            index.knn_query(data[:20], k=5)

    run_threads(write, query, meanwhile=lambda: refresh(graph, index._core))
    refresh(graph, index._core)
    check_updated(graph, index._core)
    forward = graph.forward[:graph.count]
    fresh_raw, fresh_fwd = index._core.build_search_graph(32, 2, False, True)
    live = ~np.frombuffer(index._core.export_state()["deleted"], np.uint8).astype(bool)
    # rows that no deletion touched since their last update hold a build's forward part
    assert (forward[live] >= np.frombuffer(fresh_fwd, np.uint32)[live]).mean() > 0.9
