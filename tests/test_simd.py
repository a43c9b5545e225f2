"""Every SIMD path (chosen at run time, overridable with GHNSW_SIMD) gives the same distances."""
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
    assert run("nonsense")["simd"] in ("portable", "avx2", "avx512")
