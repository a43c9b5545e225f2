"""Model-based test: an ``Index`` and a plain Python model of what it must hold, driven side by side
through every public mutation by hypothesis (a ``RuleBasedStateMachine``).

The model is hnswlib 0.8.0's semantics (``HNSWLIB_COMPAT.md``): label -> stored vector, the deleted
set, capacity, ``ef``, the auto-label counter.  Rules: ``add_items`` (new labels, updates, undeletes,
``replace_deleted``, auto labels, several C threads, several Python threads at once, and rejected
calls), ``mark_deleted`` / ``unmark_deleted`` (scalars and arrays), ``resize_index``, ``set_ef``,
save/load in both formats (paths, file objects, ``mmap=True``), pickle, ``Index(other)`` and
``Index(state)``.  After every step: ``check_integrity()``, the counts, every live label returns its
vector, deleted labels are never returned, a query with ``ef`` >= the element count (plain and under a
label filter) agrees with brute force over the model, and a save/load round trip is equal.

Exactness: with ``ef`` at least the element count the level-0 search never drops a candidate, so it
returns the true top-k of the live (allowed) elements that level 0 reaches from where the greedy
descent ends: the entry point if the index has one level, else a node of level >= 1.  Pruning may
legitimately strand nodes (``check_integrity(require_reachable=True)``), so the oracle is exact
brute force when those starting points reach every element at level 0, and otherwise exact over
what one of them reaches.

Small M (2-6), few dimensions, a small label universe and grid-valued vectors (duplicates, zero
vectors, ties) make rare shapes common; rows of siftsmall and minilm-debian (128-d, 384-d) run too.
CI runs a fixed, derandomised set of examples (``GHNSW_TORTURE_SCALE`` scales it, as for the
concurrency torture); ``GHNSW_SOAK=1`` runs ``GHNSW_SOAK_EXAMPLES`` random examples (seed:
pytest's ``--hypothesis-seed``) and prints the number of steps run.
"""
import io
import itertools
import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest
from conftest import run_threads
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, \
    run_state_machine_as_test

import gpuhnsw
from gpuhnsw._reference import ReferenceGraph
from gpuhnsw._search_graph import build as build_search_graph

SOAK = os.environ.get("GHNSW_SOAK") == "1"
SCALE = float(os.environ.get("GHNSW_TORTURE_SCALE", "1"))
EXAMPLES = int(os.environ.get("GHNSW_SOAK_EXAMPLES", "2000")) if SOAK else max(4, int(250 * SCALE))
STEPS = 50 if SOAK else 30

SPACES = ("l2", "ip", "cosine")
SMALL_LABELS = 48                               # labels 0..47 (auto labels start at 0 too): collisions
BIG_LABELS = (2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1)
MAX_COUNT = 160                                 # new labels beyond this count are not drawn
DATASETS = {"siftsmall": None, "minilm-debian": None}   # name -> base rows, float32 [2000, dim]

steps_run = itertools.count()   # states checked (after set-up and after each rule), across examples


