"""Exact search on reduced-precision screening, certified exact: the rules (``gpuhnsw/_screen.py``)
and the GPU engine (``gpuhnsw/device/brute.py``) on the suite's NumPy stand-in for CuPy, with the
screening products emulated (``numpy_gemm``: inputs rounded to fp16, to bf16 through ml_dtypes, to
tf32 by truncation, then multiplied exactly and summed in float32), so the margin rule, the bound
and the certificate run on the keys a GPU would screen with.
"""
import numpy as np
import pytest

from gpuhnsw import BFIndex, _screen, testing
from gpuhnsw._rows import l2_mean, normalize_rows
from gpuhnsw.exact import exact_rows, exact_search
from gpuhnsw.knn_graph import knn_graph

PRECISIONS = _screen.PRECISIONS


@pytest.fixture
def gpu(fake_cupy, numpy_select_topk, numpy_gemm):
    """The GPU engine, run on NumPy."""
    from gpuhnsw.device import brute

    return brute


def far_gaussians(n, dim, offset, seed=3):
    """Unit Gaussians moved ``offset`` from the origin: float32 keys about the origin lose them."""
    rng = np.random.default_rng(seed)
    return (offset + rng.standard_normal((n, dim))).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# the rules

def test_bf16_storage_rounds_to_nearest_even_as_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * 1e3,
                        np.array([1 + 2**-8, 1 + 3 * 2**-8, -1 - 2**-8, 2**-130, 3e38, 0.0, -0.0], np.float32)])
    got = _screen.to_storage(np, x, "bf16")
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(got, want)                      # ties to even included


def test_fp16_storage_scaled_into_range(rng):
    x = (rng.standard_normal((50, 8)) * 3e5).astype(np.float32)  # beyond fp16's 65504 unscaled
    scale = _screen.power_of_two_scale(np.abs(x).max(), "fp16")
    assert np.log2(scale) == round(np.log2(scale)) and np.abs(x).max() * scale < 2**15
    got = _screen.to_storage(np, x, "fp16", scale)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, (x * np.float32(scale)).astype(np.float16))
    assert _screen.power_of_two_scale(0.0, "fp16") == 1.0 and _screen.power_of_two_scale(5.0, "tf32") == 1.0
    assert _screen.power_of_two_scale(1e-38, "fp16") == 2.0**100           # capped: alpha stays normal


def test_margin_rule():
    assert _screen.pool_size(10, 10**6, "fp32") == 18 and _screen.pool_size(10, 10**6, "fp16") == 26
    assert _screen.pool_size(32, 10**6, "fp16") == 48 and _screen.pool_size(32, 10**6, "bf16") == 64
    assert _screen.pool_size(100, 10**6, "tf32") == 150 and _screen.pool_size(10, 12, "bf16") == 12
    with pytest.raises(ValueError, match="precision must be one of"):
        _screen.check_precision("fp8")


def _screened_l2_keys(base, q, precision):
    """(screened keys float32 [nq, n], exact keys float64, |q - mu|, max |b - mu|, scales)."""
    from conftest import _numpy_gemm

    mu = l2_mean(base)
    bc, qc = base - mu, q - mu
    sq = np.einsum("ij,ij->i", bc, bc)
    sb = _screen.power_of_two_scale(np.abs(bc).max(), precision)
    sqs = _screen.power_of_two_scale(np.abs(qc).max(), precision)
    g = np.empty((len(q), len(base)), np.float32)
    _numpy_gemm(_screen.to_storage(np, qc, precision, sqs), _screen.to_storage(np, bc, precision, sb), g,
                precision=precision, alpha=1 / (sb * sqs))
    keys = np.float32(-2) * g + sq
    b64, q64 = base.astype(np.float64) - mu, q.astype(np.float64) - mu
    exact = (b64 ** 2).sum(1)[None, :] - 2 * q64 @ b64.T
    return keys, exact, np.sqrt((q64 ** 2).sum(1)), np.sqrt((b64 ** 2).sum(1)).max(), sqs, sb


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("data", ["siftsmall", "mnist", "far"])
def test_key_error_bound_holds_and_is_not_vacuous(datasets, precision, data):
    """Every screened key lies within E of the exact key, and the largest error is a sizeable part
    of E (the bound is worst-case in the summation, so float32's is looser)."""
    if data == "far":
        x = far_gaussians(3000, 16, 1e4)
        base, q = x[50:], x[:50]
    else:
        base, q, _, _ = datasets(data, n_base=4000, n_queries=60)
    keys, exact, qnorm, radius, sqs, sb = _screened_l2_keys(base, q, precision)
    bound = _screen.key_error_bound(np, precision, "l2", base.shape[1], qnorm, radius, sqs, sb)
    worst = (np.abs(keys - exact).max(axis=1) / bound).max()
    assert worst <= 1.0
    assert worst >= (1e-3 if precision == "fp32" else 0.03), worst


