"""Replay of the GPU search over candidate level-0 graphs: the serial steps and the work each graph
needs per query for recall@10 = 0.95 (issue 18, item 1).

The search is the kernel's (``kernels/search.cu``, beam mode) as its NumPy reference runs it
(``gpuhnsw._reference.beam_search_reference``, held equal to the C search by
``tests/test_reference.py``): greedy descent through the index's upper levels, then the
fixed-size beam on level 0 expanding ``search_width`` parents per iteration, over any
``[n, D]`` level-0 adjacency (``ReferenceGraph(state, level0=...)``). It counts, per query: level-0
iterations (serial steps), upper-level hops (lists read in the descent, also serial), distance
evaluations (descent and level 0) and bytes read::

    bytes = distances x row bytes (float32 rows padded to 16 bytes, the mirror's default storage)
          + lists expanded x D x 4 (a fixed-degree padded row per expansion, as the kernel of
            issue 17 reads it; D = 32 for HNSW level 0, whose rows are M0 = 32 wide)
          + hops x (1 + M) x 4 (the upper-level blocks)

The visited set of the reference is exact; the kernel may forget visited slots when its hash is
reset and recompute them, so the distances here are a lower bound of the kernel's.

Graphs (every one searched with the same upper levels and entry point; see GRAPHS): HNSW level 0 as
built; level 0 plus its nearest reverse edges; CAGRA-style rank-based detour pruning
(``gpuhnsw._graph_reference``) over level 0 U reverse edges U a hashed sample of two-hop
neighbours, at degree 24, 32, 48 and 64 with the forward/reverse split varied; and, where the base
is small enough for exact k-NN, the same pruning over exact k-NN lists (CAGRA's own input).

ef at the target recall: each graph and width runs the ef grid EF_GRID upwards until recall@10
reaches the target, then bisects the integers between the last grid point below it and the first
at or above it, so the reported ef is the smallest integer reaching the target (taking recall as
non-decreasing in ef between two grid points); the targets are 0.95 (the issue's) and 0.99 (where the
easy sets' ef is no longer near its floor, ef >= k = 10, which bounds iterations at width 1 from
below: every entry of the final beam is expanded).
Every figure is a per-query distribution over the same queries: mean, p50 and p99.

The CPU search: each graph is loaded into a C core (``Index(state)``, level 0 replaced, ``M``
raised to D / 2 where D > 32) and queried with the width-1 ef of the replay (the C search's own
order), ``knn_query(k=10, num_threads=1)``, all graphs interleaved, median of ``--repeats``.

Datasets: siftsmall, mnist, minilm-debian (shared data, their shipped ground truth), ``synthetic``
(the GPU benchmark's recipe: 1000 centres uniform in [0, 1)^128, Gaussian noise of standard
deviation 0.08, NumPy's generator) and ``synthetic-hard`` (standard Gaussian rows of intrinsic
dimension 32 in a random 32-dimensional subspace of R^128: recall 0.95 needs ef near 190 in the
C search at 200,000 rows); their ground truth by float64 brute force
(``gpuhnsw.testing.exact_knn``). HNSW: M=16, ef_construction=200, seed 0, built on one thread, so
every figure here is reproducible (``tests/test_search_graph.py`` rebuilds siftsmall's).

Writes ``graph_replay.json`` (machine, parameters, every measurement), ``graph_replay.md`` (tables;
a ``## Choice`` section already in the file is kept) and ``graph_replay.png`` (iterations against
recall) into ``--out``. Deterministic counts: the machine's load changes only the CPU timings.

    nice python benchmarks/graph_replay.py --out benchmarks/results            # all sets (hours)
    python benchmarks/graph_replay.py --datasets siftsmall --queries 50 --out /tmp/gr   # smoke test
"""
import argparse
import json
import os
import statistics
import time

import numpy as np

import gpuhnsw
from gpuhnsw import testing
from gpuhnsw._graph_reference import level0_csr, pair_distances, search_graph_reference
from gpuhnsw._reference import INVALID, ReferenceGraph, beam_search_reference
from gpuhnsw.exact import exact_search
from gpuhnsw.testing import exact_knn, load_dataset, machine_info, machine_line, recall_at_k

