"""Bad input: a clear exception, and the index exactly as it was before the call.

Many of these calls crash or silently misbehave in hnswlib 0.8.0 (see HNSWLIB_COMPAT.md); where
hnswlib raises, the exception type is the same (checked side by side in test_api_compat.py).
"""
import os

import numpy as np
import pytest

import gpuhnsw

DIM = 16
X = np.random.default_rng(11).random((300, DIM), dtype=np.float32)
PROBE = X[250:256]  # queries used to compare the index before and after a rejected call


def built(space="l2", n=100, capacity=120, **init):
    index = gpuhnsw.Index(space, DIM)
    init = {"M": 8, "ef_construction": 60, "random_seed": 3, **init}
    index.init_index(capacity, **init)
    if n:
        index.add_items(X[:n])
    return index


def rejected(index, index_snapshot, exc, call, match=None):
    """Assert call(index) raises exc (matching ``match``) and leaves index as it was."""
    before = index_snapshot(index, PROBE)
    with pytest.raises(exc, match=match):
        call(index)
    assert index_snapshot(index, PROBE) == before
    return index


def still_works(index):
    """The index accepts a new element and finds it afterwards."""
    label = 10_000 + index.element_count
    if index.element_count >= index.max_elements:
        index.resize_index(index.max_elements + 1)
    index.add_items(X[299], ids=[label])
    assert index.knn_query(X[299], k=1)[0][0, 0] == label
    assert index.check_integrity()["n_live"] == len(index)


# --------------------------------------------------------------------------- uninitialised index

UNINITIALISED_CALLS = {  # all of these segfault in hnswlib 0.8.0
    "knn_query": lambda i: i.knn_query(X[:2], k=1),
    "add_items": lambda i: i.add_items(X[:2]),
    "mark_deleted": lambda i: i.mark_deleted(0),
    "unmark_deleted": lambda i: i.unmark_deleted(0),
    "get_items": lambda i: i.get_items([0]),
    "resize_index": lambda i: i.resize_index(10),
    "save_index": lambda i: i.save_index(os.devnull),
}


@pytest.mark.parametrize("call", UNINITIALISED_CALLS.values(), ids=UNINITIALISED_CALLS.keys())
def test_uninitialised_index_raises(call):
    index = gpuhnsw.Index("l2", DIM)
    with pytest.raises(RuntimeError):
        call(index)
    assert (index.max_elements, index.element_count, len(index)) == (0, 0, 0)
    index.init_index(10)  # still usable
    index.add_items(X[:3])
    assert index.knn_query(X[1], k=1)[0][0, 0] == 1


def test_uninitialised_getters_do_not_crash():
    index = gpuhnsw.Index("l2", DIM)
    for getter in (index.get_max_elements, index.get_current_count, index.get_ids_list,
                   index.index_file_size):
        try:
            value = getter()
        except RuntimeError:
            continue
        assert value in (0, [])


# --------------------------------------------------------------------------- construction

@pytest.mark.parametrize("dim", [0, -1, -16])
def test_dim_must_be_positive(dim):
    with pytest.raises(ValueError):
        gpuhnsw.Index("l2", dim)


@pytest.mark.parametrize("M", [0, 1])
def test_M_below_two_rejected(M):
    index = gpuhnsw.Index("l2", DIM)
    with pytest.raises(ValueError):
        index.init_index(10, M=M)
    assert index.M == 0 and index.max_elements == 0  # not initialised
    index.init_index(10, M=2)
    index.add_items(X[:5])
    assert index.knn_query(X[4], k=1)[0][0, 0] == 4


def test_init_twice_keeps_index(index_snapshot):
    index = rejected(built(), index_snapshot, RuntimeError, lambda i: i.init_index(5, M=4),
                     match="already initiated")
    assert (index.M, index.max_elements) == (8, 120)
    still_works(index)


