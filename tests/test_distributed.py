"""gpuhnsw.distributed on a LocalCluster of 2 worker processes x 1 thread (the CI machine's cores).

One cluster serves the module; the fault tests start their own short-lived one, since they kill
workers.  Faults are injected deterministically (a worker plugin kills its own process with SIGKILL
right after the first task of a given kind finishes), never by timing.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402  (distributed's dependency)
import dask.array as da  # noqa: E402

import gpuhnsw  # noqa: E402
from gpuhnsw import testing  # noqa: E402
from gpuhnsw.distributed import sharded as gdistributed  # noqa: E402
from gpuhnsw.distributed import ShardedIndex, knn_graph, merge_topk, shard_of  # noqa: E402

# the workers unpickle this module's functions (fault plugin) by value: they cannot import tests/
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PAD = np.uint64(2**64 - 1)
BUILD = {"M": 8, "ef_construction": 64}


def new_cluster():
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    dashboard_address=":0", silence_logs=40)


@pytest.fixture(scope="module")
def client():
    with new_cluster() as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sift():
    base, queries, gt, _ = testing.load_dataset("siftsmall")   # fails (not skips) without the data
    return base, queries, gt


def single_index(base, threads=1, **params):
    index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
    index.init_index(len(base), **{**BUILD, **params})
    index.add_items(base, np.arange(len(base)), num_threads=threads)
    return index


# ------------------------------------------------------------------------------------------- import

def test_import_gpuhnsw_does_not_load_dask():
    code = ("import sys, gpuhnsw, gpuhnsw.knn_graph, gpuhnsw.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'fsspec')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------------------------------- merge

def reference_merge(labels, dists, k):
    """Row by row with Python's sort over (distance, label); padding sorts last."""
    nq = labels[0].shape[0]
    out_l = np.full((nq, k), PAD, dtype=np.uint64)
    out_d = np.full((nq, k), np.inf, dtype=np.float32)
    for r in range(nq):
        pairs = sorted((float(d[r, j]), int(l_[r, j])) for l_, d in zip(labels, dists)
                       for j in range(l_.shape[1]))[:k]
        out_l[r, :len(pairs)] = [p[1] for p in pairs]
        out_d[r, :len(pairs)] = [p[0] for p in pairs]
    return out_l, out_d


@pytest.mark.parametrize("k", [1, 5, 12, 40])   # 40: more than every shard together holds
def test_merge_topk_matches_a_sort_by_distance_then_label(rng, k):
    nq, widths = 30, [7, 0, 12, 3]              # a 0-wide part: an empty shard
    labels, dists = [], []
    for w in widths:
        lab = rng.choice(10_000, size=(nq, w), replace=True).astype(np.uint64)
        dst = rng.integers(0, 5, size=(nq, w)).astype(np.float32)   # many exact ties
        pad = rng.random((nq, w)) < 0.2                               # a shard found fewer than k
        lab[pad], dst[pad] = PAD, np.inf
        labels.append(lab)
        dists.append(dst)
    got_l, got_d = merge_topk(labels, dists, k)
    want_l, want_d = reference_merge(labels, dists, k)
    np.testing.assert_array_equal(got_l, want_l)
    np.testing.assert_array_equal(got_d, want_d)
    # the same through np.argsort of a combined key (distance rank, then label)
    lab, dst = np.concatenate(labels, axis=1), np.concatenate(dists, axis=1)
    order = np.argsort(np.lexsort((lab, dst), axis=1), axis=1, kind="stable")
    first = np.argsort(order, axis=1)[:, :min(k, lab.shape[1])]
    np.testing.assert_array_equal(got_l[:, :first.shape[1]], np.take_along_axis(lab, first, axis=1))


def test_shard_of_is_deterministic_and_balanced():
    labels = np.arange(100_000, dtype=np.uint64)
    shards = shard_of(labels, 4)
    np.testing.assert_array_equal(shards, shard_of(labels[::-1], 4)[::-1])   # order-free
    counts = np.bincount(shards, minlength=4)
    assert counts.min() > 0.95 * len(labels) / 4
    assert not np.array_equal(shard_of(labels, 4, seed=1), shards)


