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
