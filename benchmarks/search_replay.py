"""Replay of the GPU search algorithms on the CPU: serial steps and distance counts, no GPU needed.

The NumPy references of the two search kernels run on the shared data (an HNSW index built by the C
engine), and count per query what a GPU pays for in latency and in bandwidth:

- ``iterations``: level-0 iterations (serial steps, each a block barrier round trip on the GPU);
- ``distances``: level-0 distance evaluations (row reads), the visited hash's repeats included;
- ``hops`` / ``upper_distances``: the upper-level descent's lists read and distances.

Contenders, each at the same ``ef`` and ``k``:

- ``beam w=1``: search_beam_kernel's default (width 1: the C search's order; exact visited set);
- ``fixed w=1,2,4,8``: search_fixed_kernel with the visited hash its launch would use
  (``launch.fixed_hash_log2``: 2**10 slots or more, reset as the kernel does);
- ``fixed B=2,4,8``: several blocks per query (each with ``launch.fixed_block_beam``), replayed in
  lock step (one iteration of each block in turn: a model of the GPU running them side by side);
  ``iterations`` is the most of any block;
- with 1 % of the elements deleted: search_beam_kernel switches every query to hnswlib's filtered
  search, search_fixed_kernel keeps its path.

Recall@10 against the datasets' exact ground truth.  Writes ``search_replay.json`` and
``search_replay.md`` into ``--out``.

    python benchmarks/search_replay.py                        # siftsmall, mnist, minilm-debian slices
    python benchmarks/search_replay.py --datasets siftsmall --n-queries 50 --out /tmp/r
"""
import argparse
import json
import os
import time

import numpy as np

import gpuhnsw
from gpuhnsw._reference import COUNTS, beam_search_reference
from gpuhnsw._reference_fixed import fixed_search_reference
from gpuhnsw.device import launch
from gpuhnsw.testing import exact_knn, load_dataset, machine_info, recall_at_k

K = 10
SPACES = {"siftsmall": "l2", "mnist": "l2", "minilm-debian": "cosine"}


def summary(name, slots, counts, labels, truth, seconds):
    got = np.where(slots >= 0, labels[np.maximum(slots, 0)], -1)
    out = {"contender": name, "recall": float(recall_at_k(got, truth, K)), "seconds": seconds}
    out.update({c: float(counts[c].mean()) for c in COUNTS})
    print(f"  {name:<24} recall {out['recall']:.3f}  " + "  ".join(
        f"{c} {out[c]:.1f}" for c in COUNTS if c in out), flush=True)
    return out


