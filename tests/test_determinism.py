"""Reproducibility: levels from (random_seed, insertion sequence number), not from thread timing.

hnswlib draws levels from one shared generator, so its multithreaded builds differ run to run; here
levels are the same for any thread count and batch split, and single-threaded builds are identical.
"""
import math

import numpy as np
import pytest

import gpuhnsw

N = 20_000
DIM = 32
MASK = 2**64 - 1


@pytest.fixture(scope="module")
def data(make_data):
    return make_data(N, DIM, n_clusters=50, seed=99)


def build(data, *, seed=100, threads=1, M=16, batches=None, space="l2"):
    index = gpuhnsw.Index(space, DIM)
    index.init_index(len(data), M=M, ef_construction=64, random_seed=seed)
    start = 0
    for size in batches or (len(data),):
        index.add_items(data[start:start + size], np.arange(start, start + size), num_threads=threads)
        start += size
    assert start == len(data)
    return index


def documented_level(seed, seq, M):
    """docs/architecture.md, "Levels": floor(-ln(u) / ln(M)), u from a splitmix64-style mix."""
    x = (seed ^ ((0x9E3779B97F4A7C15 * (seq + 1)) & MASK)) & MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    x ^= x >> 31
    u = ((x >> 11) + 0.5) * 2.0**-53
    return min(255, math.floor(-math.log(u) / math.log(M)))


def test_levels_do_not_depend_on_threads_or_batches(data):
    labels = np.arange(N)
    reference = build(data, threads=1).get_levels(labels)
    for threads, batches in ((2, (N,)), (4, (N,)), (2, (1, 999, 7000, N - 8000))):
        other = build(data, threads=threads, batches=batches)
        np.testing.assert_array_equal(other.get_levels(labels), reference)
        assert other.check_integrity()["max_level"] == int(reference.max())


def test_levels_follow_documented_formula(data):
    index = build(data[:3000], seed=12345, M=8, batches=(1000, 2000))
    expected = [documented_level(12345, seq, 8) for seq in range(3000)]
    np.testing.assert_array_equal(index.get_levels(np.arange(3000)), expected)


def test_level_distribution(data):
    """P(level >= l) = M**-l: about N/M nodes above level 0, N/M**2 above level 1."""
    levels = build(data, threads=2).get_levels(np.arange(N)).astype(np.int64)
    for level in (1, 2):
        p = 16.0**-level
        expected, sigma = N * p, math.sqrt(N * p * (1 - p))
        assert abs((levels >= level).sum() - expected) < 5 * sigma, (level, (levels >= level).sum())


def test_different_seeds_give_different_levels(data):
    labels = np.arange(N)
    a = build(data, seed=1, threads=2).get_levels(labels)
    b = build(data, seed=2, threads=2).get_levels(labels)
    assert not np.array_equal(a, b)
    assert (a != b).sum() > N // 20


def test_updates_keep_levels(data):
    index = build(data[:5000])
    before = index.get_levels(np.arange(5000))
    index.add_items(data[5000:6000], np.arange(0, 5000, 5))
    np.testing.assert_array_equal(index.get_levels(np.arange(5000)), before)


@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_single_threaded_builds_are_identical(data, tmp_path, space):
    a, b = (build(data[:8000], seed=7, space=space) for _ in range(2))
    queries = data[::97] + np.float32(0.01)
    for ef in (10, 100):
        a.set_ef(ef)
        b.set_ef(ef)
        la, da = a.knn_query(queries, k=10)
        lb, db = b.knn_query(queries, k=10)
        np.testing.assert_array_equal(la, lb)
        assert da.tobytes() == db.tobytes()
    for label in range(0, 8000, 37):
        np.testing.assert_array_equal(a.get_neighbors(label), b.get_neighbors(label))
    a.save_index(str(tmp_path / "a.bin"), format="hnswlib")
    b.save_index(str(tmp_path / "b.bin"), format="hnswlib")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_search_is_deterministic_across_query_threads(data):
    index = build(data[:8000], threads=2)
    queries = data[::50] + np.float32(0.01)
    one = index.knn_query(queries, k=10, num_threads=1)
    for threads in (2, 3):
        other = index.knn_query(queries, k=10, num_threads=threads)
        np.testing.assert_array_equal(one[0], other[0])
        assert one[1].tobytes() == other[1].tobytes()
