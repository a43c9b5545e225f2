"""scikit-learn adapter: :class:`KNNTransformer`, a drop-in for ``KNeighborsTransformer``.

It follows the ``KNeighborsTransformer`` contract, so it plugs into ``Pipeline`` s with Isomap, TSNE,
SpectralEmbedding or UMAP (``metric="precomputed"`` downstream)::

    from sklearn.manifold import Isomap
    from sklearn.pipeline import make_pipeline
    from gpuhnsw.sklearn import KNNTransformer

    pipe = make_pipeline(KNNTransformer(n_neighbors=10), Isomap(n_neighbors=10, metric="precomputed"))

UMAP takes a sparse precomputed graph only when it is symmetric, so give it ``symmetric=True``::

    pipe = make_pipeline(KNNTransformer(n_neighbors=15, symmetric=True),
                         umap.UMAP(n_neighbors=15, metric="precomputed"))

``fit_transform(X)`` builds the k-NN graph of ``X`` with :func:`gpuhnsw.knn_graph` (exact while
cheap, else NN-descent); ``transform`` of other rows queries the fitted rows (exact search while
cheap, else an HNSW index built once). Needs scikit-learn and scipy (``pip install
gpuhnsw[sklearn]``); the rest of gpuhnsw does not import them.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ._rows import normalize_rows
from ._surface import DEFAULT_SEED
from .exact import exact_search, rerank
from .knn_graph import AUTO_EXACT_LIMIT, METHODS, knn_graph, to_csr

__all__ = ["KNNTransformer"]

# metric -> (gpuhnsw space, take the square root of the distances)
METRICS = {"euclidean": ("l2", True), "sqeuclidean": ("l2", False), "cosine": ("cosine", False),
           "ip": ("ip", False)}


class KNNTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Sparse k-nearest-neighbour graph of the rows, as ``sklearn.neighbors.KNeighborsTransformer``.

    Parameters
    ----------
    mode : {"distance", "connectivity"}
        ``"distance"``: each row holds ``n_neighbors + 1`` entries (itself at distance 0, stored
        explicitly, and its ``n_neighbors`` nearest other rows) with their distances;
        ``"connectivity"``: ``n_neighbors`` entries (itself included) of value 1.
    n_neighbors : int
    metric : {"euclidean", "sqeuclidean", "cosine", "ip"}
        ``"ip"`` is hnswlib's ``1 - a.b``.
    method : {"auto", "exact", "nndescent", "hnsw"}
        How :func:`gpuhnsw.knn_graph` builds the graph of the fitted rows.
    device : {"auto", "cpu", "cuda", "cuda:N"}
    n_jobs : int, optional
        Threads; None or -1: all cores.
    random_state : int, optional
        Seed of NN-descent / HNSW (None: gpuhnsw's default seed, so results are reproducible).
    symmetric : bool
        ``fit_transform`` (and ``transform`` of the fitted rows) returns the union of the graph and
        its transpose: ``j`` in row ``i`` whenever ``i`` is among ``j``'s neighbours or ``j`` among
        ``i``'s, with their distance, so a row may hold more than ``n_neighbors + 1`` entries.
        UMAP's ``metric="precomputed"`` refuses sparse graphs that are not symmetric; estimators
        that read each row's nearest entries (Isomap, TSNE, UMAP) take it as it is.  Other rows'
        graphs are not square and stay as they are, so ``transform`` is then not a row-by-row map
        of the fitted rows (a reordered copy of them is other rows).

    Attributes
    ----------
    n_samples_fit_ : int
    n_features_in_ : int
    """

    def __init__(self, *, mode="distance", n_neighbors=5, metric="euclidean", method="auto",
                 device="auto", n_jobs=None, random_state=None, symmetric=False):
        self.mode = mode
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.method = method
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.symmetric = symmetric

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]   # distances are float32
        return tags

    def _check_params(self):
        if self.mode not in ("distance", "connectivity"):
            raise ValueError(f"mode must be 'distance' or 'connectivity', got {self.mode!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if (isinstance(self.n_neighbors, (bool, np.bool_))
                or not isinstance(self.n_neighbors, (int, np.integer)) or self.n_neighbors < 1):
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")

    def fit(self, X, y=None):
        """Store the rows of ``X`` [n, d]; the graph itself is built on the first transform."""
        self._check_params()
        X = validate_data(self, X, dtype=np.float32, order="C", ensure_min_samples=2)
        self._fit_X = X
        self.n_samples_fit_ = X.shape[0]
        self._n_features_out = X.shape[0]
        # memo of the fitted rows' own graph and of an HNSW index over them: one mutable dict made
        # here, so that transform leaves the estimator's attributes unchanged (sklearn's contract)
        self._cache = {}
        return self

    def transform(self, X):
        """Graph of the rows of ``X`` [m, d] to the fitted rows: CSR ``[m, n_samples_fit_]``."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, order="C", reset=False)
        k = self.n_neighbors + (self.mode == "distance")
        if k > self.n_samples_fit_:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                             f"n_samples_fit = {self.n_samples_fit_}, n_samples = {X.shape[0]}")
        space, root = METRICS[self.metric]
        fitted = X.shape == self._fit_X.shape and np.array_equal(X, self._fit_X)
        if fitted:
            ids, dists = self._self_graph(k, space)
        else:
            ids, dists = self._query(X, k, space)
        if self.mode == "connectivity":
            dists = np.ones_like(dists)
        elif root:
            dists = np.sqrt(np.maximum(dists, 0))
        graph = to_csr(ids, dists, self.n_samples_fit_)
        return _union_with_transpose(graph) if self.symmetric and fitted else graph

    def fit_transform(self, X, y=None):
        """``fit(X).transform(X)``: the k-NN graph of ``X``, each row's own entry included."""
        return self.fit(X).transform(X)

    # ---- helpers ----------------------------------------------------------------------------
    def _threads(self):
        return -1 if self.n_jobs is None else int(self.n_jobs)

    def _seed(self):
        return DEFAULT_SEED if self.random_state is None else int(self.random_state)

    def _self_graph(self, k, space):
        key = ("graph", k)
        if key not in self._cache:
            ids, dists, info = knn_graph(self._fit_X, k, space=space, method=self.method,
                                         device=self.device, include_self=True, squared=True,
                                         num_threads=self._threads(), random_seed=self._seed(),
                                         return_info=True)
            if info["method"] != "exact" and self._query_is_exact(self._fit_X):
                # the query path's float64 distances, so that transform gives a row the same
                # values whether or not X is the fitted data (NN-descent's are float32 sums)
                x = normalize_rows(self._fit_X) if space == "cosine" else self._fit_X
                ids, dists = rerank(x, x, ids, k, space)
            self._cache[key] = ids, dists
        return self._cache[key]

    def _query_is_exact(self, X):
        n, d = self._fit_X.shape
        return float(X.shape[0]) * n * d <= AUTO_EXACT_LIMIT or self.method == "exact"

    def _query(self, X, k, space):
        n, d = self._fit_X.shape
        if self._query_is_exact(X):
            return exact_search(self._fit_X, X, k, space, num_threads=self._threads(),
                                device=self.device)
        index = self._cache.get("index")
        if index is None:
            from .index import Index
            index = Index(space, d, device=self.device)
            index.init_index(n, M=16, ef_construction=200, random_seed=self._seed())
            index.add_items(self._fit_X, np.arange(n), num_threads=self._threads())
            self._cache["index"] = index
        index.set_ef(max(64, 2 * k))
        labels, dists = index.knn_query(X, k=k, num_threads=self._threads())
        return labels.astype(np.int64), dists


def _union_with_transpose(graph):
    """CSR [n, n]: the entries of ``graph`` and of its transpose, each pair once (where both hold
    it, the smaller distance: they differ by rounding only), explicit zeros kept (a row's own entry
    and duplicate rows are edges of length 0)."""
    import scipy.sparse

    coo = graph.tocoo()
    rows = np.concatenate([coo.row, coo.col]).astype(np.int64)
    cols = np.concatenate([coo.col, coo.row]).astype(np.int64)
    vals = np.concatenate([coo.data, coo.data])
    order = np.lexsort((vals, cols, rows))                     # per pair, the smaller distance first
    rows, cols, vals = rows[order], cols[order], vals[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    n = graph.shape[0]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[first], minlength=n), out=indptr[1:])
    return scipy.sparse.csr_matrix((vals[first], cols[first], indptr), shape=graph.shape)
