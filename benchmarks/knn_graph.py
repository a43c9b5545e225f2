"""k-NN graph construction: gpuhnsw.knn_graph (exact and HNSW) against pynndescent.

CPU part (default): MNIST base (60,000 x 784, squared L2), k neighbours per point (self excluded).
Each method runs in a freshly spawned interpreter (clean peak memory, no shared JIT or BLAS state):

- ``gpuhnsw exact``: ``knn_graph(method="exact")`` (symmetric BLAS tiles + float64 re-ranking);
- ``gpuhnsw hnsw``: ``knn_graph(method="hnsw")`` (build an HNSW index, query every point);
- ``pynndescent``: ``NNDescent(n_neighbors=k + 1)`` then ``neighbor_graph`` minus self. Its numba
  functions are compiled on a small warm-up set first, so the timing excludes JIT compilation
  (reported separately).

Recall@k is measured on a fixed random sample of points (default 1000) against the float64 brute
force of :func:`gpuhnsw.testing.exact_knn` (independent code). Writes ``knn_graph_cpu.json``
(machine, parameters, raw numbers) and ``knn_graph_cpu.md`` into ``--out``.

GPU part (``--gpu``, needs CuPy and a device): exact graph of 1M x 128 (k=32), the HNSW method with
queries on the GPU, and GPU-assisted insertion where the index offers it. Writes
``knn_graph_gpu.json`` / ``.md``. The 1M x 128 set is synthetic (seeded Gaussian clusters): no real
set of that size is in the shared data; it serves timings, and recall is measured against exact.

    python benchmarks/knn_graph.py                      # full CPU run (minutes; quiet machine)
    python benchmarks/knn_graph.py --n 5000 --out /tmp/kg   # smoke test
    python benchmarks/knn_graph.py --gpu --out /tmp/kg      # GPU part only
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import sys
import time

import numpy as np

import gpuhnsw
from gpuhnsw import testing
from gpuhnsw.testing import exact_knn, load_dataset, recall_at_k

DEFAULT_K = 10
SAMPLE = 1000
SEED = 12345
HNSW_PARAMS = dict(M=16, ef_construction=200)
PYNND_WARMUP_ROWS = 2000


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def machine_info():
    return testing.machine_info("pynndescent", "numba", "cupy-cuda12x", "cupy-cuda13x")


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a newly spawned interpreter."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def drop_self(ids, dists, rows, k):
    """[m, k + 1] neighbour lists -> [m, k] without each row's own id (else without the last)."""
    drop = ids == rows[:, None]
    drop[~drop.any(axis=1), -1] = True
    return ids[~drop].reshape(len(ids), k), dists[~drop].reshape(len(ids), k)


def load_mnist(n):
    base, _, _, _ = load_dataset("mnist", n_base=n, n_queries=1)
    return base


