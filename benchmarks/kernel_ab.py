"""Issue 17's device run: search_beam_kernel against search_fixed_kernel on one card (needs CuPy and a GPU).

Per dataset, in one process, on one card:

- data: ``clustered`` (1,000,000 x 128: 1000 centres uniform in [0, 1)^128, Gaussian spread 0.08, as
  gpu_search.py), ``hard`` (1,000,000 x 128 of intrinsic dimension 24: z ~ N(0, I_24) through a
  random orthonormal 24 x 128 map, plus isotropic noise of standard deviation 0.05; at 100,000 rows
  hnswlib (M=16, ef_construction=64) reached recall@10 0.90 at ef 64 and 0.97 at ef 128, measured
  here on 300 queries; intrinsic dimension 32 needed ef 256 for 0.95 at 200,000), both generated on
  the device from a fixed seed with 10,000 queries drawn alike; ``minilm-debian`` (the carried
  slice, cosine, 384);
- ground truth and a peer: exact search by torch (cuBLAS, fp32, TF32 off) at batch 10,000: QPS and
  the truth (``gpuhnsw.exact`` on the GPU where torch is missing);
- builds: gpuhnsw (``--build``: ``gpu`` = GPU-assisted, or ``cpu``) and hnswlib 0.8.0 on every core,
  both M=16 and ``--ef-construction`` (64: the 1M builds fit the time box; see benchmarks/README.md);
- hnswlib on every core over the ef sweep (batch 10,000);
- each contender (kernel, storage, search_width) over the ef sweep at batch 10,000, 100 and 1:
  recall@10, QPS end to end (queries already on the device, results left there, found/status read
  back), kernel-only time by CUDA events around the launches (median and p99 at batch 1), batch-1
  end-to-end latency from host queries (median, p99), the fixed kernel's debug counters (level-0
  iterations, distances, descent hops and distances per query) and the bytes/s they imply, and the
  registers and local memory of every compiled instantiation used.

One JSON per dataset (``kernel_ab_<dataset>.json`` in ``--out``) is rewritten after every
measurement, so a run cut by its time box keeps what it measured; ``kernel_ab.md`` summarises every
``kernel_ab_*.json`` of ``--out`` (``--markdown-only`` rebuilds it without a GPU).

    python benchmarks/kernel_ab.py --out "$OUT"                                  # all three sets
    python benchmarks/kernel_ab.py --datasets clustered --n 200000 --out /tmp/ab   # smaller
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_vs_hnswlib import qps_at_recall  # noqa: E402  (sibling script)

import gpuhnsw  # noqa: E402
from gpuhnsw._reference import COUNTS  # noqa: E402
from gpuhnsw.testing import load_dataset, machine_info, recall_at_k  # noqa: E402

K = 10
SEED = 0
TARGET = 0.95
EF_SWEEP = (16, 24, 32, 48, 64, 96, 128, 192, 256)
BATCHES = (10_000, 100, 1)
LATENCY_QUERIES = 300
HARD_DIM = 24   # intrinsic dimension of the hard set
#: (name, kernel, storage, search_width, search_graph): the A/B contenders, most important first
#: ("optimized": the fixed kernel over the search graph of issue 18 instead of HNSW level 0).
CONTENDERS = (
    ("beam fp32 w1", "beam", "float32", 1, "hnsw"),     # the default today
    ("fixed fp16 w1", "fixed", "float16", 1, "hnsw"),
    ("fixed fp16 w4", "fixed", "float16", 4, "hnsw"),
    ("fixed fp16 w4 graph", "fixed", "float16", 4, "optimized"),
    ("fixed fp16 w1 graph", "fixed", "float16", 1, "optimized"),
    ("fixed fp16 w2", "fixed", "float16", 2, "hnsw"),
    ("fixed fp16 w8", "fixed", "float16", 8, "hnsw"),
    ("beam fp16 w4", "beam", "float16", 4, "hnsw"),
    ("fixed fp32 w4", "fixed", "float32", 4, "hnsw"),
    ("fixed bf16 w4", "fixed", "bfloat16", 4, "hnsw"),
)
SPACES = {"clustered": "l2", "hard": "l2", "minilm-debian": "cosine"}


def synthetic(cp, name, n, nq, dim=128):
    """The generated sets (module docstring), as host float32 copies."""
    rng = cp.random.default_rng(SEED)
    if name == "clustered":
        centres = rng.random((1000, dim), dtype=cp.float32)
        which = rng.integers(0, 1000, size=n + nq)
        x = centres[which] + rng.standard_normal((n + nq, dim), dtype=cp.float32) * cp.float32(0.08)
    else:
        basis, _ = cp.linalg.qr(rng.standard_normal((dim, HARD_DIM), dtype=cp.float32))   # orthonormal columns
        z = rng.standard_normal((n + nq, HARD_DIM), dtype=cp.float32)
        x = z @ basis.T + rng.standard_normal((n + nq, dim), dtype=cp.float32) * cp.float32(0.05)
    x = cp.asnumpy(x.astype(cp.float32))
    return np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])


def exact_peer(cp, base, queries, space):
    """(truth int64 [nq, K], QPS of exact search at batch 10,000, who computed it)."""
    try:
        import torch
    except ImportError:
        from gpuhnsw.exact import exact_search
        start = time.perf_counter()
        truth, _ = exact_search(base, queries, K, space, device="cuda")
        return np.asarray(truth), len(queries) / (time.perf_counter() - start), "gpuhnsw.exact (no torch)"
    torch.backends.cuda.matmul.allow_tf32 = False
    xb = torch.from_numpy(base).cuda()
    xq = torch.from_numpy(queries).cuda()
    if space == "cosine":
        xb = torch.nn.functional.normalize(xb, dim=1)
        xq = torch.nn.functional.normalize(xq, dim=1)
    sq = (xb * xb).sum(1)

    def search(q):
        out = []
        for a in range(0, len(q), 1000):   # [1000, n] fp32 tiles
            s = q[a:a + 1000] @ xb.T
            key = sq[None, :] - 2 * s if space == "l2" else -s
            out.append(torch.topk(key, K, dim=1, largest=False).indices)
        return torch.cat(out)

    truth = search(xq[:10_000]).cpu().numpy()           # also the warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    search(xq[:10_000])
    torch.cuda.synchronize()
    qps = min(10_000, len(xq)) / (time.perf_counter() - start)
    del xb, xq
    torch.cuda.empty_cache()
    return truth, qps, "torch (cuBLAS fp32, TF32 off)"


def percentiles(ms):
    ms = np.asarray(ms)
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def launches(index, q, k, ef, width):
    """Enqueue the search of ``q`` (CuPy) with the index's kernel, as the GPU leg does, and return a
    function that finishes it (the read-back)."""
    gpu = index._gpu
    chosen = gpu._launch(gpu_cp(), index._core, q, k, max(ef, k), width, None, 0, False)
    if chosen[0] == "fixed":
        return chosen[1].finish
    info = chosen[1][2]
    return lambda: gpu_cp().asnumpy(info)


def gpu_cp():
    import cupy
    return cupy


def kernel_times(cp, index, q_dev, ef, width, reps):
    """Milliseconds between CUDA events around the launches of one batch (sync excluded)."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    out = []
    for _ in range(reps):
        start.record()
        finish = launches(index, q_dev, K, ef, width)
        stop.record()
        stop.synchronize()
        finish()
        out.append(cp.cuda.get_elapsed_time(start, stop))
    return out