# ------------------------------------------------------------------------------------ ShardedIndex

def test_one_shard_is_bit_identical_to_a_single_index(client, sift):
    base, queries, _ = sift
    base = base[:3000]
    sharded = ShardedIndex(client, "l2", 128, n_shards=1, num_threads=1, **BUILD)
    sharded.add_items(da.from_array(base, chunks=(1000, -1)), np.arange(len(base)))  # 3 blocks
    single = single_index(base)
    got = sharded.knn_query(queries, k=10, ef=32)
    want = single.knn_query(queries, k=10, ef=32)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_shards_reach_the_single_index_recall(client, sift):
    base, queries, gt = sift
    single = single_index(base)
    floor = testing.recall_at_k(single.knn_query(queries, k=10, ef=10)[0], gt, 10)
    assert floor < 0.999   # ef=10 leaves room to fail
    for n_shards in (2, 4):
        sharded = ShardedIndex(client, "l2", 128, n_shards=n_shards, num_threads=1, **BUILD)
        sharded.add_items(base)
        assert sharded.shard_sizes() == np.bincount(shard_of(np.arange(len(base)), n_shards)).tolist()
        recall = testing.recall_at_k(sharded.knn_query(queries, k=10, ef=10)[0], gt, 10)
        assert recall >= floor - 0.01, (n_shards, recall, floor)


@pytest.fixture(scope="module")
def small(client, sift):
    """A 3-shard index of 2,000 siftsmall rows with labels 1000..2999."""
    base = sift[0][:2000]
    index = ShardedIndex(client, "l2", 128, n_shards=3, num_threads=1, **BUILD)
    index.add_items(base, np.arange(1000, 3000))
    return index, base


def test_same_data_seed_and_shards_give_the_same_index_whatever_the_order(client, small):
    index, base = small
    order = np.random.default_rng(5).permutation(len(base))
    other = ShardedIndex(client, "l2", 128, n_shards=3, num_threads=1, **BUILD)
    other.add_items(da.from_array(base[order], chunks=(700, -1)), np.arange(1000, 3000)[order])
    assert other.shard_sizes() == index.shard_sizes()
    q = base[:50] + 0.5
    again = ShardedIndex(client, "l2", 128, n_shards=3, num_threads=1, **BUILD)
    again.add_items(base, np.arange(1000, 3000))
    np.testing.assert_array_equal(again.knn_query(q, k=10)[0], index.knn_query(q, k=10)[0])
    # the shuffled build holds the same labels in the same shards and finds the same neighbours
    l1, d1 = other.knn_query(q, k=5, ef=200)
    l2, d2 = index.knn_query(q, k=5, ef=200)
    np.testing.assert_array_equal(d1, d2)


def test_dask_queries_give_dask_results_equal_to_numpy(small):
    index, base = small
    q = base[:300] + 0.25
    lab, dst = index.knn_query(da.from_array(q, chunks=(128, -1)), k=7)
    assert isinstance(lab, da.Array) and isinstance(dst, da.Array)
    assert lab.dtype == np.uint64 and dst.dtype == np.float32 and lab.shape == (300, 7)
    want = index.knn_query(q, k=7)
    np.testing.assert_array_equal(lab.compute(), want[0])
    np.testing.assert_array_equal(dst.compute(), want[1])


def test_len_in_get_items_filter_and_k_larger_than_a_shard(small):
    index, base = small
    assert len(index) == 2000
    assert 1000 in index and 2999 in index and 999 not in index and -1 not in index
    np.testing.assert_array_equal(index.get_items([2500, 1000, 1777]), base[[1500, 0, 777]])
    allowed = np.array([1003, 2004, 1500], dtype=np.uint64)       # labels in different shards
    lab, _ = index.knn_query(base[:4], k=5, filter=allowed, pad=True)
    assert set(lab[0].tolist()) == set(allowed.tolist()) | {int(PAD)}
    with pytest.raises(RuntimeError, match="contiguous"):
        index.knn_query(base[:4], k=5, filter=allowed)
    lab, _ = index.knn_query(base[:2], k=5, filter=lambda label: label % 2 == 0)
    assert (lab % 2 == 0).all()
    with pytest.raises(RuntimeError, match="not found|Label"):
        index.get_items([5])


