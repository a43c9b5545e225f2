"""The device mirror (gpuhnsw.device.mirror): sync bookkeeping on the CPU, the real thing on a GPU.

Without a GPU, ``cupy`` is the suite's NumPy stand-in (``fake_cupy``, with an asynchronous stream)
and the scatter kernel its NumPy equivalent, so what is checked is the mirror's own logic: dirty
rows plus new slots, capacity doubling, upper-level blocks, the deleted bitset, entry point and max
level, O(changed rows).
With a GPU (``-m gpu``): the same syncs on the device, and the search kernel against the NumPy
reference (itself held to the C search in test_reference.py).
"""
import sys

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw import _core
from gpuhnsw.device import kernels, launch, mirror as mirror_module, ops
from gpuhnsw._reference import beam_search_reference
from gpuhnsw.device.arrays import bf16_bits


def _numpy_scatter(grid, block, args):
    """scatter_rows_kernel, in NumPy (same arguments), queued on the stream."""
    def run():
        (r, slots, degree, labels, links, rows, m0, dim_pad, vectors, stride, links0, degree0, labels_out,
         q, lslots, ldegree, lstart, lfirst, lpacked) = args
        r, m0, dim_pad = int(r), int(m0), int(dim_pad)
        s = np.asarray(slots)[:r].astype(np.int64)
        staged = np.asarray(rows)[:r * dim_pad].reshape(r, dim_pad)
        # uint16 rows hold bfloat16 bits (the mirror's bfloat16 storage)
        vectors[s, :dim_pad] = bf16_bits(staged) if vectors.dtype == np.uint16 else staged.astype(vectors.dtype)
        vectors[s, dim_pad:] = 0
        links0[s] = np.asarray(links)[:r * m0].reshape(r, m0)
        degree0[s] = np.asarray(degree)[:r]
        labels_out[s] = np.asarray(labels)[:r]
        for j in range(int(q)):
            s, a, d, f = int(lslots[j]), int(lstart[j]), int(ldegree[j]), int(lfirst[j])
            links0[s, a:d] = lpacked[f:f + d - a]
            links0[s, d:] = _core.INVALID_SLOT
            degree0[s] = d
    sys.modules["cupy"].ndarray.stream.queue.append(run)


@pytest.fixture
def fake_gpu(monkeypatch, fake_cupy):
    monkeypatch.setattr(kernels, "get_kernel", lambda name, instance, device=None: _numpy_scatter)
    return mirror_module


@pytest.mark.parametrize("space, storage", [("l2", "float32"), ("cosine", "float16")])
def test_sync_bookkeeping(fake_gpu, rng, space, storage):
    index = gpuhnsw.Index(space, 10)
    index.init_index(500, M=4, random_seed=1)
    mirror = fake_gpu.DeviceMirror(index._core, storage=storage)
    assert mirror.sync().rows == 0 and mirror.entry_point == -1          # empty index
    index.add_items(rng.random((300, 10), dtype=np.float32))
    st = mirror.sync()
    assert st.rows == 300 and mirror.capacity >= 500 and mirror.check_against_core() == []
    st = mirror.sync()
    assert st.rows == 0 and st.bytes == 0                               # nothing changed: nothing moves
    index.add_items(rng.random((20, 10), dtype=np.float32))
    st = mirror.sync()
    assert 20 <= st.rows < 320 and mirror.check_against_core() == []    # the new rows and their neighbours
    index.resize_index(3000)
    index.add_items(rng.random((2000, 10), dtype=np.float32))
    index.mark_deleted(5)
    index.mark_deleted(1000)
    st = mirror.sync()
    assert st.grows == 1 and mirror.capacity >= 3000 and mirror.n_deleted == 2
    assert mirror.check_against_core() == []
    index.add_items(rng.random((1, 10), dtype=np.float32), [7])         # an update of an existing label
    st = mirror.sync()
    assert st.rows == 1 and st.link_rows > 0 and mirror.check_against_core() == []
    index.unmark_deleted(5)
    st = mirror.sync()
    assert (st.rows, st.link_rows, st.bytes) == (0, 0, 8) and mirror.n_deleted == 1   # one bitset word
    assert mirror.check_against_core() == []
    assert mirror.stats.syncs == 7 and mirror.stats.rows >= 2321
    other = fake_gpu.DeviceMirror(index._core)     # the log is drained: a new mirror copies every row
    assert other.sync().rows == 2320 and other.check_against_core() == []


