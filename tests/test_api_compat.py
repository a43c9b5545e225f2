"""gpuhnsw.Index / BFIndex next to hnswlib 0.8.0: names, signatures, defaults, results, exceptions.

Tests taking the ``lib`` fixture run once against gpuhnsw and once against hnswlib itself, so every
expectation written here is checked against the reference too (the hnswlib runs must always pass).
Calls that crash hnswlib (uninitialised index, ...) are only made on gpuhnsw, in test_errors.py.
"""
import ast
import inspect
import os
import pickle
import re
import sys

import numpy as np
import pytest

import gpuhnsw

DIM = 16
X = np.random.default_rng(7).random((200, DIM), dtype=np.float32)
PAD_LABEL = np.uint64(2**64 - 1)


@pytest.fixture(params=["gpuhnsw", "hnswlib"])
def lib(request):
    if request.param == "hnswlib":
        return request.getfixturevalue("hnswlib")
    return gpuhnsw


def built(lib, space="l2", n=50, capacity=60, allow_replace_deleted=False, M=8):
    """An index holding X[:n] under labels 0..n-1."""
    index = lib.Index(space, DIM)
    index.init_index(capacity, M=M, ef_construction=50, random_seed=1,
                     allow_replace_deleted=allow_replace_deleted)
    if n:
        index.add_items(X[:n])
    return index


# --------------------------------------------------------------------------- names and signatures

INDEX_METHODS = [
    "init_index", "add_items", "knn_query", "set_ef", "set_num_threads", "mark_deleted",
    "unmark_deleted", "get_items", "get_ids_list", "get_max_elements", "get_current_count",
    "resize_index", "save_index", "load_index", "index_file_size",
]
INDEX_PROPERTIES = {  # name -> writable
    "space": False, "dim": False, "M": False, "ef_construction": False, "max_elements": False,
    "element_count": False, "ef": True, "num_threads": True,
}
BF_METHODS = [
    "__init__", "init_index", "add_items", "delete_vector", "knn_query", "save_index", "load_index",
    "get_max_elements", "get_current_count", "set_num_threads",
]


