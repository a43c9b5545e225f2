"""gpuhnsw on the CPU against hnswlib 0.8.0: same data, same parameters, same machine.

For each dataset both libraries build an index (M=16, ef_construction=200, 2 threads) and answer
the query batch with ``knn_query(k=10, num_threads=1)`` over a sweep of ``ef``.  Reported per dataset:

- build time ratio (gpuhnsw / hnswlib), best of ``--repeats`` builds each;
- QPS ratio at recall@10 = 0.95, interpolated on each library's recall-QPS curve (best of
  ``--repeats`` per point);
- recall at equal ef: the largest shortfall of gpuhnsw against hnswlib over the sweep;
- memory per element: peak RSS growth while building, measured in a fresh process per library,
  plus the analytic size where the index has ``memory_usage()``.

The machine is shared, so the two libraries' runs are interleaved (A, B, A, B, ...) and the best
repeat is kept.  Writes ``cpu_vs_hnswlib.json`` (machine, parameters, every raw measurement),
``cpu_vs_hnswlib.md`` (one table per dataset, targets met/missed) and ``cpu_vs_hnswlib.png``
(recall-QPS curves) into ``--out``.

    python benchmarks/cpu_vs_hnswlib.py              # full run: minutes to tens of minutes
    python benchmarks/cpu_vs_hnswlib.py --quick --datasets siftsmall
"""
import argparse
import concurrent.futures
import gc
import math
import multiprocessing
import os
import sys
import time

import numpy as np

import gpuhnsw
import hnswlib
from gpuhnsw import testing
from gpuhnsw.testing import exact_knn, load_dataset, recall_at_k

M = 16
EF_CONSTRUCTION = 200
BUILD_THREADS = 2
QUERY_THREADS = 1
K = 10
TARGET_RECALL = 0.95
RECALL_SLACK = 0.005  # gpuhnsw may trail hnswlib by this much at equal ef
EF_SWEEP = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_BATCH_SECONDS = 0.1  # shorter query batches are repeated and averaged

# name -> (space, (n_base, n_queries) with --quick; None keeps every row); full runs use every row.
DATASETS = {
    "siftsmall": ("l2", (None, None)),
    "mnist": ("l2", (10_000, 500)),
    "minilm-debian": ("cosine", (10_000, 500)),
}
LIBS = ("gpuhnsw", "hnswlib")


def make_index(lib, space, dim):
    """A fresh, uninitialised index of ``lib``; gpuhnsw is pinned to its CPU engine."""
    if lib == "gpuhnsw":
        return gpuhnsw.Index(space=space, dim=dim, device="cpu")
    return hnswlib.Index(space=space, dim=dim)


def populate(index, base):
    """init_index + add_items of ``base`` (float32 [n, dim]) with labels 0..n-1."""
    index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION, random_seed=100)
    index.add_items(base, np.arange(len(base)), num_threads=BUILD_THREADS)


def build(lib, space, base):
    """Build an index over ``base``; returns (index, seconds)."""
    index = make_index(lib, space, base.shape[1])
    start = time.perf_counter()
    populate(index, base)
    return index, time.perf_counter() - start


def time_queries(index, queries, ef, threads=QUERY_THREADS):
    """Seconds per batch of ``knn_query(queries, k=K, num_threads=threads)`` at ``ef``, and the
    labels [nq, K]."""
    index.set_ef(ef)
    start = time.perf_counter()
    labels, _ = index.knn_query(queries, k=K, num_threads=threads)
    seconds = time.perf_counter() - start
    if seconds < MIN_BATCH_SECONDS:
        loops = math.ceil(MIN_BATCH_SECONDS / max(seconds, 1e-6))
        start = time.perf_counter()
        for _ in range(loops):
            index.knn_query(queries, k=K, num_threads=threads)
        seconds = (time.perf_counter() - start) / loops
    return seconds, labels


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory(lib, name, n_base, n_queries):
    """Run in a fresh process: RSS growth from building one index over ``name``.

    The data is loaded first and the peak-RSS mark reset (``/proc/self/clear_refs``), so the
    peak counts only what the build allocates, transient buffers included.
    """
    space = DATASETS[name][0]
    base, _, _, _ = load_dataset(name, n_base=n_base, n_queries=n_queries)
    base = np.array(base)  # resident before the baseline (load_dataset may hand back a memmap)
    index = make_index(lib, space, base.shape[1])
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        peak_reset = True
    except OSError:
        peak_reset = False  # then the peak may predate the build and understate it
    rss_before = _status_kib("VmRSS") * 1024
    populate(index, base)
    peak_after = _status_kib("VmHWM") * 1024
    rss_after = _status_kib("VmRSS") * 1024
    n = len(base)
    analytic = index.memory_usage() if hasattr(index, "memory_usage") else None
    return {
        "n": n,
        "peak_rss_delta_bytes": peak_after - rss_before,
        "rss_delta_bytes": rss_after - rss_before,
        "peak_bytes_per_element": (peak_after - rss_before) / n,
        "rss_bytes_per_element": (rss_after - rss_before) / n,
        "analytic_bytes": analytic,
        "analytic_bytes_per_element": analytic / n if analytic is not None else None,
        "peak_reset": peak_reset,
    }


