"""Helpers shared by the tests and the benchmarks: datasets, exact k-NN, recall.

NumPy only (no CuPy, no gpuhnsw internals), so the oracle never shares code with what it checks.

Distances follow hnswlib's definitions:

=========  ==========================================================
``l2``     squared Euclidean distance, no square root
``ip``     ``1 - a.b``
``cosine`` ``1 - a.b`` on vectors scaled by ``1 / (|x| + 1e-30)``
=========  ==========================================================
"""
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["data_dir", "load_dataset", "exact_knn", "recall_at_k", "DATASETS"]

#: The datasets shipped under :func:`data_dir` (see its README.md).
DATASETS = ("siftsmall", "mnist", "minilm-debian")

_SPACES = ("l2", "ip", "cosine")


def data_dirs():
    """Where the shared dataset folder is looked for, in order: ``$GHNSW_DATA`` alone when set;
    else ``../shared/data`` beside the source tree this package runs from (an editable install),
    then ``../shared/data`` and ``shared/data`` from the working directory (an installed package
    run from the repository).  A list of :class:`pathlib.Path`."""
    env = os.environ.get("GHNSW_DATA")
    if env:
        return [Path(env)]
    cwd = Path.cwd()
    found = [Path(__file__).resolve().parents[2] / "shared" / "data", cwd.parent / "shared" / "data",
             cwd / "shared" / "data"]
    return [p for i, p in enumerate(found) if p not in found[:i]]


def data_dir():
    """The shared dataset folder: the first of :func:`data_dirs` that exists, else the first of
    them (a :class:`pathlib.Path` that may not exist)."""
    dirs = data_dirs()
    return next((d for d in dirs if d.is_dir()), dirs[0])


def load_dataset(name, n_base=None, n_queries=None):
    """Load one dataset as float32.

    Parameters
    ----------
    name : str
        A folder under :func:`data_dir`, e.g. ``"siftsmall"``, ``"mnist"``, ``"minilm-debian"``.
    n_base, n_queries : int, optional
        Keep only the first rows of the base / query set.

    Returns
    -------
    base : ndarray, float32 [n, d]
    queries : ndarray, float32 [nq, d]
    gt_l2, gt_cosine : ndarray, int32 [nq, 100], or None
        The shipped ground truth (ids into ``base``). None when the file is missing or when
        ``n_base`` cut the base set short (the shipped ids would be wrong for the slice);
        compute it with :func:`exact_knn` then.

    Raises
    ------
    FileNotFoundError
        The dataset folder or its base/queries file is missing.
    """
    folder = data_dir() / name
    base = np.load(folder / "base.npy", mmap_mode="r")
    queries = np.load(folder / "queries.npy", mmap_mode="r")
    sliced = n_base is not None and n_base < len(base)
    base = np.ascontiguousarray(base[:n_base], dtype=np.float32)
    queries = np.ascontiguousarray(queries[:n_queries], dtype=np.float32)

    def ground_truth(metric):
        path = folder / f"gt_{metric}.npy"
        if sliced or not path.exists():
            return None
        return np.ascontiguousarray(np.load(path, mmap_mode="r")[:n_queries], dtype=np.int32)

    return base, queries, ground_truth("l2"), ground_truth("cosine")



def clustered(n, dim, *, n_clusters=32, spread=0.15, seed=0):
    """Gaussian clusters around uniform centres: float32 [n, dim], no duplicate rows.

    Harder than uniform noise for a graph index and closer to real embeddings.
    """
    r = np.random.default_rng(seed)
    centres = r.random((n_clusters, dim), dtype=np.float32)
    which = r.integers(0, n_clusters, size=n)
    noise = r.standard_normal((n, dim), dtype=np.float32) * np.float32(spread)
    return np.ascontiguousarray(centres[which] + noise, dtype=np.float32)

def _normalise(x):
    """Rows scaled by 1 / (|x| + 1e-30), as hnswlib does for cosine (zero rows stay zero)."""
    return x / (np.sqrt(np.einsum("ij,ij->i", x, x)) + 1e-30)[:, None]


def _top_k_rows(dist, k):
    """Column indices of the k smallest entries of each row, ties broken by the smaller column.

    dist : float64 [rows, n]; returns int64 [rows, k].
    """
    kth = np.partition(dist, k - 1, axis=1)[:, k - 1]
    out = np.empty((dist.shape[0], k), dtype=np.int64)
    for r in range(dist.shape[0]):
        cand = np.flatnonzero(dist[r] <= kth[r])  # every tie at the cut-off, in id order
        order = np.lexsort((cand, dist[r, cand]))
        out[r] = cand[order[:k]]
    return out


