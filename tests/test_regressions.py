"""Regression tests, each named after the bug it pins."""
import numpy as np
import pytest

import gpuhnsw


def test_query_of_a_very_wide_index_does_not_overflow_the_stack():
    """The padded query row once lived on the search thread's stack (alloca): a 12 MB row crashed."""
    dim = 3_000_000
    x = np.random.default_rng(0).random((3, dim), dtype=np.float32)
    index = gpuhnsw.Index("l2", dim)
    index.init_index(3, M=2)
    index.add_items(x)
    labels, dists = index.knn_query(x[:2], k=2)
    assert labels[:, 0].tolist() == [0, 1] and np.all(dists[:, 0] == 0)


def test_python_int_labels_above_2_63_mixed_with_small_ones_stay_exact():
    """NumPy turns a list like [2**64 - 2, 5] into float64 (the ints fit neither int64 nor uint64
    together), which rounds above 2**53: add_items stored label 0 for 2**64 - 2 (and 2**63 for
    2**63 + 1), filters, mark_deleted and get_items named other labels, and a filter set holding
    such a label raised OverflowError (it went through int64).  hnswlib converts them exactly."""
    big, odd = 2**64 - 2, 2**63 + 1
    x = np.arange(3, dtype=np.float32)[:, None]
    index = gpuhnsw.Index("l2", 1)
    index.init_index(4, M=2)
    index.add_items(x, [big, odd, 5])
    assert sorted(index.get_ids_list()) == [5, odd, big]
    assert index.get_items([odd, big]).ravel().tolist() == [1.0, 0.0]
    for allowed in ({big}, [big, 5], (big, 7)):
        labels, _ = index.knn_query(np.zeros(1, np.float32), k=1, filter=allowed)
        assert labels.tolist() == [[big]], allowed
    index.mark_deleted([[odd, 5]])
    assert odd not in index and 5 not in index and big in index
    with pytest.raises(OverflowError):
        index.add_items(x[:2], [2**64, 5])
    with pytest.raises(ValueError, match="integers"):
        index.add_items(x[:2], [1.5, 2])


def test_a_rejected_add_items_with_auto_resize_keeps_the_capacity():
    """With auto_resize, add_items grew the index before the engine refused the batch (replace_deleted
    without allow_replace_deleted, or an update of a deleted label with it), so a rejected call
    changed the capacity.  Found by the model-based walk."""
    x = np.random.default_rng(0).random((4, 3), dtype=np.float32)
    for allow in (False, True):
        index = gpuhnsw.Index("l2", 3)
        index.init_index(2, M=2, allow_replace_deleted=allow, auto_resize=True)
        index.add_items(x[:2], [0, 1])
        index.mark_deleted(1)
        with pytest.raises(RuntimeError, match="Can't use addPoint" if allow else "disabled"):
            index.add_items(x[2:], [1, 2] if allow else [2, 3], replace_deleted=not allow)
        assert index.get_max_elements() == 2 and index.get_current_count() == 2
        index.add_items(x[2:], [2, 3])    # and the next insert still grows it
        assert index.get_max_elements() == 4


def test_a_refused_add_items_in_progress_parts_changes_nothing(datasets):
    """With progress=True a large add went in as parts; a later part that updated a deleted label
    of an index with allow_replace_deleted was refused after the earlier parts were in (10,002 rows:
    the count went to 10,001 after the refused call)."""
    base, _, _, _ = datasets("siftsmall")
    index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    index.init_index(20_000, M=8, ef_construction=40, allow_replace_deleted=True)
    index.add_items(base[:2])
    index.mark_deleted(1)
    rows = np.concatenate([base, base[:2]])                 # 10,002 rows: new labels, then label 1
    labels = np.concatenate([np.arange(100, 10_100), [5000, 1]])
    with pytest.raises(RuntimeError, match="update deleted elements"):
        index.add_items(rows, labels, progress=True)
    assert index.get_current_count() == 2 and index.count_deleted == 1
