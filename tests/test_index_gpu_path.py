"""Index's GPU query path (device="cuda") on the suite's NumPy stand-in for CuPy, without a GPU.

The device search is replaced by the NumPy reference of the kernel (gpuhnsw._reference), so what is
checked is the query path's own plumbing: device selection, input conversion and validation, the
lazy sync, filters as device bitsets, rows flagged by the kernel's status re-run on the CPU, pad,
and the output types (NumPy in -> NumPy out, GPU array in -> GPU array out).  The real kernel runs
in the gpu-marked tests.
"""
import numpy as np
import pytest

import gpuhnsw
from gpuhnsw._reference import beam_search_reference
from gpuhnsw._surface import NO_LABEL
from gpuhnsw.device import arrays
from gpuhnsw.device.mirror import DeviceMirror


@pytest.fixture
def fake_cuda(monkeypatch, fake_cupy):
    """device="cuda" resolves; DeviceMirror.sync counts calls; DeviceMirror.search is the reference.

    ``calls["status_rows"]`` lists query rows whose kernel status is forced non-zero;
    ``calls["miss_rows"]`` rows whose search loses its last two results (status zero), as a graph
    search does where a filter cuts the graph apart."""
    cp = fake_cupy
    calls = {"sync": 0, "search": 0, "status_rows": [], "miss_rows": []}

    def sync(self):
        calls["sync"] += 1

    def search(self, queries, k, beam, *, search_width=1, filter_bits=None, filter_stride=0, **kw):
        calls["search"] += 1
        calls["filter_stride"] = filter_stride
        assert arrays.is_gpu_array(queries) and queries.dtype == np.float32
        state = self.core.export_state()

        def mask(words):  # uint32 bitset -> bool [count]
            return np.unpackbits(np.asarray(words).view(np.uint8), bitorder="little")[:state["count"]].astype(bool)

        if filter_stride:  # one bitset row per query: the kernel reads row qi for query qi
            rows = np.asarray(filter_bits).reshape(len(queries), filter_stride)
            parts = [beam_search_reference(state, np.asarray(queries)[i:i + 1], k, beam, search_width=search_width,
                                           allowed=mask(rows[i])) for i in range(len(queries))]
            slots, dists, found = (np.concatenate([p[j] for p in parts]) for j in range(3))
        else:
            slots, dists, found = beam_search_reference(
                state, np.asarray(queries), k, beam, search_width=search_width,
                allowed=None if filter_bits is None else mask(filter_bits))
        labels = np.frombuffer(state["labels"], np.uint64)
        out = np.where(slots >= 0, labels[np.maximum(slots, 0)], NO_LABEL).astype(np.uint64)
        status = np.zeros(len(found), np.int32)
        status[calls["status_rows"]] = 1
        if calls["status_rows"]:  # what a kernel that gave up on those rows would hand back
            out[calls["status_rows"]] = NO_LABEL
            found = found.copy()
            found[calls["status_rows"]] = 0
        for row in calls["miss_rows"]:
            found = found.copy()
            found[row] = max(0, found[row] - 2)
            out[row, found[row]:], dists[row, found[row]:] = NO_LABEL, np.inf
        return cp.asarray(out), cp.asarray(dists), cp.asarray(np.stack([found.astype(np.int32), status]))

    monkeypatch.setattr(DeviceMirror, "sync", sync)
    monkeypatch.setattr(DeviceMirror, "search", search)
    return calls


@pytest.fixture
def pair(make_data):
    """The same data in a CPU index and a (fake) GPU index built identically on one thread."""
    data = make_data(1500, 24, seed=11)
    out = []
    for device in ("cpu", "cuda"):
        ix = gpuhnsw.Index("l2", 24, device=device)
        ix.init_index(2000, M=8, ef_construction=64)
        ix.add_items(data[:1400], num_threads=1)
        out.append(ix)
    return out[0], out[1], data


def test_numpy_in_numpy_out_and_same_answers_as_cpu(fake_cuda, pair):
    cpu, gpu, data = pair
    assert gpu.device == "cuda"
    q = data[1400:]
    got = gpu.knn_query(q, k=10, ef=40)
    want = cpu.knn_query(q, k=10, ef=40)
    assert type(got[0]) is np.ndarray and got[0].dtype == np.uint64 and got[1].dtype == np.float32
    assert fake_cuda["sync"] == 1 and fake_cuda["search"] == 1
    assert np.mean(got[0] == want[0]) > 0.99
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)


