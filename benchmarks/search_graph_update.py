"""Incremental update of the search graph (``Core.update_search_graph``) on the CPU, against a rebuild
(``SearchGraph.rebuild``), and the quality of a graph kept up to date while an index doubles.

Per dataset (HNSW M=16, ef_construction=100, seed 0, built with 2 threads; search graph degree 64):

(A) cost: an index of the first 50% of rows and its graph; then batches of 1%, 3%, 10% and 25% of
    n are added in turn (50% -> 89%). After each batch the level-0 changes are drained from the
    core's dirty log and the C update of those slots (plus the new ones) is timed on 1 and 2 threads
    on fresh copies of the rows, median of ``--repeats``, interleaved with rebuilds on 1 and 2
    threads of the same state; the update is then applied for real. The ratio update / rebuild on
    equal threads says where a rebuild wins (``REBUILD_FRACTION``).
(B) quality: a fresh 50% index grown to 100% in 1% batches, the graph updated after each; at the end
    it is compared with a graph rebuilt on the final index: rows equal, mean filled degree, and
    recall@10 and level-0 work of the kernel's search (``fixed_search_reference``, NumPy) at several
    ef and search widths on the dataset's first ``--queries`` queries.

Writes ``search_graph_update.json`` and ``search_graph_update.md`` into ``--out``.

    python benchmarks/search_graph_update.py                                       # all sets
    python benchmarks/search_graph_update.py --datasets siftsmall --out /tmp/sgu   # smoke test
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_replay import DATASETS  # noqa: E402  (sibling script)

import gpuhnsw  # noqa: E402
from gpuhnsw._reference_fixed import fixed_search_reference  # noqa: E402
from gpuhnsw._search_graph import REBUILD_FRACTION, SearchGraph  # noqa: E402
from gpuhnsw.testing import load_dataset, machine_info, machine_line, recall_at_k, save_results  # noqa: E402

SETS = ("siftsmall", "mnist", "minilm-debian")
DEGREE = 64
BATCHES = (0.01, 0.03, 0.10, 0.25)      # (A), added in turn after the first 50%
EFS = (10, 16, 32, 64)
WIDTHS = (1, 4)
INVALID = np.uint32(0xFFFFFFFF)


def new_index(space, base, upto):
    index = gpuhnsw.Index(space, base.shape[1], device="cpu")
    index.init_index(len(base), M=16, ef_construction=100, random_seed=0)
    index.add_items(base[:upto], np.arange(upto), num_threads=2)
    return index


def drained(core):
    """The core's dirty-row log, drained now (uint64 ``(kind << 32) | slot``)."""
    return np.frombuffer(core.drain_dirty()[0], np.uint64)


def work_of(g, log, count):
    """As ``SearchGraph.refresh``: (slots, renew flags) to update; makes room for ``count``."""
    work = g.changes(log, count)
    g.reserve(count)
    g.count = count
    return work


def update(core, g, work, threads=1):
    """The C update in place on ``threads``: (seconds, rows written)."""
    t0 = time.perf_counter()
    raw = core.update_search_graph(g.rows[:g.count], g.forward[:g.count], *work, threads)
    return time.perf_counter() - t0, len(raw) // 4


def timed_rebuild(core, threads):
    g = SearchGraph(DEGREE, num_threads=threads)
    t0 = time.perf_counter()
    g.rebuild(core)
    return time.perf_counter() - t0


