"""Every kind of mutation keeps the graph sound (check_integrity) and the answers right.

A small model (label -> vector, deleted set) says what the index must hold; after each step the
index is compared with it: counts, ids, stored vectors, no deleted label returned, recall against
exact search over the live vectors.
"""
import pickle

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw.testing import exact_knn, recall_at_k

DIM = 32
K = 10


class Model:
    """What an index should contain."""

    def __init__(self, space):
        self.space = space
        self.vectors = {}  # label -> float32 [DIM], every slot in use (deleted included)
        self.deleted = set()

    def add(self, labels, rows):
        for label, row in zip(np.asarray(labels).tolist(), rows):
            self.vectors[label] = np.array(row, dtype=np.float32)
            self.deleted.discard(label)

    def live(self):
        labels = np.array(sorted(set(self.vectors) - self.deleted), dtype=np.uint64)
        return labels, np.array([self.vectors[label] for label in labels.tolist()], dtype=np.float32)


def verify(index, model, queries, min_recall=0.9, ef=100):
    """Compare the index with the model; return the recall@K over the live vectors."""
    labels, vectors = model.live()
    report = index.check_integrity()
    assert report["n_live"] == len(labels) and report["n_deleted"] == len(model.deleted), report
    assert index.element_count == index.get_current_count() == len(model.vectors)
    assert len(index) == len(labels) and index.count_deleted == len(model.deleted)
    assert sorted(index.get_ids_list()) == sorted(model.vectors)
    for label in list(model.deleted)[:20]:
        assert label not in index
    sample = labels[:: max(1, len(labels) // 50)]
    stored = index.get_items(sample)
    expected = vectors[np.searchsorted(labels, sample)]
    if model.space == "cosine":
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)
    k = min(K, len(labels))
    if k == 0:
        return 1.0
    found, dists = index.knn_query(queries, k=k, ef=ef)
    assert not np.isin(found, np.array(sorted(model.deleted), dtype=np.uint64)).any(), "deleted label returned"
    assert np.isin(found, labels).all()
    ids, exact = exact_knn(vectors, queries, k, model.space)
    r = recall_at_k(found, labels[ids], k)
    assert r >= min_recall, f"recall@{k} {r:.4f}"
    return r


def new_index(space="l2", capacity=3000, M=12, ef_construction=100, allow_replace_deleted=False):
    index = gpuhnsw.Index(space, DIM)
    index.init_index(capacity, M=M, ef_construction=ef_construction, random_seed=42,
                     allow_replace_deleted=allow_replace_deleted)
    return index


@pytest.fixture(scope="module")
def data(make_data):
    """Clustered float32 [4000, DIM]; rows 3500.. are spare vectors for updates and queries."""
    return make_data(4000, DIM, n_clusters=40, seed=3)


@pytest.fixture(scope="module")
def queries(make_data):
    return make_data(150, DIM, n_clusters=40, seed=3)[::-1].copy() + np.float32(0.01)


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_add_in_batches(data, queries, space):
    index, model = new_index(space), Model(space)
    start = 0
    for size in (1, 1, 5, 60, 433, 1000, 500):
        labels = np.arange(start, start + size)
        index.add_items(data[labels], labels)
        model.add(labels, data[labels])
        start += size
        verify(index, model, queries, min_recall=0.9)
    assert verify(index, model, queries) >= 0.95


def test_auto_labels_in_batches(data, queries):
    index, model = new_index(), Model("l2")
    for lo, hi in ((0, 1), (1, 300), (300, 2000)):
        index.add_items(data[lo:hi])  # labels lo..hi-1
        model.add(np.arange(lo, hi), data[lo:hi])
    verify(index, model, queries, min_recall=0.95)


@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_update_existing_labels(data, queries, space):
    index, model = new_index(space), Model(space)
    index.add_items(data[:2000], np.arange(2000))
    model.add(np.arange(2000), data[:2000])
    moved = np.arange(0, 2000, 7)  # 286 labels get vectors from elsewhere
    new_vectors = data[3500:3500 + len(moved)] + np.float32(0.5)
    index.add_items(new_vectors, moved)
    model.add(moved, new_vectors)
    assert index.element_count == 2000
    verify(index, model, queries)
    verify(index, model, new_vectors + np.float32(0.01))  # queries near the new positions
    found, dists = index.knn_query(new_vectors, k=1)
    assert np.mean(found[:, 0] == moved) >= 0.99
    # a batch mixing updates and new labels
    mixed = np.concatenate([np.arange(1, 100, 3), np.arange(2000, 2100)])
    index.add_items(data[2100:2100 + len(mixed)], mixed)
    model.add(mixed, data[2100:2100 + len(mixed)])
    verify(index, model, queries)


@pytest.mark.parametrize("M, min_recall", [(2, 0.7), (4, 0.9), (8, 0.95)])   # fresh builds: 0.75, 0.98, 1.0
def test_updating_the_entry_point_keeps_the_upper_levels_sound(datasets, tmp_path, M, min_recall):
    """An update of the entry point relinked its upper levels from a level-0 neighbour, which then
    sat in lists of levels it does not reach: check_integrity failed, both save formats refused the
    index and a pickle of it did not load (the user's index could not be kept)."""
    base, queries, _, _ = datasets("siftsmall", n_base=1500, n_queries=50)
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base) + 1, M=M, ef_construction=50, random_seed=102)
    index.add_items(base[:-1], num_threads=1)
    model = Model("l2")
    model.add(np.arange(len(base) - 1), base[:-1])
    levels = index.get_levels(np.arange(len(base) - 1))
    top = np.flatnonzero(levels == levels.max())          # the entry point among them
    for step, label in enumerate(np.concatenate([top, top[:1], np.flatnonzero(levels == levels.max() - 1)[:5]])):
        v = base[(int(label) + 1 + step) % len(base)]     # another row's vector: a real move
        index.add_items(v, [label])
        model.add([label], v[None])
        index.check_integrity()
    before = verify(index, model, queries, min_recall=min_recall, ef=50)
    for fmt in ("gpuhnsw", "hnswlib"):
        index.save_index(tmp_path / f"i.{fmt}", format=fmt)
        loaded = gpuhnsw.Index("l2", base.shape[1])
        loaded.load_index(tmp_path / f"i.{fmt}")
        assert verify(loaded, model, queries, min_recall=min_recall, ef=50) == before
    for copy in (pickle.loads(pickle.dumps(index)), gpuhnsw.Index(index)):
        assert verify(copy, model, queries, min_recall=min_recall, ef=50) == before