def test_update_delete_and_bad_input(client, sift):
    base = sift[0][:600]
    index = ShardedIndex(client, "l2", 128, n_shards=2, num_threads=1, **BUILD)
    index.add_items(base)
    sizes = index.shard_sizes()
    index.add_items(base[:10][::-1], np.arange(10))        # existing labels: updated in place
    assert index.shard_sizes() == sizes
    np.testing.assert_array_equal(index.get_items([0]), base[9:10])
    index.mark_deleted(np.array([3, 4]))
    index.mark_deleted(5)
    assert len(index) == 597 and 3 not in index
    lab, _ = index.knn_query(base[3:6], k=3)
    assert not np.isin(lab, [3, 4, 5]).any()
    with pytest.raises(RuntimeError, match="Label not found"):
        index.mark_deleted([6, 100_000])
    assert 6 in index                                      # nothing deleted
    bad = base[:400].copy()
    bad[350, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.add_items(da.from_array(bad, chunks=(100, -1)), np.arange(1000, 1400))
    with pytest.raises(gpuhnsw.InputShapeError):
        index.add_items(base[:5, :64])
    assert len(index) == 597 and 1000 not in index         # a rejected add changes nothing
    index.add_items(base[:5])          # auto labels: the counter moved by 600 + 10 (as hnswlib)
    assert 610 in index and 614 in index and 615 not in index


def test_repeated_labels_delete_as_in_a_single_index(client, sift):
    """mark_deleted([x, x]) deletes x, as Index's does; the shard's task deleted label by label and
    failed on the repeat after deleting the first."""
    base = sift[0][:300]
    sharded = ShardedIndex(client, "l2", 128, n_shards=2, num_threads=1, **BUILD)
    sharded.add_items(base, np.arange(300))
    sharded.mark_deleted([7, 7, 9])
    assert sharded.count_deleted == 2


def test_index_surface_equals_a_single_index(client, sift):
    """ShardedIndex lacked get_current_count, get_ids_list, range_query, unmark_deleted, per-query
    filters and the rest of the surface Index has; each now answers as a single Index over the same
    rows (searches with ef above every shard's size are exhaustive, so both are exact)."""
    base, queries = sift[0][:1500], sift[1][:6]
    labels = np.arange(1500, dtype=np.uint64) * 7 + 3
    sharded = ShardedIndex(client, "l2", 128, n_shards=3, num_threads=1, **BUILD)
    sharded.add_items(base, labels)
    single = gpuhnsw.Index("l2", 128, device="cpu")
    single.init_index(1500, **BUILD)
    single.add_items(base, labels, num_threads=1)
    gone = labels[::50]
    for index in (sharded, single):
        index.mark_deleted(gone)
        index.unmark_deleted(gone[:5])
        index.set_ef(800)
    assert sharded.get_current_count() == sharded.element_count == single.get_current_count() == 1500
    assert sharded.count_deleted == single.count_deleted == len(gone) - 5
    assert len(sharded) == len(single) and sharded.max_elements >= 1500
    assert sorted(sharded.get_ids_list()) == sorted(single.get_ids_list())
    np.testing.assert_array_equal(sharded.get_items(labels[1:40:3]), single.get_items(labels[1:40:3]))
    assert sharded.check_integrity()["n_live"] == single.check_integrity()["n_live"]
    assert sharded.memory_usage() > 0
    with pytest.raises(RuntimeError, match="not deleted"):
        sharded.unmark_deleted(gone[:6])                    # gone[:5] are live again
    with pytest.raises(RuntimeError, match="Label not found: 4"):
        sharded.unmark_deleted([gone[6], 4])
    assert sharded.count_deleted == len(gone) - 5           # nothing changed
    live = ~np.isin(labels, gone[5:])
    radius = float(np.median(((base[:300] - queries[0]) ** 2).sum(1)))
    truth = [set(labels[live][((base[live] - q) ** 2).sum(1) <= radius].tolist()) for q in queries]
    recall = {}
    for name, index in (("sharded", sharded), ("single", single)):
        offsets, found, dists = index.range_query(queries, radius)
        rows = [found[offsets[r]:offsets[r + 1]] for r in range(len(queries))]
        assert all(set(row.tolist()) <= want for row, want in zip(rows, truth))
        assert (dists <= radius).all()
        recall[name] = sum(len(row) for row in rows) / sum(len(want) for want in truth)
        if name == "sharded":   # ordered by (distance, label) within each row, cut to max_results
            for r in range(len(queries)):
                d, lab = dists[offsets[r]:offsets[r + 1]], rows[r]
                assert all((d[i], lab[i]) <= (d[i + 1], lab[i + 1]) for i in range(len(d) - 1))
            capped = index.range_query(queries, radius, max_results=7)
            assert (np.diff(capped[0]) == np.minimum(7, np.diff(offsets))).all()
            np.testing.assert_array_equal(capped[2][capped[0][1]:capped[0][2]], dists[offsets[1]:offsets[1] + 7])
    # exhaustive searches except for nodes pruning left unreachable: smaller shards strand no more
    assert recall["sharded"] >= max(0.995, recall["single"] - 0.002), recall
    per_row = [labels[r * 100:(r + 1) * 100] for r in range(len(queries))]   # one allowed set per row
    mask = np.zeros((len(queries), int(labels.max()) + 1), dtype=bool)
    for r, allowed in enumerate(per_row):
        mask[r, allowed.astype(np.int64)] = True
    for filt in (per_row, mask):
        got_l, got_d = sharded.knn_query(queries, k=5, filter=filt)
        want_l, want_d = single.knn_query(queries, k=5, filter=filt)
        np.testing.assert_array_equal(got_l, want_l)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-6)
        assert all(np.isin(got_l[r], per_row[r]).all() for r in range(len(queries)))
    offsets, found, _ = sharded.range_query(queries, 1e12, filter=per_row)
    for r in range(len(queries)):
        assert sorted(found[offsets[r]:offsets[r + 1]].tolist()) == sorted(set(per_row[r].tolist()) - set(gone[5:].tolist()))


