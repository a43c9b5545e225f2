"""Label filters of ``knn_query`` on real data: the switch between graph search and exact search over
the allowed rows, per-query filters and boolean masks against a NumPy oracle, and the errors that
name the real cause when fewer than k elements can be returned.

The chosen path is read from the DEBUG log of the ``"gpuhnsw"`` logger, never from timings.
"""
import logging

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw.testing import exact_knn, recall_at_k

K = 10
PAD_LABEL = np.uint64(2**64 - 1)


@pytest.fixture(scope="module")
def minilm(datasets):
    """(index, base, queries): 20k minilm-debian rows, cosine, ef=64. Tests must not change it."""
    base, queries, _, _ = datasets("minilm-debian", 20_000, 40)
    index = gpuhnsw.Index("cosine", base.shape[1], device="cpu")
    index.init_index(len(base), M=16, ef_construction=100, random_seed=1)
    index.add_items(base)
    index.set_ef(64)
    return index, base, queries


def oracle(base, queries, allowed, k, space="cosine"):
    """Exact k nearest among ``allowed`` (uint64 [m]) for every query: labels uint64 [nq, k], dists."""
    ids, dists = exact_knn(base[allowed.astype(np.int64)], queries, k, space)
    return allowed[ids], dists


def plans(caplog):
    """The (exact rows, query rows) pairs logged by the filtered searches so far."""
    out = []
    for rec in caplog.records:
        if rec.name == "gpuhnsw" and rec.getMessage().startswith("filtered knn_query"):
            words = rec.getMessage().split()
            out.append((int(words[2]), int(words[4])))
    return out


def test_selective_filter_is_answered_exactly(minilm, caplog):
    index, base, queries = minilm
    allowed = np.sort(np.random.default_rng(3).choice(len(base), 200, replace=False)).astype(np.uint64)
    with caplog.at_level(logging.DEBUG, logger="gpuhnsw"):
        labels, dists = index.knn_query(queries, k=K, filter=allowed)
    assert plans(caplog) == [(len(queries), len(queries))]
    want_labels, want_dists = oracle(base, queries, allowed, K)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(dists, want_dists, rtol=1e-5, atol=1e-6)


def test_broad_filter_takes_the_graph(minilm, caplog):
    index, base, queries = minilm
    allowed = np.arange(0, len(base), 2, dtype=np.uint64)
    with caplog.at_level(logging.DEBUG, logger="gpuhnsw"):
        labels, _ = index.knn_query(queries, k=K, filter=allowed)
    assert plans(caplog) == [(0, len(queries))]
    assert np.all(labels % 2 == 0)
    assert recall_at_k(labels, oracle(base, queries, allowed, K)[0], K) >= 0.95


@pytest.mark.parametrize("mode", ["graph", "exact"])
def test_forced_mode_and_mask_agree_with_labels(minilm, caplog, mode):
    index, base, queries = minilm
    mask = np.zeros(len(base), dtype=bool)
    mask[::7] = True
    allowed = np.flatnonzero(mask).astype(np.uint64)
    with caplog.at_level(logging.DEBUG, logger="gpuhnsw"):
        by_labels = index.knn_query(queries, k=K, filter=allowed, filter_mode=mode)
        by_mask = index.knn_query(queries, k=K, filter=mask, filter_mode=mode)
        by_set = index.knn_query(queries, k=K, filter=set(allowed.tolist()), filter_mode=mode)
    exact_rows = len(queries) if mode == "exact" else 0
    assert plans(caplog)[0][0] >= exact_rows  # graph rows may be redone exactly, never the reverse
    for other in (by_mask, by_set):
        np.testing.assert_array_equal(by_labels[0], other[0])
        np.testing.assert_array_equal(by_labels[1], other[1])
    want = oracle(base, queries, allowed, K)[0]
    assert recall_at_k(by_labels[0], want, K) >= (1.0 if mode == "exact" else 0.95)


def per_query_sets(n, nq, rng):
    """nq allowed-label arrays of very different sizes (0.5% .. 60% of n)."""
    sizes = np.geomspace(0.005 * n, 0.6 * n, nq).astype(int)
    return [np.sort(rng.choice(n, size, replace=False)).astype(np.uint64) for size in sizes]