def _split_top_level(text):
    """Split 'a: f[[int], bool] = None, b: int' on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def hnswlib_parameters(method):
    """[(name, default)] of a pybind11 method, from the signature line of its docstring (no self)."""
    first = method.__doc__.strip().splitlines()[0]
    match = re.match(r"\w+\((.*)\)\s*->", first)
    assert match, first
    params = []
    for part in _split_top_level(match.group(1)):
        if part in ("/", "*"):
            continue
        name, _, rest = part.partition(":")
        default = inspect.Parameter.empty
        if " = " in rest:
            default = ast.literal_eval(rest.rsplit(" = ", 1)[1].strip())
        params.append((name.strip(), default))
    assert params[0][0] == "self"
    return params[1:]


def check_signature(ours, theirs):
    """Same positional-or-keyword names, order and defaults; anything extra keyword-only."""
    expected = [(name, type(d), d) for name, d in hnswlib_parameters(theirs)]
    params = [p for p in inspect.signature(ours).parameters.values() if p.name != "self"]
    kinds = {p.name: p.kind for p in params}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds.values(), "no *args: names must be visible"
    assert inspect.Parameter.VAR_KEYWORD not in kinds.values(), "no **kwargs: names must be visible"
    positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
    got = [(p.name, type(p.default), p.default) for p in positional]
    assert got == expected
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in positional), kinds
    extras = [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    assert all(p.default is not inspect.Parameter.empty for p in extras), "extras need defaults"


def test_public_surface_covers_hnswlib(hnswlib):
    theirs = {n for n in dir(hnswlib.Index) if not n.startswith("_")}
    assert theirs == set(INDEX_METHODS) | set(INDEX_PROPERTIES)  # the lists below are complete
    ours = set(dir(gpuhnsw.Index))
    assert theirs <= ours
    theirs_bf = {n for n in dir(hnswlib.BFIndex) if not n.startswith("_")}
    assert theirs_bf == (set(BF_METHODS) - {"__init__"}) | {"num_threads"}
    assert theirs_bf <= set(dir(gpuhnsw.BFIndex))
    for name in ("__getstate__", "__setstate__"):
        assert name in vars(gpuhnsw.Index)
    assert gpuhnsw.Index.__repr__ is not object.__repr__      # the shared hnswlib-style repr


@pytest.mark.parametrize("name", INDEX_METHODS)
def test_index_method_signature(hnswlib, name):
    ours = getattr(gpuhnsw.Index, name)
    assert callable(ours) and not isinstance(inspect.getattr_static(gpuhnsw.Index, name), property)
    check_signature(ours, getattr(hnswlib.Index, name))


@pytest.mark.parametrize("name", BF_METHODS)
def test_bfindex_method_signature(hnswlib, name):
    check_signature(getattr(gpuhnsw.BFIndex, name), getattr(hnswlib.BFIndex, name))


@pytest.mark.parametrize("name, writable", sorted(INDEX_PROPERTIES.items()))
def test_properties_read_only_or_writable(lib, name, writable):
    index = built(lib, n=3)
    value = getattr(index, name)
    if writable:
        setattr(index, name, 3)
        assert getattr(index, name) == 3
    else:
        with pytest.raises(AttributeError):
            setattr(index, name, value)
        assert getattr(index, name) == value


def test_bfindex_num_threads_property(lib):
    bf = lib.BFIndex("l2", DIM)
    assert bf.num_threads >= 1
    bf.num_threads = 2
    assert bf.num_threads == 2
    bf.set_num_threads(1)
    assert bf.num_threads == 1


def test_extras_are_keyword_only():
    sig = inspect.signature(gpuhnsw.Index.knn_query).parameters
    assert sig["ef"].kind == sig["pad"].kind == inspect.Parameter.KEYWORD_ONLY
    assert sig["ef"].default is None and sig["pad"].default is False
    assert sig["filter"].default is None
    save = inspect.signature(gpuhnsw.Index.save_index).parameters
    assert save["format"].kind == inspect.Parameter.KEYWORD_ONLY
    assert save["format"].default == "gpuhnsw"
    index = built(gpuhnsw, n=20)
    with pytest.raises(TypeError):
        index.knn_query(X[:1], 1, -1, None, 30)  # ef only by keyword
    assert gpuhnsw.Index("l2", DIM, device="cpu").dim == DIM
    with pytest.raises(TypeError):
        gpuhnsw.Index("l2", DIM, "cpu")


# --------------------------------------------------------------------------- construction, properties

def test_constructor_forms(lib):
    assert lib.Index(space="ip", dim=DIM).space == "ip"
    index = lib.Index("cosine", DIM)
    assert (index.space, index.dim) == ("cosine", DIM)
    source = built(lib, n=20)
    for copy in (lib.Index(params=source.__getstate__()[0]), lib.Index(index=source),
                 lib.Index(source.__getstate__()[0]), lib.Index(source)):
        assert (copy.space, copy.dim, copy.element_count) == ("l2", DIM, 20)
    with pytest.raises(TypeError):
        lib.Index("l2")


def test_constructor_signature_shows_space_and_dim():
    """inspect.signature(Index) was (*args, device=..., storage=..., **kwargs): IDEs and help()
    showed neither space nor dim."""
    sig = inspect.signature(gpuhnsw.Index).parameters
    assert list(sig)[:2] == ["space", "dim"]
    assert all(sig[name].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for name in ("space", "dim"))
    assert all(sig[name].kind == inspect.Parameter.KEYWORD_ONLY
               for name in ("device", "storage", "params", "index"))
    assert not any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in sig.values())
    with pytest.raises(TypeError, match="space and dim, or one state dict"):
        gpuhnsw.Index(built(gpuhnsw).__getstate__()[0], DIM)


def test_properties_before_init(lib):
    index = lib.Index("l2", DIM)
    assert (index.space, index.dim) == ("l2", DIM)
    assert (index.M, index.ef_construction, index.max_elements, index.element_count) == (0, 0, 0, 0)
    assert index.ef == 10
    assert index.num_threads >= 1
    index.set_ef(42)
    assert index.ef == 42


def test_default_num_threads_matches_hnswlib(hnswlib):
    assert gpuhnsw.Index("l2", DIM).num_threads == hnswlib.Index("l2", DIM).num_threads
    assert gpuhnsw.BFIndex("l2", DIM).num_threads == hnswlib.BFIndex("l2", DIM).num_threads


def test_properties_after_init(lib):
    index = lib.Index("l2", DIM)
    index.init_index(100)
    assert (index.M, index.ef_construction, index.max_elements, index.element_count) == (16, 200, 100, 0)
    assert index.ef == 10
    assert (index.get_max_elements(), index.get_current_count()) == (100, 0)
    other = lib.Index("l2", DIM)
    other.init_index(max_elements=30, M=8, ef_construction=40, random_seed=5, allow_replace_deleted=True)
    assert (other.M, other.ef_construction, other.max_elements) == (8, 40, 30)
    other.add_items(X[:7])
    assert other.element_count == other.get_current_count() == 7


@pytest.mark.parametrize("M, ef_construction, expected", [(32, 5, 32), (8, 8, 8), (8, 9, 9), (4, 0, 4)])
def test_ef_construction_raised_to_M(lib, M, ef_construction, expected):
    index = lib.Index("l2", DIM)
    index.init_index(10, M=M, ef_construction=ef_construction)
    assert index.ef_construction == expected


def test_repr(lib):
    name = lib.__name__
    assert repr(lib.Index("l2", DIM)) == f"<{name}.Index(space='l2', dim={DIM})>"
    assert repr(built(lib, space="cosine")) == f"<{name}.Index(space='cosine', dim={DIM})>"
    assert repr(lib.BFIndex("ip", 3)) == f"<{name}.BFIndex(space='ip', dim=3)>"


# --------------------------------------------------------------------------- query results

def test_query_dtypes_and_shapes(lib):
    index = built(lib)
    labels, dists = index.knn_query(X[:4], k=3)
    assert labels.dtype == np.uint64 and dists.dtype == np.float32
    assert labels.shape == dists.shape == (4, 3)
    assert np.all(np.diff(dists, axis=1) >= 0)
    assert labels[:, 0].tolist() == [0, 1, 2, 3]
    assert np.all(dists[:, 0] == 0)
    # defaults: k=1; a 1-D query is one row; float64 and lists are cast
    assert index.knn_query(X[5])[0].shape == (1, 1)
    assert index.knn_query(X[5].astype(np.float64), k=2)[0].tolist() == index.knn_query(X[5], k=2)[0].tolist()
    assert index.knn_query(X[5:7].tolist(), k=2)[0].tolist() == index.knn_query(X[5:7], k=2)[0].tolist()
    labels, dists = index.knn_query(X[:4], k=0)
    assert labels.shape == dists.shape == (4, 0)
    assert labels.dtype == np.uint64 and dists.dtype == np.float32
    labels, dists = index.knn_query(np.empty((0, DIM), np.float32), k=3)
    assert labels.shape == (0, 3)
    # keyword names as hnswlib spells them
    index.knn_query(data=X[:2], k=2, num_threads=1, filter=None)


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_distances_as_hnswlib_defines_them(lib, space):
    index = built(lib, space=space, n=50)
    q = X[100:103] * 3.0
    labels, dists = index.knn_query(q, k=5)
    v = X[labels.astype(np.int64)].astype(np.float64)
    q64 = q.astype(np.float64)[:, None, :]
    if space == "l2":
        expected = ((v - q64) ** 2).sum(-1)
    elif space == "ip":
        expected = 1.0 - (v * q64).sum(-1)
    else:
        vn = v / np.linalg.norm(v, axis=-1, keepdims=True)
        qn = q64 / np.linalg.norm(q64, axis=-1, keepdims=True)
        expected = 1.0 - (vn * qn).sum(-1)
    np.testing.assert_allclose(dists, expected, rtol=1e-4, atol=1e-5)


def test_read_only_input_accepted(lib):
    data = X[:20].copy()
    data.setflags(write=False)
    index = lib.Index("l2", DIM)
    index.init_index(20)
    index.add_items(data, np.arange(20, dtype=np.uint64))
    assert index.knn_query(data, k=1)[0][:, 0].tolist() == list(range(20))


# --------------------------------------------------------------------------- exception types

# (case id, call, message fragment or None). Each call raises in hnswlib 0.8.0 without crashing.
BAD_CALLS = [
    ("unknown space", lambda lib: lib.Index("foo", DIM), "Space name must be one of l2, ip, or cosine"),
    ("bf unknown space", lambda lib: lib.BFIndex("foo", DIM), None),
    ("init twice", lambda lib: built(lib).init_index(10), "already initiated"),
    ("init negative capacity", lambda lib: lib.Index("l2", DIM).init_index(-1), None),
    ("add 3-D", lambda lib: built(lib).add_items(np.zeros((2, 2, DIM), np.float32)), None),
    ("add wrong width", lambda lib: built(lib).add_items(np.zeros((2, DIM - 1), np.float32)),
     "Wrong dimensionality of the vectors"),
    ("add label count", lambda lib: built(lib).add_items(X[:2], ids=[1]), None),
    ("add negative labels", lambda lib: built(lib).add_items(X[:2], ids=[-1, -2]), None),
    ("add negative scalar label", lambda lib: built(lib).add_items(X[:1], ids=-1), None),
    ("replace without allow", lambda lib: built(lib).add_items(X[50:52], replace_deleted=True),
     "Replacement of deleted elements is disabled in constructor"),
    ("capacity", lambda lib: built(lib).add_items(X[50:61]),
     "The number of elements exceeds the specified limit"),
    ("capacity zero", lambda lib: built(lib, n=0, capacity=0).add_items(X[:1]),
     "The number of elements exceeds the specified limit"),
    ("mark_deleted unknown", lambda lib: built(lib).mark_deleted(1000), "Label not found"),
    ("mark_deleted negative", lambda lib: built(lib).mark_deleted(-1), None),
    ("mark_deleted twice", lambda lib: [i := built(lib), i.mark_deleted(3), i.mark_deleted(3)],
     "already deleted"),
    ("unmark_deleted live", lambda lib: built(lib).unmark_deleted(3), "is not deleted"),
    ("unmark_deleted unknown", lambda lib: built(lib).unmark_deleted(1000), "Label not found"),
    ("re-add deleted with replacement on",
     lambda lib: [i := built(lib, allow_replace_deleted=True), i.mark_deleted(3), i.add_items(X[3], ids=[3])],
     "Can't use addPoint to update deleted elements"),
    ("get_items scalar", lambda lib: built(lib).get_items(5), None),
    ("get_items return_type", lambda lib: built(lib).get_items([5], return_type="foo"), None),
    ("get_items unknown", lambda lib: built(lib).get_items([1000]), "Label not found"),
    ("get_items deleted", lambda lib: [i := built(lib), i.mark_deleted(3), i.get_items([3])], "Label not found"),
    ("resize below count", lambda lib: built(lib).resize_index(10), "Cannot resize"),
    ("k > count", lambda lib: built(lib).knn_query(X[:2], k=51), "contiguous"),
    ("k > live", lambda lib: [i := built(lib, n=5), i.mark_deleted(0), i.knn_query(X[:2], k=5)], "contiguous"),
    ("k negative", lambda lib: built(lib).knn_query(X[:2], k=-1), None),
    ("query 3-D", lambda lib: built(lib).knn_query(np.zeros((2, 2, DIM), np.float32)), None),
    ("set_ef negative", lambda lib: built(lib).set_ef(-1), None),
    ("filter raises", lambda lib: built(lib).knn_query(X[:2], k=2, filter=lambda label: 1 / 0), None),
    ("load missing file", lambda lib: lib.Index("l2", DIM).load_index("/nonexistent/dir/x.bin"), None),
    ("bf capacity", lambda lib: [b := lib.BFIndex("l2", DIM), b.init_index(2), b.add_items(X[:3], np.arange(3))],
     "The number of elements exceeds the specified limit"),
]


@pytest.mark.parametrize("call, fragment", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_same_exception_type_as_hnswlib(hnswlib, call, fragment):
    with pytest.raises(Exception) as theirs:
        call(hnswlib)
    expected = theirs.type
    if fragment:
        assert fragment in str(theirs.value)
    with pytest.raises(expected) as ours:
        call(gpuhnsw)
    if fragment:
        assert fragment in str(ours.value)


# --------------------------------------------------------------------------- ids, items, labels

def test_get_ids_list_includes_deleted(lib):
    index = built(lib, n=10)
    index.mark_deleted(4)
    ids = index.get_ids_list()
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert sorted(ids) == list(range(10))
    assert index.element_count == index.get_current_count() == 10


def test_get_items(lib):
    index = built(lib, n=10)
    empty = index.get_items(None)
    assert isinstance(empty, np.ndarray) and empty.dtype == np.float32 and empty.size == 0
    assert index.get_items().size == 0
    items = index.get_items([3, 1])
    assert isinstance(items, np.ndarray) and items.dtype == np.float32 and items.shape == (2, DIM)
    np.testing.assert_array_equal(items, X[[3, 1]])
    np.testing.assert_array_equal(index.get_items(np.array([3, 1], dtype=np.uint64)), X[[3, 1]])
    as_list = index.get_items([3], return_type="list")
    assert isinstance(as_list, list) and isinstance(as_list[0], list) and len(as_list[0]) == DIM
    np.testing.assert_array_equal(np.array(as_list, np.float32), X[[3]])
    with pytest.raises(ValueError):
        index.get_items(3)
    with pytest.raises(ValueError):
        index.get_items([3], return_type="tuple")


def test_get_items_of_knn_query_labels(lib):
    """knn_query's labels [n, 1] go straight into get_items, as in hnswlib."""
    index = built(lib, n=10)
    labels, _ = index.knn_query(X[[3, 1, 7]], k=1)
    np.testing.assert_array_equal(index.get_items(labels), X[[3, 1, 7]])


