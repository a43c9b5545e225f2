"""Build time of the search graph (``Core.build_search_graph``: HNSW level 0 with its reverse edges) on
the CPU, against the HNSW build it derives from.

Per dataset (the same HNSW indexes as ``graph_replay.py``: M=16, ef_construction=200, seed 0, one
build thread; ``--cache`` shares them): the C builder at degree 32, 48 and 64 on 1 and 2 threads,
all settings interleaved, median of ``--repeats``; the NumPy reference once (for scale), and the
fraction of rows on which the two agree entry for entry (integer data: all; float data: two reverse
edges whose distances round differently may swap).

Writes ``search_graph_build.json`` and ``search_graph_build.md`` into ``--out``.

    python benchmarks/search_graph_build.py --cache /tmp/gr                        # all sets
    python benchmarks/search_graph_build.py --datasets siftsmall --out /tmp/sg     # smoke test
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_replay import DATASETS, dataset_key, hnsw_state, load  # noqa: E402  (sibling script)

import gpuhnsw  # noqa: E402
from gpuhnsw._graph_reference import search_graph_reference  # noqa: E402
from gpuhnsw._search_graph import build as build_graph  # noqa: E402
from gpuhnsw.testing import machine_info, machine_line, save_results  # noqa: E402

DEGREES = (32, 48, 64)
THREADS = (1, 2)


def run_dataset(name, args):
    space, base, _, _ = load(name, 1, args.n_synth, args.n_hard, args.cache)
    state, build_s = hnsw_state(name, space, base, args.cache)
    index = gpuhnsw.Index(state, device="cpu")
    core = index._core
    res = {"n": int(base.shape[0]), "dim": int(base.shape[1]), "space": space, "hnsw_build_s": build_s,
           "c_s": {}, "numpy_s": {}, "rows_equal": {}}
    times = {(d, t): [] for d in DEGREES for t in THREADS}
    for _ in range(args.repeats):
        for (d, t), out in times.items():
            t0 = time.perf_counter()
            build_graph(core, d, num_threads=t)
            out.append(time.perf_counter() - t0)
    for (d, t), out in times.items():
        res["c_s"][f"{d}/{t}"] = statistics.median(out)
    for d in DEGREES:
        t0 = time.perf_counter()
        ref = search_graph_reference(state, d)
        res["numpy_s"][str(d)] = time.perf_counter() - t0
        res["rows_equal"][str(d)] = float((ref == build_graph(core, d)).all(axis=1).mean())
    print(f"{name}: " + ", ".join(f"D/threads {k}: {v:.3f} s" for k, v in res["c_s"].items()), flush=True)
    return res


def write_markdown(results, path):
    lines = ["# Search-graph build (CPU)", "",
             "`Core.build_search_graph` (HNSW level 0 with its reverse edges, `gpuhnsw/csrc/search_graph.c`): seconds, "
             f"median of {results['params']['repeats']} interleaved runs; the HNSW build it derives from (one "
             "thread, as `graph_replay.py` builds it); the NumPy reference once; rows equal to the reference.", "",
             "| dataset | HNSW build s | " + " | ".join(f"D {d}, {t} thr. s" for d in DEGREES for t in THREADS)
             + " | NumPy s (D 64) | rows equal |",
             "|---|---|" + "---|" * (len(DEGREES) * len(THREADS)) + "---|---|"]
    for name, r in results["datasets"].items():
        hb = f"{r['hnsw_build_s']:.1f}" if r["hnsw_build_s"] is not None else "cached"
        cells = " | ".join(f"{r['c_s'][f'{d}/{t}']:.3f}" for d in DEGREES for t in THREADS)
        eq = min(r["rows_equal"].values())
        lines.append(f"| {name} ({r['n']:,} x {r['dim']}) | {hb} | {cells} | {r['numpy_s']['64']:.1f} | "
                     f"{100 * eq:.2f}% |")
    lines += ["", machine_line(results["machine"]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--n-synth", type=int, default=1_000_000, help="rows of the synthetic set")
    ap.add_argument("--n-hard", type=int, default=200_000, help="rows of the synthetic-hard set")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", help="graph_replay.py's cache folder (HNSW indexes)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    results = {"machine": machine_info(), "params": {"degrees": DEGREES, "threads": THREADS, "repeats": args.repeats},
               "datasets": {}}
    for name in args.datasets.split(","):
        if name not in DATASETS:
            ap.error(f"unknown dataset {name!r}")
        res = run_dataset(name, args)
        results["datasets"][dataset_key(name, res["n"])] = res
    save_results(args.out, "search_graph_build", results, write_markdown)
    print(f"wrote search_graph_build.json, .md into {args.out}")


if __name__ == "__main__":
    main()