class Model:
    """What the index must hold, by hnswlib's rules."""

    def __init__(self, space, capacity, allow_replace_deleted, auto_resize):
        self.space = space
        self.vectors = {}      # label -> float32 [dim] as stored (cosine: normalised), deleted ones included
        self.deleted = set()
        self.capacity = capacity
        self.allow_replace_deleted = allow_replace_deleted
        self.auto_resize = auto_resize
        self.ef = 10
        self.cur_l = 0         # the auto-label counter

    @property
    def count(self):
        return len(self.vectors)

    @property
    def live(self):
        return [label for label in self.vectors if label not in self.deleted]

    def stored(self, row):
        """float32 [dim]: the row as the index stores it (cosine: C's normalisation)."""
        row = np.asarray(row, dtype=np.float32)
        if self.space != "cosine":
            return row.copy()
        norm = np.float32(np.sqrt(np.sum(row.astype(np.float64) ** 2)))
        return (row * (np.float32(1) / (norm + np.float32(1e-30)))).astype(np.float32)

    def add_outcome(self, labels, replace_deleted):
        """For an add of rows under ``labels`` (resolved, one per row): the error substring it must
        raise (None: it succeeds), the number of deleted labels it recycles, and the capacity after
        it (auto_resize grows it, at least doubling, when the batch's new labels would overflow it)."""
        if replace_deleted and not self.allow_replace_deleted:
            return "Replacement of deleted elements is disabled", 0, self.capacity
        if self.allow_replace_deleted and any(label in self.deleted for label in labels):
            return "Can't use addPoint to update deleted elements", 0, self.capacity
        capacity = self.capacity
        new = len({label for label in labels if label not in self.vectors})
        if self.auto_resize and self.count + new > capacity:   # updates and repeats take no slot
            capacity = max(self.count + new, 2 * capacity)
        recycled = min(new, len(self.deleted)) if replace_deleted else 0
        if self.count + new - recycled > capacity:
            return "exceeds the specified limit", 0, self.capacity
        return None, recycled, capacity

    def apply_add(self, labels, data):
        for label, row in zip(labels, data):
            self.vectors[label] = self.stored(row)
            self.deleted.discard(label)   # hnswlib: re-adding a deleted label undeletes it

    def recycle(self, gone):
        """``gone``: the deleted labels a replace_deleted add reused (the index chooses which)."""
        assert gone <= self.deleted, f"replace_deleted recycled labels that were not deleted: {gone - self.deleted}"
        for label in gone:
            del self.vectors[label]
        self.deleted -= gone


def distances(space, q, vectors):
    """float64 [n]: distances from q float32 [dim] to vectors float32 [n, dim], as the index defines them."""
    q = q.astype(np.float64)
    v = vectors.astype(np.float64)
    if space == "l2":
        return ((v - q) ** 2).sum(axis=1)
    if space == "cosine":
        q = q / (np.sqrt((q * q).sum()) + 1e-30)
    return 1.0 - v @ q


def tolerance(q, vectors):
    """float64 [n]: float32 rounding allowance of each distance (scaled by the magnitudes)."""
    qq = float((q.astype(np.float64) ** 2).sum())
    return 1e-4 * (1.0 + qq + (vectors.astype(np.float64) ** 2).sum(axis=1))


def level0_reach(graph, start):
    """bool [n]: the slots level 0 reaches from ``start`` (as the C search reads lists)."""
    seen = np.zeros(graph.n, dtype=bool)
    seen[start] = True
    todo = [start]
    while todo:
        s = todo.pop()
        for t in graph.links0[s, :min(int(graph.degree0[s]), graph.M0)]:
            if t < graph.n and not seen[t]:
                seen[t] = True
                todo.append(int(t))
    return seen


def topk_matches(got_labels, got_dists, pool_labels, pool_dists, pool_tol, k, space):
    """None if (got_labels, got_dists) is a correct top-k of the pool (ties in any order), else why."""
    want = min(k, len(pool_labels))
    if len(got_labels) != want:
        return f"{len(got_labels)} results, expected {want}"
    where = {int(label): i for i, label in enumerate(pool_labels)}
    if len(set(got_labels.tolist())) != len(got_labels):
        return f"duplicate labels {got_labels}"
    order = np.argsort(pool_dists, kind="stable")
    for j, (label, d) in enumerate(zip(got_labels.tolist(), got_dists.tolist())):
        i = where.get(label)
        if i is None:
            return f"label {label} is not among the {len(pool_labels)} eligible"
        if abs(d - pool_dists[i]) > pool_tol[i]:
            return f"label {label}: distance {d}, true {pool_dists[i]}"
        best = order[j]
        if pool_dists[i] > pool_dists[best] + pool_tol[i] + pool_tol[best]:
            return f"rank {j}: label {label} at {pool_dists[i]}, but label {pool_labels[best]} is at {pool_dists[best]}"
    return None