def test_get_items_cosine_returns_normalised(lib):
    index = lib.Index("cosine", DIM)
    index.init_index(10)
    index.add_items(X[:3] * 3.0)
    items = index.get_items([0, 1, 2])
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(items, X[:3] / np.linalg.norm(X[:3], axis=1, keepdims=True), rtol=1e-6)


def test_cosine_zero_vector_has_distance_one(lib):
    index = lib.Index("cosine", DIM)
    index.init_index(10)
    index.add_items(X[:3])
    index.add_items(np.zeros(DIM, np.float32), ids=[9])
    labels, dists = index.knn_query(np.ones(DIM, np.float32), k=4)
    assert labels[0, -1] == 9 and dists[0, -1] == pytest.approx(1.0)


def test_auto_labels_advance_with_explicit_ids(lib):
    index = lib.Index("l2", DIM)
    index.init_index(10)
    index.add_items(X[:2], ids=[100, 101])
    index.add_items(X[2])  # hnswlib: auto label = cur_l (2), which advanced on the explicit call
    assert sorted(index.get_ids_list()) == [2, 100, 101]
    index.add_items(X[3:5])
    assert sorted(index.get_ids_list()) == [2, 3, 4, 100, 101]


def test_scalar_label_for_one_row(lib):
    index = built(lib, n=5)
    index.add_items(X[60], ids=77)
    assert index.knn_query(X[60], k=1)[0][0, 0] == 77


