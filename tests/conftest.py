"""Shared fixtures: the gpu skip, seeded random data, the shipped datasets, hnswlib, index snapshots,
the NumPy stand-in for CuPy (the only one of the suite), a tqdm recorder.

Markers ``gpu`` and ``slow`` are declared in pyproject.toml (``--strict-markers``).
"""
import functools
import importlib.metadata
import os
import threading
import types

import numpy as np
import pytest

from gpuhnsw import testing

# Under the CI's AddressSanitizer step (libasan preloaded), the processes the tests spawn (fresh
# processes that measure their memory, or that must finish within a timeout) run without
# LeakSanitizer: its stop-the-world tracer intermittently crashes at their exit ("Tracer caught
# signal 11", google/sanitizers#1353) after their work has passed.  ASan and UBSan still check
# them, and this pytest process, whose options were read at its start, still checks for leaks.
if "libasan" in os.environ.get("LD_PRELOAD", ""):
    os.environ["ASAN_OPTIONS"] = ":".join(
        [o for o in os.environ.get("ASAN_OPTIONS", "").split(":") if o and not o.startswith("detect_leaks=")]
        + ["detect_leaks=0"])

SEED = 20240611


@functools.lru_cache(maxsize=None)
def _gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return False


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _gpu_available():
        skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh numpy Generator with the suite's fixed seed."""
    return np.random.default_rng(SEED)


def clustered(n, dim, *, n_clusters=32, spread=0.15, seed=SEED):
    return testing.clustered(n, dim, n_clusters=n_clusters, spread=spread, seed=seed)


@pytest.fixture(scope="session")
def make_data():
    """``make_data(n, dim, *, n_clusters=32, spread=0.15, seed=SEED)`` -> clustered float32 [n, dim]."""
    return clustered


