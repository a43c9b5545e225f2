"""The GPU path through gpuhnsw.Index (``pytest -m gpu``; skipped without CuPy and a device).

Every test here compares the device against the CPU path or NumPy on the same index: recall parity
over an ef sweep on the three real datasets, distances, the mirror after every kind of mutation,
CuPy in/out, filters, pad, float16 storage, inserts running beside GPU queries.
"""
import threading

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw._surface import NO_LABEL as PAD_LABEL
from gpuhnsw.testing import exact_knn, recall_at_k

pytestmark = pytest.mark.gpu
K = 10
EF_SWEEP = (10, 16, 32, 64, 128, 256)

# dataset, space, base rows (None: all), queries
SETS = [("siftsmall", "l2", None, 100), ("mnist", "l2", 30_000, 1000), ("minilm-debian", "cosine", None, 1000)]


@pytest.fixture(scope="module", params=SETS, ids=[s[0] for s in SETS])
def built(request, datasets):
    name, space, n_base, n_queries = request.param
    base, queries, _, _ = datasets(name, n_base=n_base, n_queries=n_queries)
    index = gpuhnsw.Index(space, base.shape[1], device="cuda")
    index.init_index(len(base), M=16, ef_construction=200)
    index.add_items(base)
    truth, _ = exact_knn(base, queries, K, space)
    return index, base, queries, truth


def test_recall_parity_with_cpu_over_ef_sweep(built):
    import cupy as cp

    index, _, queries, truth = built
    q_dev = cp.asarray(queries)
    for ef in EF_SWEEP:
        gpu_labels, _ = index.knn_query(q_dev, k=K, ef=ef)
        cpu_labels = _cpu_query(index, queries, K, ef)
        r_gpu = recall_at_k(cp.asnumpy(gpu_labels), truth, K)
        r_cpu = recall_at_k(cpu_labels, truth, K)
        assert r_gpu >= r_cpu - 0.005, f"ef={ef}: GPU recall {r_gpu:.4f} < CPU {r_cpu:.4f} - 0.005"


def _cpu_query(index, queries, k, ef):
    labels = np.empty((len(queries), k), np.uint64)
    dists = np.empty((len(queries), k), np.float32)
    found = np.empty(len(queries), np.int32)
    index._core.search(np.ascontiguousarray(queries, np.float32), labels, dists, found, k=k, beam=max(ef, k))
    return labels


@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_distances_against_numpy(space, storage, make_data):
    import cupy as cp

    data = make_data(3000, 100, seed=4)
    index = gpuhnsw.Index(space, 100, device="cuda", storage=storage)
    index.init_index(3000, M=8)
    index.add_items(data)
    index.sync()
    q = data[:20] + np.float32(0.01)
    slots = np.random.default_rng(0).integers(0, 3000, size=(20, 50)).astype(np.uint32)
    slots[3, 7] = 0xFFFFFFFF
    got = cp.asnumpy(index._gpu.mirror.distances(q, slots))
    stored = index._core.export_state()
    vec = np.frombuffer(stored["vectors"], np.float32).reshape(3000, 100)
    if storage == "float16":
        vec = vec.astype(np.float16).astype(np.float32)
    qq = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-30) if space == "cosine" else q
    rows = vec[slots.clip(max=2999).astype(np.int64)]
    want = ((rows - qq[:, None]) ** 2).sum(-1) if space == "l2" else 1 - (rows * qq[:, None]).sum(-1)
    want[3, 7] = np.inf
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mirror_equals_host_after_every_mutation(make_data):
    data = make_data(6000, 32, seed=5)
    index = gpuhnsw.Index("l2", 32, device="cuda")
    index.init_index(3000, M=8, allow_replace_deleted=True)
    steps = [
        lambda: index.add_items(data[:2500]),
        lambda: index.add_items(data[2500:2600] + 1, np.arange(100)),          # updates
        lambda: [index.mark_deleted(i) for i in range(0, 300, 3)],              # deletes
        lambda: index.add_items(data[2600:2650], np.arange(10_000, 10_050), replace_deleted=True),
        lambda: index.resize_index(7000),
        lambda: index.add_items(data[3000:6000]),
    ]
    for step in steps:
        step()
        index.knn_query(data[:5], k=3)  # lazy sync
        assert index._gpu.mirror.check_against_core() == []
    before = index._gpu.mirror.stats.rows
    index.add_items(data[:60] * 1.01, np.arange(20_000, 20_060))
    stats = index.sync()
    assert 60 <= stats.rows < 0.2 * 6000, "a small insert moves a small share of the rows"
    assert index._gpu.mirror.stats.rows > before
    index.check_integrity()


