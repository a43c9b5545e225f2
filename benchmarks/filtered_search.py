"""Filtered search: QPS and recall@10 at 100%, 50%, 10%, 1% and 0.1% selectivity, on minilm-debian.

One index per library over the base set (cosine, M=16, ef_construction=200), then for each
selectivity a random set of allowed labels (fixed seed) and the query batch with ``k=10``, ``ef=64``,
one query thread:

- ``gpuhnsw auto``: ``knn_query(q, filter=allowed)``, which picks graph or exact search per filter;
- ``gpuhnsw graph`` / ``gpuhnsw exact``: the same with ``filter_mode`` forced;
- ``hnswlib``: hnswlib 0.8.0's filter, a callable (its only kind), over the same allowed set.

Recall is against exact search over the allowed rows (``gpuhnsw.testing.exact_knn``, float64).  The
machine may be shared: contenders run interleaved (A, B, C, D, A, B, ...) and the median of
``--repeats`` is kept.  Writes ``filtered_search.json`` (machine, parameters, raw times) and
``filtered_search.md`` into ``--out``.

    python benchmarks/filtered_search.py                  # 50k base, 200 queries: a few minutes
    python benchmarks/filtered_search.py --n-base 10000 --n-queries 50 --repeats 1   # quick look
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

import gpuhnsw
import hnswlib
from gpuhnsw import testing
from gpuhnsw.testing import exact_knn, load_dataset, recall_at_k

M = 16
EF_CONSTRUCTION = 200
EF = 64
K = 10
BUILD_THREADS = 2
SELECTIVITIES = (1.0, 0.5, 0.1, 0.01, 0.001)
CONTENDERS = ("gpuhnsw auto", "gpuhnsw graph", "gpuhnsw exact", "hnswlib")


def build(lib, base):
    index = lib.Index(space="cosine", dim=base.shape[1], **({"device": "cpu"} if lib is gpuhnsw else {}))
    index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION, random_seed=100)
    index.add_items(base, np.arange(len(base)), num_threads=BUILD_THREADS)
    index.set_ef(EF)
    return index


def run(name, ours, theirs, queries, allowed, mask):
    """(seconds, labels uint64 [nq, K]) of one contender's batch."""
    start = time.perf_counter()
    if name == "hnswlib":
        labels, _ = theirs.knn_query(queries, k=K, num_threads=1, filter=lambda label: mask[label])
    else:
        labels, _ = ours.knn_query(queries, k=K, num_threads=1, filter=allowed, filter_mode=name.split()[1])
    return time.perf_counter() - start, labels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-base", type=int, default=None, help="base rows (default: all 50,000)")
    ap.add_argument("--n-queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)

    machine = testing.machine_info("hnswlib")   # its load average: at the start
    base, queries, _, _ = load_dataset("minilm-debian", n_base=args.n_base, n_queries=args.n_queries)
    n = len(base)
    t0 = time.perf_counter()
    ours = build(gpuhnsw, base)
    t1 = time.perf_counter()
    theirs = build(hnswlib, base)
    t2 = time.perf_counter()
    print(f"built {n} x {base.shape[1]}: gpuhnsw {t1 - t0:.1f} s, hnswlib {t2 - t1:.1f} s", file=sys.stderr)

    rng = np.random.default_rng(2024)
    rows = []
    for sel in SELECTIVITIES:
        m = max(K, int(round(sel * n)))
        allowed = np.sort(rng.choice(n, size=m, replace=False)).astype(np.uint64)
        mask = np.zeros(n, dtype=bool)
        mask[allowed.astype(np.int64)] = True
        ids, _ = exact_knn(base[allowed.astype(np.int64)], queries, K, "cosine")
        truth = allowed[ids]
        times = {c: [] for c in CONTENDERS}
        recall = {}
        for _ in range(args.repeats):
            for c in CONTENDERS:
                sec, labels = run(c, ours, theirs, queries, allowed, mask)
                times[c].append(sec)
                recall[c] = recall_at_k(labels, truth, K)
        row = {"selectivity": sel, "allowed": m}
        for c in CONTENDERS:
            med = statistics.median(times[c])
            row[c] = {"qps": len(queries) / med, "recall": recall[c], "seconds": times[c]}
        rows.append(row)
        print(f"{sel:7.3%} ({m:6d} allowed): " + "  ".join(
            f"{c}: {row[c]['qps']:8.0f} QPS r={row[c]['recall']:.3f}" for c in CONTENDERS), file=sys.stderr)

    result = {
        "machine": machine,
        "note": "shared 2-core machine: contenders interleaved, median of repeats",
        "params": {"dataset": "minilm-debian", "space": "cosine", "n_base": n, "n_queries": len(queries),
                   "M": M, "ef_construction": EF_CONSTRUCTION, "ef": EF, "k": K, "query_threads": 1,
                   "repeats": args.repeats, "build_seconds": {"gpuhnsw": t1 - t0, "hnswlib": t2 - t1}},
        "rows": rows,
    }
    testing.save_results(args.out, "filtered_search", result, write_markdown)


def write_markdown(result, path):
    """The Markdown table of a result dict (as written to filtered_search.json) into ``path``."""
    p, m = result["params"], result["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    lines = [f"# Filtered search on minilm-debian ({p['n_base']} x 384, cosine, {p['n_queries']} queries)", "",
             f"M={p['M']}, ef_construction={p['ef_construction']}, ef={p['ef']}, k={p['k']}, one query thread; "
             "recall@10 against exact search over the allowed rows; QPS is the median of "
             f"{p['repeats']} interleaved runs on a shared machine ({m['cpu']}, {m['cores']} cores, "
             f"load average {load}; {m['date']}).", "",
             "| selectivity | allowed | " + " | ".join(f"{c} QPS | recall" for c in CONTENDERS) + " |",
             "|---|---|" + "---|---|" * len(CONTENDERS)]
    for row in result["rows"]:
        lines.append(f"| {row['selectivity']:.1%} | {row['allowed']} | " + " | ".join(
            f"{row[c]['qps']:.0f} | {row[c]['recall']:.3f}" for c in CONTENDERS) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