K = 10
M, EF_CONSTRUCTION, SEED = 16, 200, 0
BUILD_THREADS = 1               # HNSW builds: one thread is bit-for-bit reproducible (tests rely on it)
TARGETS = (0.95, 0.99)
WIDTHS = (1, 2, 4, 8)
EF_GRID = (10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)
MIN_BATCH_SECONDS = 0.2        # CPU timings: a query batch repeated for at least this long
KNN_MAX_ROWS = 100_000          # exact k-NN candidates only up to this many base rows
METRICS = ("iterations", "hops", "distances", "bytes")

# name -> how the level-0 graph is made: "hnsw" (as built), "rev" (level 0, then its reverse edges
# nearest first, to `degree`: gpuhnsw._graph_reference), "detour" (CAGRA's rank-based detour
# pruning to `degree`, `forward` of them kept before the reverse edges, over the 2 x degree nearest
# of level 0 U reverse U two-hop neighbours, see detour_candidates), "knn" (the same pruning over
# exact k-NN lists of 2 x degree)
GRAPHS = {
    "hnsw": dict(kind="hnsw"),
    "hnsw+rev 32": dict(kind="rev", degree=32),
    "hnsw+rev 48": dict(kind="rev", degree=48),
    "hnsw+rev 64": dict(kind="rev", degree=64),
    "detour 32/16": dict(kind="detour", degree=32, forward=16),
    "detour 32/32": dict(kind="detour", degree=32, forward=32),
    "detour 48/24": dict(kind="detour", degree=48, forward=24),
    "detour 64/32": dict(kind="detour", degree=64, forward=32),
    "detour 32/16 random 2-hop": dict(kind="detour", degree=32, forward=16, two_hop="random"),
    "detour 32/16 no 2-hop": dict(kind="detour", degree=32, forward=16, two_hop="none"),
    "knn 32/16": dict(kind="knn", degree=32, forward=16),
}

DATASETS = {"siftsmall": "l2", "mnist": "l2", "minilm-debian": "cosine", "synthetic": "l2",
            "synthetic-hard": "l2"}


# ---------------------------------------------------------------------------------------------
# data and the HNSW index

def synthetic(n, nq):
    """The GPU benchmark's clustered recipe (benchmarks/gpu_search.py), drawn by NumPy."""
    x = testing.clustered(n + nq, 128, n_clusters=1000, spread=0.08, seed=SEED)
    return np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])


def synthetic_hard(n, nq, intrinsic=32, dim=128):
    """Standard Gaussian rows of dimension `intrinsic` in a random subspace of R^dim."""
    r = np.random.default_rng(SEED)
    basis = np.linalg.qr(r.standard_normal((dim, intrinsic)))[0].T.astype(np.float32)  # [intrinsic, dim]
    x = r.standard_normal((n + nq, intrinsic)).astype(np.float32) @ basis
    return np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])


def load(name, nq, n_synth, n_hard, cache):
    """(space, base float32 [n, d], queries float32 [nq, d], ground truth int64 [nq, K])."""
    space = DATASETS[name]
    if name in ("synthetic", "synthetic-hard"):
        n = n_synth if name == "synthetic" else n_hard
        base, queries = synthetic(n, nq) if name == "synthetic" else synthetic_hard(n, nq)
        path = cache and os.path.join(cache, f"{name}-{n}-{nq}-gt.npy")
        if path and os.path.exists(path):
            gt = np.load(path)
        else:
            gt = exact_knn(base, queries, K, space)[0]
            if path:
                np.save(path, gt)
        return space, base, queries, gt
    base, queries, gt_l2, gt_cos = load_dataset(name, n_queries=nq)
    gt = gt_cos if space == "cosine" else gt_l2
    return space, base, queries, gt[:, :K].astype(np.int64)


