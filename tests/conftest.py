"""Shared fixtures: the gpu skip, seeded random data, the shipped datasets, hnswlib, index snapshots,
a NumPy stand-in for CuPy, a tqdm recorder.

Markers ``gpu`` and ``slow`` are declared in pyproject.toml (``--strict-markers``).
"""
import functools
import importlib.metadata
import os

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
def index_snapshot():
    """``index_snapshot(index, queries, k=5)`` -> tuple; equal before and after a rejected call."""
    return snapshot


def _numpy_topk(grid, block, args, shared_mem=0):
    """select_topk_kernel (kernels/topk.cu) in NumPy, same arguments: the k smallest keys
    (scale * tile + bias, the excluded column's key replaced) of each tile row, NaN as inf, ties by
    the smaller index, merged with the running result when one is passed."""
    tile, ld, n, offset, scale, bias, exclude, exclude_key, prev_d, prev_i, nq, k, out_d, out_i = args
    n, nq, k = int(n), int(nq), int(k)
    none = np.iinfo(np.int64).max
    d = np.asarray(tile).reshape(nq, int(ld))[:, :n].astype(np.float32)
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
    from gpuhnsw import _kernels

    monkeypatch.setattr(_kernels, "get_kernel", lambda name, instance, device=None: _numpy_topk)


class NumpyAsCupy:
    """The subset of CuPy that the exact engine and GPU NN-descent use, backed by NumPy."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asarray(a, dtype=None):
        return np.array(a, dtype=dtype)       # a copy, like a host-to-device transfer

    @staticmethod
    def asnumpy(a):
        return np.asarray(a)

    class cuda:
        class Device:
            def __init__(self, ordinal=0):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Event:
            def __init__(self, disable_timing=False):
                pass

            def record(self, stream=None):
                pass

            def synchronize(self):
                pass

        @staticmethod
        def get_elapsed_time(start, end):
            return 0.0

        class memory:
            class OutOfMemoryError(MemoryError):
                pass


@pytest.fixture
def numpy_as_cupy():
    """A NumPy-backed stand-in for the ``cupy`` module (GPU code paths run on the CPU)."""
    return NumpyAsCupy()


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