def exact_knn(base, queries, k, space="l2", block_bytes=1 << 26):
    """Exact k nearest neighbours by brute force, in float64.

    Parameters
    ----------
    base : array_like [n, d]
    queries : array_like [nq, d]
    k : int
        0 <= k <= n.
    space : {"l2", "ip", "cosine"}
        hnswlib's distances (see the module docstring).
    block_bytes : int
        Rough size of one float64 block of the distance matrix (queries are processed in blocks).

    Returns
    -------
    ids : ndarray, int64 [nq, k]
        Row numbers into ``base``, nearest first; equal distances in ascending id order.
    dists : ndarray, float32 [nq, k]
        Their distances.
    """
    if space not in _SPACES:
        raise ValueError(f"space must be one of {_SPACES}, got {space!r}")
    b = np.asarray(base, dtype=np.float64)
    q_all = np.asarray(queries, dtype=np.float64)
    if b.ndim != 2 or q_all.ndim != 2 or b.shape[1] != q_all.shape[1]:
        raise ValueError(f"need base [n, d] and queries [nq, d], got {b.shape} and {q_all.shape}")
    n, nq = len(b), len(q_all)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    ids = np.empty((nq, k), dtype=np.int64)
    dists = np.empty((nq, k), dtype=np.float32)
    if k == 0 or nq == 0:
        return ids, dists

    if space == "cosine":
        b = _normalise(b)
    b_sq = np.einsum("ij,ij->i", b, b) if space == "l2" else None
    step = max(1, int(block_bytes // (8 * n)))
    for s in range(0, nq, step):
        q = q_all[s:s + step]
        if space == "cosine":
            q = _normalise(q)
        dot = q @ b.T
        if space == "l2":
            d = np.einsum("ij,ij->i", q, q)[:, None] + b_sq[None, :] - 2.0 * dot
            np.maximum(d, 0.0, out=d)
        else:
            d = 1.0 - dot
        top = _top_k_rows(d, k)
        ids[s:s + len(q)] = top
        dists[s:s + len(q)] = np.take_along_axis(d, top, axis=1)
    return ids, dists


def recall_at_k(found, truth, k):
    """Mean fraction of the true k nearest neighbours present among the first k found.

    Computed as sets per row (tie order does not matter; a label found twice counts once).

    Parameters
    ----------
    found : array_like of int [nq, >=k]
        e.g. the uint64 labels of ``knn_query`` (padding labels simply never match).
    truth : array_like of int [nq, >=k]
    k : int

    Returns
    -------
    float in [0, 1]
    """
    found = np.asarray(found)
    truth = np.asarray(truth)
    if found.ndim != 2 or truth.ndim != 2 or len(found) != len(truth):
        raise ValueError(f"need found [nq, k] and truth [nq, k], got {found.shape} and {truth.shape}")
    if k <= 0 or found.shape[1] < k or truth.shape[1] < k:
        raise ValueError(f"k={k} needs k columns in both, got {found.shape} and {truth.shape}")
    if len(found) == 0:
        return 1.0
    # int64 keeps uint64 labels distinct (a wrap-around is a bijection) where mixing uint64 with
    # int32 would promote to float64 and merge large labels.
    f = found[:, :k].astype(np.int64).tolist()
    t = truth[:, :k].astype(np.int64).tolist()
    hits = sum(len(set(a) & set(b)) for a, b in zip(f, t))
    return hits / (len(f) * k)


def machine_info(*packages):
    """What a benchmark ran on: CPU model, cores, load, platform, Python, and the versions of
    numpy, gpuhnsw and ``packages`` (distribution names; None where not installed)."""
    import datetime
    import importlib.metadata
    import os
    import platform

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    from . import __version__
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gpuhnsw": __version__,
    }
    info.update({name: version(name) for name in packages})
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info


def machine_line(machine):
    """The closing line of a benchmark's Markdown: the machine (``machine_info()``) and the date."""
    return f"Machine: {machine['cpu']}, {machine['cores']} cores (shared), {machine['date']}."


def save_results(out_dir, name, results, write_markdown, write_plot=None):
    """A benchmark's files in ``out_dir`` (made if missing): ``name.json`` (``results``, a
    JSON-able dict), ``name.md`` by ``write_markdown(results, path)`` and, given
    ``write_plot(results, path)``, ``name.png``.  Returns the path without its suffix."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, stem + ".md")
    if write_plot is not None:
        write_plot(results, stem + ".png")
    return stem
