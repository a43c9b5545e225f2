"""Every SIMD path (chosen at run time, overridable with GHNSW_SIMD) gives the same distances, for every
storage, against a float64 reference."""
import base64
import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import json, sys, numpy as np, gpuhnsw
from gpuhnsw import _core
rng = np.random.default_rng(3)
out = {"simd": _core.simd}
for space in ("l2", "ip", "cosine"):
    for dim in (1, 3, 4, 7, 8, 13, 16, 31, 32, 33, 100, 128):
        base = rng.standard_normal((200, dim)).astype(np.float32)
        q = rng.standard_normal((5, dim)).astype(np.float32)
        ix = gpuhnsw.Index(space, dim, device="cpu")
        ix.init_index(200, M=8)
        ix.add_items(base, num_threads=1)
        labels, dists = ix.knn_query(q, k=10, ef=200)
        out[f"{space}-{dim}"] = [labels.tolist(), dists.tolist()]
print(json.dumps(out))
"""


def run(level):
    env = dict(os.environ, GHNSW_SIMD=level)
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout)


def exact(space, base, q):
    if space == "cosine":
        base = base / (np.linalg.norm(base, axis=1, keepdims=True) + 1e-30)
        q = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-30)
    if space == "l2":
        return ((q[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    return 1.0 - q.astype(np.float64) @ base.T.astype(np.float64)


def test_every_simd_path_agrees_with_numpy():
    portable = run("portable")
    assert portable["simd"] == "portable"
    others = [run(level) for level in ("avx2", "avx512")]
    rng = np.random.default_rng(3)
    for key, (labels, dists) in ((k, v) for k, v in portable.items() if k != "simd"):
        space, dim = key.split("-")
        dim = int(dim)
        base = rng.standard_normal((200, dim)).astype(np.float32)
        q = rng.standard_normal((5, dim)).astype(np.float32)
        ref = exact(space, base, q)
        got = np.take_along_axis(ref, np.asarray(labels, dtype=np.int64), axis=1)
        np.testing.assert_allclose(np.asarray(dists), got, rtol=1e-4, atol=1e-4, err_msg=key)
        for other in others:
            np.testing.assert_allclose(np.asarray(other[key][1]), np.asarray(dists), rtol=1e-4, atol=1e-4,
                                       err_msg=f"{key} on {other['simd']}")


def test_unknown_simd_request_falls_back_to_best_available():
    assert run("nonsense")["simd"] in LEVELS


LEVELS = ("portable", "avx2", "avx512", "avx512vnni")

# Every kernel of the compressed storages on one index per (storage, space, dim): query-to-row
# distances as a search scores them (Core.distances), row-to-row as insertion does (pair_distances),
# and the stored rows (export_state) to decode in NumPy.  Values span magnitudes and signs, with an
# offset far from the origin for l2 (the int8 offsets keep the sums of the order of the spread).
STORAGE_SCRIPT = r"""
import base64, json, numpy as np
from gpuhnsw import _core
rng = np.random.default_rng(5)
out = {"simd": _core.simd}
for storage in ("float16", "int8"):
    for space in ("l2", "ip", "cosine"):
        for dim in (1, 3, 8, 15, 16, 17, 31, 32, 33, 48, 64, 100, 128, 784):
            n = 64
            base = rng.standard_normal((n, dim)).astype(np.float32) * rng.uniform(0.1, 3, dim).astype(np.float32)
            if space == "l2":
                base += np.float32(300)
            q = base[:4] + rng.standard_normal((4, dim)).astype(np.float32) * 0.3
            core = _core.Core(space, dim, n, 4, 10, 1, False, storage, False)
            core.add(base, np.arange(n, dtype=np.uint64), n, 1, False)
            slots = np.tile(np.arange(n, dtype=np.uint32), (4, 1))
            d = np.empty((4, n), np.float32)
            core.distances(np.ascontiguousarray(q), 4, slots, d)
            a, b = rng.integers(0, n, 200).astype(np.uint32), rng.integers(0, n, 200).astype(np.uint32)
            p = np.empty(200, np.float32)
            core.pair_distances(a, b, p)
            st = core.export_state()
            enc = lambda x: base64.b64encode(bytes(x)).decode()
            out[f"{storage}-{space}-{dim}"] = dict(q=enc(q.astype(np.float32)), d=enc(d), a=enc(a), b=enc(b), p=enc(p),
                                                   rows=enc(st["vectors"]), quant=enc(st["quantizer"]))
