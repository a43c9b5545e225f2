"""Opening an index with ``load_index(path, mmap=True)`` against a normal load, on mnist.

One index over the base set (l2, M=16, ef_construction=64) saved in our format; then, each in a
fresh process (so that no memory freed earlier hides a private copy), a normal and a mapped load
(and a mapped load with ``verify=True``): seconds to open, anonymous (private) and file-backed
resident memory right after opening and after the query batch (``k=10``, ``ef=64``, one thread),
and the batch's seconds.  The file was just written, so it is in the page cache: the times are those
of a warm open (a cold one adds the disk reads a normal load makes and a mapped one defers to the
first queries).  The machine may be shared: the modes run interleaved (normal, mapped, verified,
normal, ...) and the median of ``--repeats`` is kept.  Writes ``mmap_load.json`` and
``mmap_load.md`` into ``--out``.

    python benchmarks/mmap_load.py                         # 60k x 784: about two minutes
    python benchmarks/mmap_load.py --n-base 10000 --repeats 1   # quick look
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

import gpuhnsw
from gpuhnsw import testing

M = 16
EF_CONSTRUCTION = 64
EF = 64
K = 10
MODES = ("normal", "mapped", "mapped, verify=True")

# Run in a fresh process: prints JSON {open_s, anon_open, file_open, query_s, anon_query, file_query}.
_PROBE = """
import json, sys, time
import numpy as np
import gpuhnsw

def rss():  # (anonymous, file-backed) resident bytes
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return [int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")]

path, queries, mode = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
index = gpuhnsw.Index("l2", queries.shape[1], device="cpu")
anon0, file0 = rss()
t0 = time.perf_counter()
index.load_index(path, mmap=mode != "normal", verify=mode == "mapped, verify=True")
t1 = time.perf_counter()
anon1, file1 = rss()
index.knn_query(queries, k=%d, ef=%d, num_threads=1)
t2 = time.perf_counter()
anon2, file2 = rss()
print(json.dumps(dict(open_s=t1 - t0, anon_open=anon1 - anon0, file_open=file1 - file0, query_s=t2 - t1,
                      anon_query=anon2 - anon0, file_query=file2 - file0)))
""" % (K, EF)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-base", type=int, default=None, help="base rows (default: all 60,000)")
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    base, queries = testing.load_dataset("mnist", n_base=args.n_base, n_queries=args.n_queries)[:2]
    base = np.ascontiguousarray(base, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path, qpath = os.path.join(tmp, "mnist.idx"), os.path.join(tmp, "q.npy")
        index = gpuhnsw.Index("l2", base.shape[1], device="cpu")
        index.init_index(len(base), M=M, ef_construction=EF_CONSTRUCTION, random_seed=1)
        index.add_items(base, num_threads=2)
        index.save_index(path)
        file_bytes = os.path.getsize(path)
        del index
        np.save(qpath, np.ascontiguousarray(queries, dtype=np.float32))
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:   # interleaved
                out = subprocess.run([sys.executable, "-c", _PROBE, path, qpath, mode], check=True,
                                     capture_output=True, text=True).stdout
                runs[mode].append(json.loads(out))
    med = {mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for mode, rs in runs.items()}
    result = dict(benchmark="mmap_load", dataset="mnist", n_base=len(base), dim=base.shape[1],
                  n_queries=len(queries), M=M, ef_construction=EF_CONSTRUCTION, ef=EF, k=K,
                  file_bytes=file_bytes, vector_bytes=base.nbytes, repeats=args.repeats,
                  machine=testing.machine_info(), median=med, runs=runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mmap_load.json"), "w") as f:
        json.dump(result, f, indent=1)
    mib = 2**20
    lines = [f"# Mapped vs normal load: mnist {len(base)} x {base.shape[1]}, file {file_bytes / mib:.0f} MiB "
             f"(vectors {base.nbytes / mib:.0f} MiB)", "",
             f"Medians of {args.repeats} interleaved runs, each in a fresh process, file in the page cache; "
             f"{len(queries)} queries, k={K}, ef={EF}, one thread.  Machine: "
             f"{result['machine'].get('cpu', '?')}, {result['machine'].get('cores', '?')} cores, "
             "shared with other work while it ran.", "",
             "| load | open (ms) | private MiB after open | file-backed MiB after open | queries (s) "
             "| private MiB after queries | file-backed MiB after queries |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        m = med[mode]
        lines.append(f"| {mode} | {1000 * m['open_s']:.1f} | {m['anon_open'] / mib:.1f} | {m['file_open'] / mib:.1f} "
                     f"| {m['query_s']:.2f} | {m['anon_query'] / mib:.1f} | {m['file_query'] / mib:.1f} |")
    with open(os.path.join(args.out, "mmap_load.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
