"""Exact search: ``exact_search`` against the shipped ground truth and the float64 oracle, and
``BFIndex`` against hnswlib 0.8.0's ``BFIndex`` (same API; correct where hnswlib is wrong)."""
import os

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw import BFIndex, DeviceError, IndexFileError, testing
from gpuhnsw._rows import normalize_rows
from gpuhnsw.exact import exact_search

SPACES = ("l2", "ip", "cosine")


# ------------------------------------------------------------------------------------------------
# exact_search
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_exact_search_equals_shipped_ground_truth(datasets, space):
    base, queries, gt_l2, gt_cos = datasets("siftsmall")
    gt = gt_l2 if space == "l2" else gt_cos
    gt_d = np.load(testing.data_dir() / "siftsmall" / f"gt_{space}_dist.npy")
    ids, dists = exact_search(base, queries, 100, space)
    assert ids.dtype == np.int64 and dists.dtype == np.float32 and ids.shape == (100, 100)
    # integer data, float64 re-ranking, ties by the smaller id: positionally identical
    np.testing.assert_array_equal(ids, gt)
    np.testing.assert_allclose(dists, gt_d, rtol=0, atol=1e-6 if space == "cosine" else 0)


def far_gaussians(n, nq, dim, offset, seed=0):
    """Unit Gaussians moved ``offset`` along every axis: base float32 [n, dim], queries float32
    [nq, dim], and the float64 oracle's exact ``k=10`` (ids, dists), computed after moving them back
    in float64 (exact), where the oracle's |q|^2 + |b|^2 - 2 q.b does not cancel."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((n, dim)) + offset).astype(np.float32)
    queries = (rng.standard_normal((nq, dim)) + offset).astype(np.float32)
    back = [x.astype(np.float64) - offset for x in (base, queries)]
    return base, queries, testing.exact_knn(*back, 10)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_exact_l2_far_from_origin_equals_oracle(offset):
    """Squared L2 does not change when the data moves; the float32 screening must not either
    (uncentred keys |b|^2 - 2 q.b gave recall 0.79 at offset 1e3, 0.01 at 1e4)."""
    base, queries, (want, want_d) = far_gaussians(3000, 200, 16, offset)
    ids, dists = exact_search(base, queries, 10)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(dists, want_d, rtol=1e-6)
    index = BFIndex("l2", 16)
    index.init_index(3000)
    index.add_items(base)
    labels, dists = index.knn_query(queries, k=10)
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_allclose(dists, want_d, rtol=1e-6)


def test_exact_l2_far_from_origin_equals_shipped_ground_truth(datasets):
    """Real data: siftsmall moved 10,000 along every axis (still integers, so exactly)."""
    base, queries, gt, _ = datasets("siftsmall")
    gt_d = np.load(testing.data_dir() / "siftsmall" / "gt_l2_dist.npy")
    base, queries = base + np.float32(1e4), queries + np.float32(1e4)
    ids, dists = exact_search(base, queries, 100)
    np.testing.assert_array_equal(ids, gt)
    np.testing.assert_array_equal(dists, gt_d)
    index = BFIndex("l2", base.shape[1])
    index.init_index(base.shape[0])
    index.add_items(base)
    labels, dists = index.knn_query(queries, k=100)
    np.testing.assert_array_equal(labels, gt)
    np.testing.assert_array_equal(dists, gt_d)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("block,base_block", [(None, None), (7, 33), (64, 1000), (1000, 5000)])
def test_exact_search_matches_oracle_for_any_tiling(make_data, space, block, base_block):
    base = make_data(1500, 24)
    queries = make_data(130, 24, seed=5)
    want_ids, want_d = testing.exact_knn(base, queries, 12, space)
    ids, dists = exact_search(base, queries, 12, space, block=block, base_block=base_block)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(dists, want_d, rtol=1e-5, atol=1e-5)


def test_exact_search_breaks_ties_by_smaller_id():
    base = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [2, 0]], dtype=np.float32)
    ids, dists = exact_search(base[::-1].copy(), np.zeros((1, 2)), 5)  # reversed storage order
    np.testing.assert_array_equal(ids, [[1, 2, 3, 4, 0]])
    np.testing.assert_array_equal(dists, [[1, 1, 1, 1, 4]])


def test_exact_search_exclude_self_keeps_duplicates():
    base = np.array([[0, 0], [0, 0], [5, 5], [0, 1]], dtype=np.float32)
    ids, dists = exact_search(base, base, 2, exclude_self=True)
    np.testing.assert_array_equal(ids, [[1, 3], [0, 3], [3, 0], [0, 1]])
    assert dists[0, 0] == 0 and dists[1, 0] == 0
    # queries that are a slice of the base
    ids2, _ = exact_search(base, base[2:], 2, exclude_self=True, query_offset=2)
    np.testing.assert_array_equal(ids2, ids[2:])


def test_exact_search_bad_arguments():
    base = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="exceeds"):
        exact_search(base, base, 5)
    with pytest.raises(ValueError, match="exceeds"):
        exact_search(base, base, 4, exclude_self=True)
    with pytest.raises(ValueError):
        exact_search(base, np.ones((2, 4)), 1)                  # width
    with pytest.raises(ValueError):
        exact_search(base, np.full((2, 3), np.nan), 1)
    with pytest.raises(RuntimeError):
        exact_search(base, base, 1, space="hamming")
    ids, dists = exact_search(base, base, 0)
    assert ids.shape == (4, 0) and dists.shape == (4, 0)


def test_exact_search_threads_give_identical_results(make_data):
    base, queries = make_data(3000, 16), make_data(700, 16, seed=9)
    one = exact_search(base, queries, 10, block=100, num_threads=1)
    two = exact_search(base, queries, 10, block=100, num_threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_exact_search_progress_callback(make_data):
    seen = []
    exact_search(make_data(200, 8), make_data(50, 8, seed=2), 3, block=16, progress=seen.append,
                 num_threads=1)
    assert seen == [16, 32, 48, 50]


# ------------------------------------------------------------------------------------------------
# BFIndex: API parity with hnswlib.BFIndex
# ------------------------------------------------------------------------------------------------

def test_bfindex_has_hnswlib_api(hnswlib):
    theirs = {a for a in dir(hnswlib.BFIndex) if not a.startswith("_")}
    ours = {a for a in dir(BFIndex) if not a.startswith("_")}
    assert theirs <= ours
    bf = BFIndex("l2", 4)
    assert (bf.space, bf.dim, bf.max_elements, bf.element_count) == ("l2", 4, 0, 0)
    assert bf.num_threads == hnswlib.BFIndex("l2", 4).num_threads
    assert repr(bf) == "<gpuhnsw.BFIndex(space='l2', dim=4)>"


@pytest.mark.parametrize("space", SPACES)
def test_bfindex_same_results_as_hnswlib(hnswlib, make_data, space):
    data, queries = make_data(800, 20), make_data(60, 20, seed=3)
    ids = np.arange(1000, 1800)
    ours, theirs = BFIndex(space, 20), hnswlib.BFIndex(space, 20)
    for index in (ours, theirs):
        index.init_index(1000)
        index.add_items(data, ids)
    if space == "cosine":  # hnswlib 0.8.0 forgets to normalise cosine queries (#592)
        queries = testing._normalise(queries.astype(np.float64)).astype(np.float32)
    lab, dist = ours.knn_query(queries, k=10)
    lab_h, dist_h = theirs.knn_query(queries, k=10)
    assert lab.dtype == np.uint64 and dist.dtype == np.float32 and lab.shape == (60, 10)
    np.testing.assert_allclose(dist, dist_h, rtol=1e-4, atol=1e-4)
    assert testing.recall_at_k(lab, lab_h, 10) == 1.0
    assert ours.get_current_count() == theirs.get_current_count() == 800
    assert ours.get_max_elements() == theirs.get_max_elements() == 1000


def test_bfindex_lifecycle_errors():
    bf = BFIndex("l2", 3)
    with pytest.raises(RuntimeError):
        bf.knn_query(np.zeros(3))                   # hnswlib: segfault
    with pytest.raises(RuntimeError):
        bf.add_items(np.zeros((1, 3)))
    bf.init_index(2)
    with pytest.raises(RuntimeError, match="already initiated"):
        bf.init_index(5)
    with pytest.raises(RuntimeError, match="Space name"):
        BFIndex("hamming", 3)
    with pytest.raises(ValueError):
        BFIndex("l2", 0)


def test_bfindex_k_larger_than_count_raises(hnswlib):
    data = np.eye(3, 4, dtype=np.float32)
    theirs = hnswlib.BFIndex("l2", 4)
    theirs.init_index(10)
    theirs.add_items(data)
    labels, _ = theirs.knn_query(data[:1], k=5)      # hnswlib 0.8.0 pads with garbage
    assert labels.shape == (1, 5)
    bf = BFIndex("l2", 4)
    bf.init_index(10)
    bf.add_items(data)
    with pytest.raises(RuntimeError, match="contiguous"):
        bf.knn_query(data[:1], k=4)
    labels, dists = bf.knn_query(data[:1], k=3)
    assert labels[0, 0] == 0 and dists[0, 0] == 0
    labels, dists = bf.knn_query(data[:1], k=0)
    assert labels.shape == (1, 0)


@pytest.mark.parametrize("space", SPACES)
def test_bfindex_filter_returns_true_nearest_allowed(make_data, space):
    data, queries = make_data(500, 12), make_data(40, 12, seed=4)
    bf = BFIndex(space, 12)
    bf.init_index(500)
    bf.add_items(data, np.arange(500) * 3)             # labels 0, 3, 6, ...
    allowed = np.arange(500)[(np.arange(500) % 7) == 2]
    calls = []

    def keep(label):
        calls.append(label)
        return (label // 3) % 7 == 2

    labels, dists = bf.knn_query(queries, k=8, filter=keep)
    want, want_d = testing.exact_knn(data[allowed], queries, 8, space)
    np.testing.assert_array_equal(labels, allowed[want] * 3)
    np.testing.assert_allclose(dists, want_d, rtol=1e-5, atol=1e-5)
    assert len(calls) == 500                           # once per element, not per (query, element)
    with pytest.raises(RuntimeError, match="contiguous"):
        bf.knn_query(queries, k=len(allowed) + 1, filter=keep)


def test_bfindex_cosine_queries_are_normalised():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((200, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    bf = BFIndex("cosine", 8)
    bf.init_index(200)
    bf.add_items(data)
    a = bf.knn_query(q, k=5)
    b = bf.knn_query(q * 37.0, k=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert (a[1] >= -1e-6).all() and (a[1] <= 2 + 1e-6).all()


def test_bfindex_auto_ids_follow_hnswlib(hnswlib):
    ours, theirs = BFIndex("l2", 2), hnswlib.BFIndex("l2", 2)
    for index in (ours, theirs):
        index.init_index(10)
        index.add_items(np.array([[0, 0], [1, 1]], dtype=np.float32), [100, 101])
        index.add_items(np.array([[5, 5]], dtype=np.float32))      # auto id = 2, not 0
    assert ours.knn_query([[5, 5]], k=1)[0][0, 0] == theirs.knn_query([[5, 5]], k=1)[0][0, 0] == 2


def test_bfindex_update_delete_and_capacity():
    bf = BFIndex("l2", 2)
    bf.init_index(3)
    bf.add_items(np.array([[0, 0], [10, 10], [20, 20]], dtype=np.float32), [7, 8, 9])
    bf.add_items(np.array([[30, 30]], dtype=np.float32), [8])       # update in place
    assert bf.get_current_count() == 3
    assert bf.knn_query([[30, 30]], k=1)[0][0, 0] == 8
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        bf.add_items(np.zeros((2, 2), dtype=np.float32), [1, 7])    # 1 is new: no room
    # nothing was added or changed by the rejected call
    assert bf.get_current_count() == 3
    assert bf.knn_query([[0, 0]], k=1)[1][0, 0] == 0
    bf.delete_vector(7)
    bf.delete_vector(12345)                                          # unknown: ignored (hnswlib)
    assert bf.get_current_count() == 2 and bf.element_count == 2
    labels, _ = bf.knn_query([[0, 0]], k=2)
    assert set(labels[0].tolist()) == {8, 9}
    bf.add_items(np.array([[1, 1], [2, 2]], dtype=np.float32), [5, 5])  # last row wins
    assert bf.get_current_count() == 3
    labels, dists = bf.knn_query([[2, 2]], k=1)
    assert labels[0, 0] == 5 and dists[0, 0] == 0
    with pytest.raises(OverflowError):
        bf.add_items(np.zeros((1, 2)), [-1])


def test_bfindex_rejects_bad_input():
    bf = BFIndex("l2", 4)
    bf.init_index(10)
    with pytest.raises(ValueError):
        bf.add_items(np.zeros((2, 5)))
    with pytest.raises(RuntimeError):                # also a RuntimeError, as hnswlib raises
        bf.add_items(np.zeros((2, 5)))
    with pytest.raises(ValueError):
        bf.add_items(np.array([[0, 0, np.nan, 0]]))
    bf.add_items(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        bf.knn_query(np.zeros((1, 5)))               # hnswlib silently accepts this
    with pytest.raises(ValueError):
        bf.knn_query(np.array([[0, np.inf, 0, 0]]))
    with pytest.raises(RuntimeError, match="label shape"):
        bf.add_items(np.zeros((2, 4)), [1, 2, 3])
    assert bf.get_current_count() == 2


def test_bfindex_device_choice():
    assert BFIndex("l2", 4, device="cpu").device == "cpu"
    with pytest.raises(ValueError):
        BFIndex("l2", 4, device="tpu")
    usable, _ = gpuhnsw.device.arrays.cuda_status()
    if usable:
        assert BFIndex("l2", 4).device.startswith("cuda")
    else:
        assert BFIndex("l2", 4, device="auto").device == "cpu"
        with pytest.raises(DeviceError, match="no GPU"):
            BFIndex("l2", 4, device="cuda")


# ------------------------------------------------------------------------------------------------
# BFIndex persistence
# ------------------------------------------------------------------------------------------------

def _filled(space="l2", n=300, dim=10, cap=400):
    bf = BFIndex(space, dim, device="cpu")
    bf.init_index(cap)
    rng = np.random.default_rng(1)
    bf.add_items(rng.standard_normal((n, dim)).astype(np.float32), rng.permutation(10 * n)[:n])
    bf.delete_vector(int(bf._labels[5]))
    return bf


@pytest.mark.parametrize("space", SPACES)
def test_bfindex_save_load_round_trip(tmp_path, space):
    bf = _filled(space)
    path = tmp_path / "bf.bin"
    bf.save_index(str(path))
    assert os.listdir(tmp_path) == ["bf.bin"]                      # no temporary left behind
    q = np.random.default_rng(2).standard_normal((20, 10)).astype(np.float32)
    back = BFIndex(space, 10)
    back.load_index(path)
    assert back.get_max_elements() == 400 and back.get_current_count() == 299
    for a, b in zip(bf.knn_query(q, k=7), back.knn_query(q, k=7)):
        np.testing.assert_array_equal(a, b)
    bigger = BFIndex(space, 10)
    bigger.load_index(path, max_elements=1000)
    assert bigger.get_max_elements() == 1000
    bigger.add_items(q[:3])                                          # auto ids continue after cur_l
    assert bigger.get_current_count() == 302


def test_bfindex_pickles(make_data):
    import pickle

    bf = _filled("cosine")
    back = pickle.loads(pickle.dumps(bf))
    q = make_data(5, 10)
    for a, b in zip(bf.knn_query(q, k=4), back.knn_query(q, k=4)):
        np.testing.assert_array_equal(a, b)


def test_bfindex_hnswlib_file_interchange(tmp_path, hnswlib, make_data):
    data, q = make_data(200, 16), make_data(10, 16, seed=8)
    theirs = hnswlib.BFIndex("l2", 16)
    theirs.init_index(250)
    theirs.add_items(data, np.arange(200) + 50)
    theirs.save_index(str(tmp_path / "h.bin"))
    ours = BFIndex("l2", 16)
    ours.load_index(str(tmp_path / "h.bin"))
    assert ours.get_max_elements() == 250 and ours.get_current_count() == 200
    np.testing.assert_array_equal(ours.knn_query(q, k=5)[0], theirs.knn_query(q, k=5)[0])
    ours.save_index(str(tmp_path / "o.bin"), format="hnswlib")
    again = hnswlib.BFIndex("l2", 16)
    again.load_index(str(tmp_path / "o.bin"))
    np.testing.assert_array_equal(again.knn_query(q, k=5)[0], theirs.knn_query(q, k=5)[0])
    with pytest.raises(IndexFileError, match="record size"):
        BFIndex("l2", 15).load_index(str(tmp_path / "h.bin"))


def test_bfindex_rejects_corrupted_files(tmp_path):
    bf = _filled()
    good = tmp_path / "good.bin"
    bf.save_index(good)
    blob = good.read_bytes()
    cases = {
        "truncated": blob[:-9],
        "trailing": blob + b"\0",
        "header": blob[:20] + bytes([blob[20] ^ 1]) + blob[21:],
        "vectors": blob[:200] + bytes([blob[200] ^ 0x40]) + blob[201:],
        "labels": blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:],
        "empty": b"",
        "magic only": blob[:8],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(IndexFileError):
            BFIndex("l2", 10).load_index(path)
    with pytest.raises(IndexFileError, match="space"):
        BFIndex("ip", 10).load_index(good)
    with pytest.raises(IndexFileError, match="dim"):
        BFIndex("l2", 11).load_index(good)
    with pytest.raises(FileNotFoundError):
        BFIndex("l2", 10).load_index(tmp_path / "missing.bin")
    # a failed load leaves the index as it was
    keep = _filled()
    before = keep.knn_query(np.zeros(10), k=3)
    with pytest.raises(IndexFileError):
        keep.load_index(tmp_path / "truncated.bin")
    np.testing.assert_array_equal(keep.knn_query(np.zeros(10), k=3)[0], before[0])


# ------------------------------------------------------------------------------------------------
# The CUDA path's logic, run on NumPy through a stand-in for the few CuPy calls it makes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("base_block", [None, 250, 5000])
def test_cuda_path_logic_matches_cpu(monkeypatch, fake_cupy, numpy_select_topk, numpy_gemm, make_data, space,
                                     base_block):
    from gpuhnsw import exact
    from gpuhnsw.device import brute

    monkeypatch.setattr(brute, "_RERANK_ENTRIES", 64)    # re-ranking in several chunks
    base, queries = make_data(6000, 8), make_data(90, 8, seed=11)
    if space == "cosine":
        base, queries = normalize_rows(base), normalize_rows(queries)
    cpu = exact.exact_rows(base, queries, 9, space)
    gpu = exact.exact_rows(base, queries, 9, space, device=("cuda", 0), block=32,
                           base_block=base_block)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-6, atol=1e-6)
    # grouped top-k with padding (5000 is not a multiple of the group size): exclude-self too
    self_rows = np.arange(90, dtype=np.int64)
    cpu = exact.exact_rows(base, base[:90], 9, space, self_rows=self_rows)
    gpu = exact.exact_rows(base, base[:90], 9, space, self_rows=self_rows, device=("cuda", 0),
                           block=40, base_block=base_block)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    # a k-NN graph (the queries are the base itself), progress reported per finished block
    small = np.ascontiguousarray(base[:700])
    self_rows = np.arange(700, dtype=np.int64)
    seen = []
    cpu = exact.exact_rows(small, small, 9, space, self_rows=self_rows)
    gpu = exact.exact_rows(small, small, 9, space, self_rows=self_rows, device=("cuda", 0), block=64,
                           base_block=base_block, progress=seen.append)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    np.testing.assert_array_equal(gpu[1], cpu[1])
    assert seen == sorted(seen) and seen[-1] == 700 and len(seen) >= 700 // 64


def test_cuda_path_pool_beyond_select_topk(fake_cupy, numpy_gemm, make_data):
    """A pool larger than select_topk_kernel's largest capacity takes the grouped-sort path."""
    from gpuhnsw import exact

    base, queries = make_data(6000, 8), make_data(20, 8, seed=11)
    cpu = exact.exact_rows(base, queries, 900, "l2")
    gpu = exact.exact_rows(base, queries, 900, "l2", device=("cuda", 0), base_block=5000)
    np.testing.assert_array_equal(gpu[0], cpu[0])
    self_rows = np.arange(100, 120, dtype=np.int64)
    cpu = exact.exact_rows(base, base[100:120], 900, "l2", self_rows=self_rows)
    gpu = exact.exact_rows(base, base[100:120], 900, "l2", self_rows=self_rows, device=("cuda", 0),
                           base_block=5000)
    np.testing.assert_array_equal(gpu[0], cpu[0])


