"""gpuhnsw.sklearn.KNNTransformer: scikit-learn's own estimator checks, equality with
KNeighborsTransformer (exact method), NN-descent recall, Pipelines with Isomap and TSNE, and UMAP
both ways users reach for it (a symmetric precomputed graph, and knn_graph's precomputed_knn)."""
import os

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from sklearn.manifold import TSNE, Isomap  # noqa: E402
from sklearn.neighbors import KNeighborsTransformer  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import gpuhnsw  # noqa: E402
from gpuhnsw import testing  # noqa: E402
from gpuhnsw.sklearn import KNNTransformer  # noqa: E402


def _expected_failures(estimator):
    """symmetric=True makes the fitted rows' graph a property of all of them (its transpose is added),
    so it is not a row-by-row map of a reordered or cut copy of them: documented, not a defect."""
    if not estimator.symmetric:
        return {}
    why = "symmetric=True adds the transpose of the fitted rows' graph: not a row-by-row map"
    return {"check_methods_sample_order_invariance": why, "check_methods_subset_invariance": why}


@parametrize_with_checks([KNNTransformer(), KNNTransformer(mode="connectivity", metric="cosine"),
                          KNNTransformer(method="nndescent", n_neighbors=3), KNNTransformer(symmetric=True)],
                         expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("mode", ["distance", "connectivity"])
@pytest.mark.parametrize("metric,sk_metric", [("euclidean", "euclidean"), ("cosine", "cosine")])
def test_exact_equals_kneighbors_transformer(datasets, mode, metric, sk_metric):
    base, queries, _, _ = datasets("siftsmall", n_base=2000, n_queries=50)
    ours = KNNTransformer(n_neighbors=7, mode=mode, metric=metric, method="exact")
    theirs = KNeighborsTransformer(n_neighbors=7, mode=mode, metric=sk_metric)
    a, b = ours.fit_transform(base), theirs.fit_transform(base)
    assert a.shape == b.shape == (2000, 2000) and a.nnz == b.nnz
    np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours.transform(queries).toarray(), theirs.transform(queries).toarray(),
                               rtol=1e-5, atol=1e-4)
    assert (a.diagonal() == (0 if mode == "distance" else 1)).all()


def test_nndescent_graph_matches_sklearn_mostly(datasets):
    base, _, _, _ = datasets("siftsmall")
    ours = KNNTransformer(n_neighbors=10, method="nndescent").fit_transform(base)
    theirs = KNeighborsTransformer(n_neighbors=10).fit_transform(base)
    same = ours.multiply(theirs > 0) != 0      # nonzero entries of both graphs (not the diagonal)
    assert same.sum() / (theirs.nnz - 10000) >= 0.95


def test_pipelines_with_isomap_and_tsne(datasets):
    base, _, _, _ = datasets("mnist", n_base=600, n_queries=1)
    ref = make_pipeline(KNeighborsTransformer(n_neighbors=10),
                        Isomap(n_neighbors=10, metric="precomputed")).fit_transform(base)
    emb = make_pipeline(KNNTransformer(n_neighbors=10, method="exact"),
                        Isomap(n_neighbors=10, metric="precomputed")).fit_transform(base)
    np.testing.assert_allclose(np.abs(emb), np.abs(ref), rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    tsne = make_pipeline(KNNTransformer(n_neighbors=31),
                         TSNE(metric="precomputed", init="random", perplexity=10, max_iter=250,
                              random_state=0)).fit_transform(base)
    assert tsne.shape == (600, 2) and np.isfinite(tsne).all()


def test_symmetric_graph_is_the_union_with_the_transpose(datasets):
    base, _, _, _ = datasets("siftsmall", n_base=1500, n_queries=1)
    plain = KNNTransformer(n_neighbors=8, method="exact").fit_transform(base)
    sym = KNNTransformer(n_neighbors=8, method="exact", symmetric=True).fit_transform(base)
    dense, want = plain.toarray(), sym.toarray()
    stored = (plain != 0).toarray() | np.eye(len(base), dtype=bool)
    np.testing.assert_array_equal((sym != 0).toarray() | np.eye(len(base), dtype=bool), stored | stored.T)
    both = np.where(stored, dense, dense.T)
    np.testing.assert_allclose(want[stored | stored.T], both[stored | stored.T], rtol=1e-6)
    assert sym.nnz == (stored | stored.T).sum() and (sym.diagonal() == 0).all()   # own entries kept
    queries = base[:10] + 1.0
    assert (KNNTransformer(n_neighbors=8, symmetric=True).fit(base).transform(queries) != 0).sum(1).max() == 9


@pytest.fixture(scope="module")
def umap_module():
    """umap-learn (in the test extra): skips where it is missing, fails in CI."""
    try:
        import umap
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("umap-learn is not installed; CI must have it (test extra)", pytrace=False)
        pytest.skip("umap-learn is not installed")
    return umap


def test_umap_takes_our_graphs_and_keeps_its_trustworthiness(datasets, umap_module):
    """KNNTransformer's graph went into UMAP(metric="precomputed") only to be refused as not
    symmetric, and knn_graph's squared l2 distances reached precomputed_knn as if euclidean; both
    routes now give embeddings as trustworthy as UMAP's own k-NN graph."""
    from sklearn.manifold import trustworthiness

    base, _, _, _ = datasets("mnist", n_base=3000, n_queries=1)
    x = np.asarray(base, dtype=np.float32)
    params = dict(n_neighbors=15, random_state=0, n_epochs=200)
    own = umap_module.UMAP(**params).fit_transform(x)
    ids, dists = gpuhnsw.knn_graph(x, 15, include_self=True, method="exact")
    np.testing.assert_allclose(dists[:, 1:] ** 2, gpuhnsw.knn_graph(x, 14, method="exact")[1], rtol=1e-5)
    precomputed = umap_module.UMAP(precomputed_knn=(ids, dists, None), **params).fit_transform(x)
    piped = make_pipeline(KNNTransformer(n_neighbors=15, symmetric=True),
                          umap_module.UMAP(metric="precomputed", **params)).fit_transform(x)
    with pytest.raises(ValueError, match="symmetrical"):   # what users met before symmetric=True
        make_pipeline(KNNTransformer(n_neighbors=15), umap_module.UMAP(metric="precomputed", **params)).fit(x)
    score = {name: trustworthiness(x, emb, n_neighbors=10)
             for name, emb in (("own", own), ("precomputed_knn", precomputed), ("pipeline", piped))}
    assert score["own"] > 0.9, score
    assert score["precomputed_knn"] >= score["own"] - 0.01 and score["pipeline"] >= score["own"] - 0.01, score
