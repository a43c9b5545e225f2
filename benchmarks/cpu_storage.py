"""Compressed storage on the CPU (issue 21): gpuhnsw float32, float16, int8 and int8 with the exact
re-rank against hnswlib 0.8.0 (float32) on the shared sets.

For each dataset every contender builds an index (M=16, ef_construction=200, 2 threads; int8's
ranges from the build's one add_items) and answers the same queries with ``knn_query(k=10,
num_threads=2)`` over a sweep of ``ef``.  The contenders run interleaved (A, B, C, D, E, A, ...) and
the best of ``--repeats`` is kept per point, with the 1-minute load average recorded after each
round (the machine may be shared).  Reported per dataset and contender:

- QPS-recall@10 curves and the QPS at recall 0.95 (interpolated on each Pareto front), as a ratio
  to hnswlib's;
- recall lost at equal ef against gpuhnsw float32 (the largest shortfall over the sweep);
- build time (best of the repeats), as a ratio to hnswlib's;
- ``memory_usage()`` (the arrays' bytes; the ratio to float32 is the target), and the peak RSS
  growth of a build in a fresh process per contender.

Targets (issue 21; median over the datasets, ratios within one run): int8 QPS at recall 0.95 >=
1.5x hnswlib's; int8 memory_usage <= 0.35x float32's (median), <= 0.45x (each); recall lost by int8
at equal ef <= 0.01 (<= 0.002 with rerank); int8 build no slower than hnswlib.

Writes ``cpu_storage.json`` (machine, parameters, every measurement), ``cpu_storage.md`` and
``cpu_storage.png`` (QPS against recall) into ``--out``.

    python benchmarks/cpu_storage.py                    # full run (tens of minutes on 2 cores)
    python benchmarks/cpu_storage.py --quick --out /tmp/cs   # smoke test on slices
"""
import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np

import gpuhnsw
from cpu_vs_hnswlib import (K, TARGET_RECALL, in_fresh_process, qps_at_recall, time_queries,   # this script's folder
                            write_plot, _status_kib)
from gpuhnsw import testing
from gpuhnsw.testing import exact_knn, load_dataset, recall_at_k

M = 16
EF_CONSTRUCTION = 200
THREADS = 2
EF_SWEEP = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# name -> (space, (n_base, n_queries) for --quick, n_queries of a full run)
DATASETS = {
    "siftsmall": ("l2", (None, None), None),
    "mnist": ("l2", (10_000, 500), 2_000),
    "minilm-debian": ("cosine", (10_000, 500), 2_000),
}
# contender -> (library, Index keywords)
CONTENDERS = {
    "hnswlib": ("hnswlib", {}),
    "float32": ("gpuhnsw", dict(storage="float32")),
    "float16": ("gpuhnsw", dict(storage="float16")),
    "int8": ("gpuhnsw", dict(storage="int8")),
    "int8+rerank": ("gpuhnsw", dict(storage="int8", rerank=True)),
}
TARGETS = dict(qps_ratio=1.5, memory_median=0.35, memory_each=0.45, recall_lost=0.01, recall_lost_rerank=0.002,
               build_ratio=1.0)


def make_index(contender, space, dim):
    lib, kw = CONTENDERS[contender]
    if lib == "hnswlib":
        import hnswlib
        return hnswlib.Index(space=space, dim=dim)
    return gpuhnsw.Index(space, dim, device="cpu", **kw)


def populate(index, base):
    index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION, random_seed=100)
    index.add_items(base, np.arange(len(base)), num_threads=THREADS)


def data(name, quick):
    space, quick_rows, full_queries = DATASETS[name]
    n_base, n_queries = quick_rows if quick else (None, full_queries)
    base, queries, gt_l2, gt_cosine = load_dataset(name, n_base=n_base, n_queries=n_queries)
    truth = gt_cosine if space == "cosine" else gt_l2
    if truth is None:
        truth = exact_knn(base, queries, K, space)[0]
    return space, np.ascontiguousarray(base, np.float32), np.ascontiguousarray(queries, np.float32), truth


def measure_memory(contender, name, quick):
    """In a fresh process: peak RSS growth of one build, and memory_usage() where the index has it."""
    space, base, _, _ = data(name, quick)
    base = np.array(base)
    index = make_index(contender, space, base.shape[1])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM back to the current RSS
    before = _status_kib("VmRSS") * 1024
    populate(index, base)
    peak = _status_kib("VmHWM") * 1024
    return dict(peak_rss_delta_bytes=peak - before,
                memory_usage=index.memory_usage() if hasattr(index, "memory_usage") else None)


