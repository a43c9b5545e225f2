"""Multithreaded stress: parallel inserts, mutations under threads, queries racing inserts.

hnswlib 0.8.0 documents add || query as unsafe; gpuhnsw must neither crash nor return garbage.
"""
import threading
import time

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw.testing import exact_knn, recall_at_k

N = 50_000
DIM = 48
K = 10
PAD_LABEL = np.uint64(2**64 - 1)


@pytest.fixture(scope="module")
def data(make_data):
    """float32 [N + 10200, DIM]: N rows to index, spare rows for replacements and updates, then
    200 rows drawn from the same clusters that serve as queries (never indexed)."""
    return make_data(N + 10_200, DIM, n_clusters=100, spread=0.1, seed=77)


@pytest.fixture(scope="module")
def queries(data):
    return data[N + 10_000:]


def live_recall(index, content, queries, ef=100):
    """recall@K over ``content`` (label -> row of vectors, as two arrays) with no deleted label returned."""
    labels, vectors = content
    found, _ = index.knn_query(queries, k=K, ef=ef)
    assert np.isin(found, labels).all(), "a label that is not live was returned"
    ids, _ = exact_knn(vectors, queries, K, "l2")
    return recall_at_k(found, labels[ids], K)


@pytest.mark.parametrize("threads", [2, 4])
def test_parallel_build_and_mutations(data, queries, threads):
    rng = np.random.default_rng(threads)
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(N, M=12, ef_construction=100, random_seed=5, allow_replace_deleted=True)
    index.add_items(data[:N], np.arange(N), num_threads=threads)
    report = index.check_integrity()
    assert report["n_live"] == N and report["n_deleted"] == 0
    vectors = {label: label for label in range(N)}  # label -> row of data

    def content():
        labels = np.array(sorted(vectors), dtype=np.uint64)
        return labels, data[[vectors[label] for label in labels.tolist()]]

    assert live_recall(index, content(), queries) >= 0.95

    doomed = rng.choice(N, 5000, replace=False)
    for label in doomed.tolist():
        index.mark_deleted(label)
        del vectors[label]
    assert index.check_integrity()["n_deleted"] == 5000
    assert live_recall(index, content(), queries) >= 0.9

    fresh = np.arange(100_000, 103_000)
    index.add_items(data[N:N + 3000], fresh, num_threads=threads, replace_deleted=True)
    vectors.update({label: N + i for i, label in enumerate(fresh.tolist())})
    assert index.element_count == N and index.count_deleted == 2000

    survivors = np.array(sorted(vectors), dtype=np.int64)
    updated = rng.choice(survivors[survivors < N], 3000, replace=False)
    index.add_items(data[N + 3000:N + 6000], updated, num_threads=threads)
    vectors.update({label: N + 3000 + i for i, label in enumerate(updated.tolist())})

    report = index.check_integrity()
    assert report["n_live"] == len(vectors) == N - 2000 and report["n_deleted"] == 2000
    assert len(index) == len(vectors)
    assert live_recall(index, content(), queries) >= 0.9
    found = index.knn_query(data[N:N + 6000], k=1, ef=100)[0][:, 0]
    # each new vector finds its own label (hnswlib 0.8.0 on this data: 0.988, untouched rows 0.99)
    assert np.mean(found == np.concatenate([fresh, updated])) >= 0.97


def test_concurrent_add_calls_from_python_threads(data, queries):
    """Two Python threads adding at once: disjoint labels, then the same labels."""
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(20_000, M=12, ef_construction=80, random_seed=5)
    index.add_items(data[:100], np.arange(100))
    errors = []

    def add(rows, labels):
        try:
            for lo in range(0, len(labels), 1000):
                index.add_items(data[rows[lo:lo + 1000]], labels[lo:lo + 1000], num_threads=2)
        except Exception as exc:  # reported below, in the main thread
            errors.append(exc)

    halves = [(np.arange(100, 10_000, 2), np.arange(100, 10_000, 2)),
              (np.arange(101, 10_000, 2), np.arange(101, 10_000, 2))]
    workers = [threading.Thread(target=add, args=half) for half in halves]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert index.check_integrity()["n_live"] == 10_000
    labels = np.arange(10_000, dtype=np.uint64)
    assert live_recall(index, (labels, data[:10_000]), queries) >= 0.95

    # both threads update the same labels with different vectors: each label ends with one of them
    same = np.arange(0, 10_000, 5)
    choices = (np.arange(20_000, 20_000 + len(same)), np.arange(30_000, 30_000 + len(same)))
    workers = [threading.Thread(target=add, args=(rows, same)) for rows in choices]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert index.check_integrity()["n_live"] == 10_000 and index.element_count == 10_000
    stored = index.get_items(same)
    first, second = data[choices[0]], data[choices[1]]
    assert np.all(np.all(stored == first, axis=1) | np.all(stored == second, axis=1))