class IndexMachine(RuleBasedStateMachine):
    """One Index and its Model; every rule does the same thing to both (or predicts the error)."""

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="ghnsw-model-")
        self.files = itertools.count()
        self.index = self.model = None
        self.rng = np.random.default_rng(0)
        self.mapped_path = None   # the file the current index's rows are mapped from

    def teardown(self):
        self.index = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ set-up and data
    @initialize(space=st.sampled_from(SPACES), source=st.sampled_from(("grid", "gauss", "siftsmall", "minilm-debian")),
                dim=st.integers(1, 8), M=st.integers(2, 6), ef_construction=st.integers(1, 24),
                capacity=st.integers(0, 40), allow_replace_deleted=st.booleans(), auto_resize=st.booleans(),
                seed=st.integers(0, 2**32 - 1), search_graph=st.sampled_from(("hnsw", "optimized")))
    def init(self, space, source, dim, M, ef_construction, capacity, allow_replace_deleted, auto_resize, seed,
             search_graph):
        self.source = source
        if source in DATASETS:
            dim = DATASETS[source].shape[1]
        self.index = gpuhnsw.Index(space, dim, device="cpu", search_graph=search_graph)
        self.index.init_index(capacity, M=M, ef_construction=ef_construction, random_seed=seed,
                              allow_replace_deleted=allow_replace_deleted, auto_resize=auto_resize)
        self.model = Model(space, capacity, allow_replace_deleted, auto_resize)
        self.dim = dim

    def rows(self, data, n):
        """float32 [n, dim]: fresh rows of this machine's source, some of them copies of stored vectors."""
        seed = data.draw(st.integers(0, 2**32 - 1), label="rows seed")
        rng = np.random.default_rng(seed)
        if self.source in DATASETS:
            base = DATASETS[self.source]
            out = base[rng.integers(0, base.shape[0], n)].copy()
        elif self.source == "grid":   # values -1, 0, 1: duplicates, zero rows and distance ties
            out = rng.integers(-1, 2, (n, self.dim)).astype(np.float32)
        else:
            out = rng.standard_normal((n, self.dim), dtype=np.float32)
        stored = list(self.model.vectors.values())
        if stored and n:
            for i in np.flatnonzero(rng.random(n) < 0.15):   # an exact copy of a stored vector
                out[i] = stored[int(rng.integers(len(stored)))]
        return out

    def some_labels(self, data, n, *, new_ok=True):
        """n labels, mostly from the small universe (so existing, deleted and new ones all come up)."""
        pools = [st.integers(0, SMALL_LABELS - 1)]
        if self.model.vectors:
            pools.append(st.sampled_from(sorted(self.model.vectors)))
        if self.model.deleted:
            pools.append(st.sampled_from(sorted(self.model.deleted)))
        if new_ok:
            pools.append(st.sampled_from(BIG_LABELS))
        return data.draw(st.lists(st.one_of(*pools), min_size=n, max_size=n), label="labels")

    def replace_index(self, index, *, mapped_path=None):
        self.index = index
        self.mapped_path = mapped_path

    # ------------------------------------------------------------------ add_items
    @rule(data=st.data(), n=st.integers(0, 18), ids=st.sampled_from(("array", "list", "auto", "scalar")),
          replace_deleted=st.booleans(), num_threads=st.sampled_from((-1, 1, 2, 3)))
    def add(self, data, n, ids, replace_deleted, num_threads):
        m = self.model
        if m.count >= MAX_COUNT:
            ids = "known"
        if ids == "scalar":
            n = 1
        x = self.rows(data, n)
        if ids == "auto":
            labels, arg = list(range(m.cur_l, m.cur_l + n)), None
        elif ids == "known" and m.vectors:
            labels = data.draw(st.lists(st.sampled_from(sorted(m.vectors)), min_size=n, max_size=n))
            arg = np.array(labels, dtype=np.uint64)
        else:
            labels = self.some_labels(data, n, new_ok=ids != "known")
            arg = labels[0] if ids == "scalar" else labels if ids == "list" else np.array(labels, dtype=np.uint64)
        error, recycled, capacity = m.add_outcome(labels, replace_deleted)
        before = set(self.index.get_ids_list())
        if error:
            with pytest.raises(RuntimeError, match=error):
                self.index.add_items(x, arg, num_threads=num_threads, replace_deleted=replace_deleted)
            return
        self.index.add_items(x, arg, num_threads=num_threads, replace_deleted=replace_deleted)
        m.cur_l += n
        m.capacity = capacity
        m.apply_add(labels, x)
        gone = before - set(self.index.get_ids_list())
        assert len(gone) == recycled, f"replace_deleted recycled {len(gone)} deleted labels, expected {recycled}"
        m.recycle(gone)

    @rule(data=st.data(), bad=st.sampled_from(("width", "nan", "negative", "ids length", "3-d")))
    def add_rejected(self, data, bad):
        """Bad input raises before anything changes (the model does not change)."""
        x = self.rows(data, 2)
        ids = np.array([1, 2], dtype=np.int64)
        if bad == "width":
            x = np.concatenate([x, x[:, :1]], axis=1)
        elif bad == "nan":
            x[1, 0] = np.nan
        elif bad == "negative":
            ids[1] = -1
        elif bad == "ids length":
            ids = ids[:1]
        else:
            x = x[None]
        with pytest.raises((ValueError, OverflowError)):
            self.index.add_items(x, ids)

    @precondition(lambda self: self.model.count < MAX_COUNT)
    @rule(data=st.data(), n_threads=st.integers(2, 3))
    def add_from_threads(self, data, n_threads):
        """add_items from several Python threads at once (disjoint labels: new, or updates of live
        ones), beside queries and, unless a thread recycles deleted slots, deletes."""
        m = self.model
        # every batch must fit whatever the order: no refusal, and no resize (auto_resize counts rows)
        room = m.capacity - m.count
        live = m.live
        pool = [label for label in range(SMALL_LABELS, SMALL_LABELS + 64) if label not in m.vectors]
        pool = pool[:max(0, room)] + data.draw(st.permutations(live), label="live order")
        if m.auto_resize:
            pool = pool[:max(0, room)]
        taken = data.draw(st.lists(st.integers(0, 12), min_size=n_threads, max_size=n_threads), label="sizes")
        batches, start = [], 0
        for size in taken:
            batches.append(pool[start:start + size])
            start += size
        replace = [m.allow_replace_deleted and data.draw(st.booleans(), label="replace") for _ in batches]
        doomed = [] if any(replace) else [label for label in live if label not in pool[:start]][:3]
        xs = [self.rows(data, len(b)) for b in batches]
        threads = data.draw(st.lists(st.sampled_from((1, 2)), min_size=n_threads, max_size=n_threads))
        before = set(self.index.get_ids_list())
        may_return = set(m.live) | set(pool[:start])
        probe = self.rows(data, 3)
        returned = []

        def add(i):
            return lambda: self.index.add_items(xs[i], np.array(batches[i], dtype=np.uint64),
                                                num_threads=threads[i], replace_deleted=replace[i])

        def query():
            for _ in range(4):
                labels, dists = self.index.knn_query(probe, k=3, pad=True)
                returned.extend(labels[np.isfinite(dists)].tolist())

        def delete():
            for label in doomed:
                self.index.mark_deleted(label)

        run_threads(*[add(i) for i in range(n_threads)], query, delete)
        assert set(returned) <= may_return, f"a query returned labels never live: {set(returned) - may_return}"
        # the batches that recycle deleted slots take as many as they have new labels, while any last
        # (no deletes run beside them)
        new_replacing = sum(len([lb for lb in b if lb not in m.vectors]) for b, r in zip(batches, replace) if r)
        recycled = min(new_replacing, len(m.deleted))
        for b, x in zip(batches, xs):
            m.apply_add(b, x)
        m.cur_l += sum(len(b) for b in batches)
        gone = before - set(self.index.get_ids_list())
        assert len(gone) == recycled, f"replace_deleted recycled {len(gone)} deleted labels, expected {recycled}"
        m.recycle(gone)
        m.deleted |= set(doomed)

    # ------------------------------------------------------------------ deletes
    @rule(data=st.data(), delete=st.booleans(), form=st.sampled_from(("scalar", "array", "2-d", "list")),
          n=st.integers(0, 5))
    def mark(self, data, delete, form, n):
        m = self.model
        op = self.index.mark_deleted if delete else self.index.unmark_deleted
        if form == "scalar":
            n = 1
        labels = self.some_labels(data, n)
        if form == "scalar":
            arg = labels[0]
        elif form == "list":
            arg = labels
        else:
            arg = np.array(labels, dtype=np.uint64)
            if form == "2-d" and n % 2 == 0:
                arg = arg.reshape(2, -1)
        unknown = [label for label in labels if label not in m.vectors]
        wrong = [label for label in labels if (label in m.deleted) == delete]
        if unknown or wrong:   # an array is checked whole first; the first bad label is named
            why = (["Label not found"] if unknown else []) + (["already deleted" if delete else "is not deleted"]
                                                              if wrong else [])
            with pytest.raises(RuntimeError, match="|".join(why)):
                op(arg)
        else:
            op(arg)
            if delete:
                m.deleted |= set(labels)
            else:
                m.deleted -= set(labels)

    # ------------------------------------------------------------------ capacity, parameters
    @rule(data=st.data())
    def resize(self, data):
        m = self.model
        size = data.draw(st.integers(0, 2 * m.count + 8), label="new size")
        if size < m.count:
            with pytest.raises(RuntimeError, match="Cannot resize"):
                self.index.resize_index(size)
        else:
            self.index.resize_index(size)
            m.capacity = size

    @rule(ef=st.integers(-1, 200), how=st.sampled_from(("set_ef", "property")))
    def set_ef(self, ef, how):
        if ef <= 0:
            with pytest.raises((ValueError, TypeError)):
                self.index.set_ef(ef) if how == "set_ef" else setattr(self.index, "ef", ef)
            return
        self.index.set_ef(ef) if how == "set_ef" else setattr(self.index, "ef", ef)
        self.model.ef = ef

    # ------------------------------------------------------------------ persistence and copies
    @rule(fmt=st.sampled_from(("gpuhnsw", "hnswlib")), medium=st.sampled_from(("path", "bytes", "file", "mapped")),
          into=st.sampled_from(("fresh", "same", "check only")), max_elements=st.integers(0, 60),
          allow_replace_deleted=st.booleans(), same_path=st.booleans())
    def save_load(self, fmt, medium, into, max_elements, allow_replace_deleted, same_path):
        """Save, load, compare; then go on with the loaded index (or the same object that loaded it),
        or with the original ("check only").  A mapped index may save over its own file by path."""
        m = self.model
        mmap = medium == "mapped" and fmt == "gpuhnsw"
        if medium == "mapped":
            medium = "path"
        if same_path and medium == "path" and self.mapped_path is not None:
            path = self.mapped_path
        else:
            path = os.path.join(self.tmp, f"index{next(self.files)}.{fmt}")
        if medium == "bytes":
            buf = io.BytesIO()
            self.index.save_index(buf, format=fmt)
            buf.seek(0)
            source = buf
        elif medium == "file":
            with open(path, "wb") as f:
                self.index.save_index(f, format=fmt)
            source = open(path, "rb")
        else:
            self.index.save_index(path, format=fmt)
            source = path
        before = self.index.__getstate__()[0]
        loaded = self.index if into == "same" else gpuhnsw.Index(m.space, self.dim, device="cpu",
                                                                 search_graph=self.index.search_graph)
        try:
            loaded.load_index(source, max_elements, allow_replace_deleted, mmap=mmap)
        finally:
            if medium == "file":
                source.close()
        after = loaded.__getstate__()[0]
        capacity = (max(max_elements, m.capacity) if fmt == "gpuhnsw"
                    else max_elements if max_elements >= m.count else m.capacity)
        skip = {"max_elements", "allow_replace_deleted", "ef", "cur_l", "auto_resize", "num_threads"}
        if fmt == "hnswlib":   # not in hnswlib's format: the row counter (the load takes the count), the seed
            skip |= {"insert_seq", "random_seed"}
        assert {key: before[key] for key in before if key not in skip} == \
            {key: after[key] for key in after if key not in skip}, f"{fmt} round trip changed the index"
        assert after["max_elements"] == capacity and after["allow_replace_deleted"] == allow_replace_deleted
        assert after["ef"] == (m.ef if fmt == "gpuhnsw" else 10) and after["cur_l"] == m.count
        if loaded.search_graph == "optimized":   # a CPU index saves a fresh search graph; hnswlib's format none
            graph = loaded._graph
            if fmt == "gpuhnsw":
                assert graph.count == m.count and graph.drain is not None
                np.testing.assert_array_equal(graph.rows[:graph.count], build_search_graph(loaded._core, graph.degree))
            else:
                assert graph.count == 0
        if into == "check only":
            return
        m.capacity, m.allow_replace_deleted, m.cur_l = capacity, allow_replace_deleted, m.count
        m.ef = after["ef"]
        if into == "fresh":
            m.auto_resize = False
        self.replace_index(loaded, mapped_path=path if mmap else None)

    @rule(how=st.sampled_from(("pickle", "copy", "state")))
    def copy(self, how):
        """pickle, Index(other), Index(state dict): the copy holds the same, keeps ef, the auto-label
        counter and auto_resize; the walk goes on with the copy."""
        if how == "pickle":
            other = pickle.loads(pickle.dumps(self.index))
        elif how == "copy":
            other = gpuhnsw.Index(self.index, device="cpu")
        else:
            other = gpuhnsw.Index(self.index.__getstate__()[0], device="cpu")
        a, b = self.index.__getstate__()[0], other.__getstate__()[0]
        assert a.keys() == b.keys() and all(a[key] == b[key] for key in a if key != "num_threads"), how
        self.replace_index(other)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def counts_and_integrity(self):
        if self.index is None:
            return
        next(steps_run)
        m, index = self.model, self.index
        info = index.check_integrity()
        assert (info["n_live"], info["n_deleted"]) == (m.count - len(m.deleted), len(m.deleted)), info
        assert index.get_current_count() == index.element_count == m.count
        assert len(index) == m.count - len(m.deleted) and index.count_deleted == len(m.deleted)
        assert index.get_max_elements() == m.capacity and index.ef == m.ef
        assert sorted(index.get_ids_list()) == sorted(m.vectors)

    @invariant()
    def stored_vectors(self):
        """Every live label returns its vector; deleted ones are not items (and not `in`)."""
        if self.index is None:
            return
        m, index = self.model, self.index
        live = m.live
        if live:
            got = index.get_items(np.array(live, dtype=np.uint64))
            want = np.stack([m.vectors[label] for label in live])
            if m.space == "cosine":
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(got, want)
            assert all(label in index for label in live[:8])
        for label in sorted(m.deleted)[:4]:
            assert label not in index
            with pytest.raises(RuntimeError, match="Label not found"):
                index.get_items([label])

    @invariant()
    def queries_agree_with_brute_force(self):
        """ef >= the element count: the true top-k of what level 0 reaches (see the module doc),
        unfiltered and under a label filter; never a deleted or excluded label."""
        if self.index is None or not self.model.count:
            return
        m, index = self.model, self.index
        rng = np.random.default_rng(m.count * 7919 + len(m.deleted))
        stored = np.stack(list(m.vectors.values()))
        probes = np.concatenate([stored[rng.integers(0, len(stored), 2)],
                                 stored[rng.integers(0, len(stored), 1)] + rng.standard_normal(self.dim).astype(np.float32)])
        live = m.live
        graph = ReferenceGraph(index.__getstate__()[0])
        k = int(rng.integers(1, 9))
        allowed = [label for label in live if rng.random() < 0.5] + sorted(m.deleted)[:2] + [10**9]
        mode = ("auto", "graph", "exact")[int(rng.integers(3))]
        for filt in (None, allowed):
            pool = live if filt is None else [label for label in live if label in set(filt)]
            labels, dists = index.knn_query(probes, k=k, ef=m.count, pad=True, filter=filt, filter_mode=mode)
            for q, got_l, got_d in zip(probes, labels, dists):
                found = np.isfinite(got_d)
                self.check_row(graph, q, got_l[found], got_d[found], pool, k, filtered=filt is not None)

    def check_row(self, graph, q, got_l, got_d, pool, k, *, filtered):
        m = self.model
        vecs = np.stack([m.vectors[label] for label in pool]) if pool else np.zeros((0, self.dim), np.float32)
        d, tol = distances(m.space, q, vecs), tolerance(q, vecs)
        pool_arr = np.array(pool, dtype=np.uint64)
        why = topk_matches(got_l, got_d, pool_arr, d, tol, k, m.space)
        if why is None:
            return
        # not the global top-k: legal only if part of the graph is out of reach of where the search starts
        starts = [graph.entry_point] if graph.max_level <= 0 else np.flatnonzero(graph.levels >= 1).tolist()
        slot_of = {int(label): s for s, label in enumerate(graph.labels)}
        in_pool = np.array([slot_of[int(label)] for label in pool], dtype=np.int64)
        for start in starts:
            reach = level0_reach(graph, start)[in_pool]
            if reach.all():
                continue
            if filtered and len(got_l) < min(k, len(pool)):
                break   # a graph row that finds too few is redone exactly
            if topk_matches(got_l, got_d, pool_arr[reach], d[reach], tol[reach], k, m.space) is None:
                return
        raise AssertionError(f"query result wrong ({'filtered' if filtered else 'plain'}, k={k}): {why}; "
                             f"got {got_l.tolist()} at {got_d.tolist()}")

    @invariant()
    def round_trip_is_equal(self):
        """The index saved and loaded (our format and hnswlib's, in turn) holds exactly the same."""
        if self.index is None:
            return
        fmt = ("gpuhnsw", "hnswlib")[self.model.count % 2]
        buf = io.BytesIO()
        self.index.save_index(buf, format=fmt)
        buf.seek(0)
        other = gpuhnsw.Index(self.model.space, self.dim, device="cpu", search_graph=self.index.search_graph)
        other.load_index(buf, allow_replace_deleted=self.model.allow_replace_deleted)
        a, b = self.index.__getstate__()[0], other.__getstate__()[0]
        skip = {"ef", "cur_l", "auto_resize", "num_threads"} | ({"insert_seq", "random_seed"} if fmt == "hnswlib" else set())
        assert all(a[key] == b[key] for key in a if key not in skip), fmt


def test_model_based_walk(datasets):
    """The walk (see the module doc); fails on the first disagreement, with hypothesis's shortest
    step sequence that shows it."""
    for name in DATASETS:
        DATASETS[name] = datasets(name, n_base=2000, n_queries=1)[0]
    first = next(steps_run)
    try:
        run_state_machine_as_test(IndexMachine, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not SOAK, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
            print_blob=SOAK, report_multiple_bugs=not SOAK))
    finally:   # shown with -s, failed or not
        print(f"\nmodel walk: {next(steps_run) - first - 1} steps, {EXAMPLES} examples")