def per_query_filter(sets, n, form):
    """The per-query filter of ``sets`` as given: "list" (the arrays) or "mask" (bool [nq, n])."""
    if form == "list":
        return sets
    mask = np.zeros((len(sets), n), dtype=bool)
    for row, allowed in enumerate(sets):
        mask[row, allowed.astype(np.int64)] = True
    return mask


@pytest.mark.parametrize("mode", ["auto", "graph", "exact"])
@pytest.mark.parametrize("form", ["list", "mask"])
def test_per_query_filters_against_oracle(minilm, mode, form):
    index, base, queries = minilm
    sets = per_query_sets(len(base), len(queries), np.random.default_rng(11))
    flt = per_query_filter(sets, len(base), form)
    labels, dists = index.knn_query(queries, k=K, filter=flt, filter_mode=mode)
    hits = 0
    for row, allowed in enumerate(sets):
        assert np.all(np.isin(labels[row], allowed)), f"row {row} returned a label its filter excludes"
        want_labels, want_dists = oracle(base, queries[row:row + 1], allowed, K)
        hits += len(np.intersect1d(labels[row], want_labels[0]))
        if mode == "exact":
            np.testing.assert_array_equal(labels[row], want_labels[0])
            np.testing.assert_allclose(dists[row], want_dists[0], rtol=1e-5, atol=1e-6)
    assert hits / (K * len(queries)) >= 0.95


def test_per_query_graph_equals_one_query_at_a_time(minilm):
    """The C search's per-row bitsets (stride) give what one shared filter per call gives."""
    index, base, queries = minilm
    sets = per_query_sets(len(base), 8, np.random.default_rng(5))
    together = index.knn_query(queries[:8], k=K, filter=sets, filter_mode="graph", num_threads=2)
    for row, allowed in enumerate(sets):
        alone = index.knn_query(queries[row], k=K, filter=allowed, filter_mode="graph")
        np.testing.assert_array_equal(together[0][row], alone[0][0])
        np.testing.assert_array_equal(together[1][row], alone[1][0])


def test_integer_2d_filter_is_per_query(minilm):
    index, base, queries = minilm
    rows = np.stack([np.arange(r, r + 50) for r in range(3)]).astype(np.int64)  # [3, 50]
    labels, _ = index.knn_query(queries[:3], k=5, filter=rows, filter_mode="exact")
    for r in range(3):
        np.testing.assert_array_equal(labels[r], oracle(base, queries[r:r + 1], rows[r].astype(np.uint64), 5)[0][0])


def test_deleted_elements_never_returned_by_either_path(make_data):
    data = make_data(2000, 24)
    index = gpuhnsw.Index("l2", 24, device="cpu")
    index.init_index(2000, M=8, ef_construction=60)
    index.add_items(data)
    allowed = np.arange(0, 300, dtype=np.uint64)
    index.mark_deleted(allowed[:100])
    for mode in ("graph", "exact", "auto"):
        labels, dists = index.knn_query(data[:20], k=K, filter=allowed, filter_mode=mode)
        assert np.all(labels >= 100) and np.all(labels < 300)
    want = oracle(data, data[:20], allowed[100:], K, "l2")
    np.testing.assert_array_equal(index.knn_query(data[:20], k=K, filter=allowed, filter_mode="exact")[0], want[0])


def test_fewer_allowed_than_k_names_the_numbers(minilm):
    index, _, queries = minilm
    with pytest.raises(RuntimeError, match=r"contiguous 2D array: k=10 but the filter allows only 3 live"):
        index.knn_query(queries, k=K, filter=[3, 5, 8])
    sets = [np.arange(20, dtype=np.uint64)] * len(queries)
    sets[7] = np.array([1, 2], dtype=np.uint64)
    with pytest.raises(RuntimeError, match=r"filter of query row 7 allows only 2 live"):
        index.knn_query(queries, k=K, filter=sets)
    labels, dists = index.knn_query(queries[:2], k=K, filter=[3, 5, 8], pad=True)
    assert np.all(labels[:, 3:] == PAD_LABEL) and np.all(np.isinf(dists[:, 3:]))
    assert set(labels[0, :3].tolist()) == {3, 5, 8}


