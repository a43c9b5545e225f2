"""gpuhnsw.distributed on a LocalCluster: one machine's Index against ShardedIndex and the
distributed knn_graph on 1, 2 and 4 workers, with faiss IndexShards over IndexHNSWFlat as the peer.

Data: the first ``--n`` MNIST base rows (784-d, squared L2) and ``--nq`` of its queries; ground
truth from :func:`gpuhnsw.testing.exact_knn`.  All clusters (1, 2 and 4 worker processes, 1 thread
each) stay up for the whole run, so the query sweeps interleave every contender in each repeat and
the report takes medians.  C threads per shard = cores / workers (at least 1): with 4 workers on a
2-core machine the shards share cores, so "scaling" here measures overhead, not speed-up.

Measured per contender: build time; QPS at recall@10 = 0.95 (interpolated on an ef sweep, median of
``--repeats``); knn_graph time and recall@k on a row sample; peak RSS per worker; bytes moved
(worker-to-worker transfers counted by Dask, plus the bytes the client put into task specs).

    python benchmarks/distributed.py                          # writes benchmarks/results/distributed.*
    python benchmarks/distributed.py --n 5000 --nq 200 --out /tmp/d   # smoke test
"""
import argparse
import json
import os
import sys
import time

# This file shares its name with Dask's ``distributed`` package: keep its folder off the import path
# (here and in the spawned worker processes, which inherit sys.path).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402

import gpuhnsw  # noqa: E402
from gpuhnsw import testing  # noqa: E402

EF_SWEEP = (10, 16, 24, 32, 48, 64, 96, 128, 192)
PARAMS = dict(M=16, ef_construction=200)
K = 10
TARGET = 0.95
WORKER_COUNTS = (1, 2, 4)
SEED = 12345


