"""Arrays straight from a model: host DLPack producers, bfloat16 (ml_dtypes), and torch tensors with
requires_grad / bfloat16 when torch is importable, as data, queries, ids and filters, on siftsmall.
NumPy-convertible input gives NumPy output.  (CUDA tensors: tests/test_gpu.py, -m gpu.)"""
import ml_dtypes
import numpy as np
import pytest

import gpuhnsw

K = 5


class DLPackOnly:
    """A minimal host DLPack producer: nothing but ``__dlpack__`` / ``__dlpack_device__``."""

    def __init__(self, array):
        self._array = np.ascontiguousarray(array)

    def __dlpack__(self, *args, **kwargs):
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


@pytest.fixture(scope="module")
def sift(datasets):
    base, queries, _, _ = datasets("siftsmall")
    return base[:3000], queries[:20]


def build(data, ids=None):
    index = gpuhnsw.Index("l2", 128, device="cpu")
    index.init_index(3000, M=12, ef_construction=80, random_seed=4)
    index.add_items(data, ids, num_threads=1)  # one thread: equal input builds equal graphs
    return index


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_dlpack_producer_as_data_queries_ids_and_filter(sift, dtype):
    base, queries = sift
    plain = build(base.astype(dtype), np.arange(3000))
    wrapped = build(DLPackOnly(base.astype(dtype)), DLPackOnly(np.arange(3000, dtype=np.int64)))
    want = plain.knn_query(queries.astype(dtype), k=K)
    got = wrapped.knn_query(DLPackOnly(queries.astype(dtype)), k=K)
    assert type(got[0]) is np.ndarray and got[0].dtype == np.uint64
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    allowed = np.arange(0, 3000, 4, dtype=np.int64)
    np.testing.assert_array_equal(wrapped.knn_query(queries, k=K, filter=DLPackOnly(allowed))[0],
                                  plain.knn_query(queries, k=K, filter=allowed)[0])


def test_bfloat16_is_upcast(sift):
    base, queries = sift
    b16, q16 = base.astype(ml_dtypes.bfloat16), queries.astype(ml_dtypes.bfloat16)
    index = build(b16)
    np.testing.assert_array_equal(index.get_items(np.arange(10)), b16[:10].astype(np.float32))
    got = index.knn_query(q16, k=K)
    np.testing.assert_array_equal(got[0], index.knn_query(q16.astype(np.float32), k=K)[0])
    bf = gpuhnsw.BFIndex("l2", 128, device="cpu")
    bf.init_index(3000)
    bf.add_items(b16)
    assert bf.knn_query(q16, k=K)[0].shape == (len(queries), K)


def test_unreadable_dlpack_dtype_is_a_clear_error():
    index = build(np.ones((3, 128), np.float32))
    with pytest.raises(ValueError, match="through DLPack"):
        index.knn_query(DLPackOnly(np.ones((2, 128), ml_dtypes.bfloat16)), k=1)


def test_torch_tensors(sift):
    torch = pytest.importorskip("torch")
    base, queries = sift
    data = torch.tensor(base, requires_grad=True)
    index = build(data, torch.arange(3000))
    want = index.knn_query(queries, k=K)
    got = index.knn_query(torch.tensor(queries, requires_grad=True), k=K)
    assert type(got[0]) is np.ndarray
    np.testing.assert_array_equal(got[0], want[0])
    bf = torch.tensor(queries).to(torch.bfloat16)
    np.testing.assert_array_equal(index.knn_query(bf, k=K)[0], index.knn_query(bf.float().numpy(), k=K)[0])
    mask = torch.zeros(3000, dtype=torch.bool)
    mask[::3] = True
    assert np.all(index.knn_query(queries, k=K, filter=mask)[0] % 3 == 0)
