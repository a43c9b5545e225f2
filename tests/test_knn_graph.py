"""``knn_graph``: the exact method equals brute force, the hnsw method has high recall, self rows are
dropped by id, and memory stays bounded."""
import sys
import tracemalloc

import numpy as np
import pytest

import gpuhnsw.knn_graph  # noqa: F401
from gpuhnsw import testing
from gpuhnsw._rows import normalize_rows
from gpuhnsw.knn_graph import knn_graph

# gpuhnsw.knn_graph as an attribute is the function; the module itself is in sys.modules
kg_module = sys.modules["gpuhnsw.knn_graph"]


def _oracle(x, k, space="l2"):
    """float64 brute force with the row itself removed (by id) from k + 1 results."""
    ids, dists = testing.exact_knn(x, x, k + 1, space)
    keep = ids != np.arange(len(x))[:, None]
    keep[keep.all(axis=1), -1] = False
    return ids[keep].reshape(len(x), k), dists[keep].reshape(len(x), k)


@pytest.fixture(scope="module")
def sift_graph(datasets):
    """siftsmall base and its exact 10-NN graph from the float64 oracle."""
    base, _, _, _ = datasets("siftsmall")
    return (base,) + _oracle(base, 10)


def test_exact_equals_brute_force_on_siftsmall(sift_graph):
    base, want, want_d = sift_graph
    neighbors, distances = knn_graph(base, 10, method="exact")
    assert neighbors.dtype == np.int64 and distances.dtype == np.float32
    np.testing.assert_array_equal(neighbors, want)          # integer data: exact, ties by id
    np.testing.assert_array_equal(distances, want_d)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_exact_l2_far_from_origin_equals_brute_force(offset):
    """Squared L2 does not change when the data moves, nor may the graph (uncentred float32 keys
    gave recall 0.80 at offset 1e3, 0.01 at 1e4)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 16)) + offset).astype(np.float32)
    want, want_d = _oracle(x.astype(np.float64) - offset, 10)      # moved back exactly in float64
    neighbors, distances = knn_graph(x, 10, method="exact")
    np.testing.assert_array_equal(neighbors, want)
    np.testing.assert_allclose(distances, want_d, rtol=1e-6)


def test_exact_equals_brute_force_on_mnist_slice(datasets):
    base, _, _, _ = datasets("mnist", n_base=5000, n_queries=1)
    neighbors, distances = knn_graph(base, 15, method="exact")
    want, want_d = _oracle(base, 15)
    np.testing.assert_array_equal(neighbors, want)
    np.testing.assert_array_equal(distances, want_d)


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("tile", [97, 512, 5000])
def test_exact_any_space_and_tiling(make_data, space, tile):
    x = make_data(1200, 16)
    neighbors, distances, _ = kg_module._exact_graph_cpu(
        normalize_rows(x) if space == "cosine" else x, 6, space, tile=tile)
    want, want_d = _oracle(x, 6, space)
    np.testing.assert_array_equal(neighbors, want)
    np.testing.assert_allclose(distances, want_d, rtol=1e-5, atol=1e-6)


def test_exact_keeps_duplicates_and_drops_only_self():
    x = np.array([[0, 0], [3, 3], [0, 0], [0, 0], [1, 0]], dtype=np.float32)
    neighbors, distances = knn_graph(x, 3, method="exact")
    np.testing.assert_array_equal(neighbors[0], [2, 3, 4])
    np.testing.assert_array_equal(neighbors[2], [0, 3, 4])
    np.testing.assert_array_equal(distances[0], [0, 0, 1])
    assert not (neighbors == np.arange(5)[:, None]).any()


def test_hnsw_recall_on_siftsmall(sift_graph):
    base, exact, _ = sift_graph
    approx, dists = knn_graph(base, 10, method="hnsw", M=16, ef_construction=100)
    assert approx.shape == (10000, 10) and approx.dtype == np.int64
    assert not (approx == np.arange(10000)[:, None]).any()
    assert testing.recall_at_k(approx, exact, 10) >= 0.95
    assert (np.diff(dists, axis=1) >= 0).all()


def test_hnsw_recall_on_mnist_slice_cosine(datasets):
    base, _, _, _ = datasets("mnist", n_base=3000, n_queries=1)
    exact, _ = knn_graph(base, 10, space="cosine", method="exact")
    approx, _ = knn_graph(base, 10, space="cosine", method="hnsw", ef_construction=100)
    assert testing.recall_at_k(approx, exact, 10) >= 0.95


def test_hnsw_keeps_duplicate_rows(make_data, twins):
    x = make_data(400, 8)
    x[200:] = x[:200]                                   # every row has an exact twin
    first, zero, self_found = twins(*knn_graph(x, 4, method="hnsw"), 200)
    assert first >= 0.99 and zero >= 0.99 and not self_found


def test_drop_self_by_id_not_by_column():
    labels = np.array([[5, 0, 9], [1, 4, 2], [7, 8, 3]])  # row 0: self in column 1; row 2: absent
    dists = np.array([[0, 0, 2], [0, 1, 1], [1, 2, 3]], dtype=np.float32)
    out, d = kg_module._drop_self(labels, dists, np.array([0, 1, 2]), 2)
    np.testing.assert_array_equal(out, [[5, 9], [2, 4], [7, 8]])  # row 1: tie ordered by id
    np.testing.assert_array_equal(d, [[0, 2], [1, 1], [1, 2]])


def test_include_self_gives_umaps_euclidean_distances(datasets):
    """UMAP's precomputed_knn and pynndescent take euclidean distances; knn_graph's squared l2 ones
    reached UMAP as if they were.  include_self now gives euclidean for l2 unless squared=True."""
    base, _, _, _ = datasets("siftsmall", n_base=800, n_queries=1)
    ids_sq, d_sq = knn_graph(base, 9, method="exact")
    ids, d = knn_graph(base, 10, method="exact", include_self=True)
    np.testing.assert_array_equal(ids[:, 1:], ids_sq)
    np.testing.assert_allclose(d[:, 1:], np.sqrt(d_sq), rtol=1e-6)
    assert (d[:, 0] == 0).all()
    np.testing.assert_allclose(knn_graph(base, 10, method="exact", include_self=True, squared=True)[1][:, 1:], d_sq)
    np.testing.assert_allclose(knn_graph(base, 9, method="exact", squared=False)[1], np.sqrt(d_sq), rtol=1e-6)
    csr = knn_graph(base, 10, method="exact", include_self=True, as_sparse=True)
    np.testing.assert_allclose(np.sort(csr.toarray(), axis=1)[:, -10:].max(1), d[:, -1], rtol=1e-6)
    cos = knn_graph(base, 5, method="exact", space="cosine", include_self=True)   # 1 - cos either way
    np.testing.assert_allclose(cos[1][:, 1:], knn_graph(base, 4, method="exact", space="cosine")[1])
    with pytest.raises(ValueError, match="squared=False applies to space='l2'"):
        knn_graph(base, 3, space="ip", squared=False)
    with pytest.raises(TypeError, match="squared"):
        knn_graph(base, 3, squared="no")


def test_auto_method_and_arguments(make_data, monkeypatch):
    x = make_data(300, 8)
    monkeypatch.setattr(kg_module, "_nndescent_graph", lambda *a, **kw: pytest.fail("approximate for tiny n"))
    auto = knn_graph(x, 5)
    exact = knn_graph(x, 5, method="exact")
    np.testing.assert_array_equal(auto[0], exact[0])
    assert knn_graph(x, 0)[0].shape == (300, 0)
    assert knn_graph(x, 299)[0].shape == (300, 299)
    with pytest.raises(ValueError):
        knn_graph(x, 300)
    with pytest.raises(ValueError, match="method"):
        knn_graph(x, 3, method="annoy")
    with pytest.raises(ValueError):
        knn_graph(np.full((5, 2), np.nan), 1)
    with pytest.raises(RuntimeError, match="Space name"):
        knn_graph(x, 3, space="l1")
    with pytest.raises(TypeError):
        knn_graph(x, 2.5)


def test_progress_bar_uses_tqdm_when_present(make_data, monkeypatch, fake_tqdm):
    updates = fake_tqdm
    monkeypatch.setattr(kg_module, "_TILE", 64)
    x = make_data(200, 4)
    a = knn_graph(x, 3, method="exact", progress=True)
    assert updates[-1] == "closed" and sum(updates[1:-1]) == 10      # 4 row blocks: 10 tile pairs
    updates.clear()
    b = knn_graph(x, 3, method="exact", progress=False)
    assert updates == []
    np.testing.assert_array_equal(a[0], b[0])


def test_progress_without_tqdm_is_silent(make_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)               # import raises ImportError
    knn_graph(make_data(100, 4), 3, method="exact", progress=True)


def test_exact_memory_is_bounded(make_data):
    """No [n, n] matrix: peak extra memory is tiles and pools, far below n * n * 4 bytes."""
    x = make_data(8000, 8)
    tracemalloc.start()
    try:
        knn_graph(x, 10, method="exact")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8000 * 8000 * 4 / 2, peak                           # 128 MB for the full matrix


@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_exact_cuda_path_logic_equals_cpu(fake_cupy, numpy_select_topk, numpy_gemm, datasets, space):
    """The GPU exact graph (fused keys, self excluded in the kernel, ordering on the device) on NumPy
    through the CuPy stand-in: the same graph as the CPU's symmetric tiling, and its phases reported."""
    base, _, _, _ = datasets("mnist" if space == "l2" else "minilm-debian")
    base = np.ascontiguousarray(base[:1500])
    cpu = knn_graph(base, 10, space=space, method="exact", device="cpu")
    ids, dists, info = knn_graph(base, 10, space=space, method="exact", device="cuda", return_info=True)
    np.testing.assert_array_equal(ids, cpu[0])
    np.testing.assert_array_equal(dists, cpu[1])
    assert set(info["phases"]) == {"upload", "tiles", "rerank", "download", "redo"}
    assert info["exact"]["tiling"] == "symmetric" and info["exact"]["precision"] == "fp16"


@pytest.mark.gpu
@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_exact_gpu_equals_cpu(datasets, space):
    base, _, _, _ = datasets("siftsmall")
    cpu = knn_graph(base, 10, space=space, method="exact", device="cpu")
    gpu = knn_graph(base, 10, space=space, method="exact", device="cuda")
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-6, atol=1e-6)
    assert testing.recall_at_k(gpu[0], cpu[0], 10) == 1.0
    assert not (gpu[0] == np.arange(len(base))[:, None]).any()


@pytest.mark.parametrize("module", ["knn_graph", "bruteforce", "exact"])
def test_imports_no_private_names_of_other_modules(module):
    """The exact engine is shared through public names only (issue 9, code layout)."""
    import ast
    import pathlib

    import gpuhnsw

    path = pathlib.Path(gpuhnsw.__file__).parent / f"{module}.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:  # not `from . import _m`
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{module}.py imports {private} from .{node.module}"
