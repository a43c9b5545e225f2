"""The state dict: the one form of an index that every file format reads into and writes from, that
``Core.export_state`` returns and ``Core.from_state`` takes (docs/architecture.md, "State export /
import"), and its checks.  Scalars plus byte strings:

=========  ===========================================  ==========================================
key        dtype, shape                                 notes
=========  ===========================================  ==========================================
vectors    float32 ``[n, dim]``                         normalised for cosine
links0     uint32 ``[n, 2M]``                           unused entries ``0xFFFFFFFF``
degree0    uint32 ``[n]``                               live entries of each ``links0`` row
labels     uint64 ``[n]``                               unique
levels     uint8 ``[n]``                                top level of each slot
upper      uint32 ``[sum(levels) * (1 + M)]``           per slot, per level 1..L: ``[count, M ids]``
deleted    uint8 ``[n]``                                0/1
exact      float32 ``[n, dim]``, or empty               ``rerank``: the float32 rows
quantizer  float32 ``[2, dim]``, or empty               int8, once trained: offsets, then scales
=========  ===========================================  ==========================================

plus ``storage`` (``"float32"``, ``"float16"``, ``"int8"``; absent: float32), ``rerank`` (bool),
``clipped_rows`` and ``clipped_values`` (int8's clip counters).  ``vectors`` of a float16 or int8
index are the engine's stored rows, ``[n, _core.row_bytes(dim, storage)]`` bytes (gpuhnsw.h).

Nothing read from a file or a pickle is trusted: the scalars are range-checked against the engine's
limits (so whatever passes loads, and saves again) and the arrays against the graph invariants the C
core and the kernels rely on; any inconsistency raises the caller's error class naming the problem.
"""
import math

import numpy as np

# The engine's limits have one home (gpuhnsw/csrc/gpuhnsw.h).  SPACES: position = space code;
# NO_LINK: unused link entry; MAX_M: hnswlib's init_index cap (no real file has more); MAX_LEVEL:
# levels are uint8.
from .._core import (INVALID_SLOT as NO_LINK, MAX_CAPACITY, MAX_DIM, MAX_EF_CONSTRUCTION, MAX_LEVEL, MAX_M,
                     SPACES, STORAGES, row_bytes)

__all__ = ["ARRAYS", "OPTIONAL", "MAPPABLE", "NO_LINK", "arrays_of", "check_graph", "normalised", "check_int",
           "check_scalars", "validated_arrays"]

#: The state's arrays (key, dtype), in the order of the gpuhnsw format's sections.
ARRAYS = (("links0", np.uint32), ("degree0", np.uint32), ("vectors", np.float32), ("labels", np.uint64),
          ("levels", np.uint8), ("upper", np.uint32), ("deleted", np.uint8))
#: The arrays of the compressed storages and the re-rank (empty where they do not apply).
OPTIONAL = (("exact", np.float32), ("quantizer", np.float32))
#: The arrays a mapped load leaves None (the engine maps them from the file).
MAPPABLE = ("links0", "vectors", "exact")