def curve(cp, index, queries, q_dev, truth, width, batch, deadline):
    """recall and QPS over the ef sweep at one batch size (recall from the same batches: a small
    batch runs several blocks per query, a different search)."""
    nq = min(len(queries), LATENCY_QUERIES if batch == 1 else len(queries))
    points = []
    for ef in EF_SWEEP:
        if time.perf_counter() > deadline:
            break
        chunks = [q_dev[a:a + batch] for a in range(0, nq, batch)]
        labels = np.concatenate([cp.asnumpy(index.knn_query(c, k=K, ef=ef, search_width=width)[0]) for c in chunks])
        point = {"ef": ef, "recall": float(recall_at_k(labels, truth[:nq], K))}
        if batch == 1:
            e2e = []
            for i in range(nq):
                t = time.perf_counter()
                index.knn_query(queries[i:i + 1], k=K, ef=ef, search_width=width)   # host in, host out
                e2e.append(1e3 * (time.perf_counter() - t))
            point.update(qps=1e3 / float(np.mean(e2e)), end_to_end=percentiles(e2e),
                         kernel=percentiles([kernel_times(cp, index, q_dev[i:i + 1], ef, width, 1)[0]
                                             for i in range(nq)]))
        else:
            best = float("inf")
            for _ in range(3):
                cp.cuda.Device().synchronize()
                t = time.perf_counter()
                for c in chunks:
                    index.knn_query(c, k=K, ef=ef, search_width=width)
                cp.cuda.Device().synchronize()
                best = min(best, time.perf_counter() - t)
            point["qps"] = nq / best
            if batch == BATCHES[0]:
                point["kernel_ms"] = float(np.median(kernel_times(cp, index, q_dev[:batch], ef, width, 3)))
        points.append(point)
    return points