def _unavailable(reason):
    """Skip a test whose prerequisite (shared data, hnswlib) is missing; in CI (``CI`` set) fail
    instead, since there a skip would silently drop the tests that matter."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must have it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def dataset_folder():
    """``dataset_folder(name)`` -> the dataset's folder (``GHNSW_DATA`` or ../shared/data).

    Skips the calling test when the folder holds no ``base.npy`` (fails in CI).
    """

    def folder(name):
        path = testing.data_dir() / name
        if not (path / "base.npy").exists():
            _unavailable(f"dataset {name!r} not found under {testing.data_dir()} (set GHNSW_DATA)")
        return path

    return folder


@pytest.fixture(scope="session")
def datasets(dataset_folder):
    """``datasets(name, n_base=None, n_queries=None)`` -> ``testing.load_dataset(...)``, cached.

    Skips the calling test when the dataset is missing (fails in CI, see ``dataset_folder``).
    Returned arrays are shared between tests: do not modify them in place.
    """

    @functools.lru_cache(maxsize=None)
    def load(name, n_base=None, n_queries=None):
        dataset_folder(name)
        arrays = testing.load_dataset(name, n_base=n_base, n_queries=n_queries)
        for a in arrays:
            if a is not None:
                a.setflags(write=False)
        return arrays

    return load


@pytest.fixture(scope="session")
def hnswlib():
    """The reference implementation, hnswlib 0.8.0 (skips when it is not installed; fails in CI).

    ``GHNSW_HIDE_HNSWLIB=1`` skips on purpose: .ci/run's sanitizer step runs without hnswlib, whose
    C++ aborts under AddressSanitizer.
    """
    if os.environ.get("GHNSW_HIDE_HNSWLIB") == "1":
        pytest.skip("hnswlib hidden on purpose (GHNSW_HIDE_HNSWLIB=1)")
    try:
        import hnswlib as module
    except ImportError:
        _unavailable("hnswlib is not installed (the test extra pulls 0.8.0)")
    version = importlib.metadata.version("hnswlib")
    if version != "0.8.0":
        _unavailable(f"the compatibility tests describe hnswlib 0.8.0, found {version}")
    return module


@pytest.fixture(scope="session")
def dataset_index(datasets):
    """``dataset_index(name, space, *, n_base=None, n_queries=None, M, ef_construction, seed)`` ->
    (gpuhnsw.Index built on 2 threads over the dataset's base, base, queries)."""

    def build(name, space, *, n_base=None, n_queries=None, M, ef_construction, seed):
        base, queries, _, _ = datasets(name, n_base=n_base, n_queries=n_queries)
        import gpuhnsw

        index = gpuhnsw.Index(space, base.shape[1])
        index.init_index(len(base), M=M, ef_construction=ef_construction, random_seed=seed)
        index.add_items(base, num_threads=2)
        return index, base, queries

    return build


@pytest.fixture(scope="module")
def sift_index(dataset_index):
    """siftsmall, l2, M=12: the NumPy references against the C search (test_reference*.py)."""
    return dataset_index("siftsmall", "l2", M=12, ef_construction=80, seed=7)


@pytest.fixture(scope="module")
def minilm_index(dataset_index):
    """4,000 rows of minilm-debian, cosine, M=8: the same tests on float data."""
    return dataset_index("minilm-debian", "cosine", n_base=4000, n_queries=150, M=8, ef_construction=60, seed=7)


def run_threads(*targets, meanwhile=None):
    """Run the callables in threads; re-raise the first exception any of them raised.  With
    ``meanwhile``: call it over and over in this thread while the first target runs, and return
    its results."""
    errors, results = [], []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported to the test below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    while meanwhile is not None and threads[0].is_alive():
        results.append(meanwhile())
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def twins_found(neighbors, distances, half):
    """Rows ``i`` and ``i + half`` are exact twins: the share of rows whose first neighbour is the
    twin, the share at distance 0 there, and whether any row is its own neighbour."""
    twin = np.r_[np.arange(half, 2 * half), np.arange(half)]
    return ((neighbors[:, 0] == twin).mean(), (distances[:, 0] == 0).mean(),
            bool((neighbors == np.arange(2 * half)[:, None]).any()))


def snapshot(index, queries, k=5):
    """Everything a rejected call must leave as it was, as a comparable tuple.

    Works for hnswlib and gpuhnsw indexes (hnswlib-only API, plus ``len`` where present).
    ``k`` must not exceed the number of live elements.
    """
    labels, dists = index.knn_query(queries, k=k)
    return (
        index.element_count,
        index.get_current_count(),
        index.max_elements,
        index.ef,
        len(index) if hasattr(type(index), "__len__") else None,
        tuple(sorted(index.get_ids_list())),
        labels.tobytes(),
        dists.tobytes(),
    )


@pytest.fixture(scope="session")
def twins():
    """:func:`twins_found`."""
    return twins_found


@pytest.fixture(scope="session")
def index_snapshot():
    """``index_snapshot(index, queries, k=5)`` -> tuple; equal before and after a rejected call."""
    return snapshot


def _numpy_topk(grid, block, args, shared_mem=0):
    """select_topk_kernel (kernels/topk.cu) in NumPy, same arguments: the k smallest keys
    (scale * tile + bias, the excluded column's key replaced) of each tile row, NaN as inf, ties by
    the smaller index, merged with the running result when one is passed."""
    tile, row_stride, col_stride, n, offset, scale, bias, exclude, exclude_key, prev_d, prev_i, nq, k, out_d, out_i = args
    n, nq, k = int(n), int(nq), int(k)
    none = np.iinfo(np.int64).max
    tile = np.asarray(tile)                  # as the kernel reads it: entry (i, c) at i * rs + c * cs floats
    d = np.lib.stride_tricks.as_strided(tile, shape=(nq, n), strides=(4 * int(row_stride), 4 * int(col_stride)))
    d = d.astype(np.float32)
    d = d * np.float32(scale)                # exact for the scales used (+-1, -2): fmaf's rounding
    if not isinstance(bias, np.integer):     # a null pointer is np.uint64(0)
        d = d + np.asarray(bias, dtype=np.float32)[:n]
    idx = np.broadcast_to(int(offset) + np.arange(n, dtype=np.int64), d.shape)
    if not isinstance(exclude, np.integer):
        d = np.where(idx == np.asarray(exclude)[:, None], np.float32(exclude_key), d)
    d = np.where(np.isnan(d), np.inf, d)
    if not isinstance(prev_d, np.integer):
        keep = np.asarray(prev_i) >= 0
        d = np.concatenate([np.where(keep, prev_d, np.inf), d], axis=1)
        idx = np.concatenate([np.where(keep, prev_i, none), idx], axis=1)
    order = np.lexsort((idx, d), axis=1)[:, :k]
    got_d, got_i = np.take_along_axis(d, order, axis=1), np.take_along_axis(idx, order, axis=1)
    m = got_d.shape[1]
    out_d[:, :m], out_i[:, :m] = got_d, np.where(got_i == none, -1, got_i)
    out_d[:, m:], out_i[:, m:] = np.inf, -1


@pytest.fixture
def numpy_select_topk(monkeypatch):
    """The loader hands out a NumPy ``select_topk_kernel`` (for device paths run on NumPy)."""
    from gpuhnsw.device import kernels

    monkeypatch.setattr(kernels, "get_kernel", lambda name, instance, device=None: _numpy_topk)


# ---------------------------------------------------------------------------------------------
# the one NumPy stand-in for CuPy: ``fake_cupy`` puts it in sys.modules["cupy"], where
# gpuhnsw.device.arrays (the one place that imports CuPy) finds it

#: What the host did through the stand-in since the fixture began: ``syncs`` (waits for the device:
#: event, stream or device synchronize, a read of device memory into host memory, the truth value
#: of a device array) and ``allocs`` (device arrays made, pinned buffers).
COUNTS = {"syncs": 0, "allocs": 0}


def _counted(kind, fn):
    def call(*args, **kwargs):
        COUNTS[kind] += 1
        return fn(*args, **kwargs)
    return call


class _Stream:
    """The stand-in's one queue of device work: uploads (``ndarray.set``), asynchronous downloads
    (``ndarray.get(blocking=False)``), queued kernels and event marks run in order only when an
    event is synchronized or waited for, or the host touches device memory, as on a GPU. An upload
    reads its host buffer when it runs, so a host buffer rewritten too early corrupts it; a download
    writes its host buffer when it runs, so one read too early is stale. Every ``cuda.Stream`` shares
    this queue (in order): a wait missing between two streams is not caught here, but ``waits``
    lists the events waited for."""

    ptr = 0

    def __init__(self):
        self.queue = []
        self.waits = []
        self.keep = []   # arrays made while work is queued: freed memory is reused in stream order, as in
                         # CuPy's pool, so a queued kernel may still write an array its launcher dropped

    def run(self, until=None):
        ran = False
        while self.queue and (until is None or not until.done):
            self.queue.pop(0)()
            ran = True
        if ran and not self.queue:   # every launch made so far has run
            self.keep.clear()

    def wait_event(self, event):   # the device waits, not the host: not a sync
        self.waits.append(event)
        self.run(until=event)

    def synchronize(self):
        COUNTS["syncs"] += 1
        self.run()


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


class DeviceArray(np.ndarray):
    """A host array that says it lives on a GPU (``__cuda_array_interface__``, ``data.ptr``), whose
    uploads run on the stand-in's stream."""

    stream = _Stream()

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "version": 3}

    @property
    def data(self):
        return _Pointer(self.__array_interface__["data"][0])

    def set(self, a, stream=None):
        DeviceArray.stream.queue.append(lambda: self.__setitem__(Ellipsis, a))

    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is None:
            return NumpyCupy.asnumpy(self)
        if blocking:
            COUNTS["syncs"] += 1
            DeviceArray.stream.run()
            out[...] = self
        else:
            DeviceArray.stream.queue.append(lambda: out.__setitem__(Ellipsis, self))
        return out

    def fill(self, value):   # a device operation: after what is queued
        DeviceArray.stream.run()
        super().fill(value)

    def __bool__(self):      # the host reads a device value
        COUNTS["syncs"] += 1
        DeviceArray.stream.run()
        return bool(np.asarray(self))

    def copy(self, order="C"):
        COUNTS["allocs"] += 1
        return super().copy(order)

    def astype(self, dtype, *args, **kwargs):
        COUNTS["allocs"] += 1
        return super().astype(dtype, *args, **kwargs)


