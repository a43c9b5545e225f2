"""gpuhnsw beyond one machine, on Dask (docs/architecture.md, "Distributed"); ``pip install
"gpuhnsw[distributed]"``.  The core library never imports this package (nor Dask).

``ShardedIndex`` (``sharded``): an HNSW index split into shards over the workers, a shard per label
hash.  ``knn_graph`` (``graph``): every point's ``k`` nearest other points, from random shards or
overlapping k-means clusters.  What both use: ``common``.
"""
from .common import merge_topk, shard_of
from .graph import knn_graph
from .sharded import MANIFEST_VERSION, ShardedIndex

__all__ = ["ShardedIndex", "knn_graph", "shard_of", "merge_topk", "MANIFEST_VERSION"]
