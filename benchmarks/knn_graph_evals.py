"""Distance evaluations at equal recall: gpuhnsw's C NN-descent against pynndescent.

Why does a gap in time remain (benchmarks/knn_graph.py)? This counts the pair distances each tool
evaluates to reach a given recall@k, on the first ``--n`` mnist rows (squared L2). gpuhnsw reports
its count (``knn_graph(..., return_info=True)["dist_evals"]``: leaf joins, initial fill and local
joins). pynndescent's is counted by handing it a Python metric that counts its calls, run with
``NUMBA_DISABLE_JIT=1`` (pure Python, so only a few thousand rows are practical; its ``int32 <->
float32`` bit-cast intrinsics get NumPy stand-ins). Neither count includes the random-projection
trees' hyperplane dot products. Recall@k is measured on every row against the float64 brute force
of :func:`gpuhnsw.testing.exact_knn`, self excluded.

Writes ``knn_graph_evals.json`` and ``knn_graph_evals.md`` into ``--out``.

    python benchmarks/knn_graph_evals.py --out benchmarks/results    # about 5 min, 2 cores
"""
import argparse
import multiprocessing
import os
import time

import numpy as np

from gpuhnsw.testing import save_results
from knn_graph import drop_self, param_text   # benchmarks/knn_graph.py (this script's folder is on sys.path)

SEED = 12345
# pynndescent: its defaults and the settings knn_graph.py's sweep uses; gpuhnsw: knn_graph.py's
# settings and a few around them
SETTINGS = {
    "pynndescent": [dict(max_candidates=4), dict(max_candidates=8, n_trees=5), dict(max_candidates=8),
                    {}, dict(n_neighbors_extra=5, n_trees=8), dict(n_neighbors_extra=5),
                    dict(n_neighbors_extra=15)],
    "gpuhnsw nndescent": [dict(intermediate_degree=10, max_candidates=8, n_trees=2, leaf_size=64),
                          dict(intermediate_degree=10, max_candidates=20, n_trees=4, leaf_size=128,
                               n_iters=2),
                          dict(intermediate_degree=10, max_candidates=12, n_trees=4, leaf_size=128,
                               n_iters=3),
                          dict(intermediate_degree=10, max_candidates=10, n_trees=4, leaf_size=128),
                          dict(intermediate_degree=15, max_candidates=15, n_trees=8, leaf_size=120,
                               n_iters=5),
                          {},
                          dict(intermediate_degree=24, max_candidates=20, n_trees=24,
                               leaf_size=200)],
}


def _rows(n):
    from gpuhnsw.testing import load_dataset
    return np.ascontiguousarray(load_dataset("mnist", n_base=n, n_queries=1)[0], dtype=np.float32)


def run_pynndescent(n, k, params):
    """In a fresh process (NUMBA_DISABLE_JIT set before numba loads): (ids [n, k], evaluations)."""
    os.environ["NUMBA_DISABLE_JIT"] = "1"
    import warnings
    import pynndescent.kernels
    import pynndescent.pynndescent_
    import pynndescent.utils
    from pynndescent import NNDescent
    warnings.filterwarnings("ignore", category=RuntimeWarning)   # its uint64 hashes wrap in NumPy

    def as_float32(p):
        return np.array(p, dtype=np.int32).view(np.float32)[()]

    def as_int32(f):
        return int(np.array(f, dtype=np.float32).view(np.int32)[()])

    for mod in (pynndescent.pynndescent_, pynndescent.kernels, pynndescent.utils):
        for name, fn in (("int32_bits_as_float32", as_float32), ("float32_bits_as_int32", as_int32)):
            if hasattr(mod, name):
                setattr(mod, name, fn)
    calls = [0]

    def sqeuclidean(a, b):
        calls[0] += 1
        d = a - b
        return np.dot(d, d)

    params = dict(params)
    more = params.pop("n_neighbors_extra", 0)
    ids, _ = NNDescent(_rows(n), n_neighbors=k + 1 + more, metric=sqeuclidean, random_state=SEED,
                       n_jobs=1, **params).neighbor_graph
    return drop_self(ids[:, :k + 1].astype(np.int64), k), calls[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="first rows of mnist")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    from gpuhnsw.knn_graph import knn_graph
    from gpuhnsw.testing import exact_knn, machine_info, recall_at_k
    x = _rows(args.n)
    truth = drop_self(np.asarray(exact_knn(x, x, args.k + 1, "l2")[0], dtype=np.int64), args.k)
    results = []
    for params in SETTINGS["gpuhnsw nndescent"]:
        ids, _, info = knn_graph(x, args.k, method="nndescent", return_info=True, progress=False,
                                 random_seed=SEED, **params)
        results.append(dict(tool="gpuhnsw nndescent", params=params, dist_evals=info["dist_evals"],
                            recall=recall_at_k(ids, truth, args.k)))
    ctx = multiprocessing.get_context("spawn")
    for params in SETTINGS["pynndescent"]:
        t0 = time.perf_counter()
        with ctx.Pool(1) as pool:
            ids, evals = pool.apply(run_pynndescent, (args.n, args.k, params))
        results.append(dict(tool="pynndescent", params=params, dist_evals=evals,
                            recall=recall_at_k(ids, truth, args.k)))
        print(f"pynndescent {params}: {evals} evaluations, {time.perf_counter() - t0:.0f} s",
              flush=True)
    for r in results:
        print(f"{r['tool']} {r['params']}: recall {r['recall']:.4f}, {r['dist_evals']:,} evaluations")
    report = dict(benchmark="knn_graph_evals", dataset="mnist", n=args.n, k=args.k, seed=SEED,
                  machine=machine_info("pynndescent", "numba"), results=results)
    save_results(args.out, "knn_graph_evals", report, write_markdown)


def write_markdown(report, path):
    n, k = report["n"], report["k"]
    lines = [f"# Distance evaluations at equal recall: gpuhnsw NN-descent vs pynndescent "
             f"(first {n:,} mnist rows, k = {k})", "",
             "Counts of pair distances (random-projection hyperplane products excluded for both): "
             "gpuhnsw's `dist_evals`; pynndescent's calls of a counting Python metric under "
             "`NUMBA_DISABLE_JIT=1`. Recall@k over every row against the float64 brute force.", "",
             "| tool | parameters | recall@k | distance evals | evals per row |",
             "|---|---|---:|---:|---:|"]
    for r in report["results"]:
        p = param_text(r["params"])
        lines.append(f"| {r['tool']} | {p} | {r['recall']:.4f} | {r['dist_evals'] / 1e6:.2f} M | "
                     f"{r['dist_evals'] / n:.0f} |")
    lines += ["", "Fewest evaluations reaching each recall:", "",
              "| target | gpuhnsw nndescent | pynndescent | ratio |", "|---:|---:|---:|---:|"]
    for target in (0.95, 0.99):
        best = {}
        for tool in ("gpuhnsw nndescent", "pynndescent"):
            ok = [r["dist_evals"] for r in report["results"]
                  if r["tool"] == tool and r["recall"] >= target]
            best[tool] = min(ok) if ok else None
        ours, theirs = best["gpuhnsw nndescent"], best["pynndescent"]
        cell = [f"{v / 1e6:.2f} M" if v else "not reached" for v in (ours, theirs)]
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        lines.append(f"| {target} | {cell[0]} | {cell[1]} | {ratio} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