# --------------------------------------------------------------------------- non-finite input

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_non_finite_data_rejected_whole_batch(index_snapshot, space, bad):
    index = built(space)
    data = X[100:110].copy()
    data[7, 3] = bad
    rejected(index, index_snapshot, ValueError, lambda i: i.add_items(data))
    rejected(index, index_snapshot, ValueError, lambda i: i.add_items(data, ids=np.arange(500, 510)))
    assert not any(label in index for label in range(500, 510))
    still_works(index)


def test_non_finite_update_keeps_old_vector(index_snapshot):
    index = built()
    bad = X[200].copy()
    bad[0] = np.nan
    rejected(index, index_snapshot, ValueError, lambda i: i.add_items(bad, ids=[5]))
    np.testing.assert_array_equal(index.get_items([5])[0], X[5])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_query_rejected(index_snapshot, bad):
    index = built()
    q = X[200:204].copy()
    q[2, 5] = bad
    rejected(index, index_snapshot, ValueError, lambda i: i.knn_query(q, k=3))
    rejected(index, index_snapshot, ValueError, lambda i: i.knn_query(q, k=3, pad=True))
    rejected(index, index_snapshot, ValueError, lambda i: i.knn_query(q[2], k=3, filter=[1, 2, 3]))


# --------------------------------------------------------------------------- shapes and labels

@pytest.mark.parametrize("width", [DIM - 1, DIM + 1, 1])
def test_query_of_wrong_width_rejected(index_snapshot, width):
    index = built()
    rejected(index, index_snapshot, ValueError, lambda i: i.knn_query(np.ones((3, width), np.float32), k=2))
    rejected(index, index_snapshot, ValueError, lambda i: i.knn_query(np.ones(width, np.float32), k=2))


def test_data_of_wrong_shape_rejected(index_snapshot):
    index = built()
    rejected(index, index_snapshot, RuntimeError, lambda i: i.add_items(np.ones((3, DIM - 1), np.float32)),
             match="Wrong dimensionality")
    rejected(index, index_snapshot, RuntimeError, lambda i: i.add_items(np.ones((2, 3, DIM), np.float32)))
    rejected(index, index_snapshot, RuntimeError, lambda i: i.add_items(X[:3], ids=[1, 2]))
    still_works(index)


@pytest.mark.parametrize("ids", [[-1, -2, -3], [500, -1, 501], -1], ids=["all", "one", "scalar"])
def test_negative_labels_rejected(index_snapshot, ids):
    index = built()
    rows = X[100:103] if isinstance(ids, list) else X[100]
    rejected(index, index_snapshot, OverflowError, lambda i: i.add_items(rows, ids=ids))
    assert 500 not in index and 501 not in index
    still_works(index)


@pytest.mark.parametrize("bad", [1e20, 2.0**64, 3e19, -1.0])
def test_float_labels_beyond_uint64_are_rejected_everywhere(index_snapshot, bad):
    """Float labels at or above 2**64 were cast to label 0: add_items stored a row under 0, a filter
    of 1e20 admitted label 0, and mark_deleted(3e19) deleted label 0."""
    index = built()
    rows = X[100:102]
    rejected(index, index_snapshot, OverflowError, lambda i: i.add_items(rows, np.array([5000.0, bad])),
             match="out of range for uint64")
    rejected(index, index_snapshot, OverflowError, lambda i: i.mark_deleted(np.array([bad])))
    rejected(index, index_snapshot, OverflowError, lambda i: i.knn_query(PROBE, k=1, filter=np.array([bad])))
    assert 5000 not in index and 0 in index
    still_works(index)


def test_set_filters_take_every_uint64_label():
    """A set filter was read as int64: labels from 2**63 on raised OverflowError; beyond uint64 they
    are rejected like an array's."""
    index = built(n=0)
    index.add_items(X[:20], np.arange(20, dtype=np.uint64) + np.uint64(2**63))
    labels, _ = index.knn_query(X[3], k=1, filter={2**63 + 3, 2**64 - 1})
    assert labels[0, 0] == 2**63 + 3
    with pytest.raises(OverflowError):
        index.knn_query(X[3], k=1, filter={2**64})


