"""Everyday calls beyond hnswlib's single-label forms: mark_deleted / unmark_deleted of label arrays,
get_items of any label shape (knn_query's [nq, k] included), on siftsmall."""
import numpy as np
import pytest

import gpuhnsw


@pytest.fixture
def sift(datasets):
    base, queries, _, _ = datasets("siftsmall")
    index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    index.init_index(len(base), M=12, ef_construction=80, random_seed=2)
    index.add_items(base)
    return index, base, queries


def test_mark_deleted_array_of_any_shape(sift):
    index, base, queries = sift
    labels, _ = index.knn_query(queries[:20], k=5)  # uint64 [20, 5], with repeats across rows
    gone = np.unique(labels)
    index.mark_deleted(labels)
    assert index.count_deleted == gone.size and not any(int(x) in index for x in gone)
    again, _ = index.knn_query(queries[:20], k=5)
    assert not np.isin(again, gone).any()
    index.unmark_deleted(gone.reshape(-1, 1))
    assert index.count_deleted == 0
    np.testing.assert_array_equal(index.knn_query(queries[:20], k=5)[0], labels)
    index.mark_deleted([4, 5])
    index.unmark_deleted(np.array([4, 5], dtype=np.int64))
    assert 4 in index and 5 in index


def test_rejected_label_array_changes_nothing(sift):
    index, _, _ = sift
    index.mark_deleted(7)
    with pytest.raises(RuntimeError, match="Label not found: 99999"):
        index.mark_deleted([1, 2, 99999])
    with pytest.raises(RuntimeError, match="already deleted: 7"):
        index.mark_deleted(np.array([1, 7]))
    with pytest.raises(RuntimeError, match="not deleted: 1"):
        index.unmark_deleted([7, 1])
    with pytest.raises(OverflowError):
        index.mark_deleted([1, -3])
    assert index.count_deleted == 1 and 1 in index and 2 in index and 7 not in index


def test_get_items_of_knn_query_labels(sift):
    index, base, queries = sift
    labels, _ = index.knn_query(queries[:6], k=3)
    items = index.get_items(labels)
    assert items.shape == (18, base.shape[1])
    np.testing.assert_array_equal(items, base[labels.ravel().astype(np.int64)])


def test_set_ef_zero_rejected():
    index = gpuhnsw.Index("l2", 4)
    with pytest.raises(ValueError, match="ef must be at least 1"):
        index.set_ef(0)
    with pytest.raises(TypeError):  # hnswlib's size_t argument
        index.ef = -1
    assert index.ef == 10


@pytest.mark.parametrize("cls", [gpuhnsw.Index, gpuhnsw.BFIndex])
def test_every_public_method_documented(cls):
    import inspect
    import pydoc

    missing = [name for name, member in inspect.getmembers(cls)
               if not name.startswith("_") and (callable(member) or isinstance(member, property))
               and not (member.__doc__ or "").strip()]
    assert not missing, f"{cls.__name__} members without a docstring: {missing}"
    if cls is gpuhnsw.Index:
        text = pydoc.render_doc(cls)
        assert "squared L2" in text and "Width of the vectors" in text  # help() shows space and dim


def brute_range(base, queries, radius):
    """NumPy oracle: per query, the rows with squared L2 distance <= radius, nearest first."""
    out = []
    for q in queries.astype(np.float64):
        d = ((base.astype(np.float64) - q) ** 2).sum(1)
        rows = np.flatnonzero(d <= radius)
        out.append(rows[np.argsort(d[rows], kind="stable")])
    return out


def test_range_query_against_oracle(sift):
    index, base, queries = sift
    q = queries[:12]
    kth = np.sort(((base[None, :2000] - q[:, None]) ** 2).sum(-1), axis=1)
    radius = float(np.median(kth[:, 40]))  # a few rows past 16, others below: several doublings
    index.set_ef(200)
    offsets, labels, dists = index.range_query(q, radius)
    assert offsets.dtype == np.int64 and labels.dtype == np.uint64 and dists.dtype == np.float32
    assert offsets.shape == (13,) and offsets[0] == 0 and offsets[-1] == len(labels) == len(dists)
    truth = brute_range(base, q, radius)
    hits = total = 0
    for i, want in enumerate(truth):
        got, got_d = labels[offsets[i]:offsets[i + 1]], dists[offsets[i]:offsets[i + 1]]
        assert np.all(got_d <= radius) and np.all(np.diff(got_d) >= 0)
        hits += len(np.intersect1d(got.astype(np.int64), want))
        total += len(want)
    assert total > 12 * 16 and hits / total >= 0.97
    capped = index.range_query(q, radius, max_results=5)
    assert np.all(np.diff(capped[0]) <= 5)
    none = index.range_query(q, 0.0)
    assert none[0].tolist() == [0] * 13