def arrays_of(state, err):
    """View the byte-string fields of ``state`` as typed numpy arrays (no copy), checking sizes.

    Returns a dict with ``vectors`` float32 [n, dim] (float32 storage) or uint8 [n, row_bytes] (the
    stored rows of a float16 or int8 index), ``links0`` uint32 [n, 2M], ``degree0`` uint32 [n],
    ``labels`` uint64 [n], ``levels`` uint8 [n], ``upper`` uint32 [sum(levels) * (1 + M)],
    ``deleted`` uint8 [n], ``exact`` float32 [n, dim] (None without rerank) and ``quantizer``
    float32 [2, dim] (None while untrained).  ``err`` is the exception class to raise.  A field that
    is None (mapped from a file, see ``native.map_index``) stays None.
    """
    n, dim, M = state["count"], state["dim"], state["M"]
    storage, rerank = state.get("storage", "float32"), bool(state.get("rerank", False))
    compressed = storage != "float32"
    shapes = {"links0": (n, 2 * M), "degree0": (n,), "labels": (n,), "levels": (n,), "deleted": (n,),
              "vectors": (n, row_bytes(dim, storage)) if compressed else (n, dim), "exact": (n, dim),
              "quantizer": (2, dim)}
    out = {}
    for key, dtype in ARRAYS + OPTIONAL:
        if key == "vectors" and compressed:
            dtype = np.uint8
        field = state.get(key)
        if (key in MAPPABLE and field is None) or (key == "exact" and not rerank) or \
                (key == "quantizer" and (field is None or not len(field))):
            out[key] = None
            continue
        try:
            raw = np.frombuffer(field, dtype=np.uint8)
        except (TypeError, ValueError) as e:  # not a contiguous buffer
            raise err(f"state field {key!r} is not a contiguous byte buffer: {e}") from None
        if key == "upper":  # its length depends on the levels, checked below
            shape = (raw.size // 4,)
            if raw.size % 4:
                raise err(f"upper: {raw.size} bytes is not a whole number of uint32")
        else:
            shape = shapes[key]
            want = math.prod(shape) * np.dtype(dtype).itemsize
            if raw.size != want:
                raise err(f"{key}: {raw.size} bytes, expected {want} for shape {shape}")
        out[key] = raw.view(dtype).reshape(shape)
    return out


def check_graph(a, *, M, entry_point, max_level, err):
    """Check the graph invariants the C core and the GPU kernels rely on.

    ``a`` is the dict of :func:`arrays_of`; unused link entries may hold anything (only the
    first ``count`` of each list are read); mapped ``links0`` (None) is checked by the engine as it
    adopts the mapping. Raises ``err`` naming the first problem found.
    """
    n = a["degree0"].shape[0]
    M0 = 2 * M
    if n and int(a["degree0"].max()) > M0:
        i = int(np.argmax(a["degree0"] > M0))
        raise err(f"level-0 link count {int(a['degree0'][i])} of slot {i} exceeds M0={M0}")
    used0 = np.arange(M0, dtype=np.uint32)[None, :] < a["degree0"][:, None]
    if n and a["links0"] is not None and int(a["links0"][used0].max(initial=0)) >= n:
        raise err(f"level-0 link id out of range (count={n})")
    if n and int(a["deleted"].max()) > 1:
        raise err("deleted flags must be 0 or 1")
    if n > 1:
        s = np.sort(a["labels"])
        if np.any(s[1:] == s[:-1]):
            raise err(f"duplicate label {int(s[1:][s[1:] == s[:-1]][0])}")
    levels = a["levels"]
    blocks_per_slot = levels.astype(np.int64)
    if a["upper"].size != int(blocks_per_slot.sum()) * (1 + M):
        raise err(f"upper: {a['upper'].size} uint32, levels need {int(blocks_per_slot.sum()) * (1 + M)}")
    blocks = a["upper"].reshape(-1, 1 + M)
    counts = blocks[:, 0]
    if blocks.shape[0] and int(counts.max()) > M:
        raise err(f"upper-level link count {int(counts.max())} exceeds M={M}")
    # The level of each block: a slot of level L owns blocks for levels 1..L, in order.
    first = np.repeat(np.cumsum(blocks_per_slot) - blocks_per_slot, blocks_per_slot)
    block_level = np.arange(blocks.shape[0]) - first + 1
    used = np.arange(M, dtype=np.uint32)[None, :] < counts[:, None]
    ids = blocks[:, 1:][used]
    if ids.size:
        if int(ids.max()) >= n:
            raise err(f"upper-level link id out of range (count={n})")
        # A neighbour at level l must itself exist at level l, or the descent reads past its lists.
        if np.any(levels[ids] < np.broadcast_to(block_level[:, None], used.shape)[used]):
            raise err("upper-level link to a slot that does not reach that level")
    if n == 0:
        if entry_point != -1 or max_level != -1:
            raise err(f"empty index with entry point {entry_point}, max level {max_level}")
    else:
        if not 0 <= entry_point < n:
            raise err(f"entry point {entry_point} out of range (count={n})")
        if max_level != int(levels[entry_point]) or max_level != int(levels.max()):
            raise err(f"max level {max_level} is not the entry point's level "
                      f"{int(levels[entry_point])} / the highest level {int(levels.max())}")


def normalised(a, M):
    """Copies of ``links0`` (None stays None) and ``upper`` with every unused entry set to ``NO_LINK``."""
    links0 = None if a["links0"] is None else a["links0"].copy()
    if links0 is not None:
        links0[np.arange(2 * M)[None, :] >= a["degree0"][:, None]] = NO_LINK
    upper = a["upper"].copy()
    blocks = upper.reshape(-1, 1 + M)
    blocks[:, 1:][np.arange(M)[None, :] >= blocks[:, :1]] = NO_LINK
    return links0, upper


def check_int(state, key, lo, hi, err):
    v = state[key]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise err(f"{key} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise err(f"{key}={v} outside [{lo}, {hi}]")


def check_scalars(state, err):
    """Range-check the scalar fields of ``state`` (their types and bounds): the engine's limits, so
    whatever passes here also loads, and saves again."""
    if state["space"] not in SPACES:
        raise err(f"space must be one of {SPACES}, got {state['space']!r}")
    for key, lo, hi in (("dim", 1, MAX_DIM), ("M", 2, MAX_M), ("ef_construction", 0, MAX_EF_CONSTRUCTION),
                        ("random_seed", 0, 2**64 - 1), ("max_elements", 0, MAX_CAPACITY),
                        ("max_level", -1, MAX_LEVEL), ("insert_seq", 0, 2**64 - 1)):
        check_int(state, key, lo, hi, err)
    check_int(state, "count", 0, state["max_elements"], err)
    check_int(state, "entry_point", -1, state["count"] - 1, err)
    if state.get("storage", "float32") not in STORAGES:
        raise err(f"storage must be one of {STORAGES}, got {state['storage']!r}")
    if not isinstance(state.get("rerank", False), (bool, np.bool_)):
        raise err("rerank must be a bool")
    for key in ("clipped_rows", "clipped_values"):
        if key in state:
            check_int(state, key, 0, 2**64 - 1, err)


def validated_arrays(state):
    """:func:`arrays_of` a state about to be written, every check passed (else ValueError)."""
    check_scalars(state, ValueError)
    a = arrays_of(state, ValueError)
    check_graph(a, M=state["M"], entry_point=state["entry_point"], max_level=state["max_level"], err=ValueError)
    return a