def test_repeated_updates_of_one_label(data, queries):
    index, model = new_index(), Model("l2")
    index.add_items(data[:500], np.arange(500))
    model.add(np.arange(500), data[:500])
    for step in range(30):
        v = data[3500 + step]
        index.add_items(v, ids=[17])
        model.add([17], v[None])
        assert index.knn_query(v, k=1)[0][0, 0] == 17
    verify(index, model, queries)


def test_mark_and_unmark_deleted(data, queries):
    index, model = new_index(), Model("l2")
    index.add_items(data[:2000], np.arange(2000))
    model.add(np.arange(2000), data[:2000])
    rng = np.random.default_rng(9)
    doomed = rng.choice(2000, 600, replace=False)
    for label in doomed.tolist():
        index.mark_deleted(label)
        model.deleted.add(label)
    verify(index, model, queries)
    # the top of the hierarchy (entry point included) deleted too: they stay waypoints
    levels = index.get_levels(np.arange(2000))
    for label in np.flatnonzero(levels == levels.max()).tolist():
        if label not in model.deleted:
            index.mark_deleted(label)
            model.deleted.add(label)
    verify(index, model, queries)
    for label in doomed[:300].tolist():
        index.unmark_deleted(label)
        model.deleted.discard(label)
    verify(index, model, queries)
    found = index.knn_query(data[doomed[:300]], k=1)[0][:, 0]
    assert np.mean(found == doomed[:300]) >= 0.99


