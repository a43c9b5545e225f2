"""gpuhnsw's main job in one command: build an index, answer a batch of queries, check the answers.

    python -m gpuhnsw.demo                        # minilm-debian, else siftsmall, else generated data
    python -m gpuhnsw.demo --dataset siftsmall --ef 32
    python -m gpuhnsw.demo --data /path/to/shared/data
    python -m gpuhnsw.demo --dataset generated --n 20000 --device cpu

Real data comes from the shared dataset folder: ``--data DIR``, else ``$GHNSW_DATA``, else
``../shared/data`` beside the source tree or the working directory (``gpuhnsw.testing.data_dirs()``);
without it a clustered set is generated, and the demo says where it looked.  The index runs
queries on the GPU when CuPy sees one (``device="auto"``) and on the CPU engine otherwise; the
output names the device, the build time, the query throughput and recall@10 against exact search.
"""
import argparse
import os
import sys
import time

import numpy as np

from . import Index, __version__
from ._progress import stderr_is_tty
from ._validate import cpu_count
from .device.arrays import cuda_status, device_name
from .testing import clustered, data_dir, data_dirs, exact_knn, load_dataset, recall_at_k

K = 10
M = 16
EF_CONSTRUCTION = 200
SPACES = {"minilm-debian": "cosine", "siftsmall": "l2", "generated": "l2"}
PREFERRED = ("minilm-debian", "siftsmall")  # the first one present is the default
GENERATED_SHAPE = (20_000, 1_000, 64)  # base rows, queries, dim


def _present(name):
    folder = data_dir() / name
    return (folder / "base.npy").exists() and (folder / "queries.npy").exists()


def load(name, n):
    """(base float32 [n, d], queries float32 [nq, d], exact top-K ids [nq, K] or None)."""
    if name == "generated":
        n_base, n_queries, dim = GENERATED_SHAPE
        n_base = n or n_base
        data = clustered(n_base + n_queries, dim, seed=0)
        return data[:n_base], data[n_base:], None
    base, queries, gt_l2, gt_cosine = load_dataset(name, n_base=n)
    truth = gt_cosine if SPACES[name] == "cosine" else gt_l2  # None when n sliced the base
    return base, queries, truth


def describe_device(index, requested):
    if index.device == "cpu":
        why = "" if requested == "cpu" else f"; no GPU used: {cuda_status()[1]}"
        return f"cpu (C engine, {cpu_count()} cores{why})"
    ordinal = int(requested.split(":")[1]) if ":" in requested else 0
    return f"cuda:{ordinal} ({device_name(ordinal)})"


def show_texts(name, labels):
    """For minilm-debian: the first query's text and its three nearest base texts."""
    path = data_dir() / name / "texts.txt"
    if name != "minilm-debian" or not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        texts = f.read().split("\n")
    n_base_full = np.load(data_dir() / name / "base.npy", mmap_mode="r").shape[0]
    print(f'\nquery 0: "{texts[n_base_full]}"')
    for rank, label in enumerate(labels[0, :3], 1):
        print(f'  {rank}. "{texts[int(label)]}"')


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gpuhnsw.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(SPACES),
                        help="default: the first of " + ", ".join(PREFERRED) + " present, else generated")
    parser.add_argument("--n", type=int, help="base rows to index (default: the whole set)")
    parser.add_argument("--ef", type=int, default=64, help="query beam width (default 64)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--data", metavar="DIR",
                        help="the shared dataset folder (default: $GHNSW_DATA, else ../shared/data "
                             "beside the source tree or the working directory)")
    args = parser.parse_args(argv)
    if args.data is not None:
        if not os.path.isdir(args.data):
            parser.error(f"--data {args.data}: no such folder")
        os.environ["GHNSW_DATA"] = os.path.abspath(args.data)   # data_dir() reads it
    if args.n is not None and args.n < K:
        parser.error(f"--n must be at least {K}")
    if args.ef < 1:
        parser.error("--ef must be positive")
    name = args.dataset or next((d for d in PREFERRED if _present(d)), "generated")
    looked = ", ".join(str(d) for d in data_dirs())
    if name != "generated" and not _present(name):
        parser.error(f"dataset {name!r} not found (looked in {looked}); pass --data DIR or set GHNSW_DATA")
    if args.dataset is None and name == "generated":
        print(f"no shared dataset found (looked in {looked}; pass --data DIR or set GHNSW_DATA): "
              "using a generated set", flush=True)

    space = SPACES[name]
    base, queries, truth = load(name, args.n)
    print(f"gpuhnsw {__version__} demo: {name} ({space}), {base.shape[0]:,} x {base.shape[1]} base, "
          f"{queries.shape[0]:,} queries", flush=True)
    if truth is None:
        start = time.perf_counter()
        truth = exact_knn(base, queries, K, space)[0]
        print(f"exact search (NumPy, for the recall check): {time.perf_counter() - start:.1f} s", flush=True)

    index = Index(space, base.shape[1], device=args.device)
    print(f"device: {describe_device(index, args.device)}", flush=True)
    start = time.perf_counter()
    index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION)
    print(f"building the graph: {len(base):,} inserts on {index.num_threads} threads ...", flush=True)
    index.add_items(base, progress=stderr_is_tty())
    build = time.perf_counter() - start
    print(f"build: {build:.2f} s ({len(base) / build:,.0f} inserts/s, M={M}, "
          f"ef_construction={EF_CONSTRUCTION}, {index.num_threads} threads)", flush=True)

    start = time.perf_counter()
    index.knn_query(queries[:1], k=K, ef=args.ef)  # a GPU syncs and compiles its kernels here
    first = time.perf_counter() - start
    start = time.perf_counter()
    labels, _ = index.knn_query(queries, k=K, ef=args.ef)
    seconds = time.perf_counter() - start
    if index.device != "cpu":
        print(f"first query (graph upload + kernel compile): {first:.2f} s")
    print(f"search: {len(queries):,} queries, k={K}, ef={args.ef}: {seconds:.3f} s = "
          f"{len(queries) / seconds:,.0f} QPS")
    print(f"recall@{K} against exact search: {recall_at_k(labels, truth, K):.4f}")
    show_texts(name, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