def test_readding_label_updates_in_place(lib):
    index = built(lib, n=50)
    new = X[150] + 2.0
    index.add_items(new, ids=[3])
    assert index.element_count == 50
    np.testing.assert_array_equal(index.get_items([3])[0], new)
    labels, dists = index.knn_query(new, k=1)
    assert labels[0, 0] == 3 and dists[0, 0] == 0


def test_readding_deleted_label_undeletes(lib):
    index = built(lib, n=50)
    index.mark_deleted(3)
    assert 3 not in index.knn_query(X[3], k=5)[0]
    index.add_items(X[120], ids=[3])
    assert index.element_count == 50
    labels, dists = index.knn_query(X[120], k=1)
    assert labels[0, 0] == 3 and dists[0, 0] == 0
    index.mark_deleted(3)  # live again, so deleting it again works


def test_readding_deleted_label_with_replacement_raises(lib):
    index = built(lib, n=50, allow_replace_deleted=True)
    index.mark_deleted(3)
    with pytest.raises(RuntimeError, match="update deleted elements"):
        index.add_items(X[3], ids=[3])
    index.unmark_deleted(3)
    assert index.knn_query(X[3], k=1)[0][0, 0] == 3


def test_replace_deleted(lib):
    index = built(lib, n=50, capacity=52, allow_replace_deleted=True)
    for label in (3, 4, 5):
        index.mark_deleted(label)
    new = X[150:153]
    index.add_items(new, ids=[200, 201, 202], replace_deleted=True)
    assert index.element_count == 50  # three vacancies reused
    ids = set(index.get_ids_list())
    assert {200, 201, 202} <= ids and not ids & {3, 4, 5}
    assert index.knn_query(new, k=1)[0][:, 0].tolist() == [200, 201, 202]
    with pytest.raises(RuntimeError, match="Label not found"):
        index.get_items([4])
    # no vacancy left: a plain add, up to the capacity
    index.add_items(X[153:155], ids=[300, 301], replace_deleted=True)
    assert index.element_count == 52
    with pytest.raises(RuntimeError, match="exceeds the specified limit"):
        index.add_items(X[155], ids=[302], replace_deleted=True)
    assert index.element_count == 52