# -------------------------------------------------------------------------------------- persistence

@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_save_load_round_trip(client, small, tmp_path, scheme):
    index, base = small
    url = f"file://{tmp_path}/idx" if scheme == "file" else f"memory://gpuhnsw-test-{os.getpid()}/idx"
    index.save(url)
    loaded = ShardedIndex.load(client, url)
    assert loaded.n_shards == 3 and len(loaded) == len(index)
    q = base[:40] + 0.5
    for a, b in zip(loaded.knn_query(q, k=10), index.knn_query(q, k=10)):
        np.testing.assert_array_equal(a, b)


def test_saved_on_two_workers_loads_on_one(small, tmp_path):
    index, base = small
    index.save(str(tmp_path / "idx"))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=40) as cluster, \
            distributed.Client(cluster) as one:
        loaded = ShardedIndex.load(one, f"file://{tmp_path}/idx")
        assert loaded.n_shards == 3 and loaded.shard_sizes() == index.shard_sizes()
        np.testing.assert_array_equal(loaded.knn_query(base[:20], k=5)[0], index.knn_query(base[:20], k=5)[0])


def test_load_refuses_corruption_and_mismatch(client, small, tmp_path):
    index, _ = small
    index.save(str(tmp_path / "idx"))
    shard = tmp_path / "idx" / "shard-00001.ghnsw"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    shard.write_bytes(bytes(blob))
    with pytest.raises(gpuhnsw.IndexFileError, match="shard-00001.*sha256"):
        ShardedIndex.load(client, str(tmp_path / "idx"))
    manifest = tmp_path / "idx" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(gpuhnsw.IndexFileError, match="version 99"):
        ShardedIndex.load(client, str(tmp_path / "idx"))
    with pytest.raises(gpuhnsw.IndexFileError, match="manifest"):
        ShardedIndex.load(client, str(tmp_path / "nothing-here"))


