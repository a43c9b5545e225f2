"""``Index.load_index(path, mmap=True)``: vectors and level-0 links mapped copy-on-write from our own
format (version 2), on real data.

A mapped load must answer exactly as a normal load of the same file, take every write (copying only
the pages it touches, never changing the file), grow into owned memory on resize, pickle and save
as usual, survive its file being replaced by a save to the same path, and refuse corrupted,
truncated or unmappable files with IndexFileError.  Memory sharing is measured from
/proc/self/status (anonymous vs file-backed resident pages), not timed.
"""
import io
import json
import os
import pickle
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import run_threads

import gpuhnsw
from gpuhnsw import IndexFileError
from gpuhnsw._io import files, native


def _build(data, space, *, n, capacity=None, M=8, ef_construction=48):
    index = gpuhnsw.Index(space, data.shape[1], device="cpu")
    index.init_index(capacity or n, M=M, ef_construction=ef_construction, random_seed=5,
                     allow_replace_deleted=True)
    index.add_items(data[:n], num_threads=1)
    index.mark_deleted(7)
    index.set_ef(40)
    return index


def _load(path, space, dim, **kw):
    index = gpuhnsw.Index(space, dim, device="cpu")
    index.load_index(path, **kw)
    return index


def _assert_same(a, b, queries, k=10):
    la, da = a.knn_query(queries, k=k, num_threads=1)
    lb, db = b.knn_query(queries, k=k, num_threads=1)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(da, db)
    ids = [label for label in a.get_ids_list() if label in a]   # live ones
    assert sorted(a.get_ids_list()) == sorted(b.get_ids_list())
    np.testing.assert_array_equal(a.get_items(ids), b.get_items(ids))
    assert a.check_integrity() == b.check_integrity()


@pytest.fixture(scope="module")
def cases(datasets, tmp_path_factory):
    """{name: (space, base rows, queries, saved file)}: siftsmall cut to 126 columns (rows padded in
    the file) and minilm-debian (cosine)."""
    d = tmp_path_factory.mktemp("mmap")
    sift, sift_q = datasets("siftsmall", n_base=3000, n_queries=50)[:2]
    mini, mini_q = datasets("minilm-debian", n_base=3000, n_queries=50)[:2]
    out = {}
    for name, space, base, q in (("sift126", "l2", sift[:, :126], sift_q[:, :126]),
                                 ("minilm", "cosine", mini, mini_q)):
        base = np.ascontiguousarray(base, dtype=np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)
        index = _build(base, space, n=2500, capacity=2600)
        path = d / f"{name}.bin"
        index.save_index(path)
        out[name] = (space, base, q, path)
    return out


@pytest.mark.parametrize("name", ["sift126", "minilm"])
def test_mapped_load_equals_normal_load(cases, name, tmp_path):
    space, base, q, path = cases[name]
    normal = _load(path, space, base.shape[1])
    mapped = _load(path, space, base.shape[1], mmap=True)
    _assert_same(normal, mapped, q)
    assert (mapped.ef, mapped.max_elements, len(mapped)) == (40, 2600, 2499)
    verified = _load(path, space, base.shape[1], mmap=True, verify=True)
    _assert_same(normal, verified, q)
    # saving again gives the same file
    normal.save_index(tmp_path / "a.bin")
    mapped.save_index(tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


@pytest.mark.parametrize("name", ["sift126", "minilm"])
def test_writes_after_a_mapped_load_leave_the_file_alone(cases, name):
    space, base, q, path = cases[name]
    before = path.read_bytes()
    normal = _load(path, space, base.shape[1], allow_replace_deleted=True)
    mapped = _load(path, space, base.shape[1], mmap=True, allow_replace_deleted=True)
    for index in (normal, mapped):
        index.add_items(base[2500:2550], num_threads=1)                          # new rows, back-links
        index.add_items(base[:20][::-1].copy(), np.arange(100, 120), num_threads=1)  # updates in place
        index.mark_deleted(np.arange(30, 40))
        index.add_items(base[2550:2555], np.arange(9000, 9005), num_threads=1, replace_deleted=True)
        index.unmark_deleted(35)
    _assert_same(normal, mapped, q)
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["sift126", "minilm"])
def test_resize_after_a_mapped_load(cases, name):
    space, base, q, path = cases[name]
    normal = _load(path, space, base.shape[1])
    mapped = _load(path, space, base.shape[1], mmap=True)
    for index in (normal, mapped):
        index.resize_index(2550)    # shrink the capacity: stays mapped
        index.add_items(base[2500:2540], num_threads=1)
        index.resize_index(3000)    # beyond the mapping: copied into owned memory
        index.add_items(base[2540:2900], num_threads=1)
    _assert_same(normal, mapped, q)
    # a larger capacity at load is mapped too (the rows past the file are anonymous memory)
    wide = _load(path, space, base.shape[1], mmap=True, max_elements=2900)
    wide.add_items(base[2500:2900], num_threads=1)
    assert wide.max_elements == 2900 and wide.check_integrity()["n_live"] == 2899