def sample_truth(data, k, sample_size, seed):
    """Exact neighbours (self excluded) of a fixed random sample of rows: (rows, ids [s, k])."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data), size=min(sample_size, len(data)), replace=False))
    ids, dists = exact_knn(data, data[rows], k + 1, "l2")
    ids, _ = drop_self(ids, dists, rows, k)
    return rows, ids


# --------------------------------------------------------------------------------------------------
# one method, run inside a fresh process
# --------------------------------------------------------------------------------------------------

def run_method(method, n, k, threads, params):
    """Returns dict(seconds, neighbors [n, k], rss numbers, extra)."""
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS"):
            os.environ[var] = str(threads)
    data = load_mnist(n)
    rss_data = _rss_mb()
    extra = {}
    if method.startswith("gpuhnsw"):
        from gpuhnsw.knn_graph import knn_graph
        kind = method.split()[1]
        t0 = time.perf_counter()
        neighbors, _ = knn_graph(data, k, method=kind, device="cpu", num_threads=threads,
                                 progress=False, **params)
        seconds = time.perf_counter() - t0
    elif method == "pynndescent":
        from pynndescent import NNDescent
        t0 = time.perf_counter()
        NNDescent(data[:PYNND_WARMUP_ROWS], n_neighbors=k + 1, metric="euclidean",
                  random_state=SEED, n_jobs=threads).neighbor_graph
        extra["warmup_jit_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = NNDescent(data, n_neighbors=k + 1, metric="euclidean", random_state=SEED,
                          n_jobs=threads, **params)
        ids, dists = index.neighbor_graph
        seconds = time.perf_counter() - t0
        neighbors, _ = drop_self(ids.astype(np.int64), dists, np.arange(len(data)), k)
    else:
        raise ValueError(method)
    return dict(seconds=seconds, neighbors=neighbors, rss_after_load_mb=rss_data,
                peak_rss_mb=_peak_rss_mb(), extra=extra)


# --------------------------------------------------------------------------------------------------
# CPU benchmark
# --------------------------------------------------------------------------------------------------

def cpu_benchmark(args):
    data = load_mnist(args.n)
    n, dim = data.shape
    k = args.k
    print(f"mnist {n} x {dim}, k={k}, threads={args.threads}; exact neighbours of "
          f"{min(args.sample, n)} sample rows ...", flush=True)
    rows, truth = sample_truth(data, k, args.sample, SEED)
    del data
    methods = [
        ("gpuhnsw exact", {}),
        ("gpuhnsw hnsw", dict(HNSW_PARAMS)),
        ("pynndescent", {}),
    ]
    if args.methods:
        wanted = set(args.methods.split(","))
        methods = [(m, p) for m, p in methods if m.split()[-1] in wanted or m in wanted]
    results = []
    for method, params in methods:
        print(f"  {method} {params or ''} ...", flush=True)
        try:
            r = in_fresh_process(run_method, method, n, k, args.threads, params)
        except ImportError as exc:
            print(f"    skipped: {exc}", flush=True)
            results.append(dict(method=method, params=params, skipped=str(exc)))
            continue
        recall = recall_at_k(r["neighbors"][rows], truth, k)
        self_loops = int((r["neighbors"] == np.arange(n)[:, None]).sum())
        results.append(dict(method=method, params=params, seconds=r["seconds"], recall=recall,
                            self_loops=self_loops, peak_rss_mb=r["peak_rss_mb"],
                            rss_after_load_mb=r["rss_after_load_mb"], **r["extra"]))
        print(f"    {r['seconds']:.2f} s, recall@{k} {recall:.4f}, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB", flush=True)
    report = dict(benchmark="knn_graph_cpu", dataset="mnist", n=n, dim=dim, k=k,
                  threads=args.threads, sample=len(rows), sample_seed=SEED,
                  machine=machine_info(), results=results)
    write(report, args.out, "knn_graph_cpu")


# --------------------------------------------------------------------------------------------------
# GPU benchmark (not runnable without CuPy and a device)
# --------------------------------------------------------------------------------------------------

def synthetic(n, dim, seed=SEED, n_clusters=1000):
    """Seeded Gaussian clusters, float32 [n, dim] (for GPU timings at a scale the shared data lacks)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for a in range(0, n, step):
        m = min(step, n - a)
        out[a:a + m] = centres[rng.integers(0, n_clusters, m)]
        out[a:a + m] += 0.3 * rng.standard_normal((m, dim), dtype=np.float32)
    return out