def test_mark_and_unmark_deleted(lib):
    index = built(lib, n=50)
    index.mark_deleted(7)
    labels = index.knn_query(X[:50], k=10)[0]
    assert 7 not in labels
    index.unmark_deleted(7)
    assert index.knn_query(X[7], k=1)[0][0, 0] == 7


def test_filter_callable(lib):
    index = built(lib, n=50)
    labels, _ = index.knn_query(X[:5], k=3, filter=lambda label: label % 2 == 0)
    assert np.all(labels % 2 == 0)
    labels, _ = index.knn_query(X[:5], k=3, filter=lambda label: 1 if label > 10 else 0)
    assert np.all(labels > 10)


# --------------------------------------------------------------------------- copies, resize, files

@pytest.mark.parametrize("space", ["l2", "cosine"])
def test_pickle_round_trip(lib, space):
    index = built(lib, space=space, n=50)
    index.mark_deleted(5)
    index.set_ef(77)
    index.set_num_threads(1)
    copy = pickle.loads(pickle.dumps(index))
    assert (copy.ef, copy.num_threads) == (77, 1)
    assert (copy.space, copy.dim, copy.M, copy.ef_construction, copy.max_elements, copy.element_count) == (
        index.space, index.dim, index.M, index.ef_construction, index.max_elements, index.element_count)
    assert sorted(copy.get_ids_list()) == sorted(index.get_ids_list())
    for a, b in zip(copy.knn_query(X[:60], k=5), index.knn_query(X[:60], k=5)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError):
        copy.get_items([5])  # still deleted
    copy.add_items(X[60:62])  # a working index
    assert copy.element_count == 52 and index.element_count == 50


