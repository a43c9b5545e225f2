"""GPU search against its peers on one GPU machine (run it on a lent device; it needs CuPy and a GPU).

Per dataset, in one run on one machine:

- gpuhnsw on the GPU: recall@10 and QPS over an ef sweep at batch 1, 100 and 10,000 (queries already
  on the device, results left there: no host round trip is timed), and batch-1 latency;
- peers: hnswlib 0.8.0 on every CPU core, gpuhnsw's own CPU path on every core, and exact GPU
  search (CuPy matmul + top-k, ``gpuhnsw.exact.exact_search(device="cuda")``);
- memory bandwidth: the device's measured copy bandwidth (device-to-device copy of 1 GiB, bytes read
  plus written) against what the distance kernel achieves on random slot lists;
- sync cost: bytes and milliseconds of a sync after inserting 1 % more points (and what moved:
  whole rows, level-0 lists, upper blocks), against a full upload (a fresh copy of the index);
- batch-1 latency, phase by phase, at the smallest ef reaching recall 0.95: the whole
  ``knn_query``, the sync with nothing to do, input validation on the device, the search launch
  (host time to enqueue), the kernel (CUDA events), launch plus the read-back of found/status;
- the search kernel's knobs at batch 1 and 10,000: ``search_width`` 2 and 4 besides 1, and fp16
  storage (``gpu_storage="float16"``) at batch 10,000.

Datasets: mnist and minilm-debian from the shared data (``GHNSW_DATA`` points at a copy carried to
the device), and ``synthetic-1m``: 1,000,000 x 128 float32 generated on the device by
``cupy.random.default_rng(SEED)``: 1000 cluster centres uniform in [0, 1)^128, each point a centre
plus Gaussian noise of standard deviation 0.08 (10,000 queries drawn the same way).

Writes ``gpu_search.json`` (machine, GPU name, every measurement), ``gpu_search.md`` and
``gpu_search.png`` (recall-QPS at batch 10,000 per dataset) into ``--out``.

    python benchmarks/gpu_search.py --out benchmarks/results
    python benchmarks/gpu_search.py --datasets synthetic-1m --n-synth 200000 --quick
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
from gpuhnsw.exact import exact_search  # noqa: E402
from gpuhnsw.testing import load_dataset, machine_info, recall_at_k  # noqa: E402

M, EF_CONSTRUCTION, K = 16, 200, 10
EF_SWEEP = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256)
BATCHES = (1, 100, 10_000)
SEED = 0
TARGET = 0.95
SPACES = {"mnist": "l2", "minilm-debian": "cosine", "synthetic-1m": "l2"}


def synthetic(cp, n, nq, dim=128, clusters=1000, spread=0.08):
    """Clustered data generated on the device (see the module docstring): host float32 copies."""
    rng = cp.random.default_rng(SEED)
    centres = rng.random((clusters, dim), dtype=cp.float32)
    which = rng.integers(0, clusters, size=n + nq)
    x = centres[which] + rng.standard_normal((n + nq, dim), dtype=cp.float32) * cp.float32(spread)
    x = cp.asnumpy(x)
    return np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])


def timed(cp, fn, min_seconds=0.2):
    """Best seconds per call of fn() (device work included), repeating short calls."""
    best = float("inf")
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while True:
            fn()
            cp.cuda.Device().synchronize()
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / reps)
    return best


def gpu_curve(cp, index, q_dev, truth, batch, search_width=1):
    """recall and QPS over the ef sweep at one batch size; batch 1 also gives the median latency."""
    nq = len(truth) if batch > 1 else min(len(truth), 300)
    out = []
    for ef in EF_SWEEP:
        labels = cp.asnumpy(index.knn_query(q_dev[:nq], k=K, ef=ef, search_width=search_width)[0])  # warm
        recall = recall_at_k(labels, truth[:nq], K)
        if batch == 1:
            lat = []
            for i in range(nq):
                t = time.perf_counter()
                index.knn_query(q_dev[i:i + 1], k=K, ef=ef, search_width=search_width)
                cp.cuda.Device().synchronize()
                lat.append(time.perf_counter() - t)
            lat = np.array(lat)
            out.append({"ef": ef, "recall": recall, "qps": 1.0 / lat.mean(), "latency_ms_median": 1e3 * np.median(lat),
                        "latency_ms_p99": 1e3 * np.percentile(lat, 99)})
            continue
        chunks = [q_dev[i:i + batch] for i in range(0, nq, batch)]
        sec = timed(cp, lambda: [index.knn_query(c, k=K, ef=ef, search_width=search_width) for c in chunks])
        out.append({"ef": ef, "recall": recall, "qps": nq / sec})
    return out


def cpu_curve(index_or_hnswlib, queries, truth):
    out = []
    for ef in EF_SWEEP:
        index_or_hnswlib.set_ef(ef)
        index_or_hnswlib.knn_query(queries[:100], k=K, num_threads=-1)
        start = time.perf_counter()
        labels, _ = index_or_hnswlib.knn_query(queries, k=K, num_threads=-1)
        sec = time.perf_counter() - start
        out.append({"ef": ef, "recall": recall_at_k(labels, truth, K), "qps": len(queries) / sec})
    return out


def latency_breakdown(cp, index, q_dev, ef, reps=200):
    """Median milliseconds of each phase of a batch-1 GPU query at `ef` (see the module docstring)."""
    from gpuhnsw.search.gpu import device_matrix

    mirror, dim, beam = index._gpu.mirror, index.dim, max(ef, K)
    start, stop = cp.cuda.Event(), cp.cuda.Event()

    def median_ms(fn, device_time=False):
        fn()                                             # warm
        times = []
        for i in range(reps):
            q = q_dev[i % len(q_dev):i % len(q_dev) + 1]
            cp.cuda.Device().synchronize()
            if device_time:
                start.record()
                fn(q)
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop))
                continue
            t = time.perf_counter()
            fn(q)
            times.append(1e3 * (time.perf_counter() - t))
        return float(np.median(times))

    def first(fn):
        return lambda q=q_dev[:1]: fn(q)

    out = {
        "ef": ef,
        "knn_query_ms": median_ms(first(lambda q: (index.knn_query(q, k=K, ef=ef),
                                                   cp.cuda.Device().synchronize()))),
        "sync_nothing_dirty_ms": median_ms(first(lambda q: mirror.sync())),
        "validate_on_device_ms": median_ms(first(lambda q: device_matrix(q, dim))),
        "search_enqueue_ms": median_ms(first(lambda q: mirror.search(q, K, beam))),
        "search_kernel_ms": median_ms(first(lambda q: mirror.search(q, K, beam)), device_time=True),
        "search_and_readback_ms": median_ms(first(lambda q: cp.asnumpy(mirror.search(q, K, beam)[2]))),
    }
    print(f"  batch-1 latency phases (ms, medians of {reps}): {out}", flush=True)
    return out


def copy_bandwidth(cp, nbytes=1 << 30):
    """The device's measured copy bandwidth in GB/s (device-to-device, bytes read plus written)."""
    src = cp.empty(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    return 2 * src.nbytes / timed(cp, lambda: cp.copyto(dst, src)) / 1e9


def distance_bandwidth(cp, index, queries, nq=1000, c=4096):
    """GB/s of vector rows the distance kernel reads for random slot lists [nq, c]."""
    mirror = index._gpu.mirror
    slots = cp.random.default_rng(1).integers(0, mirror.count, size=(nq, c)).astype(cp.uint32)
    q = cp.asarray(queries[:nq])
    row_bytes = mirror.stride * (4 if mirror.storage == "float32" else 2)
    return len(q) * c * row_bytes / timed(cp, lambda: mirror.distances(q, slots)) / 1e9


def sync_costs(index, base):
    """A full upload (a fresh copy of `index`: every row goes up) and the sync after inserting 1 %
    more points, near the data, into that copy (so `index` keeps the queries' ground truth)."""
    copy = gpuhnsw.Index(index, device="cuda")
    first = copy.sync()
    extra = max(1, len(base) // 100)
    rng = np.random.default_rng(SEED)
    new = base[rng.integers(0, len(base), extra)] + rng.standard_normal((extra, base.shape[1])).astype(np.float32) * 1e-3
    copy.resize_index(len(base) + extra)
    copy.add_items(new, np.arange(len(base), len(base) + extra), num_threads=-1)
    delta = copy.sync()
    out = {"full_upload": {"bytes": first.bytes, "ms": 1e3 * first.seconds, "rows": first.rows},
           "sync_after_1pct": {"bytes": delta.bytes, "ms": 1e3 * delta.seconds, "rows": delta.rows,
                               "link_rows": delta.link_rows, "upper_blocks": delta.upper_blocks,
                               "share_of_full_upload": delta.bytes / max(1, first.bytes)}}
    print(f"  sync: {out}", flush=True)
    return out


def knobs(cp, index, q_dev, truth, res, save, deadline):
    """The search kernel's knobs (diagnostics, least important last): search_width 2 and 4 at
    batch 1 and 10,000, fp16 storage at batch 10,000, distance teams of 8 and 16 lanes at batch 1
    and 10,000."""
    from gpuhnsw.device import launch

    big = str(BATCHES[-1])

    def late(what):
        if time.perf_counter() < deadline:
            return False
        print(f"  {what}: skipped (--budget-s spent)", flush=True)
        return True

    for width in (2, 4):
        if late(f"search_width {width}"):
            return
        curves = res.setdefault("gpu_search_width", {})[str(width)] = {
            str(b): gpu_curve(cp, index, q_dev, truth, b, width) for b in (1, BATCHES[-1])}
        lat = [p["latency_ms_median"] for p in curves["1"] if p["recall"] >= TARGET]
        print(f"  search_width {width}: QPS at 0.95 (batch 10k) {qps_at_recall(curves[big], TARGET)}, "
              f"batch-1 latency at 0.95 {min(lat, default=None)} ms", flush=True)
        save()
    if late("float16 storage"):
        return
    half = gpuhnsw.Index(index, device="cuda", gpu_storage="float16")
    res["gpu_float16"] = {big: gpu_curve(cp, half, q_dev, truth, BATCHES[-1])}
    print(f"  float16 storage: QPS at 0.95 (batch 10k) {qps_at_recall(res['gpu_float16'][big], TARGET)}", flush=True)
    del half
    save()
    default_team = launch.team_size
    for team in (8, 16):   # a fresh copy per team: its mirror chooses its launches anew
        if late(f"distance team {team}"):
            return
        launch.team_size = lambda dim, storage="float32", team=team: team
        try:
            copy = gpuhnsw.Index(index, device="cuda")
            curves = res.setdefault("gpu_team", {})[str(team)] = {
                str(b): gpu_curve(cp, copy, q_dev, truth, b) for b in (1, BATCHES[-1])}
        finally:
            launch.team_size = default_team
        lat = [p["latency_ms_median"] for p in curves["1"] if p["recall"] >= TARGET]
        print(f"  distance team {team} (default {default_team(index.dim)}): QPS at 0.95 (batch 10k) "
              f"{qps_at_recall(curves[big], TARGET)}, batch-1 latency at 0.95 {min(lat, default=None)} ms", flush=True)
        save()


def run(name, n_synth, quick, save, deadline=float("inf")):
    """Every measurement of one dataset into a dict; ``save(res)`` after each step (a run cut short
    by its time limit keeps what it measured); the diagnostics start only before `deadline`
    (``time.perf_counter()`` seconds)."""
    import cupy as cp
    import hnswlib

    space = SPACES[name]
    if name == "synthetic-1m":
        base, queries = synthetic(cp, n_synth, 1000 if quick else 10_000)
    else:
        base, queries, _, _ = load_dataset(name, n_queries=1000 if quick else None)
    print(f"== {name}: base {base.shape}, queries {queries.shape}, {space}", flush=True)
    res = {"dataset": name, "space": space, "n": len(base), "nq": len(queries), "dim": base.shape[1]}

    start = time.perf_counter()
    truth, _ = exact_search(base, queries, K, space, device="cuda")
    cp.cuda.Device().synchronize()
    res["exact_gpu"] = {"seconds": time.perf_counter() - start}
    sec = timed(cp, lambda: exact_search(base, queries, K, space, device="cuda"), min_seconds=0)
    res["exact_gpu"].update(qps=len(queries) / sec, recall=1.0)
    print(f"  exact GPU search: {len(queries) / sec:,.0f} QPS", flush=True)

    index = gpuhnsw.Index(space, base.shape[1], device="cuda")
    index.init_index(len(base), M=M, ef_construction=EF_CONSTRUCTION)
    start = time.perf_counter()
    index.add_items(base, num_threads=-1)
    res["build_gpuhnsw_s"] = time.perf_counter() - start
    index.sync()
    res.update(sync_costs(index, base))
    save(res)

    peer = hnswlib.Index(space, base.shape[1])
    peer.init_index(len(base), M=M, ef_construction=EF_CONSTRUCTION)
    start = time.perf_counter()
    peer.add_items(base, num_threads=-1)
    res["build_hnswlib_s"] = time.perf_counter() - start
    print(f"  build: gpuhnsw {res['build_gpuhnsw_s']:.1f} s, hnswlib {res['build_hnswlib_s']:.1f} s", flush=True)

    q_dev = cp.asarray(queries)
    res["gpu"] = {str(b): gpu_curve(cp, index, q_dev, truth, b) for b in BATCHES}
    print(f"  GPU QPS at 0.95: {({b: qps_at_recall(c, TARGET) for b, c in res['gpu'].items()})}", flush=True)
    at95 = [p for p in res["gpu"]["1"] if p["recall"] >= TARGET]
    res["latency_phases"] = latency_breakdown(cp, index, q_dev, at95[0]["ef"] if at95 else EF_SWEEP[-1])
    res["cpu_gpuhnsw"] = cpu_curve(gpuhnsw.Index(index, device="cpu"), queries, truth)
    res["hnswlib"] = cpu_curve(peer, queries, truth)
    res["copy_gbs"], res["distance_gbs"] = copy_bandwidth(cp), distance_bandwidth(cp, index, queries)

    big = res["gpu"][str(BATCHES[-1])]
    res["summary"] = {
        "gpu_qps_at_0.95_batch10000": qps_at_recall(big, TARGET),
        "hnswlib_qps_at_0.95": qps_at_recall(res["hnswlib"], TARGET),
        "cpu_gpuhnsw_qps_at_0.95": qps_at_recall(res["cpu_gpuhnsw"], TARGET),
        "exact_gpu_qps": res["exact_gpu"]["qps"],
        "batch1_latency_ms_at_0.95": min((p["latency_ms_median"] for p in res["gpu"]["1"] if p["recall"] >= TARGET),
                                         default=None),
    }
    print(f"  summary: {res['summary']}", flush=True)
    save(res)
    knobs(cp, index, q_dev, truth, res, lambda: save(res), deadline)
    return res


def write_markdown(results, gpu_name, path):
    lines = [f"# GPU search ({gpu_name})", "",
             "| dataset | GPU QPS @0.95 (batch 10k) | x hnswlib (all cores) | x gpuhnsw CPU | x exact GPU | "
             "batch-1 latency @0.95 | distance GB/s / copy GB/s | 1% sync bytes / full upload |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        g = s["gpu_qps_at_0.95_batch10000"]

        def ratio(peer):
            return f"{g / peer:.1f}x" if g and peer else "n/a"

        lat = s["batch1_latency_ms_at_0.95"]
        lines.append(f"| {r['dataset']} ({r['n']:,} x {r['dim']}) | {g:,.0f} | {ratio(s['hnswlib_qps_at_0.95'])} | "
                     f"{ratio(s['cpu_gpuhnsw_qps_at_0.95'])} | {ratio(s['exact_gpu_qps'])} | "
                     f"{'n/a' if lat is None else f'{lat:.3f} ms'} | {r['distance_gbs']:.0f} / {r['copy_gbs']:.0f} | "
                     f"{100 * r['sync_after_1pct']['share_of_full_upload']:.2f} % |" if g else
                     f"| {r['dataset']} | recall 0.95 not reached | | | | | | |")
    lines += ["", "Targets (H100, batch 10,000, recall@10 >= 0.95): on the 1M set >= 1,000,000 QPS, >= 30x hnswlib "
              "on all cores, faster than exact GPU search; batch-1 latency <= 0.3 ms; a 1% insert syncs <= 3% "
              "of a full upload's bytes.", "",
              "Diagnostics: batch-1 phases at the first ef reaching 0.95 (medians, ms: whole query / sync with "
              "nothing dirty / validation / search enqueue / kernel / search + read-back), QPS @0.95 at batch 10k "
              "and batch-1 latency @0.95 with search_width 2 and 4, and with distance teams of 8 and 16 lanes, QPS "
              "@0.95 at batch 10k with fp16 storage, what the 1% sync moved (whole rows / level-0 lists / upper "
              "blocks).", "",
              "| dataset | batch-1 phases (ms) | width 2 | width 4 | fp16 | team 8 | team 16 | 1% sync rows / lists / upper |",
              "|---|---|---|---|---|---|---|---|"]

    def knob(curves):
        if curves is None:
            return "skipped"
        qps = qps_at_recall(curves[str(BATCHES[-1])], TARGET)
        lat = min((p["latency_ms_median"] for p in curves.get("1", []) if p["recall"] >= TARGET), default=None)
        return ("n/a" if qps is None else f"{qps:,.0f} QPS") + ("" if lat is None else f", {lat:.3f} ms")

    for r in results:
        ph, sy = r["latency_phases"], r["sync_after_1pct"]
        phases = " / ".join(f"{ph[name]:.3f}" for name in ("knn_query_ms", "sync_nothing_dirty_ms",
                                                           "validate_on_device_ms", "search_enqueue_ms",
                                                           "search_kernel_ms", "search_and_readback_ms"))
        widths = [knob(r.get("gpu_search_width", {}).get(w)) for w in ("2", "4")]
        teams = [knob(r.get("gpu_team", {}).get(t)) for t in ("8", "16")]
        lines.append(f"| {r['dataset']} | ef {ph['ef']}: {phases} | {widths[0]} | {widths[1]} | "
                     f"{knob(r.get('gpu_float16'))} | {teams[0]} | {teams[1]} | "
                     f"{sy['rows']:,} / {sy['link_rows']:,} / {sy['upper_blocks']:,} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        for label, curve in [(f"GPU batch {b}", r["gpu"][str(b)]) for b in BATCHES] + [
                ("gpuhnsw CPU", r["cpu_gpuhnsw"]), ("hnswlib (all cores)", r["hnswlib"])]:
            ax.plot([p["recall"] for p in curve], [p["qps"] for p in curve], marker="o", label=label)
        ax.axhline(r["exact_gpu"]["qps"], color="gray", linestyle="--", label="exact GPU")
        ax.set(title=f"{r['dataset']} ({r['n']:,} x {r['dim']})", xlabel="recall@10", ylabel="queries / s",
               yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="mnist,minilm-debian,synthetic-1m")
    p.add_argument("--n-synth", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="1,000 queries per dataset")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--budget-s", type=float, default=90.0,
                   help="start no diagnostic (search_width, fp16, team curves) after this many seconds "
                        "(default 90: device_check.sh's bench stage has 120 s)")
    args = p.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    import cupy as cp

    gpu_name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    machine = machine_info("hnswlib", "cupy-cuda12x", "cupy-cuda13x")
    os.makedirs(args.out, exist_ok=True)
    results = []

    def save(current):   # the JSON so far (the Markdown table and the plot need complete results)
        with open(os.path.join(args.out, "gpu_search.json"), "w") as f:
            json.dump({"machine": machine, "gpu": gpu_name, "params": {
                       "M": M, "ef_construction": EF_CONSTRUCTION, "k": K, "ef_sweep": EF_SWEEP, "batches": BATCHES,
                       "synthetic_seed": SEED}, "results": results + [current]}, f, indent=1, default=float)

    for name in args.datasets.split(","):
        results.append(run(name, args.n_synth, args.quick, save, deadline))
    write_markdown(results, gpu_name, os.path.join(args.out, "gpu_search.md"))
    write_plot(results, os.path.join(args.out, "gpu_search.png"))


if __name__ == "__main__":
    main()