def _device(a):
    return a.view(DeviceArray) if isinstance(a, np.ndarray) else a


def _made(a):
    """A new device array, kept alive until the work queued so far has run."""
    DeviceArray.stream.keep.append(a)
    return a


def _synced(fn):
    """``fn`` once the queued device work has run (the host waits before it allocates or reads)."""
    def call(*args, **kwargs):
        DeviceArray.stream.run()
        return fn(*args, **kwargs)
    return call


class _Event:
    def __init__(self, disable_timing=False):
        self.done = False

    def record(self, stream=None):
        self.done = False
        DeviceArray.stream.queue.append(lambda: setattr(self, "done", True))

    def synchronize(self):
        COUNTS["syncs"] += 1
        DeviceArray.stream.run(until=self)


class _CudaStream:
    """``cupy.cuda.Stream`` on the one queue: a context that makes it current, event marks, and
    ``wait_event``, which runs the queue up to the event (what follows on this stream, run eagerly
    by NumPy, then sees what the event covers)."""

    current = None
    ptr = 0

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self._outer = []

    def __enter__(self):
        self._outer.append(_CudaStream.current)
        _CudaStream.current = self
        return self

    def __exit__(self, *exc):
        _CudaStream.current = self._outer.pop()
        return False

    def use(self):
        _CudaStream.current = self
        return self

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event):
        DeviceArray.stream.wait_event(event)

    def synchronize(self):
        DeviceArray.stream.synchronize()


def _current_stream():
    if _CudaStream.current is None:
        _CudaStream.current = _CudaStream(null=True)
    return _CudaStream.current


class _Device:
    def __init__(self, ordinal=None):
        self.id = ordinal or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        COUNTS["syncs"] += 1
        DeviceArray.stream.run()


