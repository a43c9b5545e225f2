"""Hostile state: mutated files of both formats, pickles and state dicts, huge requests, killed saves.

Every bad field gives IndexFileError (files, pickles and state dicts alike), never another exception,
a crash or an allocation sized by an untrusted number; whatever loads is a working index.  Regression
tests are named after the bug they pin; ``test_loader_fuzz`` is a seeded, bounded fuzz of all four
inputs.
"""
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw import IndexFileError
from gpuhnsw._io import bfindex, native
from gpuhnsw._validate import thread_limit
from gpuhnsw.exact import exact_search

DIM = 128  # siftsmall
FUZZ_SEED = 20261129
BOUNDARY = (0, 1, 2, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


@pytest.fixture(scope="module")
def base(datasets):
    """siftsmall rows float32 [300, 128]."""
    return np.ascontiguousarray(datasets("siftsmall", n_base=300)[0])


def build(base, *, seed=7, n=200, deleted=(3, 50, 77), storage="float32", rerank=False):
    index = gpuhnsw.Index("l2", DIM, storage=storage, rerank=rerank)
    index.init_index(n + 20, M=6, ef_construction=30, random_seed=seed, allow_replace_deleted=True)
    index.add_items(base[:n])
    for label in deleted:
        index.mark_deleted(label)
    return index


def assert_working(index, base):
    """A loaded index must be whole: integrity, queries, a save and a reload in both formats."""
    index.check_integrity()
    index.knn_query(base[:3], k=5, pad=True)
    for fmt in ("gpuhnsw", "hnswlib"):
        path = os.path.join(os.environ["GHNSW_FUZZ_TMP"], f"again.{fmt}")
        index.save_index(path, format=fmt)
        again = gpuhnsw.Index(index.space, index.dim)
        again.load_index(path)
        again.check_integrity()
    pickle.loads(pickle.dumps(index)).check_integrity()


# ---------------------------------------------------------------------------------------------
# regressions
# ---------------------------------------------------------------------------------------------

def test_random_seed_of_2_63_and_above_round_trips_through_files_pickles_and_state_dicts(base, tmp_path):
    """A seed >= 2**63 saved but could not be loaded or unpickled (bare OverflowError)."""
    for seed in (2**63, 2**64 - 1):
        index = build(base, seed=seed)
        for fmt in ("gpuhnsw", "hnswlib"):
            index.save_index(tmp_path / "s.bin", format=fmt)
            loaded = gpuhnsw.Index("l2", DIM)
            loaded.load_index(tmp_path / "s.bin")
            if fmt == "gpuhnsw":  # hnswlib files do not store the seed
                assert loaded.__getstate__()[0]["random_seed"] == seed
        for copy in (pickle.loads(pickle.dumps(index)), gpuhnsw.Index(index.__getstate__()[0])):
            assert copy.__getstate__()[0]["random_seed"] == seed
            assert (copy.knn_query(base[:5], k=3)[0] == index.knn_query(base[:5], k=3)[0]).all()


@pytest.mark.parametrize("key,value", [
    ("ef", -1), ("ef", 2**63), ("ef", 1.5), ("cur_l", -1), ("cur_l", 2**64), ("random_seed", -1),
    ("random_seed", 2**64), ("insert_seq", 2**64), ("num_threads", -2**63), ("num_threads", 2**20),
    ("num_threads", "4"),
    ("dim", 2**63), ("M", 2**63), ("M", 1), ("ef_construction", 2**63), ("max_elements", 2**40),
    ("max_elements", 2**31), ("count", -1), ("entry_point", 2**63), ("entry_point", -2), ("max_level", 2**63),
    ("ser_version", 2**70), ("allow_replace_deleted", 2**70), ("index_inited", "yes"), ("space", 3),
])
def test_hostile_state_dict_field_is_rejected_at_the_edge(base, key, value):
    """ef=-1, cur_l=-1, random_seed=-1, num_threads=-2**63, ... were accepted and made later calls
    fail, or raised a bare OverflowError; now every such field is an IndexFileError at load time,
    the same for Index(dict) and unpickling."""
    state = build(base).__getstate__()[0]
    state[key] = value
    with pytest.raises(IndexFileError, match=key):
        gpuhnsw.Index(state)
    with pytest.raises(IndexFileError, match=key):
        pickle.loads(pickle.dumps(_Pickled(state)))


def test_a_stored_ef_of_0_is_refused_at_load_not_at_the_first_query(base, tmp_path):
    """A file or state with ef=0 loaded, and every knn_query then raised TypeError (queries check
    the stored ef since the query path became params -> plan -> legs; set_ef refuses 0).  Now the load
    raises IndexFileError; hnswlib's own pickle, where ef=0 searches with k, loads with ef=1 (max(ef, k)
    is the same)."""
    index = build(base)
    state = index.__getstate__()[0]
    with pytest.raises(IndexFileError, match="ef"):
        gpuhnsw.Index(state | {"ef": 0})
    index.save_index(tmp_path / "e.bin")
    data = bytearray((tmp_path / "e.bin").read_bytes())
    struct.pack_into("<q", data, 92, 0)                                   # the header's ef
    struct.pack_into("<I", data, native._HEADER.size, zlib.crc32(bytes(data[:native._HEADER.size])))
    (tmp_path / "e.bin").write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="ef"):
        gpuhnsw.Index("l2", DIM).load_index(tmp_path / "e.bin")