def test_gpu_array_in_gpu_array_out(fake_cuda, fake_cupy, pair):
    _, gpu, data = pair
    q = data[1400:1410].view(fake_cupy.ndarray)
    labels, dists = gpu.knn_query(q, k=5)
    assert isinstance(labels, fake_cupy.ndarray) and isinstance(dists, fake_cupy.ndarray)
    assert labels.shape == (10, 5)


def test_gpu_input_validated_on_device(fake_cuda, fake_cupy, pair):
    _, gpu, data = pair
    with pytest.raises(gpuhnsw.InputShapeError):
        gpu.knn_query(data[:3, :20].copy().view(fake_cupy.ndarray), k=2)
    bad = data[:3].copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gpu.knn_query(bad.view(fake_cupy.ndarray), k=2)
    assert fake_cuda["search"] == 0


def test_label_filter_becomes_device_bitset(fake_cuda, pair):
    cpu, gpu, data = pair
    allowed = np.arange(0, 1400, 7)
    got = gpu.knn_query(data[1400:], k=5, ef=40, filter=allowed, filter_mode="graph")
    assert np.isin(got[0], allowed).all()
    want = cpu.knn_query(data[1400:], k=5, ef=40, filter=allowed, filter_mode="graph")
    assert np.mean(got[0] == want[0]) > 0.9


def test_per_query_filters_become_device_bitset_rows(fake_cuda, pair):
    cpu, gpu, data = pair
    sets = [np.arange(r % 5, 1400, 5 + r % 3) for r in range(len(data) - 1400)]
    got = gpu.knn_query(data[1400:], k=5, ef=40, filter=sets, filter_mode="graph")
    assert fake_cuda["filter_stride"] > 0
    for row, allowed in enumerate(sets):
        assert np.isin(got[0][row], allowed).all()
    want = cpu.knn_query(data[1400:], k=5, ef=40, filter=sets, filter_mode="graph")
    assert np.mean(got[0] == want[0]) > 0.9
    fake_cuda["status_rows"] = [1, 3]  # rows the kernel gives up on are answered by C with their own sets
    again = gpu.knn_query(data[1400:], k=5, ef=40, filter=sets, filter_mode="graph")
    for row in (1, 3):
        np.testing.assert_array_equal(again[0][row], want[0][row])


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("gpu_input", [False, True])
def test_filtered_rows_the_graph_search_missed_are_redone_exactly(fake_cuda, fake_cupy, pair, numpy_select_topk, numpy_gemm,
                                                                  per_query, gpu_input):
    cpu, gpu, data = pair      # the exact leg runs the exact engine's GPU path, on the stand-in
    q = data[1400:1420]
    sets = [np.arange(r % 4, 1400, 9) for r in range(len(q))] if per_query else np.arange(0, 1400, 9)
    fake_cuda["miss_rows"] = [3, 11]
    got = gpu.knn_query(q.view(fake_cupy.ndarray) if gpu_input else q, k=6, ef=40, filter=sets, filter_mode="graph")
    assert isinstance(got[0], fake_cupy.ndarray) == gpu_input
    exact = cpu.knn_query(q, k=6, filter=sets, filter_mode="exact")
    np.testing.assert_array_equal(np.asarray(got[0])[[3, 11]], exact[0][[3, 11]])
    np.testing.assert_allclose(np.asarray(got[1])[[3, 11]], exact[1][[3, 11]], rtol=1e-5)
    graph = cpu.knn_query(q, k=6, ef=40, filter=sets, filter_mode="graph")  # the rows the kernel found
    others = np.setdiff1d(np.arange(len(q)), [3, 11])
    assert np.mean(np.asarray(got[0])[others] == graph[0][others]) > 0.9