def debug_counts(cp, index, q_dev, ef, width, row_bytes):
    """The fixed kernel's per-query counters at batch 10,000 and the bytes/s they imply."""
    gpu = index._gpu
    with gpu._lock:
        gpu._mirror_of(index._core).sync()
        pending = gpu.fixed.launch(q_dev, K, max(ef, K), search_width=width, counts=True)
    if pending is None:
        return None
    counts = dict(zip(COUNTS, pending.finish().counts.astype(np.float64).T))
    ms = float(np.median(kernel_times(cp, index, q_dev, ef, width, 3)))
    n_rows = counts["distances"].sum() + counts["upper_distances"].sum()
    out = {"ef": ef, "kernel_ms": ms, "row_bytes_per_s": n_rows * row_bytes / (ms / 1e3) if ms > 0 else None}
    out.update({name: float(c.mean()) for name, c in counts.items()})
    return out


def registers(index):
    """num_regs and local memory of every search kernel the index compiled (CuPy's attributes)."""
    from gpuhnsw.device import kernels
    out = {}
    for (device, name, instance), kernel in list(kernels._kernels.items()):
        attrs = kernel.attributes
        out[f"{name} {instance}"] = {"num_regs": attrs.get("num_regs"), "local_size_bytes": attrs.get("local_size_bytes"),
                                     "shared_size_bytes": attrs.get("shared_size_bytes")}
    return out


