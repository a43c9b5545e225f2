"""NN-descent (``knn_graph(method="nndescent")``, csrc/nndescent.c): recall floors on the shared
data in every space, determinism across thread counts, memmap input read in place, unpadded widths,
the distance tiles of every SIMD path, duplicates, the output formats (include_self, as_sparse,
return_info) and bad arguments."""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import gpuhnsw.knn_graph  # noqa: F401
from gpuhnsw import _core, testing
from gpuhnsw.knn_graph import knn_graph

kg_module = sys.modules["gpuhnsw.knn_graph"]


def _exact(x, k, space="l2"):
    return knn_graph(x, k, space=space, method="exact", device="cpu")


@pytest.fixture(scope="module")
def sift():
    base, _, _, _ = testing.load_dataset("siftsmall")
    return base, _exact(base, 10)


def test_recall_on_siftsmall_with_defaults(sift):
    base, (want, want_d) = sift
    ids, dists, info = knn_graph(base, 10, method="nndescent", return_info=True)
    assert ids.shape == (10000, 10) and ids.dtype == np.int64 and dists.dtype == np.float32
    assert not (ids == np.arange(10000)[:, None]).any()
    assert (np.diff(dists, axis=1) >= 0).all()
    assert testing.recall_at_k(ids, want, 10) >= 0.95
    # the distances are the true ones of the ids returned (squared L2 of integer data: exact)
    np.testing.assert_allclose(dists, _true_dists(base, ids, "l2"), rtol=1e-6)
    assert info["method"] == "nndescent" and info["rounds"] >= 1
    assert 0 < info["dist_evals"] < 10000 * 9999 // 2 // 5        # far below brute force


@pytest.mark.parametrize("name,space,n", [("mnist", "l2", 10000), ("minilm-debian", "cosine", 10000),
                                          ("minilm-debian", "ip", 6000), ("mnist", "cosine", 6000)])
def test_recall_on_real_data_every_space(name, space, n):
    base, _, _, _ = testing.load_dataset(name, n_base=n, n_queries=1)
    want, _ = _exact(base, 10, space)
    ids, dists = knn_graph(base, 10, space=space, method="nndescent")
    assert testing.recall_at_k(ids, want, 10) >= 0.95
    assert not (ids == np.arange(n)[:, None]).any()


def test_k32_recall_on_mnist_slice():
    base, _, _, _ = testing.load_dataset("mnist", n_base=10000, n_queries=1)
    want, _ = _exact(base, 32)
    ids, _ = knn_graph(base, 32, method="nndescent")
    assert testing.recall_at_k(ids, want, 32) >= 0.95


def test_same_seed_same_graph_whatever_the_thread_count(sift):
    base, _ = sift
    runs = [knn_graph(base, 10, method="nndescent", num_threads=t, random_seed=7, return_info=True)
            for t in (1, 2, 3)]
    for ids, dists, info in runs[1:]:
        np.testing.assert_array_equal(ids, runs[0][0])
        np.testing.assert_array_equal(dists, runs[0][1])
        assert info["dist_evals"] == runs[0][2]["dist_evals"]
        assert info["rounds"] == runs[0][2]["rounds"]
    other = knn_graph(base, 10, method="nndescent", num_threads=2, random_seed=8)
    assert not np.array_equal(other[0], runs[0][0])               # the seed does matter


@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_memmap_input_is_read_in_place(tmp_path, space):
    """No copy of the data: numpy allocates only the outputs (tracemalloc sees every numpy
    allocation; the float32 mnist slice is 31 MB, the [n, k] outputs under 4 MB)."""
    base, _, _, _ = testing.load_dataset("mnist", n_base=10000, n_queries=1)
    np.save(tmp_path / "x.npy", base.astype(np.float32))
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    tracemalloc.start()
    try:
        ids, dists = knn_graph(mm, 10, space=space, method="nndescent")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mm.nbytes / 4, peak
    want, _ = _exact(base, 10, space)
    assert testing.recall_at_k(ids, want, 10) >= 0.95