def test_edited_manifest_does_not_load_part_of_the_index(client, small, tmp_path):
    """With n_shards lowered and the shard list cut to match, every remaining shard passed its own
    checks (its labels still route to it) and half the index loaded without a word; the manifest
    now carries its own sha256 and the total counts."""
    index, _ = small
    index.save(str(tmp_path / "idx"))
    manifest = tmp_path / "idx" / "manifest.json"
    saved = json.loads(manifest.read_text())
    cut = {**saved, "n_shards": 1, "shards": saved["shards"][:1]}
    for edited, fragment in ((cut, "sha256 does not match"), ({**saved, "ef": 999}, "sha256 does not match"),
                             ({k: v for k, v in saved.items() if k != "manifest_sha256"}, "sha256 does not match")):
        manifest.write_text(json.dumps(edited))
        with pytest.raises(gpuhnsw.IndexFileError, match=fragment):
            ShardedIndex.load(client, str(tmp_path / "idx"))
    recounted = {**cut, "count": cut["shards"][0]["count"] + 1}
    recounted["manifest_sha256"] = gdistributed._manifest_digest(recounted)
    manifest.write_text(json.dumps(recounted))
    with pytest.raises(gpuhnsw.IndexFileError, match="the shards hold"):
        ShardedIndex.load(client, str(tmp_path / "idx"))
    manifest.write_text(json.dumps(saved))
    assert len(ShardedIndex.load(client, str(tmp_path / "idx"))) == len(index)


def test_damaged_shard_error_names_the_shard_url(client, small, tmp_path):
    """A shard that passed the manifest's sha256 but not the file checks named a temporary path."""
    index, _ = small
    index.save(str(tmp_path / "idx"))
    manifest = tmp_path / "idx" / "manifest.json"
    m = json.loads(manifest.read_text())
    shard = tmp_path / "idx" / "shard-00002.ghnsw"
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0x01                                       # inside the last section, behind its CRC
    shard.write_bytes(bytes(blob))
    m["shards"][2].update(sha256=hashlib.sha256(blob).hexdigest())
    m["manifest_sha256"] = gdistributed._manifest_digest(m)
    manifest.write_text(json.dumps(m))
    with pytest.raises(gpuhnsw.IndexFileError, match=r"^file://.*idx/shard-00002\.ghnsw \(read as gpuhnsw's format\): .*(CRC|checksum)"):
        ShardedIndex.load(client, str(tmp_path / "idx"))


# ---------------------------------------------------------------------------------------- knn_graph

def exact_graph(x, k):
    return gpuhnsw.knn_graph(x, k, method="exact", device="cpu")


def test_knn_graph_equals_the_exact_graph_where_exhaustive(client, sift):
    x = np.concatenate([sift[0][:1200], sift[0][:8]])      # 8 duplicated rows: twins at distance 0
    for k, n_shards in ((10, 4), (20, 3)):
        # ef beyond every shard's size: each shard search is exhaustive, so the result is exact
        nb, dist = knn_graph(x, k, client=client, n_shards=n_shards, ef=600, progress=False, **BUILD)
        want_nb, want_dist = exact_graph(x, k)
        np.testing.assert_array_equal(nb, want_nb)
        np.testing.assert_allclose(dist, want_dist, rtol=1e-6)
    tiny = sift[0][:40]                                    # k larger than each shard (about 10 rows)
    nb, _ = knn_graph(tiny, 15, client=client, n_shards=4, ef=64, progress=False)
    np.testing.assert_array_equal(nb, exact_graph(tiny, 15)[0])


