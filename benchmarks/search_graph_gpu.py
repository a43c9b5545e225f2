"""Issue 18's device run: the search graph kept in step on a GPU index (needs CuPy and a GPU).

On kernel_ab.py's hard set (intrinsic dimension 24 in 128, generated on the device) of ``--n`` rows
and 10,000 queries, one process, one card, the fixed kernel on float16 rows at ``--width``:

1. build: an index of the first half (``--build``, GPU-assisted by default); the search graph built
   by the C engine on every core (``SearchGraph.rebuild``, median of 3) and the first sync of the
   optimized index (build and upload);
2. idle, on the half: recall@10 and QPS at batch 10,000 over the ef sweep, the same kernel over
   HNSW level 0 and over the graph; ``ef`` := the smallest that reaches 0.95 over the graph;
3. live growth: the other half added in 1 % batches (``n // 100`` rows); after each, one query batch
   of 10,000 at ``ef`` (its sync updates the graph and uploads the rows it wrote; timed apart), then
   the first 1,000 rows of the batch as queries at k=1 (each finds itself: the batch is visible to
   the query batch after its ``add_items``);
4. end: recall at ``ef`` over the kept graph against a graph built fresh on the final index (an
   optimized copy), the idle QPS of both, and the update syncs against a full build.

The JSON (``search_graph_gpu.json`` in ``--out``) is rewritten after every measurement, so a run
cut by its time box keeps what it measured.

    python benchmarks/search_graph_gpu.py --n 1000000 --out "$OUT"
    python benchmarks/search_graph_gpu.py --n 200000 --budget-s 60 --out /tmp/sg
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_ab import EF_SWEEP, K, SEED, TARGET, exact_peer, synthetic  # noqa: E402  (sibling script)

import gpuhnsw  # noqa: E402
from gpuhnsw._search_graph import SearchGraph  # noqa: E402
from gpuhnsw.testing import machine_info, recall_at_k  # noqa: E402

VISIBLE_ROWS = 1000   # rows of each growth batch queried for themselves


def timed_query(cp, index, q_dev, ef, width, reps=1):
    """(labels as NumPy, best seconds of ``reps`` batch queries; the device synchronised around)."""
    best, labels = float("inf"), None
    for _ in range(reps):
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        labels, _ = index.knn_query(q_dev, k=K, ef=ef, search_width=width)
        cp.cuda.Device().synchronize()
        best = min(best, time.perf_counter() - t)
    return cp.asnumpy(labels), best


def sweep(cp, index, q_dev, truth, width, deadline):
    """recall and QPS at batch len(q_dev) over the ef sweep, until recall 0.99 or the deadline."""
    points = []
    for ef in EF_SWEEP:
        if time.perf_counter() > deadline:
            break
        labels, seconds = timed_query(cp, index, q_dev, ef, width, reps=3)
        points.append({"ef": ef, "recall": float(recall_at_k(labels, truth, K)), "qps": len(q_dev) / seconds})
        if points[-1]["recall"] >= 0.99:
            break
    return points


def sync_record(index):
    t = time.perf_counter()
    st = index.sync()
    return {"seconds": time.perf_counter() - t, "graph_rows": st.graph_rows, "graph_builds": st.graph_builds,
            "rows": st.rows, "link_rows": st.link_rows, "bytes": st.bytes}


def run(args, res, save):
    import cupy as cp

    deadline = time.perf_counter() + args.budget_s
    base, queries = synthetic(cp, "hard", args.n, args.nq)
    n, half, dim = len(base), len(base) // 2, base.shape[1]
    truth_half = exact_peer(cp, base[:half], queries, "l2")[0]
    truth, res["exact_qps"], res["exact_by"] = exact_peer(cp, base, queries, "l2")
    os.environ["GHNSW_SEARCH_KERNEL"] = "fixed"
    index = gpuhnsw.Index("l2", dim, device="cuda", gpu_storage="float16", search_graph="optimized")
    index.init_index(n, M=16, ef_construction=args.ef_construction, random_seed=SEED)
    t = time.perf_counter()
    index.add_items(base[:half], np.arange(half), build=args.build)
    res["build_half_s"] = time.perf_counter() - t
    builds = []
    for _ in range(3):
        t = time.perf_counter()
        SearchGraph().rebuild(index._core)
        builds.append(time.perf_counter() - t)
    res["graph_build_c_s_half"] = statistics.median(builds)
    res["first_sync_half"] = sync_record(index)
    save(res)

    q_dev = cp.asarray(queries)
    level0 = gpuhnsw.Index(index, device="cuda", gpu_storage="float16", search_graph="hnsw")
    level0.sync()
    res["idle_half"] = {"hnsw": sweep(cp, level0, q_dev, truth_half, args.width, deadline),
                        "graph": sweep(cp, index, q_dev, truth_half, args.width, deadline)}
    del level0
    reached = [p["ef"] for p in res["idle_half"]["graph"] if p["recall"] >= TARGET]
    ef = res["ef"] = reached[0] if reached else EF_SWEEP[-1]
    save(res)

    res["growth"] = []
    step = max(1, n // 100)
    for s in range(half, n, step):
        if time.perf_counter() > deadline:
            res["growth_cut"] = f"--budget-s spent at {s:,} rows"
            break
        rows = np.arange(s, min(s + step, n))
        t = time.perf_counter()
        index.add_items(base[rows], rows, build=args.build)
        entry = {"rows": int(rows[-1]) + 1, "add_s": time.perf_counter() - t, "sync": sync_record(index)}
        entry["query_s"] = timed_query(cp, index, q_dev, ef, args.width)[1]
        entry["qps_with_sync"] = len(q_dev) / (entry["query_s"] + entry["sync"]["seconds"])
        own = rows[:VISIBLE_ROWS]
        found, _ = index.knn_query(cp.asarray(base[own]), k=1, ef=ef, search_width=args.width)
        entry["visible"] = float(np.mean(cp.asnumpy(found)[:, 0] == own))
        res["growth"].append(entry)
        save(res)

    fresh = gpuhnsw.Index(index, device="cuda", gpu_storage="float16", search_graph="optimized")
    res["fresh_first_sync"] = sync_record(fresh)
    t = time.perf_counter()
    SearchGraph().rebuild(index._core)
    res["graph_build_c_s_end"] = time.perf_counter() - t
    count = index.get_current_count()
    truth_end = truth if count == n else exact_peer(cp, base[:count], queries, "l2")[0]
    for name, ix in (("kept", index), ("fresh", fresh)):
        labels, seconds = timed_query(cp, ix, q_dev, ef, args.width, reps=3)
        res[f"end_{name}"] = {"recall": float(recall_at_k(labels, truth_end, K)), "qps": len(q_dev) / seconds}
    growth = res["growth"]
    if growth:
        res["summary"] = {
            "recall_kept_minus_fresh": res["end_kept"]["recall"] - res["end_fresh"]["recall"],
            "growth_qps_median_over_idle": statistics.median(g["qps_with_sync"] for g in growth) / res["end_kept"]["qps"],
            "update_sync_s_median": statistics.median(g["sync"]["seconds"] for g in growth),
            "update_over_full_build": statistics.median(g["sync"]["seconds"] for g in growth)
            / res["fresh_first_sync"]["seconds"],
            "visible_min": min(g["visible"] for g in growth),
            "rebuilds_during_growth": sum(g["sync"]["graph_builds"] for g in growth)}
    save(res)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--width", type=int, default=4, help="search_width of every query")
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--build", default="gpu", choices=("gpu", "cpu", "auto"))
    p.add_argument("--budget-s", type=float, default=1e9, help="no new sweep point or growth batch after this")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import cupy as cp

    head = {"machine": machine_info("cupy-cuda12x", "cupy-cuda13x", "torch"),
            "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
            "params": {"k": K, "M": 16, "ef_construction": args.ef_construction, "build": args.build, "n": args.n,
                       "nq": args.nq, "width": args.width, "seed": SEED, "ef_sweep": EF_SWEEP}}
    path = os.path.join(args.out, "search_graph_gpu.json")

    def save(current):
        with open(path, "w") as fh:
            json.dump(dict(head, result=current), fh, indent=1, default=float)

    res = {}
    try:
        run(args, res, save)
    except Exception as exc:   # what was measured stays in the JSON, with the failure
        res["error"] = f"{type(exc).__name__}: {exc}"
        save(res)
        raise


if __name__ == "__main__":
    main()