def _true_dists(x, ids, space):
    """float64 distances of row i to rows ids[i], [n, k]."""
    x = x.astype(np.float64)
    if space == "cosine":
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-30)
    if space == "l2":
        return ((x[:, None, :] - x[ids]) ** 2).sum(axis=2)
    return 1.0 - np.einsum("id,ikd->ik", x, x[ids])


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("dim", [2, 7, 18])
def test_unpadded_widths_every_space(space, dim):
    """Rows are read unpadded: the SIMD kernels take the first dim & ~3 columns, a scalar tail the
    rest. (ip on unit rows: on raw clustered data the largest-norm rows are everyone's nearest and
    NN-descent's neighbour-of-a-neighbour premise, and so its recall, is weaker.)"""
    x = testing.clustered(3000, dim, seed=dim)
    if space == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    want, _ = _exact(x, 8, space)
    ids, dists = knn_graph(x, 8, space=space, method="nndescent")
    assert testing.recall_at_k(ids, want, 8) >= 0.95
    np.testing.assert_allclose(dists, _true_dists(x, ids, space), rtol=1e-4, atol=1e-5)


TILE_SCRIPT = r"""
import json, numpy as np
from gpuhnsw import _core
from gpuhnsw.knn_graph import knn_graph
rng = np.random.default_rng(5)
out = {"simd": _core.simd}
for space in ("l2", "ip", "cosine"):
    for dim in (1, 3, 7, 16, 17, 33, 100):
        x = rng.standard_normal((61, dim)).astype(np.float32)
        ids, d = knn_graph(x, 60, space=space, method="nndescent", n_trees=1, leaf_size=64)
        out[f"{space}-{dim}"] = [x.tolist(), ids.tolist(), d.tolist()]
print(json.dumps(out))
"""


