"""Regression tests, each named after the bug it pins."""
import numpy as np

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
