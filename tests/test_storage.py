"""Compressed storage (``Index(storage="float16" | "int8", rerank=...)``) everywhere an index goes:
recall on the shared data against float32 at equal ef, int8 ranges (first batch, ``train``, clipping),
float16's range, save / load / mmap of our format, pickles and state dicts, ``Index(other)``, hnswlib
export (decoded) and import (encoded), ``get_items``, updates, ``replace_deleted``, filters, memory.

The SIMD kernels themselves are held to float64 in test_simd.py."""
import pickle
import threading
import warnings

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw import IndexFileError, _core
from gpuhnsw._io import files, native
from gpuhnsw.testing import exact_knn, recall_at_k

STORAGES = ("float32", "float16", "int8")
CLIPPED = "ignore:add_items. .* rows had values outside the int8 ranges"


def build(base, space, storage, rerank=False, *, M=12, ef_construction=80, threads=2, **kw):
    index = gpuhnsw.Index(space, base.shape[1], storage=storage, rerank=rerank, device="cpu")
    index.init_index(len(base) + 100, M=M, ef_construction=ef_construction, random_seed=5, **kw)
    index.add_items(base, num_threads=threads)
    return index


def recall(index, queries, truth, ef, k=10):
    labels, _ = index.knn_query(queries, k=k, ef=ef, num_threads=2)
    return recall_at_k(labels.astype(np.int64), truth, k)


@pytest.fixture(scope="module")
def sets(datasets):
    """(space, base, queries, exact ids [nq, 10]) of slices of the three shared sets."""
    out = {}
    for name, space, n in (("siftsmall", "l2", 4000), ("mnist", "l2", 4000), ("minilm-debian", "cosine", 5000)):
        base, queries, _, _ = datasets(name, n_base=n, n_queries=200)
        base, queries = np.ascontiguousarray(base, np.float32), np.ascontiguousarray(queries, np.float32)
        out[name] = (space, base, queries, exact_knn(base, queries, 10, space)[0])
    return out


# ---------------------------------------------------------------------------------------------
# recall and memory on real data

@pytest.mark.parametrize("name", ["siftsmall", "mnist", "minilm-debian"])
def test_recall_at_equal_ef_against_float32(sets, name):
    """int8 loses little recall at equal ef (its distances are those of 8-bit rows: siftsmall's exact
    top 10 over its int8 rows alone is 0.989); float16 and the exact re-rank lose none to speak of."""
    space, base, queries, truth = sets[name]
    got = {(s, r): recall(build(base, space, s, r), queries, truth, ef=64)
           for s, r in (("float32", False), ("float16", False), ("int8", False), ("int8", True))}
    ref = got[("float32", False)]
    assert ref >= 0.95, got
    assert got[("float16", False)] >= ref - 0.005, got
    assert got[("int8", False)] >= ref - 0.02, got
    assert got[("int8", True)] >= ref - 0.005, got


def test_memory_usage_by_storage(sets):
    """memory_usage() counts the stored rows at their size: int8 rows are dim bytes plus one float
    (siftsmall: 132 against 512), and rerank adds the float32 rows back."""
    space, base, _, _ = sets["siftsmall"]
    sizes = {(s, r): build(base[:500], space, s, r, threads=1).memory_usage()
             for s in STORAGES for r in (False, True)}
    cap = 600
    for storage in STORAGES:
        extra = sizes[(storage, False)] - sizes[("float32", False)]
        assert extra == cap * (_core.row_bytes(128, storage) - 512) + (2 * 128 * 4 if storage == "int8" else 0)
        assert sizes[(storage, True)] - sizes[(storage, False)] == cap * 512
    assert sizes[("int8", False)] / sizes[("float32", False)] < 0.45


# ---------------------------------------------------------------------------------------------
# the distances returned