def test_ip_bound_holds(datasets):
    from conftest import _numpy_gemm

    base, q, _, _ = datasets("minilm-debian", n_base=4000, n_queries=60)
    base, q = normalize_rows(base), normalize_rows(q)
    for precision in PRECISIONS:
        sb = _screen.power_of_two_scale(np.abs(base).max(), precision)
        sqs = _screen.power_of_two_scale(np.abs(q).max(), precision)
        g = np.empty((len(q), len(base)), np.float32)
        _numpy_gemm(_screen.to_storage(np, q, precision, sqs), _screen.to_storage(np, base, precision, sb), g,
                    precision=precision, alpha=1 / (sb * sqs))
        exact = -(q.astype(np.float64) @ base.astype(np.float64).T)
        qnorm = np.linalg.norm(q.astype(np.float64), axis=1)
        bound = _screen.key_error_bound(np, precision, "ip", base.shape[1], qnorm,
                                        np.linalg.norm(base.astype(np.float64), axis=1).max(), sqs, sb)
        assert (np.abs(-g - exact).max(axis=1) <= bound).all(), precision


# ------------------------------------------------------------------------------------------------
# the engine

@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name,space", [("siftsmall", "l2"), ("mnist", "l2"), ("minilm-debian", "cosine"),
                                        ("minilm-debian", "ip")])
def test_exact_search_equals_the_cpu_on_shared_data(gpu, datasets, precision, name, space):
    base, q, _, _ = datasets(name, n_base=6000, n_queries=80)
    stats = {}
    got = exact_search(base, q, 32, space, device="cuda", precision=precision, block=32, base_block=2500)
    want = exact_search(base, q, 32, space, device="cpu")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    if space == "cosine":
        base, q = normalize_rows(base), normalize_rows(q)
    exact_rows(base, q, 32, space, device=("cuda", 0), precision=precision, stats=stats)
    assert stats["precision"] == precision and stats["pool"] == _screen.pool_size(32, len(base), precision)
    assert all(rows == 0 for _, rows in stats["redo"][-1:])              # every row certified in the end


@pytest.mark.parametrize("precision", PRECISIONS)
def test_far_from_the_origin(gpu, precision):
    """The screening copy is centred: keys about the origin would rank 16-d Gaussians 10,000 away
    from it by noise."""
    x = far_gaussians(3000, 16, 1e4)
    want = testing.exact_knn(x - x.mean(axis=0), x[:50] - x.mean(axis=0), 10, "l2")[0]
    ids, _ = exact_search(x, x[:50], 10, device="cuda", precision=precision)
    np.testing.assert_array_equal(ids, want)
    ids, _ = knn_graph(x, 10, method="exact", device="cuda")
    cpu, _ = knn_graph(x, 10, method="exact", device="cpu")
    np.testing.assert_array_equal(ids, cpu)


def test_forced_redo_is_exact(gpu, datasets, monkeypatch):
    """A bound too large for any certificate: every row is redone in float32 with pools doubling
    until they hold every row, and the result is still exact (ties by id included)."""
    monkeypatch.setattr(gpu, "key_error_bound", lambda xp, *args: xp.full(len(args[3]), 1e30))
    base, q, _, _ = datasets("siftsmall", n_base=700, n_queries=40)
    stats = {}
    got = exact_rows(base, q, 10, "l2", device=("cuda", 0), stats=stats)
    want = exact_rows(base, q, 10, "l2")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert stats["redone"] == 40
    pools = [pool for pool, _ in stats["redo"]]
    assert pools == [52, 104, 208, 416, 700] and stats["redo"][-1][1] == 0
    self_rows = np.arange(700, dtype=np.int64)
    got = exact_rows(base, base, 10, "l2", self_rows=self_rows, device=("cuda", 0), stats=stats)
    np.testing.assert_array_equal(got[0], exact_rows(base, base, 10, "l2", self_rows=self_rows)[0])