def cost(space, base, repeats):
    """(A): one row per batch."""
    n = len(base)
    index = new_index(space, base, n // 2)
    core, upto = index._core, n // 2
    g = SearchGraph(DEGREE, num_threads=1)
    g.rebuild(core)
    drained(core)
    out = []
    for frac in BATCHES:
        rows = int(round(frac * n))
        index.add_items(base[upto:upto + rows], np.arange(upto, upto + rows), num_threads=2)
        upto += rows
        work = work_of(g, drained(core), upto)
        todo = work[0]
        times = {("update", 1): [], ("update", 2): [], ("rebuild", 1): [], ("rebuild", 2): []}
        for _ in range(repeats):
            for t in (1, 2):
                trial = SearchGraph(DEGREE)
                trial.rows, trial.forward, trial.count = g.rows[:upto].copy(), g.forward[:upto].copy(), upto
                s, written = update(core, trial, work, t)
                times["update", t].append(s)
                times["rebuild", t].append(timed_rebuild(core, t))
        _, written_real = update(core, g, work)
        assert written_real == written
        r = {"fraction": frac, "count": upto, "rows_inserted": rows, "changed_slots": int(todo.size) - rows,
             "todo": int(todo.size), "rows_written": written,
             "update_s": {str(t): statistics.median(times["update", t]) for t in (1, 2)},
             "rebuild_s": {str(t): statistics.median(times["rebuild", t]) for t in (1, 2)}}
        r["ratio"] = {t: r["update_s"][t] / v for t, v in r["rebuild_s"].items()}
        print(f"  A {frac:.0%}: todo {todo.size} ({todo.size / upto:.1%}), written {written}, update "
              f"{r['update_s']['1']:.4f} / {r['update_s']['2']:.4f} s, rebuild {r['rebuild_s']['1']:.4f} / "
              f"{r['rebuild_s']['2']:.4f} s (1 / 2 threads)", flush=True)
        out.append(r)
    return out


def search_stats(core, graph, queries, gt, ef, width):
    slots, _, _, _, counts = fixed_search_reference(core.export_state(), queries, 10, ef, search_width=width,
                                                    graph=graph, return_counts=True)
    return {"recall": recall_at_k(slots, gt, 10), "iterations": float(counts["iterations"].mean()),
            "distances": float(counts["distances"].mean())}


def growth(space, base, queries, gt, repeats):
    """(B): grow 50% -> 100% in 1% batches, updating; compare with a fresh graph."""
    n = len(base)
    index = new_index(space, base, n // 2)
    core, upto, step = index._core, n // 2, n // 100
    g = SearchGraph(DEGREE, num_threads=1)
    g.rebuild(core)
    drained(core)
    updates, written = [], []
    while upto < n:
        rows = step if n - upto >= 2 * step else n - upto     # the remainder rides with the last batch
        index.add_items(base[upto:upto + rows], np.arange(upto, upto + rows), num_threads=2)
        upto += rows
        s, w = update(core, g, work_of(g, drained(core), upto))
        updates.append(s)
        written.append(w)
    labels = np.frombuffer(core.export_state()["labels"], np.uint64)
    assert core.export_state()["count"] == n and (labels == np.arange(n)).all()   # labels == slots
    fresh = SearchGraph(DEGREE, num_threads=1)
    fresh.rebuild(core)
    inc = g.rows[:n]
    res = {"batches": len(updates), "update_s": updates, "rows_written": written,
           "update_total_s": float(sum(updates)),
           "rebuild_s": {str(t): statistics.median(timed_rebuild(core, t) for _ in range(repeats)) for t in (1, 2)},
           "rows_equal": float((inc == fresh.rows[:n]).all(axis=1).mean()),
           "degree": {"incremental": float((inc != INVALID).sum(1).mean()),
                      "fresh": float((fresh.rows[:n] != INVALID).sum(1).mean())},
           "search": {}}
    for ef in EFS:
        for w in WIDTHS:
            res["search"][f"{ef}/{w}"] = {name: search_stats(core, graph, queries, gt, ef, w)
                                          for name, graph in (("incremental", inc), ("fresh", fresh.rows[:n]))}
            a, b = (res["search"][f"{ef}/{w}"][k]["recall"] for k in ("incremental", "fresh"))
            print(f"  B ef {ef} w {w}: recall {a:.4f} incremental, {b:.4f} fresh", flush=True)
    return res


def write_markdown(results, path):
    p = results["params"]
    lines = ["# Search-graph update (CPU)", "",
             "`Core.update_search_graph` (the incremental update behind `SearchGraph.refresh`, degree "
             f"{p['degree']}) against `SearchGraph.rebuild`. HNSW M=16, ef_construction=100, seed 0, built on 2 "
             f"threads. `REBUILD_FRACTION` when run: {p['rebuild_fraction']}.", "",
             "## (A) One update against a rebuild", "",
             "An index of the first 50% of rows; batches of 1%, 3%, 10%, 25% of n added in turn (50% -> 89%). "
             "After each: the slots whose level-0 list changed (dirty log) plus the new slots are updated "
             f"(one call on 1 and one on 2 threads, each on a copy), median of {p['repeats']}, interleaved with "
             "rebuilds of the same state on 1 and 2 threads. *to do* = changed + new slots, as a fraction of the "
             "index after the batch.", "",
             "| dataset | batch | rows after | changed slots | to do (frac.) | rows written | update s (1 / 2 thr.) | "
             "rebuild s (1 / 2 thr.) | update / rebuild, 1 thr. | update / rebuild, 2 thr. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["datasets"].items():
        for b in r["cost"]:
            lines.append(f"| {name} | {b['fraction']:.0%} ({b['rows_inserted']:,}) | {b['count']:,} | "
                         f"{b['changed_slots']:,} | {b['todo']:,} ({b['todo'] / b['count']:.1%}) | "
                         f"{b['rows_written']:,} | {b['update_s']['1']:.4f} / {b['update_s']['2']:.4f} | "
                         f"{b['rebuild_s']['1']:.4f} / {b['rebuild_s']['2']:.4f} | {b['ratio']['1']:.2f} | "
                         f"{b['ratio']['2']:.2f} |")
    lines += ["", "## (B) Growth 50% -> 100% in 1% batches", "",
              "A fresh 50% index and its graph; the other half added in batches of n // 100 rows, the graph "
              "updated after each. At the end: against a graph rebuilt on the final index, rows equal, mean "
              "filled entries per row, total update seconds against one rebuild (median of "
              f"{p['repeats']}).", "",
              "| dataset | batches | update s total | update s per batch (median) | rebuild s (1 / 2 thr.) | "
              "rows equal | mean degree incr. / fresh |", "|---|---|---|---|---|---|---|"]
    for name, r in results["datasets"].items():
        g = r["growth"]
        lines.append(f"| {name} | {g['batches']} | {g['update_total_s']:.3f} | "
                     f"{statistics.median(g['update_s']):.4f} | {g['rebuild_s']['1']:.4f} / "
                     f"{g['rebuild_s']['2']:.4f} | {100 * g['rows_equal']:.2f}% | "
                     f"{g['degree']['incremental']:.2f} / {g['degree']['fresh']:.2f} |")
    lines += ["", "Recall@10 and mean level-0 work per query of the kernel's search (`fixed_search_reference`, "
              "exact visited set, one block) on the final index, incremental graph against the fresh one; "
              "queries: the first of each set's query file (count per set below).", "",
              "| dataset (queries) | ef | width | recall incr. | recall fresh | diff. | iterations incr. / fresh | "
              "distances incr. / fresh |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["datasets"].items():
        for key, s in r["growth"]["search"].items():
            ef, w = key.split("/")
            a, b = s["incremental"], s["fresh"]
            lines.append(f"| {name} ({r['queries']}) | {ef} | {w} | {a['recall']:.4f} | {b['recall']:.4f} | "
                         f"{a['recall'] - b['recall']:+.4f} | {a['iterations']:.1f} / {b['iterations']:.1f} | "
                         f"{a['distances']:.0f} / {b['distances']:.0f} |")
    worst = max(((b["ratio"][t], name, b["todo"] / b["count"], t) for name, r in results["datasets"].items()
                 for b in r["cost"] for t in ("1", "2")), default=None)
    if worst:
        lines += ["", f"Highest update / rebuild ratio on equal threads: {worst[0]:.2f} ({worst[1]}, {worst[2]:.0%} of "
                  f"the rows to do, {worst[3]} thread(s)).  `REBUILD_FRACTION` {p['rebuild_fraction']}: the refresh "
                  "builds afresh when more rows than that fraction are to do."]
    lines += ["", machine_line(results["machine"]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=",".join(SETS))
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--queries", type=int, default=200, help="queries per set for (B)'s recall")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    results = {"machine": machine_info(), "datasets": {},
               "params": {"degree": DEGREE, "batches": BATCHES, "efs": EFS, "widths": WIDTHS,
                          "repeats": args.repeats, "queries": args.queries, "rebuild_fraction": REBUILD_FRACTION}}
    for name in args.datasets.split(","):
        if name not in SETS:
            ap.error(f"unknown dataset {name!r}")
        space = DATASETS[name]
        base, queries, gt_l2, gt_cos = load_dataset(name)
        base = np.ascontiguousarray(base)
        gt = (gt_l2 if space == "l2" else gt_cos)[:args.queries]
        queries = np.ascontiguousarray(queries[:args.queries])
        t0 = time.perf_counter()
        print(f"{name}: {base.shape}, {space}", flush=True)
        res = {"n": int(base.shape[0]), "dim": int(base.shape[1]), "space": space, "queries": len(queries)}
        res["cost"] = cost(space, base, args.repeats)
        res["growth"] = growth(space, base, queries, gt, args.repeats)
        res["seconds"] = time.perf_counter() - t0
        results["datasets"][name] = res
        save_results(args.out, "search_graph_update", results, write_markdown)   # partial results survive
    print(f"wrote search_graph_update.json, .md into {args.out}")


if __name__ == "__main__":
    main()