def test_cuda_path_far_from_origin_equals_oracle(fake_cupy, numpy_select_topk, numpy_gemm):
    """The CUDA path centres its l2 keys as the CPU path does: fused and grouped selection, a
    k-NN graph (the queries are the base), and BFIndex's cached device base."""
    from gpuhnsw import exact

    base, queries, (want, want_d) = far_gaussians(3000, 50, 16, 1e4)
    ids, dists = exact.exact_rows(base, queries, 10, "l2", device=("cuda", 0), block=32,
                                  base_block=1000)                    # select_topk_kernel
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(dists, want_d, rtol=1e-6)
    ids, _ = exact.exact_rows(base, queries[:10], 1090, "l2", device=("cuda", 0))  # grouped sort
    np.testing.assert_array_equal(ids[:, :10], want[:10])
    self_rows = np.arange(3000, dtype=np.int64)
    ids, _ = exact.exact_rows(base, base, 10, "l2", self_rows=self_rows, device=("cuda", 0))
    want_graph, _ = exact.exact_rows(base, base, 10, "l2", self_rows=self_rows)   # CPU: tested above
    np.testing.assert_array_equal(ids, want_graph)
    index = BFIndex("l2", 16, device="cpu")
    index._device = ("cuda", 0)                  # as if a GPU had been found
    index.init_index(3000)
    index.add_items(base)
    labels, dists = index.knn_query(queries, k=10)
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_allclose(dists, want_d, rtol=1e-6)