def test_auto_resize_after_a_mapped_load(cases):
    space, base, q, path = cases["sift126"]
    mapped = _load(path, space, base.shape[1], mmap=True)
    mapped._auto_resize = True   # what init_index(auto_resize=True) sets; a load keeps the default
    mapped.add_items(base[2500:3000], num_threads=1)
    assert mapped.max_elements >= 3000 and mapped.check_integrity()["n_live"] == 2999


def test_pickle_and_copy_of_a_mapped_index(cases):
    space, base, q, path = cases["minilm"]
    mapped = _load(path, space, base.shape[1], mmap=True)
    _assert_same(mapped, pickle.loads(pickle.dumps(mapped)), q)
    _assert_same(mapped, gpuhnsw.Index(mapped), q)


def test_save_to_the_mapped_path_replaces_the_file_not_the_mapping(cases, tmp_path):
    space, base, q, src = cases["sift126"]
    path = tmp_path / "index.bin"
    path.write_bytes(src.read_bytes())
    mapped = _load(path, space, base.shape[1], mmap=True)
    twin = _load(path, space, base.shape[1])
    mapped.add_items(base[2500:2600], num_threads=1)
    mapped.save_index(path)                     # a new inode under the name; ours lives on
    twin.add_items(base[2500:2600], num_threads=1)
    _assert_same(twin, mapped, q)
    _assert_same(twin, _load(path, space, base.shape[1], mmap=True), q)
    os.remove(path)                             # and without any name at all
    _assert_same(twin, mapped, q)


_OWN_FILE_PROBE = """
import sys
import numpy as np
import gpuhnsw

path, mode = sys.argv[1], sys.argv[2]
index = gpuhnsw.Index("l2", 126, device="cpu")
index.load_index(path, mmap=True)
q = np.ones((1, 126), np.float32)
before = index.knn_query(q, k=3)[0]
with open(path, mode) as f:
    try:
        index.save_index(f)
    except ValueError as exc:
        print("refused:", exc)
try:
    print("query:", (index.knn_query(q, k=3)[0] == before).all())
except RuntimeError as exc:
    print("query refused:", exc)
"""