def _peak_rss_mb():
    """VmHWM of this process (getrusage's ru_maxrss survives fork + exec, so a spawned worker would
    report its parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _transferred(dask_worker):
    return int(getattr(dask_worker, "transfer_outgoing_bytes_total", 0))


def worker_stats(client):
    """(peak RSS MB per worker, worker-to-worker bytes sent so far, summed)."""
    rss = client.run(_peak_rss_mb)
    sent = client.run(_transferred)
    return sorted(round(v, 1) for v in rss.values()), int(sum(sent.values()))


def qps_at(curve, target=TARGET):
    """Linear interpolation of QPS at ``target`` recall on an (ef, recall, qps) curve; None if never
    reached."""
    pts = sorted(curve, key=lambda p: p[1])
    for (_, r0, q0), (_, r1, q1) in zip(pts, pts[1:]):
        if r0 <= target <= r1:
            return q0 if r1 == r0 else q0 + (q1 - q0) * (target - r0) / (r1 - r0)
    return pts[0][2] if pts and pts[0][1] >= target else None


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------------------- contenders

def build_single(x, threads):
    index = gpuhnsw.Index("l2", x.shape[1], device="cpu")
    index.init_index(len(x), **PARAMS)
    index.add_items(x, np.arange(len(x)), num_threads=threads)
    return index


def build_faiss(x, n_shards, threads):
    import faiss
    from gpuhnsw.distributed import shard_of
    faiss.omp_set_num_threads(threads)
    shards = faiss.IndexShards(x.shape[1], True, False)   # threaded, ids kept from the sub-indexes
    keep = []
    where = shard_of(np.arange(len(x)), n_shards)
    for s in range(n_shards):
        hnsw = faiss.IndexHNSWFlat(x.shape[1], PARAMS["M"])
        hnsw.hnsw.efConstruction = PARAMS["ef_construction"]
        idmap = faiss.IndexIDMap(hnsw)
        idmap.add_with_ids(x[where == s], np.flatnonzero(where == s).astype(np.int64))
        shards.add_shard(idmap)
        keep += [hnsw, idmap]
    return shards, keep


def sweep(query, gt):
    """[(ef, recall@K, qps)] for ``query(ef) -> labels``."""
    out = []
    for ef in EF_SWEEP:
        seconds, labels = timed(lambda: query(ef))
        out.append((ef, testing.recall_at_k(np.asarray(labels).astype(np.int64), gt, K),
                    len(gt) / seconds))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--nq", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--graph-sample", type=int, default=1_000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    import distributed
    from gpuhnsw.distributed import ShardedIndex, knn_graph

    info = testing.machine_info("dask", "distributed", "fsspec", "faiss-cpu")
    x, q, _, _ = testing.load_dataset("mnist", n_base=args.n, n_queries=args.nq)
    gt, _ = testing.exact_knn(x, q, K)
    cores = os.cpu_count() or 1
    rng = np.random.default_rng(SEED)
    sample = np.sort(rng.choice(len(x), size=min(args.graph_sample, len(x)), replace=False))
    graph_truth, _ = testing.exact_knn(x, x[sample], K + 1)
    graph_truth = np.array([row[row != i][:K] for row, i in zip(graph_truth, sample)])

    results = {"machine": info, "dataset": f"mnist[:{args.n}] x 784, {args.nq} queries",
               "params": {**PARAMS, "k": K, "target_recall": TARGET, "ef_sweep": EF_SWEEP,
                          "repeats": args.repeats, "worker_counts": WORKER_COUNTS},
               "contenders": {}}
    res = results["contenders"]

    clusters = {}
    try:
        for w in WORKER_COUNTS:
            cluster = distributed.LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", silence_logs=40)
            clusters[w] = (cluster, distributed.Client(cluster))

        # ---------------------------------------------------------------- builds
        queries = {}
        t, single = timed(lambda: build_single(x, cores))
        res["gpuhnsw Index"] = {"build_s": t, "threads": cores}
        queries["gpuhnsw Index"] = lambda ef: single.knn_query(q, k=K, ef=ef)[0]
        for s in WORKER_COUNTS:
            t, (fx, keep) = timed(lambda: build_faiss(x, s, cores))
            name = f"faiss IndexShards x{s}"
            res[name] = {"build_s": t, "threads": cores}

            def fq(ef, fx=fx, keep=keep):
                for obj in keep[::2]:
                    obj.hnsw.efSearch = ef
                return fx.search(q, K)[1]
            queries[name] = fq
        sharded = {}
        for w, (_, client) in clusters.items():
            _, before = worker_stats(client)
            t, index = timed(lambda: _build_sharded(ShardedIndex, client, x))
            rss, after = worker_stats(client)
            name = f"ShardedIndex {w} worker{'s' if w > 1 else ''}"
            sharded[w] = index
            res[name] = {"build_s": t, "workers": w, "shards": w, "threads_per_shard": index.num_threads,
                         "worker_peak_rss_mb_after_build": rss,
                         "worker_to_worker_bytes_build": after - before,
                         "client_to_worker_bytes_build": int(x.nbytes)}
            queries[name] = lambda ef, index=index: index.knn_query(q, k=K, ef=ef)[0]

        # ---------------------------------------------------------------- query sweeps, interleaved
        curves = {name: [] for name in queries}
        for _ in range(args.repeats):
            for name, query in queries.items():
                curves[name].append(sweep(query, gt))
        for name, reps in curves.items():
            med = [(ef, float(np.median([r[i][1] for r in reps])), float(np.median([r[i][2] for r in reps])))
                   for i, ef in enumerate(EF_SWEEP)]
            res[name]["curve"] = med
            res[name]["qps_at_target"] = qps_at(med)
        for w in WORKER_COUNTS:
            name = f"ShardedIndex {w} worker{'s' if w > 1 else ''}"
            res[name]["client_to_worker_bytes_per_query_call"] = int(q.nbytes) * w

        # ---------------------------------------------------------------- kNN graphs
        t, (g, _) = timed(lambda: gpuhnsw.knn_graph(x, K, method="hnsw", device="cpu", **PARAMS))
        res["gpuhnsw knn_graph (hnsw)"] = {"graph_s": t, "graph_recall": testing.recall_at_k(g[sample], graph_truth, K)}
        for w, (_, client) in clusters.items():
            for method in ("shards", "clusters"):
                _, before = worker_stats(client)
                t, (g, _, ginfo) = timed(lambda: knn_graph(x, K, client=client, method=method, progress=False,
                                                           return_info=True, recall_sample=0 if method == "shards" else 500,
                                                           **PARAMS))
                rss, after = worker_stats(client)
                res[f"distributed knn_graph {method}, {w} worker{'s' if w > 1 else ''}"] = {
                    "graph_s": t, "graph_recall": testing.recall_at_k(g[sample], graph_truth, K),
                    "recall_estimate": ginfo["recall_estimate"], "indexes": ginfo["n_indexes"],
                    "queries": ginfo["queries"], "worker_peak_rss_mb": rss,
                    "worker_to_worker_bytes": after - before}
    finally:
        for cluster, client in clusters.values():
            client.close()
            cluster.close()
    results["client_peak_rss_mb"] = _peak_rss_mb()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write(report(results))
    plot(results, os.path.join(args.out, "distributed.png"))
    print(report(results))


def _build_sharded(ShardedIndex, client, x):
    index = ShardedIndex(client, "l2", x.shape[1], **PARAMS)
    index.add_items(x)
    return index


def _mb(b):
    return f"{b / 2**20:.1f}"


def report(r):
    m = r["machine"]
    lines = [
        "# gpuhnsw.distributed on one machine (LocalCluster)", "",
        f"{m['date']}, {m['cpu']}, {m['cores']} cores (load average at start "
        f"{', '.join(f'{v:.2f}' for v in m['load_average_at_start'] or ())}; the machine was shared "
        f"with other jobs), Python {m['python']}, dask {m['dask']}, faiss-cpu {m['faiss-cpu']}.",
        f"{r['dataset']}; M={r['params']['M']}, ef_construction={r['params']['ef_construction']}, "
        f"k={r['params']['k']}; QPS at recall@10 = {r['params']['target_recall']} interpolated on an "
        f"ef sweep, median of {r['params']['repeats']} interleaved repeats. Workers: processes with 1 "
        "thread each; C threads per shard = cores / workers. Raw numbers: `distributed.json`.", "",
        "## Index: build and queries", "",
        "| contender | build (s) | QPS at recall 0.95 | peak RSS per worker (MB) | worker-to-worker MB (build) | client-to-worker MB (build; per query call) |",
        "|---|---:|---:|---|---:|---|",
    ]
    for name, c in r["contenders"].items():
        if "build_s" not in c:
            continue
        qps = c.get("qps_at_target")
        lines.append(
            f"| {name} | {c['build_s']:.2f} | {'not reached' if qps is None else f'{qps:.0f}'} | "
            f"{', '.join(map(str, c.get('worker_peak_rss_mb_after_build', []))) or '-'} | "
            f"{_mb(c['worker_to_worker_bytes_build']) if 'worker_to_worker_bytes_build' in c else '-'} | "
            + (f"{_mb(c['client_to_worker_bytes_build'])}; {_mb(c['client_to_worker_bytes_per_query_call'])} |"
               if "client_to_worker_bytes_build" in c else "- |"))
    lines += ["", "## k-NN graph (k = 10, self excluded)", "",
              "| contender | seconds | recall@10 (sample) | sampled estimate | indexes | point-index queries | peak RSS per worker (MB) | worker-to-worker MB |",
              "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, c in r["contenders"].items():
        if "graph_s" not in c:
            continue
        est = c.get("recall_estimate")
        lines.append(f"| {name} | {c['graph_s']:.2f} | {c['graph_recall']:.4f} | "
                     f"{'-' if est is None else f'{est:.4f}'} | {c.get('indexes', 1)} | {c.get('queries', '-')} | "
                     f"{', '.join(map(str, c.get('worker_peak_rss_mb', []))) or '-'} | "
                     f"{_mb(c['worker_to_worker_bytes']) if 'worker_to_worker_bytes' in c else '-'} |")
    lines += ["", "Reading it: every query visits every shard, so on one machine sharding multiplies the "
              "query work and adds a task round trip per call (the query matrix is pickled once per "
              "shard); ShardedIndex is for data that does not fit one machine, not for speed here. "
              "NumPy input reaches the workers inside task specs (client-to-worker bytes), never "
              "between workers. Build and graph times on 2 cores shared by up to 4 worker processes "
              "(and by other jobs: see the load average) measure overhead, not scaling.", ""]
    return "\n".join(lines)


def plot(r, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in r["contenders"].items():
        if "curve" in c:
            rec = [p[1] for p in c["curve"]]
            qps = [p[2] for p in c["curve"]]
            ax.plot(rec, qps, marker="o", ms=3, label=name)
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (log)")
    ax.set_yscale("log")
    ax.axvline(TARGET, color="grey", lw=0.5)
    ax.set_title(r["dataset"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