def test_bfindex_cuda_path_logic_and_cache_invalidation(fake_cupy, numpy_select_topk, numpy_gemm, make_data):
    data, q = make_data(3000, 8), make_data(20, 8, seed=12)
    cpu, gpu = BFIndex("l2", 8, device="cpu"), BFIndex("l2", 8, device="cpu")
    gpu._device = ("cuda", 0)                          # as if a GPU had been found
    for bf in (cpu, gpu):
        bf.init_index(4000)
        bf.add_items(data)
    for step in range(3):
        for a, b in zip(cpu.knn_query(q, k=5), gpu.knn_query(q, k=5)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(cpu.knn_query(q, k=5, filter=lambda x: x % 3 == 0),
                        gpu.knn_query(q, k=5, filter=lambda x: x % 3 == 0)):
            np.testing.assert_array_equal(a, b)
        nearest = int(cpu.knn_query(q[:1], k=1)[0][0, 0])
        for bf in (cpu, gpu):                          # every change must reach the device copy
            if step == 0:
                bf.delete_vector(nearest)
            else:
                bf.add_items(q[:5] + 0.01, [10_000 + step * 10 + i for i in range(5)])


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CuPy and a device)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("space", SPACES)
def test_exact_search_gpu_equals_cpu(datasets, space):
    base, queries, _, _ = datasets("siftsmall")
    cpu = exact_search(base, queries, 50, space, device="cpu")
    gpu = exact_search(base, queries, 50, space, device="cuda", base_block=3000, block=64)
    # the float64 re-ranking makes both exact; ids equal wherever distances are not tied
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-6, atol=1e-6)
    assert testing.recall_at_k(gpu[0], cpu[0], 50) == 1.0
    ids, _ = exact_search(base, base, 10, space, device="cuda", exclude_self=True)
    cpu_ids, _ = exact_search(base, base, 10, space, device="cpu", exclude_self=True)
    assert testing.recall_at_k(ids, cpu_ids, 10) == 1.0


@pytest.mark.gpu
def test_bfindex_gpu_equals_cpu(make_data):
    data, q = make_data(5000, 32), make_data(100, 32, seed=6)
    out = []
    for device in ("cpu", "cuda"):
        bf = BFIndex("l2", 32, device=device)
        bf.init_index(5000)
        bf.add_items(data)
        bf.delete_vector(3)
        out.append(bf.knn_query(q, k=10))
        out.append(bf.knn_query(q, k=10, filter=lambda label: label % 2 == 0))
    for a, b in zip(out[:2], out[2:]):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-6)
        assert testing.recall_at_k(a[0], b[0], 10) == 1.0