def test_the_certificate_is_what_makes_bf16_exact(gpu, datasets, monkeypatch):
    """bf16 keys with no margin (pool = k) miss true neighbours on minilm-debian, whose cosine
    distances crowd together; the certificate finds those rows and the redo repairs them. Without
    it the same run returns wrong neighbours."""
    monkeypatch.setitem(_screen._MARGIN, "bf16", (0, 10**9))
    base, q, _, _ = datasets("minilm-debian", n_base=5000, n_queries=100)
    base, q = normalize_rows(base), normalize_rows(q)
    want = exact_rows(base, q, 10, "cosine")
    stats = {}
    got = exact_rows(base, q, 10, "cosine", device=("cuda", 0), precision="bf16", stats=stats)
    np.testing.assert_array_equal(got[0], want[0])
    assert stats["pool"] == 10 and stats["redone"] > 0
    monkeypatch.setattr(gpu, "certified", lambda xp, space, kth, *rest: xp.ones(kth.shape, dtype=bool))
    unchecked = exact_rows(base, q, 10, "cosine", device=("cuda", 0), precision="bf16")
    assert (unchecked[0] != want[0]).any()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_symmetric_graph_equals_full_tiling_and_the_cpu(gpu, datasets, precision, space):
    """Tile pairs (i, j >= i) with the columns read transposed for block j: many tiles, a last
    tile of a different size, duplicated rows (their twin at distance 0 first, never themselves)."""
    base, _, _, _ = datasets("mnist" if space == "l2" else "minilm-debian", n_base=700)
    x = np.ascontiguousarray(np.concatenate([base, base[:50]]))
    if space == "cosine":
        x = normalize_rows(x)
    resident = gpu.ResidentBase(x, space, precision)
    stats = {}
    sym = gpu.graph(resident, 12, tile=96, stats=stats)
    full = gpu.graph(resident, 12, tiling="full")
    cpu = knn_graph(x, 12, space="ip" if space == "cosine" else space, method="exact", device="cpu")
    for got in (sym, full):
        np.testing.assert_array_equal(got[0], cpu[0])
        np.testing.assert_allclose(got[1], cpu[1], rtol=1e-6, atol=1e-7)   # float64 sums, other orders
    assert (sym[0][:50, 0] == np.arange(700, 750)).all() and not (sym[0] == np.arange(750)[:, None]).any()
    assert stats["pool"] == _screen.pool_size(12, 749, precision) + 1
    with pytest.raises(ValueError, match="tiling must be one of"):
        gpu.graph(resident, 12, tiling="diagonal")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the stale buffers hold garbage
def test_results_read_before_their_copy_lands_are_stale(gpu, datasets, monkeypatch):
    """The stand-in is strict enough to catch a download read before its event: without the wait,
    the pinned buffers still hold the previous block (or nothing)."""
    base, q, _, _ = datasets("siftsmall", n_base=2000, n_queries=100)
    want = exact_rows(base, q, 5, "l2")

    def land_without_waiting(self, slot):
        if slot["event"] is not None:
            self.ids[slot["rows"]] = slot["ids"][:slot["m"]]
            self.dists[slot["rows"]] = slot["dists"][:slot["m"]]
            slot["event"] = None

    got = exact_rows(base, q, 5, "l2", device=("cuda", 0), block=16)
    np.testing.assert_array_equal(got[0], want[0])
    monkeypatch.setattr(gpu._Download, "_land", land_without_waiting)
    got = exact_rows(base, q, 5, "l2", device=("cuda", 0), block=16)
    assert (got[0] != want[0]).any()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the stale buffers hold garbage