print(json.dumps(out))
"""


def run_storage(level):
    env = dict(os.environ, GHNSW_SIMD=level)
    res = subprocess.run([sys.executable, "-c", STORAGE_SCRIPT], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout)


def _arr(text, dtype):
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def decoded_rows(storage, rec, dim):
    """float64 [n, dim] of the stored rows, decoded in NumPy (float16 values; offset + scale * code)."""
    raw = base64.b64decode(rec["rows"])
    if storage == "float16":
        width = -(-dim // 8) * 8
        return np.frombuffer(raw, np.float16).reshape(-1, width)[:, :dim].astype(np.float64)
    width = -(-dim // 16) * 16 + 4
    codes = np.frombuffer(raw, np.int8).reshape(-1, width)[:, :dim].astype(np.float64)
    offset, scale = _arr(rec["quant"], np.float32).reshape(2, dim).astype(np.float64)
    return offset + scale * codes


def reference(space, x, rows):
    """float64 distances [len(x), len(rows)] by the index's definitions."""
    x = np.asarray(x, np.float64)
    if space == "cosine":
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-30)
    if space == "l2":
        return ((x[:, None, :] - rows[None]) ** 2).sum(-1)
    return 1.0 - x @ rows.T


def tolerances(storage, space, q, rec, rows, dim):
    """Error bounds ([nq, n] queries, [n, n] pairs) of the kernels against float64 on the decoded rows.

    float32 rounding costs about 1e-5 of the terms summed (not of the result: ip sums can cancel).
    int8 queries add the rounding of the weights w to a * u: at most a / 2 per code of magnitude
    <= 128, twice over for l2's cross term; a larger error means a wrong integer sum."""
    x = np.asarray(q, np.float64)
    if space == "cosine":
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-30)
    absrows = np.abs(rows)
    if storage == "float16":
        terms = reference("l2", x, rows) if space == "l2" else 1 + np.abs(x) @ absrows.T
        pair_terms = reference("l2", rows, rows) if space == "l2" else 1 + absrows @ absrows.T
        return 1e-5 * terms + 1e-30, 1e-5 * pair_terms + 1e-30
    offset, scale = _arr(rec["quant"], np.float32).reshape(2, dim).astype(np.float64)
    codes = np.rint((rows - offset) / np.where(scale > 0, scale, 1))
    w = (x - offset) * scale if space == "l2" else x * scale
    if space == "l2":
        terms = (((x - offset) ** 2).sum(1)[:, None] + ((scale * codes) ** 2).sum(1)[None]
                 + 2 * np.abs(w) @ np.abs(codes).T)
        pair_terms = reference("l2", rows, rows)
    else:
        terms = 1 + np.abs(x * offset).sum(1)[:, None] + np.abs(w) @ np.abs(codes).T
        pair_terms = 1 + absrows @ absrows.T + (np.abs(offset) + 128 * scale) @ (np.abs(offset) + 128 * scale)
    pad = -(-dim // 16) * 16
    a = np.abs(w).max(axis=1, keepdims=True) / min(32767, (2**31 - 1) // (128 * pad))
    rounding = (2 if space == "l2" else 1) * a / 2 * 128 * dim
    return rounding + 1e-5 * terms + 1e-30, 2e-5 * pair_terms + 1e-30


def test_compressed_kernels_on_every_simd_path_against_float64():
    import gpuhnsw
    best = gpuhnsw._core.simd
    runs = {level: run_storage(level) for level in LEVELS[:LEVELS.index(best) + 1]}
    assert [r["simd"] for r in runs.values()] == list(runs)
    for key, rec in runs["portable"].items():
        if key == "simd":
            continue
        storage, space, dim = key.split("-")
        dim = int(dim)
        rows = decoded_rows(storage, rec, dim)
        q = _arr(rec["q"], np.float32).reshape(4, dim)
        ref = reference(space, q, rows)
        a, b = _arr(rec["a"], np.uint32), _arr(rec["b"], np.uint32)
        pref = reference("l2" if space == "l2" else "ip", rows, rows)[a, b]
        tol, pair_tol = tolerances(storage, space, q, rec, rows, dim)
        for level, run in runs.items():
            got = run[key]
            d = _arr(got["d"], np.float32).reshape(4, -1).astype(np.float64)
            p = _arr(got["p"], np.float32).astype(np.float64)
            assert np.all(np.abs(d - ref) <= tol), (key, level, np.max(np.abs(d - ref) / tol))
            assert np.all(np.abs(p - pref) <= pair_tol[a, b]), (key, level, np.max(np.abs(p - pref) / pair_tol[a, b]))
            if storage == "int8":   # integer sums, the same float steps: every path gives the same bits
                np.testing.assert_array_equal(d, _arr(runs["portable"][key]["d"], np.float32).reshape(4, -1),
                                              err_msg=f"{key} on {level}")
