"""GPU-assisted insertion (add_items(..., build="gpu")) without a GPU: the candidate source is
replaced by its CPU equivalent (the C search returning slots, exact search within the batch), so
what is checked is the C engine's candidate path and Index's batching: integrity, recall against
the CPU-built index, labels, updates mixed in, capacity.  The GPU candidates run in test_gpu.py."""
import numpy as np
import pytest

import gpuhnsw
from gpuhnsw import index as index_module
from gpuhnsw._core import INVALID_SLOT
from gpuhnsw.search.gpu import DeviceSearch
from gpuhnsw.testing import exact_knn, recall_at_k


def cpu_candidates(self, core, chunk, space):
    b = chunk.shape[0]
    kc = core.ef_construction
    slots = np.empty((b, kc), np.uint64)
    dists = np.empty((b, kc), np.float32)
    found = np.empty(b, np.int32)
    core.search(chunk, slots, dists, found, k=kc, beam=kc, num_threads=2, slots=True)
    graph = np.where(slots == np.uint64(2**64 - 1), INVALID_SLOT, slots).astype(np.uint32)
    kb = min(core.M0, b - 1)
    ids, _ = exact_knn(chunk, chunk, kb + 1, space)
    batch = np.array([[j for j in row if j != i][:kb] for i, row in enumerate(ids)], dtype=np.uint32)
    return graph, batch


@pytest.fixture
def assisted(monkeypatch):
    """build="gpu" on a CPU index, with small thresholds so that several batches run."""
    monkeypatch.setattr(DeviceSearch, "insert_candidates", cpu_candidates)
    monkeypatch.setattr(index_module, "GPU_BUILD_SEED", 1000)

    def make(space, dim, n, **kw):
        ix = gpuhnsw.Index(space, dim, device="cpu")
        ix.init_index(n, **kw)
        return ix
    return make


def assisted_add(ix, *args, **kw):
    """add_items(..., build="gpu") with the device switched on for the insert only (queries stay on
    the CPU engine; the candidate source is patched by the fixture)."""
    ix._device, ix._gpu = "cuda", DeviceSearch(0, "float32")
    try:
        ix.add_items(*args, build="gpu", **kw)
    finally:
        ix._device, ix._gpu = "cpu", None


@pytest.mark.parametrize("name, space, n", [("siftsmall", "l2", None), ("mnist", "l2", 8000),
                                            ("minilm-debian", "cosine", 8000)])
def test_recall_within_001_of_cpu_build(assisted, datasets, name, space, n):
    base, queries, _, _ = datasets(name, n_base=n, n_queries=200)
    truth, _ = exact_knn(base, queries, 10, space)
    gpu_built = assisted(space, base.shape[1], len(base), M=16, ef_construction=100)
    assisted_add(gpu_built, base, num_threads=2)
    info = gpu_built.check_integrity()
    assert info["n_live"] == len(base)
    cpu_built = gpuhnsw.Index(space, base.shape[1], device="cpu")
    cpu_built.init_index(len(base), M=16, ef_construction=100)
    cpu_built.add_items(base, num_threads=2)
    for ef in (16, 64):
        r_gpu = recall_at_k(gpu_built.knn_query(queries, k=10, ef=ef)[0], truth, 10)
        r_cpu = recall_at_k(cpu_built.knn_query(queries, k=10, ef=ef)[0], truth, 10)
        assert r_gpu >= r_cpu - 0.01, f"{name} ef={ef}: assisted {r_gpu:.4f} vs CPU {r_cpu:.4f}"


def test_labels_updates_and_levels(assisted, make_data):
    data = make_data(4000, 16, seed=21)
    ix = assisted("l2", 16, 5000, M=8, ef_construction=64)
    assisted_add(ix, data[:3000], np.arange(10_000, 13_000))
    # a batch mixing updates of existing labels with new ones
    assisted_add(ix, data[3000:4000], np.concatenate([np.arange(10_000, 10_300), np.arange(20_000, 20_700)]))
    ix.check_integrity()
    assert len(ix) == 3700
    np.testing.assert_allclose(ix.get_items(np.arange(10_000, 10_300)), data[3000:3300])
    labels, dists = ix.knn_query(data[3300:3400], k=1)
    assert (labels[:, 0] == np.arange(20_000, 20_100)).all() and np.allclose(dists, 0, atol=1e-6)
    plain = gpuhnsw.Index("l2", 16, device="cpu")
    plain.init_index(5000, M=8, ef_construction=64)
    plain.add_items(data[:3000], np.arange(10_000, 13_000))
    np.testing.assert_array_equal(ix.get_levels(np.arange(10_000, 13_000)),
                                  plain.get_levels(np.arange(10_000, 13_000)))


def test_capacity_rejection_changes_nothing(assisted, make_data):
    data = make_data(3000, 8, seed=22)
    ix = assisted("l2", 8, 2500, M=8)
    assisted_add(ix, data[:2000])
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        assisted_add(ix, data[2000:3000], np.arange(5000, 6000))
    assert ix.element_count == 2000
    ix.check_integrity()


def test_gpu_build_needs_a_gpu_index():
    ix = gpuhnsw.Index("l2", 4, device="cpu")
    ix.init_index(10)
    with pytest.raises(gpuhnsw.DeviceError):
        ix.add_items(np.zeros((2, 4), np.float32), build="gpu")
    with pytest.raises(ValueError, match="build"):
        ix.add_items(np.zeros((2, 4), np.float32), build="fast")
    assert ix.element_count == 0