def test_query_blocks_used_before_their_upload_lands_are_stale(gpu, fake_cupy, datasets, monkeypatch):
    """Host query blocks go up on a second stream into two device buffers; without the compute
    stream's wait for the copy, a block is screened from what the buffer held before."""
    base, q, _, _ = datasets("siftsmall", n_base=2000, n_queries=100)
    want = exact_rows(base, q, 5, "l2")
    resident = gpu.ResidentBase(base, "l2", "fp16")
    np.testing.assert_array_equal(gpu.search(resident, q, 5, block=16)[0], want[0])
    monkeypatch.setattr(fake_cupy.cuda.Stream, "wait_event", lambda self, event: None)
    assert (gpu.search(resident, q, 5, block=16)[0] != want[0]).any()


def test_phases_stats_and_progress(gpu, datasets):
    base, q, _, _ = datasets("siftsmall", n_base=3000, n_queries=100)
    phases, stats, seen = {}, {}, []
    exact_rows(base, q, 10, "l2", device=("cuda", 0), block=16, phases=phases, stats=stats, progress=seen.append)
    assert set(phases) == set(gpu.PHASES) and all(v >= 0 for v in phases.values())
    assert set(stats) == {"precision", "pool", "redone", "redo"}
    assert seen == sorted(seen) and seen[-1] == 100 and len(seen) >= 100 // 16
    with pytest.raises(ValueError, match="precision must be one of"):
        exact_search(base, q, 10, device="cuda", precision="int8")


def test_out_of_device_memory_is_a_device_error(gpu, fake_cupy, monkeypatch):
    from gpuhnsw import DeviceError

    def full(*args, **kwargs):
        raise fake_cupy.cuda.memory.OutOfMemoryError("out of memory allocating 512 MB")

    x = far_gaussians(300, 8, 0.0)
    monkeypatch.setattr(fake_cupy, "empty", full)
    with pytest.raises(DeviceError, match="GPU out of memory keeping 300 x 8 rows"):
        exact_search(x, x[:5], 3, device="cuda")
    with pytest.raises(DeviceError, match="GPU out of memory"):
        knn_graph(x, 3, method="exact", device="cuda")


def test_bfindex_keeps_its_upload(gpu, datasets, monkeypatch):
    """BFIndex uploads its rows once and queries them until a mutation drops the copy."""
    base, q, _, _ = datasets("siftsmall", n_base=1000, n_queries=20)
    made = []
    real = gpu.ResidentBase.__init__

    def counted(self, *args, **kwargs):
        made.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(gpu.ResidentBase, "__init__", counted)
    index = BFIndex("l2", base.shape[1], device="cpu")
    index._device = ("cuda", 0)                  # as if a GPU had been found
    index.init_index(1100)
    index.add_items(base)
    for _ in range(3):
        labels, _ = index.knn_query(q, k=5)
    assert len(made) == 1
    np.testing.assert_array_equal(labels, exact_rows(base, q, 5, "l2")[0])
    index.add_items(q[:3] + 1.0, [5000, 5001, 5002])
    index.knn_query(q, k=5)
    assert len(made) == 2


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CuPy and a device): the real cuBLAS products and kernels

@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_every_precision_equals_the_cpu(datasets, precision):
    base, q, _, _ = datasets("siftsmall")
    stats = {}
    got = exact_rows(base, q, 32, "l2", device=("cuda", 0), precision=precision, stats=stats)
    want = exact_rows(base, q, 32, "l2")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    x = far_gaussians(5000, 16, 1e4)
    np.testing.assert_array_equal(exact_rows(x, x[:100], 10, "l2", device=("cuda", 0), precision=precision)[0],
                                  exact_rows(x, x[:100], 10, "l2")[0])


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", ["symmetric", "full"])
def test_gpu_graph_tilings_equal_the_cpu(datasets, tiling):
    from gpuhnsw.device import brute

    base, _, _, _ = datasets("mnist", n_base=6000)
    resident = brute.ResidentBase(np.ascontiguousarray(base), "l2", "fp16")
    got = brute.graph(resident, 16, tiling=tiling, tile=1000)
    want = knn_graph(base, 16, method="exact", device="cpu")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
