"""Concurrency: calls racing each other on one index, re-entrant calls from filter callbacks.

Regression tests are named after the bug they pin.  Every loop is bounded by a count, never by a
clock; scenarios that used to hang run in a child process with a generous timeout, so a hang fails
the test instead of the CI run.
"""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import gpuhnsw
from conftest import run_threads

DIM = 16


def run_isolated(code, timeout=300):
    """Run ``code`` in a fresh interpreter; a hang or crash fails the calling test."""
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s (hang)")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_reads_racing_resize_index_do_not_touch_freed_memory(make_data):
    """get_levels, `in`, get_items, get_neighbors and label-array filters read the label map and the
    per-slot arrays that resize_index reallocates; they once did so without the resize lock
    (SIGSEGV, heap-use-after-free under ASan), and a filter bitset made before a resize was
    refused as "shorter than the index"."""
    x = make_data(1000, DIM, seed=1)
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(1000, M=8, ef_construction=40)
    index.add_items(x)
    labels = np.arange(1000)
    rounds = 200
    readers_done = threading.Barrier(3)  # two readers and the grower

    def grow():
        capacity = 1000
        while readers_done.n_waiting < 2 and capacity < 400_000:  # until both readers are through
            capacity += 16
            index.resize_index(capacity)
        readers_done.wait()

    def read():
        try:
            for _ in range(rounds):
                assert (index.get_levels(labels) < 255).all()
                assert 500 in index and 5000 not in index
                assert index.get_items([3, 7]).shape == (2, DIM)
                assert index.get_neighbors(3).size > 0
                found, _ = index.knn_query(x[:20], k=5, filter=labels[::2])
                assert (found % 2 == 0).all()
        finally:
            readers_done.wait()

    run_threads(grow, read, read)
    index.check_integrity()


def test_replace_deleted_does_not_hang_once_tombstones_fill_the_label_map():
    """Every replace_deleted with a new label left a tombstone in the label map, which was rebuilt
    only when the index grew: at capacity 16 the 52nd cycle probed forever."""
    out = run_isolated("""
        import numpy as np, gpuhnsw
        cap, cycles = 16, 100_000
        x = np.random.default_rng(0).random((cap, 4), dtype=np.float32)
        index = gpuhnsw.Index("l2", 4)
        index.init_index(cap, M=4, ef_construction=8, allow_replace_deleted=True)
        index.add_items(x, np.arange(cap))
        row = x[:1]
        for i in range(cycles):
            index.mark_deleted(i)
            index.add_items(row, [i + cap], replace_deleted=True)
        assert sorted(index.get_ids_list()) == list(range(cycles, cycles + cap))
        index.check_integrity()
        print(len(index))
    """)
    assert out.split() == ["16"]


def test_filter_callback_calling_resize_index_raises_instead_of_deadlocking():
    """A filter callback that resized its own index waited forever for the query it ran inside
    (hnswlib segfaults).  Writers from a callback now raise a clear RuntimeError; readers work."""
    out = run_isolated("""
        import numpy as np, gpuhnsw
        x = np.random.default_rng(0).random((200, 8), dtype=np.float32)
        index = gpuhnsw.Index("l2", 8)
        index.init_index(200, M=8, allow_replace_deleted=True)
        index.add_items(x)
        writers = {
            "resize_index": lambda: index.resize_index(400),
            "add_items": lambda: index.add_items(x[:1], [1000]),
            "mark_deleted": lambda: index.mark_deleted(5),
            "save_index": lambda: index.save_index("/nonexistent-dir/x.bin"),
            "check_integrity": lambda: index.check_integrity(),
        }
        for name, call in writers.items():
            def writer_filter(label):
                call()
                return True
            try:
                index.knn_query(x[:2], k=3, filter=writer_filter, num_threads=2)
            except RuntimeError as exc:
                assert "inside a filter callback" in str(exc), (name, exc)
            else:
                raise AssertionError(name + " from a filter callback did not raise")
        seen = []
        def reader_filter(label):
            seen.append((label in index, index.get_items([label]).shape, len(index.get_ids_list()),
                         index.knn_query(x[label], k=1)[0][0, 0]))
            return label % 2 == 0
        labels, _ = index.knn_query(x[:4], k=3, filter=reader_filter, num_threads=2)
        assert (labels % 2 == 0).all() and seen and all(s[0] and s[1] == (1, 8) and s[2] == 200 for s in seen)
        index.resize_index(400)  # the index is usable afterwards
        index.check_integrity()
        print("ok")
    """)
    assert out.split() == ["ok"]