def test_query_while_adding(data):
    """knn_query in one thread while another adds: only added labels, true distances, sorted."""
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(40_000, M=12, ef_construction=80, random_seed=5)
    index.add_items(data[:2000], np.arange(2000))
    scheduled_end = [2000]  # labels < this may be in the index (the batch in progress included)
    done = threading.Event()
    errors = []

    def writer():
        try:
            for lo in range(2000, 40_000, 2000):
                scheduled_end[0] = lo + 2000
                index.add_items(data[lo:lo + 2000], np.arange(lo, lo + 2000), num_threads=2)
        except Exception as exc:
            errors.append(exc)
        finally:
            done.set()

    q = data[40_000:40_064] + np.float32(0.01)
    thread = threading.Thread(target=writer)
    thread.start()
    rounds = short_rows = 0
    try:
        while not done.is_set() or rounds < 3:
            labels, dists = index.knn_query(q, k=K, num_threads=1 + rounds % 2, ef=40, pad=True)
            limit = scheduled_end[0]
            assert labels.dtype == np.uint64 and labels.shape == (len(q), K)
            real = labels != PAD_LABEL
            assert np.all(real[:, :-1] >= real[:, 1:]) and np.all(np.isinf(dists[~real]))
            short_rows += int((~real).any(axis=1).sum())
            assert (labels[real] < limit).all(), f"label >= {limit}: never added"
            rows = np.where(real, labels, 0).astype(np.int64)
            expected = np.where(real, ((data[rows] - q[:, None, :]) ** 2).sum(-1), np.inf)
            np.testing.assert_allclose(dists, expected, rtol=1e-3, atol=1e-5)
            for row_labels, row_dists, row_real in zip(labels, dists, real):
                assert np.all(np.diff(row_dists[row_real]) >= 0)
                assert len(set(row_labels[row_real].tolist())) == row_real.sum()
            rounds += 1
    finally:
        thread.join()
    assert not errors
    assert rounds >= 3
    assert short_rows == 0, f"{short_rows} of {rounds * len(q)} query rows found fewer than {K} results " \
                            f"in an index of >= 2000 elements while another thread was adding"
    assert index.check_integrity()["n_live"] == 40_000


def test_add_and_query_release_the_gil(data):
    """A long add_items lets a query thread progress, and a long knn_query lets adds progress."""
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(40_000, M=12, ef_construction=100, random_seed=5)
    index.add_items(data[:1000], np.arange(1000))
    q = data[50_000:50_008]

    def count_while(long_call, short_call):
        """Run long_call in a thread; return (short_call completions while it ran, all calls)."""
        started, finished = threading.Event(), threading.Event()

        def run():
            started.set()
            try:
                long_call()
            finally:
                finished.set()

        thread = threading.Thread(target=run)
        thread.start()
        started.wait()
        time.sleep(0.05)  # let the long call get inside the extension
        calls = during = 0
        while not finished.is_set():
            short_call(calls)
            calls += 1
            during += not finished.is_set()
        thread.join()
        return during, calls

    during, _ = count_while(
        lambda: index.add_items(data[1000:31_000], np.arange(1000, 31_000), num_threads=1),
        lambda i: index.knn_query(q, k=5, num_threads=1, pad=True))
    assert during >= 5, f"only {during} queries ran during one long add_items"

    many = np.repeat(data[50_000:50_500], 20, axis=0)  # 10k queries
    during, calls = count_while(
        lambda: index.knn_query(many, k=10, num_threads=1, ef=200),
        lambda i: index.add_items(data[31_000 + i], ids=[31_000 + i]))
    assert during >= 5, f"only {during} adds ran during one long knn_query"
    assert index.check_integrity()["n_live"] == 31_000 + calls