class NumpyCupy(types.ModuleType):
    """The parts of CuPy that gpuhnsw uses, on NumPy: arrays made here are :class:`DeviceArray`,
    every other attribute is NumPy's (its functions, not its ufuncs, called once the queued device work
    has run)."""

    class cuda:
        Device = _Device
        Event = _Event
        Stream = _CudaStream
        get_current_stream = staticmethod(_current_stream)
        alloc_pinned_memory = staticmethod(_counted("allocs", bytearray))

        @staticmethod
        def get_elapsed_time(start, end):
            return 0.0

        class memory:
            class OutOfMemoryError(MemoryError):
                pass

        class driver:
            class CUDADriverError(RuntimeError):
                pass

        class runtime:
            class CUDARuntimeError(RuntimeError):
                pass

            @staticmethod
            def getDeviceCount():
                return 1

            @staticmethod
            def getDeviceProperties(ordinal):
                return {"name": b"NumPy stand-in", "multiProcessorCount": 132}

        class compiler:
            class CompileException(Exception):
                pass

    ndarray = DeviceArray

    def __init__(self):
        super().__init__("cupy")

    def __getattr__(self, name):
        attr = getattr(np, name)
        return _synced(attr) if callable(attr) and not isinstance(attr, (type, np.ufunc)) else attr

    @staticmethod
    @_synced
    def asarray(a, dtype=None):
        if isinstance(a, DeviceArray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a                                            # already on the device, as CuPy
        COUNTS["allocs"] += 1
        return _made(np.array(a, dtype=dtype).view(DeviceArray))   # a copy, like a transfer

    @staticmethod
    @_synced
    def asnumpy(a):
        COUNTS["syncs"] += 1
        return np.array(a).view(np.ndarray)

    @staticmethod
    def from_dlpack(x):
        return NumpyCupy.asarray(np.from_dlpack(x))

    empty = staticmethod(_counted("allocs", _synced(lambda *a, **k: _made(np.empty(*a, **k).view(DeviceArray)))))
    zeros = staticmethod(_counted("allocs", _synced(lambda *a, **k: _made(np.zeros(*a, **k).view(DeviceArray)))))
    full = staticmethod(_counted("allocs", _synced(lambda *a, **k: _made(np.full(*a, **k).view(DeviceArray)))))
    arange = staticmethod(_counted("allocs", _synced(lambda *a, **k: _made(np.arange(*a, **k).view(DeviceArray)))))

    @staticmethod
    @_synced
    def ascontiguousarray(a, dtype=None):
        out = _device(np.ascontiguousarray(a, dtype=dtype))
        if not np.shares_memory(out, a):
            COUNTS["allocs"] += 1
            _made(out)
        return out


@pytest.fixture
def fake_cupy(monkeypatch):
    """A NumPy stand-in for the ``cupy`` module, in ``sys.modules`` (GPU code paths run on the CPU;
    ``device="cuda"`` resolves to it); ``conftest.COUNTS`` counts the host's syncs and allocations."""
    import sys

    from gpuhnsw.device import arrays

    cp = NumpyCupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    arrays.cuda_status.cache_clear()
    COUNTS.update(syncs=0, allocs=0)
    yield cp
    arrays.cuda_status.cache_clear()
    DeviceArray.stream.queue.clear()
    DeviceArray.stream.waits.clear()
    DeviceArray.stream.keep.clear()
    _CudaStream.current = None


_HALF = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _numpy_gemm(a, b, out, *, precision, alpha):
    """``device.launch.gemm`` (cuBLAS) in NumPy, same arguments: the inputs are decoded from their
    screening storage as the tensor cores read them (fp16 through a table of all 65536 values; bf16
    bit patterns widened to float32, whose rounding test_screening checks against ml_dtypes; tf32
    truncated to 10 mantissa bits, the worst case the bound allows for; fp32 as it is), multiplied
    exactly and summed in float32."""
    def decode(x):
        x = np.asarray(x)
        if precision == "fp16":
            return _HALF[x.view(np.uint16)]
        if precision == "bf16":
            return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
        if precision == "tf32":
            return (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
        return x.astype(np.float32)

    product = np.matmul(decode(a), np.swapaxes(decode(b), -1, -2))
    product *= np.float32(alpha)
    out[..., :product.shape[-1]] = product


@pytest.fixture
def numpy_gemm(monkeypatch):
    """``device.launch.gemm`` (the screening products on cuBLAS) runs in NumPy."""
    from gpuhnsw.device import launch

    monkeypatch.setattr(launch, "gemm", _numpy_gemm)


@pytest.fixture
def fake_tqdm(monkeypatch):
    """Replaces tqdm with a recorder; returns the list of events: ("total", n), each update's
    count, and "closed"."""
    import sys
    import types

    events = []

    class FakeBar:
        def __init__(self, total, **kw):
            events.append(("total", total))

        def update(self, n):
            events.append(n)

        def close(self):
            events.append("closed")

    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = FakeBar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    return events
