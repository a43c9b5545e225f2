"""gpuhnsw.sklearn.KNNTransformer: scikit-learn's own estimator checks, equality with
KNeighborsTransformer (exact method), NN-descent recall, and Pipelines with Isomap and TSNE."""
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from sklearn.manifold import TSNE, Isomap  # noqa: E402
from sklearn.neighbors import KNeighborsTransformer  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from gpuhnsw import testing  # noqa: E402
from gpuhnsw.sklearn import KNNTransformer  # noqa: E402


@parametrize_with_checks([KNNTransformer(), KNNTransformer(mode="connectivity", metric="cosine"),
                          KNNTransformer(method="nndescent", n_neighbors=3)])
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
