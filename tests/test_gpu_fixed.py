"""search_fixed_kernel on a GPU (``pytest -m gpu``; skipped without CuPy and a device).

The same comparisons as the emulation (tests/test_kernels_emulated.py) on the device: the kernel
against its NumPy reference on one block per query (answers and work counters; on a GPU the work of
several blocks interleaves, so there only recall is compared), and the index's GPU leg with
``GHNSW_SEARCH_KERNEL=fixed`` against the CPU search (recall parity), with a filter, deletions, every
storage, NaN queries and streams.  Run by benchmarks/device_check.sh before its measurements.
"""
import numpy as np
import pytest

import gpuhnsw
from gpuhnsw._reference import COUNTS
from gpuhnsw._reference_fixed import fixed_search_reference
from gpuhnsw.device.arrays import bf16_values
from gpuhnsw.testing import exact_knn, recall_at_k

pytestmark = pytest.mark.gpu
K = 10


@pytest.fixture(scope="module")
def sift(datasets):
    base, queries, _, _ = datasets("siftsmall", n_queries=100)
    truth, _ = exact_knn(base, queries, K, "l2")
    return base, queries, truth


def build(base, storage, monkeypatch, space="l2"):
    monkeypatch.setenv("GHNSW_SEARCH_KERNEL", "fixed")
    index = gpuhnsw.Index(space, base.shape[1], device="cuda", gpu_storage=storage)
    index.init_index(len(base), M=16, ef_construction=100, random_seed=3)
    index.add_items(base, build="cpu")
    return index


def stored_state(index, storage):
    """The core's state with the vectors the device holds (rounded for fp16 / bf16)."""
    import cupy as cp

    state = index._core.export_state()
    m = index._gpu.mirror
    rows = cp.asnumpy(m.vectors[:m.count, :m.dim])
    values = bf16_values(rows) if storage == "bfloat16" else rows.astype(np.float32)
    return dict(state, vectors=np.ascontiguousarray(values).tobytes())


@pytest.mark.parametrize("storage", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("width", [1, 4])
def test_kernel_equals_its_reference(sift, monkeypatch, storage, width):
    """300 queries: one block each; answers and counters as the reference's, hash resets included."""
    base, queries, _ = sift
    index = build(base, storage, monkeypatch)
    q = np.resize(queries, (300, queries.shape[1]))
    index.sync()
    pending = index._gpu.fixed.launch(q, K, 32, search_width=width, counts=True)
    res = pending.finish()
    plan = index._gpu.fixed._plan(K, 32, width, 1)[0]
    ref = fixed_search_reference(stored_state(index, storage), q, K, 32, search_width=width,
                                 hash_log2=plan.hash_log2, return_counts=True)
    labels = np.frombuffer(index._core.export_state()["labels"], np.uint64)
    want = np.where(ref[0] >= 0, labels[np.maximum(ref[0], 0)], np.uint64(2**64 - 1))
    same = np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(res.ids, want)])
    assert same >= 0.99, same
    np.testing.assert_allclose(res.dists, ref[1], rtol=2e-4, atol=1e-4)
    counts = np.stack([ref[4][c] for c in COUNTS], axis=1)
    assert np.mean(np.all(res.counts == counts, axis=1)) >= 0.99


@pytest.mark.parametrize("nq", [1, 7, 64, 1000])
def test_recall_parity_with_cpu(sift, monkeypatch, nq):
    """Every batch size (several blocks per query below twice the multiprocessors)."""
    import cupy as cp

    base, queries, truth = sift
    q = np.resize(queries, (nq, queries.shape[1]))
    t = np.resize(truth, (nq, K))
    index = build(base, "float16", monkeypatch)
    for ef in (16, 64):
        gpu = index.knn_query(cp.asarray(q), k=K, ef=ef, search_width=2)[0]
        cpu = gpuhnsw.Index(index, device="cpu").knn_query(q, k=K, ef=ef)[0]
        assert recall_at_k(cp.asnumpy(gpu), t, K) >= recall_at_k(cpu, t, K) - 0.01


def test_filter_deletions_nan(sift, monkeypatch):
    import cupy as cp

    base, queries, _ = sift
    index = build(base, "float16", monkeypatch)
    for label in range(0, len(base), 10):
        index.mark_deleted(label)
    labels, _ = index.knn_query(queries, k=K, ef=64, filter=np.arange(1, len(base), 2), filter_mode="graph")
    assert np.all(labels % 2 == 1) and np.all(labels % 10 != 0)
    q = cp.asarray(queries[:4]).copy()
    q[1, 0] = cp.nan
    with pytest.raises(ValueError, match="first in row 1"):
        index.knn_query(q, k=K)


def test_other_streams(sift, monkeypatch):
    """Queries on a non-default stream after inserts synced on another: the results are the ones
    of the null stream."""
    import cupy as cp

    base, queries, _ = sift
    index = build(base[:5000], "float16", monkeypatch)
    index.resize_index(len(base))
    index.add_items(base[5000:], np.arange(5000, len(base)), build="cpu")
    with cp.cuda.Stream(non_blocking=True):
        a = cp.asnumpy(index.knn_query(cp.asarray(queries), k=K, ef=64)[0])
    b = cp.asnumpy(index.knn_query(cp.asarray(queries), k=K, ef=64)[0])
    np.testing.assert_array_equal(a, b)


def test_registers_as_compiled():
    """The loaded kernels' register counts, as ptxas reported them in CI: at most 64, no local memory."""
    import cupy  # noqa: F401
    from gpuhnsw.device import kernels

    for inst in [("float16", 8, 64), ("float32", 16, 128), ("bfloat16", 32, 256)]:
        attrs = kernels.get_kernel("search_fixed", inst).attributes
        assert attrs["num_regs"] <= kernels.FIXED_MAX_REGISTERS and attrs["local_size_bytes"] == 0, attrs