def hnsw_state(name, space, base, cache, threads=BUILD_THREADS):
    """The HNSW index's state dict (built, or loaded from the cache) and its build seconds."""
    path = cache and os.path.join(cache, f"{name}-{len(base)}-M{M}-efc{EF_CONSTRUCTION}-s{SEED}-t{threads}.bin")
    index = gpuhnsw.Index(space, base.shape[1], device="cpu")
    if path and os.path.exists(path):
        index.load_index(path)
        return index.__getstate__()[0], None
    t0 = time.perf_counter()
    index.init_index(len(base), M=M, ef_construction=EF_CONSTRUCTION, random_seed=SEED)
    index.add_items(base, np.arange(len(base)), num_threads=threads)
    seconds = time.perf_counter() - t0
    if path:
        index.save_index(path)
    return index.__getstate__()[0], seconds


# ---------------------------------------------------------------------------------------------
# graphs: "rev" is gpuhnsw._graph_reference (what Core.build_search_graph builds); the CAGRA-style
# detour-pruned graphs below exist only here

def _mix64(x):
    """splitmix64's finaliser on uint64 arrays (NN-descent's mix64, gpuhnsw/csrc/nndescent.c)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _ranked(g, rows, ids, width):
    """Per row, its `width` nearest distinct ids among the (rows, ids) pairs (int64 [p] each),
    ranked by (distance, id), self and deleted slots dropped: uint32 [n, width], 0xFFFFFFFF after
    the last."""
    n = g.n
    keep = (rows != ids) & ~g.deleted[ids] & ~g.deleted[rows]
    pairs = np.unique(rows[keep] * n + ids[keep])
    rows, ids = pairs // n, pairs % n
    order = np.lexsort((ids, pair_distances(g, rows, ids), rows))
    rows, ids = rows[order], ids[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    ok = rank < width
    out = np.full((n, width), INVALID, dtype=np.uint32)
    out[rows[ok], rank[ok]] = ids[ok]
    return out


def detour_candidates(g, width, two_hop):
    """Each slot's `width` nearest among level 0 U reverse edges U two-hop neighbours (uint32
    [n, width], ranked). two_hop: "join" (the first 8 entries of the lists of its 8 nearest, from
    the level 0 U reverse ranking: a local join, as NN-descent's), "random" (`width / 2` hashed
    samples: a random level-0 neighbour's random neighbour) or "none"."""
    n = g.n
    indptr, l0 = level0_csr(g)
    src = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    rows, ids = np.concatenate((src, l0)), np.concatenate((l0, src))
    if two_hop == "random":
        deg = np.diff(indptr)
        x = np.repeat(np.arange(n, dtype=np.int64), width // 2)
        j = np.tile(np.arange(width // 2, dtype=np.uint64), n)
        x, j = x[deg[x] > 0], j[deg[x] > 0]
        h = _mix64(_mix64(_mix64(np.uint64(SEED)) ^ x.astype(np.uint64)) ^ j)
        a = l0[indptr[x] + (h & np.uint64(0xFFFFFFFF)).astype(np.int64) % deg[x]]
        ok = deg[a] > 0
        x, a, h = x[ok], a[ok], h[ok]
        b = l0[indptr[a] + (h >> np.uint64(32)).astype(np.int64) % deg[a]]
        rows, ids = np.concatenate((rows, x)), np.concatenate((ids, b))
    cand = _ranked(g, rows, ids, width)
    if two_hop == "join":
        t = u = 8
        x = np.repeat(np.arange(n, dtype=np.int64), t * u)
        a = np.repeat(cand[:, :t], u, axis=1).ravel()
        j = np.tile(np.arange(u), n * t)
        ok = a != INVALID
        x, b = x[ok], cand[a[ok].astype(np.int64), j[ok]]
        valid = cand != INVALID
        rows = np.concatenate((np.repeat(np.arange(n, dtype=np.int64), valid.sum(axis=1)), x[b != INVALID]))
        ids = np.concatenate((cand[valid], b[b != INVALID])).astype(np.int64)
        cand = _ranked(g, rows, ids, width)
    return cand


def knn_candidates(g, width):
    """Exact k-NN lists (self excluded), nearest first: uint32 [n, width]."""
    ids, _ = exact_search(g.vectors, g.vectors, width, "l2" if g.space == "l2" else "ip", exclude_self=True)
    return ids.astype(np.uint32)


def detour_counts(cand, block_elems=1 << 21):
    """CAGRA's rank-based detour count of every candidate (int32 [n, K]): for y = cand[x, p], the
    z = cand[x, i], i < p, whose own list holds y at a rank r < p."""
    n, K = cand.shape
    ext = np.vstack((cand.astype(np.int64), np.full((1, K), INVALID, np.int64)))
    ext[ext == INVALID] = n                                  # row n: no candidates
    counts = np.zeros((n, K), dtype=np.int32)
    ranks = np.arange(K)
    block = max(1, block_elems // (K * K))
    for s in range(0, n, block):
        mine = ext[s:min(s + block, n)]                      # [B, K] x's candidates
        B = len(mine)
        off = np.arange(B, dtype=np.int64)[:, None] * (n + 1)
        key = (mine + off).ravel()
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        theirs = (ext[mine] + off[:, :, None]).ravel()       # [B, K(i), K(r)] z's candidates
        at = np.searchsorted(sorted_key, theirs).clip(max=len(sorted_key) - 1)
        p = np.where(sorted_key[at] == theirs, order[at] % K, -1).reshape(B, K, K)   # y's rank in x's list
        valid = (ext[mine] < n) & (p > ranks[None, :, None]) & (p > ranks[None, None, :])
        flat = (np.arange(B)[:, None, None] * K + p)[valid]
        counts[s:s + B] += np.bincount(flat, minlength=B * K).reshape(B, K).astype(np.int32)
    counts[cand == INVALID] = 0
    return counts


def detour_prune(cand, degree, forward):
    """CAGRA's graph from ranked candidates (uint32 [n, K]): the candidates stably sorted by detour
    count; row = the first `forward`, then the reverse edges of the first `degree` of every row
    (by (rank in the source's list, source)), then the rest; no duplicates, `degree` at most
    (uint32 [n, degree], 0xFFFFFFFF after the entries)."""
    n, K = cand.shape
    key = np.where(cand != INVALID, detour_counts(cand), np.iinfo(np.int32).max)
    pruned = np.take_along_axis(cand, np.argsort(key, axis=1, kind="stable"), axis=1)
    k = min(degree, K)
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    rank = np.tile(np.arange(k, dtype=np.int64), n)
    dst = pruned[:, :k].astype(np.int64).ravel()
    ok = dst != INVALID
    src, rank, dst = src[ok], rank[ok], dst[ok]
    o = np.lexsort((src, rank, dst))
    rev, rev_ptr = src[o].tolist(), np.searchsorted(dst[o], np.arange(n + 1))
    out = np.full((n, degree), INVALID, dtype=np.uint32)
    pruned_l = pruned.tolist()
    for x in range(n):
        row = [s for s in pruned_l[x][:forward] if s != INVALID]
        seen = set(row)
        for s in rev[rev_ptr[x]:rev_ptr[x + 1]] + pruned_l[x][forward:]:
            if len(row) == degree:
                break
            if s != INVALID and s not in seen:
                seen.add(s)
                row.append(s)
        out[x, :len(row)] = row
    return out


def make_graph(g, spec):
    """(level-0 adjacency uint32 [n, D], or None for HNSW level 0 as stored; D; build seconds)."""
    t0 = time.perf_counter()
    kind = spec["kind"]
    if kind == "hnsw":
        return None, g.M0, 0.0
    degree = spec["degree"]
    if kind == "rev":
        adj = search_graph_reference(g, degree)
    elif kind == "detour":
        adj = detour_prune(detour_candidates(g, 2 * degree, spec.get("two_hop", "join")), degree, spec["forward"])
    elif kind == "knn":
        adj = detour_prune(knn_candidates(g, 2 * degree), degree, spec["forward"])
    else:
        raise ValueError(f"unknown graph kind {kind!r}")
    return adj, degree, time.perf_counter() - t0


def graph_stats(g, adj):
    """Filled degree (mean, min), slots with no in-edge, slots not reachable over level 0 from the
    entry point."""
    if adj is None:
        deg = np.minimum(g.degree0, g.M0).astype(np.int64)
        indptr, ids = level0_csr(g)
    else:
        valid = adj != INVALID
        deg = valid.sum(axis=1)
        indptr = np.concatenate(([0], np.cumsum(deg)))
        ids = adj[valid].astype(np.int64)
    indeg = np.bincount(ids, minlength=g.n)
    seen = np.zeros(g.n, bool)
    seen[g.entry_point] = True
    frontier = np.array([g.entry_point])
    while frontier.size:                      # breadth-first, one level of the search tree at a time
        lens = deg[frontier]
        at = np.repeat(indptr[frontier] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        nxt = np.unique(ids[at])
        nxt = nxt[~seen[nxt]]
        seen[nxt] = True
        frontier = nxt
    return {"degree_mean": float(deg.mean()), "degree_min": int(deg.min()), "no_in_edge": int((indeg == 0).sum()),
            "unreachable": int(g.n - seen.sum())}


# ---------------------------------------------------------------------------------------------
# the replay

def summary(values):
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


class Replay:
    """Runs one graph at one width, memoised per ef."""

    def __init__(self, g, degree, queries, gt, labels, width):
        self.g, self.degree, self.queries, self.gt, self.labels, self.width = g, degree, queries, gt, labels, width
        self.row_bytes = 4 * (-(-g.dim // 4) * 4)
        self.runs = {}

    def __call__(self, ef):
        if ef not in self.runs:
            slots, _, _, c = beam_search_reference(self.g, self.queries, K, ef, search_width=self.width,
                                                   return_counts=True)
            found = np.where(slots >= 0, self.labels[np.maximum(slots, 0)].astype(np.int64), -1)
            per_query = {
                "iterations": c["iterations"], "hops": c["hops"],
                "distances": c["distances"] + c["upper_distances"],
                "bytes": (c["distances"] + c["upper_distances"]) * self.row_bytes
                + c["expanded"] * self.degree * 4 + c["hops"] * (1 + self.g.M) * 4,
            }
            self.runs[ef] = (recall_at_k(found, self.gt, K), per_query)
        return self.runs[ef]

    def min_ef(self, target):
        """The smallest integer ef reaching `target` (grid, then bisection), or None."""
        below = None
        for ef in EF_GRID:
            if self(ef)[0] >= target:
                break
            below = ef
        else:
            return None
        lo, hi = (below if below is not None else K - 1), ef
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self(mid)[0] >= target:
                hi = mid
            else:
                lo = mid
        return hi

    def curve(self, until):
        """Grid points until recall `until`: ef, recall and the mean of each metric."""
        out = []
        for ef in EF_GRID:
            recall, pq = self(ef)
            out.append({"ef": ef, "recall": recall, **{m: float(np.mean(pq[m])) for m in METRICS}})
            if recall >= until:
                break
        return out


def state_with_level0(state, adj):
    """A copy of `state` whose level 0 is `adj` (uint32 [n, D], valid entries first); M raised to
    ceil(D / 2) where needed, the upper blocks padded to the new M."""
    n, D = adj.shape
    M_new = max(int(state["M"]), -(-D // 2))
    links = np.full((n, 2 * M_new), INVALID, np.uint32)
    links[:, :D] = adj
    upper = np.frombuffer(state["upper"], np.uint32).reshape(-1, 1 + int(state["M"]))
    blocks = np.full((len(upper), 1 + M_new), INVALID, np.uint32)
    blocks[:, :upper.shape[1]] = upper
    return dict(state, M=M_new, links0=links.tobytes(), degree0=(adj != INVALID).sum(1).astype(np.uint32).tobytes(),
                upper=blocks.tobytes())


def cpu_search(state, graphs, queries, gt, repeats):
    """{graph: {target: {ef, recall, qps}}}: the C search over each graph at its width-1 replay ef
    for each target, 1 thread, all runs interleaved, median QPS over `repeats`."""
    runs = []
    for name, (adj, efs) in graphs.items():
        index = gpuhnsw.Index(state if adj is None else state_with_level0(state, adj), device="cpu")
        for target, ef in efs.items():
            if ef is not None:
                labels, _ = index.knn_query(queries, k=K, ef=ef, num_threads=1)
                runs.append((name, target, index, ef, recall_at_k(labels.astype(np.int64), gt, K), []))
    for _ in range(repeats):
        for _, _, index, ef, _, times in runs:
            batches, t0 = 0, time.perf_counter()
            while batches == 0 or time.perf_counter() - t0 < MIN_BATCH_SECONDS:
                index.knn_query(queries, k=K, ef=ef, num_threads=1)
                batches += 1
            times.append((time.perf_counter() - t0) / batches)
    out = {}
    for name, target, _, ef, recall, times in runs:
        out.setdefault(name, {})[target] = {"ef": ef, "recall": recall, "qps": len(queries) / statistics.median(times)}
    return out


def dataset_key(name, n):
    """The results' name of a dataset: generated sets carry their size (``synthetic-1m``)."""
    if name not in ("synthetic", "synthetic-hard"):
        return name
    return f"{name}-{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{name}-{n // 1000}k"


def run_dataset(name, args):
    space, base, queries, gt = load(name, args.queries, args.n_synth, args.n_hard, args.cache)
    print(f"{name}: {base.shape[0]} x {base.shape[1]} ({space}), {len(queries)} queries", flush=True)
    state, build_s = hnsw_state(name, space, base, args.cache, args.build_threads)
    g = ReferenceGraph(state)
    labels = np.frombuffer(state["labels"], np.uint64)
    res = {"space": space, "n": int(base.shape[0]), "dim": int(base.shape[1]), "nq": int(len(queries)),
           "hnsw_build_s": build_s, "build_threads": args.build_threads, "graphs": {}}
    adjs = {}
    for gname in args.graphs:
        spec = GRAPHS[gname]
        if spec["kind"] == "knn" and len(base) > KNN_MAX_ROWS:
            continue
        adj, degree, seconds = make_graph(g, spec)
        gg = g if adj is None else ReferenceGraph(state, level0=adj)
        entry = {"spec": spec, "degree": degree, "build_s_numpy": seconds, **graph_stats(g, adj), "widths": {}}
        for w in args.widths:
            replay = Replay(gg, degree, queries, gt, labels, w)
            row = {"curve": replay.curve(max(args.targets)), "targets": {}}
            for target in args.targets:
                ef = replay.min_ef(target)
                at = {"ef": ef}
                if ef is not None:
                    recall, pq = replay(ef)
                    at.update(recall=recall, **{m: summary(pq[m]) for m in METRICS})
                row["targets"][str(target)] = at
                print(f"  {gname:26s} w={w} @{target}: " + ("not reached" if ef is None else f"ef {ef}, " +
                      ", ".join(f"{m} {at[m]['mean']:.1f}" for m in METRICS)), flush=True)
            entry["widths"][str(w)] = row
        res["graphs"][gname] = entry
        if "1" in entry["widths"]:
            adjs[gname] = (adj, {t: r["ef"] for t, r in entry["widths"]["1"]["targets"].items()})
    if args.repeats:
        res["cpu"] = cpu_search(state, adjs, queries, gt, args.repeats)
        for gname, by_target in res["cpu"].items():
            for target, c in by_target.items():
                print(f"  CPU {gname:26s} @{target} ef {c['ef']}: recall {c['recall']:.3f}, {c['qps']:.0f} QPS",
                      flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# output

def change(a, b):
    return f"{100 * (a / b - 1):+.0f}%"


def write_markdown(results, path):
    keep = ""
    if os.path.exists(path):
        text = open(path).read()
        at = text.find("\n## Choice")
        keep = text[at:] if at >= 0 else ""
    p = results["params"]
    lines = ["# Search-graph replay (CPU)", "",
             "The GPU kernel's search (beam mode) replayed in NumPy by `benchmarks/graph_replay.py` over each "
             f"level-0 graph, with the index's upper levels; recall@{K} on each dataset's first queries; HNSW "
             f"M={p['M']}, ef_construction={p['ef_construction']}, seed {p['seed']}. ef: the smallest integer "
             "reaching the target (grid, then bisection). Per query: level-0 iterations (serial steps), "
             "upper-level hops (lists read in the descent), distance evaluations (descent + level 0), KiB read "
             "(float32 rows padded to 16 B, D x 4 B per expanded list, (1 + M) x 4 B per upper list); "
             "mean (p50 / p99). \"vs hnsw\": change of the means of iterations and distances against HNSW "
             "level 0 at the same width and target. Graph: filled degree (mean), slots without an in-edge / "
             "slots unreachable over level 0 from the entry point.", ""]
    lines += summary_tables(results)
    for name, d in results["datasets"].items():
        lines += [f"## {name} ({d['n']:,} x {d['dim']}, {d['space']}, {d['nq']} queries; HNSW built on "
                  f"{d['build_threads']} thread(s))", ""]
        for target in map(str, p["targets"]):
            if not any(target in row["targets"] for e in d["graphs"].values() for row in e["widths"].values()):
                lines += [f"Recall {target}: not run.", ""]
                continue
            lines += [f"Recall {target}:", "",
                      "| graph | degree | no in-edge / unreachable | width | ef | iterations | hops | distances | "
                      "KiB read | vs hnsw: iterations, distances |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            base = d["graphs"].get("hnsw", {}).get("widths", {})
            for gname, e in d["graphs"].items():
                for w, row in e["widths"].items():
                    r = row["targets"].get(target)
                    if r is None:
                        continue
                    head = f"| {gname} | {e['degree_mean']:.1f} | {e['no_in_edge']} / {e['unreachable']} | {w} |"
                    if r["ef"] is None:
                        lines.append(f"{head} not reached (ef <= {EF_GRID[-1]}) | | | | | |")
                        continue
                    fmt = lambda m, s=1.0: f"{r[m]['mean'] / s:.1f} ({r[m]['p50'] / s:.0f} / {r[m]['p99'] / s:.0f})"
                    ref = base.get(w, {}).get("targets", {}).get(target, {})
                    vs = (f"{change(r['iterations']['mean'], ref['iterations']['mean'])}, "
                          f"{change(r['distances']['mean'], ref['distances']['mean'])}") if ref.get("ef") else ""
                    lines.append(f"{head} {r['ef']} | {fmt('iterations')} | {fmt('hops')} | {fmt('distances')} | "
                                 f"{fmt('bytes', 1024.0)} | {vs} |")
            lines.append("")
        if d.get("cpu"):
            lines += ["CPU search (the C engine, 1 thread, at the width-1 ef of each target; median of "
                      f"{p['repeats']} interleaved runs; machine shared):", "",
                      "| graph | target | ef | recall | QPS | vs hnsw |", "|---|---|---|---|---|---|"]
            ref = d["cpu"].get("hnsw", {})
            for gname, by_target in d["cpu"].items():
                for target, c in by_target.items():
                    vs = change(c["qps"], ref[target]["qps"]) if target in ref else ""
                    lines.append(f"| {gname} | {target} | {c['ef']} | {c['recall']:.3f} | {c['qps']:,.0f} | {vs} |")
            lines.append("")
    lines += [machine_line(results["machine"]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + keep)


def summary_tables(results):
    """Per target and width (1 and 4): every graph's change of mean iterations / distances against
    HNSW level 0 on every dataset, and the target of issue 18 (at least 30% fewer iterations at no
    more distances) marked."""
    names = list(results["datasets"])
    graphs = list(dict.fromkeys(g for d in results["datasets"].values() for g in d["graphs"] if g != "hnsw"))
    lines = ["## Summary: change of mean level-0 iterations / distance evaluations against HNSW level 0", "",
             "**bold**: at least 30% fewer iterations at no more distances; n/r: target not reached; "
             "blank: not run.", ""]
    for target in map(str, results["params"]["targets"]):
        for w in ("1", "4"):
            lines += [f"Recall {target}, search width {w}:", "", "| graph | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)]
            for gname in graphs:
                cells = []
                for name in names:
                    d = results["datasets"][name]["graphs"]
                    r = d.get(gname, {}).get("widths", {}).get(w, {}).get("targets", {}).get(target)
                    h = d.get("hnsw", {}).get("widths", {}).get(w, {}).get("targets", {}).get(target)
                    if r is None or h is None:
                        cells.append("")
                    elif r["ef"] is None or h["ef"] is None:
                        cells.append("n/r")
                    else:
                        it = r["iterations"]["mean"] / h["iterations"]["mean"] - 1
                        di = r["distances"]["mean"] / h["distances"]["mean"] - 1
                        cell = f"{100 * it:+.0f}% / {100 * di:+.0f}%"
                        cells.append(f"**{cell}**" if it <= -0.3 and di <= 0 else cell)
                lines.append(f"| {gname} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def write_plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    widths = [w for w in ("1", "4") if int(w) in results["params"]["widths"]]
    fig, axes = plt.subplots(len(widths), len(names), figsize=(4.2 * len(names), 3.8 * len(widths)), squeeze=False)
    for col, name in enumerate(names):
        for row, w in enumerate(widths):
            ax = axes[row][col]
            lo = 1.0
            for gname, e in results["datasets"][name]["graphs"].items():
                c = e["widths"].get(w, {}).get("curve", [])
                style = "k-o" if gname == "hnsw" else ("-" if e["spec"]["kind"] == "rev" else "--")
                ax.plot([p["recall"] for p in c], [p["iterations"] for p in c], style, label=gname, markersize=3,
                        lw=1.5 if e["spec"]["kind"] == "rev" else 1)
                lo = min([lo] + [p["recall"] for p in c])
            for target in results["params"]["targets"]:
                ax.axvline(target, color="grey", lw=0.5)
            ax.set_xlim(max(0.5, lo - 0.01), 1.0)
            ax.set_yscale("log")
            ax.set_title(f"{name}, search width {w}", fontsize=9)
            ax.set_xlabel(f"recall@{K}")
            ax.set_ylabel("level-0 iterations per query (mean)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--graphs", default=",".join(GRAPHS), help="names from GRAPHS, comma-separated")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--queries", type=int, default=500, help="queries per dataset (the first ones)")
    ap.add_argument("--n-synth", type=int, default=200_000, help="rows of the synthetic set")
    ap.add_argument("--n-hard", type=int, default=200_000, help="rows of the synthetic-hard set")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="recall@10 targets")
    ap.add_argument("--repeats", type=int, default=5, help="CPU search timings per graph (0: none)")
    ap.add_argument("--build-threads", type=int, default=BUILD_THREADS,
                    help="HNSW build threads (more than one: not reproducible)")
    ap.add_argument("--cache", help="folder for HNSW indexes and synthetic ground truth between runs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--merge", help="JSON results of earlier runs (comma-separated, same parameters): write "
                    "their datasets (and graphs of a dataset split over runs) together into --out, replaying "
                    "nothing")
    args = ap.parse_args()
    if args.merge:
        merged = None
        for path in args.merge.split(","):
            with open(path) as f:
                part = json.load(f)
            if merged is None:
                merged = part
                continue
            for key, d in part["datasets"].items():
                into = merged["datasets"].setdefault(key, d)
                for what in ("graphs", "cpu"):   # a dataset split over runs: the first run's entries win
                    for gname, entry in d.get(what, {}).items():
                        into.setdefault(what, {}).setdefault(gname, entry)
        write_outputs(merged, args.out)
        return
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.graphs = [x for x in args.graphs.split(",") if x]
    args.widths = [int(w) for w in args.widths.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    for d in args.datasets:
        if d not in DATASETS:
            ap.error(f"unknown dataset {d!r}")
    for x in args.graphs:
        if x not in GRAPHS:
            ap.error(f"unknown graph {x!r}")
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    results = {"machine": machine_info("matplotlib"),
               "params": {"M": M, "ef_construction": EF_CONSTRUCTION, "seed": SEED, "k": K, "targets": args.targets,
                          "widths": args.widths, "queries": args.queries, "ef_grid": list(EF_GRID),
                          "repeats": args.repeats, "graphs": {x: GRAPHS[x] for x in args.graphs}},
               "datasets": {}}
    json_path = os.path.join(args.out, "graph_replay.json")
    for name in args.datasets:
        res = run_dataset(name, args)
        results["datasets"][dataset_key(name, res["n"])] = res
        with open(json_path, "w") as f:   # after every dataset: a killed run keeps what it measured
            json.dump(results, f, indent=1)
    write_outputs(results, args.out)


def write_outputs(results, out):
    testing.save_results(out, "graph_replay", results, write_markdown, write_plot)
    print(f"wrote graph_replay.json, .md, .png into {out}")


if __name__ == "__main__":
    main()