def test_an_hnswlib_pickle_with_ef_0_loads_with_ef_1(base, hnswlib):
    theirs = hnswlib.Index("l2", DIM)
    theirs.init_index(50)
    theirs.add_items(base[:40])
    theirs.set_ef(0)
    ours = gpuhnsw.Index(theirs.__getstate__()[0])
    assert ours.ef == 1
    np.testing.assert_array_equal(ours.knn_query(base[:5], k=3)[0], theirs.knn_query(base[:5], k=3)[0])


@pytest.mark.parametrize("threads", [2**40, 2**31, thread_limit() + 1])
def test_num_threads_of_2_40_is_refused_before_anything_changes(base, threads):
    """set_num_threads(2**40) was stored: pickling and Index(other) then failed (the state keeps a C
    int), add_items and knn_query quietly ran on one thread, and knn_graph raised a bare
    OverflowError or sized its pool by the row count; now every num_threads argument is checked by
    one rule, with a clear ValueError, and <= 0 still means every core."""
    index = build(base)
    before = index.knn_query(base[:5], k=3)
    for call in (lambda: index.set_num_threads(threads),
                 lambda: setattr(index, "num_threads", threads),
                 lambda: index.add_items(base[200:210], num_threads=threads),
                 lambda: index.knn_query(base[:5], k=3, num_threads=threads),
                 lambda: index.range_query(base[:5], 1e9, num_threads=threads),
                 lambda: gpuhnsw.BFIndex("l2", DIM).set_num_threads(threads),
                 lambda: gpuhnsw.knn_graph(base[:50], 3, method="nndescent", num_threads=threads),
                 lambda: exact_search(base[:50], base[:5], 3, "l2", num_threads=threads)):
        with pytest.raises(ValueError, match=f"num_threads must be at most {thread_limit()}.*got {threads}"):
            call()
    assert index.get_current_count() == 200 and index.num_threads == (os.cpu_count() or 1)
    copy = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(copy.knn_query(base[:5], k=3)[0], before[0])
    index.set_num_threads(thread_limit())        # the limit itself is accepted, and round-trips
    assert pickle.loads(pickle.dumps(index)).num_threads == thread_limit()
    for every_core in (0, -1, -2**40):
        index.set_num_threads(every_core)
        assert index.num_threads == (os.cpu_count() or 1)


