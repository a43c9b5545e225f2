"""Recall@10 against exact search on the shipped real datasets, next to hnswlib 0.8.0.

Also the query-time extras that change what a search returns: filters (callable or array of
labels), ``pad=True`` and a per-call ``ef``.
"""
import numpy as np
import pytest

import gpuhnsw
from gpuhnsw.testing import exact_knn, recall_at_k

K = 10
M = 16
PAD_LABEL = np.uint64(2**64 - 1)

# id: (dataset, n_base, n_queries, space, ef_construction, minimum recall@10 at ef=100)
# Floors sit a little below hnswlib 0.8.0 at the same settings (seeds 1..3):
# sift 0.998, mnist-10k 1.000, minilm-20k 0.988.
CASES = {
    "sift-l2": ("siftsmall", None, None, "l2", 200, 0.98),
    "sift-ip": ("siftsmall", None, None, "ip", 200, 0.97),
    "sift-cosine": ("siftsmall", None, None, "cosine", 200, 0.97),
    "mnist10k-l2": ("mnist", 10_000, 200, "l2", 200, 0.98),
    "minilm20k-cosine": ("minilm-debian", 20_000, 500, "cosine", 100, 0.96),
    "minilm20k-ip": ("minilm-debian", 20_000, 500, "ip", 100, 0.96),
}