def test_unknown_label(index_snapshot):
    """hnswlib's "Label not found", followed by the label (get_items([99999]) did not say which)."""
    index = built()
    for call in (lambda i: i.mark_deleted(1000), lambda i: i.unmark_deleted(1000),
                 lambda i: i.get_items([1, 1000]), lambda i: i.get_neighbors(1000),
                 lambda i: i.get_levels([2, 1000])):
        rejected(index, index_snapshot, RuntimeError, call, match="^Label not found: 1000$")
    still_works(index)


def test_delete_state_errors(index_snapshot):
    index = built()
    index.mark_deleted(4)
    rejected(index, index_snapshot, RuntimeError, lambda i: i.mark_deleted(4), match="already deleted")
    rejected(index, index_snapshot, RuntimeError, lambda i: i.unmark_deleted(5), match="is not deleted")
    rejected(index, index_snapshot, RuntimeError, lambda i: i.get_items([4]),
             match=r"^Label not found: 4 \(it is marked deleted\)$")
    assert 4 not in index and index.count_deleted == 1


# --------------------------------------------------------------------------- k, filters, capacity

def test_k_larger_than_available(index_snapshot):
    index = built(n=20)
    rejected(index, index_snapshot, RuntimeError, lambda i: i.knn_query(PROBE, k=21), match="contiguous")
    index.mark_deleted(0)
    rejected(index, index_snapshot, RuntimeError, lambda i: i.knn_query(PROBE, k=20), match="contiguous")
    rejected(index, index_snapshot, RuntimeError,
             lambda i: i.knn_query(PROBE, k=3, filter=lambda label: label < 3), match="contiguous")
    rejected(index, index_snapshot, RuntimeError,
             lambda i: i.knn_query(PROBE, k=3, filter=np.array([1, 2], np.uint64)), match="contiguous")
    rejected(index, index_snapshot, RuntimeError,
             lambda i: i.knn_query(PROBE, k=1, filter=[0]), match="contiguous")  # 0 is deleted
    assert index.knn_query(PROBE, k=19)[0].shape == (len(PROBE), 19)


def test_empty_index_query_raises():
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(10)
    with pytest.raises(RuntimeError, match="contiguous"):
        index.knn_query(X[:2], k=1)
    assert index.knn_query(X[:2], k=0)[0].shape == (2, 0)
    labels, dists = index.knn_query(X[:2], k=2, pad=True)
    assert np.all(labels == np.uint64(2**64 - 1)) and np.all(np.isinf(dists))


def test_all_deleted_query_raises(index_snapshot):
    index = built(n=10)
    for label in range(9):
        index.mark_deleted(label)
    assert index.knn_query(X[0], k=1)[0][0, 0] == 9
    index.mark_deleted(9)
    with pytest.raises(RuntimeError, match="contiguous"):
        index.knn_query(X[0], k=1)
    assert len(index) == 0 and index.element_count == 10


def test_capacity_rejects_whole_batch(index_snapshot):
    index = built(n=100, capacity=105)
    rejected(index, index_snapshot, RuntimeError, lambda i: i.add_items(X[100:110]),
             match="The number of elements exceeds the specified limit")
    rejected(index, index_snapshot, RuntimeError, lambda i: i.add_items(X[100:110], ids=np.arange(700, 710)),
             match="The number of elements exceeds the specified limit")
    assert not any(label in index for label in range(700, 710))
    index.add_items(X[100:105], ids=np.arange(700, 705))  # exactly up to the limit
    assert index.element_count == 105
    rejected(index, index_snapshot, RuntimeError, lambda i: i.add_items(X[106], ids=[800]),
             match="The number of elements exceeds the specified limit")
    index.add_items(X[106], ids=[3])  # an update needs no room
    assert index.element_count == 105


