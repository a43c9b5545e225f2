"""What gpuhnsw's index classes share with hnswlib's Python surface: its defaults, its words for "fewer
than k results", the label that pads a result, and the property block that ``Index``, ``BFIndex`` and
``ShardedIndex`` each expose.
"""
from __future__ import annotations

import numpy as np

from ._core import NO_LABEL as _NO_LABEL
from ._validate import num_threads as num_threads_rule

__all__ = ["DEFAULT_SEED", "NOT_FOUND", "NO_LABEL", "Surface", "IndexSurface"]

#: hnswlib's default ``random_seed`` (``init_index``); also the seed of indexes read from hnswlib
#: files, which do not store one.
DEFAULT_SEED = 100
#: hnswlib's words for "fewer than k results", the start of every such message of ours (existing
#: code matches on them).
NOT_FOUND = "Cannot return the results in a contiguous 2D array"
#: The label of a missing result (``pad=True``), with distance ``inf``: uint64 max.
NO_LABEL = np.uint64(_NO_LABEL)


class Surface:
    """``space``, ``dim`` and the repr, read from ``_space`` and ``_dim``."""

    _space: str
    _dim: int

    @property
    def space(self) -> str:
        """``'l2'`` (squared L2), ``'ip'`` (1 - dot) or ``'cosine'`` (ip on normalised vectors)."""
        return self._space

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        return self._dim

    def __repr__(self):
        return f"<gpuhnsw.{type(self).__name__}(space='{self._space}', dim={self._dim})>"


class IndexSurface(Surface):
    """:class:`Surface` plus hnswlib's counts and thread count, over the subclass's
    ``get_max_elements``, ``get_current_count`` and ``_num_threads``."""

    _num_threads: int

    @property
    def max_elements(self) -> int:
        """Capacity (see :meth:`get_max_elements`)."""
        return self.get_max_elements()

    @property
    def element_count(self) -> int:
        """Elements stored (see :meth:`get_current_count`)."""
        return self.get_current_count()

    @property
    def num_threads(self) -> int:
        """Default thread count (read-write, see :meth:`set_num_threads`)."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value):
        self.set_num_threads(value)

    def set_num_threads(self, num_threads: int) -> None:
        """Default thread count of the calls that take one (<= 0: every core)."""
        self._num_threads = num_threads_rule(num_threads)
