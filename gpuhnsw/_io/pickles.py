"""The state of a pickle or of ``Index(dict)``: ours (``Index.__getstate__``), or hnswlib 0.8.0's
(``hnswlib.Index.__getstate__()[0]``), checked before anything is built from it.
"""
import struct

import numpy as np

from .._core import MAX_CAPACITY, MAX_DIM, MAX_LEVEL, MAX_M, SPACES, STORAGES
from .._errors import IndexFileError
from .._search_graph import MODES as SEARCH_GRAPH_MODES
from .._validate import thread_limit
from . import hnswlib_format
from .state import ARRAYS, check_int, check_scalars

__all__ = ["check_state", "state_from_hnswlib"]


def check_state(state):
    """Check a pickled or ``Index(dict)`` state before anything is built from it and return the
    state to build from: ours as it is, or hnswlib 0.8.0's (its ``__getstate__()[0]``, recognised by
    ``data_level0``) converted by :func:`state_from_hnswlib`.  Checked: the Index fields (``space``,
    ``dim``, ``ef``, ``num_threads``, ``cur_l``, ``index_inited``, ``auto_resize``, ``search_graph``,
    ``ser_version``)
    and, for an initialised index, that every core field is there and its scalars in range.  Raises
    :class:`IndexFileError` naming the field (array contents are checked by the engine's import)."""
    if not isinstance(state, dict):
        raise IndexFileError(f"index state must be a dict, got {type(state).__name__}")
    if "data_level0" in state:
        state = state_from_hnswlib(state)
    defaults = dict(ser_version=1, ef=10, num_threads=1, cur_l=0, index_inited=True)
    full = {**defaults, **state}
    missing = [key for key in ("space", "dim") if key not in state]
    if missing:
        raise IndexFileError(f"index state lacks {', '.join(missing)}")
    version = full["ser_version"]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)) or version != 1:
        raise IndexFileError(f"ser_version={version!r}: unsupported state version")
    if full["space"] not in SPACES:
        raise IndexFileError(f"space must be one of {SPACES}, got {full['space']!r}")
    for key, lo, hi in (("dim", 1, MAX_DIM), ("ef", 1, 2**63 - 1), ("num_threads", -2**31, thread_limit()),
                        ("cur_l", 0, 2**64 - 1)):
        check_int(full, key, lo, hi, IndexFileError)
    for key in ("index_inited", "auto_resize", "rerank"):
        if key in full and not isinstance(full[key], (bool, np.bool_)):
            raise IndexFileError(f"{key} must be a bool, got {type(full[key]).__name__}")
    if "storage" in full and full["storage"] not in STORAGES:
        raise IndexFileError(f"storage must be one of {STORAGES}, got {full['storage']!r}")
    if full.get("search_graph", "hnsw") not in SEARCH_GRAPH_MODES:
        raise IndexFileError(f"search_graph must be one of {SEARCH_GRAPH_MODES}, got {full['search_graph']!r}")
    if not full["index_inited"]:
        return state
    # an initialised index without its arrays would come back empty: refuse it
    missing = [key for key in ("M", "ef_construction", "random_seed", "max_elements", "count", "entry_point",
                               "max_level", "insert_seq", "allow_replace_deleted") + tuple(key for key, _ in ARRAYS)
               if key not in state]
    if missing:
        raise IndexFileError(f"index state lacks {', '.join(missing)} (an initialised index needs them all; "
                             "pass index_inited=False for an empty one)")
    if not isinstance(state["allow_replace_deleted"], (bool, np.bool_)):
        raise IndexFileError("allow_replace_deleted must be a bool")
    check_scalars(state, IndexFileError)
    return state


# the fields of hnswlib 0.8.0's pickle state that state_from_hnswlib reads
_HNSW_STATE_INTS = ("dim", "num_threads", "seed", "ef", "offset_level0", "max_elements", "cur_element_count",
                    "size_data_per_element", "label_offset", "offset_data", "max_level", "enterpoint_node",
                    "max_M", "max_M0", "M", "ef_construction", "size_links_per_element")
_HNSW_STATE_ARRAYS = {"label_lookup_external": np.uint64, "label_lookup_internal": np.uint32,
                      "element_levels": np.int32, "data_level0": np.int8, "link_lists": np.int8}