def test_replace_deleted_errors(index_snapshot):
    index = built()
    index.mark_deleted(2)
    rejected(index, index_snapshot, RuntimeError,
             lambda i: i.add_items(X[200:202], ids=[900, 901], replace_deleted=True),
             match="Replacement of deleted elements is disabled")
    replacing = built(allow_replace_deleted=True)
    replacing.mark_deleted(2)
    rejected(replacing, index_snapshot, RuntimeError, lambda i: i.add_items(X[200], ids=[2]),
             match="update deleted elements")


def test_resize_below_count(index_snapshot):
    index = rejected(built(), index_snapshot, RuntimeError, lambda i: i.resize_index(99), match="Cannot resize")
    still_works(index)


def test_bad_per_call_ef(index_snapshot):
    index = built()
    rejected(index, index_snapshot, (ValueError, TypeError, OverflowError), lambda i: i.knn_query(PROBE, k=2, ef=-1))


def test_filter_exception_propagates(index_snapshot):
    def boom(label):
        raise KeyError("from the filter")

    index = built()
    rejected(index, index_snapshot, KeyError, lambda i: i.knn_query(PROBE, k=2, filter=boom))
    rejected(index, index_snapshot, KeyError, lambda i: i.knn_query(PROBE, k=2, filter=boom, num_threads=1))


# --------------------------------------------------------------------------- files

@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_save_to_unwritable_path(index_snapshot, tmp_path, fmt):
    index = built()
    for path in (tmp_path / "missing" / "index.bin", tmp_path):  # no such folder; a folder
        rejected(index, index_snapshot, OSError, lambda i: i.save_index(str(path), format=fmt))
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.fixture
def saved(tmp_path):
    """An index saved in both formats: (index, {format: path})."""
    index = built()
    index.mark_deleted(7)
    paths = {}
    for fmt in ("gpuhnsw", "hnswlib"):
        paths[fmt] = tmp_path / f"{fmt}.bin"
        index.save_index(str(paths[fmt]), format=fmt)
    return index, paths


def corruptions(blob):
    """(name, bytes) of broken variants of a valid index file."""
    mid = len(blob) // 2
    flipped = bytearray(blob)
    flipped[mid] ^= 0xFF
    header = bytearray(blob)
    header[20] ^= 0x5A
    return [
        ("empty", b""),
        ("one byte", blob[:1]),
        ("truncated header", blob[:40]),
        ("truncated half", blob[:mid]),
        ("truncated last byte", blob[:-1]),
        ("trailing garbage", blob + b"\0" * 13),
        ("flipped byte", bytes(flipped)),
        ("header byte", bytes(header)),
        ("zeros", b"\0" * len(blob)),
        ("noise", np.random.default_rng(0).integers(0, 256, len(blob), dtype=np.uint8).tobytes()),
    ]


@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_corrupted_files(saved, tmp_path, index_snapshot, fmt):
    index, paths = saved
    blob = paths[fmt].read_bytes()
    reference = gpuhnsw.Index("l2", DIM)
    reference.load_index(str(paths[fmt]))
    expected = index_snapshot(reference, PROBE)
    for name, data in corruptions(blob):
        if fmt == "hnswlib" and name == "flipped byte":
            continue  # hnswlib files carry no checksum: a flipped vector byte is a valid file
        bad = tmp_path / f"bad-{name}.bin"
        bad.write_bytes(data)
        fresh = gpuhnsw.Index("l2", DIM)
        with pytest.raises(gpuhnsw.IndexFileError):
            fresh.load_index(str(bad))
        assert fresh.max_elements == 0
        # a failed load into a live index leaves it as it was
        target = gpuhnsw.Index(reference)
        with pytest.raises(gpuhnsw.IndexFileError) as info:
            target.load_index(str(bad))
        assert isinstance(info.value, RuntimeError), name
        assert index_snapshot(target, PROBE) == expected, name