def test_pickle_uninitialised(lib):
    index = lib.Index("ip", DIM)
    index.set_ef(33)
    copy = pickle.loads(pickle.dumps(index))
    assert (copy.space, copy.dim, copy.ef, copy.max_elements) == ("ip", DIM, 33, 0)
    copy.init_index(10)
    copy.add_items(X[:3])
    assert copy.knn_query(X[1], k=1)[0][0, 0] == 1


def test_copy_constructor_is_deep(lib):
    index = built(lib, n=50)
    index.set_ef(33)
    copy = lib.Index(index)
    assert copy.ef == 33 and copy.element_count == 50 and repr(copy) == repr(index)
    for a, b in zip(copy.knn_query(X[:20], k=5), index.knn_query(X[:20], k=5)):
        np.testing.assert_array_equal(a, b)
    copy.add_items(X[50:52], ids=[500, 501])
    copy.mark_deleted(0)
    copy.add_items(X[100], ids=[1])
    assert index.element_count == 50 and copy.element_count == 52
    assert index.knn_query(X[0], k=1)[0][0, 0] == 0
    np.testing.assert_array_equal(index.get_items([1])[0], X[1])


def test_constructor_from_state_dict(lib):
    index = built(lib, n=50)
    copy = lib.Index(index.__getstate__()[0])
    for a, b in zip(copy.knn_query(X[:20], k=5), index.knn_query(X[:20], k=5)):
        np.testing.assert_array_equal(a, b)


def test_resize_index(lib):
    index = built(lib, n=50, capacity=50)
    before = index.knn_query(X[:50], k=5)
    with pytest.raises(RuntimeError, match="Cannot resize"):
        index.resize_index(49)
    index.resize_index(50)
    index.resize_index(120)
    assert index.max_elements == index.get_max_elements() == 120
    for a, b in zip(before, index.knn_query(X[:50], k=5)):
        np.testing.assert_array_equal(a, b)
    index.add_items(X[50:120])
    assert index.element_count == 120
    assert index.knn_query(X[119], k=1)[0][0, 0] == 119


def test_save_load_round_trip(lib, tmp_path):
    index = built(lib, n=50, capacity=80)
    index.mark_deleted(9)
    index.set_ef(40)
    path = str(tmp_path / "index.bin")
    index.save_index(path)
    loaded = lib.Index("l2", DIM)
    loaded.load_index(path)
    if lib is not gpuhnsw:
        assert loaded.ef == 10  # hnswlib's format does not keep ef (gpuhnsw's own format may)
    assert (loaded.M, loaded.ef_construction, loaded.max_elements, loaded.element_count) == (8, 50, 80, 50)
    loaded.set_ef(40)
    for a, b in zip(loaded.knn_query(X[:60], k=5), index.knn_query(X[:60], k=5)):
        np.testing.assert_array_equal(a, b)
    assert 9 not in loaded.knn_query(X[9], k=5)[0]
    bigger = lib.Index("l2", DIM)
    bigger.load_index(path, max_elements=200)
    assert bigger.max_elements == 200
    smaller = lib.Index("l2", DIM)
    smaller.load_index(path, max_elements=10)
    assert smaller.max_elements == 80