def test_knn_graph_shards_reach_the_single_machine_hnsw_graph(client, sift):
    x, k = sift[0], 10
    truth, _ = exact_graph(x, k)
    single, _ = gpuhnsw.knn_graph(x, k, method="hnsw", ef=12, device="cpu", **BUILD)
    floor = testing.recall_at_k(single, truth, k)
    nb, _, info = knn_graph(da.from_array(x, chunks=(2500, -1)), k, client=client, ef=12,
                            num_threads=1, progress=False, return_info=True, **BUILD)
    recall = testing.recall_at_k(nb, truth, k)
    assert recall >= floor, (recall, floor)
    assert info["blocks"] == 4 and info["n_indexes"] == 2 and info["queries"] == 2 * len(x)
    assert abs(info["recall_estimate"] - recall) < 0.02


def test_knn_graph_clusters_reports_a_sampled_recall(client, sift):
    x, k = sift[0][:4000], 10
    truth, _ = exact_graph(x, k)
    nb, dist, info = knn_graph(x, k, client=client, method="clusters", n_clusters=6,
                               recall_sample=500, progress=False, return_info=True, **BUILD)
    recall = testing.recall_at_k(nb, truth, k)
    assert info["n_indexes"] == 6 and info["queries"] == 2 * len(x) and info["recall_sample"] == 500
    assert abs(info["recall_estimate"] - recall) < 0.03, (info, recall)
    assert recall > 0.8
    assert (nb != np.arange(len(x))[:, None]).all() and (np.diff(dist, axis=1) >= 0).all()


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_cluster_assignment_far_from_the_origin(offset):
    """The clusters method's k-means assignment ranked centroids by uncentred float32 keys
    |c|^2 - 2 x.c: rounding noise 10,000 from the origin (here 4% of the rows got their nearest
    centroid).  Keys centred on the centroids keep the exact ranking wherever the data is."""
    from gpuhnsw.distributed.graph import _nearest_centroids

    rng = np.random.default_rng(0)
    centroids = (rng.standard_normal((32, 16)) + offset).astype(np.float32)
    x = (rng.standard_normal((3000, 16)) + offset).astype(np.float32)
    d64 = ((x.astype(np.float64)[:, None, :] - centroids.astype(np.float64)[None]) ** 2).sum(axis=2)
    want = np.argsort(d64, axis=1, kind="stable")[:, :2]
    got = _nearest_centroids(x, centroids, "l2", 2)
    assert np.mean(got[:, 0] == want[:, 0]) > 0.999
    assert np.mean(got == want) > 0.995


def test_knn_graph_resumes_from_its_checkpoint(client, sift, tmp_path):
    x, k = sift[0][:3000], 8
    ckpt = str(tmp_path / "ckpt")
    data = da.from_array(x, chunks=(500, -1))              # 6 blocks
    first, first_d = knn_graph(data, k, client=client, checkpoint_dir=ckpt, progress=False, **BUILD)
    # an interrupted run: blocks 1 and 4 never written, block 5 torn; block 0 holds a marker that
    # a recomputation would overwrite
    os.remove(tmp_path / "ckpt" / "block-000001.npz")
    os.remove(tmp_path / "ckpt" / "block-000004.npz")
    (tmp_path / "ckpt" / "block-000005.npz").write_bytes(b"PK\x03\x04 torn")
    marker = np.full((500, k), 7, dtype=np.int64)
    with open(tmp_path / "ckpt" / "block-000000.npz", "wb") as f:
        np.savez(f, neighbors=marker, distances=np.zeros((500, k), dtype=np.float32))
    nb, dist, info = knn_graph(data, k, client=client, checkpoint_dir=ckpt, progress=False,
                               return_info=True, recall_sample=0, **BUILD)
    assert (info["blocks_computed"], info["blocks_loaded"]) == (3, 3)
    np.testing.assert_array_equal(nb[:500], marker)        # loaded, not recomputed
    np.testing.assert_array_equal(nb[500:], first[500:])
    np.testing.assert_array_equal(dist[500:], first_d[500:])
    _, _, info = knn_graph(data, k, client=client, checkpoint_dir=ckpt, progress=False,
                           return_info=True, recall_sample=0, **BUILD)
    assert info["blocks_computed"] == 0 and info["n_indexes"] == 0   # nothing left to build
    with pytest.raises(ValueError, match="different knn_graph run"):
        knn_graph(data, k + 1, client=client, checkpoint_dir=ckpt, progress=False, **BUILD)