def test_range_query_with_per_query_filter(sift):
    index, base, queries = sift
    allowed = [np.arange(r * 100, r * 100 + 300, dtype=np.uint64) for r in range(4)]
    offsets, labels, dists = index.range_query(queries[:4], 1e12, filter=allowed)  # everything allowed
    for r in range(4):
        np.testing.assert_array_equal(np.sort(labels[offsets[r]:offsets[r + 1]]), allowed[r])


@pytest.mark.parametrize("radius", [1e300, 3.5e38, float(np.finfo(np.float32).max)])
def test_range_query_radius_beyond_float32_returns_no_padding(sift, radius):
    """A radius above float32's maximum became inf in the comparison with the float32 distances, so
    the padding of a filtered search (label 2**64-1, distance inf) came back as hits."""
    index, _, queries = sift
    offsets, labels, dists = index.range_query(queries[:3], radius, filter=[1, 2])
    assert offsets.tolist() == [0, 2, 4, 6]
    assert sorted(labels.tolist()) == [1, 1, 1, 2, 2, 2] and np.isfinite(dists).all()


def test_auto_resize_grows_instead_of_raising(sift):
    _, base, queries = sift
    index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    index.init_index(100, M=12, ef_construction=80, auto_resize=True)
    index.add_items(base[:150])
    assert index.get_max_elements() >= 150
    for start in range(150, 2000, 370):
        index.add_items(base[start:start + 370], np.arange(start, min(2000, start + 370)))
    assert index.get_current_count() == 2000 and index.get_max_elements() < 4000
    assert index.check_integrity()["n_live"] == 2000
    plain = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    plain.init_index(100)
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        plain.add_items(base[:150])


def test_auto_resize_grows_for_new_labels_only(sift):
    """Updates of held labels (deleted ones included) and repeats within a batch take no slot, so
    they do not grow a full index; a batch with new labels grows it by at least what they need."""
    _, base, _ = sift
    index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    index.init_index(100, M=8, ef_construction=40, auto_resize=True)
    index.add_items(base[:100], np.arange(100))
    index.mark_deleted(7)
    index.add_items(base[100:180], np.arange(80))                      # 80 updates
    index.add_items(base[180:200], [7] * 20)                            # a deleted label, 20 times
    assert index.get_max_elements() == 100 and index.get_current_count() == 100
    np.testing.assert_array_equal(index.get_items([3]), base[103:104])
    index.add_items(base[200:260], np.r_[np.arange(50), [500] * 10])    # one new label
    assert index.get_max_elements() == 200 and index.get_current_count() == 101


def test_add_items_progress_bar(sift, capsys):
    _, base, _ = sift
    index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    index.init_index(len(base), M=8, ef_construction=40)
    index.add_items(base[:500])
    assert "add_items" not in capsys.readouterr().err  # not a terminal, and small: no bar
    index.add_items(base[500:], progress=True)
    assert "add_items" in capsys.readouterr().err
    assert index.get_current_count() == len(base) and index.check_integrity()["n_live"] == len(base)


@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_save_and_load_through_bytesio(sift, fmt, tmp_path):
    import io

    index, base, queries = sift
    index.mark_deleted([3, 4])
    buf = io.BytesIO()
    index.save_index(buf, format=fmt)
    index.save_index(tmp_path / "x.idx", format=fmt)
    assert buf.getvalue() == (tmp_path / "x.idx").read_bytes()
    buf.seek(0)
    loaded = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    loaded.load_index(buf)
    assert loaded.get_current_count() == index.get_current_count() and loaded.count_deleted == 2
    np.testing.assert_array_equal(loaded.knn_query(queries, k=5, ef=50)[0], index.knn_query(queries, k=5, ef=50)[0])
    with open(tmp_path / "x.idx", "rb") as f:  # an open file works too
        again = gpuhnsw.Index("l2", base.shape[1], device="cpu")
        again.load_index(f)
    assert again.get_current_count() == index.get_current_count()
    broken = io.BytesIO(buf.getvalue()[:1000])
    with pytest.raises(gpuhnsw.IndexFileError):
        gpuhnsw.Index("l2", base.shape[1], device="cpu").load_index(broken)