def test_hnswlib_header_claiming_a_huge_capacity_does_not_allocate_it(tmp_path):
    """A 96-byte hnswlib file claiming max_elements=3e7 made the loader allocate past 2 GiB; hnswlib
    sizes an index it loads from max(count, max_elements argument)."""
    code = textwrap.dedent("""
        import math, resource, struct, sys, gpuhnsw
        M, dim = 16, 8
        head = struct.pack("<QQQQQQiIQQQdQ", 0, 30_000_000, 0, 4 + 8 * M + 4 * dim + 8, 4 + 8 * M + 4 * dim,
                           4 + 8 * M, -1, 0xFFFFFFFF, M, 2 * M, M, 1 / math.log(M), 200)
        open(sys.argv[1], "wb").write(head)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        index = gpuhnsw.Index("l2", dim)
        index.load_index(sys.argv[1])
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
        print(index.get_max_elements(), index.get_current_count(), grew < 20 * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "h.bin")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0", "True"]


def test_knn_query_with_a_huge_k_does_not_allocate_it(base):
    """knn_query(k=10**9) on 1,000 elements allocated past 2 GiB (a beam of k per query) before
    failing; the beam is bounded by the element count and the results by the machine's memory."""
    index = build(base, deleted=())
    with pytest.raises(RuntimeError, match="contiguous"):
        index.knn_query(base[:2], k=10**9)
    with pytest.raises(MemoryError):
        index.knn_query(base[:2], k=2**62, pad=True)
    labels, dists = index.knn_query(base[:2], k=50, ef=2**40)  # ef far past the element count
    assert labels.shape == (2, 50) and (labels[:, 0] == [0, 1]).all()


def test_bfindex_file_with_a_changed_capacity_raises_index_file_error(base, tmp_path):
    """BFIndex files with a changed capacity field gave numpy's errors instead of IndexFileError."""
    bf = gpuhnsw.BFIndex("l2", DIM)
    bf.init_index(50)
    bf.add_items(base[:20])
    for fmt, offset, fmt_code in (("gpuhnsw", 8 + 4 + 4 + 8, "<Q"), ("hnswlib", 0, "<Q")):
        path = tmp_path / f"bf.{fmt}"
        bf.save_index(path, format=fmt)
        data = bytearray(path.read_bytes())
        for cap in (0, 19, 21, 2**40, 2**64 - 1):
            struct.pack_into(fmt_code, data, offset, cap)
            if fmt == "gpuhnsw":  # keep the header checksum right, so the capacity itself is judged
                hs = bfindex._BF_HEADER.size
                struct.pack_into("<I", data, hs, zlib.crc32(bytes(data[:hs])))
            path.write_bytes(bytes(data))
            try:
                loaded = gpuhnsw.BFIndex("l2", DIM)
                loaded.load_index(path)
            except IndexFileError:
                continue
            assert loaded.get_current_count() == 20 and loaded.get_max_elements() >= 20


def test_temp_files_of_killed_saves_are_removed_by_later_saves_and_loads(base, tmp_path):
    """22 kills of saves left 1.2 GB of temp files; temp files are now flocked by their writer, and
    a later save or load of the same path removes the ones no live writer holds."""
    target = tmp_path / "index.bin"
    build(base).save_index(target)
    code = textwrap.dedent("""
        import sys, threading
        from gpuhnsw._io import files
        def chunks():
            yield b"x" * 4096
            print("writing", flush=True)
            threading.Event().wait()  # hold the temp file open until killed
        files.atomic_write(sys.argv[1], chunks())
    """)
    def start_save():
        child = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "writing"
        return child

    def temps():
        return sorted(p for p in os.listdir(tmp_path) if p.endswith(".tmp"))

    for _ in range(3):  # each killed save leaves its temp file; the next save removes it
        child = start_save()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert len(temps()) == 1
    stale = temps()
    live = start_save()  # removes the stale one, holds its own
    try:
        assert len(temps()) == 1 and temps() != stale
        gpuhnsw.Index("l2", DIM).load_index(target)  # a load removes only what no writer holds
        assert len(temps()) == 1 and temps() != stale
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    gpuhnsw.Index("l2", DIM).load_index(target)
    assert temps() == []
    build(base).save_index(target)
    assert sorted(os.listdir(tmp_path)) == ["index.bin"]


# ---------------------------------------------------------------------------------------------
# the fuzz
# ---------------------------------------------------------------------------------------------

def _fix_own_checksums(buf):
    """Recompute the header and section CRCs of a (mutated) file in our format, where its structure
    still parses, so that mutations reach the checks behind the checksums."""
    buf = bytearray(buf)
    hs = native._HEADER.size
    if len(buf) < hs + 4:
        return bytes(buf)
    struct.pack_into("<I", buf, hs, zlib.crc32(bytes(buf[:hs])))
    pos = hs + 4
    while pos + native._SECTION.size <= len(buf):
        tag, length, _, pad = native._SECTION.unpack_from(buf, pos)
        start = pos + native._SECTION.size + pad
        if start + length > len(buf):
            break
        native._SECTION.pack_into(buf, pos, tag, length, zlib.crc32(bytes(buf[start:start + length])), pad)
        pos = start + length
    return bytes(buf)


def _mutate_bytes(rng, data, header_fields):
    """One random mutation of a file: flipped bytes, a truncation, inserted junk, or a header field
    set to a boundary value (``header_fields``: (offset, struct code) pairs)."""
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for pos in rng.integers(0, len(data), rng.integers(1, 9)):
            data[pos] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        data = data[:int(rng.integers(0, len(data)))]
    elif kind == 2:
        pos = int(rng.integers(0, len(data)))
        data[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
    else:
        offset, code = header_fields[int(rng.integers(len(header_fields)))]
        value = int(rng.choice(BOUNDARY)) - int(rng.integers(0, 2))
        bits = 8 * struct.calcsize(code)
        value %= 2**bits
        if code.islower() and value >= 2**(bits - 1):  # signed field
            value -= 2**bits
        struct.pack_into(code, data, offset, value)
    return bytes(data)


def _mutate_state(rng, state):
    state = dict(state)
    key = str(rng.choice(sorted(state)))
    value = state[key]
    if isinstance(value, (bytes, bytearray)):
        b = bytearray(value)
        if b and rng.integers(2):
            for pos in rng.integers(0, len(b), rng.integers(1, 5)):
                b[pos] = int(rng.integers(256))
        else:
            b = b[:int(rng.integers(0, len(b) + 1))]
        state[key] = bytes(b)
    else:
        choices = [*BOUNDARY, -1, -2**63, 2**70, None, "x", 1.5, True]
        state[key] = choices[int(rng.integers(len(choices)))]
    return state


@pytest.mark.filterwarnings("ignore:save_index.format='hnswlib'.:UserWarning")
@pytest.mark.parametrize("storage, rerank, cases", [("float32", False, 480), ("int8", True, 240),
                                                    ("float16", False, 160)])
def test_loader_fuzz(base, tmp_path, monkeypatch, storage, rerank, cases):
    """Seeded mutations of our format (checksums recomputed; version 3 with its storage sections for
    the compressed indexes), the hnswlib format, pickles and state dicts.  Each case either raises
    IndexFileError or loads a working index."""
    monkeypatch.setenv("GHNSW_FUZZ_TMP", str(tmp_path))
    rng = np.random.default_rng(FUZZ_SEED + cases)
    index = build(base, seed=2**63 + 11, storage=storage, rerank=rerank)
    index.save_index(tmp_path / "own.bin")
    index.save_index(tmp_path / "hnsw.bin", format="hnswlib")
    own, hnsw = (tmp_path / "own.bin").read_bytes(), (tmp_path / "hnsw.bin").read_bytes()
    state = index.__getstate__()[0]
    own_fields = [(12 + 4 * i, "<I") for i in range(2)] + [(20 + 8 * i, "<Q") for i in range(6)] + \
        [(68, "<q"), (76, "<q"), (84, "<Q"), (92, "<q")]
    hnsw_fields = [(8 * i, "<Q") for i in range(6)] + [(48, "<i"), (52, "<I")] + \
        [(56 + 8 * i, "<Q") for i in range(3)] + [(88, "<Q")]
    counts = dict.fromkeys(("own", "hnswlib", "pickle", "dict"), 0)
    loaded = dict.fromkeys(counts, 0)
    path = tmp_path / "case.bin"
    for case in range(cases):
        kind = ("own", "hnswlib", "pickle", "dict")[case % 4]
        counts[kind] += 1
        try:
            if kind in ("own", "hnswlib"):
                data = _mutate_bytes(rng, own if kind == "own" else hnsw, own_fields if kind == "own" else hnsw_fields)
                path.write_bytes(_fix_own_checksums(data) if kind == "own" else data)
                if kind == "own":
                    _fuzz_mapped(path, base, loaded)
                result = gpuhnsw.Index("l2", DIM)
                result.load_index(path)
            elif kind == "pickle":
                result = pickle.loads(pickle.dumps(_Pickled(_mutate_state(rng, state))))
            else:
                result = gpuhnsw.Index(_mutate_state(rng, state))
        except IndexFileError:
            continue
        loaded[kind] += 1
        assert_working(result, base)
    print(f"loader fuzz: cases {counts}, loaded and verified {loaded}")
    assert sum(counts.values()) == cases and all(loaded[k] < counts[k] for k in counts)
    assert 0 < loaded["own mapped"] < 2 * counts["own"]


def _fuzz_mapped(path, base, loaded):
    """A mapped load of a mutated file: IndexFileError, or an index that works (verified vectors:
    as a normal load; unverified ones may hold anything, so only integrity and a query)."""
    for verify in (True, False):
        try:
            mapped = gpuhnsw.Index("l2", DIM)
            mapped.load_index(path, mmap=True, verify=verify)
        except IndexFileError:
            continue
        loaded["own mapped"] = loaded.get("own mapped", 0) + 1
        mapped.check_integrity()
        mapped.knn_query(base[:3], k=5, pad=True)
        if verify:
            assert_working(mapped, base)
        del mapped   # unmapped before the next case rewrites the file in place


class _Pickled:
    """Unpickles as an Index from a given state (what a tampered pickle of an Index holds)."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return gpuhnsw.Index.__new__, (gpuhnsw.Index,), (self.state,)
