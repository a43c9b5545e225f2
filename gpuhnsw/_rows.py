"""The two row rules every engine shares, on the host (NumPy) or the device (CuPy, ``xp``).

``normalize_rows``: hnswlib's cosine rule, ``x / (|x| + 1e-30)`` (zero rows stay zero), the norm
summed in float64 so that the scaling is correctly rounded.  The C engine applies the same rule to
what it stores and to its queries (``ghnsw_normalize``, in float32 as hnswlib); every Python path
that normalises rows itself (exact search, the k-NN graphs, GPU NN-descent, the in-batch candidates
of GPU-assisted inserts, the distributed k-means) calls this.

``l2_centre``: the centre of squared-L2 ranking keys.  Squared L2 does not change when the data
moves, but float32 keys ``|b|^2 - 2 q.b`` do: their rounding error is about ``eps * |b|^2``, noise
once the norms dwarf the distances (16-d unit Gaussians 10,000 from the origin: recall 0.01).  Keys
taken about a centre ``mu`` within the data's spread, ``|b - mu|^2 - 2 (q - mu).(b - mu)``, differ
from ``|q - b|^2`` by ``|q - mu|^2``, fixed per query, so they rank exactly as the distance does, and
their error is about ``eps * (|b - mu|^2 + sqrt(d) |q - mu| |b - mu|)``: the data's spread times its
offset instead of the offset squared (eps = 2^-24).
"""
from __future__ import annotations

import numpy as np

__all__ = ["normalize_rows", "l2_mean", "l2_centre"]

# Entries (rows x columns) of one float64 / centred float32 temporary.
_NORM_CHUNK = 1 << 22
_CENTRE_CHUNK = 1 << 18
# Rows the centre is the mean of (evenly strided): any point within the spread keeps the keys exact.
_CENTRE_SAMPLE = 4096


def normalize_rows(x, xp=np):
    """float32 ``[n, d]``: the rows of ``x`` (``[n, d]``, float32-castable, NumPy or CuPy as ``xp``)
    scaled by ``1 / (|x| + 1e-30)``."""
    x = xp.asarray(x, dtype=xp.float32)
    out = xp.empty_like(x)
    step = max(1, _NORM_CHUNK // max(1, x.shape[1]))
    for a in range(0, x.shape[0], step):
        xb = x[a:a + step].astype(xp.float64)
        norms = xp.sqrt(xp.einsum("ij,ij->i", xb, xb))
        out[a:a + step] = xb * (1.0 / (norms + 1e-30))[:, None]
    return out


def l2_mean(x, xp=np):
    """float32 ``[d]``: the centre of the l2 keys of the rows ``x`` (float32 ``[n, d]``, ``n >= 1``,
    NumPy or CuPy as ``xp``), the float64 mean of at most ~4096 evenly strided rows."""
    return x[::max(1, x.shape[0] // _CENTRE_SAMPLE)].mean(axis=0, dtype=xp.float64).astype(xp.float32)


def l2_centre(x, xp=np):
    """The centre of the l2 keys of the rows ``x`` (float32 ``[n, d]``, ``n >= 1``, NumPy or CuPy as
    ``xp``): (mu float32 ``[d]``, ``l2_mean``; sq float32 ``[n]``, ``|x_i - mu|^2``).

    ``sq`` is summed from float32 row chunks centred on the fly (never a copy of ``x``), where
    ``|x|^2 - 2 mu.x + |mu|^2`` would cancel: its error, like the keys', scales with the spread
    (about ``d eps |x_i - mu|^2``).  One pass over ``x``.
    """
    mu = l2_mean(x, xp)
    sq = xp.empty(x.shape[0], dtype=xp.float32)
    step = max(1, _CENTRE_CHUNK // max(1, x.shape[1]))
    for a in range(0, x.shape[0], step):
        c = x[a:a + step] - mu                                    # [step, d] float32
        sq[a:a + step] = xp.einsum("ij,ij->i", c, c)
    return mu, sq