def replay(name, n_base, n_queries, ef, m):
    base, queries, truth, _ = load_dataset(name, n_base=n_base, n_queries=n_queries)
    space = SPACES[name]
    if truth is None or n_base is not None:
        truth, _ = exact_knn(base, queries, K, space)
    truth = np.asarray(truth)[:, :K]
    t = time.perf_counter()
    index = gpuhnsw.Index(space, base.shape[1])
    index.init_index(len(base), M=m, ef_construction=200, random_seed=1)
    index.add_items(base, num_threads=os.cpu_count())
    print(f"== {name}: {base.shape}, {len(queries)} queries, M={m}, ef={ef} (built in "
          f"{time.perf_counter() - t:.1f} s)", flush=True)
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64).astype(np.int64)
    m0 = int(index._core.M0)
    rows = []

    def run(label, **kw):
        t0 = time.perf_counter()
        slots, _, _, _, counts = fixed_search_reference(state, queries, K, ef, return_counts=True, **kw)
        rows.append(summary(label, slots, counts, labels, truth, time.perf_counter() - t0))

    t0 = time.perf_counter()
    slots, _, _, counts = beam_search_reference(state, queries, K, ef, return_counts=True)
    rows.append(summary("beam w=1 (exact visited)", slots, counts, labels, truth, time.perf_counter() - t0))
    for width in (1, 2, 4, 8):
        run(f"fixed w={width}", search_width=width, hash_log2=launch.fixed_hash_log2(ef, K, width, m0))
    for blocks in (2, 4, 8):
        beam = launch.fixed_block_beam(ef, K, blocks)
        t0 = time.perf_counter()
        slots, _, _, status, counts = fixed_search_reference(
            state, queries, K, beam, blocks=blocks, global_log2=launch.fixed_global_log2(blocks, 1, m0),
            lockstep=True, return_counts=True)
        row = summary(f"fixed B={blocks} (beam {beam})", slots, counts, labels, truth, time.perf_counter() - t0)
        row["status_rows"] = int((status != 0).sum())
        rows.append(row)

    # 1 % deleted: the older kernel's filtered mode against the fixed kernel's one path
    copy = gpuhnsw.Index(index)
    rng = np.random.default_rng(0)
    for label in rng.choice(len(base), len(base) // 100, replace=False):
        copy.mark_deleted(int(label))
    dstate = copy._core.export_state()
    alive = ~np.frombuffer(dstate["deleted"], np.uint8).astype(bool)
    dtruth, _ = exact_knn(base[alive], queries, K, space)
    dtruth = np.flatnonzero(alive)[dtruth]
    t0 = time.perf_counter()
    slots, _, _, counts = beam_search_reference(dstate, queries, K, ef, return_counts=True)   # filtered mode
    rows.append(summary("1% deleted: beam w=1", slots, counts, labels, dtruth, time.perf_counter() - t0))
    for width in (1, 4):
        t0 = time.perf_counter()
        slots, _, _, _, counts = fixed_search_reference(dstate, queries, K, ef, search_width=width,
                                                        hash_log2=launch.fixed_hash_log2(ef, K, width, m0),
                                                        return_counts=True)
        rows.append(summary(f"1% deleted: fixed w={width}", slots, counts, labels, dtruth, time.perf_counter() - t0))
    return {"dataset": name, "space": space, "n": len(base), "nq": len(queries), "dim": base.shape[1], "M": m,
            "ef": ef, "k": K, "rows": rows}


def write_markdown(results, path):
    lines = ["# Search replay: serial steps and distances per query (CPU, NumPy references)", "",
             "Means per query; `iterations`: level-0 iterations (serial steps), `distances`: level-0 distance "
             "evaluations (repeats after a visited-hash reset included), `hops` / `upper`: the descent's lists and "
             "distances. Multi-block rows: lock-step replay, iterations of the slowest block, distances summed over "
             "blocks. Deleted rows: `iterations` of the beam kernel's filtered mode are its expanded lists (width 1).",
             ""]
    for r in results:
        lines += [f"## {r['dataset']} ({r['n']:,} x {r['dim']}, {r['space']}), {r['nq']} queries, M={r['M']}, "
                  f"ef={r['ef']}, k={r['k']}", "",
                  "| contender | recall@10 | iterations | expanded | distances | hops | upper distances |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            def f(key):
                return f"{row[key]:.1f}" if key in row else "-"
            lines.append(f"| {row['contender']} | {row['recall']:.3f} | {f('iterations')} | {f('expanded')} | "
                         f"{f('distances')} | {f('hops')} | {f('upper_distances')} |")
        lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="siftsmall,mnist,minilm-debian")
    p.add_argument("--n-base", type=int, default=20_000, help="base rows of mnist and minilm-debian (siftsmall: all)")
    p.add_argument("--n-queries", type=int, default=200)
    p.add_argument("--ef", type=int, default=64)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    results = []
    for name in args.datasets.split(","):
        results.append(replay(name, None if name == "siftsmall" else args.n_base, args.n_queries, args.ef, args.M))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "search_replay.json"), "w") as fh:
        json.dump({"machine": machine_info(), "args": vars(args), "results": results}, fh, indent=1)
    write_markdown(results, os.path.join(args.out, "search_replay.md"))


if __name__ == "__main__":
    main()