def run_dataset(name, quick, repeats):
    space, base, queries, truth = data(name, quick)
    print(f"\n== {name}: base {base.shape}, queries {queries.shape}, {space}", flush=True)
    memory = {c: in_fresh_process(measure_memory, c, name, quick) for c in CONTENDERS}
    for c, m in memory.items():
        print(f"  memory {c:12s} peak RSS {m['peak_rss_delta_bytes'] / len(base):7.0f} B/element, "
              f"memory_usage {m['memory_usage']}", flush=True)
    loads = []
    builds = {c: [] for c in CONTENDERS}
    indexes = {}
    for r in range(repeats):
        for c in CONTENDERS:
            indexes.pop(c, None)
            gc.collect()
            index = make_index(c, space, base.shape[1])
            start = time.perf_counter()
            populate(index, base)
            builds[c].append(time.perf_counter() - start)
            indexes[c] = index
        loads.append(os.getloadavg()[0])
        print(f"  builds #{r + 1}: " + ", ".join(f"{c} {builds[c][-1]:.2f} s" for c in CONTENDERS)
              + f" (load {loads[-1]:.1f})", flush=True)
    curves = {c: [] for c in CONTENDERS}
    for ef in EF_SWEEP:
        seconds = {c: [] for c in CONTENDERS}
        labels = {}
        for _ in range(repeats):
            for c in CONTENDERS:
                s, labels[c] = time_queries(indexes[c], queries, ef, THREADS)
                seconds[c].append(s)
            loads.append(os.getloadavg()[0])
        for c in CONTENDERS:
            curves[c].append(dict(ef=ef, recall=recall_at_k(labels[c].astype(np.int64), truth, K),
                                  qps=len(queries) / min(seconds[c]), seconds=seconds[c]))
        print(f"  ef={ef:4d} " + " ".join(f"{c} {curves[c][-1]['recall']:.4f}/{curves[c][-1]['qps']:.0f}"
                                          for c in CONTENDERS) + f" (load {loads[-1]:.1f})", flush=True)
    return dict(space=space, n_base=len(base), n_queries=len(queries), dim=base.shape[1], builds=builds,
                curves=curves, memory=memory, load_averages=loads, summary=summarise(builds, curves, memory))


def summarise(builds, curves, memory):
    qps = {c: qps_at_recall(curves[c], TARGET_RECALL) for c in CONTENDERS}
    out = dict(qps_at_target_recall=qps, build_seconds_best={c: min(builds[c]) for c in CONTENDERS})
    h = qps["hnswlib"]
    out["qps_ratio_to_hnswlib"] = {c: (q / h if q and h else None) for c, q in qps.items()}
    out["build_ratio_to_hnswlib"] = {c: min(builds[c]) / min(builds["hnswlib"]) for c in CONTENDERS}
    ref = memory["float32"]["memory_usage"]
    out["memory_usage_ratio_to_float32"] = {c: (m["memory_usage"] / ref if m["memory_usage"] else None)
                                            for c, m in memory.items()}
    out["recall_lost_vs_float32"] = {
        c: max(f["recall"] - p["recall"] for f, p in zip(curves["float32"], curves[c]))
        for c in CONTENDERS if c not in ("hnswlib", "float32")}
    return out


def targets(results):
    """The issue's table: median over the datasets of each ratio, and whether it is met."""
    summaries = [d["summary"] for d in results["datasets"].values()]

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    qps = median(s["qps_ratio_to_hnswlib"]["int8"] for s in summaries)
    mem = [s["memory_usage_ratio_to_float32"]["int8"] for s in summaries]
    lost = median(s["recall_lost_vs_float32"]["int8"] for s in summaries)
    lost_rr = median(s["recall_lost_vs_float32"]["int8+rerank"] for s in summaries)
    build = median(s["build_ratio_to_hnswlib"]["int8"] for s in summaries)
    return [
        ("QPS at recall@10 0.95, int8 vs hnswlib float32", qps, f">= {TARGETS['qps_ratio']}x",
         qps is not None and qps >= TARGETS["qps_ratio"]),
        ("memory_usage() int8 without re-rank vs float32, median", median(mem), f"<= {TARGETS['memory_median']}x",
         median(mem) <= TARGETS["memory_median"]),
        ("memory_usage() int8 without re-rank vs float32, largest", max(mem), f"<= {TARGETS['memory_each']}x",
         max(mem) <= TARGETS["memory_each"]),
        ("recall lost at equal ef, int8 vs float32 gpuhnsw", lost, f"<= {TARGETS['recall_lost']}",
         lost <= TARGETS["recall_lost"]),
        ("recall lost at equal ef, int8 + rerank vs float32 gpuhnsw", lost_rr, f"<= {TARGETS['recall_lost_rerank']}",
         lost_rr <= TARGETS["recall_lost_rerank"]),
        ("build time, int8 vs hnswlib", build, f"<= {TARGETS['build_ratio']}x", build <= TARGETS["build_ratio"]),
    ]