def state_from_hnswlib(h):
    """Our state from hnswlib 0.8.0's pickle state ``h`` (``hnswlib.Index.__getstate__()[0]``).

    The level-0 records and link blocks are hnswlib's file layout without the per-element size
    words, so they are put back in file order and read by the hnswlib file reader (every check of a
    file applies); the label map, levels, ``seed``, ``ef`` and ``num_threads`` hnswlib also keeps are
    checked against them or carried over.  Raises :class:`IndexFileError` naming the field."""
    err = IndexFileError
    missing = [k for k in ("ser_version", "space", "index_inited", *_HNSW_STATE_INTS, "mult",
                           "allow_replace_deleted", *_HNSW_STATE_ARRAYS) if k not in h]
    if h.get("index_inited") is False:   # an uninitialised hnswlib index pickles its parameters only
        missing = [k for k in ("ser_version", "space", "dim") if k not in h]
    if missing:
        raise err(f"hnswlib index state lacks {', '.join(missing)}")
    if h["ser_version"] != 1:
        raise err(f"hnswlib index state: ser_version={h['ser_version']!r}, only 1 (hnswlib 0.8.0) is known")
    if not isinstance(h["index_inited"], (bool, np.bool_)):
        raise err("hnswlib index state: index_inited must be a bool")
    ours = dict(space=h["space"], dim=h["dim"], ser_version=1, index_inited=bool(h["index_inited"]))
    for key in ("ef", "num_threads"):
        if key in h:
            ours[key] = h[key]
    if ours.get("ef") == 0:   # hnswlib searches with max(ef, k): its 0 is our 1 (set_ef refuses 0)
        ours["ef"] = 1
    if not h["index_inited"]:
        return ours
    for key in _HNSW_STATE_INTS:
        check_int(h, key, -2**63, 2**64 - 1, err)
    if h["space"] not in SPACES:
        raise err(f"space must be one of {SPACES}, got {h['space']!r}")
    if not isinstance(h["allow_replace_deleted"], (bool, np.bool_)):
        raise err("hnswlib index state: allow_replace_deleted must be a bool")
    arrays = {}
    for key, dtype in _HNSW_STATE_ARRAYS.items():
        a = h[key]
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != dtype:
            raise err(f"hnswlib index state: {key} must be a 1-d {np.dtype(dtype).name} array")
        arrays[key] = a
    n, M, per_elem = h["cur_element_count"], h["M"], h["size_data_per_element"]
    if not 0 <= n <= min(h["max_elements"], MAX_CAPACITY) or not 2 <= M <= MAX_M:
        raise err(f"hnswlib index state: cur_element_count={n}, max_elements={h['max_elements']}, M={M}")
    if h["size_links_per_element"] != 4 * (1 + M):
        raise err(f"hnswlib index state: size_links_per_element={h['size_links_per_element']}, "
                  f"expected {4 * (1 + M)}")
    levels = arrays["element_levels"]
    if levels.size != h["max_elements"] or (n and not 0 <= levels[:n].min() <= levels[:n].max() <= MAX_LEVEL):
        raise err("hnswlib index state: element_levels must hold max_elements levels within "
                  f"[0, {MAX_LEVEL}]")
    words = levels[:n].astype(np.int64) * (1 + M)                     # [n] uint32 words of each link list
    level0, links = arrays["data_level0"], arrays["link_lists"]
    if level0.size != n * per_elem or links.size != 4 * int(words.sum()):
        raise err(f"hnswlib index state: data_level0 holds {level0.size} bytes and link_lists {links.size}, "
                  f"expected {n * per_elem} and {4 * int(words.sum())}")
    try:
        head = hnswlib_format.pack_header(h["offset_level0"], h["max_elements"], n, per_elem, h["label_offset"],
                                 h["offset_data"], h["max_level"], h["enterpoint_node"] & 0xFFFFFFFF, h["max_M"],
                                 h["max_M0"], M, float(h["mult"]), h["ef_construction"])
    except (struct.error, TypeError, ValueError) as exc:
        raise err(f"hnswlib index state: a header field is out of range ({exc})") from None
    tail = np.empty(n + int(words.sum()), dtype="<u4")                # file order: [size word][blocks] each
    at = np.arange(n) + np.cumsum(words) - words
    is_size = np.zeros(tail.size, dtype=bool)
    is_size[at] = True
    tail[at] = 4 * words
    tail[~is_size] = links.view("<u4")
    state = hnswlib_format.read(head + level0.tobytes() + tail.tobytes(), h["space"], h["dim"])
    labels = np.frombuffer(state["labels"], np.uint64)
    external, internal = arrays["label_lookup_external"], arrays["label_lookup_internal"]
    if (external.size != n or internal.size != n or (n and internal.max() >= n)
            or not np.array_equal(labels[internal], external)):
        raise err("hnswlib index state: label_lookup does not match the labels of the stored elements")
    check_int(h, "seed", 0, 2**64 - 1, err)
    state.update(ours, random_seed=h["seed"], allow_replace_deleted=bool(h["allow_replace_deleted"]))
    return state