def test_two_mirrors_of_one_core_each_see_every_change(fake_gpu, datasets):
    """The dirty log is one per core and a drain clears it: of two mirrors of one core, the one that
    synced second never got what the other had drained (new rows, an updated vector, relinked
    lists, a delete mark), so its queries could return a deleted label or miss the new rows.
    Drains are numbered now: a mirror whose drain is not the one after its own last re-syncs every
    row; one that missed nothing still ships only the changes."""
    base = datasets("siftsmall", n_base=2200)[0]
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base), M=8, ef_construction=40, random_seed=2)
    index.add_items(base[:2000])
    first, second = fake_gpu.DeviceMirror(index._core), fake_gpu.DeviceMirror(index._core)
    assert first.sync().rows == second.sync().rows == 2000

    def change(lo, hi):
        index.add_items(base[lo:hi], np.arange(lo, hi))
        index.add_items(base[hi], [lo - 100])              # an update of an existing label
        index.mark_deleted(lo - 1500)

    change(2000, 2050)
    st = second.sync()
    assert 50 <= st.rows < 500 and second.check_against_core() == []     # the changes alone
    st = first.sync()          # `second` drained what `first` needs
    assert first.check_against_core() == [] and st.rows == 2050          # every row again
    change(2100, 2150)
    st = first.sync()
    assert 50 <= st.rows < 500 and first.check_against_core() == []
    st = second.sync()
    assert second.check_against_core() == [] and st.rows == 2100


def test_a_mirror_whose_sync_failed_after_the_drain_syncs_in_full(fake_gpu, datasets, monkeypatch):
    """A sync that drained the log and then failed (a device error) left those changes with no
    owner: the mirror's next sync shipped only later ones.  Its next drain is not the one after its
    last good sync, so it re-syncs every row."""
    base = datasets("siftsmall", n_base=1200)[0]
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base), M=8, ef_construction=40, random_seed=2)
    index.add_items(base[:1000])
    mirror = fake_gpu.DeviceMirror(index._core)
    mirror.sync()
    index.add_items(base[1000:1100])
    with monkeypatch.context() as m:
        m.setattr(mirror, "_ship", lambda *a: (_ for _ in ()).throw(RuntimeError("device error")))
        with pytest.raises(RuntimeError, match="device error"):
            mirror.sync()
    index.add_items(base[1100:1110])
    st = mirror.sync()
    assert mirror.check_against_core() == [] and st.rows == 1110


@pytest.mark.parametrize("storage, gpu_storage, rows", [("float32", None, "float32"), ("int8", None, "float16"),
                                                       ("float16", None, "float16"), ("float32", "bfloat16", "bfloat16"),
                                                       ("int8", "float32", "float32")])