def _f(x, spec=".3f", none="not reached"):
    return none if x is None else format(x, spec)


def write_markdown(results, path):
    m = results["machine"]
    loads = [x for d in results["datasets"].values() for x in d["load_averages"]]
    lines = [
        "# Compressed storage on the CPU: gpuhnsw float32 / float16 / int8 / int8 + re-rank vs hnswlib 0.8.0",
        "",
        f"{m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}, hnswlib "
        f"{m['hnswlib']}." + (" **--quick run.**" if results["quick"] else ""),
        f"M={M}, ef_construction={EF_CONSTRUCTION}, builds and queries (k={K}) on {THREADS} threads, contenders "
        f"interleaved, best of {results['repeats']}. 1-minute load average during the run: min {min(loads):.1f}, "
        f"median {statistics.median(loads):.1f}, max {max(loads):.1f}.",
        "Raw curves: `cpu_storage.json`; plot: `cpu_storage.png`.",
        "",
        "## Targets (median over the datasets)",
        "",
        "| measure | value | target | |",
        "|---|---:|---|---|",
    ]
    for what, value, target, ok in targets(results):
        lines.append(f"| {what} | {_f(value)} | {target} | {'met' if ok else '**missed**'} |")
    for name, d in results["datasets"].items():
        s = d["summary"]
        lines += ["", f"## {name} ({d['space']}, {d['n_base']} x {d['dim']}, {d['n_queries']} queries)", "",
                  "| contender | QPS at recall 0.95 | vs hnswlib | recall lost at equal ef | build (s) | vs hnswlib "
                  "| memory_usage (B/element) | vs float32 | peak RSS (B/element) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in CONTENDERS:
            mem = d["memory"][c]
            lines.append(
                f"| {c} | {_f(s['qps_at_target_recall'][c], '.0f')} | {_f(s['qps_ratio_to_hnswlib'][c])} "
                f"| {_f(s['recall_lost_vs_float32'].get(c), '+.4f') if c in s['recall_lost_vs_float32'] else ''} "
                f"| {s['build_seconds_best'][c]:.2f} | {s['build_ratio_to_hnswlib'][c]:.3f} "
                f"| {_f(mem['memory_usage'] / d['n_base'] if mem['memory_usage'] else None, '.0f', '-')} "
                f"| {_f(s['memory_usage_ratio_to_float32'][c], '.3f', '-')} "
                f"| {mem['peak_rss_delta_bytes'] / d['n_base']:.0f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--quick", action="store_true", help="mnist and minilm-debian sliced to 10k / 500")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    names = [s for s in args.datasets.split(",") if s]
    if set(names) - set(DATASETS):
        parser.error(f"datasets: choose from {list(DATASETS)}")
    results = dict(benchmark="cpu_storage", quick=args.quick, repeats=args.repeats,
                   params=dict(M=M, ef_construction=EF_CONSTRUCTION, threads=THREADS, k=K, ef_sweep=list(EF_SWEEP),
                               target_recall=TARGET_RECALL, targets=TARGETS),
                   machine=testing.machine_info("hnswlib"), datasets={})
    for name in names:
        results["datasets"][name] = run_dataset(name, args.quick, args.repeats)
    results["targets"] = [dict(measure=w, value=v, target=t, met=ok) for w, v, t, ok in targets(results)]
    stem = testing.save_results(args.out, "cpu_storage", results, write_markdown,
                                lambda r, path: write_plot(r, path, CONTENDERS, ("k--", "o-", "s-", "^-", "v-"),
                                                           f"{THREADS} threads"))
    print(f"\nwrote {stem}.json, .md, .png\n")
    with open(stem + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    sys.exit(main())