def test_delete_everything_then_readd(data, queries):
    index, model = new_index(), Model("l2")
    index.add_items(data[:300], np.arange(300))
    model.add(np.arange(300), data[:300])
    for label in range(300):
        index.mark_deleted(label)
        model.deleted.add(label)
    assert index.check_integrity()["n_live"] == 0 and len(index) == 0
    with pytest.raises(RuntimeError, match="contiguous"):
        index.knn_query(queries[:2], k=1)
    index.add_items(data[:100] + np.float32(0.1), np.arange(100))  # re-adding undeletes
    model.add(np.arange(100), data[:100] + np.float32(0.1))
    verify(index, model, queries, min_recall=0.9)


@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_replace_deleted(data, queries, space):
    index, model = new_index(space, capacity=2000, allow_replace_deleted=True), Model(space)
    index.add_items(data[:2000], np.arange(2000))
    model.add(np.arange(2000), data[:2000])
    doomed = np.arange(0, 2000, 4)
    for label in doomed.tolist():
        index.mark_deleted(label)
        model.deleted.add(label)
    verify(index, model, queries)
    fresh = np.arange(10_000, 10_000 + 300)
    index.add_items(data[3500:3800], fresh, replace_deleted=True)
    reused = set(doomed.tolist()) - set(index.get_ids_list())  # which vacancies is not specified
    assert len(reused) == 300 and index.element_count == 2000 and index.max_elements == 2000
    for label in reused:
        del model.vectors[label]
        model.deleted.discard(label)
    model.add(fresh, data[3500:3800])
    verify(index, model, queries)
    verify(index, model, data[3500:3800] + np.float32(0.01))
    assert np.mean(index.knn_query(data[3500:3800], k=1)[0][:, 0] == fresh) >= 0.99
    # fill the remaining vacancies, then the index is full
    rest = np.arange(20_000, 20_000 + 200)
    index.add_items(data[3800:4000], rest, replace_deleted=True)
    for label in set(model.deleted) - set(index.get_ids_list()):
        del model.vectors[label]
        model.deleted.discard(label)
    model.add(rest, data[3800:4000])
    assert index.count_deleted == 0 and index.element_count == 2000
    verify(index, model, queries)
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        index.add_items(data[0], ids=[99_999], replace_deleted=True)


def test_resize_index(data, queries):
    index, model = new_index(capacity=1000), Model("l2")
    index.add_items(data[:1000], np.arange(1000))
    model.add(np.arange(1000), data[:1000])
    index.mark_deleted(5)
    model.deleted.add(5)
    for capacity, hi in ((1000, 1000), (1500, 1500), (3000, 2500)):
        index.resize_index(capacity)
        assert index.max_elements == capacity
        verify(index, model, queries)
        lo = len(model.vectors)
        index.add_items(data[lo:hi], np.arange(lo, hi))
        model.add(np.arange(lo, hi), data[lo:hi])
        verify(index, model, queries)


@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_load_then_mutate(data, queries, tmp_path, fmt):
    index, model = new_index(capacity=1500), Model("l2")
    index.add_items(data[:1200], np.arange(1200))
    model.add(np.arange(1200), data[:1200])
    for label in range(0, 1200, 10):
        index.mark_deleted(label)
        model.deleted.add(label)
    path = str(tmp_path / "index.bin")
    index.save_index(path, format=fmt)
    loaded = gpuhnsw.Index("l2", DIM)
    loaded.load_index(path, max_elements=2000)
    assert loaded.max_elements == 2000
    report, loaded_report = index.check_integrity(), loaded.check_integrity()
    for key in ("n_live", "n_deleted", "max_level", "n_edges"):
        assert loaded_report[key] == report[key], key
    verify(loaded, model, queries)
    loaded.set_ef(index.ef)
    np.testing.assert_array_equal(loaded.knn_query(queries, k=K)[0], index.knn_query(queries, k=K)[0])
    loaded.add_items(data[1200:1800], np.arange(1200, 1800))
    model.add(np.arange(1200, 1800), data[1200:1800])
    loaded.unmark_deleted(10)
    model.deleted.discard(10)
    loaded.add_items(data[3500:3550], np.arange(20, 70))
    model.add(np.arange(20, 70), data[3500:3550])
    verify(loaded, model, queries)


