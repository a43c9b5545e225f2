"""Device operations shared by the GPU paths: the top-k selection of a distance tile (exact search,
GPU NN-descent's merges) and the exact nearest neighbours within one batch of rows (the in-batch
candidates of GPU-assisted inserts).

Both take arrays already on the device; ``batch_neighbours`` also the ``cupy`` module (``cp``, the
caller's, from ``arrays.import_cupy``).
"""
from __future__ import annotations

import numpy as np

from .._rows import l2_centre, normalize_rows
from . import launch

__all__ = ["select_topk", "batch_neighbours"]

_TILE_BYTES = 256 << 20   # bound on one [rows, n] distance tile of the in-batch search


def select_topk(tile, k, out_dists, out_index, *, index_offset=0, prev=False, key_scale=1.0,
                key_bias=None, exclude=None, exclude_key=0.0, transposed=False):
    """The ``k`` smallest keys of each row of ``tile`` (cupy float32 ``[nq, n]``, unit stride along a
    row, rows possibly further apart: a slice of a wider workspace), ascending, ties by the smaller
    column, NaN as +inf: ``select_topk_kernel``, a partial selection (no row is sorted). With
    ``transposed``, the rows are the tile's columns (``[n, nq]`` stored; the symmetric k-NN graph).
    The key of column ``c`` is ``key_scale * tile[:, c] + key_bias[c]`` (``key_bias``: cupy float32
    ``[n]`` or None), formed as the kernel reads it. With ``prev``, ``out_dists``/``out_index`` hold
    a running result of earlier tiles (columns before ``index_offset``) that is merged in.
    ``exclude`` (cupy int64 ``[nq]`` or None): row ``i``'s column of global index ``exclude[i]``
    gets the key ``exclude_key``.

    out_dists : cupy float32 [nq, k]; out_index : cupy int64 [nq, k] (column + index_offset, -1 missing)
    """
    rows, cols = tile.shape
    stride = tile.strides[0] // tile.itemsize
    nq, n, row_stride, col_stride = (cols, rows, 1, stride) if transposed else (rows, cols, stride, 1)
    if nq == 0 or k == 0:
        return
    launch.topk(tile=tile, row_stride=row_stride, col_stride=col_stride, n=n, index_offset=index_offset,
                key_scale=key_scale, key_bias=key_bias, exclude=exclude, exclude_key=exclude_key,
                prev_dists=out_dists if prev else None, prev_index=out_index if prev else None, nq=nq, k=k,
                out_dists=out_dists, out_index=out_index)


def batch_neighbours(cp, rows, k, space):
    """Exact ``k`` nearest other rows of each row of ``rows`` (cupy float32 ``[b, dim]``, on the
    device, ``k < b``) by the distance of ``space``.  Returns numpy uint32 ``[b, k]`` row numbers.

    The ranking keys: ``|b - mu|^2 - 2 (a - mu).(b - mu)`` for l2 (``_rows.l2_centre``), ``-a.b``
    for ip and, on normalised rows, cosine."""
    b = rows.shape[0]
    sq = None
    if space == "cosine":
        rows = normalize_rows(rows, cp)
    elif space == "l2":
        mu, sq = l2_centre(rows, cp)
        rows = rows - mu
    out_d = cp.empty((b, k), dtype=cp.float32)
    out_i = cp.empty((b, k), dtype=cp.int64)
    step = max(1, _TILE_BYTES // (4 * b))
    for a in range(0, b, step):
        e = min(b, a + step)
        g = rows[a:e] @ rows.T                     # [e - a, b]; the ranking key of each pair
        if sq is not None:
            g *= np.float32(-2.0)
            g += sq[None, :]
        else:
            cp.negative(g, out=g)
        g[cp.arange(e - a), cp.arange(a, e)] = cp.inf   # not its own neighbour
        select_topk(g, k, out_d[a:e], out_i[a:e])
    return cp.asnumpy(out_i).astype(np.uint32)      # all found: k <= b - 1 finite columns per row