@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_file_of_another_dim(saved, fmt):
    _, paths = saved
    other = gpuhnsw.Index("l2", DIM // 2)
    with pytest.raises(gpuhnsw.IndexFileError):
        other.load_index(str(paths[fmt]))


def test_file_of_another_space(saved):
    _, paths = saved
    with pytest.raises(gpuhnsw.IndexFileError):
        gpuhnsw.Index("ip", DIM).load_index(str(paths["gpuhnsw"]))


def test_missing_file_is_runtime_error(tmp_path):
    index = built()
    with pytest.raises(RuntimeError):  # hnswlib: "Cannot open file"
        index.load_index(str(tmp_path / "nothing.bin"))
    assert index.element_count == 100


# --------------------------------------------------------------------------- BFIndex

def test_bfindex_errors():
    bf = gpuhnsw.BFIndex("l2", DIM)
    bf.init_index(10)
    bf.add_items(X[:4], np.arange(4))
    with pytest.raises(RuntimeError):  # hnswlib 0.8.0 pads with garbage
        bf.knn_query(X[:1], k=5)
    bf.delete_vector(77)  # an unknown label is ignored, as in hnswlib
    assert bf.get_current_count() == 4
    with pytest.raises(ValueError):
        bf.knn_query(np.ones((1, DIM - 1), np.float32), k=1)
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        bf.add_items(X[4:20], np.arange(4, 20))
    assert bf.get_current_count() == 4
    assert bf.knn_query(X[2], k=1)[0][0, 0] == 2


# --------------------------------------------------------------------------- container limits

@pytest.mark.parametrize("version", ["v2", "v1"])
def test_memory_checks_respect_a_cgroup_limit(monkeypatch, tmp_path, version):
    """The memory checks read the machine's memory only (os.sysconf), blind to a container's cgroup
    limit: a capacity that the container cannot hold was accepted and the process was killed."""
    from gpuhnsw import _validate

    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/batch/job7\n")
        group = tmp_path / "batch" / "job7"
        group.mkdir(parents=True)
        (group / "memory.max").write_text("max\n")                    # no limit here ...
        (tmp_path / "batch" / "memory.max").write_text(f"{2**30}\n")  # ... but its parent has one
    else:
        proc.write_text("12:cpu,cpuacct:/job7\n9:memory:/job7\n")
        (tmp_path / "memory" / "job7").mkdir(parents=True)
        (tmp_path / "memory" / "job7" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    monkeypatch.setattr(_validate, "_PROC_CGROUP", str(proc))
    monkeypatch.setattr(_validate, "_CGROUP_ROOT", str(tmp_path))
    assert _validate.memory_limit() == 2**30
    index = gpuhnsw.Index("l2", DIM)
    with pytest.raises(MemoryError, match="more than the 1.0 GiB of memory this process may use"):
        index.init_index(20_000_000)                                  # ~2.6 GiB of arrays
    index.init_index(1000)                                            # what fits still works
    index.add_items(X[:50])
    with pytest.raises(MemoryError, match="1.0 GiB"):
        index.knn_query(X[:4], k=30_000_000, pad=True)              # 1.3 GiB of results


def test_default_threads_follow_the_cpu_affinity(monkeypatch):
    """The default thread count was os.cpu_count(), blind to taskset and batch schedulers."""
    from gpuhnsw import _validate

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert _validate.cpu_count() == 3
    assert gpuhnsw.Index("l2", DIM).num_threads == 3 and gpuhnsw.BFIndex("l2", DIM).num_threads == 3
    index = built()
    index.set_num_threads(-1)
    assert index.num_threads == 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_engine_default_threads_follow_the_cpu_affinity():
    """The C engine's own default (NN-descent with num_threads <= 0) read every online core."""
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from gpuhnsw import _core, _validate; print(_core.default_threads, _validate.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "1"], out.stderr