def test_load_with_replacement(data, queries, tmp_path):
    index, model = new_index(capacity=1000), Model("l2")
    index.add_items(data[:1000], np.arange(1000))
    model.add(np.arange(1000), data[:1000])
    for label in range(100):
        index.mark_deleted(label)
        model.deleted.add(label)
    path = str(tmp_path / "index.bin")
    index.save_index(path)
    loaded = gpuhnsw.Index("l2", DIM)
    loaded.load_index(path, allow_replace_deleted=True)
    loaded.add_items(data[3500:3600], np.arange(5000, 5100), replace_deleted=True)
    assert loaded.element_count == 1000 and loaded.count_deleted == 0
    for label in range(100):
        del model.vectors[label]
    model.deleted.clear()
    model.add(np.arange(5000, 5100), data[3500:3600])
    verify(loaded, model, queries)


def test_copies_are_sound(data, queries):
    index, model = new_index(), Model("l2")
    index.add_items(data[:1500], np.arange(1500))
    model.add(np.arange(1500), data[:1500])
    index.mark_deleted(3)
    model.deleted.add(3)
    for copy in (pickle.loads(pickle.dumps(index)), gpuhnsw.Index(index)):
        verify(copy, model, queries)
        copy.add_items(data[1500:1600], np.arange(1500, 1600))
        assert copy.check_integrity()["n_live"] == 1599
    verify(index, model, queries)


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_random_operation_sequence(data, queries, space):
    """A seeded random walk over every mutation, checked against the model after each step."""
    rng = np.random.default_rng(2024)
    index, model = new_index(space, capacity=600, M=6, ef_construction=60,
                             allow_replace_deleted=True), Model(space)
    spare = iter(range(len(data)))
    next_label = 0

    def rows(n):
        return data[[next(spare) for _ in range(n)]]

    for step in range(60):
        live = sorted(set(model.vectors) - model.deleted)
        op = rng.choice(["add", "update", "delete", "unmark", "replace", "resize"],
                        p=[0.3, 0.2, 0.2, 0.1, 0.15, 0.05])
        if op == "add" and len(model.vectors) + 20 <= index.max_elements:
            labels = np.arange(next_label, next_label + int(rng.integers(1, 21)))
            next_label += len(labels)
            vectors = rows(len(labels))
            index.add_items(vectors, labels, num_threads=int(rng.integers(1, 3)))
            model.add(labels, vectors)
        elif op == "update" and live:
            labels = rng.choice(live, min(len(live), int(rng.integers(1, 10))), replace=False)
            vectors = rows(len(labels))
            index.add_items(vectors, labels)
            model.add(labels, vectors)
        elif op == "delete" and len(live) > 15:
            for label in rng.choice(live, int(rng.integers(1, 8)), replace=False).tolist():
                index.mark_deleted(label)
                model.deleted.add(label)
        elif op == "unmark" and model.deleted:
            label = sorted(model.deleted)[int(rng.integers(len(model.deleted)))]
            index.unmark_deleted(label)
            model.deleted.discard(label)
        elif op == "replace" and model.deleted:
            n = min(len(model.deleted), int(rng.integers(1, 6)))
            labels = np.arange(next_label, next_label + n)
            next_label += n
            vectors = rows(n)
            before = set(index.get_ids_list())
            index.add_items(vectors, labels, replace_deleted=True)
            for label in before - set(index.get_ids_list()):
                assert label in model.deleted, "replace_deleted reused a live slot"
                del model.vectors[label]
                model.deleted.discard(label)
            model.add(labels, vectors)
        elif op == "resize":
            index.resize_index(index.max_elements + 50)
        if len(set(model.vectors) - model.deleted) >= K:
            verify(index, model, queries, min_recall=0.8)
        else:
            index.check_integrity()
    verify(index, model, queries, min_recall=0.9)