@pytest.mark.parametrize("mode", ["wb", "r+b", "ab"])
def test_saving_a_mapped_index_into_its_own_file_object_is_refused(cases, tmp_path, mode):
    """save_index(open(path, "wb")) on the index's own mapped file died of SIGBUS: "wb" truncates the
    file, and the save then read the mapped rows.  Now the file object is recognised (same device and
    inode) before any row is read; a truncated one leaves an index that refuses every call and says
    what happened; an untruncated one is refused and the index stays whole.  In a child process, so
    that a SIGBUS fails this test instead of the run."""
    space, base, q, src = cases["sift126"]
    path = tmp_path / "index.bin"
    path.write_bytes(src.read_bytes())
    out = subprocess.run([sys.executable, "-c", _OWN_FILE_PROBE, str(path), mode], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "refused:" in out.stdout, out.stdout
    if mode == "wb":
        assert "query refused: this index was lost" in out.stdout and "was truncated" in out.stdout
    else:
        assert "is the file this index is mapped from" in out.stdout and "query: True" in out.stdout
        assert path.read_bytes() == src.read_bytes()     # nothing was written


def test_an_empty_mapped_index_is_not_lost_when_its_file_is_rewritten(tmp_path):
    """An empty index loaded with mmap=True maps no page of its file, yet save_index through a file
    object on that file (or on a new file that took the replaced file's inode number) declared it
    lost and dropped it, with every row added since the load.  Found by the model-based walk."""
    path = tmp_path / "empty.bin"
    index = gpuhnsw.Index("l2", 4, device="cpu")
    index.init_index(20, M=2)
    index.save_index(path)
    index = gpuhnsw.Index("l2", 4, device="cpu")
    index.load_index(path, mmap=True)
    x = np.random.default_rng(0).random((10, 4), dtype=np.float32)
    index.add_items(x)
    with open(path, "wb") as f:
        index.save_index(f)
    assert len(index) == 10 and np.array_equal(index.get_items(range(10)), x)
    again = gpuhnsw.Index("l2", 4, device="cpu")
    again.load_index(path, mmap=True)
    assert np.array_equal(again.get_items(range(10)), x)


_RSS_PROBE = """
import json, sys
import numpy as np
import gpuhnsw

def rss():  # (anonymous, file-backed) resident bytes of this process
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return [int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")]

path, queries = sys.argv[1], np.load(sys.argv[2])
out = [rss()]
index = gpuhnsw.Index("l2", queries.shape[1], device="cpu")
index.load_index(path, mmap=sys.argv[3] == "mmap")
out.append(rss())
index.knn_query(queries, k=3, ef=2000, num_threads=1)  # wide searches read most rows
out.append(rss())
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_mapped_vectors_are_file_pages_not_private_memory(datasets, tmp_path):
    """Opening maps the vectors without reading them; searching reads them as page-cache pages
    (shared with every process mapping the file), not as private memory.  Measured in fresh
    processes (a long one reuses freed memory without new page faults)."""
    mnist = np.ascontiguousarray(datasets("mnist", n_base=8000)[0], dtype=np.float32)
    path = tmp_path / "mnist.bin"
    _build(mnist, "l2", n=8000, M=4, ef_construction=16).save_index(path)
    np.save(tmp_path / "q.npy", mnist[::400])
    vec_bytes = mnist.nbytes     # 25 MB of vectors, 0.25 MB of level-0 links

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), str(tmp_path / "q.npy"), mode],
                             check=True, capture_output=True, text=True).stdout
        (anon0, file0), (anon1, file1), (anon2, file2) = json.loads(out)
        return anon1 - anon0, anon2 - anon0, file2 - file0

    opened, searched, file_pages = probe("mmap")
    assert opened < vec_bytes / 5 and searched < vec_bytes / 5 and file_pages > vec_bytes / 2
    opened, _, _ = probe("read")   # the measure works: a normal load holds the vectors privately
    assert opened > vec_bytes * 0.8


def test_queries_beside_writes_on_a_mapped_index(cases):
    space, base, q, path = cases["minilm"]
    mapped = _load(path, space, base.shape[1], mmap=True)

    def queries():
        for _ in range(30):
            labels, _ = mapped.knn_query(q, k=5, num_threads=2)
            assert (labels < 3000).all()

    def writes():
        for i in range(2500, 2900, 50):
            mapped.add_items(base[i:i + 50], num_threads=2)
            if i == 2550:
                mapped.resize_index(3000)   # moves the rows into owned memory under the readers
            mapped.mark_deleted(i)

    run_threads(queries, queries, writes)
    assert mapped.check_integrity(require_reachable=False)["n_live"] == 2900 - 1 - 8


@pytest.mark.gpu
def test_mapped_index_on_the_gpu(cases):
    """A mapped index's mirror is synced from the mapped rows, then from the pages writes copied."""
    space, base, q, path = cases["minilm"]
    cpu = _load(path, space, base.shape[1])
    gpu = gpuhnsw.Index(space, base.shape[1], device="cuda")
    gpu.load_index(path, mmap=True)
    for step in (lambda ix: None, lambda ix: ix.add_items(base[2500:2600], num_threads=1),
                 lambda ix: ix.resize_index(3000), lambda ix: ix.add_items(base[2600:3000], num_threads=1)):
        step(cpu)
        step(gpu)
        want = cpu.knn_query(q, k=10)[0]
        got = gpu.knn_query(q, k=10)[0]
        assert np.mean(got == want) > 0.99
        assert gpu._gpu.mirror.check_against_core() == []


# ---------------------------------------------------------------------------------------------
# files that cannot be mapped, or are damaged
# ---------------------------------------------------------------------------------------------

def _version1(path, out):
    """``path`` (our format, version 2) rewritten in version 1: no padding, vectors [n, dim]."""
    state, ef, _ = native.read_index(path, space="l2", dim=126)
    header = native._HEADER.pack(native.MAGIC, 1, 0, int(state["allow_replace_deleted"]), 126, state["M"],
                              state["ef_construction"], state["random_seed"], state["max_elements"],
                              state["count"], state["entry_point"], state["max_level"], state["insert_seq"], ef)
    chunks = [header, files.CRC.pack(zlib.crc32(header))]
    for key, tag in native._TAGS.items():
        chunks += [native._SECTION_V1.pack(tag, len(state[key]), zlib.crc32(state[key])), state[key]]
    out.write_bytes(b"".join(chunks))


def test_unmappable_files_say_so(cases, tmp_path):
    space, base, q, path = cases["sift126"]
    v1 = tmp_path / "v1.bin"
    _version1(path, v1)
    _assert_same(_load(path, space, 126), _load(v1, space, 126), q)     # still loads, without mmap
    with pytest.raises(IndexFileError, match=r"v1\.bin.*version 1 file cannot be mapped"):
        _load(v1, space, 126, mmap=True)
    hnsw = tmp_path / "h.bin"
    _load(path, space, 126).save_index(hnsw, format="hnswlib")
    with pytest.raises(IndexFileError, match=r"h\.bin.*cannot be mapped"):
        _load(hnsw, space, 126, mmap=True)
    with pytest.raises(ValueError, match="path"):
        _load(io.BytesIO(path.read_bytes()), space, 126, mmap=True)
    with pytest.raises(gpuhnsw.IndexFileNotFoundError):
        _load(tmp_path / "missing.bin", space, 126, mmap=True)


@pytest.fixture(scope="module")
def small(datasets, tmp_path_factory):
    """A small file of our format (siftsmall, 126 columns) and its state."""
    base = np.ascontiguousarray(datasets("siftsmall", n_base=60)[0][:, :126])
    path = tmp_path_factory.mktemp("small") / "small.bin"
    _build(base, "l2", n=40, M=4, ef_construction=16).save_index(path)
    return path, base


def _patched(data, key, edit):
    """``data`` with section ``key``'s bytes edited by ``edit(uint32 or float32 array)`` and its
    CRC recomputed, so that the checks behind the checksum are reached."""
    buf = bytearray(data)
    off, length, _ = native._section_layout(lambda pos, n: data[pos:pos + n], len(data), 2)[key]
    arr = np.frombuffer(buf, dtype=np.float32 if key == "vectors" else np.uint32, count=length // 4, offset=off)
    edit(arr)
    head = off - native._SECTION.size
    while native._SECTION.unpack_from(buf, head)[0] != native._TAGS[key]:
        head -= 1   # back over the zero padding
    tag, _, _, pad = native._SECTION.unpack_from(buf, head)
    native._SECTION.pack_into(buf, head, tag, length, zlib.crc32(bytes(buf[off:off + length])), pad)
    return bytes(buf)


@pytest.mark.parametrize("damage, verify_only", [
    ("link out of range", False), ("unused link not invalid", False), ("self loop", False),
    ("NaN vector", True), ("non-zero padding", True)])
def test_damage_behind_the_checksums(small, tmp_path, damage, verify_only):
    path, base = small
    data = path.read_bytes()
    n, M0 = 40, 8
    edits = {
        "link out of range": ("links0", lambda a: a.__setitem__(0, n + 5)),
        "unused link not invalid": ("links0", lambda a: a.__setitem__(slice(M0 - 1, M0), 0)),
        "self loop": ("links0", lambda a: a.__setitem__(M0 * 3, 3)),
        "NaN vector": ("vectors", lambda a: a.__setitem__(5, np.nan)),
        "non-zero padding": ("vectors", lambda a: a.__setitem__(127, 1.0)),
    }
    key, edit = edits[damage]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(_patched(data, key, edit))
    with pytest.raises(IndexFileError, match=r"bad\.bin"):
        _load(bad, "l2", 126, mmap=True, verify=True)
    if verify_only:   # unverified vectors: loads, and a bad value only changes distances
        mapped = _load(bad, "l2", 126, mmap=True)
        mapped.knn_query(base[:5], k=3)
        mapped.check_integrity()
    else:
        with pytest.raises(IndexFileError, match=r"bad\.bin"):
            _load(bad, "l2", 126, mmap=True)


def test_truncated_and_flipped_files_raise(small, tmp_path):
    path, _ = small
    data = path.read_bytes()
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    for cut in sorted({*range(256), *range(256, len(data), 97)}, reverse=True):  # in place: nothing maps it
        os.truncate(f, cut)
        with pytest.raises(IndexFileError, match=r"x\.bin"):
            _load(f, "l2", 126, mmap=True)
    vectors = native._section_layout(lambda pos, n: data[pos:pos + n], len(data), 2)["vectors"]
    crc_at = data.rfind(b"VECS", 0, vectors[0]) + 12   # the vectors' CRC in their section header
    for i in range(0, len(data), 29):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        f.write_bytes(bytes(flipped))
        unverified = vectors[0] <= i < vectors[0] + vectors[1] or crc_at <= i < crc_at + 4
        with pytest.raises(IndexFileError):
            _load(f, "l2", 126, mmap=True, verify=True)
        if not unverified:
            with pytest.raises(IndexFileError):
                _load(f, "l2", 126, mmap=True)