def test_bfindex_through_bytesio(sift):
    import io

    _, base, queries = sift
    bf = gpuhnsw.BFIndex("l2", base.shape[1], device="cpu")
    bf.init_index(1000)
    bf.add_items(base[:1000])
    buf = io.BytesIO()
    bf.save_index(buf)
    buf.seek(0)
    other = gpuhnsw.BFIndex("l2", base.shape[1], device="cpu")
    other.load_index(buf)
    np.testing.assert_array_equal(other.knn_query(queries, k=3)[0], bf.knn_query(queries, k=3)[0])


def test_save_and_load_through_an_fsspec_file(sift):
    import fsspec  # a test dependency (also of gpuhnsw.distributed)
    index, base, queries = sift
    fs = fsspec.filesystem("memory")
    with fs.open("/i11/sift.idx", "wb") as f:
        index.save_index(f)
    loaded = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    with fs.open("/i11/sift.idx", "rb") as f:
        loaded.load_index(f)
    fs.rm("/i11/sift.idx")
    np.testing.assert_array_equal(loaded.knn_query(queries, k=5, ef=50)[0], index.knn_query(queries, k=5, ef=50)[0])


# --------------------------------------------------------------------------- files: URLs, file objects

@pytest.mark.parametrize("fmt", ["gpuhnsw", "hnswlib"])
def test_save_and_load_through_fsspec_urls(sift, tmp_path, fmt, caplog):
    """save_index("memory://a.idx") failed with a path error although ShardedIndex.save takes any
    fsspec URL; now Index and BFIndex read and write URLs, through a temporary name and a move, and
    load_index says which format it found."""
    fsspec = pytest.importorskip("fsspec")
    index, base, queries = sift
    url = f"memory://everyday-{fmt}/a.idx"
    index.save_index(url, format=fmt)
    fs, path = fsspec.core.url_to_fs(url)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path.rsplit("/", 1)[0], detail=False)] == ["a.idx"]
    loaded = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    with caplog.at_level("INFO", logger="gpuhnsw"):
        loaded.load_index(url)
    assert f"{fmt}'s format" in caplog.text and url in caplog.text
    np.testing.assert_array_equal(loaded.knn_query(queries, k=5)[0], index.knn_query(queries, k=5)[0])
    local = f"file://{tmp_path}/b.idx"                        # file:// is a local path: mmap works
    index.save_index(local)
    mapped = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    mapped.load_index(local, mmap=True)
    assert len(mapped) == len(index)
    with pytest.raises(ValueError, match="needs a local file"):
        mapped.load_index(url, mmap=True)
    with pytest.raises(gpuhnsw.IndexFileNotFoundError, match="No such file"):
        mapped.load_index("memory://everyday-none/missing.idx")
    bf = gpuhnsw.BFIndex("l2", base.shape[1])
    bf.init_index(100)
    bf.add_items(base[:100])
    bf.save_index(f"memory://everyday-{fmt}/bf.idx", format=fmt)
    again = gpuhnsw.BFIndex("l2", base.shape[1])
    again.load_index(f"memory://everyday-{fmt}/bf.idx")
    assert again.get_current_count() == 100


def test_loading_a_file_object_left_at_its_end_says_so(sift):
    """Loading a BytesIO just saved into (not rewound) said "index file is empty"."""
    import io

    index, base, _ = sift
    buf = io.BytesIO()
    index.save_index(buf)
    other = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    with pytest.raises(gpuhnsw.IndexFileError, match=r"at its end .*seek\(0\)"):
        other.load_index(buf)
    buf.seek(0)
    other.load_index(buf)
    assert len(other) == len(index)
    with pytest.raises(gpuhnsw.IndexFileError, match="index file is empty"):
        other.load_index(io.BytesIO())                         # a really empty one is still that
