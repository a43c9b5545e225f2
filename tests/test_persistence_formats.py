"""Index files (gpuhnsw/_io/): hnswlib 0.8.0 interchange, our own format, corrupted input.

hnswlib itself (the ``hnswlib`` fixture of conftest.py, 0.8.0) is the oracle for its format: files
it saves must read back, and files we write must load in hnswlib and answer queries exactly as the
index that was saved. Needs no GPU; does not use Index or the C core.
"""
import io
import os
import re
import struct
import time

import numpy as np
import pytest

from gpuhnsw import IndexFileError, testing  # only these and _io: the C core is never exercised
from gpuhnsw._io import files, hnswlib_format, native, state as state_module

STATE_BYTES = ("vectors", "links0", "degree0", "labels", "levels", "upper", "deleted")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def random_state(n, dim, M, seed, *, space="l2", capacity=None):
    """A valid state dict with a random graph: levels as in HNSW, upper links only to slots that
    reach that level, unused entries 0xFFFFFFFF."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    levels = np.minimum(np.floor(-np.log(1 - u) / np.log(max(M, 2))), 255).astype(np.uint8)
    degree0 = rng.integers(0, 2 * M + 1, n).astype(np.uint32) if n > 1 else np.zeros(n, np.uint32)
    links0 = rng.integers(0, max(n, 1), (n, 2 * M)).astype(np.uint32)
    links0[np.arange(2 * M)[None, :] >= degree0[:, None]] = state_module.NO_LINK
    blocks = []
    for i in np.flatnonzero(levels):
        for level in range(1, int(levels[i]) + 1):
            pool = np.flatnonzero(levels >= level)
            c = int(rng.integers(0, min(M, pool.size) + 1))
            block = np.full(1 + M, state_module.NO_LINK, np.uint32)
            block[0] = c
            block[1:1 + c] = rng.choice(pool, c, replace=False)
            blocks.append(block)
    upper = np.concatenate(blocks) if blocks else np.zeros(0, np.uint32)
    ep = int(np.argmax(levels)) if n else -1
    return dict(
        space=space, dim=dim, M=M, ef_construction=40, random_seed=2**63 + 5,
        allow_replace_deleted=True, max_elements=capacity or n, count=n, entry_point=ep,
        max_level=int(levels[ep]) if n else -1, insert_seq=n + 3,
        vectors=rng.standard_normal((n, dim)).astype(np.float32).tobytes(),
        links0=links0.tobytes(), degree0=degree0.tobytes(),
        labels=(np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)).tobytes(),
        levels=levels.tobytes(), upper=upper.tobytes(),
        deleted=(rng.random(n) < 0.2).astype(np.uint8).tobytes())


def zero_unused_links(buf):
    """An hnswlib file with every link entry past its list's count set to 0.

    hnswlib leaves stale ids there after pruning a list; our writer zeroes them, so this is the form
    in which our re-save is byte-identical. Written independently of gpuhnsw._io, with a plain loop.
    """
    (_, _, n, size, _, _, _, _, M, M0, _, _, _) = struct.unpack_from("<QQQQQQiIQQQdQ", buf)
    out = bytearray(buf)
    rec = np.frombuffer(out, np.uint8, n * size, 96).reshape(n, size)
    counts = rec[:, :2].copy().view("<u2")[:, 0]
    links = rec[:, 4:4 + 4 * M0].view("<u4")
    links[np.arange(M0)[None, :] >= counts[:, None]] = 0
    pos = 96 + n * size
    for _ in range(n):
        (nbytes,) = struct.unpack_from("<I", out, pos)
        pos += 4
        for b in range(nbytes // (4 + 4 * M)):
            blk = np.frombuffer(out, "<u4", 1 + M, pos + b * (4 + 4 * M))
            blk[1 + (int(blk[0]) & 0xFFFF):] = 0
        pos += nbytes
    assert pos == len(out)
    return bytes(out)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------
# real hnswlib indexes on siftsmall
# ---------------------------------------------------------------------------------------------

CASES = {  # name: (space, rows, M, capacity, deleted fraction)
    "l2": ("l2", 10000, 16, 12000, 0.05),
    "ip": ("ip", 3000, 8, 3000, 0.0),
    "cosine": ("cosine", 3000, 12, 4000, 0.1),
}


@pytest.fixture(scope="module")
def sift(dataset_folder):
    """siftsmall (base float32 [10000, 128], queries float32 [100, 128])."""
    dataset_folder("siftsmall")
    return testing.load_dataset("siftsmall")[:2]


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, hnswlib, sift, tmp_path_factory):
    """(case, hnswlib index, path of its save_index file, labels it marked deleted)."""
    space, rows, M, capacity, frac = CASES[request.param]
    base = sift[0][:rows]
    p = hnswlib.Index(space, base.shape[1])
    p.init_index(capacity, M=M, ef_construction=80, random_seed=7)
    p.set_num_threads(1)  # single-threaded hnswlib builds are deterministic
    labels = np.arange(rows, dtype=np.uint64) * 3 + 11  # labels != slots
    p.add_items(base, labels)
    rng = np.random.default_rng(1)
    gone = rng.choice(labels, int(frac * rows), replace=False)
    for label in gone:
        p.mark_deleted(int(label))
    path = tmp_path_factory.mktemp(request.param) / "hnswlib.bin"
    p.save_index(str(path))
    return request.param, p, path, set(int(x) for x in gone)


def test_read_hnswlib_file(saved, sift):
    case, p, path, gone = saved
    space, rows, M, capacity, _ = CASES[case]
    state, ef, fmt = native.read_index(path, space=space, dim=128)
    assert (fmt, ef) == ("hnswlib", None)
    assert (state["space"], state["dim"], state["M"], state["count"]) == (space, 128, M, rows)
    assert (state["max_elements"], state["ef_construction"]) == (capacity, 80)
    assert (state["random_seed"], state["insert_seq"], state["allow_replace_deleted"]) == (100, rows, False)
    labels = np.frombuffer(state["labels"], np.uint64)
    assert sorted(labels.tolist()) == sorted(p.get_ids_list())
    deleted = np.frombuffer(state["deleted"], np.uint8).astype(bool)
    assert set(labels[deleted].tolist()) == gone
    vectors = np.frombuffer(state["vectors"], np.float32).reshape(rows, 128)
    live = np.flatnonzero(~deleted)[::97]
    np.testing.assert_array_equal(vectors[live], np.asarray(p.get_items(labels[live])))
    levels = np.frombuffer(state["levels"], np.uint8)
    assert state["max_level"] == levels.max() == levels[state["entry_point"]]
    # Unused entries follow our contract, not hnswlib's stale ids.
    degree0 = np.frombuffer(state["degree0"], np.uint32)
    links0 = np.frombuffer(state["links0"], np.uint32).reshape(rows, 2 * M)
    assert np.all(links0[np.arange(2 * M)[None, :] >= degree0[:, None]] == 0xFFFFFFFF)
    assert len(state["upper"]) == 4 * int(levels.sum(dtype=np.int64)) * (1 + M)


def test_write_hnswlib_loads_in_hnswlib_with_same_neighbours(saved, hnswlib, sift, tmp_path):
    case, p, path, gone = saved
    space = CASES[case][0]
    state, _, _ = native.read_index(path, space=space, dim=128)
    out = tmp_path / "ours.bin"
    hnswlib_format.write(out, state)
    q = hnswlib.Index(space, 128)
    q.load_index(str(out))
    assert (q.max_elements, q.element_count, q.M, q.ef_construction) == (
        p.max_elements, p.element_count, p.M, p.ef_construction)
    queries = sift[1]
    for index in (p, q):
        index.set_ef(60)
    want_labels, want_dist = p.knn_query(queries, k=10, num_threads=1)
    got_labels, got_dist = q.knn_query(queries, k=10, num_threads=1)
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_dist, want_dist)
    assert not gone & set(got_labels.ravel().tolist())


def test_hnswlib_resave_is_byte_identical(saved, hnswlib, tmp_path):
    case, p, path, _ = saved
    orig = path.read_bytes()
    state, _, _ = native.read_index(path, space=CASES[case][0], dim=128)
    out = tmp_path / "ours.bin"
    hnswlib_format.write(out, state)
    ours = out.read_bytes()
    # Identical except for hnswlib's stale ids past each list's count, which we write as 0.
    assert ours == zero_unused_links(orig)
    # Our file survives a round trip through hnswlib (load + save_index) byte for byte, ...
    q = hnswlib.Index(CASES[case][0], 128)
    q.load_index(str(out))
    q.save_index(str(tmp_path / "hnswlib_again.bin"))
    assert (tmp_path / "hnswlib_again.bin").read_bytes() == ours
    # ... and through our reader and writer.
    state2, _, _ = native.read_index(out, space=CASES[case][0], dim=128)
    assert_same_state(state2, state)
    hnswlib_format.write(tmp_path / "again.bin", state2)
    assert (tmp_path / "again.bin").read_bytes() == ours


@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_byte_identical_to_hnswlib_without_pruning(space, hnswlib, sift, tmp_path):
    # Few elements: no list ever fills, so hnswlib leaves no stale ids and the files match exactly.
    p = hnswlib.Index(space, 128)
    p.init_index(50, M=16, ef_construction=40, random_seed=3)
    p.set_num_threads(1)
    p.add_items(sift[0][:20])
    p.mark_deleted(4)
    p.save_index(str(tmp_path / "h.bin"))
    orig = (tmp_path / "h.bin").read_bytes()
    assert zero_unused_links(orig) == orig
    state, _, _ = native.read_index(tmp_path / "h.bin", space=space, dim=128)
    hnswlib_format.write(tmp_path / "o.bin", state)
    assert (tmp_path / "o.bin").read_bytes() == orig


def test_empty_hnswlib_index(hnswlib, tmp_path):
    p = hnswlib.Index("ip", 5)
    p.init_index(10, M=4)
    p.save_index(str(tmp_path / "h.bin"))
    state, _, _ = native.read_index(tmp_path / "h.bin", space="ip", dim=5)
    assert (state["count"], state["entry_point"], state["max_level"]) == (0, -1, -1)
    assert all(state[k] == b"" for k in STATE_BYTES)
    hnswlib_format.write(tmp_path / "o.bin", state)
    assert (tmp_path / "o.bin").read_bytes() == (tmp_path / "h.bin").read_bytes()


def test_gpuhnsw_round_trip_of_hnswlib_state(saved, tmp_path):
    case, _, path, _ = saved
    space = CASES[case][0]
    state, _, _ = native.read_index(path, space=space, dim=128)
    native.write_gpuhnsw(tmp_path / "g.bin", state, ef=37)
    state2, ef, fmt = native.read_index(tmp_path / "g.bin", space=space, dim=128)
    assert (fmt, ef) == ("gpuhnsw", 37)
    assert_same_state(state2, state)
    assert os.listdir(tmp_path) == ["g.bin"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------
# our format with synthetic states
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,dim,M", [(0, 3, 4), (1, 1, 2), (2, 7, 3), (300, 16, 5)])
@pytest.mark.parametrize("ef", [None, 10, 2**40])
def test_gpuhnsw_round_trip_synthetic(n, dim, M, ef, tmp_path):
    state = random_state(n, dim, M, seed=n + M, space="cosine", capacity=n + 10)
    native.write_gpuhnsw(tmp_path / "g.bin", state, ef=ef)
    got, got_ef, fmt = native.read_index(tmp_path / "g.bin", space="cosine", dim=dim)
    assert (got_ef, fmt) == (ef, "gpuhnsw")
    assert_same_state(got, state)
    hnswlib_format.write(tmp_path / "h.bin", state)  # and through hnswlib's layout
    got, _, fmt = native.read_index(tmp_path / "h.bin", space="cosine", dim=dim)
    assert fmt == "hnswlib"
    for k in ("dim", "M", "max_elements", "count", "entry_point", "max_level", *STATE_BYTES):
        assert got[k] == state[k], k


def test_state_fields_may_be_any_buffer(tmp_path):
    state = random_state(50, 4, 3, seed=5)
    mixed = dict(state)
    for i, k in enumerate(STATE_BYTES):
        mixed[k] = (bytearray, memoryview)[i % 2](state[k])
    mixed["vectors"] = np.frombuffer(state["vectors"], np.float32).reshape(50, 4)  # a numpy array
    native.write_gpuhnsw(tmp_path / "a.bin", mixed, ef=None)
    native.write_gpuhnsw(tmp_path / "b.bin", state, ef=None)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    hnswlib_format.write(tmp_path / "c.bin", mixed)
    hnswlib_format.write(tmp_path / "d.bin", state)
    assert (tmp_path / "c.bin").read_bytes() == (tmp_path / "d.bin").read_bytes()


def test_reading_60k_elements_is_fast(tmp_path):
    state = random_state(60000, 8, 16, seed=60)
    hnswlib_format.write(tmp_path / "h.bin", state)
    native.write_gpuhnsw(tmp_path / "g.bin", state, ef=10)
    for name in ("h.bin", "g.bin"):
        t = time.perf_counter()
        got, _, _ = native.read_index(tmp_path / name, space="l2", dim=8)
        elapsed = time.perf_counter() - t
        assert got["upper"] == state["upper"] and got["links0"] == state["links0"]
        assert elapsed < 3.0, f"{name}: {elapsed:.2f} s"  # ~0.1 s here; generous for shared CI


# ---------------------------------------------------------------------------------------------
# corrupted, foreign and mismatched files
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_files(hnswlib, sift, tmp_path_factory):
    """Small files of both formats: {'gpuhnsw': bytes, 'hnswlib': bytes}, dim 8."""
    d = tmp_path_factory.mktemp("small")
    p = hnswlib.Index("l2", 8)
    p.init_index(40, M=4, ef_construction=20, random_seed=9)
    p.set_num_threads(1)
    p.add_items(sift[0][:25, :8])
    p.mark_deleted(3)
    p.save_index(str(d / "h.bin"))
    state, _, _ = native.read_index(d / "h.bin", space="l2", dim=8)
    native.write_gpuhnsw(d / "g.bin", state, ef=12)
    return {"gpuhnsw": (d / "g.bin").read_bytes(), "hnswlib": (d / "h.bin").read_bytes()}


def read_bytes(data, tmp_path, *, space="l2", dim=8):
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    return native.read_index(f, space=space, dim=dim)


@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_truncated_at_every_offset(fmt, small_files, tmp_path):
    data = small_files[fmt]
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    for cut in range(len(data) - 1, -1, -1):  # shrink in place: cheaper than rewriting the file
        os.truncate(f, cut)
        with pytest.raises(IndexFileError):
            native.read_index(f, space="l2", dim=8)


def flipped(data, tmp_path):
    """Yield (bit, path) with that bit of ``data`` flipped in the file at ``path``, edited in place.

    Bits: all of the first 256 bytes (headers), one per byte after that.
    """
    head = min(len(data), 256)
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDWR)
    try:
        for bit in [*range(8 * head), *(8 * i + i % 8 for i in range(head, len(data)))]:
            i = bit // 8
            os.pwrite(fd, bytes([data[i] ^ (1 << bit % 8)]), i)
            yield bit, f
            os.pwrite(fd, data[i:i + 1], i)
    finally:
        os.close(fd)


def test_every_bit_flip_detected_in_our_format(small_files, tmp_path):
    for bit, f in flipped(small_files["gpuhnsw"], tmp_path):
        with pytest.raises(IndexFileError):
            native.read_index(f, space="l2", dim=8)


def test_bit_flips_in_hnswlib_format_raise_or_read_consistently(small_files, tmp_path):
    # hnswlib's format has no checksums: a flipped vector bit or an id changed to another valid id
    # cannot be noticed. Every flip must either raise IndexFileError or give a state that passes
    # the writers' validation, never another exception.
    raised = 0
    for bit, f in flipped(small_files["hnswlib"], tmp_path):
        try:
            state, _, _ = native.read_index(f, space="l2", dim=8)
        except IndexFileError:
            raised += 1
            continue
        state_module.validated_arrays(state)  # what the writers check
    assert raised > 0


@pytest.mark.parametrize("size", [1, 7, 8, 95, 96, 97, 1000, 65536])
def test_random_bytes(size, tmp_path):
    rng = np.random.default_rng(size)
    junk = rng.bytes(size)
    with pytest.raises(IndexFileError):
        read_bytes(junk, tmp_path)
    with pytest.raises(IndexFileError):
        read_bytes(native.MAGIC + junk, tmp_path)
    with pytest.raises(IndexFileError):
        read_bytes(bytes(96) + junk, tmp_path)  # an all-zero hnswlib header


def test_empty_file(tmp_path):
    with pytest.raises(IndexFileError, match="empty"):
        read_bytes(b"", tmp_path)


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        native.read_index(tmp_path / "nope.bin", space="l2", dim=8)


@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_wrong_dim(fmt, small_files, tmp_path):
    for dim in (7, 9, 1):
        with pytest.raises(IndexFileError, match="dim"):
            read_bytes(small_files[fmt], tmp_path, dim=dim)


def test_wrong_space_in_our_format(small_files, tmp_path):
    for space in ("ip", "cosine"):
        with pytest.raises(IndexFileError, match="space"):
            read_bytes(small_files["gpuhnsw"], tmp_path, space=space)
    # hnswlib files do not record the space: any space reads them.
    read_bytes(small_files["hnswlib"], tmp_path, space="cosine")


def test_unknown_version(small_files, tmp_path):
    bad = bytearray(small_files["gpuhnsw"])
    bad[8:12] = struct.pack("<I", native.FORMAT_VERSION + 1)
    with pytest.raises(IndexFileError, match=f"version {native.FORMAT_VERSION + 1}"):
        read_bytes(bytes(bad), tmp_path)


def _patched_hnswlib(data, **fields):
    """``data`` with hnswlib header fields replaced (names as in the format table)."""
    names = ("offset_level0 max_elements count size_per_element label_offset offset_data "
             "max_level entry_point maxM maxM0 M mult ef_construction").split()
    values = dict(zip(names, struct.unpack_from("<QQQQQQiIQQQdQ", data)))
    values.update(fields)
    return struct.pack("<QQQQQQiIQQQdQ", *(values[k] for k in names)) + data[96:]


def test_targeted_hnswlib_corruptions(small_files, tmp_path):
    data = small_files["hnswlib"]
    (_, _, n, size, _, _, _, _, _, _, M, _, _) = struct.unpack_from("<QQQQQQiIQQQdQ", data)
    cases = {
        "unsupported": _patched_hnswlib(data, maxM0=3 * M),
        "maxM": _patched_hnswlib(data, maxM=M + 1),
        "mult": _patched_hnswlib(data, mult=0.5),
        "offsetLevel0": _patched_hnswlib(data, offset_level0=4),
        "max_elements=": _patched_hnswlib(data, max_elements=n - 1),
        "truncated": _patched_hnswlib(data, count=2**31 - 1, max_elements=2**31 - 1),
        "count=": _patched_hnswlib(data, count=2**60),
        "entry.point": _patched_hnswlib(data, entry_point=n),
        "max level": _patched_hnswlib(data, max_level=0),
    }
    tail = 96 + n * size

    def patched(offset, fmt, value):
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    cases["exceeds M0"] = patched(96 + 5 * size, "<H", 2 * M + 1)
    cases["link id out of range"] = patched(96 + 5 * size + 4, "<I", n)
    first_label = struct.unpack_from("<Q", data, 96 + size - 8)[0]
    cases["duplicate label"] = patched(96 + 6 * size - 8, "<Q", first_label)
    cases["not a multiple"] = patched(tail, "<I", 4 * (1 + M) + 4)
    cases["truncated at element"] = patched(tail, "<I", 4 * (1 + M) * 200)
    cases["level 256"] = patched(tail, "<I", 256 * 4 * (1 + M))
    cases["unexpected bytes"] = data + bytes(4)
    cases["whole number"] = data + bytes(3)
    for match, bad in cases.items():
        with pytest.raises(IndexFileError, match=match):
            read_bytes(bad, tmp_path)


def test_upper_link_to_lower_level_slot_rejected(tmp_path):
    state = random_state(400, 4, 3, seed=11)
    levels = np.frombuffer(state["levels"], np.uint8)
    upper = np.frombuffer(state["upper"], np.uint32).copy()
    upper[0], upper[1] = 1, np.flatnonzero(levels == 0)[0]  # the first block is a level-1 block
    state["upper"] = upper.tobytes()
    with pytest.raises(ValueError, match="does not reach"):
        native.write_gpuhnsw(tmp_path / "g.bin", state, ef=None)
    assert not (tmp_path / "g.bin").exists()


# ---------------------------------------------------------------------------------------------
# writing safely
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["gpuhnsw", "hnswlib"])
def test_unwritable_paths_raise_and_leave_nothing(writer, tmp_path):
    state = random_state(30, 4, 3, seed=2)
    write = {"gpuhnsw": lambda p: native.write_gpuhnsw(p, state, ef=5),
             "hnswlib": lambda p: hnswlib_format.write(p, state)}[writer]
    with pytest.raises(FileNotFoundError):
        write(tmp_path / "missing_dir" / "x.bin")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(OSError):  # os.replace onto a directory: the temp file was already written
        write(tmp_path / "a_dir")
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(OSError):
        write(tmp_path / "a_file" / "x.bin")
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file"]
    assert os.listdir(tmp_path / "a_dir") == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permissions are not enforced for root")
def test_read_only_directory_raises_permission_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            native.write_gpuhnsw(ro / "x.bin", random_state(5, 2, 2, seed=0), ef=None)
    finally:
        ro.chmod(0o700)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "index.bin"
    target.write_bytes(b"previous index")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        native.write_gpuhnsw(target, random_state(40, 4, 3, seed=3), ef=None)
    assert target.read_bytes() == b"previous index"
    assert os.listdir(tmp_path) == ["index.bin"]


def test_invalid_state_is_rejected_before_writing(tmp_path):
    good = random_state(20, 4, 3, seed=4)
    bad_cases = {
        "vectors": dict(good, vectors=good["vectors"][:-4]),
        "space": dict(good, space="hamming"),
        "entry.point": dict(good, entry_point=20),
        "exceeds M0": dict(good, degree0=np.full(20, 7, np.uint32).tobytes()),
    }
    for match, state in bad_cases.items():
        for write in (lambda p: native.write_gpuhnsw(p, state, ef=None), lambda p: hnswlib_format.write(p, state)):
            with pytest.raises(ValueError, match=match):
                write(tmp_path / "x.bin")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_file_errors_name_the_file(small_files, tmp_path, fmt):
    bad = small_files[fmt][:-5]
    path = tmp_path / f"damaged-{fmt}.bin"
    path.write_bytes(bad)
    found = rf" \(read as {fmt}'s format\): "   # and the format the first bytes said
    with pytest.raises(IndexFileError, match=rf"^{re.escape(str(path))}{found}"):
        native.read_index(path, space="l2", dim=8)
    with pytest.raises(IndexFileError, match=rf"^<BytesIO>{found}"):
        native.read_index(io.BytesIO(bad), space="l2", dim=8)
    path.write_bytes(small_files[fmt])
    with pytest.raises(IndexFileError, match=rf"^{re.escape(str(path))}{found}.*dim"):   # a mismatch too
        native.read_index(path, space="l2", dim=9)
