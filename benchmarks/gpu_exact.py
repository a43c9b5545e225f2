"""The GPU's offline jobs (issue 19): the exact k-NN graph, GPU NN-descent and exact search, each
against the CPU NN-descent on every core and a torch brute force (matmul + topk, tiled), on one
machine in one run. Needs CuPy and a GPU (torch for its contender and the recall truth).

``graph``: synthetic clustered 1M x 128 (``--n``), k = 32. Contenders, in this order, each in a
fresh process under its own timeout (``--timeout``), after a warm-up on 20,000 rows (compilation,
cuBLAS handles, CuPy's pool):

    gpuhnsw exact, a quarter of the rows, tiling "symmetric" then "full"   (which tiling to keep)
    gpuhnsw exact, all rows (symmetric)
    gpuhnsw nndescent on the GPU, all rows
    gpuhnsw nndescent on the CPU, all rows, every core
    torch brute force, all rows: fp16 matmul of 1024-row blocks against the whole set, topk

Recall@k on 1,000 sampled rows against a float64 brute force (torch on the GPU). The GPU phases
(CUDA events) and the exact engine's pool and certificate counts are printed and kept. Last, the
constants of ``knn_graph.GPU_COST`` (``method="auto"``): the product and selection rates timed on
one 8192 x 8192 tile with CUDA events, and NN-descent's seconds per row * k * d, printed as a line
to paste.

``search``: base 1M x 128 (``--n``), 10,000 queries, k = 10: ``exact_search`` through a resident
base (``exact.upload_base``) in each screening precision (fp16, bf16, tf32, fp32: the second of two
timed calls; the certificate's redo counts), ``BFIndex(device="cuda")`` (first and second query),
and torch (fp32 matmul, TF32 off, and fp16, against base chunks of 262,144 rows, topk merged).

JSON (``gpu_exact.json``, one part per job) is rewritten after every contender, so a run cut short
keeps what it measured.

    python benchmarks/gpu_exact.py graph --out /tmp/ge                    # about 2 minutes on an H100
    python benchmarks/gpu_exact.py search --out /tmp/ge                   # about 30 s
    python benchmarks/gpu_exact.py graph --n 50000 --only cpu --out /tmp/ge   # the plumbing, no GPU
"""
import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

SEED = 12345
DIM = 128
SAMPLE = 1000
WARMUP_ROWS = 20_000
GRAPH_K = 32
SEARCH_K = 10
SEARCH_QUERIES = 10_000
TORCH_BLOCK = 1024
TORCH_BASE_CHUNK = 1 << 18
CALIBRATION_TILE = 8192
# (label, kind, device, share of the rows, tiling)
GRAPH_CONTENDERS = (("gpuhnsw exact, quarter, symmetric", "exact", "cuda", 4, "symmetric"),
                    ("gpuhnsw exact, quarter, full", "exact", "cuda", 4, "full"),
                    ("gpuhnsw exact", "exact", "cuda", 1, "symmetric"),
                    ("gpuhnsw nndescent (cuda)", "nndescent", "cuda", 1, None),
                    ("gpuhnsw nndescent (cpu, every core)", "nndescent", "cpu", 1, None),
                    ("torch brute force (fp16 matmul + topk)", "torch", "cuda", 1, None))