def test_per_query_filters_in_chunks_keep_gpu_output(fake_cuda, fake_cupy, pair, monkeypatch):
    from gpuhnsw.search import filters

    _, gpu, data = pair
    q = data[1400:1420].view(fake_cupy.ndarray)
    sets = [np.arange(r % 5, 1400, 5 + r % 3) for r in range(len(q))]
    want = gpu.knn_query(q, k=5, ef=40, filter=sets, filter_mode="graph")
    monkeypatch.setattr(filters, "BITSET_CHUNK_BYTES", 4 * 4 * ((gpu.max_elements + 31) // 32))  # 4 rows
    searches = fake_cuda["search"]
    got = gpu.knn_query(q, k=5, ef=40, filter=sets, filter_mode="graph")
    assert fake_cuda["search"] - searches == 5
    assert isinstance(got[0], fake_cupy.ndarray) and isinstance(got[1], fake_cupy.ndarray)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_callable_filter_runs_on_cpu(fake_cuda, pair):
    _, gpu, data = pair
    labels, _ = gpu.knn_query(data[1400:1405], k=3, filter=lambda label: label % 2 == 0)
    assert fake_cuda["search"] == 0 and (labels % 2 == 0).all()


def test_rows_flagged_by_status_are_answered_on_cpu(fake_cuda, pair):
    cpu, gpu, data = pair
    fake_cuda["status_rows"] = [2, 5]
    got = gpu.knn_query(data[1400:1410], k=10, ef=40)
    want = cpu.knn_query(data[1400:1410], k=10, ef=40)
    np.testing.assert_array_equal(got[0][[2, 5]], want[0][[2, 5]])


def test_pad_and_not_enough(fake_cuda, make_data):
    data = make_data(20, 8, seed=3)
    gpu = gpuhnsw.Index("l2", 8, device="cuda")
    gpu.init_index(20)
    gpu.add_items(data[:4])
    with pytest.raises(RuntimeError, match="contiguous"):
        gpu.knn_query(data[5:7], k=6)
    labels, dists = gpu.knn_query(data[5:7], k=6, pad=True)
    assert (labels[:, 4:] == NO_LABEL).all() and np.isinf(dists[:, 4:]).all()


def test_beam_beyond_kernel_capacity_falls_back_to_cpu(fake_cuda, pair):
    from gpuhnsw.device.kernels import SEARCH_CAPACITIES
    _, gpu, data = pair
    gpu.knn_query(data[1400:1402], k=3, ef=SEARCH_CAPACITIES[-1] + 1)
    assert fake_cuda["search"] == 0


def test_sync_is_explicit_too(fake_cuda, pair):
    cpu, gpu, _ = pair
    gpu.sync()
    assert fake_cuda["sync"] == 1
    assert cpu.sync() is None


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    from gpuhnsw import _validate

    monkeypatch.setattr(_validate, "cuda_status", lambda: (0, "CuPy cannot be imported"))
    with pytest.raises(gpuhnsw.DeviceError, match="no GPU"):
        gpuhnsw.Index("l2", 4, device="cuda")
    assert gpuhnsw.Index("l2", 4, device="auto").device == "cpu"


@pytest.mark.parametrize("failure", ["CUDADriverError", "OutOfMemoryError", "rejected"])
def test_device_failure_is_a_device_error_and_loses_nothing(fake_cuda, fake_cupy, pair, monkeypatch, failure):
    cpu, gpu, data = pair
    cp = fake_cupy

    def broken(self, queries, k, beam, **kw):
        if failure == "rejected":  # the kernel's own report of a launch it cannot run: found = -1
            nq = len(queries)
            return (cp.empty((nq, k), dtype=np.uint64), cp.empty((nq, k), dtype=np.float32),
                    cp.asarray(np.full((2, nq), -1, np.int32)))
        errors = {"CUDADriverError": cp.cuda.driver.CUDADriverError, "OutOfMemoryError": cp.cuda.memory.OutOfMemoryError}
        raise errors[failure]("CUDA_ERROR_INVALID_VALUE: invalid argument")

    first = gpu.knn_query(data[1400:1420], k=5, ef=40)[0]
    assert gpu._gpu.mirror is not None
    with monkeypatch.context() as m:
        m.setattr(DeviceMirror, "search", broken)
        with pytest.raises(gpuhnsw.DeviceError) as info:
            gpu.knn_query(data[1400:1420], k=5, ef=40)
    assert "intact" in str(info.value) or "rejected" in str(info.value)
    if failure != "rejected":
        assert gpu._gpu.mirror is None                  # dropped, rebuilt at the next call
    assert gpu.get_current_count() == 1400 and gpu.check_integrity()["n_live"] == 1400
    np.testing.assert_array_equal(gpu.knn_query(data[1400:1420], k=5, ef=40)[0], first)


def test_search_width_checked(fake_cuda, pair):
    _, gpu, data = pair
    with pytest.raises(ValueError, match="search_width"):
        gpu.knn_query(data[:2], k=2, search_width=33)
    with pytest.raises(TypeError, match="search_width"):
        gpu.knn_query(data[:2], k=2, search_width=0)