def test_index_file_size_is_hnswlib_file_size(lib, tmp_path):
    index = built(lib, n=50)
    path = tmp_path / "index.bin"
    if lib is gpuhnsw:
        index.save_index(str(path), format="hnswlib")
    else:
        index.save_index(str(path))
    assert index.index_file_size() == os.path.getsize(path)


def test_hnswlib_files_both_ways(hnswlib, tmp_path):
    ours = built(gpuhnsw, n=50)
    theirs_path = str(tmp_path / "theirs.bin")
    ours.save_index(theirs_path, format="hnswlib")
    theirs = hnswlib.Index("l2", DIM)
    theirs.load_index(theirs_path)
    same_answers(theirs.knn_query(X[:60], k=5), ours.knn_query(X[:60], k=5))
    theirs.add_items(X[50:55])
    theirs.mark_deleted(2)
    theirs.save_index(theirs_path)
    back = gpuhnsw.Index("l2", DIM)
    back.load_index(theirs_path)  # format detected
    assert back.element_count == 55 and len(back) == 54
    assert back.ef == 10  # as hnswlib after loading its own format
    same_answers(back.knn_query(X[:60], k=5), theirs.knn_query(X[:60], k=5))


@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_hnswlib_pickle_state_loads_whole(hnswlib, datasets, monkeypatch, space):
    """hnswlib's pickle state given to Index(dict), or an hnswlib pickle unpickled with gpuhnsw in
    hnswlib's place, became an empty index without a word; now it loads whole (its deletions, ef,
    replacement setting, seed) and answers as hnswlib does."""
    base, queries, _, _ = datasets("siftsmall", n_base=2000, n_queries=50)
    theirs = hnswlib.Index(space, base.shape[1])
    theirs.init_index(2500, M=8, ef_construction=60, random_seed=9, allow_replace_deleted=True)
    theirs.set_num_threads(1)
    theirs.add_items(base, np.arange(len(base)) * 3 + 1)
    for label in (4, 301, 5998):
        theirs.mark_deleted(label)
    theirs.set_ef(37)
    blob = pickle.dumps(theirs)
    monkeypatch.setitem(sys.modules, "hnswlib", gpuhnsw)
    for ours in (gpuhnsw.Index(theirs.__getstate__()[0]), pickle.loads(blob)):
        assert isinstance(ours, gpuhnsw.Index)
        assert (ours.element_count, len(ours), ours.max_elements, ours.ef, ours.M) == (2000, 1997, 2500, 37, 8)
        ours.check_integrity()
        same_answers(ours.knn_query(queries, k=10, num_threads=1), theirs.knn_query(queries, k=10, num_threads=1))
        ours.add_items(base[:1], [7], replace_deleted=True)   # allow_replace_deleted came along
        assert ours.element_count == 2000 and 7 in ours
    uninitialised = gpuhnsw.Index(hnswlib.Index(space, 8).__getstate__()[0])
    assert (uninitialised.dim, uninitialised.element_count) == (8, 0)


def test_damaged_hnswlib_pickle_state_is_refused(hnswlib):
    theirs = hnswlib.Index("l2", DIM)
    theirs.init_index(60, M=8)
    theirs.add_items(X[:50])
    good = theirs.__getstate__()[0]
    for key, value, fragment in (("data_level0", good["data_level0"][:-4], "data_level0 holds"),
                                 ("link_lists", good["link_lists"][:-4], "link_lists"),
                                 ("label_lookup_external", good["label_lookup_external"][::-1].copy(), "label_lookup"),
                                 ("element_levels", good["element_levels"][:10], "element_levels"),
                                 ("data_level0", bytes(good["data_level0"]), "data_level0 must be"),
                                 ("max_level", 2**40, "out of range"),
                                 ("ser_version", 2, "ser_version")):
        with pytest.raises(gpuhnsw.IndexFileError, match=fragment):
            gpuhnsw.Index({**good, key: value})
    missing = {k: v for k, v in good.items() if k != "link_lists"}
    with pytest.raises(gpuhnsw.IndexFileError, match="lacks link_lists"):
        gpuhnsw.Index(missing)