def test_gpu_storage_picks_the_mirror_rows_only(fake_gpu, datasets, storage, gpu_storage, rows):
    """``gpu_storage`` chooses the device rows (default: float32 for a float32 index, float16 for
    the compressed ones) and never what the engine stores, saves or copies."""
    base = datasets("siftsmall", n_base=400)[0]
    index = gpuhnsw.Index("l2", base.shape[1], device="cuda", storage=storage, gpu_storage=gpu_storage)
    index.init_index(len(base), M=8, ef_construction=40, random_seed=2)
    index.add_items(base, build="cpu")
    index.sync()
    mirror = index._gpu.mirror
    assert index.storage == storage and index._core.storage == storage and mirror.storage == rows
    assert mirror.vectors.dtype == {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[rows]
    assert mirror.check_against_core() == []
    copy = gpuhnsw.Index(index, device="cpu")
    assert copy.storage == storage


def test_gpu_storage_refused():
    with pytest.raises(ValueError, match="gpu_storage must be one of"):
        gpuhnsw.Index("l2", 8, device="cpu", gpu_storage="int8")


@pytest.mark.filterwarnings("ignore:add_items. .* rows had values outside the int8 ranges")
@pytest.mark.parametrize("storage, rerank", [("float16", False), ("int8", False), ("int8", True)])
def test_compressed_rows_go_up_decoded_as_float16(fake_gpu, datasets, storage, rerank):
    """A float16 or int8 index's mirror holds float16 rows: the stored rows decoded by gather_rows
    (int8: offset + scale * code; never the exact rows of rerank, which the CPU alone re-scores
    with), kept in step through inserts, updates, replace_deleted and deletes as for float32."""
    base = datasets("siftsmall", n_base=1300)[0]
    index = gpuhnsw.Index("l2", base.shape[1], storage=storage, rerank=rerank)
    index.init_index(len(base), M=8, ef_construction=40, random_seed=2, allow_replace_deleted=True)
    index.add_items(base[:1000])
    assert index._mirror_storage(index.storage) == "float16"
    mirror = fake_gpu.DeviceMirror(index._core, storage=index._mirror_storage(index.storage))
    assert mirror.sync().rows == 1000 and mirror.vectors.dtype == np.float16

    def stored_rows(n):   # the engine's rows, decoded in NumPy
        state = index._core.export_state()
        width = _core.row_bytes(base.shape[1], storage)
        raw = np.frombuffer(state["vectors"], np.uint8).reshape(n, width)
        if storage == "float16":
            return raw[:, :base.shape[1] * 2].view(np.float16).astype(np.float32)
        offset, scale = np.frombuffer(state["quantizer"], np.float32).reshape(2, -1)
        return offset + scale * raw[:, :base.shape[1]].view(np.int8).astype(np.float32)

    np.testing.assert_array_equal(np.asarray(mirror.vectors[:1000, :base.shape[1]]),
                                  stored_rows(1000).astype(np.float16))
    index.add_items(base[1000:1200], np.arange(1000, 1200))
    index.add_items(base[1200:1201], [5])                  # an update
    index.mark_deleted(7)
    index.add_items(base[1201:1202], [5000], replace_deleted=True)
    mirror.sync()
    assert mirror.check_against_core() == []
    np.testing.assert_array_equal(np.asarray(mirror.vectors[:1200, :base.shape[1]]),
                                  stored_rows(1200).astype(np.float16))


# ---------------------------------------------------------------------------------------------
# on a GPU

@pytest.fixture(scope="module")
def sift_small(dataset_index):
    return dataset_index("siftsmall", "l2", n_base=4000, n_queries=50, M=12, ef_construction=60, seed=3)


def _compare(labels, dists, found, ref, state_labels, min_same=0.99):
    import cupy as cp

    labels, dists, found = cp.asnumpy(labels), cp.asnumpy(dists), cp.asnumpy(found)
    slots, rdists, rfound = ref
    want = np.where(slots >= 0, state_labels[np.maximum(slots, 0)], np.uint64(2**64 - 1))
    same = np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(labels, want)])
    assert same >= min_same, same
    np.testing.assert_array_equal(found, rfound)
    ok = np.isfinite(rdists)
    np.testing.assert_allclose(dists[ok], rdists[ok], rtol=2e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_gpu_search_matches_reference(sift_small, width, storage):
    index, _, queries = sift_small
    mirror = mirror_module.DeviceMirror(index._core, storage=storage)
    mirror.sync()
    assert mirror.check_against_core() == []
    state = index._core.export_state()
    if storage == "float16":
        state = dict(state, vectors=np.frombuffer(state["vectors"], np.float32).astype(np.float16)
                     .astype(np.float32).tobytes())
    labels, dists, info = mirror.search(queries, 10, 40, search_width=width)
    found = info[0]
    ref = beam_search_reference(state, queries, 10, 40, search_width=width)
    _compare(labels, dists, found, ref, np.frombuffer(state["labels"], np.uint64),
             0.99 if storage == "float32" else 0.9)


@pytest.mark.gpu
def test_gpu_filtered_search_matches_reference(sift_small):
    import cupy as cp

    index, _, queries = sift_small
    mirror = mirror_module.DeviceMirror(index._core)
    mirror.sync()
    state = index._core.export_state()
    state_labels = np.frombuffer(state["labels"], np.uint64)
    allowed = state_labels % 7 == 0
    bits = np.packbits(np.concatenate([allowed, np.zeros(mirror.capacity - allowed.size, bool)]),
                       bitorder="little").view(np.uint32)
    labels, dists, info = mirror.search(queries, 10, 40, filter_bits=cp.asarray(bits))
    found = info[0]
    cap = launch.beam_capacity(40, True)
    ref = beam_search_reference(state, queries, 10, 40, allowed=allowed, pending_limit=cap)
    _compare(labels, dists, found, ref, state_labels)
    assert np.all(cp.asnumpy(labels) % 7 == 0)


@pytest.mark.gpu
def test_gpu_sync_after_changes(sift_small, rng):
    import pickle

    index = pickle.loads(pickle.dumps(sift_small[0]))
    mirror = mirror_module.DeviceMirror(index._core)
    mirror.sync()
    index.resize_index(len(sift_small[1]) + 100)
    index.add_items(rng.random((100, index.dim), dtype=np.float32) * 100)
    for label in range(0, 4000, 9):
        index.mark_deleted(label)
    st = mirror.sync()
    assert st.rows < len(sift_small[1])          # O(changed rows)
    assert mirror.check_against_core() == []
    queries = sift_small[2]
    labels, dists, info = mirror.search(queries, 10, 40)
    found = info[0]
    state = index._core.export_state()
    ref = beam_search_reference(state, queries, 10, 40, pending_limit=launch.beam_capacity(40, True))
    _compare(labels, dists, found, ref, np.frombuffer(state["labels"], np.uint64))


def test_staging_reuse_waits_for_the_upload(fake_gpu, monkeypatch, rng):
    """Many chunks in one sync: each staging buffer is rewritten only after the event of its
    previous (asynchronous) upload; a buffer rewritten before would scatter the wrong rows."""
    monkeypatch.setattr(fake_gpu, "_CHUNK_BYTES", 2000)     # about 20 rows a chunk
    index = gpuhnsw.Index("l2", 10)
    index.init_index(600, M=4, random_seed=1)
    index.add_items(rng.random((500, 10), dtype=np.float32))
    mirror = fake_gpu.DeviceMirror(index._core)
    st = mirror.sync()
    assert st.rows == 500 and mirror.check_against_core() == []
    index.add_items(rng.random((60, 10), dtype=np.float32))
    mirror.sync()
    assert mirror.check_against_core() == []


def test_staging_without_the_wait_would_corrupt(fake_gpu, monkeypatch, rng):
    """The stand-in's stream is strict enough to catch the defect the events prevent."""
    monkeypatch.setattr(fake_gpu, "_CHUNK_BYTES", 2000)
    monkeypatch.setattr(fake_gpu._Staging, "wait", lambda self: None)
    index = gpuhnsw.Index("l2", 10)
    index.init_index(600, M=4, random_seed=1)
    index.add_items(rng.random((500, 10), dtype=np.float32))
    mirror = fake_gpu.DeviceMirror(index._core)
    mirror.sync()
    assert mirror.check_against_core() != []


# ---------------------------------------------------------------------------------------------
# the in-batch candidates of GPU-assisted inserts, with a NumPy select_topk_kernel

@pytest.mark.parametrize("space,offset", [("l2", 0), ("l2", 1e4), ("cosine", 0)])
def test_batch_neighbours_exact_within_the_batch(fake_cupy, numpy_select_topk, monkeypatch, datasets, space,
                                                 offset):
    """The in-batch candidates of GPU-assisted inserts: each row's k nearest other rows, also far
    from the origin (uncentred float32 keys |b|^2 - 2 a.b: 42% right at offset 1e4)."""
    from gpuhnsw.testing import exact_knn

    monkeypatch.setattr(ops, "_TILE_BYTES", 4 * 500 * 37)   # several row tiles
    name = "siftsmall" if space == "l2" else "minilm-debian"
    rows, _, _, _ = datasets(name, n_base=500, n_queries=1)
    got = ops.batch_neighbours(fake_cupy, fake_cupy.asarray(rows + np.float32(offset)), 8, space)  # integers
    ids, _ = exact_knn(rows, rows, 9, space)
    want = np.array([[j for j in row if j != i][:8] for i, row in enumerate(ids)])
    assert got.dtype == np.uint32 and got.shape == (500, 8)
    assert np.mean(got == want) > 0.99            # float32 keys: rare near-ties may swap
    assert not (got == np.arange(500)[:, None]).any()



# ---------------------------------------------------------------------------------------------
# a sync beside an insert (tests/test_gpu.py::test_inserting_while_gpu_queries_run failed on an H200)

class _MidInsertCore:
    """A real core as a sync sees it while ``slot``, the node that raises the max level, is being
    inserted: its row and upper blocks read as ``store_vector`` left them (vector and label, no
    links) and the entry point is still the old one.  ``finish()`` is the rest of that insert, in
    the core's order: the row's last dirty mark (taken by the next drain), then the entry switch.
    ``during_drain`` runs once inside the next ``drain_dirty``, right after the log is taken."""

    def __init__(self, core, slot, old_entry):
        self._core, self._slot, self._old_entry = core, slot, old_entry
        self._levels = np.frombuffer(core.export_state()["levels"], np.uint8)   # [count]
        self._inserting, self._marked = True, []
        self.during_drain = None

    def __getattr__(self, name):
        return getattr(self._core, name)

    @property
    def entry_point(self):
        return self._old_entry if self._inserting else self._core.entry_point

    def finish(self):
        self._marked.append(np.uint64(_core.DIRTY_LINKS | _core.DIRTY_UPPER) << np.uint64(32) | np.uint64(self._slot))
        self._inserting = False

    def sync_pending(self, drain):   # the insert in flight marks rows (raising the core's flag) until it ends
        return self._inserting or bool(self._marked) or self._core.sync_pending(drain)

    def drain_dirty(self):   # ((kind << 32) | slot, ascending by slot; the drain's number)
        taken, drain = self._core.drain_dirty()
        log = np.concatenate([np.frombuffer(taken, np.uint64), np.array(self._marked, np.uint64)])
        self._marked = []
        hook, self.during_drain = self.during_drain, None
        if hook:
            hook()
        return log[np.argsort(log & np.uint64(0xFFFFFFFF), kind="stable")].tobytes(), drain

    def gather_rows(self, slots, vectors, links, degree, labels, levels):
        self._core.gather_rows(slots, vectors, links, degree, labels, levels)
        self._half_built(slots, links, degree)

    def gather_links(self, slots, links, degree):
        self._core.gather_links(slots, links, degree)
        self._half_built(slots, links, degree)

    def _half_built(self, slots, links, degree):
        if self._inserting:
            mine = slots == self._slot
            links[mine], degree[mine] = 0xFFFFFFFF, 0

    def gather_upper(self, slots):
        blocks = np.frombuffer(self._core.gather_upper(slots), np.uint32).copy()
        if self._inserting:
            width = 1 + int(self._core.M)
            sizes = self._levels[slots].astype(np.int64) * width
            for at, size in zip((np.cumsum(sizes) - sizes)[slots == self._slot], sizes[slots == self._slot]):
                block = blocks[at:at + size].reshape(-1, width)   # each level: count 0, no ids
                block[:, 0], block[:, 1:] = 0, 0xFFFFFFFF
        return blocks.tobytes()


def test_sync_beside_an_insert_that_raises_the_max_level(fake_gpu, datasets):
    """The new entry point's row went up half-built in one sync; its last writes and the entry
    switch land between the next sync's drain and the rest of that sync.  That sync must not take
    the new entry (its mirrored row has no links: every query would start from a dead end)."""
    base, _, _, _ = datasets("siftsmall", n_base=3000, n_queries=1)
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base), M=4, ef_construction=40, random_seed=5)
    index.add_items(base[:200])
    old_entry, lo = index._core.entry_point, 200
    while index._core.entry_point == old_entry:           # one row at a time until one raises the level
        index.add_items(base[lo:lo + 1], [lo])
        lo += 1
    new_entry = index._core.entry_point
    core = _MidInsertCore(index._core, new_entry, old_entry)
    mirror = fake_gpu.DeviceMirror(core)
    mirror.sync()                                          # the new entry's row goes up half-built
    assert mirror.entry_point == old_entry
    core.during_drain = core.finish
    mirror.sync()
    entry = mirror.entry_point
    want = np.frombuffer(index._core.export_state()["degree0"], np.uint32)[entry]
    assert want > 0 and int(mirror.degree0[entry]) == want, (entry, old_entry, new_entry)
    mirror.sync()                                          # the insert's last mark arrives now
    assert mirror.entry_point == new_entry and mirror.check_against_core() == []


