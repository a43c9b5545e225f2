"""The ``gpuhnsw`` command line: build, query, knn-graph, bench, info.

::

    gpuhnsw build base.fvecs -o sift.idx --space l2 --M 16 --ef-construction 200
    gpuhnsw query sift.idx queries.fvecs -k 10 --ef 64 --labels L.npy --distances D.npy
    gpuhnsw knn-graph base.npy -k 15 -o graph.npz            # CSR (scipy.sparse.load_npz)
    gpuhnsw knn-graph base.npy -k 15 -o nbrs.npy --distances dists.npy
    gpuhnsw bench base.npy --queries q.npy --gt gt.npy -k 10 --ef 16,32,64,128 --plot bench.png
    gpuhnsw info sift.idx

Vectors are read from ``.npy`` (2-D numeric), ``.fvecs`` (float32), ``.bvecs`` (uint8) and
``.ivecs`` (int32; ground truth) files. Row ``i`` of the data gets label ``i``. Bad input (missing
or malformed file, wrong width, NaN, unusable device) prints one line to stderr and exits with
status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import tokenize

import numpy as np

from ._core import SPACES
from ._errors import DeviceError, IndexFileError
from ._io import bfindex, hnswlib_format, native
from ._surface import DEFAULT_SEED
from .knn_graph import AUTO_EXACT_LIMIT, METHODS

__all__ = ["main", "read_vectors"]

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


# --------------------------------------------------------------------------------------------------
# vector files
# --------------------------------------------------------------------------------------------------

_VECS = {".fvecs": np.dtype("<f4"), ".bvecs": np.dtype("u1"), ".ivecs": np.dtype("<i4")}



def read_vectors(path, *, limit=None):
    """Read a vector file as a 2-D array (``.npy`` memory-mapped; ``*vecs`` as their dtype).

    ``*vecs`` layout (TEXMEX): each vector is ``int32 dim`` followed by ``dim`` values.
    Every record must carry the same ``dim`` and the file size must be a whole number of records.
    ``limit`` keeps the first rows only. Raises :class:`CLIError` with the reason otherwise.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such file")
    if ext == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as exc:
            # NumPy reads the header with the tokenizer: unbalanced brackets raise TokenError
            raise CLIError(f"{path}: not a readable .npy file ({exc})") from None
        if arr.ndim != 2:
            raise CLIError(f"{path}: expected a 2-D array [n, dim], got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
            raise CLIError(f"{path}: expected a real numeric array, got dtype {arr.dtype}")
    elif ext in _VECS:
        dtype = _VECS[ext]
        size = os.path.getsize(path)
        if size < 4:
            raise CLIError(f"{path}: empty or truncated {ext} file ({size} bytes)")
        with open(path, "rb") as f:
            (dim,) = struct.unpack("<i", f.read(4))
        if dim <= 0 or dim > 1 << 20:
            raise CLIError(f"{path}: first record has dimension {dim}; not a {ext} file?")
        record = 4 + dim * dtype.itemsize
        if size % record:
            raise CLIError(f"{path}: size {size} is not a multiple of the record size {record} "
                           f"(dim {dim}); truncated or not a {ext} file")
        rec = np.memmap(path, dtype=np.dtype([("dim", "<i4"), ("v", dtype, (dim,))]), mode="r")
        dims = np.asarray(rec["dim"])
        if (dims != dim).any():
            bad = int(np.flatnonzero(dims != dim)[0])
            raise CLIError(f"{path}: record {bad} has dimension {int(dims[bad])}, record 0 has {dim}")
        arr = rec["v"]
    else:
        raise CLIError(f"{path}: unknown file type {ext!r} (use .npy, .fvecs, .bvecs or .ivecs)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CLIError(f"{path}: no vectors (shape {arr.shape})")
    if limit is not None:
        arr = arr[:limit]
    return arr


def _float_rows(path, *, limit=None, dim=None):
    """Vectors of ``path`` as C-contiguous float32, checked finite (and of width ``dim``)."""
    arr = read_vectors(path, limit=limit)
    if dim is not None and arr.shape[1] != dim:
        raise CLIError(f"{path}: vectors have dimension {arr.shape[1]}, the index has {dim}")
    x = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise CLIError(f"{path}: row {int(np.flatnonzero(~finite)[0])} holds NaN or infinity")
    return x


def _check_output(path):
    """An output path must name a file in an existing directory: checked before any work."""
    if path is None:
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{path}: directory {folder} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{path}: is a directory, not a file name")


def _write_npy(path, arr):
    """np.save through a temporary file and rename; any name but ``*.npy`` is refused (NumPy's
    bytes in a ``.csv`` or ``.txt`` would mislead whoever opens it)."""
    path = os.fspath(path)
    if not path.lower().endswith(".npy"):
        raise CLIError(f"{path}: this output is written as .npy; name it *.npy")
    _check_output(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# index files
# --------------------------------------------------------------------------------------------------

def index_header(path):
    """What kind of index ``path`` holds, from its header alone.

    Returns a dict with ``kind`` ('hnsw' or 'bruteforce'), ``format`` ('gpuhnsw' or 'hnswlib'),
    ``space`` (None where the format does not store it) and ``dim``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(max(native.HEADER_BYTES, hnswlib_format.HEADER_BYTES, 64))
    try:
        own, bf = native.peek(head), bfindex.bfindex_header(head)
    except IndexFileError as exc:
        raise CLIError(f"{path}: {exc}") from None
    if own is not None:
        return dict(kind="hnsw", format="gpuhnsw", space=own[0], dim=own[1])
    if bf is not None:
        return dict(kind="bruteforce", format="gpuhnsw", space=bf[0], dim=bf[1])
    dim = hnswlib_format.peek(head)
    if dim is not None:
        return dict(kind="hnsw", format="hnswlib", space=None, dim=dim)
    dim = bfindex.hnswlib_bfindex_dim(head, size)
    if dim is not None:
        return dict(kind="bruteforce", format="hnswlib", space=None, dim=dim)
    raise CLIError(f"{path}: not a gpuhnsw or hnswlib index file")


def _open_index(path, space, device):
    """Load the index at ``path``; ``space`` is needed for hnswlib files (they do not store it)."""
    from .bruteforce import BFIndex
    from .index import Index

    h = index_header(path)
    if h["space"] is not None and space is not None and space != h["space"]:
        raise CLIError(f"{path}: the index has space {h['space']!r}, --space says {space!r}")
    if h["space"] is None and space is None:
        raise CLIError(f"{os.fspath(path)} is an hnswlib file, which does not store its space: "
                       "pass --space l2, ip or cosine")
    space = h["space"] or space
    cls = Index if h["kind"] == "hnsw" else BFIndex
    index = cls(space, h["dim"], device=device)
    try:
        index.load_index(os.fspath(path))
    except IndexFileError as exc:
        raise CLIError(f"{os.fspath(path)}: {exc}") from None
    return index, h, space


# --------------------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------------------

def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def cmd_build(args):
    from .index import Index

    _check_output(args.output)
    data = _float_rows(args.data, limit=args.limit)
    n, dim = data.shape
    index = Index(args.space, dim, device=args.device)
    index.init_index(n, M=args.M, ef_construction=args.ef_construction, random_seed=args.seed)
    from ._progress import CLI_BUILD_MIN_ROWS, wanted

    progress = wanted(args.progress, n, CLI_BUILD_MIN_ROWS)
    t0 = time.perf_counter()
    index.add_items(data, np.arange(n, dtype=np.int64), num_threads=args.threads, progress=progress)
    took = time.perf_counter() - t0
    index.save_index(args.output, format=args.format)
    _log(f"built {n} x {dim} ({args.space}, M={args.M}, ef_construction={args.ef_construction}) "
         f"in {took:.2f} s ({n / max(took, 1e-9):,.0f} vectors/s); wrote {args.output} "
         f"({args.format} format)")
    return 0


def cmd_query(args):
    _check_output(args.labels)
    _check_output(args.distances)
    index, h, space = _open_index(args.index, args.space, args.device)
    queries = _float_rows(args.queries, limit=args.limit, dim=h["dim"])
    kw = {}
    if args.ef is not None:
        if h["kind"] != "hnsw":
            raise CLIError("--ef applies to HNSW indexes only (this is a brute-force index)")
        kw["ef"] = args.ef
    count = index.get_current_count() - getattr(index, "count_deleted", 0)
    if args.k > count:
        raise CLIError(f"-k {args.k} exceeds the {count} live elements of {args.index}")
    t0 = time.perf_counter()
    try:
        labels, dists = index.knn_query(queries, k=args.k, num_threads=args.threads, **kw)
    except RuntimeError as exc:
        if "contiguous" in str(exc):
            raise CLIError(f"fewer than k={args.k} results for some query: raise --ef") from None
        raise
    took = time.perf_counter() - t0
    written = [path for path, arr in ((args.labels, labels), (args.distances, dists)) if path]
    for path, arr in ((args.labels, labels), (args.distances, dists)):
        if path:
            _write_npy(path, arr)
    if not written:  # no output file: the results go to stdout, one query per line
        print("query\tlabels\tdistances")
        for i, (row_l, row_d) in enumerate(zip(labels, dists)):
            print(f"{i}\t{','.join(map(str, row_l.tolist()))}\t{','.join(f'{d:.6g}' for d in row_d.tolist())}")
    _log(f"{len(queries)} queries, k={args.k}, in {took:.3f} s ({len(queries) / max(took, 1e-9):,.0f} QPS)"
         + (f"; wrote {' and '.join(written)}" if written else ""))
    return 0


def cmd_knn_graph(args):
    from .knn_graph import knn_graph

    _check_output(args.output)
    _check_output(args.distances)
    data = _float_rows(args.data, limit=args.limit)
    n = data.shape[0]
    if not 1 <= args.k <= n - 1:
        raise CLIError(f"-k must be in [1, {n - 1}] for {n} vectors, got {args.k}")
    out = os.fspath(args.output)
    csr = out.lower().endswith(".npz")
    if not (csr or out.lower().endswith(".npy")):
        raise CLIError(f"{out}: the output must be .npz (CSR graph) or .npy (neighbour ids)")
    if csr and args.distances:
        raise CLIError("--distances goes with a .npy output; a .npz output holds both")
    t0 = time.perf_counter()
    neighbors, distances, info = knn_graph(
        data, args.k, space=args.space, method=args.method, device=args.device, M=args.M,
        ef_construction=args.ef_construction, ef=args.ef, num_threads=args.threads,
        progress=args.progress, random_seed=args.seed, return_info=True)
    took = time.perf_counter() - t0
    if csr:
        tmp = f"{out}.{os.getpid()}.tmp.npz"
        try:
            # scipy.sparse.save_npz's layout, so scipy.sparse.load_npz reads it
            np.savez(tmp, indices=neighbors.reshape(-1), indptr=np.arange(0, n * args.k + 1,
                     args.k, dtype=np.int64), format=np.array(b"csr"),
                     shape=np.array([n, n], dtype=np.int64), data=distances.reshape(-1))
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        _write_npy(out, neighbors)
        if args.distances:
            _write_npy(args.distances, distances)
    method = info["method"] + (" (chosen by --method auto)" if args.method == "auto" else "")
    _log(f"k-NN graph (method {method}, {info['device']}) of {n} x {data.shape[1]} ({args.space}), k={args.k}, "
         f"in {took:.2f} s; wrote {out}" + (f" and {args.distances}" if args.distances else ""))
    return 0


def _parse_efs(text):
    try:
        efs = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"--ef must be a comma-separated list of integers, got {text!r}") from None
    if not efs or min(efs) < 1:
        raise CLIError(f"--ef values must be >= 1, got {text!r}")
    return efs


def cmd_bench(args):
    from .exact import exact_search
    from .index import Index
    from .testing import recall_at_k

    efs = _parse_efs(args.ef)
    if args.plot:   # before the work, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib (pip install matplotlib)") from None
    opened = None
    if args.index:   # its space, where the file stores it, decides
        opened = _open_index(args.index, args.space, args.device)
        args.space = opened[2]
    elif args.space is None:
        args.space = "l2"   # building: l2 is the documented default
    base = _float_rows(args.data, limit=args.limit)
    if args.queries:
        queries = _float_rows(args.queries, limit=args.n_queries, dim=base.shape[1])
    else:  # hold out the last rows of the data as queries
        nq = min(args.n_queries or 100, base.shape[0] // 10)
        if nq < 1:
            raise CLIError(f"{args.data}: too few vectors to hold out queries; pass --queries")
        base, queries = base[:-nq], base[-nq:]
    n, dim = base.shape
    k = args.k
    if not 1 <= k <= n:
        raise CLIError(f"-k must be in [1, {n}], got {k}")
    if args.gt:
        gt = np.asarray(read_vectors(args.gt))
        if gt.shape[0] < len(queries) or gt.shape[1] < k:
            raise CLIError(f"{args.gt}: ground truth of shape {gt.shape} does not cover "
                           f"{len(queries)} queries x k={k}")
        if args.limit is not None:
            raise CLIError("--gt refers to the whole data set; it cannot be used with --limit")
        gt = gt[:len(queries), :k].astype(np.int64)
        if gt.min() < 0 or gt.max() >= n:
            raise CLIError(f"{args.gt}: ids outside [0, {n})")
        gt_source = args.gt
    else:
        t0 = time.perf_counter()
        gt, _ = exact_search(base, queries, k, args.space, device=args.device,
                             num_threads=args.threads)
        gt_source = f"exact search ({time.perf_counter() - t0:.2f} s)"
    if args.index:
        index, h, _ = opened
        if h["kind"] != "hnsw" or h["dim"] != dim:
            raise CLIError(f"{args.index}: need an HNSW index of dim {dim}")
        build_s = None
    else:
        index = Index(args.space, dim, device=args.device)
        index.init_index(n, M=args.M, ef_construction=args.ef_construction, random_seed=args.seed)
        t0 = time.perf_counter()
        index.add_items(base, np.arange(n, dtype=np.int64), num_threads=args.threads)
        build_s = time.perf_counter() - t0
    index.knn_query(queries[:10], k=k, num_threads=args.threads, ef=max(efs[0], k), pad=True)
    rows = []                                                       # (warmed up)
    for ef in efs:
        best = float("inf")
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            labels, _ = index.knn_query(queries, k=k, num_threads=args.threads, ef=max(ef, k),
                                        pad=True)
            best = min(best, time.perf_counter() - t0)
        rows.append(dict(ef=ef, recall=recall_at_k(labels, gt, k), qps=len(queries) / best,
                         ms_per_query=1e3 * best / len(queries)))
    result = dict(data=os.fspath(args.data), n=n, dim=dim, n_queries=len(queries), k=k,
                  space=args.space, M=args.M, ef_construction=args.ef_construction,
                  device=getattr(index, "device", args.device), threads=args.threads,
                  build_s=build_s, ground_truth=gt_source, rows=rows)
    print(f"{n} x {dim} ({args.space}), {len(queries)} queries, k={k}, ground truth: {gt_source}")
    if build_s is not None:
        print(f"build: M={args.M}, ef_construction={args.ef_construction}: {build_s:.2f} s")
    print(f"{'ef':>6} {'recall@' + str(k):>10} {'QPS':>12} {'ms/query':>10}")
    for r in rows:
        print(f"{r['ef']:>6} {r['recall']:>10.4f} {r['qps']:>12,.0f} {r['ms_per_query']:>10.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        _plot_bench(result, args.plot)
    return 0


def _plot_bench(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["recall"] for r in rows], [r["qps"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"ef={r['ef']}", (r["recall"], r["qps"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"recall@{result['k']}")
    ax.set_ylabel("queries per second")
    ax.set_yscale("log")
    ax.set_title(f"gpuhnsw {result['n']} x {result['dim']} ({result['space']}), "
                 f"M={result['M']}, device={result['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_info(args):
    from .bruteforce import BFIndex

    path = os.fspath(args.index)
    h = index_header(path)
    info = dict(file=path, file_bytes=os.path.getsize(path), kind=h["kind"], format=h["format"],
                space=h["space"] or "unknown (not stored in hnswlib files)", dim=h["dim"])
    if h["kind"] == "hnsw":
        try:
            state, ef, _ = native.read_index(path, space=h["space"] or "l2", dim=h["dim"])
        except IndexFileError as exc:
            raise CLIError(str(exc)) from None   # it names the file
        n = state["count"]
        levels = np.frombuffer(state["levels"], dtype=np.uint8)[:n]
        deleted = int(np.frombuffer(state["deleted"], dtype=np.uint8)[:n].sum())
        hist = np.bincount(levels, minlength=1) if n else np.zeros(1, dtype=np.int64)
        info.update(count=n, deleted=deleted, live=n - deleted, max_elements=state["max_elements"],
                    M=state["M"], ef_construction=state["ef_construction"],
                    ef=ef, max_level=state["max_level"], entry_point=state["entry_point"],
                    levels={int(lv): int(c) for lv, c in enumerate(hist)})
    else:
        bf = BFIndex(h["space"] or "l2", h["dim"], device="cpu")
        bf.load_index(path)   # its errors already name the file
        info.update(count=bf.get_current_count(), deleted=0, live=bf.get_current_count(),
                    max_elements=bf.get_max_elements())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        if key == "levels":
            value = ", ".join(f"{lv}: {c}" for lv, c in value.items())
        elif value is None:
            value = "-"
        print(f"{key:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------

def _seed(text):
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}")
    return v


def _positive(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto",
                        help="auto (GPU if CuPy sees one), cpu, cuda or cuda:N (default: auto)")
    common.add_argument("--threads", type=int, default=-1,
                        help="CPU threads; <= 0 uses every core (default: -1)")

    def space(p, default="l2"):
        p.add_argument("--space", choices=SPACES, default=default,
                       help=f"distance: squared L2, 1 - dot, 1 - cosine (default: {default})")

    def hnsw_params(p):
        p.add_argument("--M", type=_positive, default=16, help="links per node (default: 16)")
        p.add_argument("--ef-construction", type=_positive, default=200,
                       help="build beam width (default: 200)")
        p.add_argument("--seed", type=_seed, default=DEFAULT_SEED,
                       help=f"level seed, 0..2**64-1 (default: {DEFAULT_SEED})")

    def limit(p):
        p.add_argument("--limit", type=_positive, help="use only the first N vectors")

    parser = argparse.ArgumentParser(prog="gpuhnsw", description=__doc__.split("\n\n")[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"gpuhnsw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", parents=[common], help="build an HNSW index from vectors")
    p.add_argument("data", help="vectors: .npy, .fvecs or .bvecs")
    p.add_argument("-o", "--output", required=True, help="index file to write")
    space(p)
    hnsw_params(p)
    limit(p)
    p.add_argument("--format", choices=("gpuhnsw", "hnswlib"), default="gpuhnsw",
                   help="file format (default: gpuhnsw; hnswlib files load in hnswlib 0.8.0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on for large inputs on a terminal)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("query", parents=[common], help="k nearest neighbours of query vectors")
    p.add_argument("index", help="index file (gpuhnsw or hnswlib format, HNSW or BFIndex)")
    p.add_argument("queries", help="query vectors: .npy, .fvecs or .bvecs")
    p.add_argument("-k", type=_positive, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--ef", type=_positive, help="search beam width (default: the index's ef)")
    p.add_argument("--space", choices=SPACES,
                   help="required for hnswlib files, which do not store it (gpuhnsw files do)")
    p.add_argument("--labels", help=".npy output: uint64 labels [nq, k] (neither --labels nor "
                   "--distances: results are printed)")
    p.add_argument("--distances", help=".npy output: float32 distances [nq, k]")
    limit(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("knn-graph", parents=[common], help="k-NN graph of a data set")
    p.add_argument("data", help="vectors: .npy, .fvecs or .bvecs")
    p.add_argument("-k", type=_positive, default=10, help="neighbours per vector (default: 10)")
    p.add_argument("-o", "--output", required=True,
                   help="graph.npz (CSR, scipy.sparse.load_npz) or neighbors.npy (int64 [n, k])")
    p.add_argument("--distances", help="with a .npy output: float32 distances [n, k]")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help=f"auto (default): on the CPU exact while n * n * dim <= {AUTO_EXACT_LIMIT:.0e}, else nndescent; "
                        f"on a GPU the cheaper of the two by the library's cost estimates; exact: tiled brute force; "
                        "nndescent: NN-descent from random-projection trees; hnsw: an HNSW index queried for "
                        "every vector (the output names the method that ran)")
    p.add_argument("--ef", type=_positive, help="hnsw method: query beam width")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on for large inputs on a terminal)")
    space(p)
    hnsw_params(p)
    limit(p)
    p.set_defaults(func=cmd_knn_graph)

    p = sub.add_parser("bench", parents=[common], help="recall / QPS sweep over ef")
    p.add_argument("data", help="base vectors: .npy, .fvecs or .bvecs")
    p.add_argument("--queries", help="query vectors (default: hold out the last data rows)")
    p.add_argument("--n-queries", type=_positive, help="use (or hold out) this many queries")
    p.add_argument("--gt", help="ground-truth ids [nq, >=k] (.npy or .ivecs); default: exact search")
    p.add_argument("--index", help="benchmark this index file instead of building one")
    p.add_argument("-k", type=_positive, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--ef", default="10,20,40,80,160,320", help="comma-separated ef values")
    p.add_argument("--repeat", type=_positive, default=1, help="best of N timings per ef")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a recall/QPS plot (PNG) here (needs matplotlib)")
    p.add_argument("--space", choices=SPACES,
                   help="distance (default: l2 when building; gpuhnsw index files store it, hnswlib "
                   "files need it)")
    hnsw_params(p)
    limit(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="what an index file holds")
    p.add_argument("index", help="index file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    """Entry point of the ``gpuhnsw`` console script; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        msg = str(exc)
    except (IndexFileError, DeviceError) as exc:
        msg = str(exc)
    except FileNotFoundError as exc:
        msg = f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    except PermissionError as exc:
        msg = f"{exc.filename}: permission denied"
    except OSError as exc:      # a directory as the output path, a full disk, ...
        msg = f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    except ValueError as exc:   # invalid data or parameters found by the library
        msg = str(exc)
    except KeyboardInterrupt:
        print("gpuhnsw: interrupted", file=sys.stderr)
        return 130
    print(f"gpuhnsw {args.command}: error: {msg.splitlines()[0] if msg else 'failed'}",
          file=sys.stderr)
    return EXIT_BAD_INPUT