@pytest.mark.parametrize("kind", ["labels", "callable"])
def test_filtered_query_never_returns_a_label_the_filter_excludes_during_replace_deleted(make_data, kind):
    """replace_deleted moves a slot to another label; a query running at that moment judged the slot
    by its old label (bitset made before, or callback called before the move) and returned the new
    one: 15 of 160,688 results with an array filter, 2 of 215,341 with a callable."""
    n, cycles = 400, 3000
    x = make_data(n + cycles, DIM, seed=4)
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(n, M=8, ef_construction=40, allow_replace_deleted=True)
    index.add_items(x[:n], np.arange(n))
    live = list(range(n))  # labels in insertion order; even labels are allowed
    allowed = np.arange(0, 2 * (n + cycles), 2)
    filt = allowed if kind == "labels" else (lambda label: label % 2 == 0)
    done = threading.Event()
    checked = [0]

    def replace():
        try:
            for i in range(cycles):
                old = live.pop(0)
                index.mark_deleted(old)
                new = n + i  # parity alternates: slots flip between allowed and excluded labels
                index.add_items(x[n + i], [new], replace_deleted=True)
                live.append(new)
        finally:
            done.set()

    def query():
        while not done.is_set():
            found, _ = index.knn_query(x[:8], k=5, filter=filt, pad=True)
            found = found[found != np.uint64(2**64 - 1)]
            assert (found % 2 == 0).all(), f"excluded labels returned: {found[found % 2 == 1]}"
            checked[0] += found.size

    run_threads(replace, query, query)
    assert checked[0] > 0
    index.check_integrity()


def test_filter_callback_result_is_not_relabelled_by_a_replace_during_the_query(make_data):
    """The deterministic form of the race above: while the query is inside the callback for label
    0 (allowed), another thread deletes 0 and puts an excluded label into its slot.  The query
    used to return the new label; now the relabel waits for the query (the callback gives it a
    second, then goes on), and the result is the label the filter allowed."""
    x = make_data(60, DIM, seed=5)
    index = gpuhnsw.Index("l2", DIM)
    index.init_index(50, M=8, ef_construction=40, allow_replace_deleted=True)
    index.add_items(x[:50], np.arange(50))
    replaced = threading.Event()
    started = []

    def replace():
        index.mark_deleted(0)
        index.add_items(x[50], [51], replace_deleted=True)  # odd: excluded
        replaced.set()

    def even(label):
        if label == 0 and not started:
            started.append(threading.Thread(target=replace))
            started[0].start()
            replaced.wait(1.0)
        return label % 2 == 0

    found, _ = index.knn_query(x[0], k=1, filter=even)
    started[0].join()
    assert found[0, 0] % 2 == 0, f"the filter excludes {found[0, 0]}"
    assert index.get_ids_list().count(51) == 1 and 0 not in index


@pytest.mark.parametrize("mode", ["graph", "exact"])
def test_filtered_queries_finish_beside_a_relabel_churn_thread(datasets, mode):
    """The race behind the test above: a thread relabelling slots (mark_deleted, then
    replace_deleted) until the queries finish.  Exact-mode filtered queries of 100 rows never
    finished (every pass saw a relabel); graph-mode ones took about 20 passes each.  Run in a child
    process, so a livelock fails the test instead of hanging the run."""
    datasets("siftsmall", n_base=2000, n_queries=100)    # present (else skip, or fail in CI)
    out = run_isolated(f"""
        import threading
        import numpy as np
        import gpuhnsw
        from gpuhnsw import testing

        base, queries, _, _ = testing.load_dataset("siftsmall", n_base=2000, n_queries=100)
        n = len(base)
        index = gpuhnsw.Index("l2", base.shape[1])
        index.init_index(n, M=12, ef_construction=60, random_seed=3, allow_replace_deleted=True)
        index.add_items(base, np.arange(n))
        allowed = np.arange(0, 2 * 10**6, 2, dtype=np.uint64)    # even labels
        stop, live = threading.Event(), list(range(n))

        def churn():
            new = n
            while not stop.is_set():
                index.mark_deleted(live.pop(0))
                index.add_items(base[new % n], [new], replace_deleted=True)   # parity alternates
                live.append(new)
                new += 1

        mover = threading.Thread(target=churn)
        mover.start()
        try:
            for _ in range(10):
                labels, _ = index.knn_query(queries, k=10, filter=allowed, filter_mode="{mode}", pad=True)
                found = labels[labels != np.uint64(2**64 - 1)]
                assert (found % 2 == 0).all(), found[found % 2 == 1]
        finally:
            stop.set()
            mover.join()
        index.check_integrity()
        print("ok", index._core.relabels > 0)
    """, timeout=240)
    assert out.split() == ["ok", "True"]