def copy_bandwidth(cp, nbytes=1 << 30):
    src = cp.empty(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    cp.copyto(dst, src)
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(5):
        cp.copyto(dst, src)
    cp.cuda.Device().synchronize()
    return 2 * 5 * src.nbytes / (time.perf_counter() - t) / 1e9


def run(name, args, save, budget_s):
    import cupy as cp
    import hnswlib

    space = SPACES[name]
    if name in ("clustered", "hard"):
        base, queries = synthetic(cp, name, args.n, args.nq)
    else:
        base, queries, _, _ = load_dataset(name, n_queries=args.nq)
    res = {"dataset": name, "space": space, "n": len(base), "nq": len(queries), "dim": base.shape[1]}
    print(f"== {name}: base {base.shape}, queries {queries.shape}, {space}", flush=True)
    t = time.perf_counter()
    truth, qps, who = exact_peer(cp, base, queries, space)
    res["exact"] = {"qps": qps, "by": who, "seconds": time.perf_counter() - t}
    print(f"  exact: {qps:,.0f} QPS ({who})", flush=True)
    save(res)

    os.environ["GHNSW_SEARCH_KERNEL"] = "beam"
    index = gpuhnsw.Index(space, base.shape[1], device="cuda")
    index.init_index(len(base), M=16, ef_construction=args.ef_construction, random_seed=SEED)
    t = time.perf_counter()
    try:
        index.add_items(base, num_threads=-1, build=args.build)
        res["build"] = args.build
    except Exception as exc:   # first device run of the GPU-assisted build: fall back, say so
        res["build"] = f"cpu (build={args.build} failed: {type(exc).__name__}: {exc})"
        index = gpuhnsw.Index(space, base.shape[1], device="cuda")
        index.init_index(len(base), M=16, ef_construction=args.ef_construction, random_seed=SEED)
        t = time.perf_counter()
        index.add_items(base, num_threads=-1, build="cpu")
    res["build_gpuhnsw_s"] = time.perf_counter() - t
    peer = hnswlib.Index(space, base.shape[1])
    peer.init_index(len(base), M=16, ef_construction=args.ef_construction, random_seed=SEED)
    t = time.perf_counter()
    peer.add_items(base, num_threads=-1)
    res["build_hnswlib_s"] = time.perf_counter() - t
    print(f"  build ({args.build}, ef_construction {args.ef_construction}): gpuhnsw {res['build_gpuhnsw_s']:.1f} s, "
          f"hnswlib {res['build_hnswlib_s']:.1f} s", flush=True)
    res["hnswlib"] = []
    for ef in EF_SWEEP:
        peer.set_ef(ef)
        t = time.perf_counter()
        labels, _ = peer.knn_query(queries, k=K, num_threads=-1)
        res["hnswlib"].append({"ef": ef, "recall": float(recall_at_k(labels, truth, K)),
                               "qps": len(queries) / (time.perf_counter() - t)})
    del peer
    print(f"  hnswlib QPS at {TARGET}: {qps_at_recall(res['hnswlib'], TARGET)}", flush=True)
    save(res)

    q_dev = cp.asarray(queries)
    res["contenders"] = {}
    deadline = time.perf_counter() + budget_s
    for label, kernel, storage, width, graph in CONTENDERS:
        if time.perf_counter() > deadline:
            print(f"  {label}: skipped (--budget-s spent)", flush=True)
            continue
        os.environ["GHNSW_SEARCH_KERNEL"] = kernel
        copy = gpuhnsw.Index(index, device="cuda", gpu_storage=storage, search_graph=graph)
        t = time.perf_counter()
        copy.sync()                 # the whole mirror (and with "optimized" the graph's build) goes up
        entry = res["contenders"][label] = {"kernel": kernel, "storage": storage, "search_width": width,
                                            "search_graph": graph, "first_sync_s": time.perf_counter() - t}
        for batch in BATCHES:
            entry[str(batch)] = curve(cp, copy, queries, q_dev, truth, width, batch, deadline)
            save(res)
        big = entry[str(BATCHES[0])]
        entry["qps_at_target"] = qps_at_recall(big, TARGET) if big else None
        at = [p["ef"] for p in big if p["recall"] >= TARGET]
        if kernel == "fixed" and at:
            row_bytes = copy._gpu.mirror.stride * (4 if storage == "float32" else 2)
            entry["counts"] = debug_counts(cp, copy, q_dev[:BATCHES[0]], at[0], width, row_bytes)
        lat = [p for p in entry.get("1", []) if p["recall"] >= TARGET]
        entry["batch1_at_target"] = lat[0] if lat else None
        print(f"  {label}: QPS at {TARGET} (batch 10k) {entry['qps_at_target']}, batch 1 "
              f"{lat[0]['end_to_end'] if lat else None}, counts {entry.get('counts')}", flush=True)
        save(res)
        del copy
    res["registers"] = registers(index)
    res["copy_gbs"] = copy_bandwidth(cp)
    save(res)
    return res


def write_markdown(docs, path):
    gpus = sorted({d.get("gpu", "?") for d in docs})
    lines = [f"# search_beam_kernel vs search_fixed_kernel ({', '.join(gpus)})", "",
             "QPS at recall@10 >= 0.95, batch 10,000 (queries on the device); x hnswlib on all cores; x exact "
             "(torch); batch-1 end-to-end latency median / p99 (host queries); the fixed kernel's counters per "
             "query and row bytes/s during the batch-10k kernel.", "",
             "| dataset | contender | QPS @0.95 | x hnswlib | x exact | batch-1 ms (median / p99) | "
             "iterations | distances | GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in (d["result"] for d in docs):
        if "error" in r:
            lines.append(f"| {r['dataset']} | FAILED: {r['error']} | | | | | | | |")
            continue
        hn = qps_at_recall(r.get("hnswlib", []), TARGET)
        ex = r.get("exact", {}).get("qps")
        for label, c in r.get("contenders", {}).items():
            q = c.get("qps_at_target")
            b1 = c.get("batch1_at_target")
            cnt = c.get("counts") or {}
            lines.append(
                f"| {r['dataset']} ({r['n']:,} x {r['dim']}) | {label} | {q:,.0f} | "
                f"{q / hn:.1f}x | {q / ex:.1f}x | " if q and hn and ex else
                f"| {r['dataset']} | {label} | {'not reached' if not q else f'{q:,.0f}'} | | | ")
            lines[-1] += (f"{b1['end_to_end']['median_ms']:.3f} / {b1['end_to_end']['p99_ms']:.3f} | " if b1 else "n/a | ")
            gbs = cnt.get("row_bytes_per_s")
            lines[-1] += (f"{cnt['iterations']:.1f} | {cnt['distances']:.0f} | "
                          f"{'n/a' if gbs is None else f'{gbs / 1e9:.0f}'} |" if cnt else "| | |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="clustered,hard,minilm-debian")
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the generated sets")
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--ef-construction", type=int, default=64)
    p.add_argument("--build", default="gpu", choices=("gpu", "cpu", "auto"))
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="per dataset: no new contender or curve after this many seconds of contenders")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--markdown-only", action="store_true", help="rebuild kernel_ab.md from the JSON files")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.markdown_only:
        import cupy as cp

        head = {"machine": machine_info("hnswlib", "cupy-cuda12x", "cupy-cuda13x", "torch"),
                "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                "params": {"k": K, "M": 16, "ef_construction": args.ef_construction, "build": args.build,
                           "ef_sweep": EF_SWEEP, "batches": BATCHES, "seed": SEED, "n": args.n, "nq": args.nq}}
        for name in args.datasets.split(","):
            path = os.path.join(args.out, f"kernel_ab_{name}.json")

            def save(current, path=path):
                with open(path, "w") as fh:
                    json.dump(dict(head, result=current), fh, indent=1, default=float)

            try:
                run(name, args, save, args.budget_s)
            except Exception as exc:   # the next dataset still runs; the failure is in its JSON
                print(f"  {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                save({"dataset": name, "error": f"{type(exc).__name__}: {exc}"})
    docs = []
    for fname in sorted(os.listdir(args.out)):
        if fname.startswith("kernel_ab_") and fname.endswith(".json"):
            with open(os.path.join(args.out, fname)) as fh:
                docs.append(json.load(fh))
    write_markdown(docs, os.path.join(args.out, "kernel_ab.md"))


if __name__ == "__main__":
    main()