@pytest.mark.parametrize("form", ["list", "mask"])
def test_per_query_bitsets_are_built_in_bounded_chunks(minilm, monkeypatch, form):
    """Per-query bitsets (nq x capacity/8 bytes) are parsed and searched a few rows at a time when
    they would exceed the bound; the results and the error's row number are those of one call."""
    from gpuhnsw.search import filters

    index, base, queries = minilm
    sets = per_query_sets(len(base), len(queries), np.random.default_rng(11))
    flt = per_query_filter(sets, len(base), form)
    want = index.knn_query(queries, k=K, filter=flt)
    built, real = [], filters.allowed_sets

    def recording(core, filter, nq):
        out = real(core, filter, nq)
        built.append(out.bits.nbytes)
        return out

    words = (index.max_elements + 31) // 32
    monkeypatch.setattr(filters, "BITSET_CHUNK_BYTES", 3 * 4 * words)   # 3 query rows per chunk
    monkeypatch.setattr(filters, "allowed_sets", recording)
    got = index.knn_query(queries, k=K, filter=flt)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert len(built) == -(-len(queries) // 3) and max(built) <= 3 * 4 * words
    sets[7] = np.array([1, 2], dtype=np.uint64)
    with pytest.raises(RuntimeError, match=r"filter of query row 7 allows only 2 live"):
        index.knn_query(queries, k=K, filter=sets)
    before = len(built)
    one = index.knn_query(queries, k=K, filter=np.arange(20, dtype=np.uint64))  # shared filter: one part
    assert len(built) == before + 1 and one[0].shape == (len(queries), K)


def test_bad_filters_rejected(minilm):
    index, _, queries = minilm
    with pytest.raises(ValueError, match="one entry per query row: got 2 for 40"):
        index.knn_query(queries, k=K, filter=[np.arange(20), np.arange(20)])
    with pytest.raises(ValueError, match="filter_mode"):
        index.knn_query(queries, k=K, filter=np.arange(20), filter_mode="fast")
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        index.knn_query(queries, k=K, filter=np.zeros((2, 2, 2), dtype=bool))


def test_k_beyond_the_live_count_names_the_numbers(make_data):
    data = make_data(300, 16)
    index = gpuhnsw.Index("l2", 16, device="cpu")
    index.init_index(400, M=8)
    with pytest.raises(RuntimeError, match="contiguous 2D array: k=1 but the index is empty"):
        index.knn_query(data[:2], k=1)
    index.add_items(data)
    index.mark_deleted(np.arange(10))
    with pytest.raises(RuntimeError, match="k=300 but the index holds only 290 live elements"):
        index.knn_query(data[:2], k=300)
    assert index.knn_query(data[:2], k=300, pad=True)[0][:, 290:].tolist() == [[int(PAD_LABEL)] * 10] * 2


@pytest.mark.gpu
def test_gpu_index_filters(minilm):
    """On a GPU: exact search over a selective filter runs in the exact engine on the device, graph
    search under shared and per-query filters in the kernel; all agree with the oracle."""
    import cupy as cp

    index, base, queries = minilm
    gpu = gpuhnsw.Index(index.__getstate__()[0], device="cuda")
    few = np.sort(np.random.default_rng(3).choice(len(base), 200, replace=False)).astype(np.uint64)
    labels, dists = gpu.knn_query(cp.asarray(queries), k=K, filter=few)
    assert isinstance(labels, cp.ndarray)
    want_labels, want_dists = oracle(base, queries, few, K)
    np.testing.assert_array_equal(cp.asnumpy(labels), want_labels)
    np.testing.assert_allclose(cp.asnumpy(dists), want_dists, rtol=1e-4, atol=1e-5)
    sets = per_query_sets(len(base), len(queries), np.random.default_rng(11))
    for flt in (np.arange(0, len(base), 2, dtype=np.uint64), sets):
        got, _ = gpu.knn_query(queries, k=K, filter=flt, filter_mode="graph")
        rows = flt if isinstance(flt, list) else [flt] * len(queries)
        hits = sum(len(np.intersect1d(got[r], oracle(base, queries[r:r + 1], a, K)[0][0])) for r, a in enumerate(rows))
        assert hits / (K * len(queries)) >= 0.95