def synthetic(n, dim, seed=SEED, n_clusters=1000):
    """Seeded Gaussian clusters, float32 [n, dim] (GPU timings at a scale the shared data lacks)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):
        m = min(100_000, n - a)
        out[a:a + m] = centres[rng.integers(0, n_clusters, m)]
        out[a:a + m] += 0.3 * rng.standard_normal((m, dim), dtype=np.float32)
    return out


def truth(base, queries, k, exclude=None):
    """float64 brute force: int64 [nq, k] nearest rows of ``base`` (``exclude[i]`` left out), on
    the GPU through torch where it is there, else NumPy (``gpuhnsw.testing.exact_knn``)."""
    try:
        import torch
    except ImportError:
        from gpuhnsw.testing import exact_knn
        ids, _ = exact_knn(base, queries, k + (exclude is not None), "l2")
        if exclude is None:
            return ids
        keep = ids != exclude[:, None]
        keep[keep.all(axis=1), -1] = False
        return ids[keep].reshape(len(queries), k)
    dev = torch.device("cuda")
    b = torch.from_numpy(base).to(dev, torch.float64)
    q = torch.from_numpy(queries).to(dev, torch.float64)
    sq = b.pow(2).sum(1)
    out = []
    for a in range(0, len(q), 256):
        d = q[a:a + 256].pow(2).sum(1, keepdim=True) - 2 * q[a:a + 256] @ b.T + sq
        if exclude is not None:
            d[torch.arange(d.shape[0], device=dev), torch.from_numpy(exclude[a:a + 256]).to(dev)] = float("inf")
        out.append(torch.topk(d, k, largest=False).indices.cpu().numpy())
    return np.concatenate(out)


def recall(found, want):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, want)]))


def _sync():
    import cupy
    cupy.cuda.Device().synchronize()


def _torch_topk(base, queries, k, half, exclude_self=False):
    """torch brute force: (seconds, int64 [nq, k]) of l2 top-k by |b|^2 - 2 q.b, base in chunks of
    TORCH_BASE_CHUNK rows, query blocks of TORCH_BLOCK, running top-k merged."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    dtype = torch.float16 if half else torch.float32
    b = torch.from_numpy(base).to(dev)
    q = b if queries is base else torch.from_numpy(queries).to(dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bh, qh = b.to(dtype), q.to(dtype)
    sq = b.pow(2).sum(1)
    out = torch.empty((len(q), k), dtype=torch.int64, device=dev)
    for a in range(0, len(q), TORCH_BLOCK):
        best_d = best_i = None
        for c in range(0, len(b), TORCH_BASE_CHUNK):
            s = sq[c:c + TORCH_BASE_CHUNK] - 2 * (qh[a:a + TORCH_BLOCK] @ bh[c:c + TORCH_BASE_CHUNK].T).float()
            if exclude_self and a < c + s.shape[1] and c < a + s.shape[0]:
                r = torch.arange(a, min(a + TORCH_BLOCK, len(q)), device=dev)
                hit = (r >= c) & (r < c + s.shape[1])
                s[(r - a)[hit], (r - c)[hit]] = float("inf")
            d, i = torch.topk(s, k, largest=False)
            i = i + c
            if best_d is not None:
                d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                d, sel = torch.topk(d, k, largest=False)
                i = torch.gather(i, 1, sel)
            best_d, best_i = d, i
        out[a:a + TORCH_BLOCK] = best_i
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out.cpu().numpy()


# --------------------------------------------------------------------------------------------------
# graph

def graph_contender(path, rows, kind, device, k, share, tiling):
    """In a fresh process: a warm-up on the first rows, then the timed graph of the first
    ``1 / share`` of the rows; NN-descent's rounds logged as they finish."""
    import logging

    logging.basicConfig(stream=sys.stdout, format="    %(message)s")
    logging.getLogger("gpuhnsw").setLevel(logging.DEBUG)
    x = np.load(path, mmap_mode="r")
    x = np.ascontiguousarray(x[:len(x) // share])
    result = dict(rows=len(x), rounds=None, dist_evals=None, phases=None, exact=None, updates=None)
    if kind == "torch":
        _torch_topk(x[:WARMUP_ROWS], x[:WARMUP_ROWS], k + 1, True)
        seconds, ids = _torch_topk(x, x, k, True, exclude_self=True)
        result.update(seconds=seconds, warmup_seconds=None, neighbors=ids[rows] if share == 1 else None)
        return result
    from gpuhnsw.device import brute
    from gpuhnsw.knn_graph import knn_graph
    warmup = 0.0
    if device == "cuda":
        t0 = time.perf_counter()
        knn_graph(x[:WARMUP_ROWS], k, method=kind, device="cuda")
        _sync()
        warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kind == "exact":
        info = dict(phases={}, exact={}, dist_evals=len(x) ** 2)
        ids, _ = brute.graph(brute.ResidentBase(x, "l2", "fp16", info["phases"]), k, tiling=tiling,
                             phases=info["phases"], stats=info["exact"])
    else:
        ids, _, info = knn_graph(x, k, method=kind, device=device, return_info=True,
                                 num_threads=os.cpu_count())
    if device == "cuda":
        _sync()
    seconds = time.perf_counter() - t0
    result.update(seconds=seconds, warmup_seconds=warmup, neighbors=ids[rows] if share == 1 else None,
                  **{key: info.get(key) for key in ("rounds", "dist_evals", "phases", "exact", "updates")})
    if device == "cuda":
        import cupy
        result["gpu_pool_mb"] = cupy.get_default_memory_pool().total_bytes() / 2**20
    return result


def calibrate():
    """GPU_COST's exact_product_s and exact_select_s: one fp16 8192 x 8192 x 128 product and its
    selection (pool 48, l2 keys) timed with CUDA events, medians of 5."""
    import cupy as cp
    from gpuhnsw._screen import to_storage
    from gpuhnsw.device import launch
    from gpuhnsw.device.ops import select_topk

    t = CALIBRATION_TILE
    rng = np.random.default_rng(1)
    a = to_storage(cp, cp.asarray(rng.standard_normal((t, DIM), dtype=np.float32)), "fp16", 1024.0)
    g = cp.empty((t, t), dtype=cp.float32)
    bias = cp.asarray(rng.random(t, dtype=np.float32))
    keys = cp.empty((t, 48), dtype=cp.float32)
    idx = cp.empty((t, 48), dtype=cp.int64)

    def timed(fn):
        seconds = []
        for _ in range(6):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            seconds.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
        return float(np.median(seconds[1:]))

    gemm = timed(lambda: launch.gemm(a, a, g, precision="fp16", alpha=2.0**-20))
    select = timed(lambda: select_topk(g, 48, keys, idx, key_scale=-2.0, key_bias=bias))
    return dict(exact_product_s=gemm / (t * t * DIM), exact_select_s=select / (t * t),
                gemm_seconds=gemm, select_seconds=select, tile=t)


def graph_benchmark(args):
    from gpuhnsw.testing import machine_info

    n, k = args.n, GRAPH_K
    t0 = time.perf_counter()
    data = synthetic(n, DIM)
    path = os.path.join(tempfile.gettempdir(), f"ghnsw_gpu_exact_{os.getpid()}.npy")
    np.save(path, data)
    rows = np.sort(np.random.default_rng(SEED).choice(n, size=min(SAMPLE, n), replace=False))
    want = truth(data, data[rows], k, exclude=rows)
    del data
    print(f"synthetic {n} x {DIM}, k={k}: data and recall truth on {len(rows)} rows in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    report = dict(benchmark="gpu_exact_graph", dataset="synthetic clusters (seeded)", n=n, dim=DIM, k=k,
                  sample=len(rows), timeout_per_contender=args.timeout, machine=_machine(machine_info),
                  results=[], gpu_cost=None)
    ctx = multiprocessing.get_context("spawn")
    try:
        for label, kind, device, share, tiling in GRAPH_CONTENDERS:
            if args.only and args.only not in (kind, device):
                continue
            r = _in_process(ctx, graph_contender, (path, rows, kind, device, k, share, tiling), args.timeout)
            found = r.pop("neighbors", None)
            r["recall"] = None if found is None else recall(found, want)
            report["results"].append(dict(method=label, **r))
            _print(label, r, k)
            _write(report, args.out, "graph")
    finally:
        os.remove(path)
    if not args.only:
        cost = _in_process(ctx, calibrate, (), args.timeout)
        nnd = next((r for r in report["results"] if r["method"] == "gpuhnsw nndescent (cuda)" and "seconds" in r), None)
        if "error" not in cost and nnd is not None:
            cost["nndescent_s"] = nnd["seconds"] / (n * k * DIM)
        report["gpu_cost"] = cost
        _write(report, args.out, "graph")
        print(f"  GPU_COST (gpuhnsw/knn_graph.py) from this run: {cost}", flush=True)


# --------------------------------------------------------------------------------------------------
# search

def search_benchmark(args):
    import cupy as cp
    from gpuhnsw import BFIndex
    from gpuhnsw._screen import PRECISIONS
    from gpuhnsw.exact import exact_rows, upload_base
    from gpuhnsw.testing import machine_info

    n, k, nq = args.n, SEARCH_K, SEARCH_QUERIES
    data = synthetic(n + nq, DIM)
    base, queries = np.ascontiguousarray(data[:n]), np.ascontiguousarray(data[n:])
    del data
    sample = np.arange(0, nq, max(1, nq // 500))
    want = truth(base, queries[sample], k)
    report = dict(benchmark="gpu_exact_search", dataset="synthetic clusters (seeded)", n=n, dim=DIM, k=k,
                  queries=nq, machine=_machine(machine_info), results=[])

    def add(label, seconds, ids, **extra):
        r = dict(method=label, seconds=seconds, qps=nq / seconds, recall=recall(ids[sample], want), **extra)
        report["results"].append(r)
        print(f"  {label}: {seconds * 1e3:.1f} ms, {r['qps']:,.0f} QPS, recall@{k} {r['recall']:.4f}"
              + "".join(f", {a} {b}" for a, b in extra.items()), flush=True)
        _write(report, args.out, "search")

    exact_rows(base[:WARMUP_ROWS], queries[:100], k, "l2", device=("cuda", 0))          # warm-up
    for precision in PRECISIONS:
        t0 = time.perf_counter()
        resident = upload_base(base, "l2", ("cuda", 0), precision)
        _sync()
        upload = time.perf_counter() - t0
        runs = []
        for _ in range(2):
            phases, stats = {}, {}
            t0 = time.perf_counter()
            ids, _ = exact_rows(base, queries, k, "l2", device=("cuda", 0), base_cache=resident, phases=phases,
                                stats=stats)
            runs.append(time.perf_counter() - t0)
        add(f"gpuhnsw exact_rows, {precision} screening, resident base", runs[-1], ids, first_s=runs[0],
            upload_s=upload, phases=phases, stats=stats)
        del resident
        cp.get_default_memory_pool().free_all_blocks()
    index = BFIndex("l2", DIM, device="cuda")
    index.init_index(n)
    index.add_items(base)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        labels, _ = index.knn_query(queries, k=k)
        runs.append(time.perf_counter() - t0)
    add("gpuhnsw BFIndex(device='cuda')", runs[-1], labels.astype(np.int64), first_s=runs[0])
    del index
    cp.get_default_memory_pool().free_all_blocks()
    for half in (False, True):
        _torch_topk(base[:WARMUP_ROWS], queries[:100], k, half)
        seconds, ids = _torch_topk(base, queries, k, half)
        add(f"torch brute force ({'fp16' if half else 'fp32, TF32 off'} matmul + topk)", seconds, ids)


# --------------------------------------------------------------------------------------------------

def _in_process(ctx, fn, fn_args, timeout):
    pool = ctx.Pool(1)
    job = pool.apply_async(fn, fn_args)
    try:
        return job.get(timeout=timeout)
    except multiprocessing.TimeoutError:
        return dict(error=f"timed out after {timeout} s")
    except Exception as exc:                                      # noqa: BLE001 (reported, next one runs)
        return dict(error=f"{type(exc).__name__}: {exc}")
    finally:
        pool.terminate()
        pool.join()


def _machine(machine_info):
    info = machine_info("torch", "cupy-cuda12x", "cupy-cuda13x")
    try:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else name
    except Exception as exc:                                      # noqa: BLE001
        info["gpu"] = f"none ({type(exc).__name__})"
    return info


def _print(label, r, k):
    if "error" in r:
        print(f"  {label}: {r['error']}", flush=True)
        return
    phases = ", ".join(f"{p} {s:.3f} s" for p, s in (r.get("phases") or {}).items())
    rec = "-" if r["recall"] is None else f"{r['recall']:.4f}"
    print(f"  {label}: {r['rows']} rows, {r['seconds']:.2f} s, recall@{k} {rec}, rounds {r['rounds']}, "
          f"updates {r['updates']}, exact {r['exact']}" + (f"; phases: {phases}" if phases else ""), flush=True)


def _write(report, out, job):
    """``report`` as the ``job`` part of ``out/gpu_exact.json`` (one file for both jobs: the device
    check brings back at most 8 files)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu_exact.json")
    try:
        with open(path) as f:
            both = json.load(f)
    except (OSError, ValueError):
        both = {}
    both[job] = report
    with open(path + ".tmp", "w") as f:
        json.dump(both, f, indent=2, default=float)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("job", choices=("graph", "search"))
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--timeout", type=float, default=30.0, help="graph: seconds per contender")
    p.add_argument("--only", choices=("exact", "nndescent", "torch", "cpu", "cuda"),
                   help="graph: the contenders of one kind or device")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    (graph_benchmark if args.job == "graph" else search_benchmark)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