class Builds:
    """Datasets, ground truth and built indexes, each made once per module."""

    def __init__(self, datasets):
        self.datasets = datasets
        self.cache = {}

    def _once(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def data(self, case):
        """(base float32 [n, d], queries float32 [nq, d], truth int [nq, >= K]) of a case."""
        def make():
            name, n_base, n_queries, space, _, _ = CASES[case]
            base, queries, gt_l2, gt_cosine = self.datasets(name, n_base, n_queries)
            shipped = {"l2": gt_l2, "cosine": gt_cosine}.get(space)
            truth = shipped if shipped is not None else exact_knn(base, queries, K, space)[0]
            return base, queries, truth

        return self._once(("data", case), make)

    def index(self, lib, case):
        """The case's base set in an index of ``lib`` (gpuhnsw or hnswlib), random_seed=1."""
        def make():
            base, _, _ = self.data(case)
            _, _, _, space, ef_construction, _ = CASES[case]
            index = lib.Index(space, base.shape[1])
            index.init_index(len(base), M=M, ef_construction=ef_construction, random_seed=1)
            index.add_items(base)
            return index

        return self._once((lib.__name__, case), make)


@pytest.fixture(scope="module")
def builds(datasets):
    return Builds(datasets)


def recall(index, queries, truth, ef, **query):
    index.set_ef(ef)
    return recall_at_k(index.knn_query(queries, k=K, **query)[0], truth, K)


@pytest.mark.parametrize("case", CASES)
def test_recall_floor(builds, case):
    base, queries, truth = builds.data(case)
    index = builds.index(gpuhnsw, case)
    assert index.element_count == len(base)
    # on these sets every node is reachable from the entry point (also true of hnswlib's graphs;
    # on dense synthetic clusters both strand ~0.1 %, hence the opt-in check)
    report = index.check_integrity(require_reachable=True)
    assert report["n_live"] == len(base) and report["n_deleted"] == 0
    r10, r100 = recall(index, queries, truth, 10), recall(index, queries, truth, 100)
    assert r100 >= CASES[case][-1], f"recall@10 at ef=100: {r100:.4f}"
    assert r100 >= r10 - 0.002, (r10, r100)


@pytest.mark.parametrize("case", CASES)
def test_recall_not_below_hnswlib(builds, hnswlib, case):
    _, queries, truth = builds.data(case)
    ours, theirs = builds.index(gpuhnsw, case), builds.index(hnswlib, case)
    for ef in (50, 100):
        r_ours, r_theirs = recall(ours, queries, truth, ef), recall(theirs, queries, truth, ef)
        assert r_ours >= r_theirs - 0.01, f"ef={ef}: gpuhnsw {r_ours:.4f} vs hnswlib {r_theirs:.4f}"


# --------------------------------------------------------------------------- filters

@pytest.fixture(scope="module")
def sift(builds):
    """(gpuhnsw index, base, queries) of siftsmall, l2. Tests must not change the index."""
    base, queries, _ = builds.data("sift-l2")
    return builds.index(gpuhnsw, "sift-l2"), base, queries


def allowed_labels(n, every):
    return np.flatnonzero(np.arange(n) % every == 0).astype(np.uint64)


@pytest.mark.parametrize("every", [3, 20])
def test_filter_callable_and_array_agree(sift, every):
    index, base, queries = sift
    allowed = allowed_labels(len(base), every)
    q = queries[:20]
    index.set_ef(100)
    by_callable = index.knn_query(q, k=K, filter=lambda label: label % every == 0)
    graph = {"filter_mode": "graph"}  # the callable always takes the graph path
    by_array = index.knn_query(q, k=K, filter=allowed, **graph)
    by_list = index.knn_query(q, k=K, filter=allowed.tolist(), **graph)
    by_int64 = index.knn_query(q, k=K, filter=allowed.astype(np.int64), **graph)
    by_mask = index.knn_query(q, k=K, filter=np.arange(len(base)) % every == 0, **graph)
    for other in (by_array, by_list, by_int64, by_mask):
        np.testing.assert_array_equal(by_callable[0], other[0])
        np.testing.assert_array_equal(by_callable[1], other[1])
    assert np.all(by_callable[0] % every == 0)


@pytest.mark.parametrize("every, floor", [(3, 0.97), (20, 0.95), (100, 0.9)])
def test_filtered_recall(sift, every, floor):
    index, base, queries = sift
    allowed = allowed_labels(len(base), every)
    ids, dists = exact_knn(base[allowed.astype(np.int64)], queries, K, "l2")
    truth = allowed[ids]
    index.set_ef(100)
    labels, found = index.knn_query(queries, k=K, filter=allowed, filter_mode="graph")
    assert np.all(np.isin(labels, allowed))
    r = recall_at_k(labels, truth, K)
    assert r >= floor, f"filtered recall@10 with 1/{every} allowed: {r:.4f}"
    hit = labels == truth
    np.testing.assert_allclose(found[hit], dists[hit], rtol=1e-4)


def test_filter_allowing_fewer_than_k(sift):
    index, base, queries = sift
    allowed = np.array([5, 17, 4242], dtype=np.uint64)
    index.set_ef(100)
    with pytest.raises(RuntimeError, match="contiguous"):
        index.knn_query(queries[:5], k=K, filter=allowed)
    labels, dists = index.knn_query(queries[:5], k=K, filter=allowed, pad=True)
    assert labels.shape == dists.shape == (5, K) and labels.dtype == np.uint64 and dists.dtype == np.float32
    found = labels != PAD_LABEL
    assert np.all(found[:, :-1] >= found[:, 1:]), "padding only at the end of a row"
    assert np.all(np.isin(labels[found], allowed)) and np.all(found.sum(1) <= 3)
    assert np.all(np.isinf(dists[~found]) & (dists[~found] > 0)) and np.all(np.isfinite(dists[found]))
    for row_labels, row_dists, q in zip(labels, dists, queries[:5]):
        real = row_labels[row_labels != PAD_LABEL].astype(np.int64)
        np.testing.assert_allclose(row_dists[:len(real)], ((base[real] - q) ** 2).sum(1), rtol=1e-4)
    empty = index.knn_query(queries[:2], k=3, filter=np.array([], dtype=np.uint64), pad=True)
    assert np.all(empty[0] == PAD_LABEL) and np.all(np.isinf(empty[1]))


def test_selective_filter_finds_all_allowed(sift):
    """hnswlib keeps searching until it holds ef allowed results, so it finds every allowed label."""
    index, base, queries = sift
    allowed = np.array([5, 17, 4242], dtype=np.uint64)
    index.set_ef(100)
    labels, dists = index.knn_query(queries[:5], k=3, filter=allowed, pad=True, filter_mode="graph")
    ids, exact = exact_knn(base[allowed.astype(np.int64)], queries[:5], 3, "l2")
    np.testing.assert_array_equal(labels, allowed[ids])
    np.testing.assert_allclose(dists, exact, rtol=1e-4)


def test_pad_changes_nothing_when_enough(sift):
    index, _, queries = sift
    index.set_ef(50)
    plain = index.knn_query(queries, k=K)
    padded = index.knn_query(queries, k=K, pad=True)
    np.testing.assert_array_equal(plain[0], padded[0])
    np.testing.assert_array_equal(plain[1], padded[1])


def test_pad_beyond_count():
    base = np.random.default_rng(5).random((30, 8), dtype=np.float32)
    index = gpuhnsw.Index("l2", 8)
    index.init_index(40)
    index.add_items(base)
    index.mark_deleted(0)
    labels, dists = index.knn_query(base[:4], k=35, pad=True)
    assert labels.shape == (4, 35)
    assert np.all(labels[:, 29:] == PAD_LABEL) and np.all(np.isinf(dists[:, 29:]))
    for row in labels[:, :29]:
        assert sorted(row.tolist()) == list(range(1, 30))  # every live element, once
    assert np.all(np.diff(dists[:, :29], axis=1) >= 0)


# --------------------------------------------------------------------------- per-call ef

def test_per_call_ef(sift, builds):
    index, _, queries = sift
    _, _, truth = builds.data("sift-l2")
    index.set_ef(10)
    low = index.knn_query(queries, k=K, ef=10)
    high = index.knn_query(queries, k=K, ef=200)
    assert index.ef == 10
    assert not np.array_equal(low[0], high[0])
    assert recall_at_k(high[0], truth, K) > recall_at_k(low[0], truth, K)
    np.testing.assert_array_equal(index.knn_query(queries, k=K)[0], low[0])  # index.ef still rules
    index.set_ef(200)
    np.testing.assert_array_equal(index.knn_query(queries, k=K)[0], high[0])
    np.testing.assert_array_equal(index.knn_query(queries, k=K, ef=10)[0], low[0])
    assert index.ef == 200
    wide = index.knn_query(queries[:3], k=50, ef=5)  # the beam is max(ef, k)
    assert wide[0].shape == (3, 50) and len(set(wide[0][0].tolist())) == 50


def test_query_threads_give_same_results(sift):
    index, _, queries = sift
    index.set_ef(64)
    one = index.knn_query(queries, k=K, num_threads=1)
    many = index.knn_query(queries, k=K, num_threads=4)
    default = index.knn_query(queries, k=K)
    for other in (many, default):
        np.testing.assert_array_equal(one[0], other[0])
        np.testing.assert_array_equal(one[1], other[1])