def in_fresh_process(fn, *args):
    """Call ``fn(*args)`` in a newly spawned interpreter (nothing inherited from this one)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def qps_at_recall(curve, target):
    """QPS at ``target`` recall, interpolated linearly on the curve's Pareto front.

    ``curve`` is a list of dicts with 'recall' and 'qps'.  None if no point reaches ``target``;
    if every point is above it, the fastest point's QPS (a lower bound).
    """
    front = []  # by recall descending, keep only points faster than every more accurate one
    for p in sorted(curve, key=lambda p: (-p["recall"], -p["qps"])):
        if not front or p["qps"] > front[-1]["qps"]:
            front.append(p)
    front.reverse()  # recall ascending, qps descending
    if not front or front[-1]["recall"] < target:
        return None
    if front[0]["recall"] >= target:
        return front[0]["qps"]
    for lo, hi in zip(front, front[1:]):
        if lo["recall"] < target <= hi["recall"]:
            w = (target - lo["recall"]) / (hi["recall"] - lo["recall"])
            return lo["qps"] + w * (hi["qps"] - lo["qps"])
    raise AssertionError("unreachable: front brackets the target")


def run_dataset(name, quick, repeats):
    space, quick_rows = DATASETS[name]
    n_base, n_queries = quick_rows if quick else (None, None)
    base, queries, gt_l2, gt_cosine = load_dataset(name, n_base=n_base, n_queries=n_queries)
    truth = gt_cosine if space == "cosine" else gt_l2
    if truth is None:  # a sliced base: the shipped ground truth does not apply
        truth = exact_knn(base, queries, K, space)[0]
    print(f"\n== {name}: base {base.shape}, queries {queries.shape}, space {space}", flush=True)

    memory = {}
    for lib in LIBS:
        memory[lib] = in_fresh_process(measure_memory, lib, name, n_base, n_queries)
        print(f"  memory {lib}: {memory[lib]['peak_bytes_per_element']:.0f} B/element (peak RSS)",
              flush=True)

    build_seconds = {lib: [] for lib in LIBS}
    indexes = {}
    for r in range(repeats):
        for lib in LIBS:
            indexes.pop(lib, None)  # free the previous build before timing the next
            gc.collect()
            indexes[lib], seconds = build(lib, space, base)
            build_seconds[lib].append(seconds)
            print(f"  build {lib} #{r + 1}: {seconds:.2f} s", flush=True)

    curves = {lib: [] for lib in LIBS}
    for ef in EF_SWEEP:
        seconds = {lib: [] for lib in LIBS}
        labels = {}
        for r in range(repeats):
            for lib in LIBS:
                s, labels[lib] = time_queries(indexes[lib], queries, ef)
                seconds[lib].append(s)
        for lib in LIBS:
            curves[lib].append({
                "ef": ef,
                "recall": recall_at_k(labels[lib], truth, K),
                "qps": len(queries) / min(seconds[lib]),
                "seconds": seconds[lib],
            })
        print(f"  ef={ef:4d}  " + "  ".join(
            f"{lib} recall {curves[lib][-1]['recall']:.4f} qps {curves[lib][-1]['qps']:9.0f}"
            for lib in LIBS), flush=True)

    return {
        "space": space,
        "n_base": len(base),
        "n_queries": len(queries),
        "dim": base.shape[1],
        "build_seconds": build_seconds,
        "curves": curves,
        "memory": memory,
        "summary": summarise(build_seconds, curves, memory),
    }


def summarise(build_seconds, curves, memory):
    g, h = "gpuhnsw", "hnswlib"
    build_ratio = min(build_seconds[g]) / min(build_seconds[h])
    qps = {lib: qps_at_recall(curves[lib], TARGET_RECALL) for lib in LIBS}
    qps_ratio = qps[g] / qps[h] if qps[g] is not None and qps[h] is not None else None
    shortfalls = [(hp["recall"] - gp["recall"], gp["ef"]) for gp, hp in zip(curves[g], curves[h])]
    shortfall, shortfall_ef = max(shortfalls, key=lambda t: t[0])  # the lowest ef among ties
    mem = {lib: memory[lib]["peak_bytes_per_element"] for lib in LIBS}
    mem_ratio = mem[g] / mem[h] if mem[h] > 0 else None
    return {
        "build_seconds_best": {lib: min(build_seconds[lib]) for lib in LIBS},
        "build_ratio": build_ratio,
        "qps_at_target_recall": qps,
        "qps_ratio": qps_ratio,
        "recall_shortfall_max": shortfall,
        "recall_shortfall_ef": shortfall_ef,
        "memory_bytes_per_element": mem,
        "memory_ratio": mem_ratio,
        "targets": {
            "build_time": build_ratio <= 1.0,
            "qps_at_target_recall": qps_ratio is not None and qps_ratio >= 1.0,
            "recall_at_equal_ef": shortfall <= RECALL_SLACK,
            "memory_per_element": mem_ratio is not None and mem_ratio <= 1.0,
        },
    }


def machine_info():
    return testing.machine_info("hnswlib")


def _fmt(x, spec):
    return "not reached" if x is None else format(x, spec)


def write_markdown(results, path):
    met = {True: "met", False: "**missed**"}
    m = results["machine"]
    lines = [
        "# gpuhnsw (CPU) vs hnswlib 0.8.0",
        "",
        f"{m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}, "
        f"gpuhnsw {m['gpuhnsw']}, hnswlib {m['hnswlib']}." + (" **--quick run.**" if results["quick"] else ""),
        f"M={M}, ef_construction={EF_CONSTRUCTION}, build on {BUILD_THREADS} threads, knn_query k={K} on "
        f"{QUERY_THREADS} thread, best of {results['repeats']} interleaved repeats. Ratios are gpuhnsw / hnswlib.",
        "Raw curves: `cpu_vs_hnswlib.json`; plot: `cpu_vs_hnswlib.png`.",
    ]
    for name, d in results["datasets"].items():
        s = d["summary"]
        qg, qh = s["qps_at_target_recall"]["gpuhnsw"], s["qps_at_target_recall"]["hnswlib"]
        mg, mh = s["memory_bytes_per_element"]["gpuhnsw"], s["memory_bytes_per_element"]["hnswlib"]
        ana = d["memory"]["gpuhnsw"]["analytic_bytes_per_element"]
        t = s["targets"]
        lines += [
            "",
            f"## {name} ({d['space']}, {d['n_base']} x {d['dim']}, {d['n_queries']} queries)",
            "",
            "| measure | gpuhnsw | hnswlib | ratio / value | target | |",
            "|---|---|---|---|---|---|",
            f"| build time (s) | {s['build_seconds_best']['gpuhnsw']:.2f} | {s['build_seconds_best']['hnswlib']:.2f} "
            f"| {s['build_ratio']:.3f} | <= 1 | {met[t['build_time']]} |",
            f"| QPS at recall@{K} = {TARGET_RECALL} | {_fmt(qg, '.0f')} | {_fmt(qh, '.0f')} "
            f"| {_fmt(s['qps_ratio'], '.3f')} | >= 1 | {met[t['qps_at_target_recall']]} |",
            f"| recall shortfall at equal ef (max) | | | {s['recall_shortfall_max']:+.4f} "
            f"(ef={s['recall_shortfall_ef']}) | <= {RECALL_SLACK} | {met[t['recall_at_equal_ef']]} |",
            f"| memory / element (B, peak RSS) | {mg:.0f} | {mh:.0f} | {_fmt(s['memory_ratio'], '.3f')} "
            f"| <= 1 | {met[t['memory_per_element']]} |",
        ]
        if ana is not None:
            lines.append(f"| memory / element (B, analytic) | {ana:.0f} | | | | |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(results, path, contenders=LIBS, styles=("o-", "s--"), threads=f"{QUERY_THREADS} thread"):
    """One panel per dataset: QPS against recall@K of each contender's ef sweep (log scale), the
    target recall marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = results["datasets"][name]
        for contender, style in zip(contenders, styles):
            c = d["curves"][contender]
            ax.plot([p["recall"] for p in c], [p["qps"] for p in c], style, label=contender, markersize=4)
        ax.axvline(TARGET_RECALL, color="grey", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{K}")
        ax.set_ylabel(f"QPS ({threads})")
        ax.set_title(f"{name} ({d['space']}, n={d['n_base']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated, from: " + ", ".join(DATASETS))
    parser.add_argument("--quick", action="store_true",
                        help="slice mnist and minilm-debian to 10k base / 500 queries")
    parser.add_argument("--repeats", type=int, default=3, help="builds and query batches per point")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="output directory")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.datasets.split(",") if s.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(DATASETS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    results = {
        "benchmark": "cpu_vs_hnswlib",
        "quick": args.quick,
        "repeats": args.repeats,
        "params": {"M": M, "ef_construction": EF_CONSTRUCTION, "build_threads": BUILD_THREADS,
                   "query_threads": QUERY_THREADS, "k": K, "ef_sweep": list(EF_SWEEP),
                   "target_recall": TARGET_RECALL, "recall_slack": RECALL_SLACK},
        "machine": machine_info(),
        "datasets": {},
    }
    for name in names:
        results["datasets"][name] = run_dataset(name, args.quick, args.repeats)

    stem = testing.save_results(args.out, "cpu_vs_hnswlib", results, write_markdown, write_plot)
    print(f"\nwrote {stem}.json, .md, .png")
    with open(stem + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    sys.exit(main())