def gpu_benchmark(args):
    import cupy
    from gpuhnsw.knn_graph import knn_graph

    n, dim, k = args.gpu_n, 128, args.gpu_k
    data = synthetic(n, dim)
    print(f"synthetic {n} x {dim}, k={k}; exact neighbours of {args.sample} sample rows ...",
          flush=True)
    rows, truth = sample_truth(data, k, args.sample, SEED)
    results = []

    def timed(name, fn, **params):
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        try:
            neighbors, _ = fn()
        except NotImplementedError as exc:
            results.append(dict(method=name, params=params, skipped=str(exc)))
            print(f"  {name}: skipped ({exc})", flush=True)
            return
        cupy.cuda.Device().synchronize()
        seconds = time.perf_counter() - t0
        recall = recall_at_k(neighbors[rows], truth, k)
        results.append(dict(method=name, params=params, seconds=seconds, recall=recall,
                            gpu_peak_mb=cupy.get_default_memory_pool().total_bytes() / 2**20))
        print(f"  {name}: {seconds:.2f} s, recall@{k} {recall:.4f}", flush=True)

    knn_graph(data[:20_000], k, method="exact", device="cuda")      # warm-up (cuBLAS, kernels)
    timed("gpuhnsw exact (cuda)", lambda: knn_graph(data, k, method="exact", device="cuda"))
    timed("gpuhnsw hnsw (CPU build, GPU queries)",
          lambda: knn_graph(data, k, method="hnsw", device="cuda", **HNSW_PARAMS), **HNSW_PARAMS)

    def gpu_assisted():
        index = gpuhnsw.Index("l2", dim, device="cuda")
        if not hasattr(index, "add_items_gpu"):
            raise NotImplementedError("gpuhnsw.Index has no GPU-assisted insertion (add_items_gpu)")
        index.init_index(n, **HNSW_PARAMS)
        index.add_items_gpu(data, np.arange(n))
        labels, dists = index.knn_query(data, k=k + 1, ef=max(64, 2 * (k + 1)))
        return drop_self(labels.astype(np.int64), dists, np.arange(n), k)

    timed("gpuhnsw hnsw (GPU-assisted build, GPU queries)", gpu_assisted, **HNSW_PARAMS)
    info = machine_info()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    report = dict(benchmark="knn_graph_gpu", dataset="synthetic clusters (seeded)", n=n, dim=dim,
                  k=k, sample=len(rows), sample_seed=SEED, machine=info, results=results)
    write(report, args.out, "knn_graph_gpu")


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------

def write(report, out, stem):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    m = report["machine"]
    lines = [
        f"# k-NN graph: {report['dataset']} {report['n']} x {report['dim']}, k={report['k']}",
        "",
        f"Machine: {m['cpu']} ({m.get('cores_usable') or m['cores']} usable cores"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"), {m['date']}. "
        f"Recall@{report['k']} on {report['sample']} random rows (seed {report['sample_seed']}) "
        "against float64 brute force; self excluded.",
        "",
        "| method | parameters | seconds | recall@k | peak RSS (MB) | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        params = ", ".join(f"{a}={b}" for a, b in r.get("params", {}).items()) or "defaults"
        if "skipped" in r:
            lines.append(f"| {r['method']} | {params} | - | - | - | skipped: {r['skipped']} |")
            continue
        notes = []
        if "warmup_jit_seconds" in r:
            notes.append(f"JIT warm-up {r['warmup_jit_seconds']:.1f} s excluded")
        if r.get("self_loops"):
            notes.append(f"{r['self_loops']} self loops")
        rss = r.get("peak_rss_mb", r.get("gpu_peak_mb"))
        lines.append(f"| {r['method']} | {params} | {r['seconds']:.2f} | {r['recall']:.4f} | "
                     f"{'-' if rss is None else f'{rss:.0f}'} | {'; '.join(notes)} |")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out, stem)}.json and .md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="first N mnist rows (default: all 60,000)")
    p.add_argument("-k", type=int, default=DEFAULT_K, help=f"neighbours (default {DEFAULT_K})")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per method")
    p.add_argument("--sample", type=int, default=SAMPLE, help="rows used for recall")
    p.add_argument("--methods", help="comma list among exact,hnsw,pynndescent (default: all)")
    p.add_argument("--gpu", action="store_true", help="run the GPU part instead of the CPU part")
    p.add_argument("--gpu-n", type=int, default=1_000_000)
    p.add_argument("--gpu-k", type=int, default=32)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results"))
    args = p.parse_args(argv)
    if args.gpu:
        gpu_benchmark(args)
    else:
        cpu_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