@pytest.mark.parametrize("threads", [1, 2])
def test_one_percent_insert_moves_a_small_share_of_a_full_upload(fake_gpu, datasets, threads):
    """A 1 % insert dirties each new row and many neighbours whose only change is a back-link:
    the new rows go up whole, the neighbours' lists only from the degree the device holds (issue 7's
    target: at most 3 % of a full upload's bytes; 15 % when every dirty row went up whole)."""
    base, _, _, _ = datasets("siftsmall", n_base=10_000, n_queries=1)
    n = 9_900
    index = gpuhnsw.Index("l2", base.shape[1])
    index.init_index(len(base), M=16, ef_construction=100, random_seed=1)
    index.add_items(base[:n], num_threads=2)
    mirror = fake_gpu.DeviceMirror(index._core)
    full = mirror.sync()
    index.add_items(base[n:], np.arange(n, len(base)), num_threads=threads)
    delta = mirror.sync()
    assert delta.rows == len(base) - n and delta.link_rows > 5 * delta.rows
    assert delta.bytes <= 0.03 * full.bytes, delta.bytes / full.bytes
    assert mirror.check_against_core() == []


def test_search_launch_chosen_once_per_parameters(fake_gpu, monkeypatch, rng):
    """A batch of one query pays for its launch, not for choosing it: the launch of each (beam,
    search_width, filtered) is computed once; the shared-memory opt-in covers every launch."""
    class Kernel:
        shared_size_bytes = 46_000
        max_dynamic_shared_size_bytes = 0

        def __call__(self, grid, block, args, shared_mem):
            calls.append(shared_mem)

    calls, chosen, kernel = [], [], Kernel()
    real_launch = launch.search_launch
    monkeypatch.setattr(kernels, "get_kernel", lambda name, instance, device=None:
                        kernel if name == "search" else _numpy_scatter)
    monkeypatch.setattr(kernels, "shared_limit", lambda device: 227 * 1024)
    monkeypatch.setattr(launch, "search_launch", lambda *a: chosen.append(a[4:7]) or real_launch(*a))
    index = gpuhnsw.Index("l2", 16)
    index.init_index(200, M=8, random_seed=1)
    index.add_items(rng.random((200, 16), dtype=np.float32))
    mirror = fake_gpu.DeviceMirror(index._core)
    mirror.sync()
    for ef in (32, 32, 64, 32):
        mirror.search(rng.random((1, 16), dtype=np.float32), 10, ef)
    assert chosen == [(32, 1, False), (64, 1, False)]
    assert len(calls) == 4 and all(b > 0 for b in calls)
    assert kernel.max_dynamic_shared_size_bytes == 227 * 1024 - 46_000    # 46,000 + dynamic > 48 KiB


def test_sync_pending_is_the_core_s_o1_answer(fake_gpu, rng):
    """Core.sync_pending(drain): up after any dirty mark or entry switch, down after a drain, up for a
    consumer whose last drain is not the newest; a mirror's sync with nothing pending drains nothing."""
    index = gpuhnsw.Index("l2", 8)
    index.init_index(500, M=4, random_seed=2)
    core = index._core
    assert not core.sync_pending(0)
    index.add_items(rng.random((100, 8), dtype=np.float32))
    assert core.sync_pending(0)
    _, drain = core.drain_dirty()
    assert not core.sync_pending(drain) and core.sync_pending(drain - 1)
    index.mark_deleted(5)
    assert core.sync_pending(drain)
    mirror = fake_gpu.DeviceMirror(core)
    mirror.sync()
    assert not core.sync_pending(mirror._drain)
    before = mirror._drain
    assert mirror.sync().rows == 0 and mirror._drain == before     # no drain: the O(1) check said so
    index.add_items(rng.random((1, 8), dtype=np.float32), [1000])
    assert mirror.sync().rows == 1 and mirror.check_against_core() == []