def test_initialised_state_without_its_arrays_is_refused():
    """Our own state with its arrays cut away said nothing and gave an empty index."""
    state = built(gpuhnsw).__getstate__()[0]
    for key in ("links0", "vectors"):
        with pytest.raises(gpuhnsw.IndexFileError, match=f"lacks .*{key}"):
            gpuhnsw.Index({k: v for k, v in state.items() if k != key})
    empty = gpuhnsw.Index({"space": "l2", "dim": DIM, "index_inited": False})
    assert empty.element_count == 0


def same_answers(a, b):
    """Same graph, two implementations: same labels, distances up to SIMD summation order."""
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- BFIndex

@pytest.mark.parametrize("space", ["l2", "ip", "cosine"])
def test_bfindex_exact(lib, space):
    from gpuhnsw.testing import exact_knn

    bf = lib.BFIndex(space, DIM)
    bf.init_index(100)
    bf.add_items(X[:100], np.arange(100))
    assert (bf.get_current_count(), bf.get_max_elements()) == (100, 100)
    q = X[150:160]
    if space == "cosine" and lib is not gpuhnsw:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)  # hnswlib 0.8.0 does not normalise queries (#592)
    labels, dists = bf.knn_query(q, k=5)
    assert labels.dtype == np.uint64 and dists.dtype == np.float32 and labels.shape == (10, 5)
    ids, expected = exact_knn(X[:100], q, 5, space)
    np.testing.assert_array_equal(labels, ids)
    np.testing.assert_allclose(dists, expected, rtol=1e-4, atol=1e-5)


def test_bfindex_k_larger_than_count_raises():
    bf = gpuhnsw.BFIndex("l2", DIM)
    bf.init_index(10)
    bf.add_items(X[:3], np.arange(3))
    with pytest.raises(RuntimeError, match="contiguous"):
        bf.knn_query(X[:1], k=5)
    bf.delete_vector(1)
    assert bf.get_current_count() == 2
    with pytest.raises(RuntimeError):
        bf.knn_query(X[:1], k=3)
    assert bf.knn_query(X[:1], k=2)[0].tolist() == [[0, 2]]


# --------------------------------------------------------------------------- gpuhnsw extras

def test_len_contains_count_deleted():
    index = built(gpuhnsw, n=50)
    assert len(index) == 50 and index.count_deleted == 0
    index.mark_deleted(3)
    index.mark_deleted(4)
    assert len(index) == 48 and index.count_deleted == 2 and index.element_count == 50
    assert 5 in index and 3 not in index and 1000 not in index
    index.unmark_deleted(3)
    assert len(index) == 49 and index.count_deleted == 1 and 3 in index
    assert len(gpuhnsw.Index("l2", DIM)) == 0


def test_get_neighbors():
    index = built(gpuhnsw, n=50)
    ids = set(index.get_ids_list())
    for label in range(50):
        neighbours = index.get_neighbors(label)
        assert isinstance(neighbours, np.ndarray) and neighbours.dtype == np.uint64
        assert 0 < len(neighbours) <= 2 * index.M
        assert label not in neighbours and set(neighbours.tolist()) <= ids
        assert len(set(neighbours.tolist())) == len(neighbours)
    assert index.get_neighbors(3, level=0).tolist() == index.get_neighbors(3).tolist()
    levels = index.get_levels(np.arange(50))
    top = int(np.argmax(levels))
    if levels[top] > 0:
        upper = index.get_neighbors(top, level=1)
        assert upper.dtype == np.uint64 and len(upper) <= index.M
    with pytest.raises(RuntimeError, match="Label not found"):
        index.get_neighbors(1000)


def test_check_integrity_and_levels():
    index = built(gpuhnsw, n=50)
    index.mark_deleted(1)
    report = index.check_integrity()
    assert report["n_live"] == 49 and report["n_deleted"] == 1
    levels = index.get_levels(np.arange(50))
    assert levels.dtype == np.uint8 and levels.shape == (50,)
    assert report["max_level"] == int(levels.max())
    assert report["n_edges"] >= 49
    with pytest.raises(RuntimeError, match="Label not found"):
        index.get_levels([1000])


def test_query_ef_and_pad_extras():
    index = built(gpuhnsw, n=20)
    labels, dists = index.knn_query(X[:2], k=25, pad=True)
    assert labels.shape == dists.shape == (2, 25)
    assert np.all(labels[:, 20:] == PAD_LABEL) and np.all(np.isinf(dists[:, 20:]))
    assert np.all(labels[:, :20] != PAD_LABEL) and np.all(np.isfinite(dists[:, :20]))
    index.knn_query(X[:2], k=5, ef=50)
    assert index.ef == 10