def test_label_reads_beside_add_items_never_see_a_label_before_its_vector(datasets):
    """A label enters the label map before its slot is counted: label filters set bits for such
    slots, and exact search then failed to gather them ("slot N out of range", 2 in 118k queries);
    and a counted slot could still be waiting for its vector.  Now a new slot is counted only once
    its vector is stored, and readers take nothing at or past the count, so every read of a label
    being added sees it absent or whole: exact-filtered queries and get_items on the batch in
    flight either miss it or return its true vector and distance."""
    base, _, _, _ = datasets("mnist", n_base=30_000, n_queries=1)
    base = np.ascontiguousarray(base, dtype=np.float32)
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base), M=8, ef_construction=20)
    index.add_items(base[:1000], num_threads=2)
    batches = [np.arange(lo, min(lo + 2900, len(base))) for lo in range(1000, len(base), 2900)]
    done = threading.Event()
    seen = []

    def add():
        try:
            for labels in batches:
                index.add_items(base[labels], labels, num_threads=2)
        finally:
            done.set()

    def read():
        rounds = 0
        while not done.is_set() or rounds < 5:
            rounds += 1
            pending = batches[min(len(batches) - 1, index.get_current_count() // 2900)]
            want = pending[::97]
            q = base[want[:4]] + np.float32(0.5)
            labels, dists = index.knn_query(q, k=3, filter=want, filter_mode="exact", pad=True)
            for row, (lab, dist) in enumerate(zip(labels, dists)):
                for label, d in zip(lab, dist):
                    if label != np.uint64(2**64 - 1):
                        assert np.isclose(d, ((base[int(label)] - q[row]) ** 2).sum(), rtol=1e-4)
                        seen.append(int(label))
            for label in want[:8]:
                try:
                    np.testing.assert_array_equal(index.get_items([label])[0], base[label])
                except RuntimeError as exc:
                    assert "Label not found" in str(exc)

    run_threads(add, read)
    assert index.get_current_count() == len(base) and seen
    index.check_integrity()


def test_add_items_without_ids_from_two_threads_loses_no_row(datasets):
    """add_items without ids took its auto labels from a counter it moved only after the insert,
    so two calls at once took the same labels and the later one overwrote the earlier one's rows
    (as updates).  Now each call reserves its labels first; a rejected call still leaves the counter
    as hnswlib does."""
    base = datasets("siftsmall", n_base=4000)[0]
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base), M=8, ef_construction=40)
    chunks = np.split(np.arange(len(base)), 40)          # 100 rows each, 20 per thread

    def add(mine):
        for rows in mine:
            index.add_items(base[rows], num_threads=1)

    run_threads(lambda: add(chunks[0::2]), lambda: add(chunks[1::2]))
    assert index.get_current_count() == len(base)
    labels = np.sort(np.array(index.get_ids_list(), dtype=np.int64))
    np.testing.assert_array_equal(labels, np.arange(len(base)))
    stored = index.get_items(np.arange(len(base)))
    assert {tuple(r) for r in stored} == {tuple(r) for r in base}   # every row kept, none twice
    with pytest.raises(RuntimeError, match="exceeds"):
        index.add_items(base[:1])                                   # full: rejected
    index.resize_index(len(base) + 1)
    index.add_items(base[:1])
    assert index.get_ids_list()[-1] == len(base)                     # the rejected call took no label