@pytest.mark.parametrize("level", ["portable", "avx2", "avx512"])
def test_distance_tiles_on_every_simd_path(level):
    """The tiled pair kernels (4x4 blocks, short blocks padded, masked row tails) of every SIMD
    path give every pair's true distance: 61 rows in one leaf, all pairs joined."""
    env = dict(os.environ, GHNSW_SIMD=level)
    res = subprocess.run([sys.executable, "-c", TILE_SCRIPT], capture_output=True, text=True,
                         env=env, check=True)
    out = json.loads(res.stdout)
    for key, (x, ids, dists) in ((k, v) for k, v in out.items() if k != "simd"):
        space = key.split("-")[0]
        x, ids = np.asarray(x, dtype=np.float32), np.asarray(ids)
        for i in range(61):
            assert sorted(ids[i]) == [j for j in range(61) if j != i], key
        np.testing.assert_allclose(dists, _true_dists(x, ids, space), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{key} on {out['simd']}")


# Compressed joins (storage="float16" / "int8"): one leaf of 61 rows, all pairs joined by the
# compressed tiles, each row's heap the 10 smallest compressed distances; the returned ids must be the
# 10 nearest by float64 on the decoded copy, the returned distances float32 ones (re-scored).
COMPRESSED_SCRIPT = r"""
import json, numpy as np
from gpuhnsw import _core
from gpuhnsw.knn_graph import knn_graph
rng = np.random.default_rng(6)
out = {"simd": _core.simd}
for storage in ("float16", "int8"):
    for space in ("l2", "ip", "cosine"):
        for dim in (1, 3, 17, 31, 32, 33, 100):
            x = rng.standard_normal((61, dim)).astype(np.float32) * rng.uniform(0.5, 2, dim).astype(np.float32)
            if space == "l2":
                x += np.float32(50)
            ids, d = knn_graph(x, 10, space=space, method="nndescent", n_trees=1, leaf_size=64, n_iters=1,
                               intermediate_degree=10, storage=storage)
            out[f"{storage}-{space}-{dim}"] = [x.tolist(), ids.tolist(), d.tolist()]
print(json.dumps(out))
"""


def _decoded_copy(storage, space, x):
    """float64 rows of NN-descent's compressed copy (csrc/nndescent.c): float16, or int8 codes of one
    scale (the widest range / 255) with offsets lo + 128 s; cosine rows normalised first."""
    x = np.asarray(x, np.float32)
    if space == "cosine":
        x = (x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    if storage == "float16":
        return x.astype(np.float16).astype(np.float64)
    lo, hi = x.min(0), x.max(0)
    s = np.float32((hi - lo).max() / np.float32(255))
    if (x == np.rint(x)).all() and (hi - lo).max() <= 255:
        s = np.float32(1)
    m = lo + np.float32(128) * s
    codes = np.clip(np.rint((x - m) * (np.float32(1) / s)), -128, 127)
    return m.astype(np.float64) + float(s) * codes


@pytest.mark.parametrize("level", ["portable", "avx2", "avx512", "avx512vnni"])
def test_compressed_joins_on_every_simd_path_against_float64(level):
    env = dict(os.environ, GHNSW_SIMD=level)
    res = subprocess.run([sys.executable, "-c", COMPRESSED_SCRIPT], capture_output=True, text=True,
                         env=env, check=True)
    out = json.loads(res.stdout)
    if out["simd"] != level:
        pytest.skip(f"{level} is not available here ({out['simd']})")
    missed = total = 0
    for key, (x, ids, dists) in ((k, v) for k, v in out.items() if k != "simd"):
        storage, space, _ = key.split("-")
        x, ids = np.asarray(x, dtype=np.float32), np.asarray(ids)
        rows = _decoded_copy(storage, space, x)
        d = ((rows[:, None] - rows[None]) ** 2).sum(-1) if space == "l2" else 1 - rows @ rows.T
        np.fill_diagonal(d, np.inf)
        want = np.argsort(d, axis=1, kind="stable")[:, :10]
        for i in range(61):
            got, best = set(ids[i].tolist()), set(want[i].tolist())
            total += 10
            # a neighbour may differ only where the 10th and 11th are within float32 rounding
            gap = np.sort(d[i])[10] - np.sort(d[i])[9]
            missed += 0 if got == best or gap < 1e-5 * np.abs(d[i][want[i]]).max() else len(best - got)
        np.testing.assert_allclose(dists, _true_dists(x, ids, space), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{key} on {out['simd']}: float32 re-scored distances")
    assert missed == 0, f"{missed} of {total} neighbours differ from float64 on the copy ({level})"


def test_compressed_joins_of_integer_data_give_the_float32_graph(sift):
    """siftsmall's values are integers spanning at most 181 values in every dimension: float16 holds
    them exactly, and int8 takes them as their own codes (scale 1), so both compressed joins make
    exactly the float32 graph."""
    base, _ = sift
    want = knn_graph(base, 10, method="nndescent", random_seed=3)
    for storage in ("float16", "int8"):
        ids, dists = knn_graph(base, 10, method="nndescent", random_seed=3, storage=storage)
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(dists, want[1])


@pytest.mark.parametrize("storage", ["float16", "int8"])
@pytest.mark.parametrize("name,space,n", [("mnist", "l2", 10000), ("minilm-debian", "cosine", 10000),
                                          ("minilm-debian", "ip", 6000)])
def test_compressed_joins_recall_on_real_data(storage, name, space, n):
    base, _, _, _ = testing.load_dataset(name, n_base=n, n_queries=1)
    want, _ = _exact(base, 10, space)
    ids, dists, info = knn_graph(base, 10, space=space, method="nndescent", storage=storage, return_info=True)
    assert testing.recall_at_k(ids, want, 10) >= 0.95
    np.testing.assert_allclose(dists, _true_dists(base, ids, space), rtol=1e-4, atol=1e-5)
    assert (np.diff(dists, axis=1) >= 0).all() and not (ids == np.arange(n)[:, None]).any()


def test_compressed_joins_bad_input():
    x = np.zeros((50, 4), np.float32)
    x[7, 2] = 1e5
    with pytest.raises(ValueError, match="row 7 holds a value beyond float16's range"):
        knn_graph(x, 3, method="nndescent", storage="float16")
    knn_graph(x, 3, method="nndescent", storage="int8")          # int8 takes any finite range
    knn_graph(x, 3, method="nndescent", space="cosine", storage="float16")   # normalised first
    with pytest.raises(ValueError, match="storage must be one of"):
        knn_graph(x, 3, method="nndescent", storage="int4")
    with pytest.raises(ValueError, match="applies to method='nndescent' only"):
        knn_graph(x, 3, method="exact", storage="int8")
    big = np.ones((4, 40000), np.float32)
    with pytest.raises(ValueError, match="int8 joins take at most"):
        knn_graph(big, 2, method="nndescent", storage="int8")
    assert knn_graph(x[:20], 3, storage="int8", return_info=True)[2]["method"] == "nndescent"


def test_duplicates_are_neighbours_and_self_is_not(twins):
    x = testing.clustered(1000, 16, seed=3)
    x[500:] = x[:500]                                 # every row has an exact twin
    first, zero, self_found = twins(*knn_graph(x, 5, method="nndescent"), 500)
    assert first >= 0.99 and zero >= 0.99 and not self_found


def test_every_other_row_when_k_is_n_minus_1():
    x = testing.clustered(60, 8, seed=4)
    ids, dists = knn_graph(x, 59, method="nndescent", n_trees=0)
    for i in range(60):
        assert sorted(ids[i]) == [j for j in range(60) if j != i]
    want, want_d = _exact(x, 59)
    np.testing.assert_allclose(dists, want_d, rtol=1e-5)


def test_random_init_and_one_round():
    x = testing.clustered(2000, 8, seed=5)
    ids, _, info = knn_graph(x, 6, method="nndescent", n_trees=0, n_iters=1, return_info=True)
    assert info["rounds"] == 1 and not (ids == np.arange(2000)[:, None]).any()


def test_include_self_and_sparse_output(sift):
    sparse = pytest.importorskip("scipy.sparse")
    base, (want, want_d) = sift
    ids, dists = knn_graph(base, 11, method="nndescent", include_self=True)
    np.testing.assert_array_equal(ids[:, 0], np.arange(10000))
    assert (dists[:, 0] == 0).all()
    assert testing.recall_at_k(ids[:, 1:], want, 10) >= 0.95
    g = knn_graph(base, 11, method="nndescent", include_self=True, as_sparse=True)
    assert sparse.isspmatrix_csr(g) and g.shape == (10000, 10000) and g.nnz == 110000
    np.testing.assert_array_equal(g.indices.reshape(10000, 11), ids)
    np.testing.assert_array_equal(g.data.reshape(10000, 11), dists)  # explicit zeros kept
    g2, info = knn_graph(base[:500], 5, method="exact", as_sparse=True, return_info=True)
    assert g2.nnz == 2500 and info["method"] == "exact"


def test_include_self_edges():
    x = testing.clustered(50, 4, seed=6)
    assert knn_graph(x, 50, include_self=True)[0].shape == (50, 50)
    assert knn_graph(x, 1, include_self=True)[0].tolist() == [[i] for i in range(50)]
    assert knn_graph(x, 0, include_self=True)[0].shape == (50, 0)
    with pytest.raises(ValueError, match=r"\[0, n\]"):
        knn_graph(x, 51, include_self=True)


def test_sparse_without_scipy_fails_before_the_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)
    monkeypatch.setattr(kg_module, "_nndescent_graph", lambda *a, **kw: pytest.fail("ran"))
    with pytest.raises(ImportError, match="scipy"):
        knn_graph(np.ones((10, 2)), 2, method="nndescent", as_sparse=True)


def test_auto_picks_exact_small_and_nndescent_large(monkeypatch):
    small = testing.clustered(500, 8)
    assert knn_graph(small, 5, return_info=True)[2]["method"] == "exact"
    big_n = int((kg_module.AUTO_EXACT_LIMIT / 8) ** 0.5) + 1
    seen = {}

    def fake(x, k, *a, **kw):
        seen["n"] = x.shape[0]
        return np.zeros((x.shape[0], k), np.int64), np.zeros((x.shape[0], k), np.float32)

    monkeypatch.setattr(kg_module, "_nndescent_graph", fake)
    info = knn_graph(np.zeros((big_n, 8), np.float32), 3, return_info=True, device="cpu")[2]
    assert info["method"] == "nndescent" and seen["n"] == big_n and info["estimates"] is None


def test_auto_on_a_gpu_picks_by_the_cost_estimates(fake_cupy, monkeypatch, caplog):
    """On a GPU, "auto" compares the estimated seconds of both methods (GPU_COST), runs the cheaper
    and says so in the info dict and the log."""
    ran = []

    def fake(method):
        def run(x, k, *a, **kw):
            ran.append((method, x.shape[0]))
            return np.zeros((x.shape[0], k), np.int64), np.zeros((x.shape[0], k), np.float32)
        return run

    monkeypatch.setattr(kg_module, "_nndescent_graph", fake("nndescent"))
    monkeypatch.setattr(kg_module, "_exact_graph_gpu", fake("exact"))
    cost = kg_module.GPU_COST
    # the crossover of n^2 (d p + s) and n k d c
    n_star = 3 * 8 * cost["nndescent_s"] / (8 * cost["exact_product_s"] + cost["exact_select_s"])
    for n, want in ((int(n_star * 0.8), "exact"), (int(n_star * 1.25), "nndescent")):
        with caplog.at_level("INFO", logger="gpuhnsw"):
            info = knn_graph(np.zeros((n, 8), np.float32), 3, return_info=True, device="cuda")[2]
        assert info["method"] == want and ran[-1] == (want, n)
        assert set(info["estimates"]) == {"exact", "nndescent"}
        assert min(info["estimates"], key=info["estimates"].get) == want
        assert f"method={want} (auto: estimated exact" in caplog.text


def test_progress_shows_rounds(fake_tqdm):
    updates = fake_tqdm
    x = testing.clustered(3000, 8, seed=9)
    _, _, info = knn_graph(x, 5, method="nndescent", n_iters=7, progress=True, return_info=True)
    assert updates[0] == ("total", 7) and updates[-1] == "closed"
    assert sum(updates[1:-1]) == info["rounds"]


def test_bad_arguments():
    x = testing.clustered(200, 8)
    with pytest.raises(ValueError, match="delta"):
        knn_graph(x, 3, method="nndescent", delta=0)
    with pytest.raises(ValueError, match="max_candidates"):
        knn_graph(x, 3, method="nndescent", max_candidates=0)
    with pytest.raises(TypeError):
        knn_graph(x, 3, method="nndescent", n_trees=2.5)
    with pytest.raises(TypeError):
        knn_graph(x, 3, method="nndescent", leaf_size=-1)
    with pytest.raises(ValueError):
        knn_graph(np.full((5, 2), np.inf), 1, method="nndescent")


def test_core_checks_lengths_and_reports_callback_errors():
    x = testing.clustered(300, 8)
    ids, d = np.empty((300, 4), np.int64), np.empty((300, 4), np.float32)
    with pytest.raises(ValueError, match="data"):
        _core.nndescent(x, 301, 8, "l2", 4, 8, 2, 30, 5, 0.001, 1, 2, ids, d, None)
    with pytest.raises(ValueError, match="k must be"):
        _core.nndescent(x, 300, 8, "l2", 300, 8, 2, 30, 5, 0.001, 1, 2,
                        np.empty((300, 300), np.int64), np.empty((300, 300), np.float32), None)

    def boom(r, updates):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        _core.nndescent(x, 300, 8, "l2", 4, 8, 2, 30, 5, 0.001, 1, 2, ids, d, boom)


# ------------------------------------------------------------------------------------------------
# The GPU path (gpuhnsw._nndescent_gpu) on NumPy through the suite's stand-in for CuPy
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def numpy_gpu(fake_cupy, numpy_select_topk, numpy_gemm):
    from gpuhnsw import _nndescent_gpu

    return _nndescent_gpu


@pytest.mark.parametrize("name,space,n", [("siftsmall", "l2", 3000), ("minilm-debian", "cosine", 2000),
                                          ("minilm-debian", "ip", 2000)])
def test_gpu_path_logic_recall_and_distances(numpy_gpu, name, space, n):
    base, _, _, _ = testing.load_dataset(name, n_base=n, n_queries=1)
    want, _ = _exact(base, 10, space)
    ids, dists, info = knn_graph(base, 10, space=space, method="nndescent", device="cuda",
                                 return_info=True)
    assert info["device"] == "cuda:0" and info["rounds"] >= 1 and info["dist_evals"] > 0
    assert set(info["phases"]) == set(numpy_gpu.PHASES) and len(info["updates"]) == info["rounds"]
    assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all()        # no id twice in a row
    cpu, _ = knn_graph(base, 10, space=space, method="nndescent", device="cpu")
    recall = testing.recall_at_k(ids, want, 10)
    assert recall >= 0.95 and recall >= testing.recall_at_k(cpu, want, 10) - 0.01   # held to the CPU's
    assert not (ids == np.arange(n)[:, None]).any()
    assert (np.diff(dists, axis=1) >= 0).all()
    np.testing.assert_allclose(dists, _true_dists(base, ids, space), rtol=1e-4, atol=1e-4)
    if space == "l2":
        again = knn_graph(base, 10, space=space, method="nndescent", device="cuda")
        np.testing.assert_array_equal(again[0], ids)                # seeded, deterministic


@pytest.mark.parametrize("name,space", [("siftsmall", "l2"), ("minilm-debian", "cosine")])
def test_gpu_forest_init(numpy_gpu, name, space):
    """The random-projection forest alone (no join round) already holds most true neighbours; the
    random graph it starts from holds almost none."""
    base, _, _, _ = testing.load_dataset(name, n_base=3000, n_queries=1)
    want, _ = _exact(base, 10, space)
    recalls = {}
    for trees in (0, 6):
        ids, _, info = knn_graph(base, 10, space=space, method="nndescent", device="cuda", n_trees=trees,
                                 leaf_size=100, n_iters=0, return_info=True)
        assert info["rounds"] == 0
        recalls[trees] = testing.recall_at_k(ids, want, 10)
    assert recalls[0] < 0.05 and recalls[6] > 0.35, recalls


def test_gpu_path_small_blocks_and_merges(numpy_gpu, monkeypatch):
    """Many join blocks and merge chunks per round give the same kind of graph."""
    monkeypatch.setattr(numpy_gpu, "_BLOCK_ENTRIES", 1 << 12)
    x = testing.clustered(1500, 12, seed=2)
    want, _ = _exact(x, 6)
    ids, dists = knn_graph(x, 6, method="nndescent", device="cuda", random_seed=3)
    assert testing.recall_at_k(ids, want, 6) >= 0.95
    np.testing.assert_allclose(dists, _true_dists(x, ids, "l2"), rtol=1e-4, atol=1e-4)


def test_gpu_path_keys_order_by_distance_then_flags_then_id(numpy_gpu):
    """The packed graph keys: one unsigned compare orders (distance, flags, id), negative
    distances (ip) and -0.0 included, and they unpack to what was packed."""
    d = np.array([2.0, -1.5, 0.0, -0.0, 2.0, 1e-30, -3e38, 7.0, 2.0], np.float32)
    ids = np.array([7, 5, 3, 1, 2, 9, 1, 0, 2], np.int64)     # -0.0 first either way
    new = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    keys = numpy_gpu._pack(np, d, ids, np.where(new, numpy_gpu._NEW, np.uint64(0)))
    order = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(order, np.lexsort((ids, new, d)))
    np.testing.assert_array_equal(numpy_gpu._ids(np, keys), ids)
    np.testing.assert_array_equal(numpy_gpu._dists(np, keys), d)
    empty = np.full(2, numpy_gpu._EMPTY)
    assert (keys < numpy_gpu._EMPTY).all()
    np.testing.assert_array_equal(numpy_gpu._ids(np, empty), [-1, -1])
    assert np.isinf(numpy_gpu._dists(np, empty)).all()


def test_gpu_path_duplicates_and_tiny_inputs(numpy_gpu):
    x = testing.clustered(300, 8, seed=4)
    x[150:] = x[:150]
    ids, dists = knn_graph(x, 3, method="nndescent", device="cuda")
    assert (ids[:, 0] == np.r_[np.arange(150, 300), np.arange(150)]).mean() >= 0.99
    assert not (ids == np.arange(300)[:, None]).any()
    ids, _ = knn_graph(x[:5], 4, method="nndescent", device="cuda")
    assert all(sorted(ids[i]) == [j for j in range(5) if j != i] for i in range(5))


@pytest.mark.gpu
@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_gpu_nndescent_recall(space):
    base, _, _, _ = testing.load_dataset("siftsmall")
    want, _ = _exact(base, 10, space)
    ids, dists, info = knn_graph(base, 10, space=space, method="nndescent", device="cuda",
                                 return_info=True)
    assert info["device"].startswith("cuda")
    assert testing.recall_at_k(ids, want, 10) >= 0.95
    np.testing.assert_allclose(dists, _true_dists(base, ids, space), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("offset,device", [(1e3, "cpu"), (1e4, "cpu"), (1e4, "cuda")])
def test_l2_far_from_the_origin_keeps_its_recall(numpy_gpu, offset, device):
    """l2 summed from |a|^2 + |b|^2 - 2 a.b cancels when the rows' norms dwarf their distances:
    16-d unit Gaussians moved 1000 away from the origin fell to recall 0.59 (10,000 away: 0.004;
    the GPU path, before its joins centred the rows: 0.70 and 0.006).
    Squared L2 is translation invariant, so the truth is the centred data's, in float64."""
    rng = np.random.default_rng(11)
    x = (offset + rng.standard_normal((3000, 16))).astype(np.float32)
    ids, dists = knn_graph(x, 10, method="nndescent", device=device, progress=False)
    c = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    sq = (c * c).sum(axis=1)
    d2 = sq[:, None] + sq[None, :] - 2 * c @ c.T
    np.fill_diagonal(d2, np.inf)
    truth = np.argsort(d2, axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= 0.95, recall
    got = ((x[:, None, :].astype(np.float64) - x[ids].astype(np.float64)) ** 2).sum(axis=2)
    np.testing.assert_allclose(dists, got, rtol=1e-4, atol=1e-3)
