"""Python overhead of one CPU query: single-row ``Index.knn_query`` on siftsmall, for one or more
source trees of gpuhnsw side by side.

Each tree runs in its own worker process (its ``gpuhnsw`` first on ``sys.path``, its C extension
built in place); the workers take turns, round after round, so that a noisy neighbour hurts every
tree alike, and the medians are compared.  Per tree and round: the median wall time of one call over
``--calls`` single-row calls (k=10, ef=10, one thread: the C search is a few microseconds, the rest
is Python), and, once, the Python function calls one ``knn_query`` makes (``sys.setprofile``: a count,
not a timing, so it does not depend on the machine's load).

::

    python benchmarks/query_overhead.py --tree /path/to/base --label main --tree . --label branch
    python benchmarks/query_overhead.py --tree . --rounds 3 --calls 500 --out /tmp/overhead   # smoke test

Writes ``query_overhead.json`` and ``query_overhead.md`` into ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import numpy as np
import gpuhnsw
from gpuhnsw import testing

base, queries, _, _ = testing.load_dataset("siftsmall")
index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
index.init_index(base.shape[0], M=16, ef_construction=100, random_seed=1)
index.add_items(base, num_threads=1)
rows = [np.ascontiguousarray(q[None, :]) for q in queries]
for q in rows:                                   # warm-up
    index.knn_query(q, k=10, ef=10, num_threads=1)
calls = []
def count(frame, event, arg):
    if event == "call":
        calls.append(frame.f_code.co_name)
sys.setprofile(count)
index.knn_query(rows[0], k=10, ef=10, num_threads=1)
sys.setprofile(None)
print(json.dumps({"file": gpuhnsw.__file__, "python_calls": len(calls)}), flush=True)
for line in sys.stdin:
    n = int(line)
    times = np.empty(n)
    for i in range(n):
        q = rows[i % len(rows)]
        t0 = time.perf_counter_ns()
        index.knn_query(q, k=10, ef=10, num_threads=1)
        times[i] = time.perf_counter_ns() - t0
    print(json.dumps({"median_us": float(np.median(times)) / 1e3}), flush=True)
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, help="a source tree of gpuhnsw (repeatable)")
    p.add_argument("--label", action="append", help="a name per --tree for the results (default: the folder's name)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000, help="single-row calls per tree and round")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    trees = [str(Path(t).resolve()) for t in args.tree]
    labels = args.label or [os.path.basename(t) for t in trees]
    if len(labels) != len(trees):
        p.error("give one --label per --tree, or none")
    workers, info = [], []
    for tree in trees:
        w = subprocess.Popen([sys.executable, "-c", WORKER, tree], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": tree})
        workers.append(w)
        info.append(json.loads(w.stdout.readline()))
        print(f"{tree}: gpuhnsw from {info[-1]['file']}", flush=True)
    per_round = [[] for _ in trees]
    for _ in range(args.rounds):
        for i, w in enumerate(workers):
            w.stdin.write(f"{args.calls}\n")
            w.stdin.flush()
            per_round[i].append(json.loads(w.stdout.readline())["median_us"])
    for w in workers:
        w.stdin.close()
        w.wait()
    results = []
    for label, got, times in zip(labels, info, per_round):
        times = sorted(times)
        results.append({"tree": label, "python_calls": got["python_calls"],
                        "median_us": times[len(times) // 2], "round_medians_us": times})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_avg_1min_after": load},
           "rounds": args.rounds, "calls_per_round": args.calls, "results": results}
    table = "\n".join(
        [f"# Single-row CPU `knn_query` on siftsmall (k=10, ef=10, one thread)\n",
         f"{args.rounds} rounds of {args.calls} calls per tree, trees interleaved; machine: {out['machine']}\n",
         "| tree | Python calls per query | median of round medians (us) | min .. max of round medians (us) |",
         "|---|---:|---:|---|"]
        + [f"| {r['tree']} | {r['python_calls']} | {r['median_us']:.1f} | {r['round_medians_us'][0]:.1f} .. "
           f"{r['round_medians_us'][-1]:.1f} |" for r in results]) + "\n"
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("query_overhead.json", json.dumps(out, indent=1)), ("query_overhead.md", table)):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)
    print(table)


if __name__ == "__main__":
    main()