class _AddBesideAnAdd:
    """A core whose first ``add`` starts ``other`` on another thread and waits (at most a second)
    for it to read the capacity: the check of an add_items call beside an insert in progress."""

    def __init__(self, core, other):
        self._core, self._other, self.checked, self.thread = core, other, threading.Event(), None

    def __getattr__(self, name):
        return getattr(self._core, name)

    @property
    def max_elements(self):
        if self.thread is not None:
            self.checked.set()
        return self._core.max_elements

    def add(self, *args):
        if self.thread is None:
            self.thread = threading.Thread(target=self._other)
            self.thread.start()
            self.checked.wait(1.0)   # with the fix the other call waits for this insert instead
        return self._core.add(*args)


def test_auto_resize_add_items_beside_another_is_not_refused_as_full(datasets):
    """With auto_resize, two add_items calls that each fit alone both passed the capacity check,
    and the second insert was refused: "The number of elements exceeds the specified limit" (1 of 5
    runs of two threads adding 100-row chunks).  The check and its insert are one step now."""
    base = datasets("siftsmall", n_base=120)[0]
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(100, M=8, ef_construction=40, auto_resize=True)
    errors = []

    def other():
        try:
            index.add_items(base[60:], np.arange(60, 120))
        except Exception as exc:   # reported below, in the main thread
            errors.append(exc)

    core = index._core
    index._core = proxy = _AddBesideAnAdd(core, other)
    index.add_items(base[:60], np.arange(60))
    proxy.thread.join()
    index._core = core
    assert not errors, errors
    assert index.get_current_count() == 120 and index.get_max_elements() >= 120
    index.check_integrity()


class _RelabelEveryPass:
    """A core that voids every label-filtered pass: right after each label bitset is made, the
    allowed label nearest the query is deleted and its slot given an excluded label with the query's
    own vector (replace_deleted), so the bitset names that slot by its old label.  While the labels
    are pinned the same move runs on another thread, which has to wait for the unpin."""

    def __init__(self, index, query, allowed, new_labels):
        self._core, self._index, self._query = index._core, index, query
        d = ((index.get_items(allowed) - query) ** 2).sum(axis=1)
        self._victims = list(allowed[np.argsort(d)])      # allowed labels, nearest first
        self._new = list(new_labels)                      # excluded labels
        self.passes, self.pinned, self._mover = 0, False, None

    def __getattr__(self, name):
        return getattr(self._core, name)

    def _relabel(self):
        self._index.mark_deleted(int(self._victims.pop(0)))
        self._index.add_items(self._query, [self._new.pop(0)], replace_deleted=True)

    def allowed_bitset(self, labels):
        bits = self._core.allowed_bitset(labels)
        self.passes += 1
        if self.passes > 20:
            raise RuntimeError("livelock: 20 passes voided by relabels")
        if not self.pinned:
            self._relabel()
        elif self._mover is None:
            self._mover = threading.Thread(target=self._relabel)
            self._mover.start()
        return bits

    def pin_labels(self):
        taken = self._core.pin_labels()
        self.pinned, self.relabels_at_pin = True, self._core.relabels
        return taken

    def unpin_labels(self, taken):
        self.relabelled_while_pinned = self._core.relabels != self.relabels_at_pin
        self._core.unpin_labels(taken)
        self.pinned = False
        if self._mover is not None:
            self._mover.join()


@pytest.mark.parametrize("mode", ["graph", "exact"])
def test_filtered_query_under_steady_relabels_ends_and_keeps_its_promise(datasets, mode):
    """Under steady replace_deleted churn a label-filtered knn_query redid itself without bound
    (each relabel during a pass voids it): a livelock.  Now after RELABEL_REDOS voided passes the
    last one pins the labels, so the query ends, and no result carries an excluded label."""
    base, queries, _, _ = datasets("siftsmall", n_base=2000, n_queries=5)
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base), M=12, ef_construction=60, random_seed=3, allow_replace_deleted=True)
    index.add_items(base, np.arange(len(base)))
    allowed = np.arange(0, len(base), 2, dtype=np.uint64)   # even labels
    q = np.ascontiguousarray(queries[:1])
    core = index._core
    index._core = proxy = _RelabelEveryPass(index, q, allowed, range(10**6 + 1, 10**6 + 100, 2))
    labels, _ = index.knn_query(q, k=10, filter=allowed, filter_mode=mode, pad=True)
    assert proxy.passes == gpuhnsw.search.planner.RELABEL_REDOS + 1 and not proxy.pinned
    assert not proxy.relabelled_while_pinned
    assert np.isin(labels[labels != np.uint64(2**64 - 1)], allowed).all(), labels
    index._core = core
    assert core.relabels == gpuhnsw.search.planner.RELABEL_REDOS + 1    # the pinned pass's mover went in after it
    index.check_integrity()