@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_returned_distances_are_the_stored_rows_or_exact_with_rerank(make_data, space):
    data = make_data(600, 40, seed=3) + (5.0 if space == "l2" else 0.0)
    queries = make_data(20, 40, seed=4) + (5.0 if space == "l2" else 0.0)
    for storage in ("float16", "int8"):
        for rerank in (False, True):
            index = build(data, space, storage, rerank, threads=1)
            labels, dists = index.knn_query(queries, k=5, ef=50)
            rows = index.get_items(labels)             # exact rows with rerank, else the stored ones decoded
            q = queries / (np.linalg.norm(queries, axis=1, keepdims=True) + 1e-30) if space == "cosine" else queries
            want = (((np.repeat(q, 5, axis=0) - rows) ** 2).sum(1) if space == "l2"
                    else 1 - (np.repeat(q, 5, axis=0) * rows).sum(1)).reshape(20, 5)
            if rerank:   # re-scored in float32 on the exact rows, and sorted by them
                np.testing.assert_allclose(dists, want, rtol=1e-5, atol=1e-5)
                assert (np.diff(dists, axis=1) >= 0).all()
                given = data[labels.ravel()]
                if space == "cosine":   # the rows as given, normalised
                    given = given / np.linalg.norm(given, axis=1, keepdims=True)
                np.testing.assert_allclose(rows, given, rtol=1e-6, atol=1e-7)
            else:        # the kernels' distances to the decoded rows (int8: up to the query's rounding)
                np.testing.assert_allclose(dists, want, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# int8 ranges

def test_int8_ranges_come_from_the_first_batch_and_later_rows_are_clipped_and_counted(rng):
    data = rng.standard_normal((300, 8)).astype(np.float32)
    index = gpuhnsw.Index("l2", 8, storage="int8")
    index.init_index(400)
    assert index.storage_info() == dict(storage="int8", rerank=False, bytes_per_row=20, trained=False,
                                        clipped_rows=0, clipped_values=0)
    index.add_items(data[:200])
    info = index.storage_info()
    np.testing.assert_allclose(info["low"], data[:200].min(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info["high"], data[:200].max(0), rtol=1e-5, atol=1e-6)
    outside = data[200:] * 3
    n_out = int(((outside < data[:200].min(0)) | (outside > data[:200].max(0))).any(1).sum())
    with pytest.warns(UserWarning, match=f"{n_out} of 100 rows had values outside the int8 ranges"):
        index.add_items(outside)
    assert index.storage_info()["clipped_rows"] == n_out > 0
    stored = index.get_items(np.arange(200, 300))
    np.testing.assert_allclose(stored, np.clip(outside, info["low"], info["high"]), atol=float(info["scale"].max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.add_items(data[:50] * 0.5)          # inside the ranges: no warning


def test_int8_train_from_a_sample_or_given_ranges(rng):
    data = rng.standard_normal((500, 6)).astype(np.float32)
    index = gpuhnsw.Index("cosine", 6, storage="int8")
    index.init_index(600)
    index.train(data)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    np.testing.assert_allclose(index.storage_info()["low"], unit.min(0), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # the sample covered every row: nothing clipped
        index.add_items(data[:10])
    with pytest.raises(RuntimeError, match="before the first row"):
        index.train(data)
    given = gpuhnsw.Index("l2", 6, storage="int8")
    given.init_index(10)
    given.train(low=-2, high=np.arange(1, 7, dtype=np.float32))
    info = given.storage_info()
    np.testing.assert_allclose(info["low"], -2, rtol=1e-6)
    np.testing.assert_allclose(info["high"], np.arange(1, 7), rtol=1e-6)
    for bad in (dict(low=1, high=0), dict(low=np.nan, high=1), dict(low=0), dict(low=-3e38, high=3e38)):
        with pytest.raises(ValueError):
            given.train(**bad)
    with pytest.raises(ValueError, match="data, or low and high"):
        given.train(data, low=0, high=1)
    with pytest.raises(ValueError, match="int8"):
        plain = gpuhnsw.Index("l2", 6)
        plain.init_index(10)
        plain.train(data)


def test_integer_dimensions_spanning_256_values_are_stored_exactly(datasets):
    """siftsmall's values are integers spanning at most 181 values per dimension: each dimension
    gets a step of 1, so its int8 codes hold the rows exactly, whether the ranges come from the
    first add, from train(sample) or from an hnswlib file; a non-integer dimension keeps its
    range / 255 step."""
    base = np.ascontiguousarray(datasets("siftsmall", n_base=2000)[0], np.float32)
    first = build(base, "l2", "int8", M=8, ef_construction=40)
    assert (first.storage_info()["scale"] == 1).all()
    np.testing.assert_array_equal(first.get_items(np.arange(2000)), base)
    sampled = gpuhnsw.Index("l2", 128, storage="int8")
    sampled.init_index(2000)
    sampled.train(base[:500])
    sampled.add_items(base[:500])
    np.testing.assert_array_equal(sampled.get_items(np.arange(500)), base[:500])
    mixed = base[:300].copy()
    mixed[:, 5] += 0.25                                    # one dimension is no longer integral
    part = build(mixed, "l2", "int8", M=8, ef_construction=40)
    scale = part.storage_info()["scale"]
    assert scale[5] == np.float32((mixed[:, 5].max() - mixed[:, 5].min()) / np.float32(255)) and \
        (np.delete(scale, 5) == 1).all()


def test_a_rejected_first_batch_leaves_the_int8_index_untrained(rng):
    index = gpuhnsw.Index("l2", 4, storage="int8")
    index.init_index(10)
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        index.add_items(rng.standard_normal((11, 4)).astype(np.float32))
    assert index.storage_info()["trained"] is False and index.get_current_count() == 0
    index.add_items(np.ones((3, 4), np.float32) * [1, 2, 3, 4])
    assert index.storage_info()["trained"] is True


def test_first_batches_added_at_once_train_once(rng):
    """Threads adding to an untrained int8 index: the first add to take the engine trains, the
    others store with its ranges (counted as clipped where outside), and the graph is whole."""
    index = gpuhnsw.Index("l2", 16, storage="int8")
    index.init_index(4000)
    parts = [rng.standard_normal((500, 16)).astype(np.float32) * (1 + i) for i in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        threads = [threading.Thread(target=index.add_items, args=(p, np.arange(500 * i, 500 * (i + 1))))
                   for i, p in enumerate(parts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert index.get_current_count() == 4000
    index.check_integrity()
    assert index.storage_info()["trained"]


@pytest.mark.filterwarnings(CLIPPED)
def test_calls_beside_each_other_on_a_compressed_index(datasets, tmp_path):
    """int8 with rerank: queries (plain and filtered), get_items, saves and pickles running beside
    inserts, updates, replace_deleted and deletes; every call ends, then the index is whole and holds
    exactly the labels the writers left."""
    base = np.ascontiguousarray(datasets("siftsmall", n_base=3000)[0], np.float32)
    index = build(base[:1500], "l2", "int8", True, M=8, ef_construction=40, threads=1, allow_replace_deleted=True)
    index.resize_index(3000)
    errors, done = [], threading.Event()

    def guard(fn):
        def run():
            try:
                fn()
            except Exception as exc:   # surfaced by the assertion below
                errors.append(repr(exc))
        return run

    def writer():
        try:
            for i in range(1500, 3000, 100):
                index.add_items(base[i:i + 100], np.arange(i, i + 100), num_threads=1)
                index.add_items(base[i:i + 5], np.arange(i - 1450, i - 1445), num_threads=1)      # updates
                index.mark_deleted(i - 1000)
                index.add_items(base[i + 5:i + 6], [10_000 + i], replace_deleted=True, num_threads=1)
        finally:
            done.set()

    def reader(seed):
        rng = np.random.default_rng(seed)
        for passes in range(10_000):   # at least 5, then until the writer is done
            if done.is_set() and passes >= 5:
                break
            q = base[rng.integers(0, 3000, 8)]
            index.knn_query(q, k=5, pad=True)
            index.knn_query(q, k=5, pad=True, filter=np.arange(0, 3000, 3))
            index.get_items(rng.integers(0, 500, 4))            # labels no writer deletes
            pickle.loads(pickle.dumps(index)).check_integrity()
            index.save_index(tmp_path / f"r{seed}.bin")

    threads = [threading.Thread(target=guard(writer))] + [threading.Thread(target=guard(lambda s=s: reader(s)))
                                                          for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and not any(t.is_alive() for t in threads), errors
    index.check_integrity()
    assert len(index) == 3000 and index.count_deleted == 0 and 10_000 + 1500 in index


def test_float16_refuses_values_beyond_its_range_and_changes_nothing(rng):
    index = gpuhnsw.Index("l2", 4, storage="float16")
    index.init_index(10)
    index.add_items(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="beyond float16's range"):
        index.add_items(np.array([[1, 2, 70000, 4]], np.float32))
    assert index.get_current_count() == 2
    index.add_items(np.array([[65504, -65504, 1e-8, 0]], np.float32))    # the largest half, a subnormal
    np.testing.assert_array_equal(index.get_items([2]), np.array([[65504, -65504, 1e-8, 0]], np.float16)
                                  .astype(np.float32))
    cos = gpuhnsw.Index("cosine", 4, storage="float16")   # normalised first: any finite row fits
    cos.init_index(2)
    cos.add_items(np.array([[1e30, 0, 0, 0]], np.float32))


def test_float16_conversion_matches_numpy_for_every_half():
    """The portable conversions (encoder, portable kernels) against NumPy: every one of the 63,488
    finite halves decodes exactly, and floats round to nearest even, through the stored rows."""
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    rng = np.random.default_rng(1)
    floats = np.concatenate([finite, rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-8, 5, 20000),
                             (finite[:-1] + finite[1:]) / 2])   # the ties between neighbouring halves
    floats = floats[np.abs(floats) < 65504].astype(np.float32)
    dim = 16
    rows = np.zeros((-(-floats.size // dim), dim), np.float32)
    rows.ravel()[:floats.size] = floats
    core = _core.Core("l2", dim, rows.shape[0], 4, 4, 1, False, "float16", False)
    core.add(rows, np.arange(rows.shape[0], dtype=np.uint64), rows.shape[0], 2, False)
    stored = np.frombuffer(core.export_state()["vectors"], np.float16).reshape(rows.shape)
    np.testing.assert_array_equal(stored.view(np.uint16), rows.astype(np.float16).view(np.uint16))
    out = np.empty(rows.shape, np.float32)
    core.get_vectors(np.arange(rows.shape[0], dtype=np.uint64), out)
    np.testing.assert_array_equal(out, stored.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# everywhere the index goes

@pytest.fixture(scope="module", params=[("float16", False), ("int8", False), ("int8", True), ("float32", True)])
def compressed(request, datasets):
    storage, rerank = request.param
    base, queries, _, _ = datasets("siftsmall", n_base=1500, n_queries=20)
    base, queries = np.ascontiguousarray(base, np.float32), np.ascontiguousarray(queries, np.float32)
    index = build(base[:1200], "l2", storage, rerank, M=8, ef_construction=40, allow_replace_deleted=True)
    index.mark_deleted(3)
    index.set_ef(30)
    return index, base, queries


def same(a, b, queries):
    """Same answers, same distances, same stored rows, same storage."""
    la, da = a.knn_query(queries, k=10)
    lb, db = b.knn_query(queries, k=10)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(da, db)
    np.testing.assert_array_equal(a.get_items([0, 5, 1199]), b.get_items([0, 5, 1199]))
    assert (a.storage, a.rerank, a.storage_info()["bytes_per_row"]) == \
        (b.storage, b.rerank, b.storage_info()["bytes_per_row"])
    assert a.memory_usage() == b.memory_usage()


@pytest.mark.filterwarnings(CLIPPED)
def test_save_and_load_keep_the_storage(compressed, tmp_path):
    index, base, queries = compressed
    index.save_index(tmp_path / "c.bin")
    version = int.from_bytes((tmp_path / "c.bin").read_bytes()[8:12], "little")
    assert version == 3          # the stored rows' version (4 only adds a search graph)
    for kwargs in ({}, {"mmap": True}, {"mmap": True, "verify": True}):
        loaded = gpuhnsw.Index("l2", 128)          # the file's storage wins over the default
        loaded.load_index(tmp_path / "c.bin", **kwargs)
        same(index, loaded, queries)
        assert loaded.ef == 30 and loaded.storage_info().get("clipped_rows") == \
            index.storage_info().get("clipped_rows")
        loaded.add_items(base[1200:1300])          # and it goes on working (mapped: copy-on-write)
        loaded.check_integrity()
        del loaded


def test_pickles_state_dicts_and_copies_keep_the_storage(compressed):
    index, _, queries = compressed
    for copy in (pickle.loads(pickle.dumps(index)), gpuhnsw.Index(index), gpuhnsw.Index(index.__getstate__()[0])):
        same(index, copy, queries)


def test_an_uninitialised_index_pickles_its_requested_storage():
    index = gpuhnsw.Index("l2", 4, storage="int8", rerank=True)
    copy = pickle.loads(pickle.dumps(index))
    copy.init_index(5)
    assert (copy.storage, copy.rerank) == ("int8", True)


@pytest.mark.filterwarnings(CLIPPED)
def test_updates_replace_deleted_and_deletes(compressed):
    index, base, queries = compressed
    index = gpuhnsw.Index(index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        index.add_items(base[1300:1301], [7])                       # update in place
        index.add_items(base[1301:1303], [9001, 9002], replace_deleted=True)   # into the deleted slot
    index.mark_deleted(11)
    index.check_integrity()
    got, want, tol = index.get_items([7, 9001, 9002]), base[1300:1303], 0
    if index.storage == "int8" and not index.rerank:   # within half a step of the rows clipped to the ranges
        info = index.storage_info()
        want, tol = np.clip(want, info["low"], info["high"]), float(info["scale"].max()) / 2 * 1.001
    elif index.storage == "float16" and not index.rerank:
        want = want.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    labels, _ = index.knn_query(base[1300:1303], k=1)
    assert labels[:, 0].tolist() == [7, 9001, 9002]
    assert 11 not in index.knn_query(base[11:12], k=5)[0]
    with pytest.raises(RuntimeError, match="Label not found"):
        index.get_items([3])


def test_label_filters_and_exact_filtered_search(compressed):
    """Filtered queries answered by graph search and by exact search over the allowed rows (the
    stored rows decoded, or the exact ones): the same labels."""
    index, _, queries = compressed
    allowed = np.arange(0, 1200, 7)
    graph = index.knn_query(queries, k=5, filter=allowed, filter_mode="graph", ef=200)[0]
    exact = index.knn_query(queries, k=5, filter=allowed, filter_mode="exact")[0]
    assert np.isin(exact, allowed).all() and np.mean(graph == exact) > 0.95


def test_hnswlib_export_is_decoded_and_warns_where_lossy(compressed, tmp_path, hnswlib):
    index, _, queries = compressed
    lossy = index.storage != "float32" and not index.rerank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index.save_index(tmp_path / "h.bin", format="hnswlib")
    assert [str(w.message) for w in caught if "hnswlib's format holds float32" in str(w.message)] != [] if lossy \
        else not caught
    theirs = hnswlib.Index("l2", 128)
    theirs.load_index(str(tmp_path / "h.bin"))
    ids = np.array(theirs.get_ids_list())
    np.testing.assert_array_equal(np.array(theirs.get_items(ids[ids != 3])), index.get_items(ids[ids != 3]))


def test_float32_files_are_encoded_into_the_requested_storage(datasets, tmp_path):
    """An hnswlib file (float32 rows) or a float32 index file loads into Index(storage="int8") as
    int8 rows, the ranges from its rows; compressed rows load only as they are."""
    base, queries, _, _ = datasets("siftsmall", n_base=1000, n_queries=20)
    plain = build(np.ascontiguousarray(base, np.float32), "l2", "float32", M=8, ef_construction=40)
    plain.save_index(tmp_path / "h.bin", format="hnswlib")
    plain.save_index(tmp_path / "o.bin")
    for name in ("h.bin", "o.bin"):
        small = gpuhnsw.Index("l2", 128, storage="int8", rerank=True)
        small.load_index(tmp_path / name)
        assert (small.storage, small.rerank) == ("int8", True)
        np.testing.assert_array_equal(small.get_items([0, 1]), plain.get_items([0, 1]))   # the exact rows
        np.testing.assert_array_equal(small.get_neighbors(5), plain.get_neighbors(5))     # the same graph
        assert np.mean(small.knn_query(queries, k=5)[0] == plain.knn_query(queries, k=5)[0]) > 0.95
        assert small.storage_info()["clipped_rows"] == 0
    with pytest.raises(IndexFileError, match="cannot be converted"):
        gpuhnsw.Index("l2", 128, storage="int8").load_index(tmp_path / "o.bin", mmap=True)
    small.save_index(tmp_path / "i.bin")
    with pytest.raises(IndexFileError, match="load as they are"):
        gpuhnsw.Index("l2", 128, storage="float16").load_index(tmp_path / "i.bin")
    with pytest.raises(IndexFileError, match="load as they are"):
        gpuhnsw.Index(small.__getstate__()[0], rerank=False)
    with pytest.raises(IndexFileError, match="exact rows given to an index without rerank"):
        gpuhnsw.Index(small.__getstate__()[0] | {"rerank": False})
    as_is = gpuhnsw.Index("l2", 128)                  # storage=None: the file's
    as_is.load_index(tmp_path / "i.bin")
    assert (as_is.storage, as_is.rerank) == ("int8", True)


# ---------------------------------------------------------------------------------------------
# the new sections and fields, corrupted

def _sections(buf):
    """{tag: (data offset, length)} of a file in our format."""
    pos, out = native._HEADER.size + files.CRC.size, {}
    while pos < len(buf):
        tag, length, _, pad = native._SECTION.unpack_from(buf, pos)
        out[tag] = (pos + native._SECTION.size + pad, length)
        pos += native._SECTION.size + pad + length
    return out


def _with_crc(buf, tag):
    import zlib
    buf = bytearray(buf)
    pos = native._HEADER.size + files.CRC.size
    while pos < len(buf):
        t, length, _, pad = native._SECTION.unpack_from(buf, pos)
        start = pos + native._SECTION.size + pad
        if t == tag:
            native._SECTION.pack_into(buf, pos, t, length, zlib.crc32(bytes(buf[start:start + length])), pad)
        pos = start + length
    return bytes(buf)


@pytest.mark.parametrize("tag, edit, message", [
    (b"QUAN", lambda d: d[:4] + np.float32(np.nan).tobytes() + d[8:], "quantiser"),
    (b"QUAN", lambda d: d[:-4] + np.float32(-1).tobytes(), "scale|row terms"),   # (verify: the rows first)
    (b"STOR", lambda d: (7).to_bytes(4, "little") + d[4:], "STOR"),
    (b"STOR", lambda d: d[:4] + (2).to_bytes(4, "little") + d[8:], "STOR"),
    (b"STOR", lambda d: d[:8] + (2**64 - 1).to_bytes(8, "little") + d[16:], "clip"),
    (b"VECS", lambda d: d[:12] + b"\x05" + d[13:], "padding"),     # row 0's code padding (dim 10: bytes 10-15)
])
def test_corrupted_storage_sections_are_index_file_errors(tmp_path, make_data, tag, edit, message):
    index = build(make_data(50, 10, seed=2), "l2", "int8", M=4, ef_construction=10, threads=1)
    index.save_index(tmp_path / "c.bin")
    buf = (tmp_path / "c.bin").read_bytes()
    start, length = _sections(buf)[tag]
    bad = buf[:start] + edit(buf[start:start + length]) + buf[start + length:]
    (tmp_path / "c.bin").write_bytes(bad)                             # checksum now wrong
    with pytest.raises(IndexFileError, match="checksum"):
        gpuhnsw.Index("l2", 10).load_index(tmp_path / "c.bin")
    (tmp_path / "c.bin").write_bytes(_with_crc(bad, tag))             # checksum right: the field itself
    for kwargs in ({}, {"mmap": True, "verify": True}):
        with pytest.raises(IndexFileError, match=message):
            gpuhnsw.Index("l2", 10).load_index(tmp_path / "c.bin", **kwargs)


def test_truncated_exact_rows_are_refused(tmp_path, make_data):
    index = build(make_data(50, 10, seed=2), "l2", "int8", rerank=True, M=4, ef_construction=10, threads=1)
    state = index.__getstate__()[0]
    for exact in (state["exact"][:-4], b"", bytes(len(state["exact"]))[:-1]):
        with pytest.raises(IndexFileError, match="exact"):
            gpuhnsw.Index(state | {"exact": exact})
    with pytest.raises(IndexFileError, match="exact"):
        gpuhnsw.Index(state | {"exact": np.full(50 * 10, np.inf, np.float32).tobytes()})