# ------------------------------------------------------------------------------------------- faults

class KillOnce(distributed.WorkerPlugin):
    """SIGKILL this worker's process right after the ``after``-th task whose key starts with
    ``prefix`` finishes (counted over all workers; a marker file makes it happen once per cluster)."""

    def __init__(self, prefix, marker, after=1):
        self.prefix, self.marker, self.after = prefix, marker, after

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory" and str(key).startswith(self.prefix):
            with open(self.marker + ".count", "a") as f:   # one byte per finished task
                f.write(".")
            if os.path.getsize(self.marker + ".count") < self.after:
                return
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def fault_client():
    with new_cluster() as cluster, distributed.Client(cluster) as c:
        yield c


def test_worker_killed_mid_build_and_mid_query(fault_client, client, sift, tmp_path):
    base, queries, _ = sift
    base = base[:4000]
    reference = ShardedIndex(client, "l2", 128, n_shards=2, num_threads=1, **BUILD)
    reference.add_items(base[:2000])
    reference.add_items(base[2000:])
    want = reference.knn_query(queries, k=10)

    fault_client.register_plugin(KillOnce("shard_add", str(tmp_path / "build-kill")))
    index = ShardedIndex(fault_client, "l2", 128, n_shards=2, num_threads=1, **BUILD)
    index.add_items(base[:2000])         # the worker dies after its first add: replayed elsewhere
    index.add_items(base[2000:])
    assert (tmp_path / "build-kill").exists()
    fault_client.register_plugin(KillOnce("_shard_query", str(tmp_path / "query-kill")))
    got = index.knn_query(queries, k=10)  # a worker dies holding a shard: rebuilt from its chain
    assert (tmp_path / "query-kill").exists()
    assert len(index) == 4000
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_worker_killed_mid_graph(fault_client, sift, tmp_path):
    x, k = sift[0][:3000], 10
    fault_client.register_plugin(KillOnce("_graph_query", str(tmp_path / "graph-kill")))
    nb, dist = knn_graph(da.from_array(x, chunks=(750, -1)), k, client=fault_client, ef=400,
                         num_threads=1, progress=False, **BUILD)
    assert (tmp_path / "graph-kill").exists()
    np.testing.assert_array_equal(nb, exact_graph(x, k)[0])


def test_interrupted_knn_graph_resumes_with_only_the_missing_blocks(client, sift, tmp_path):
    x, k = sift[0][:3000], 8
    data = da.from_array(x, chunks=(375, -1))              # 8 blocks
    ckpt = tmp_path / "ckpt"
    # allowed-failures=0: the first task running on a killed worker fails the whole computation
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), new_cluster() as cluster, \
            distributed.Client(cluster) as c:
        c.register_plugin(KillOnce("_graph_merge", str(tmp_path / "kill"), after=3))
        with pytest.raises(distributed.KilledWorker):
            knn_graph(data, k, client=c, checkpoint_dir=str(ckpt), num_threads=1, progress=False,
                      **BUILD)
        done = len(list(ckpt.glob("block-*.npz")))
        assert done < 8
        nb, dist, info = knn_graph(data, k, client=c, checkpoint_dir=str(ckpt), num_threads=1,
                                   progress=False, return_info=True, recall_sample=0, **BUILD)
    assert (info["blocks_loaded"], info["blocks_computed"]) == (done, 8 - done)
    want_nb, want_dist = knn_graph(data, k, client=client, num_threads=1, progress=False, **BUILD)
    np.testing.assert_array_equal(nb, want_nb)
    np.testing.assert_array_equal(dist, want_dist)