# ---------------------------------------------------------------------------------------------
# the torture: every kind of call at once on one index
# ---------------------------------------------------------------------------------------------

TORTURE_SCALE = float(os.environ.get("GHNSW_TORTURE_SCALE", "1"))  # the sanitizer run uses less


def test_torture_every_public_call_at_once(datasets, tmp_path):
    """Twelve threads on one index: queries without a filter, with a label array and with a callable,
    inserts, updates, deletes, replace_deleted, resizes, saves in both formats and pickles.  Bounded
    by operation counts (never a clock).  Afterwards: integrity, the exact label set, recall against
    exact search; every filtered result was checked against its filter as it came."""
    import pickle

    from gpuhnsw.testing import exact_knn, recall_at_k

    base, queries, _, _ = datasets("siftsmall", n_queries=50)
    n0, rounds = 3000, max(4, int(300 * TORTURE_SCALE))
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(n0, M=12, ef_construction=80, random_seed=3, allow_replace_deleted=True)
    index.add_items(base[:n0], np.arange(n0))
    index.set_ef(64)
    lock = threading.Lock()
    vectors = {label: label for label in range(n0)}  # live label -> row of base
    updatable = set(range(0, n0, 7))                 # never deleted: the updater's labels
    deletable = [label for label in range(n0) if label not in updatable]
    spare = iter(range(n0, base.shape[0]))           # rows for new labels
    next_label = [10**6]
    checked = dict(labels=0, callable=0)

    def new_rows(count):
        with lock:
            rows = [next(spare) for _ in range(count)]
            labels = list(range(next_label[0], next_label[0] + count))
            next_label[0] += count
        return rows, labels

    resizing = threading.Lock()  # grow only: capacity read and resize as one step

    def grow(step):
        with resizing:
            index.resize_index(index.get_max_elements() + step)

    def add(rows, labels, **kw):
        while True:  # a full index rejects the whole batch: grow it and try again
            try:
                index.add_items(base[rows], labels, **kw)
                break
            except RuntimeError as exc:
                if "exceeds the specified limit" not in str(exc):
                    raise
                grow(256)
        with lock:
            vectors.update(zip(labels, rows))

    def insert():
        for _ in range(rounds):
            rows, labels = new_rows(8)
            add(rows, labels)
            with lock:
                deletable.extend(labels)

    def replace():
        for _ in range(rounds):
            rows, labels = new_rows(4)
            add(rows, labels, replace_deleted=True)
            with lock:
                deletable.extend(labels)

    def delete():
        rng = np.random.default_rng(1)
        for _ in range(rounds * 6):
            with lock:
                label = deletable.pop(int(rng.integers(len(deletable))))
                del vectors[label]
            index.mark_deleted(label)

    def update():
        rng = np.random.default_rng(2)
        keys = sorted(updatable)
        for _ in range(rounds * 2):
            labels = rng.choice(keys, 8, replace=False)
            rows = rng.integers(0, n0, 8)
            index.add_items(base[rows], labels)
            with lock:
                vectors.update(zip(labels.tolist(), rows.tolist()))

    def resize():
        for _ in range(rounds):
            grow(64)

    def save():
        for i in range(max(2, rounds // 8)):
            fmt = ("gpuhnsw", "hnswlib")[i % 2]
            path = tmp_path / f"torture.{fmt}"
            index.save_index(path, format=fmt)
            loaded = gpuhnsw.Index("l2", base.shape[1])
            loaded.load_index(path)
            loaded.check_integrity()
            pickle.loads(pickle.dumps(index)).check_integrity()

    def query_plain():
        for _ in range(rounds * 2):
            labels, _ = index.knn_query(queries[:20], k=10, pad=True)
            assert labels.shape == (20, 10)

    even = np.arange(0, 2 * 10**6 + 10**5, 2)

    def query_labels():
        for _ in range(rounds * 2):
            labels, _ = index.knn_query(queries[:10], k=10, filter=even, pad=True, filter_mode="graph")
            got = labels[labels != np.uint64(2**64 - 1)]
            assert (got % 2 == 0).all(), f"label filter broken: {got[got % 2 == 1]}"
            checked["labels"] += got.size

    def query_callable():
        for _ in range(rounds):
            labels, _ = index.knn_query(queries[:5], k=10, filter=lambda label: label % 3 != 0, pad=True)
            got = labels[labels != np.uint64(2**64 - 1)]
            assert (got % 3 != 0).all(), f"callable filter broken: {got[got % 3 == 0]}"
            checked["callable"] += got.size

    run_threads(insert, replace, delete, update, resize, save, query_plain, query_plain, query_labels,
                query_labels, query_callable, query_callable)

    report = index.check_integrity()
    labels = np.array(sorted(vectors), dtype=np.uint64)
    assert report["n_live"] == labels.size
    assert sorted(label for label in index.get_ids_list() if label in index) == labels.tolist()
    rows = np.array([vectors[label] for label in labels.tolist()])
    truth, _ = exact_knn(base[rows], queries, 10)
    found, _ = index.knn_query(queries, k=10, ef=128)
    recall = recall_at_k(found, labels[truth], 10)
    print(f"torture: rounds={rounds}, live={labels.size}, capacity={index.get_max_elements()}, "
          f"filtered results checked {checked}, recall@10={recall:.3f}")
    assert recall >= 0.9 and checked["labels"] > 0 and checked["callable"] > 0


# ------------------------------------------------------------------------------------------------
# BFIndex: mutations beside queries, saves and pickles (each used to run unlocked, in several steps)
# ------------------------------------------------------------------------------------------------

def _bf(base, capacity=None):
    bf = gpuhnsw.BFIndex("l2", base.shape[1], device="cpu")
    bf.init_index(capacity or len(base) + 10)
    bf.add_items(base, np.arange(len(base)))
    return bf


def _during(call, bf=None):
    """A wrapper of ``call`` that, on its first use, runs ``other`` (set later) on another thread
    and waits until it is done or (with the fix) waits for this call: queued as a writer on
    ``bf``'s lock when ``bf`` is given, else after a second."""
    state = {"other": None, "thread": None}
    done = threading.Event()

    def other():
        state["other"]()
        done.set()

    def wrapped(*args, **kwargs):
        if state["thread"] is None:
            state["thread"] = threading.Thread(target=other)
            state["thread"].start()
            for _ in range(1 if bf is None else 1000):       # bounded by a count, not a clock
                if done.wait(1.0 if bf is None else 0.001) or (bf and bf._lock._writers_waiting):
                    break
        return call(*args, **kwargs)

    return wrapped, state


def test_bfindex_query_beside_delete_never_pairs_a_moved_label_with_another_row(datasets,
                                                                              monkeypatch):
    """delete_vector moves the last row into the deleted one; a query between reading the count
    and computing saw the moved label in both rows (label 49 twice)."""
    from gpuhnsw import bruteforce

    base = datasets("siftsmall", n_base=50)[0]
    bf = _bf(base)
    wrapped, state = _during(bruteforce.exact_rows, bf)
    state["other"] = lambda: bf.delete_vector(0)
    monkeypatch.setattr(bruteforce, "exact_rows", wrapped)
    found, dists = bf.knn_query(base[49], k=3)
    state["thread"].join()
    assert len(set(found[0].tolist())) == 3, found
    np.testing.assert_allclose(dists[0], ((base[found[0]] - base[49]) ** 2).sum(axis=1), rtol=1e-4)
    assert bf.get_current_count() == 49


class _PausingRows(np.ndarray):
    """The vector rows of a BFIndex; its first row write runs ``other`` first (see ``_during``)."""

    def __setitem__(self, key, value):
        self.hook()
        super().__setitem__(key, value)


def test_bfindex_query_beside_add_never_sees_a_row_before_its_vector(datasets):
    """add_items counted a new row and labelled it before writing its vector: a query in between
    returned the new label with the vector left in that row by a deleted element."""
    base = datasets("siftsmall", n_base=51)[0]
    bf = _bf(base[:50])
    bf.delete_vector(49)                       # row 49 keeps 49's vector
    far = base[50] + 1000.0
    answers = []
    rows = bf._vectors.view(_PausingRows)
    rows.hook, state = _during(lambda: None)
    state["other"] = lambda: answers.append(bf.knn_query(base[49], k=1)[0][0, 0])
    bf._vectors = rows
    bf.add_items(far, [100])
    state["thread"].join()
    assert answers and answers[0] != 100, answers
    assert bf.knn_query(far, k=1)[0][0, 0] == 100


@pytest.mark.parametrize("first", [
    "add",       # two auto-labelled adds took the same labels: one batch overwrote the other
    "delete",    # two deletes moved the same last row: its label held two rows
])
def test_bfindex_two_mutations_at_once_lose_nothing(datasets, first):
    base = datasets("siftsmall", n_base=70)[0]
    bf = _bf(base[:50], capacity=70)               # next auto label: 50
    rows = bf._vectors.view(_PausingRows)
    rows.hook, state = _during(lambda: None, bf)
    if first == "add":
        call = lambda: bf.add_items(base[50:60])
        state["other"] = lambda: bf.add_items(base[60:70])
        expected = np.arange(70)
    else:
        call = lambda: bf.delete_vector(0)
        state["other"] = lambda: bf.delete_vector(1)
        expected = np.arange(2, 50)
    bf._vectors = rows
    call()
    state["thread"].join()
    assert bf.get_current_count() == len(expected)
    found, dists = bf.knn_query(base[expected], k=1)
    np.testing.assert_array_equal(found[:, 0], expected)
    assert (dists == 0).all()


def test_bfindex_save_beside_delete_writes_one_state(datasets, monkeypatch, tmp_path):
    """save_index wrote views of the rows while a delete moved one: the file held label 49 twice
    and could not be loaded."""
    from gpuhnsw import bruteforce

    base = datasets("siftsmall", n_base=50)[0]
    bf = _bf(base)
    wrapped, state = _during(bruteforce.write_bfindex, bf)
    state["other"] = lambda: bf.delete_vector(0)
    monkeypatch.setattr(bruteforce, "write_bfindex", wrapped)
    bf.save_index(str(tmp_path / "bf.bin"))
    state["thread"].join()
    back = gpuhnsw.BFIndex("l2", base.shape[1])
    back.load_index(str(tmp_path / "bf.bin"))
    assert back.get_current_count() == 50
    found, dists = back.knn_query(base, k=1)
    np.testing.assert_array_equal(found[:, 0], np.arange(50))
    assert (dists == 0).all()


def test_bfindex_pickle_state_is_not_changed_by_a_later_mutation(datasets):
    """Pickling serialises __getstate__'s dict after it returns; it shared the rows, the label map
    and the arrays with the index, so a delete in between pickled a count of 50 over rows that
    held label 49 twice."""
    import io
    import pickle

    base = datasets("siftsmall", n_base=50)[0]
    bf = _bf(base)

    class DeleteMidway(pickle.Pickler):
        def persistent_id(self, obj):           # called before each object is written
            if isinstance(obj, np.ndarray) and bf.get_current_count() == 50:
                bf.delete_vector(0)
            return None

    out = io.BytesIO()
    DeleteMidway(out).dump(bf)
    assert bf.get_current_count() == 49
    back = pickle.loads(out.getvalue())
    assert back.get_current_count() == 50 and back.get_max_elements() == 60
    found, dists = back.knn_query(base, k=1)
    np.testing.assert_array_equal(found[:, 0], np.arange(50))
    back.add_items(base[:10] + 1.0, np.arange(100, 110))        # the spare capacity is back
    assert back.get_current_count() == 60


def test_bfindex_device_copy_uploaded_before_a_delete_is_not_kept(datasets, monkeypatch,
                                                                  fake_cupy, numpy_select_topk, numpy_gemm):
    """A query uploading the base while a delete ran cached its (old) upload after the delete had
    dropped the cache: every later query searched the old rows under the new labels."""
    from gpuhnsw import bruteforce

    base = datasets("siftsmall", n_base=50)[0]
    bf = _bf(base)
    bf._device = ("cuda", 0)                        # as if a GPU had been found
    wrapped, state = _during(lambda rows, space, device: None, bf)
    state["other"] = lambda: bf.delete_vector(0)
    real = bruteforce.upload_base
    monkeypatch.setattr(bruteforce, "upload_base",
                        lambda rows, space, device: (real(rows, space, device),
                                                     wrapped(rows, space, device))[0])
    bf.knn_query(base[0], k=1)
    state["thread"].join()
    found, dists = bf.knn_query(base[1:], k=1)
    np.testing.assert_array_equal(found[:, 0], np.arange(1, 50))
    assert (dists == 0).all()


def test_bfindex_filter_callback_that_deletes_raises_instead_of_changing_the_rows(datasets):
    base = datasets("siftsmall", n_base=50)[0]
    bf = _bf(base)

    def deleting(label):
        bf.delete_vector(0)
        return True

    with pytest.raises(RuntimeError, match="filter callback"):
        bf.knn_query(base[49], k=3, filter=deleting)
    assert bf.get_current_count() == 50                            # nothing changed


def test_bfindex_filter_callback_queries_the_same_index_with_a_writer_waiting():
    """A query from a filter callback must not queue behind a writer that waits for the outer
    query (writers go first): that was a deadlock of the first locked version."""
    run_isolated("""
        import threading
        import numpy as np
        import gpuhnsw

        x = np.random.default_rng(0).random((50, 8), dtype=np.float32)
        bf = gpuhnsw.BFIndex("l2", 8, device="cpu")
        bf.init_index(60)
        bf.add_items(x)
        writer = []

        def inner(label):
            if not writer:
                writer.append(threading.Thread(target=bf.delete_vector, args=(3,)))
                writer[0].start()
                for _ in range(1000):            # until the writer waits (bounded)
                    if bf._lock._writers_waiting:
                        break
                    threading.Event().wait(0.001)
                assert bf.knn_query(x[label], k=1)[0][0, 0] == label
            return True

        bf.knn_query(x[0], k=2, filter=inner)
        writer[0].join()
        assert bf.get_current_count() == 49
    """, timeout=120)


def test_bfindex_every_call_at_once_keeps_labels_and_vectors_paired(datasets, tmp_path):
    """Queries (plain and filtered), saves and pickles beside a thread that deletes and re-adds
    labels (each label always with the same vector): every answer must pair each label with its own
    vector's distance, once."""
    import pickle

    base, queries = datasets("siftsmall", n_base=300, n_queries=20)[:2]
    bf = _bf(base)
    rounds = 60

    def churn():
        for i in range(rounds * 3):
            label = (i * 37) % 300
            bf.delete_vector(label)
            bf.add_items(base[label], [label])

    def check(found, dists, q):
        for row, (labels, d) in enumerate(zip(found, dists)):
            assert len(set(labels.tolist())) == len(labels), labels
            np.testing.assert_allclose(d, ((base[labels] - q[row]) ** 2).sum(axis=1), rtol=1e-3)

    def query():
        for _ in range(rounds):
            check(*bf.knn_query(queries, k=5), queries)
            check(*bf.knn_query(queries, k=5, filter=lambda label: label % 2 == 0), queries)

    def save():
        for i in range(rounds // 6):
            path = str(tmp_path / f"bf{i % 2}.bin")
            bf.save_index(path)
            back = pickle.loads(pickle.dumps(bf))
            for other in (gpuhnsw.BFIndex("l2", base.shape[1], device="cpu"), back):
                if other is not back:
                    other.load_index(path)
                found, dists = other.knn_query(base[:50], k=1)
                check(found, dists, base[:50])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)          # switch threads often: inside the mutations too
    try:
        run_threads(churn, query, query, save)
    finally:
        sys.setswitchinterval(interval)
    assert bf.get_current_count() == 300