def test_cupy_in_cupy_out_numpy_in_numpy_out(make_data):
    import cupy as cp

    data = make_data(2000, 16, seed=6)
    index = gpuhnsw.Index("cosine", 16, device="cuda")
    index.init_index(2000)
    index.add_items(data)
    labels, dists = index.knn_query(cp.asarray(data[:7]), k=4)
    assert isinstance(labels, cp.ndarray) and labels.dtype == cp.uint64 and dists.dtype == cp.float32
    host = index.knn_query(data[:7], k=4)
    assert isinstance(host[0], np.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(labels), host[0])


def test_filters_and_pad_on_gpu(make_data):
    import cupy as cp

    data = make_data(3000, 16, seed=7)
    index = gpuhnsw.Index("l2", 16, device="cuda")
    index.init_index(3000)
    index.add_items(data)
    allowed = np.arange(0, 3000, 11)
    labels, dists = index.knn_query(cp.asarray(data[:50]), k=5, ef=64, filter=allowed)
    labels = cp.asnumpy(labels)
    assert np.isin(labels, allowed).all()
    ids, _ = exact_knn(data[allowed], data[:50], 5, "l2")
    assert recall_at_k(labels, allowed[ids], 5) >= 0.95
    few = np.array([3, 99, 2500])
    with pytest.raises(RuntimeError, match="contiguous"):
        index.knn_query(data[:2], k=5, filter=few)
    labels, dists = index.knn_query(data[:2], k=5, filter=few, pad=True)
    assert (labels[:, 3:] == PAD_LABEL).all() and np.isinf(dists[:, 3:]).all()
    assert set(labels[:, :3].ravel().tolist()) <= {3, 99, 2500}
    for label in range(0, 3000, 2):
        index.mark_deleted(label)
    labels, _ = index.knn_query(data[:50], k=5)
    assert (labels % 2 == 1).all()


def test_inserting_while_gpu_queries_run(make_data):
    data = make_data(20_000, 32, seed=8)
    index = gpuhnsw.Index("l2", 32, device="cuda")
    index.init_index(len(data))
    index.add_items(data[:2000])
    errors, done = [], threading.Event()

    def writer():
        try:
            for lo in range(2000, len(data), 2000):
                index.add_items(data[lo:lo + 2000], np.arange(lo, lo + 2000), num_threads=2)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        labels, dists = index.knn_query(data[:64], k=K, ef=32)
        assert (labels < len(data)).all()
        real = ((data[labels.astype(np.int64)] - data[:64, None]) ** 2).sum(-1)
        np.testing.assert_allclose(dists, real, rtol=1e-3, atol=1e-4)
    thread.join()
    assert not errors
    index.sync()
    assert index._gpu.mirror.check_against_core() == []


def test_out_of_range_beam_falls_back_to_cpu(make_data):
    data = make_data(1000, 8, seed=9)
    index = gpuhnsw.Index("l2", 8, device="cuda")
    index.init_index(1000)
    index.add_items(data)
    labels, _ = index.knn_query(data[:3], k=5, ef=5000)
    assert isinstance(labels, np.ndarray) and labels.shape == (3, 5)


def test_gpu_assisted_build(datasets):
    """build="gpu": integrity, and recall at equal ef within 0.01 of the CPU-built index (mnist)."""
    base, queries, _, _ = datasets("mnist", n_base=30_000, n_queries=1000)
    truth, _ = exact_knn(base, queries, K, "l2")
    built = {}
    for build in ("gpu", "cpu"):
        index = gpuhnsw.Index("l2", base.shape[1], device="cuda")
        index.init_index(len(base), M=16, ef_construction=200)
        index.add_items(base, build=build)
        index.check_integrity()
        built[build] = index
    for ef in (16, 32, 64, 128):
        r = {b: recall_at_k(_cpu_query(ix, queries, K, ef), truth, K) for b, ix in built.items()}
        assert r["gpu"] >= r["cpu"] - 0.01, f"ef={ef}: {r}"
